"""The compiled decode block of quantized models (``csrc/quant_block.cpp``): build, load, attach, call.

A weight-only quantized SmolLM2 step read its weights near the memory limit, yet half of it was eager
overhead: some 60 small tensor operations per block, each a few microseconds of dispatch. ``quant_block``
runs a whole block in one call: PyTorch's int8 / int4 kernels for the products, plain loops for the rest.
It attends one query at a time over the keys that query may see, so every new token of a call gets what a
one-token call would give it, bit for bit (what keeps verified decoding exact on a quantized model).

The source is compiled once per machine with the system's C++ compiler (``g++``, or ``$CXX``) for the CPU it
runs on, against the installed torch, and cached under ``~/.cache/recyclegpt/kernels`` (``$RECYCLEGPT_HOME/kernels``)
by a key of the source, torch's version and the CPU's features; loading the cached library takes milliseconds.
Where it cannot be built (no compiler), quantized models decode through the eager ``model.Block`` instead,
which is exact too and slower (``recyclegpt info`` says which path runs).
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


class KernelError(RuntimeError):
    """The compiled block could not be built or loaded (the message says why)."""


def cache_dir() -> Path:
    """Where built kernels are kept: ``kernels/`` beside the converted bases (``bases.registry.home``)."""
    from recyclegpt.bases.registry import home

    return home() / "kernels"


def _key() -> str:
    """What a built library depends on: the source, torch, the compiler's target (this CPU's features)."""
    cpu = cpu_info()
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(f"{torch.__version__} {cpu.model} {cpu.family} {' '.join(cpu.features)}".encode())
    return h.hexdigest()[:16]


def build(quiet: bool = False) -> Path:
    """Compile ``quant_block.cpp`` for this CPU (once; later calls return the cached library).

    Args:
        quiet: say nothing while compiling (it takes about a minute on 2 cores).

    Raises:
        KernelError: no C++ compiler, or the compiler failed (its output is in the message).
    """
    from torch.utils.cpp_extension import include_paths, library_paths

    target = cache_dir() / f"quant_block-{_key()}.so"
    if target.is_file():
        return target
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise KernelError("no C++ compiler found (install g++, or set $CXX) to build the quantized decode block")
    target.parent.mkdir(parents=True, exist_ok=True)
    libs = library_paths()
    cmd = [cxx, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           *[f"-I{p}" for p in include_paths()], str(SOURCE),
           *[f"-L{p}" for p in libs], *[f"-Wl,-rpath,{p}" for p in libs], "-lc10", "-ltorch_cpu"]
    if not quiet:
        print("building the quantized decode block for this CPU (once, about a minute)...", file=sys.stderr)
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


def describe(build_now: bool = False) -> str:
    """The decode block quantized models get on this machine, in words (``recyclegpt info``, result files).

    Args:
        build_now: build it if it is not built yet (else say so without building).
    """
    if not build_now and not (cache_dir() / f"quant_block-{_key()}.so").is_file():
        return "compiled decode block: not built yet (built once, on the first --quant run)"
    why = load()
    return "compiled decode block (csrc/quant_block.cpp)" if why is None else f"eager blocks ({why.splitlines()[0]})"


def block_args(block) -> tuple[list[torch.Tensor], list[int], float] | None:
    """The weights, integer settings and epsilon ``quant_block`` reads for a ``model.Block`` whose four products
    are int8 / int4 layers (q/k/v and gate/up fused), or None when it does not fit (then it runs eagerly)."""
    from recyclegpt.quant import Int4Linear, Int8Linear

    attn, mlp = block.self_attn, block.mlp
    layers = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    if not all(isinstance(lay, (Int8Linear, Int4Linear)) for lay in layers):
        return None
    if any(lay.bias is not None for lay in layers[1:]) or attn.head_dim % 2:
        return None
    norms = (block.input_layernorm, block.post_attention_layernorm)
    if any(n.weight.dtype != torch.float32 for n in norms) or norms[0].eps != norms[1].eps:
        return None
    weights = [norms[0].weight.detach(), norms[1].weight.detach()]
    modes = []
    for lay in layers:
        if isinstance(lay, Int8Linear):
            weights += [lay.qweight, lay.scales]
            modes.append(0)
        else:
            weights += [lay.packed, lay.scale_zeros]
            modes.append(lay.group_size)
    bias = attn.qkv_proj.bias
    weights.append(torch.empty(0) if bias is None else bias.detach().float())
    return weights, [attn.n_heads, attn.n_kv_heads, attn.head_dim, *modes], float(norms[0].eps)


def attach(stack) -> str | None:
    """Have every block of a quantized ``model.Stack`` run through the compiled kernel when it decodes with a cache;
    returns None when they do, else why not (they stay eager, attending row by row through ``cache.RowViews``)."""
    why = load()
    if why is not None:
        return why
    args = [block_args(b) for b in stack.layers]
    if any(a is None for a in args):
        return "a block's products are not all int8 / int4 with q/k/v and gate/up fused, or its norms are not float32"
    for block, a in zip(stack.layers, args, strict=True):
        block.fused = functools.partial(run_block, a)
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


__all__ = ["KernelError", "attach", "block_args", "build", "cache_dir", "describe", "load", "run_block"]
