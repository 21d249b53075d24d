"""Weight-only int8 / int4 linear layers for CPU decoding.

Where this project's compiled kernels build (``kernels``, ``csrc/qmm.h``: the default), the layers keep their
weights in those kernels' layout and round their input rows to int8 in blocks of 32 (as llama.cpp does); the same
weights multiply in integers, each weight block read once for all rows of a call. Elsewhere they run through
PyTorch's own kernels, described here.

A float32 decode step of a small model mostly reads weights; storing them in 8 or 4 bits reads 4x or 8x
fewer bytes. Two kernels of PyTorch's CPU build do the product with bfloat16 activations (their
vectorised paths: AVX-512 and AVX2; float32 activations take a scalar path, several times slower):

* int8, one scale per output row (symmetric), K a multiple of 16 (other K read past the rows: a crash)::

      torch.ops.aten._weight_int8pack_mm(x: (M, K) bf16, w: (N, K) int8, scales: (N,) bf16) -> (M, N) bf16
      y[m, n] = sum_k x[m, k] * (w[n, k] * scales[n])

* int4, a scale and a zero per group of ``group_size`` inputs (asymmetric)::

      packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q: (N, K) int32 in [0, 15], 1)
                                                            -> (N, K / 2) uint8 (the CPU's own layout)
      torch.ops.aten._weight_int4pack_mm_for_cpu(x: (M, K) bf16, packed, group_size,
                                                 scale_zeros: (K / group_size, N, 2) bf16) -> (M, N) bf16
      y[m, n] = sum_k x[m, k] * ((q[n, k] - 8) * scale[g, n] + zero[g, n]),  g = k // group_size

  with N a multiple of 16 and group_size one of 32, 64, 128, 256 dividing K (SmolLM2's K = 576 takes
  32 or 64). The packed layout depends on the CPU kind the process runs on (64-column blocks on AVX-512,
  32 on AVX2): pack on the machine that multiplies, never ship packed bytes between CPU kinds.

Both kernels accumulate each output in float32, in the order of k, inside a tile of at most 4 rows, and
never split K or sum across threads; so a row's result does not depend on how many rows share the call
(``tests/test_quant.py`` checks it bit for bit): scoring several draft tokens in one call gives each the
logits a one-token call would, which is what keeps verified decoding exact on a quantized model. The
results are rounded to bfloat16 by the kernels, then returned as float32.

``quantize_linears`` replaces a model's ``nn.Linear`` layers in place, like ``model.prepack_linears``.
"""

from __future__ import annotations

import torch
from torch import nn

from recyclegpt.model import PackedLinear

MODES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)
_OPS = {
    "int8": ("_weight_int8pack_mm",),
    "int4": ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"),
}


def _op(name: str):
    """``torch.ops.aten.<name>``, or None when this torch build lacks it."""
    try:
        return getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):
        return None


def missing_ops(mode: str) -> list[str]:
    """The kernels ``mode`` needs that this torch build lacks (empty: the mode is available)."""
    return [name for name in _OPS[mode] if _op(name) is None]


