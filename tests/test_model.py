"""The native backbone against Hugging Face's Llama, and the cache inside it against the uncached forward (the
cache on its own: test_cache.py)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from recyclegpt.bases.convert import UnsupportedArchitecture, backbone_from_hf, config_from_hf
from recyclegpt.cache import Tree
from recyclegpt.model import Backbone


def _hf_llama(tie: bool = True) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_logits_match_transformers_llama(tie):
    hf = _hf_llama(tie)
    backbone = backbone_from_hf(hf)
    tokens = torch.randint(0, 256, (2, 48))
    with torch.no_grad():
        ref = hf(tokens).logits
        logits, hidden = backbone(tokens)
    assert (ref - logits).abs().max().item() <= 1e-4
    assert hidden.shape == (2, 48, 64)


def test_qwen2_biases_are_converted():
    cfg = Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    hf = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.q_proj.bias.normal_()
    backbone = backbone_from_hf(hf)
    tokens = torch.randint(0, 128, (1, 32))
    with torch.no_grad():
        assert (hf(tokens).logits - backbone(tokens)[0]).abs().max().item() <= 1e-4


def test_unsupported_architecture_points_to_generic_path():
    class Fake:
        model_type = "gpt2"

    with pytest.raises(UnsupportedArchitecture, match="--backend hf"):
        config_from_hf(Fake())


def test_logits_last_computes_only_the_requested_positions():
    backbone = backbone_from_hf(_hf_llama())
    tokens = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        full, _ = backbone(tokens)
        last2, hidden = backbone(tokens, logits_last=2)
    assert last2.shape == (1, 2, 256) and hidden.shape == (1, 10, 64)
    torch.testing.assert_close(last2, full[:, -2:], atol=1e-6, rtol=0)


@pytest.mark.parametrize("step", [1, 2])
def test_cached_decode_equals_uncached_forward(step):
    backbone = backbone_from_hf(_hf_llama())
    tokens = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        ref, ref_hidden = backbone(tokens)
        cache = backbone.new_cache(2, 64)
        backbone(tokens[:, :20], cache)
        for start in range(20, 40, step):
            logits, hidden = backbone(tokens[:, start : start + step], cache, logits_last=step)
            torch.testing.assert_close(logits, ref[:, start : start + step], atol=1e-5, rtol=0)
            assert torch.equal(logits.argmax(-1), ref[:, start : start + step].argmax(-1))
    assert cache.length == 40


def test_rollback_rewrites_the_same_slots():
    backbone = backbone_from_hf(_hf_llama())
    tokens = torch.randint(0, 256, (1, 30))
    other = torch.randint(0, 256, (1, 2))
    with torch.no_grad():
        ref, _ = backbone(tokens)
        cache = backbone.new_cache(1, 32)
        backbone(tokens[:, :20], cache)
        backbone(other, cache)  # a rejected two-token draft
        cache.rollback(20)
        storage = [t.data_ptr() for t in cache.k + cache.v]
        logits, _ = backbone(tokens[:, 20:30], cache)
    assert [t.data_ptr() for t in cache.k + cache.v] == storage  # no reallocation
    torch.testing.assert_close(logits, ref[:, 20:30], atol=1e-5, rtol=0)


def test_left_padding_gives_the_same_logits_as_unpadded_rows(tiny):
    backbone: Backbone = tiny.backbone
    short, long = torch.randint(0, 256, (1, 5)), torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        ref_short, _ = backbone(short)
        ref_long, _ = backbone(long)
        batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
        cache = backbone.new_cache(2, 16)
        cache.set_padding([4, 0])
        logits, _ = backbone(batch, cache)
        nxt = torch.randint(0, 256, (2, 1))
        step, _ = backbone(nxt, cache)
        ref_step, _ = backbone(torch.cat([short, nxt[:1]], 1))
    torch.testing.assert_close(logits[0, 4:], ref_short[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1], ref_long[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(step[0, 0], ref_step[0, -1], atol=1e-5, rtol=0)


def test_cache_overflow_is_a_clear_error(tiny):
    cache = tiny.backbone.new_cache(1, 8)
    with pytest.raises(ValueError, match="cache holds 8 tokens; 0 used, cannot add 9 more"):
        tiny.backbone(torch.zeros(1, 9, dtype=torch.long), cache)


def test_tree_call_scores_each_branch_as_its_own_sequence():
    """[x, a, b, s1, s2] laid out as a tree (a -> b chained on x; s1, s2 side candidates for a's slot)
    gives every branch the logits a plain call over that branch gives; keeping a side branch moves its
    keys and values next to the root, so decoding goes on as if it had been fed alone."""
    backbone = backbone_from_hf(_hf_llama())
    prefix, (x, a, b, s1, s2, z) = torch.randint(0, 256, (1, 12)), torch.randint(0, 256, (6,)).tolist()
    tree = Tree.from_parents([-1, 0, 1, 0, 0])
    assert tree.depth.tolist() == [0, 1, 2, 1, 1]
    with torch.no_grad():
        cache = backbone.new_cache(1, 32)
        backbone(prefix, cache)
        logits, _ = backbone(torch.tensor([[x, a, b, s1, s2]]), cache, tree=tree)
        chain, _ = backbone(torch.cat([prefix, torch.tensor([[x, a, b]])], 1))
        side, _ = backbone(torch.cat([prefix, torch.tensor([[x, s2, z]])], 1))
        torch.testing.assert_close(logits[0, :3], chain[0, 12:], atol=1e-5, rtol=0)
        torch.testing.assert_close(logits[0, 4], side[0, 13], atol=1e-5, rtol=0)
        cache.keep(12, torch.tensor([[4]]))  # keep s2 (position 4 of the call) after x
        cache.rollback(14)
        after, _ = backbone(torch.tensor([[z]]), cache)
    torch.testing.assert_close(after[0, 0], side[0, 14], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("padded", "shared"), [(False, False), (True, False), (True, True)])
def test_row_invariant_attention_equals_one_token_calls_bit_for_bit(padded, shared):
    """With ``row_invariant`` attention and quantized products (whose rows do not depend on the call), a call
    over a chain, or a tree branch, gives each token exactly the hidden state a one-token call at its place
    gives: ``RowViews`` lays out each token's keys (prefix, padding mask, its own branch) as that call does.
    (On this tiny model one call over all rows happens to agree too; on SmolLM2 it does not, which
    ``test_bases.py``'s quantized verified test catches: 15 of 20 prompts identical without row views.)"""
    from recyclegpt.config import PRESETS
    from recyclegpt.quant import quantize_linears

    torch.manual_seed(0)
    cfg = PRESETS["tiny"].model
    model = Backbone(cfg.replace(n_layers=4, n_unique_layers=2) if shared else cfg).eval()  # shared: 4 over 2
    quantize_linears(model, "int8")
    model.stack.row_invariant = True
    prompts = torch.randint(0, 256, (2, 7))
    pads = [2, 0] if padded else [0, 0]
    new = torch.randint(0, 256, (2, 3))

    def prefilled():
        cache = model.new_cache(2, 32)
        if padded:
            cache.set_padding(pads)
        model(prompts, cache)
        return cache

    with torch.no_grad():
        one = prefilled()
        singles = torch.cat([model(new[:, i : i + 1], one)[1] for i in range(3)], 1)  # three one-token calls
        _, chain = model(new, prefilled())  # one call over the chain
        assert torch.equal(chain, singles)
        # a tree: [root, child a, sibling b of a]; b's branch, moved next to the prefix, is the chain [root, b]
        tree = Tree.from_parents([-1, 0, 0])
        _, branched = model(torch.stack([new[:, 0], new[:, 1], new[:, 2]], 1), prefilled(), tree=tree)
        other = prefilled()
        _, root = model(new[:, :1], other)
        _, b = model(new[:, 2:3], other)
        assert torch.equal(branched[:, 0], root[:, 0]) and torch.equal(branched[:, 2], b[:, 0])


def _unrolled(backbone: Backbone, tokens: torch.Tensor, order: list[int]) -> torch.Tensor:
    """Logits of an uncached forward that runs the backbone's blocks in ``order``, written out by hand."""
    stack, T = backbone.stack, tokens.shape[1]
    x = backbone.embed(tokens)
    for b in order:
        x = stack.layers[b](x, stack.rope_cos[:T], stack.rope_sin[:T], None, [])
    return backbone.head(backbone.norm(x))


def test_unshared_backbone_is_unchanged():
    """n_unique_layers=None and = n_layers build the same model, whose forward is the plain loop over its blocks
    bit for bit (the forward as it was before parameter sharing)."""
    from recyclegpt.config import PRESETS

    cfg = PRESETS["tiny"].model
    torch.manual_seed(0)
    plain = Backbone(cfg).eval()
    torch.manual_seed(0)
    explicit = Backbone(cfg.replace(n_unique_layers=cfg.n_layers)).eval()
    a, b = plain.state_dict(), explicit.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ref = _unrolled(plain, tokens, [0, 1])
        assert torch.equal(plain(tokens)[0], ref) and torch.equal(explicit(tokens)[0], ref)


def test_shared_backbone_cycles_its_blocks_with_a_cache_slot_per_logical_layer(shared_tiny):
    """4 logical layers over 2 blocks: the parameters of a 2-layer model, blocks run 0, 1, 0, 1, and every path
    (cached decode, left padding, tree calls) agrees with the uncached forward."""
    from recyclegpt.config import PRESETS
    from recyclegpt.model import count_parameters

    backbone: Backbone = shared_tiny.backbone
    assert len(backbone.stack.layers) == 2 and backbone.stack.n_layers == 4
    assert count_parameters(backbone) == count_parameters(Backbone(PRESETS["tiny"].model))
    assert not any(k.startswith("stack.layers.2") for k in backbone.state_dict())
    tokens = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref, _ = backbone(tokens)
        torch.testing.assert_close(ref, _unrolled(backbone, tokens, [0, 1, 0, 1]), atol=1e-6, rtol=0)
        cache = backbone.new_cache(2, 32)
        assert len(cache.k) == 4  # each logical layer keeps its own keys and values
        steps = [backbone(tokens[:, :16], cache)[0]]
        steps += [backbone(tokens[:, t : t + 1], cache)[0] for t in range(16, 24)]
        torch.testing.assert_close(torch.cat(steps, 1), ref, atol=1e-5, rtol=0)
        # Left padding: row 0 is the last 20 tokens of its row behind 4 pads.
        padded = backbone.new_cache(2, 32)
        padded.set_padding([4, 0])
        logits, _ = backbone(torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), tokens[:1, 4:]], 1),
                                        tokens[1:]]), padded)
        torch.testing.assert_close(logits[0, 4:], backbone(tokens[:1, 4:])[0][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(logits[1], ref[1], atol=1e-5, rtol=0)
        # A tree [root, a, b] with b a sibling of a scores b as the chain [root, b].
        tree_cache = backbone.new_cache(2, 32)
        backbone(tokens[:, :16], tree_cache)
        logits, _ = backbone(tokens[:, 16:19], tree_cache, tree=Tree.from_parents([-1, 0, 0]))
        chain, _ = backbone(torch.cat([tokens[:, :17], tokens[:, 18:19]], 1))
        torch.testing.assert_close(logits[:, 2], chain[:, 17], atol=1e-5, rtol=0)


def test_early_exit_reads_the_hidden_state_after_k_logical_layers(shared_tiny):
    backbone: Backbone = shared_tiny.backbone
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        logits, hidden = backbone(tokens)
        full, full_hidden, last = backbone(tokens, exit_layer=4)
        assert torch.equal(full, logits) and torch.equal(full_hidden, hidden)
        assert torch.equal(backbone.early_logits(last), logits)  # k = n_layers: the model's own prediction
        _, _, early = backbone(tokens, exit_layer=3)
        torch.testing.assert_close(backbone.early_logits(early), _unrolled(backbone, tokens, [0, 1, 0]),
                                   atol=1e-6, rtol=0)
        # The early state of a cached call is the uncached one.
        cache = backbone.new_cache(2, 16)
        backbone(tokens[:, :8], cache)
        *_, step = backbone(tokens[:, 8:], cache, exit_layer=3)
        torch.testing.assert_close(step, early[:, 8:], atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match=r"exit_layer must be in \[1, 4\] \(the logical layers\), got 5"):
            backbone(tokens, exit_layer=5)


def test_fused_projections_compute_what_the_separate_ones_do(tiny):
    """q/k/v and gate/up as one product each: the same logits (float32, up to how the kernel blocks the wider
    product), the separate layers gone, and a second call fuses nothing."""
    import copy

    from recyclegpt.model import fuse_projections

    backbone = tiny.backbone
    fused = copy.deepcopy(backbone)
    assert fuse_projections(fused) == 2 * backbone.config.n_layers and fuse_projections(fused) == 0
    attn, mlp = fused.stack.layers[0].self_attn, fused.stack.layers[0].mlp
    assert not hasattr(attn, "q_proj") and not hasattr(mlp, "gate_proj") and attn.qkv_proj.out_features == 64 + 2 * 32
    tokens = torch.randint(0, 256, (2, 12))
    with torch.inference_mode():
        want, _ = backbone(tokens)
        got, _ = fused(tokens)
        cache = fused.new_cache(2, 32)  # and with a cache: prompt, then one token at a time
        fused(tokens[:, :8], cache)
        steps = torch.cat([fused(tokens[:, i : i + 1], cache)[0] for i in range(8, 12)], 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(steps, want[:, 8:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("model", "exit_layer"), [("shared_tiny", 2), ("shared_tiny", 1), ("tiny", 1)])
def test_wavefront_finishes_the_pending_token_and_starts_its_candidates(model, exit_layer, request):
    """``head_start`` then ``wavefront`` give the pending token the logits of a plain one-token call and each
    candidate the early state and early logits it would get as the next token; the candidates' keys and values
    sit in their slots, the pending token's in every layer of its own; left padding included."""
    backbone: Backbone = request.getfixturevalue(model).backbone
    prompts = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    pending, candidates = torch.tensor([[21], [22]]), torch.tensor([[31, 32, 33], [34, 35, 36]])

    def prefilled():
        cache = backbone.new_cache(2, 16)
        cache.set_padding([2, 0])
        backbone(prompts, cache)
        return cache

    with torch.no_grad():
        cache = prefilled()
        late, stash = backbone.head_start(pending, cache, exit_layer)
        assert cache.length == 6 and len(stash) == exit_layer
        logits, hidden, early = backbone.wavefront(late, stash, candidates, cache, exit_layer)
        assert cache.length == 10 and logits.shape == (2, 4, backbone.config.vocab_size)
        ref = prefilled()
        want, _ = backbone(pending, ref)
        torch.testing.assert_close(logits[:, :1], want, rtol=0, atol=1e-5)
        for j in range(3):
            after = prefilled()
            backbone(pending, after)
            _, _, want_early = backbone(candidates[:, j : j + 1], after, exit_layer=exit_layer)
            torch.testing.assert_close(early[:, j : j + 1], want_early, rtol=0, atol=1e-5)
            torch.testing.assert_close(logits[:, 1 + j], backbone.early_logits(want_early)[:, 0], rtol=0, atol=1e-5)
            for layer in range(exit_layer):  # the candidate's keys at its own slot, 7 + j
                got = cache.read(exit_layer, torch.tensor([7 + j, 7 + j]))[layer][0]
                torch.testing.assert_close(got, after.k[layer][:, :, 7 : 8], rtol=0, atol=1e-5)
        for layer in range(backbone.config.n_layers):  # the pending token's keys, every layer, at slot 6
            torch.testing.assert_close(cache.k[layer][:, :, 6], ref.k[layer][:, :, 6], rtol=0, atol=1e-5)
