"""In-context copying (recyclegpt/copy_gate.py): the n-gram index, the mixture, its use in decoding and
scoring; fitting the gate on a base (recyclegpt/workflows.py: gate_data, the copy-gate command)."""

import copy
import math

import pytest
import torch

from recyclegpt.bases.tokenizer import ByteTokenizer
from recyclegpt.checkpoint import CheckpointError, load_module, save_module
from recyclegpt.copy_gate import (
    N_FEATURES,
    N_INDEX,
    CopyIndex,
    fit_gate,
    mix_logits,
    mix_scores,
    sequence_proposals,
)
from recyclegpt.evaluate import score_tokens
from recyclegpt.generate import Engine
from recyclegpt.workflows import gate_data


def test_index_proposes_the_follower_of_the_longest_earlier_match():
    index = CopyIndex([5, 6, 7, 1, 6, 8, 5, 6])
    # Suffix (5, 6) occurred once before, followed by 7; the 1-gram (6) was followed by 7 and by 8.
    cand, feats = index.propose()
    assert cand == 7
    assert feats[:6] == [0, 1, 0, 0, 0, 0]  # matched 2 tokens
    assert feats[6] == 1.0  # (5, 6) was followed by 7 every time
    assert index.propose([9]) is None  # 9 never occurred
    cand, feats = index.propose([1])  # context ... 5, 6, 1: only (1) occurred before, followed by 6
    assert cand == 6 and feats[:6] == [1, 0, 0, 0, 0, 0]
    index.extend([9, 5, 6])  # (5, 6) now followed by 7 and by 9: the latest wins, share 1/2
    cand, feats = index.propose()
    assert cand == 9 and feats[6] == 0.5
    assert CopyIndex([1, 2]).propose([3]) is None


def test_sequence_proposals_equal_the_incremental_index():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (80,), generator=g).tolist()
    cands, feats = sequence_proposals(ids)
    for p in range(len(ids)):
        found = CopyIndex(ids[: p + 1]).propose()
        assert int(cands[p]) == (-1 if found is None else found[0])
        if found is not None:
            assert feats[p].tolist() == pytest.approx(found[1])
    assert (cands[20:] >= 0).all()  # six symbols: every later position has a match


