"""llama.cpp, through llama-cpp-python, as the baseline a user would run instead: GGUF files in llama.cpp's
own Q4_0 / Q8_0 formats made from a base's GGUF file with llama.cpp's own quantizer, greedy decoding fed
the same token ids as the engine (``bench``'s ``llama-cpp-*`` rows), and text scoring (perplexity).

Optional: ``pip install 'recyclegpt[llamacpp]'`` builds llama.cpp for this CPU from source (about 20
minutes on 2 cores; there is no wheel on PyPI). Nothing else in the package needs it.

A registry base ships as a quantized GGUF file (SmolLM2-135M as Q4_1), so the files made here are
requantized from it and carry its rounding, as the engine's own float32 weights (dequantized from the same
file) do. They are cached next to the converted bases (``registry.home() / "gguf"``), written atomically.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from recyclegpt.bases.registry import BaseError, home, resolve

# llama.cpp's file types (``LLAMA_FTYPE_MOSTLY_*``) by the names used here.
FORMATS = ("q4_0", "q8_0")
INSTALL = "pip install 'recyclegpt[llamacpp]' (builds llama.cpp for this CPU, about 20 minutes on 2 cores)"


def llama_cpp():
    """The ``llama_cpp`` module.

    Raises:
        BaseError: llama-cpp-python is not installed (saying how to install it).
    """
    try:
        import llama_cpp
    except ImportError:
        raise BaseError(f"the llama.cpp rows need llama-cpp-python, which is not installed: {INSTALL}") from None
    return llama_cpp


def available() -> bool:
    """Whether llama-cpp-python is installed (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def quantized_gguf(model: str, fmt: str, threads: int = 0) -> Path:
    """The base ``model`` (registry name or .gguf file) in llama.cpp's format ``fmt``, made once with llama.cpp's
    own quantizer from the base's GGUF file and cached.

    Raises:
        BaseError: an unknown format, a base that does not come as a GGUF file, or llama-cpp-python missing.
    """
    if fmt not in FORMATS:
        raise BaseError(f"unknown llama.cpp format {fmt!r}; choose one of {', '.join(FORMATS)}")
    _, source = resolve(model)
    if source.suffix != ".gguf":
        raise BaseError(f"the llama.cpp rows need a base that comes as a GGUF file (a registry name or a .gguf "
                        f"file); {model} is a Hugging Face checkpoint directory")
    target = home() / "gguf" / f"{source.stem}-to-{fmt.upper()}.gguf"
    if target.is_file():
        return target
    lib = llama_cpp()
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, f"LLAMA_FTYPE_MOSTLY_{fmt.upper()}")
    params.allow_requantize = True
    params.nthread = threads
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".gguf.part")
    os.close(fd)
    try:
        if lib.llama_model_quantize(str(source).encode(), tmp.encode(), ctypes.byref(params)) != 0:
            raise BaseError(f"llama.cpp could not quantize {source} to {fmt}")
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


class LlamaCpp:
    """One llama.cpp model: greedy decoding from token ids, and the log-probability of each token of a text.

    Args:
        path: the GGUF file.
        threads: CPU threads for decoding and prompt processing (0: llama.cpp's choice).
        n_ctx: the context length it allocates.
        scores: keep every position's logits (for ``logprobs``); decoding needs only the last.
    """

    def __init__(self, path: str | Path, threads: int = 0, n_ctx: int = 4096, scores: bool = False) -> None:
        lib = llama_cpp()
        self.path = Path(path)
        kw = {"n_threads": threads, "n_threads_batch": threads} if threads else {}
        self.llm = lib.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, logits_all=scores, verbose=False,
                             **kw)

    def close(self) -> None:
        """Free llama.cpp's model and context now (rather than at interpreter exit, where freeing fails)."""
        self.llm.close()

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, ids: list[int], max_new_tokens: int, eos_ids: Iterable[int]) -> list[int]:
        """Greedy new token ids after ``ids`` (the prompt processed afresh every call), an EOS token included."""
        eos, out = set(eos_ids), []
        self.llm.reset()
        for tok in self.llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(tok))
            if tok in eos or len(out) >= max_new_tokens:
                break
        return out

    def logprobs(self, ids: list[int]) -> list[float]:
        """log p(ids[i] | ids[:i]) for i = 1 .. len(ids) - 1, in one pass (the model made with ``scores``)."""
        import numpy as np

        self.llm.reset()
        self.llm.eval(ids)
        logits = np.asarray(self.llm.scores[: len(ids) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logz = np.log(np.exp(logits).sum(axis=1))
        return (logits[np.arange(len(ids) - 1), ids[1:]] - logz).tolist()
