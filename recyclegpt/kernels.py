"""This project's compiled kernels for quantized decoding (``csrc/``): build, load, attach, call.

* ``csrc/qmm.h``: products of float32 rows with int4 / int8 weights (``quant.QuantLinear``'s layout), the rows
  rounded to int8 in blocks of 32 and multiplied as integers (AVX-512 VNNI, AVX2 or plain C++, picked at run time
  by what the CPU has), each weight block loaded once for all rows of a call. PyTorch's own int4 kernel is bound
  by arithmetic on these CPUs (a 3072 x 576 product: 54 us on 2 threads against 27 us to stream its bytes).
* ``csrc/quant_block.cpp``: a whole transformer block (``quant_block``) or all layers of a stack (``quant_stack``)
  as one call: those products, and plain loops for norms, rotation, cache writes, attention and SwiGLU. Eager, the
  same block is some 60 tensor operations of a few microseconds each, half of an int4 SmolLM2 step. Attention
  runs one query at a time over the keys it may see, so every new token of a call gets what a one-token call would
  give it, bit for bit (what keeps verified decoding exact on a quantized model).

The sources are compiled once per machine with the system's C++ compiler (``g++``, or ``$CXX``) for the CPU it
runs on, against the installed torch, and cached under ``~/.cache/recyclegpt/kernels`` (``$RECYCLEGPT_HOME/kernels``)
by a key of the sources, the flags, torch's version and the CPU's features; loading the cached library takes
milliseconds. Where it cannot be built (no compiler), quantized layers use PyTorch's int8 / int4 kernels and the
eager ``model.Block``: exact too, and slower (``recyclegpt info`` says which path runs).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from recyclegpt.hardware import cpu_info

SOURCE = Path(__file__).with_name("csrc") / "quant_block.cpp"
# -fopenmp: at::parallel_for is OpenMP inlined into the library (without it, it runs on one thread); the libgomp.so.1
# it needs is the one torch has already loaded
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-w")
HEADERS = (SOURCE.with_name("qmm.h"),)


class KernelError(RuntimeError):
    """The compiled block could not be built or loaded (the message says why)."""


def cache_dir() -> Path:
    """Where built kernels are kept: ``kernels/`` beside the converted bases (``bases.registry.home``)."""
    from recyclegpt.bases.registry import home

    return home() / "kernels"


def _library() -> Path:
    """The built library for these sources, flags, torch and this CPU (it may not exist yet)."""
    return cache_dir() / f"quant_block-{_key()}.so"


def _key() -> str:
    """What a built library depends on: the source, torch, the compiler's target (this CPU's features)."""
    cpu = cpu_info()
    h = hashlib.sha256(b"".join(f.read_bytes() for f in (SOURCE, *HEADERS)))
    h.update(f"{' '.join(FLAGS)} {torch.__version__} {cpu.model} {cpu.family} {' '.join(cpu.features)}".encode())
    return h.hexdigest()[:16]


def build(quiet: bool = False) -> Path:
    """Compile ``quant_block.cpp`` for this CPU (once; later calls return the cached library).

    Args:
        quiet: say nothing while compiling (about 15 s on 2 cores).

    Raises:
        KernelError: no C++ compiler, or the compiler failed (its output is in the message).
    """
    from torch.utils.cpp_extension import include_paths, library_paths

    target = _library()
    if target.is_file():
        return target
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise KernelError("no C++ compiler found (install g++, or set $CXX) to build the quantized decode block")
    target.parent.mkdir(parents=True, exist_ok=True)
    libs = library_paths()
    cmd = [cxx, *FLAGS, f"-I{SOURCE.parent}",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           *[f"-I{p}" for p in include_paths()], str(SOURCE),
           *[f"-L{p}" for p in libs], *[f"-Wl,-rpath,{p}" for p in libs], "-lc10", "-ltorch_cpu"]
    if not quiet:
        print("building the quantized kernels for this CPU (once, about 15 s)...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        done = subprocess.run([*cmd, "-o", str(out)], capture_output=True, text=True)
        if done.returncode != 0:
            raise KernelError(f"building {SOURCE.name} failed ({cxx}):\n{done.stderr[-2000:]}")
        os.replace(out, target)  # atomic: a reader sees no library or a whole one
    return target


@functools.cache
def load() -> str | None:
    """Build if needed and load the compiled block into this process, once; returns None when it is ready, else
    why it is not (the model then decodes through the eager blocks)."""
    try:
        torch.ops.load_library(str(build()))
    except (KernelError, OSError, RuntimeError) as exc:
        return str(exc)
    return None


ISAS = ("plain C++", "AVX2", "AVX-512 VNNI")  # csrc/qmm.h's paths, by torch.ops.recyclegpt.best_isa()


def describe(build_now: bool = False) -> str:
    """The products and blocks quantized models get on this machine, in words (``recyclegpt info``, result files).

    Args:
        build_now: build the kernels if they are not built yet (else say so without building).
    """
    if not build_now and not _library().is_file():
        return "this project's compiled kernels, not built yet (built once, on the first --quant run)"
    why = load()
    if why is not None:
        return f"PyTorch's int8 / int4 CPU kernels (bfloat16 activations), eager blocks ({why.splitlines()[0]})"
    return (f"this project's compiled kernels ({ISAS[torch.ops.recyclegpt.best_isa()]}): activations rounded to int8 "
            "in blocks of 32, integer products over tiles of 16 outputs, one call per forward with a cache "
            "(csrc/qmm.h, csrc/quant_block.cpp)")


def block_args(block, isa: int = -1) -> tuple[list[torch.Tensor], list[int], float] | None:
    """The weights, integer settings and epsilon ``quant_block`` reads for a ``model.Block`` whose four products
    are int8 / int4 layers in this library's layout (q/k/v and gate/up fused), or None when it does not fit (then
    it runs eagerly); ``isa`` as ``attach`` takes it."""
    attn, mlp = block.self_attn, block.mlp
    layers = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    if not all(getattr(lay, "compiled", False) for lay in layers):  # quant.QuantLinear in the kernels' layout
        return None
    if any(lay.codes.shape[0] != lay.out_features for lay in layers):  # outputs padded to a tile: eager slices them
        return None
    if any(lay.bias is not None for lay in layers[1:]) or attn.head_dim % 2:
        return None
    norms = (block.input_layernorm, block.post_attention_layernorm)
    if any(n.weight.dtype != torch.float32 for n in norms) or norms[0].eps != norms[1].eps:
        return None
    weights = [norms[0].weight.detach(), norms[1].weight.detach()]
    for lay in layers:
        weights += [lay.codes, lay.scale]
    bias = attn.qkv_proj.bias
    weights.append(torch.empty(0) if bias is None else bias.detach().float())
    ints = [attn.n_heads, attn.n_kv_heads, attn.head_dim, *(lay.bits for lay in layers), isa]
    return weights, ints, float(norms[0].eps)


def attach(stack, isa: int = -1) -> str | None:
    """Have every block of a quantized ``model.Stack`` run through the compiled kernel in calls with a cache;
    returns None when they do, else why not (they stay eager, attending row by row through ``cache.RowViews``).

    Args:
        isa: the kernels' instruction set, an index of ``ISAS`` the CPU has, or -1 for this CPU's fastest (tests
            run the others).
    """
    why = load()
    if why is not None:
        return why
    args = [block_args(b, isa) for b in stack.layers]
    if any(a is None for a in args):
        return ("a block's products are not all int8 / int4 in this library's layout with q/k/v and gate/up fused, "
                "or its norms are not float32")
    for block, a in zip(stack.layers, args, strict=True):
        block.fused = functools.partial(run_block, a)
    weights = [t for a in args for t in a[0]]  # every unique block's, in order
    stack.fused = functools.partial(run_stack, (weights, args[0][1], args[0][2]))
    stack.row_invariant = False  # the kernel attends row by row itself: masks stay dense
    return None


def run_block(args, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, parts) -> torch.Tensor:
    """One block over x (B, T, d) with the compiled kernel: ``args`` from ``block_args``; ``parts`` as
    ``model.Block.forward`` takes them (dense masks, never ``RowViews``)."""
    weights, ints, eps = args
    caches, rows, masks, prefixes = [], [], [], []
    T = x.shape[1]
    for p in parts:
        caches += [cache.k[p.layer], cache.v[p.layer]]
        r0, r1, _ = p.rows.indices(T) if len(parts) > 1 else (0, T, 1)  # one part: all rows (as ``model._attend``)
        rows += [r0, r1]
        masks.append(p.mask)
        prefixes += [None, None] if p.prefix is None else list(p.prefix)
    return torch.ops.recyclegpt.quant_block(x.contiguous(), cos.contiguous(), sin.contiguous(), weights, ints, eps,
                                           caches, cache.length, rows, masks, prefixes)


def run_stack(args, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, mask: torch.Tensor | None,
              first: int, last: int) -> torch.Tensor:
    """Logical layers ``first`` .. ``last`` - 1 of a stack over x (B, T, d) with the compiled kernel, one call: a plain
    decode call (every row at the cache's next slots, ``mask`` dense or None for causal). ``args`` from ``attach``."""
    weights, ints, eps = args
    return torch.ops.recyclegpt.quant_stack(x.contiguous(), cos.contiguous(), sin.contiguous(), weights, ints, eps,
                                            cache.k, cache.v, cache.length, mask, first, last)


__all__ = ["KernelError", "attach", "block_args", "build", "cache_dir", "describe", "load", "run_block", "run_stack"]
