"""RecycleGPT: faster decoding by recycling the hidden state a language model already computed.

Public API::

    engine = recyclegpt.load("smollm2-135m", module="default")
    out = engine.generate([prompt], strategy="verified")[0]
"""

from __future__ import annotations

from recyclegpt.config import PRESETS, ModelConfig, RecycleConfig, TrainConfig
from recyclegpt.generate import DecodeStats, Engine, Generation
from recyclegpt.recycle import RecyclableModule, RecycleGPT
from recyclegpt.sampling import SamplingConfig

__all__ = [
    "PRESETS", "DecodeStats", "Engine", "Generation", "ModelConfig", "RecycleConfig", "RecycleGPT",
    "RecyclableModule", "SamplingConfig", "TrainConfig", "load",
]
__version__ = "0.1.0"


def load(
    model: str = "smollm2-135m", module: str | None = None, backend: str = "auto", compile: bool = False,
    dtype: str = "float32", prepack: bool = False, quant: str = "none",
) -> Engine:
    """Load a base (registry name, HF directory or GGUF file) and optionally a module, ready to generate.

    Args:
        model: the base; see ``recyclegpt bases``.
        module: a module file, ``"default"`` for the one shipped for this base, or None.
        backend: ``auto``, ``native`` or ``hf``.
        compile: decode through ``torch.compile`` (native backbone; the first calls compile).
        dtype: ``float32`` or ``bfloat16`` (faster on CPUs with native bfloat16 products; greedy
            answers then follow the bfloat16 model).
        prepack: multiply through oneDNN with weights packed once (native backbone, not with compile):
            faster where the default float32 products are slow for a few rows (e.g. AMD EPYC).
        quant: ``none``, ``int8`` or ``int4``: weight-only quantized products for base and module (native
            backbone, float32, eager); verified decoding stays exact against standard decoding of the same
            quantized model.
    """
    from recyclegpt.bases import load_engine

    return load_engine(model, module, backend, compile, dtype, prepack, quant=quant)[0]
