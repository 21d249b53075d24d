"""The compiled decode block of quantized models: built here with the system's compiler, then checked against the
eager block (close), against one-token calls (bit for bit) and inside every exact strategy (equal to standard)."""

import copy

import pytest
import torch

from recyclegpt import kernels
from recyclegpt.bases.tokenizer import ByteTokenizer
from recyclegpt.cache import Tree
from recyclegpt.generate import Engine
from recyclegpt.model import fuse_projections
from recyclegpt.quant import quantize_linears
from recyclegpt.strategies import make_strategy

pytestmark = pytest.mark.skipif(kernels.load() is not None, reason=f"the decode block did not build: {kernels.load()}")


def _quantized(model, mode: str, fused: bool = True, isa: int = -1):
    """A decoding copy of ``model``'s backbone as ``bases._ready`` makes it: fused products, quantized (head int8),
    attending row by row, through the compiled block if ``fused`` (its ``isa`` path: -1 this CPU's best)."""
    backbone = copy.deepcopy(model.backbone)
    with torch.no_grad():
        backbone.embed_tokens.weight.mul_(20)  # peaked logits: no greedy near-ties
    fuse_projections(backbone)
    quantize_linears(backbone, mode, 32, head_mode="int8")
    backbone.stack.row_invariant = True
    if fused:
        assert kernels.attach(backbone.stack, isa) is None
        assert all(b.fused is not None for b in backbone.stack.layers) and not backbone.stack.row_invariant
    return backbone


def _decode(backbone, prompt: torch.Tensor, new: torch.Tensor, tree: Tree | None = None) -> torch.Tensor:
    with torch.inference_mode():
        cache = backbone.new_cache(prompt.shape[0], 64)
        backbone(prompt, cache)
        return backbone(new, cache, tree=tree)[0]