def _case(n: int = 40, V: int = 30, seed: int = 0, draft: bool = False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, V, generator=g) * 3
    if draft:
        logits[:, V // 2 :] = float("-inf")
    cand = torch.randint(-1, V, (n,), generator=g)
    onehot = torch.nn.functional.one_hot(torch.randint(0, 6, (n,), generator=g), 6).float()
    feats = torch.cat([onehot, torch.rand(n, 1, generator=g)], 1)
    weights = torch.randn(N_FEATURES + 1, generator=g)
    return logits, cand, feats, weights, torch.arange(V // 2) if draft else None


@pytest.mark.parametrize("draft", [False, True])
def test_mixture_is_a_distribution_with_the_stated_copy_weight(draft):
    logits, cand, feats, weights, dv = _case(draft=draft)
    q = mix_logits(logits, cand, feats, weights, dv).exp()
    assert q.sum(-1) == pytest.approx(torch.ones(len(q)), abs=1e-5)
    p = logits.softmax(-1)
    for i in range(len(q)):
        c = int(cand[i])
        if c < 0:
            assert torch.allclose(q[i], p[i], atol=1e-6)
            continue
        # The copy weight by hand from the gate's parameters: a = sigmoid(w . f + b), f = the index features,
        # log p(c) (clamped at -20) / 10, log p(top) / 10, c is the top-1, c in the draft vocabulary.
        logp = [math.log(float(x)) if x > 0 else float("-inf") for x in p[i]]
        f = [*map(float, feats[i]), max(logp[c], -20.0) / 10, max(logp) / 10, float(logp.index(max(logp)) == c),
             float(dv is None or c < 15)]
        w = [float(x) for x in weights]
        a = 1 / (1 + math.exp(-(sum(wk * fk for wk, fk in zip(w[:-1], f, strict=True)) + w[-1])))
        want = (1 - a) * p[i]  # every token keeps (1 - a) of its module probability, c gets a on top
        want[c] += a
        assert torch.allclose(q[i], want, atol=1e-5), (i, a)
    if draft:  # a copied token outside the draft vocabulary gets probability; others stay at 0
        outside = (cand >= 15)
        assert (q[outside, cand[outside]] > 0).all()
        rest = q[:, 15:].clone()
        rest[outside, cand[outside] - 15] = 0
        assert (rest == 0).all()


@pytest.mark.parametrize("draft", [False, True])
def test_scores_without_building_q_equal_the_decoding_mixture(draft):
    logits, cand, feats, weights, dv = _case(n=60, draft=draft, seed=1)
    targets = torch.where(torch.rand(60) < 0.5, cand.clamp(min=0), torch.randint(0, 30, (60,)))
    logq = mix_logits(logits, cand, feats, weights, dv)
    nll, top = mix_scores(logits[None], targets[None], cand[None], feats[None], weights, dv)
    want = -logq.gather(1, targets[:, None])[:, 0]
    finite = want.isfinite()
    assert torch.allclose(nll[0][finite], want[finite], atol=1e-5)
    assert torch.isinf(nll[0][~finite]).all()
    assert torch.equal(top[0], logq.argmax(-1))


def test_fit_recovers_when_copying_pays():
    """Synthetic slots: the base copies (p_base(c) = 0.95) after long matches, never after 1-token ones."""
    n = 400
    g = torch.Generator().manual_seed(0)
    long_match = torch.rand(n, generator=g) < 0.5
    idx = torch.zeros(n, N_INDEX)
    idx[long_match, 5] = 1.0  # matched 8 tokens
    idx[~long_match, 0] = 1.0  # matched 1
    idx[:, 6] = 1.0
    logp_c = torch.full((n,), -4.0)
    logp_top = torch.full((n,), -0.5)
    w = fit_gate(idx, logp_c, logp_top, torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool),
                 torch.where(long_match, 0.95, 0.0))
    feats_long = torch.tensor([0, 0, 0, 0, 0, 1, 1, -0.4, -0.05, 0, 1.0])
    feats_short = torch.tensor([1, 0, 0, 0, 0, 0, 1, -0.4, -0.05, 0, 1.0])
    a_long = torch.sigmoid(feats_long @ w[:-1] + w[-1])
    a_short = torch.sigmoid(feats_short @ w[:-1] + w[-1])
    assert a_long > 0.85 and a_short < 0.05  # the optimum is a = 0.95 after long matches, 0 after short ones
    with pytest.raises(ValueError, match="no position with a copy candidate"):
        fit_gate(idx[:0], logp_c[:0], logp_top[:0], logp_c[:0].bool(), logp_c[:0].bool(), logp_c[:0])


@pytest.fixture(scope="module")
def copying():
    """The tiny attached engine of test_generate with a copy gate that copies after any match."""
    from tests.test_generate import _attached

    engine = _attached(peaked=True)
    module = copy.deepcopy(engine.module)
    weights = torch.zeros(N_FEATURES + 1)
    weights[:6] = 12.0  # a match of any length: a ~ 1
    weights[-1] = -6.0
    module.set_copy_gate(weights)
    return engine, Engine(engine.backbone, ByteTokenizer(), module)


def _repetitive(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        motif = torch.randint(1, 256, (6,), generator=g).tolist()
        out.append(motif * 3 + motif[:2])
    return out


def test_alternating_with_copies_drafts_what_scoring_scores(copying):
    """Decoding and teacher-forced scoring use the same mixture: every module token alternating decoding
    emits is the scored argmax at its slot, and the gate changes what a repetitive prompt continues with."""
    plain, engine = copying
    changed = 0
    for p in _repetitive(8, 0):
        out = engine.generate([p], "alternating", max_new_tokens=16)[0].token_ids
        s = score_tokens(engine.backbone, engine.module, torch.tensor([p + out]))
        P = len(p)
        for k in range(1, len(out), 2):  # module positions: the answer's 2nd, 4th, ... tokens
            assert out[k] == int(s.module_top[0, P + k - 2])
        changed += out != plain.generate([p], "alternating", max_new_tokens=16)[0].token_ids
    assert changed >= 4


@pytest.mark.parametrize(("draft_len", "width"), [(1, 1), (3, 1), (2, 3)])
def test_verified_with_copies_equals_standard(copying, draft_len, width):
    plain, engine = copying
    prompts = _repetitive(6, 1)
    for p in prompts:
        std = plain.generate([p], "standard", max_new_tokens=20)[0].token_ids
        ver = engine.generate([p], "verified", max_new_tokens=20, draft_len=draft_len, draft_width=width)[0]
        assert ver.token_ids == std
    batch = engine.generate(prompts, "verified", max_new_tokens=16, draft_len=draft_len, draft_width=width)
    for p, g in zip(prompts, batch, strict=True):
        assert g.token_ids == plain.generate([p], "standard", max_new_tokens=16)[0].token_ids
    alt = engine.generate(prompts, "alternating", max_new_tokens=16)
    for p, g in zip(prompts, alt, strict=True):
        assert g.token_ids == engine.generate([p], "alternating", max_new_tokens=16)[0].token_ids


def test_gate_data_and_the_gate_round_trip(copying, tmp_path):
    plain, engine = copying
    data = gate_data(plain.backbone, plain.module, [(p, 0) for p in _repetitive(4, 2)])
    assert data["index_feats"].shape == (data["cand"].numel(), N_INDEX)
    assert int(data["slots"].sum()) == 4 * (20 - 2)
    assert ((data["base_p_c"] >= 0) & (data["base_p_c"] <= 1)).all()
    weights = fit_gate(**{k: data[k] for k in ("index_feats", "logp_c", "logp_top", "is_top", "in_draft",
                                               "base_p_c")})
    assert weights.shape == (N_FEATURES + 1,) and weights.isfinite().all()
    save_module(tmp_path / "m.safetensors", engine.module)
    loaded = load_module(tmp_path / "m.safetensors", engine.backbone.config)
    assert torch.equal(loaded.copy_gate, engine.module.copy_gate)
    bad = copy.deepcopy(engine.module)
    bad.copy_gate = torch.zeros(3)
    save_module(tmp_path / "bad.safetensors", bad)
    with pytest.raises(CheckpointError, match="copy gate weights must be"):
        load_module(tmp_path / "bad.safetensors", engine.backbone.config)


def test_copy_gate_cli_errors_are_clear(tmp_path, capsys):
    from recyclegpt.cli import main

    assert main(["copy-gate", "--prompts", "p.jsonl", "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "copy-gate needs the module to fit" in capsys.readouterr().err
    empty = tmp_path / "p.jsonl"
    empty.write_text("")
    assert main(["copy-gate", "--module", "m.safetensors", "--prompts", str(empty), "--out", "o.safetensors"]) == 2
    assert "is empty" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()
