"""Weight-only int8 / int4 layers: kernel against a float reference, batch invariance, in-place replacement."""

import copy

import pytest
import torch
from torch import nn

from recyclegpt import kernels, quant
from recyclegpt.bases.tokenizer import ByteTokenizer
from recyclegpt.config import PRESETS
from recyclegpt.generate import Engine
from recyclegpt.model import prepack_linears
from recyclegpt.quant import (
    Int4Linear,
    Int8Linear,
    QuantLinear,
    dequantize_int4,
    quantize_int4,
    quantize_int8,
    quantize_linears,
)
from recyclegpt.recycle import RecycleGPT

# (mode, int4 group size); SmolLM2's K = 576 takes int4 groups of 32 or 64 only
KINDS = [("int8", None), ("int4", 32), ("int4", 64)]
SHAPES = [(192, 576), (64, 1536), (48, 64)]  # (N, K): k/v, down (fewer rows), tiny


def _layer(w: torch.Tensor, mode: str, group: int | None, compiled: bool | None = None) -> QuantLinear:
    return Int8Linear(w, compiled=compiled) if mode == "int8" else Int4Linear(w, group_size=group, compiled=compiled)


def _int8_rows(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) as the compiled product rounds it: int8 in blocks of 32 inputs, scale max |x| / 127 (csrc/qmm.h)."""
    M, K = x.shape
    kp = -(-K // 32) * 32
    b = torch.nn.functional.pad(x, (0, kp - K)).view(M, kp // 32, 32)
    amax = b.abs().amax(-1, keepdim=True)
    q = torch.round(b * torch.where(amax > 0, 127 / amax, torch.zeros_like(amax)))
    return (q * (amax / 127)).view(M, kp)[:, :K]


# The compiled product when it builds here (``kernels``), and PyTorch's kernels: both paths of every quantized layer.
PATHS = [pytest.param(False, id="torch"),
         pytest.param(True, id="compiled", marks=pytest.mark.skipif(
             kernels.load() is not None, reason=f"the compiled product did not build: {kernels.load()}"))]


def _dequantized(w: torch.Tensor, mode: str, group: int | None, compiled: bool = False) -> torch.Tensor:
    """The weights a layer multiplies by: int8 with a scale per row (PyTorch's kernel) or per block of 32 (ours)."""
    if mode == "int8" and compiled:
        kp = -(-w.shape[1] // 32) * 32
        codes, scales = quantize_int8(torch.nn.functional.pad(w, (0, kp - w.shape[1])), 32)
        return (codes.float() * scales.float().repeat_interleave(32, 1))[:, : w.shape[1]]
    if mode == "int8":
        codes, scales = quantize_int8(w)
        return codes.float() * scales.float()[:, None]
    return dequantize_int4(*quantize_int4(w, group))


def _fits(shape, mode, group) -> bool:
    N, K = shape
    return mode == "int8" or (K % group == 0 and N % 16 == 0)


def test_int8_codes_and_scales():
    w = torch.randn(10, 32)
    w[3] = 0
    codes, scales = quantize_int8(w)
    assert codes.dtype == torch.int8 and scales.dtype == torch.bfloat16 and scales.shape == (10,)
    peak = codes.int().abs().amax(1)  # 127, or 126 / 128 where the scale's bfloat16 rounding moved it
    assert peak[3] == 0 and all(126 <= int(p) <= 128 for i, p in enumerate(peak) if i != 3)
    deq = codes.float() * scales.float()[:, None]
    # nearest point of the grid: at most half a step away (bfloat16 scale rounding can clip the extreme by < 1%)
    assert ((deq - w).abs() <= scales.float()[:, None] * 0.51 + w.abs() * 2**-8).all()
    assert torch.equal(deq[3], torch.zeros(32))
    codes, scales = quantize_int8(w.repeat(1, 4), 32)  # a scale per block of 32: each block is one row above
    assert scales.shape == (10, 4) and torch.equal(codes, codes[:, :32].repeat(1, 4))


def test_int4_codes_layout_and_grid():
    w = torch.randn(16, 128)
    w[0, :32] = 0.5  # a constant group
    codes, scale, zero = quantize_int4(w, 32)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert scale.shape == zero.shape == (16, 4) and scale.dtype == zero.dtype == torch.bfloat16
    deq = dequantize_int4(codes, scale, zero)
    step = scale.float().repeat_interleave(32, dim=1)  # (N, K)
    assert ((deq - w).abs() <= step * 0.51 + w.abs() * 2**-7).all()
    assert torch.equal(deq[0, :32], torch.full((32,), 0.5))


@pytest.mark.parametrize("compiled", PATHS)
@pytest.mark.parametrize("mode,group", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_equals_dequantized_product(shape, mode, group, compiled):
    """Tight. PyTorch's kernels: x rounded to bfloat16 @ the dequantized weights, then rounded to bfloat16: within
    half a bfloat16 step (2^-8 relative) plus float32 accumulation error. The compiled product: x rounded to int8 in
    blocks of 32 @ the dequantized weights, within float32 accumulation error (integer sums are exact)."""
    if not _fits(shape, mode, group):
        pytest.skip("shape not taken by this kernel")
    N, K = shape
    w, x = torch.randn(N, K) * 0.05, torch.randn(8, K)
    layer = _layer(w, mode, group, compiled)
    assert layer.compiled == compiled
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (8, N)
    deq = _dequantized(w, mode, group, compiled).double()
    if compiled:
        xq = _int8_rows(x).double()
        assert ((y.double() - xq @ deq.T).abs() <= (xq.abs() @ deq.abs().T) * 2**-19).all()
        return
    ref = x.bfloat16().double() @ deq.T
    accumulation = (x.bfloat16().double().abs() @ deq.abs().T) * K * 2**-24
    assert ((y.double() - ref).abs() <= ref.abs() * 2**-8 + accumulation).all()


@pytest.mark.parametrize("mode,group", KINDS)
def test_every_instruction_set_computes_the_same_product(mode, group):
    """The compiled product's AVX-512 VNNI, AVX2 and plain C++ paths (each CPU gets the widest it has) take the same
    steps (exact integer block sums, then the same float roundings in block order): the same bits, for 1 to 19 rows
    (the kernels take up to 8 at a time) and a K that is not a multiple of the block; this CPU's own path is the one
    layers call."""
    if kernels.load() is not None:
        pytest.skip(f"the compiled product did not build: {kernels.load()}")
    best = torch.ops.recyclegpt.best_isa()
    for N, K in [(3072, 576)] + ([(48, 80)] if mode == "int8" else []):
        layer = _layer(torch.randn(N, K) * 0.02, mode, group, compiled=True)
        for M in (1, 5, 19):
            x = torch.randn(M, K)
            got = {isa: torch.ops.recyclegpt.qmm(x, layer.codes, layer.scale, layer.bits, isa)
                   for isa in range(best + 1)}
            assert torch.equal(got[best], layer(x))
            for y in got.values():
                assert torch.equal(y, got[0]), (N, K, M)


def test_outputs_that_do_not_fill_a_tile_are_padded_and_cut():
    """The kernels take outputs 16 at a time: an int8 layer with N = 40 pads its weights to 48 rows of zeros and
    returns its 40 outputs, as close to the float product as any int8 layer."""
    if kernels.load() is not None:
        pytest.skip(f"the compiled product did not build: {kernels.load()}")
    w, x = torch.randn(40, 80) * 0.02, torch.randn(3, 80)
    layer = Int8Linear(w, compiled=True)
    assert layer.codes.shape == (48, 96) and layer(x).shape == (3, 40)
    assert relative_error(layer(x), x.double() @ w.double().T) < LOOSE[("int8", None)]


# Relative (Frobenius) error against the float32 product, Gaussian weights: int8 measures ~0.8% (bfloat16
# activations ~0.3%, output rounding ~0.1%, weights ~0.6%); int4 min-max groups ~8% (g32) and ~9% (g64).
LOOSE = {("int8", None): 0.015, ("int4", 32): 0.10, ("int4", 64): 0.12}


@pytest.mark.parametrize("compiled", PATHS)
@pytest.mark.parametrize("mode,group", KINDS)
def test_close_to_float32_product(mode, group, compiled):
    w, x = torch.randn(1536, 576) * 0.02, torch.randn(16, 576)
    err = relative_error(_layer(w, mode, group, compiled)(x), x.double() @ w.double().T)
    assert err < LOOSE[(mode, group)]


@pytest.mark.parametrize("compiled", PATHS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode,group", KINDS)
def test_a_row_does_not_depend_on_the_rows_beside_it(mode, group, threads, compiled):
    """What verified decoding needs: scoring k tokens in one call gives each what a one-token call gives,
    bit for bit, for 1..8 rows, 2-D and 3-D inputs, at 1 and 2 threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for N, K in [(192, 576), (576, 1536), (2048, 576)]:
            layer = _layer(torch.randn(N, K) * 0.02, mode, group, compiled)
            x = torch.randn(8, K)
            single = torch.cat([layer(x[i : i + 1]) for i in range(8)])  # (8, N)
            for m in range(1, 9):
                assert torch.equal(layer(x[:m]), single[:m]), f"{m} rows"
                assert torch.equal(layer(x[m - 1 :]), single[m - 1 :]), f"rows {m - 1}.."
            for B, T in [(1, 2), (1, 5), (2, 3), (2, 4), (4, 2)]:
                x3 = torch.randn(B, T, K)
                y3 = layer(x3)  # (B, T, N)
                assert y3.shape == (B, T, N)
                for b in range(B):
                    for t in range(T):
                        assert torch.equal(y3[b, t], layer(x3[b : b + 1, t : t + 1])[0, 0]), (B, T, b, t)
    finally:
        torch.set_num_threads(before)


def test_bias_and_input_dtype_are_kept():
    lin = nn.Linear(64, 32, bias=True)
    for layer in (Int8Linear(lin.weight, lin.bias), Int4Linear(lin.weight, lin.bias, group_size=32)):
        x = torch.randn(3, 64)
        want = lin(x).detach()
        got = layer(x)
        assert got.dtype == torch.float32 and relative_error(got, want) < 0.1
        assert layer(x.bfloat16()).dtype == torch.bfloat16


def _tiny() -> RecycleGPT:
    torch.manual_seed(0)
    preset = PRESETS["tiny"]
    model = RecycleGPT.from_config(preset.model, preset.recycle).eval()
    with torch.no_grad():
        model.backbone.embed_tokens.weight.mul_(20)  # peaked logits: no greedy near-ties
    return model


@pytest.mark.parametrize("mode,group", KINDS)
def test_quantize_linears_replaces_every_linear_and_keeps_the_embedding(mode, group):
    model = _tiny()
    reference = copy.deepcopy(model.backbone)
    backbone = model.backbone
    emb = backbone.embed_tokens.weight.detach().clone()
    assert backbone.lm_head.weight is backbone.embed_tokens.weight  # tied
    # 2 blocks x 7 matrices + the head; the module's fuse + 1 block x 7
    assert quantize_linears(backbone, mode, group or 32) == 15
    assert quantize_linears(model.module, mode, group or 32) == 8
    assert not any(isinstance(m, nn.Linear) for m in backbone.modules())
    assert isinstance(backbone.lm_head, QuantLinear) and backbone.head_weight() is backbone.embed_tokens.weight
    assert torch.equal(backbone.embed_tokens.weight, emb)
    tokens = torch.randint(0, 256, (2, 12))
    with torch.inference_mode():
        assert torch.equal(backbone.embed(tokens), reference.embed(tokens))
        (got, h_got), (want, h_want) = backbone(tokens), reference(tokens)
    assert got.dtype == h_got.dtype == torch.float32
    assert relative_error(h_got, h_want) < LOOSE[(mode, group)] and relative_error(got, want) < LOOSE[(mode, group)]


@pytest.mark.parametrize("mode,group", KINDS)
def test_verified_equals_standard_on_a_quantized_model(mode, group):
    model = _tiny()
    quantize_linears(model.backbone, mode, group or 32)
    quantize_linears(model.module, mode, group or 32)
    engine = Engine(model.backbone, ByteTokenizer(), model.module)
    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        p = torch.randint(1, 256, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist()
        std = engine.generate([p], "standard", max_new_tokens=16)[0].token_ids
        assert engine.generate([p], "verified", max_new_tokens=16, draft_len=3)[0].token_ids == std
        assert engine.generate([p], "verified", max_new_tokens=16, draft_len=2, draft_width=3)[0].token_ids == std


class _Two(nn.Module):
    def __init__(self, k: int, n: int = 64) -> None:
        super().__init__()
        self.ok = nn.Linear(64, 64)
        self.odd = nn.Linear(k, n)


@pytest.mark.parametrize("model,mode,group,message", [
    (_Two(96), "int4", 64, "odd has K = 96 inputs, not a multiple of the int4 group size 64; "
                           "group sizes that divide it: [32]"),
    (_Two(40), "int4", 32, "odd has K = 40 inputs, not a multiple of the int4 group size 32; "
                           "group sizes that divide it: none"),
    (_Two(64, 40), "int4", 32, "odd has N = 40 outputs; the int4 kernel needs a multiple of 16"),
    (_Two(40), "int8", 32, "odd has K = 40 inputs; the int8 kernel needs a multiple of 16"),
    (_Two(64), "int4", 16, "int4 group size 16 is not accepted; the kernel takes (32, 64, 128, 256)"),
    (_Two(64), "int2", 32, "unknown quantization mode 'int2'; choose one of int8, int4"),
])
def test_shapes_a_kernel_cannot_take_are_refused_before_any_change(model, mode, group, message):
    with pytest.raises(ValueError) as err:
        quantize_linears(model, mode, group)
    assert message in str(err.value)
    assert isinstance(model.ok, nn.Linear) and isinstance(model.odd, nn.Linear)  # nothing half-done


def test_prepacked_or_quantized_layers_are_refused():
    model = _Two(64)
    prepack_linears(model)
    with pytest.raises(ValueError, match="ok is a prepacked float32 layer; quantize instead of prepacking"):
        quantize_linears(model, "int8")
    model = _Two(64)
    quantize_linears(model, "int8")
    with pytest.raises(ValueError, match=r"ok is already quantized \(int8\)"):
        quantize_linears(model, "int4")


def test_a_missing_kernel_is_named(monkeypatch):
    monkeypatch.setattr(quant, "_op", lambda name: None if name == "_weight_int4pack_mm_for_cpu" else object())
    assert quant.missing_ops("int4") == ["_weight_int4pack_mm_for_cpu"] and quant.missing_ops("int8") == []
    with pytest.raises(ValueError, match=r"int4 needs torch.ops.aten._weight_int4pack_mm_for_cpu, which torch"):
        quantize_linears(_Two(64), "int4")


def test_this_build_has_both_kernels():
    assert quant.missing_ops("int8") == [] and quant.missing_ops("int4") == []


def test_a_k_token_call_equals_k_one_token_calls_on_a_quantized_backbone():
    """Verified decoding is exact only if scoring k tokens in one call gives each what a one-token call gives.
    The quantized products hold that (above); one SDPA call over k queries does not: its float32 output
    differs in the last bits, which the bfloat16 rounding at the next product turns into flipped greedy tokens
    on SmolLM2. ``Stack.row_invariant`` (set for quantized backbones) attends query by query instead
    (``cache.RowViews``); without it this comparison fails. Compared before ``o_proj``."""
    backbone = _tiny().backbone
    quantize_linears(backbone, "int8")
    backbone.stack.row_invariant = True
    seen = []
    backbone.stack.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    tokens = torch.randint(0, 256, (1, 24))
    with torch.inference_mode():
        cache = backbone.new_cache(1, 32)
        backbone(tokens[:, :20], cache)
        seen.clear()
        for t in range(20, 24):
            backbone(tokens[:, t : t + 1], cache)
        singles = torch.cat(seen, dim=1)  # (1, 4, H * D)
        seen.clear()
        cache.rollback(20)
        backbone(tokens[:, 20:], cache)
    assert torch.equal(seen[0], singles)


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref|| / ||ref|| over all entries (Frobenius), in float64."""
    y, ref = y.detach().double(), ref.detach().double()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-300))


@pytest.mark.skipif(kernels.load() is not None, reason="the compiled product did not build")
def test_products_benchmark_times_both_paths(tmp_path):
    """benchmarks/products.py: every SmolLM2 shape, both weight widths, PyTorch's kernel and ours, one JSON."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "products.py"
    spec = importlib.util.spec_from_file_location("products", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "p.json"
    assert script.main(["--threads", "1", "--rows", "1", "3", "--repeats", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["products"]) == {f"{s} {m}" for s in script.SHAPES for m in ("int8", "int4")}
    for rows in result["products"].values():
        assert set(rows) == {"1", "3"} and all(t > 0 for r in rows.values() for t in r.values())
    assert result["cpu"]["cores"] >= 1 and result["threads"] == 1