@pytest.mark.parametrize("isa", [-1, 0], ids=["best", "plain"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_the_compiled_block_computes_what_the_eager_block_does(tiny, shared_tiny, mode, isa):
    """Same weights, same product kernels: the logits of decode calls (one token, a chain of three, a tree) agree
    with the eager blocks' up to the rounding of norms, rotation and attention (relative error below 1 %), through
    this CPU's vectorised loops and through the plain C++ ones."""
    g = torch.Generator().manual_seed(1)
    for model in (tiny, shared_tiny):
        fused, eager = _quantized(model, mode, isa=isa), _quantized(model, mode, fused=False)
        prompt = torch.randint(0, 256, (2, 11), generator=g)
        tree = Tree.from_parents([-1, 0, 0, 1])
        for new, t in ((prompt[:, :1], None), (prompt[:, :3], None), (prompt[:, :4], tree)):
            got, want = _decode(fused, prompt, new, t), _decode(eager, prompt, new, t)
            assert torch.isfinite(got).all()
            assert float((got - want).norm() / want.norm()) < 1e-2


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_call_over_several_tokens_gives_each_what_a_one_token_call_does(tiny, mode):
    """What keeps verified decoding exact: the logits of a chain of four tokens and of a tree's branches, scored in
    one call, equal bit for bit those of one-token calls at the same slots."""
    backbone = _quantized(tiny, mode)
    prompt, new = torch.randint(0, 256, (1, 20)), torch.randint(0, 256, (1, 4))
    with torch.inference_mode():
        cache = backbone.new_cache(1, 64)
        backbone(prompt, cache)
        singles = []
        for t in range(4):
            singles.append(backbone(new[:, t : t + 1], cache)[0])
        singles = torch.cat(singles, 1)  # (1, 4, V)
        cache.rollback(20)
        assert torch.equal(backbone(new, cache)[0], singles)
        # a tree: slot 1 and 2 both follow slot 0; slot 3 follows slot 2. Branch 0-2-3 is the chain new[0], new[2],
        # new[3], which one-token calls score as such
        cache.rollback(20)
        tree_logits = backbone(new, cache, tree=Tree.from_parents([-1, 0, 0, 2]))[0]
        cache.rollback(20)
        chain = [backbone(new[:, t : t + 1], cache)[0] for t in (0, 2, 3)]
    assert torch.equal(tree_logits[:, [0, 2, 3]], torch.cat(chain, 1))


@pytest.mark.parametrize("isa", [-1, 0], ids=["best", "plain"])
def test_the_compiled_block_keeps_float16_caches_and_takes_float32_ones(tiny, isa):
    """Compiled stacks make float16 caches (``Stack.new_cache``); a float32 cache (one made before ``attach``) goes
    through the same kernel: logits within float16's rounding of the keys and values (relative error below 1 %),
    through the vectorised and the plain loops."""
    backbone = _quantized(tiny, "int8", isa=isa)
    prompt, new = torch.randint(0, 256, (2, 11)), torch.randint(0, 256, (2, 3))
    with torch.inference_mode():
        half = backbone.new_cache(2, 64)
        assert half.k[0].dtype == torch.float16
        backbone(prompt, half)
        want = backbone(new, half)[0]
        backbone.stack.fused, fused = None, backbone.stack.fused
        full = backbone.new_cache(2, 64)  # float32: as the stack's parameters
        backbone.stack.fused = fused
        assert full.k[0].dtype == torch.float32
        backbone(prompt, full)
        got = backbone(new, full)[0]
    assert float((got - want).norm() / want.norm()) < 1e-2 and not torch.equal(got, want)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_exact_strategies_equal_standard_through_the_compiled_block(tiny, shared_tiny, mode):
    """verified (chains and trees, alone and batched with left padding) and speed (the pipelined call's two parts,
    the stashed keys written ahead of the candidates) give standard decoding's greedy tokens."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 256, (3 + i % 7,), generator=g).tolist() for i in range(12)]
    for model in (tiny, shared_tiny):
        backbone = _quantized(model, mode)
        module = copy.deepcopy(model.module)
        engine = Engine(backbone, ByteTokenizer(), module)
        std = [r.token_ids for r in engine.generate(prompts, max_new_tokens=12)]
        assert [engine.generate([p], max_new_tokens=12)[0].token_ids for p in prompts] == std  # batch == alone
        for strategy, kwargs in (("verified", {"draft_len": 3}), ("verified", {"draft_len": 2, "draft_width": 3})):
            assert [r.token_ids for r in engine.generate(prompts, strategy, max_new_tokens=12, **kwargs)] == std
            assert engine.generate(prompts[:1], strategy, max_new_tokens=12, **kwargs)[0].token_ids == std[0]
        speed = make_strategy("speed", width=2)
        assert [r.token_ids for r in engine.generate(prompts, speed, max_new_tokens=12)] == std
        assert [engine.generate([p], speed, max_new_tokens=12)[0].token_ids for p in prompts[:4]] == std[:4]


def test_blocks_stay_eager_where_the_kernel_is_missing(tiny, monkeypatch):
    """No compiler (or a failed build): attach says why and leaves the blocks eager, attending row by row."""
    monkeypatch.setattr(kernels, "load", lambda: "no C++ compiler found")
    backbone = _quantized(tiny, "int4", fused=False)
    assert kernels.attach(backbone.stack) == "no C++ compiler found"
    assert all(b.fused is None for b in backbone.stack.layers) and backbone.stack.row_invariant


def test_build_without_a_compiler_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("RECYCLEGPT_HOME", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(kernels.shutil, "which", lambda name: None)
    with pytest.raises(kernels.KernelError, match=r"no C\+\+ compiler found \(install g\+\+, or set \$CXX\)"):
        kernels.build(quiet=True)
    assert not any(tmp_path.rglob("*.so"))


def test_blocks_that_do_not_fit_are_left_alone(tiny):
    """A float32 block (not quantized) has no kernel arguments; attach refuses a stack with one."""
    assert kernels.block_args(tiny.backbone.stack.layers[0]) is None
    assert kernels.attach(tiny.backbone.stack) is not None
    assert all(b.fused is None for b in tiny.backbone.stack.layers)
