"""RecycleGPT: faster decoding by recycling the hidden state a language model already computed.

Public API::

    engine = recyclegpt.load("smollm2-135m", module="default")
    out = engine.generate([prompt], strategy="verified")[0]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from recyclegpt.config import PRESETS, ModelConfig, RecycleConfig, TrainConfig
from recyclegpt.generate import DecodeStats, Engine, Generation
from recyclegpt.recycle import RecyclableModule, RecycleGPT
from recyclegpt.sampling import SamplingConfig

__all__ = [
    "PRESETS", "DecodeStats", "Engine", "Generation", "ModelConfig", "RecycleConfig", "RecycleGPT",
    "RecyclableModule", "SamplingConfig", "TrainConfig", "load",
]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from recyclegpt.bases import Base


def load(
    model: str = "smollm2-135m", module: str | None = None, backend: str = "auto", compile: bool = False,
    dtype: str = "float32", prepack: bool | None = None, quant: str = "none", device: str = "cpu",
    with_base: bool = False,
) -> Engine | tuple[Engine, Base]:
    """Load a base (registry name, HF directory or GGUF file) and optionally a module, ready to generate.

    The one way to build an ``Engine`` from a base's name: every command (generate, chat, serve, eval, bench,
    lm-eval, data, copy-gate, demo), the lm-eval adapter and the scripts call it.

    Args:
        model: the base; see ``recyclegpt bases``.
        module: a module file, ``"default"`` for the one shipped for this base, or None.
        backend: ``auto``, ``native`` or ``hf``.
        compile: decode through ``torch.compile`` (native backbone; the first calls compile).
        dtype: ``float32`` or ``bfloat16`` (faster on CPUs with native bfloat16 products; greedy
            answers then follow the bfloat16 model).
        prepack: multiply through oneDNN with weights packed once (native backbone, CPU, eager): faster
            where MKL's float32 products are slow for a few rows (AMD EPYC). None (the default) packs where
            that is the CPU's fastest exact path and the other options allow it (``hardware.prepack_by_default``).
        quant: ``none``, ``int8`` or ``int4``: weight-only quantized products for base and module (native
            backbone, float32, eager); verified decoding stays exact against standard decoding of the same
            quantized model.
        device: where base and module run: ``cpu``, ``cuda`` or ``cuda:N`` (prepack and quant: CPU only).
        with_base: also return the loaded ``bases.Base`` (its name, backend, and whether prompts get the
            chat template), as ``(engine, base)``.

    Returns:
        The ``Engine``, or ``(engine, base)`` with ``with_base``.

    Raises:
        BaseError: an unknown name, dtype, device or quant, or options that do not go together.
        CheckpointError: the module does not fit the base (widths or vocabulary).
    """
    from recyclegpt.bases import decoding_base, module_for

    base = decoding_base(model, backend, compile, dtype, prepack, device, quant)
    engine = Engine(base.backbone, base.tokenizer, module_for(base, module, dtype, quant=quant), compile=compile)
    return (engine, base) if with_base else engine