class QuantLinear(nn.Module):
    """Common part of the weight-only quantized layers: float32 (or the input's dtype) at the boundary.

    Two product paths, fixed when the layer is made. Where this project's compiled kernels load
    (``kernels.load``: ``csrc/qmm.h``, built once per machine), ``compiled`` is True: the layer keeps ``codes`` and
    ``scale`` (int4: the scales, then the zeros) in that kernel's layout, and the input rows are rounded to int8 in
    blocks of 32 and multiplied as integers (as llama.cpp does), each weight block loaded once for all rows of a
    call. Otherwise
    PyTorch's kernels run, with bfloat16 inputs. Either way a row's result does not depend on the rows sharing the call.

    The original weight stays referenced as ``weight`` (a tied head is the embedding's matrix, and
    ``head_weight`` readers such as the module's draft rows keep working); the quantized copy is what
    the product reads. No gradient, no ``torch.compile``, no ``.to()`` after quantizing (it would cast
    the scales).
    """

    mode = ""
    bits = 0

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compiled: bool | None = None) -> None:
        super().__init__()
        from recyclegpt import kernels

        self.weight, self.bias = weight, bias
        self.out_features, self.in_features = weight.shape
        why = kernels.load()
        self.compiled = why is None if compiled is None else compiled
        if self.compiled and why is not None:
            raise ValueError(f"the compiled product is not available: {why}")

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.compiled:
            a = x.reshape(-1, self.in_features).float().contiguous()  # (M, K)
            y = torch.ops.recyclegpt.qmm(a, self.codes, self.scale, self.bits, -1)[:, : self.out_features]
            y = y.to(x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
            return y.view(*shape[:-1], self.out_features)
        a = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # (M, K)
        if a.data_ptr() % 64:  # the int8 kernel loads its input rows with aligned vector loads
            a = a.clone()
        y = self._product(a).to(x.dtype)  # (M, N)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


def quantize_int8(weight: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8, one scale per row (``group_size`` None: codes (N, K) int8, scales (N,) bfloat16, ``w ~ codes
    * scales[:, None]``) or per group of ``group_size`` inputs of a row (scales (N, K / g), as llama.cpp's Q8_0).

    The scale is the row's (group's) largest magnitude / 127, rounded to bfloat16 (what the kernels read) before
    the codes are rounded against it; an all-zero row (group) gets scale 1.
    """
    N, K = weight.shape
    g = K if group_size is None else group_size
    w = weight.detach().float().reshape(N, K // g, g)
    amax = w.abs().amax(dim=-1)  # (N, K / g)
    scales = torch.where(amax > 0, amax / 127, torch.ones_like(amax)).to(torch.bfloat16)
    codes = torch.round(w / scales.float()[..., None]).clamp_(-128, 127).to(torch.int8).reshape(N, K)
    return codes.contiguous(), (scales[:, 0] if group_size is None else scales).contiguous()


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max int4 per group of ``group_size`` inputs of a row.

    Returns (codes (N, K) uint8 in [0, 15], scale (N, K / g) bfloat16, zero (N, K / g) bfloat16) with
    ``w ~ (codes - 8) * scale + zero`` (``zero`` is the value of code 8). Scale and zero are rounded to
    bfloat16 first and the codes rounded against them, so each weight is the nearest point of its grid
    (within the group's range). These unpacked codes are portable; the kernel's packed layout is not.
    """
    N, K = weight.shape
    w = weight.detach().float().reshape(N, K // group_size, group_size)  # (N, G, g)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # (N, G)
    scale = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(lo)).to(torch.bfloat16)
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)
    codes = torch.round((w - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp_(0, 15)
    return codes.reshape(N, K).to(torch.uint8).contiguous(), scale, zero


def dequantize_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The (N, K) float32 weights of ``quantize_int4``'s output, exactly as the kernel forms them
    (``(q - 8) * scale`` is exact in float32, so one rounding, like the kernel's fused multiply-add)."""
    N, K = codes.shape
    G = scale.shape[1]
    q = codes.float().reshape(N, G, K // G)  # (N, G, g)
    return ((q - 8) * scale.float()[..., None] + zero.float()[..., None]).reshape(N, K)


def _padded(t: torch.Tensor, k: int, n: int | None = None) -> torch.Tensor:
    """t (N', K') with zero columns appended up to k (and zero rows up to n)."""
    return torch.nn.functional.pad(t, (0, k - t.shape[1], 0, 0 if n is None else n - t.shape[0])).contiguous()


def _kernel_shape(weight: torch.Tensor) -> tuple[int, int]:
    """(N, K) of ``weight`` as the compiled kernels store it: outputs up to a multiple of 16 (a tile), inputs up to
    a multiple of 32 (a block); the extra rows and columns are zero."""
    N, K = weight.shape
    return -(-N // 16) * 16, -(-K // 32) * 32


def _tiles(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, Kp) codes (int4: 0..15; int8: -128..127) in the compiled kernels' layout (csrc/qmm.h): per tile of 16
    outputs and block of 32 inputs, the 16 outputs' 4 codes of each group of 4 inputs side by side; int4 packs group
    g + 4 in the high nibbles of group g's bytes, int8 stores code + 128. Returns (N, Kp / 2 or Kp) uint8."""
    N, K = codes.shape
    c = codes.to(torch.int32) + (128 if bits == 8 else 0)
    c = c.view(N // 16, 16, K // 32, 8, 4).permute(0, 2, 3, 1, 4).reshape(N // 16, K // 32, 8, 64)  # (T, G, g, 64)
    if bits == 4:
        c = c[:, :, :4] | (c[:, :, 4:] << 4)
    return c.to(torch.uint8).reshape(N, -1).contiguous()


def _tiled_scales(*per_block: torch.Tensor) -> torch.Tensor:
    """(N, G) bfloat16 tensors (int4: scales, zeros; int8: scales) in the kernels' layout: per tile of 16 outputs and
    block, the 16 outputs' scales (then zeros). Returns (N, G times how many) bfloat16."""
    N, G = per_block[0].shape
    tiles = [v.view(N // 16, 16, G).transpose(1, 2) for v in per_block]  # (T, G, 16) each
    return torch.cat(tiles, -1).reshape(N, -1).contiguous()


class Int8Linear(QuantLinear):
    """int8 weights (``quantize_int8``): a bfloat16 scale per block of 32 inputs through the compiled kernels, one per
    output row through PyTorch's (its kernel takes no other)."""

    mode = "int8"
    bits = 8

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, compiled: bool | None = None) -> None:
        super().__init__(weight, bias, compiled)
        if self.compiled:  # qmm.h: int8 codes with a bfloat16 scale per block of 32 inputs, in tiles of 16 outputs
            n, kp = _kernel_shape(weight)
            codes, scales = quantize_int8(_padded(weight.detach().float(), kp, n), 32)
            self.register_buffer("codes", _tiles(codes, 8))
            self.register_buffer("scale", _tiled_scales(scales))
            return
        codes, scales = quantize_int8(weight)
        self.register_buffer("qweight", codes)  # (N, K) int8
        self.register_buffer("scales", scales)  # (N,) bf16

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)


class Int4Linear(QuantLinear):
    """int4 weights with a bfloat16 scale and zero per group of ``group_size`` inputs (``quantize_int4``),
    packed in this CPU's layout."""

    mode = "int4"
    bits = 4

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 32,
                 compiled: bool | None = None) -> None:
        super().__init__(weight, bias, compiled)
        self.group_size = group_size
        codes, scale, zero = quantize_int4(weight, group_size)
        if self.compiled:  # qmm.h: blocks of 32 (a group's scale and zero repeated), in tiles of 16 outputs
            n, kp = _kernel_shape(weight)
            per = group_size // 32
            self.register_buffer("codes", _tiles(_padded(codes, kp, n), 4))
            sc, zc = (_padded(v.repeat_interleave(per, 1), kp // 32, n) for v in (scale, zero))
            self.register_buffer("scale", _tiled_scales(sc, zc))
            return
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)  # (N, K/2) uint8
        scale_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # (G, N, 2) bf16
        self.register_buffer("packed", packed)
        self.register_buffer("scale_zeros", scale_zeros)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scale_zeros)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


def _refusal(name: str, layer: nn.Module, mode: str, group_size: int) -> str | None:
    """Why ``layer`` cannot be quantized in ``mode``, or None when it can."""
    if isinstance(layer, PackedLinear):
        return f"{name} is a prepacked float32 layer; quantize instead of prepacking (not both)"
    if isinstance(layer, QuantLinear):
        return f"{name} is already quantized ({layer.mode})"
    w = layer.weight
    if w.device.type != "cpu":
        return f"{name} is on {w.device}; weight-only quantization uses PyTorch's CPU kernels"
    if not w.dtype.is_floating_point:
        return f"{name} has {w.dtype} weights; a floating-point weight is needed"
    N, K = w.shape
    if mode == "int8" and K % 16:
        # The kernel reads 16 inputs at a time with aligned loads: any other K reads past the row (crashes).
        return f"{name} has K = {K} inputs; the int8 kernel needs a multiple of 16"
    if mode == "int4":
        if group_size not in INT4_GROUP_SIZES:
            return f"int4 group size {group_size} is not accepted; the kernel takes {INT4_GROUP_SIZES}"
        fits = [g for g in INT4_GROUP_SIZES if K % g == 0]
        if K % group_size:
            return (f"{name} has K = {K} inputs, not a multiple of the int4 group size {group_size}; "
                    f"group sizes that divide it: {fits or 'none'}")
        if N % 16:
            return f"{name} has N = {N} outputs; the int4 kernel needs a multiple of 16 (or use int8)"
    return None


def quantize_linears(model: nn.Module, mode: str, group_size: int = 32, head_mode: str | None = None) -> int:
    """Replace every ``nn.Linear`` of ``model`` by an ``Int8Linear`` / ``Int4Linear``, in place; returns how many.

    Every layer is checked before any is replaced: either all are quantized or the model is left as it was.
    A head tied to the embedding gets its own quantized copy; the embedding lookup is unchanged.

    Args:
        model: a backbone, module or any ``nn.Module`` on the CPU.
        mode: ``int8`` (per-row scales) or ``int4`` (per-group scales and zeros).
        group_size: inputs per int4 group (32, 64, 128 or 256, dividing every layer's K); ignored for int8.
        head_mode: the mode of a layer named ``lm_head`` (the output head), if not ``mode``: on SmolLM2 an
            int4 head costs most of int4's perplexity (+7.5 % on held-out text against +0.2 % with an int8
            head and int4 elsewhere), for 0.3 ms a step.

    Raises:
        ValueError: an unknown mode, a kernel this torch build lacks, or a layer the kernel cannot take
            (named, with what is accepted).
    """
    for m in {mode, head_mode or mode}:
        if m not in MODES:
            raise ValueError(f"unknown quantization mode {m!r}; choose one of {', '.join(MODES)}")
        missing = missing_ops(m)
        if missing:
            raise ValueError(f"{m} needs torch.ops.aten.{', '.join(missing)}, which torch {torch.__version__} "
                             "lacks; use a build that has it (PyTorch >= 2.6 on CPU) or another mode")
    targets = []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            if isinstance(child, (nn.Linear, PackedLinear, QuantLinear)):
                full = f"{parent_name}.{name}" if parent_name else name
                this = (head_mode or mode) if name == "lm_head" else mode
                why = _refusal(full, child, this, group_size)
                if why is not None:
                    raise ValueError(f"cannot quantize to {this}: {why}")
                targets.append((parent, name, child, this))
    for parent, name, child, this in targets:
        new = Int8Linear(child.weight, child.bias) if this == "int8" else Int4Linear(
            child.weight, child.bias, group_size)
        setattr(parent, name, new)
    return len(targets)


__all__ = [
    "INT4_GROUP_SIZES", "MODES", "Int4Linear", "Int8Linear", "QuantLinear", "dequantize_int4", "missing_ops",
    "quantize_int4", "quantize_int8", "quantize_linears",
]
