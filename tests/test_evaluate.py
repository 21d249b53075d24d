"""Evaluation (perplexities, agreement, tau) and the lm-eval adapter on tiny random models (no network)."""

import json
import math
from pathlib import Path

import pytest
import torch

from recyclegpt.bases.tokenizer import ByteTokenizer
from recyclegpt.cli import main
from recyclegpt.config import PRESETS
from recyclegpt.evaluate import (
    EvalError,
    early_exit_agreement,
    evaluate,
    generation_metrics,
    paired_flips,
    score_tokens,
    text_metrics,
)
from recyclegpt.generate import Engine
from recyclegpt.recycle import RecyclableModule, RecycleGPT

TASKS = Path(__file__).resolve().parent.parent / "benchmarks" / "tasks"
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be " \
       "in want of a wife. However little known the feelings or views of such a man may be on his first entering " \
       "a neighbourhood, this truth is so well fixed in the minds of the surrounding families.\n"


class ShiftOracle(RecyclableModule):
    """Returns h_{t+1} for the pair (h_t, x_{t+1}): under teacher forcing the module then predicts x_{t+2}
    exactly as the base does (the last position has no successor and repeats h_t)."""

    def forward(self, hidden, emb, cache=None):
        return torch.cat([hidden[:, 1:], hidden[:, -1:]], 1)


def _log_softmax_at(row: torch.Tensor, target: int) -> float:
    """log softmax(row)[target] with Python floats: the reference the tests compare against."""
    values = [float(v) for v in row]
    top = max(values)
    return values[target] - top - math.log(sum(math.exp(v - top) for v in values))


def test_perplexities_equal_exp_mean_cross_entropy_by_hand(tiny):
    ids = torch.randint(0, 256, (11,)).tolist()  # windows of 5, 5 and 1 token (the last is dropped)
    out = text_metrics(tiny.backbone, tiny.module, ids, seq_len=5, batch_size=1)
    base, alt = [], []
    for w in (ids[:5], ids[5:10]):
        x = torch.tensor([w])
        with torch.no_grad():
            logits, hidden = tiny.backbone(x)
            rec = tiny.backbone.head(tiny.module(hidden[:, :-1], tiny.backbone.embed(x[:, 1:])))
        for j in range(1, 5):
            b = _log_softmax_at(logits[0, j - 1], w[j])
            base.append(b)
            alt.append(_log_softmax_at(rec[0, j - 2], w[j]) if j % 2 == 1 and j >= 3 else b)
    assert out["tokens"] == 8 and out["windows"] == 2 and out["module_positions"] == 2
    assert out["ppl_base"] == pytest.approx(math.exp(-sum(base) / 8), rel=1e-5)
    assert out["ppl_alternating"] == pytest.approx(math.exp(-sum(alt) / 8), rel=1e-5)
    assert out["ppl_relative_increase"] == pytest.approx(out["ppl_alternating"] / out["ppl_base"] - 1)
    assert out["draft_vocab_coverage"] == 1.0


def test_oracle_module_matches_the_base_exactly(tiny):
    oracle = ShiftOracle(tiny.backbone.config, PRESETS["tiny"].recycle)
    ids = torch.randint(0, 256, (200,)).tolist()
    out = text_metrics(tiny.backbone, oracle, ids, seq_len=64, batch_size=2)
    assert out["agreement"] == 1.0
    assert out["module_top1_acc"] == out["base_top1_acc"]
    assert out["ppl_alternating"] == pytest.approx(out["ppl_base"], rel=1e-6)
    assert out["ppl_module_at_module_positions"] == pytest.approx(out["ppl_base_at_module_positions"], rel=1e-6)


def test_batching_does_not_change_the_numbers(tiny):
    ids = torch.randint(0, 256, (300,)).tolist()
    one = text_metrics(tiny.backbone, tiny.module, ids, seq_len=32, batch_size=1)
    many = text_metrics(tiny.backbone, tiny.module, ids, seq_len=32, batch_size=4)
    assert one.keys() == many.keys()
    for k in one:
        assert many[k] == pytest.approx(one[k], rel=1e-5, abs=1e-6), k


def test_draft_vocabulary_targets_outside_it_are_the_modules_misses(tiny):
    tiny.module.set_draft_vocab(torch.arange(0, 256, 2))  # even ids only
    ids = [11, 40, 7, 3, 9, 20, 21, 5, 8]  # module targets j = 3, 5, 7: ids 3 and 21 odd, 20 even
    out = text_metrics(tiny.backbone, tiny.module, ids, seq_len=9)
    x = torch.tensor([ids])
    with torch.no_grad():
        logits, hidden = tiny.backbone(x[:, :-1])
        g = tiny.module(hidden[:, :-1], tiny.backbone.embed(x[:, 1:-1]))
        full = tiny.backbone.head(g)  # the module's full-vocabulary head
        draft = full.clone()
        draft[..., 1::2] = float("-inf")  # what decoding draws from
    base = [_log_softmax_at(logits[0, j - 1], ids[j]) for j in range(1, 9)]
    honest = [_log_softmax_at(full[0, j - 2], ids[j]) if j in (3, 5, 7) else base[j - 1] for j in range(1, 9)]
    fallback = [_log_softmax_at(draft[0, j - 2], ids[j]) if j == 5 else base[j - 1] for j in range(1, 9)]
    assert out["draft_vocab_coverage"] == pytest.approx(1 / 3)  # only x_5 = 20 can be emitted
    assert out["ppl_alternating"] == pytest.approx(math.exp(-sum(honest) / 8), rel=1e-5)
    assert out["ppl_alternating_base_fallback"] == pytest.approx(math.exp(-sum(fallback) / 8), rel=1e-5)
    assert out["ppl_module_at_module_positions"] == pytest.approx(math.exp(-sum(honest[j - 1] for j in (3, 5, 7)) / 3),
                                                                   rel=1e-5)
    s = score_tokens(tiny.backbone, tiny.module, x)
    assert bool((s.module_top % 2 == 0).all())  # the module's top-1 is always a draft token
    assert not s.module_nll[0, 1].isfinite() and s.module_nll_full[0, 1].isfinite()  # x_3 = 3: a certain miss
    assert out["module_top1_acc"] <= 2 / 7  # of the 7 targets x_2 .. x_8 only 20 and 8 are even


def test_generation_metrics_verified_is_lossless(tiny):
    with torch.no_grad():
        tiny.backbone.embed_tokens.weight.mul_(20)  # no near-ties in greedy decoding
    engine = Engine(tiny.backbone, ByteTokenizer(), tiny.module)
    out = generation_metrics(engine, ["Hello there", "The cat sat"], max_new_tokens=12, draft_len=2)
    assert out["verified_identical"] == 1.0
    assert out["prompts"] == 2 and out["generated_tokens"] == 24
    assert 1.0 <= out["tau"] <= 3.0 and 0.0 <= out["acceptance_rate"] <= 1.0 and 0.0 <= out["agreement"] <= 1.0
    assert out["drafted"] > 0 and out["tau"] == pytest.approx(24 / out["full_calls"])


def test_evaluate_end_to_end_emits_every_field(tiny, tmp_path):
    data = tmp_path / "text.txt"
    data.write_text(TEXT * 4)
    engine = Engine(tiny.backbone, ByteTokenizer(), tiny.module)
    out = evaluate(engine, data, ["Hello", "Once upon a time"], max_tokens=600, seq_len=128, max_new_tokens=8)
    again = json.loads(json.dumps(out, allow_nan=False))
    assert again["text"]["tokens"] == 600 - 5  # windows 128 x 4 + 88, one target fewer each
    assert set(again["generations"]) >= {"agreement", "tau", "acceptance_rate", "verified_identical"}
    assert all(v is not None for v in [*again["text"].values(), *again["generations"].values()])
    assert evaluate(engine, data, None, max_tokens=50, seq_len=16)["generations"] is None
    only = evaluate(engine, None, ["Hello"], max_new_tokens=8)
    assert only["text"] is None and only["data"] is None and only["generations"]["prompts"] == 1


def test_prepacked_evaluation_gives_the_same_numbers(tiny, tmp_path):
    import copy

    from recyclegpt.model import prepack_linears

    data = tmp_path / "text.txt"
    data.write_text(TEXT * 2)
    with torch.no_grad():  # sharpen the random model: no near-ties for float rounding to flip
        tiny.backbone.embed_tokens.weight.mul_(20)
    module = copy.deepcopy(tiny.module)
    module.set_draft_vocab(torch.arange(0, 256, 2))
    reference = Engine(tiny.backbone, ByteTokenizer(), copy.deepcopy(module))
    backbone = copy.deepcopy(tiny.backbone)
    prepack_linears(backbone), prepack_linears(module)
    packed = Engine(backbone, ByteTokenizer(), module)
    want, got = (evaluate(e, data, ["Hello", "Once upon a time"], max_tokens=300, seq_len=64, max_new_tokens=8)
                 for e in (reference, packed))
    for key, value in want["text"].items():  # oneDNN sums in another order: float32 rounding apart
        assert got["text"][key] == pytest.approx(value, rel=1e-4), key
    assert got["generations"] == want["generations"]


def test_evaluation_errors_are_clear(tiny, tmp_path):
    engine = Engine(tiny.backbone, ByteTokenizer(), None)
    with pytest.raises(EvalError, match="needs a recyclable module"):
        evaluate(engine, tmp_path / "x.txt")
    with pytest.raises(EvalError, match="seq_len must be in"):
        text_metrics(tiny.backbone, tiny.module, list(range(10)), seq_len=2)
    with pytest.raises(EvalError, match="too little text"):
        text_metrics(tiny.backbone, tiny.module, [1, 2], seq_len=8)
    engine = Engine(tiny.backbone, ByteTokenizer(), tiny.module)
    with pytest.raises(ValueError, match="input file not found"):
        evaluate(engine, tmp_path / "missing.txt")


@pytest.mark.parametrize("content, message", [
    (None, "prompt file not found"),
    ("", "is empty"),
    ('{"prompt": "a"}\n{"text": "b"}\n', "expected a JSON object with a 'prompt' field"),
])
def test_eval_cli_rejects_bad_prompt_files_before_loading_a_model(tmp_path, capsys, content, message):
    prompts = tmp_path / "prompts.jsonl"
    if content is not None:
        prompts.write_text(content)
    rc = main(["eval", "--module", "m.safetensors", "--text", "d.txt", "--prompts", str(prompts)])
    assert rc == 2 and message in capsys.readouterr().err


def test_eval_cli_needs_a_module(capsys):
    assert main(["eval", "--text", "d.txt"]) == 2
    assert "needs a recyclable module" in capsys.readouterr().err
    assert main(["eval", "--module", "m.safetensors"]) == 2
    assert "needs something to score: --text FILE, --prompts FILE or --answers DIR" in capsys.readouterr().err


def test_paired_flips_counts_changed_items_and_gives_the_exact_mcnemar_p():
    std = [1] * 90 + [0] * 10
    alt = [1] * 83 + [0] * 7 + [1] * 2 + [0] * 8  # 7 right -> wrong, 2 wrong -> right
    f = paired_flips(std, alt)
    assert (f["items"], f["right_to_wrong"], f["wrong_to_right"]) == (100, 7, 2)
    assert (f["standard"], f["alternating"]) == (0.90, 0.85)
    assert f["diff_points"] == pytest.approx(-5.0)
    # two-sided binomial(9, 1/2) tail at 2: 2 * (1 + 9 + 36) / 512
    assert f["mcnemar_p"] == pytest.approx(92 / 512, rel=1e-12)
    assert paired_flips([1, 0], [1, 0])["mcnemar_p"] == 1.0  # nothing changed
    with pytest.raises(EvalError, match="equally long"):
        paired_flips([1, 0], [1])
    with pytest.raises(EvalError, match="0 or 1"):
        paired_flips([1, 0.5], [1, 0])


# ---- lm-evaluation-harness adapter ----

@pytest.fixture
def lm_eval_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return pytest.importorskip("recyclegpt.lm_eval_adapter", exc_type=ImportError)


class _Req:
    """The attributes of an lm-eval ``Instance`` the model reads."""

    def __init__(self, *args, task_name="task", doc_id=0):
        self.args, self.task_name, self.doc_id = args, task_name, doc_id


def test_adapter_alternating_scores_odd_continuation_tokens_with_the_module(tiny, lm_eval_env):
    lm = lm_eval_env.RecycleLM(tiny.backbone, ByteTokenizer(), tiny.module, scoring="alternating", batch_size=2)
    std = lm_eval_env.RecycleLM(tiny.backbone, ByteTokenizer(), tiny.module, scoring="standard")
    context, continuation = "abc", " defg"
    x = torch.tensor([list(b"abc defg")])
    with torch.no_grad():
        logits, hidden = tiny.backbone(x)
        rec = tiny.backbone.head(tiny.module(hidden[:, :-1], tiny.backbone.embed(x[:, 1:])))
    n, want_alt, want_std = 3, 0.0, 0.0
    for i, j in enumerate(range(n, x.shape[1])):  # continuation token i at position j
        b = _log_softmax_at(logits[0, j - 1], int(x[0, j]))
        want_std += b
        want_alt += _log_softmax_at(rec[0, j - 2], int(x[0, j])) if i % 2 == 1 else b
    reqs = [_Req(context, continuation), _Req("a", "b"), _Req("", "xyz")]
    got_alt, got_std = lm.loglikelihood(reqs), std.loglikelihood(reqs)
    assert got_alt[0][0] == pytest.approx(want_alt, rel=1e-5)
    assert got_std[0][0] == pytest.approx(want_std, rel=1e-5)
    assert got_alt[1] == pytest.approx(got_std[1])  # a one-token continuation is the base's alone
    oracle = ShiftOracle(tiny.backbone.config, PRESETS["tiny"].recycle)
    lm_oracle = lm_eval_env.RecycleLM(tiny.backbone, ByteTokenizer(), oracle, scoring="alternating")
    assert [r[0] for r in lm_oracle.loglikelihood(reqs)] == pytest.approx([r[0] for r in got_std], rel=1e-6)
    assert lm.unreachable == {}  # no draft vocabulary: every token can be emitted


def test_adapter_scores_tokens_outside_the_draft_vocabulary_as_the_modules(tiny, lm_eval_env):
    tiny.module.set_draft_vocab(torch.arange(0, 256, 2))  # even bytes only
    lm = lm_eval_env.RecycleLM(tiny.backbone, ByteTokenizer(), tiny.module, scoring="alternating")
    x = torch.tensor([list(b"abcdefg")])  # continuation "defg": d (base), e (module), f (base), g (module)
    with torch.no_grad():
        logits, hidden = tiny.backbone(x)
        rec = tiny.backbone.head(tiny.module(hidden[:, :-1], tiny.backbone.embed(x[:, 1:])))
    want = sum(_log_softmax_at(rec[0, j - 2], int(x[0, j])) if j in (4, 6) else
               _log_softmax_at(logits[0, j - 1], int(x[0, j])) for j in range(3, 7))
    (ll, greedy), (ll2, _) = lm.loglikelihood([_Req("abc", "defg", doc_id=4), _Req("abc", "dfdf", doc_id=5)])
    assert ll == pytest.approx(want, rel=1e-5) and not greedy  # 'e' (101) is odd: never the module's top-1
    assert lm.unreachable == {"task": {4}}  # 'f' (102) is even: the second item can be decoded


def test_adapter_rolling_and_generation(tiny, lm_eval_env):
    lm = lm_eval_env.RecycleLM(tiny.backbone, ByteTokenizer(), tiny.module, scoring="alternating", max_length=64)
    text = TEXT[:150]
    (rolling,) = lm.loglikelihood_rolling([_Req(text)])
    std = lm_eval_env.RecycleLM(tiny.backbone, ByteTokenizer(), tiny.module, max_length=64)
    (rolling_std,) = std.loglikelihood_rolling([_Req(text)])
    assert math.isfinite(rolling) and rolling < 0 and rolling != rolling_std
    (out,) = lm.generate_until([_Req("Hello", {"until": ["\n"], "max_gen_toks": 8})])
    assert isinstance(out, str) and "\n" not in out
    with pytest.raises(EvalError, match="needs a recyclable module"):
        lm_eval_env.RecycleLM(tiny.backbone, ByteTokenizer(), None, scoring="alternating")


@pytest.mark.skipif(not (TASKS / "cloze_austen.yaml").is_file(), reason="benchmarks/tasks not generated")
def test_local_tasks_run_offline_with_lm_eval(lm_eval_env):
    preset = PRESETS["tiny"]
    model = RecycleGPT.from_config(preset.model.replace(max_seq_len=1024), preset.recycle).eval()
    lm = lm_eval_env.RecycleLM(model.backbone, ByteTokenizer(), model.module, scoring="alternating", batch_size=8)
    results, items = lm_eval_env.run_tasks(lm, TASKS, limit=2)
    assert set(results) == set(items) == {"recycle_cloze_austen", "recycle_next_verse_kjv",
                                          "recycle_next_sentence_austen", "recycle_word_order_austen"}
    for task, metrics in items.items():  # per-item scores, in file order, average to lm-eval's figure
        assert "acc" in metrics
        for metric, scores in metrics.items():
            assert len(scores) == 2 and set(scores) <= {0.0, 1.0}
            assert sum(scores) / 2 == pytest.approx(results[task][f"{metric},none"])
    assert 0.0 <= results["recycle_next_verse_kjv"]["acc,none"] <= 1.0
    assert results["recycle_cloze_austen"]["perplexity,none"] > 1.0
    with pytest.raises(EvalError, match="unknown task"):
        lm_eval_env.load_task_configs(TASKS, ["nope"])


@pytest.mark.skipif(not (TASKS / "word_order_austen.jsonl").is_file(), reason="benchmarks/tasks not generated")
def test_word_order_pairs_differ_by_one_adjacent_swap():
    items = [json.loads(line) for line in (TASKS / "word_order_austen.jsonl").read_text().splitlines()]
    assert len(items) == 300
    for item in items:
        a, b = (c.split() for c in item["choices"])
        assert item["label"] in (0, 1)
        diff = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        assert len(diff) == 2 and diff[1] == diff[0] + 1
        assert (a[diff[0]], a[diff[1]]) == (b[diff[1]], b[diff[0]])
    # the true sentence is drawn to either place, so neither position wins by itself
    assert 0.4 < sum(item["label"] for item in items) / len(items) < 0.6


def test_generation_metrics_says_when_verified_output_differs_from_standard(tiny, monkeypatch):
    from recyclegpt.strategies import Verified

    with torch.no_grad():
        tiny.backbone.embed_tokens.weight.mul_(20)  # no near-ties in greedy decoding
    engine = Engine(tiny.backbone, ByteTokenizer(), tiny.module)
    exact, generate = Verified._accept_chain, Engine.generate

    def keep_every_draft(self, v, sampler):  # a broken verification: drafts kept unchecked
        B, k = v.drafts.shape
        return torch.full((B,), k), sampler.token(v.target_logits[:, k], v.seen)

    ids = list(b"The cat sat")  # precondition: the broken run really changes this prompt's answer
    std = engine.generate([ids], "standard", max_new_tokens=12)[0].token_ids
    monkeypatch.setattr(Verified, "_accept_chain", keep_every_draft)
    assert engine.generate([ids], "verified", max_new_tokens=12, draft_len=2)[0].token_ids != std
    runs = []

    def break_the_second_verified_run(self, prompts, strategy, *args, **kwargs):
        if strategy == "verified":
            runs.append(prompts)
            monkeypatch.setattr(Verified, "_accept_chain", keep_every_draft if len(runs) == 2 else exact)
        return generate(self, prompts, strategy, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", break_the_second_verified_run)
    out = generation_metrics(engine, ["Hello there", "The cat sat"], max_new_tokens=12, draft_len=2)
    assert runs == [[list(b"Hello there")], [ids]]
    assert out["verified_identical"] == 0.5  # the first prompt's verified answer is exact, the second's is not


class _NextTokenBase(torch.nn.Module):
    """A stub base over 8 tokens: its greedy token after x is x + 1 (mod 8); hidden state and embedding of a
    token are its one-hot."""

    V = 8

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # what ``parameters()`` reads the device from

    def embed(self, x):
        return torch.nn.functional.one_hot(x, self.V).float()

    def forward(self, tokens):
        h = self.embed(tokens)
        return 10 * h.roll(1, -1), h  # logits peak at x + 1


class _PairModule(torch.nn.Module):
    """A stub module: for the pair (h_t, x_{t+1}) its top-1 is x_{t+1} + 1 (the base's next greedy token) when
    ``right`` says so for x_t, else x_{t+1} again (never the base's)."""

    def __init__(self, right):
        super().__init__()
        self.right = right

    def forward(self, hidden, emb, cache=None):
        ok = self.right(hidden.argmax(-1))[..., None]
        return torch.where(ok, emb.roll(1, -1), emb)

    def draft_logits(self, backbone, g):
        return g


def test_answer_metrics_count_agreement_by_hand():
    from recyclegpt.evaluate import answer_metrics

    base = _NextTokenBase()
    even = _PairModule(lambda x: x % 2 == 0)  # right exactly where the token before the pair's is even
    oracle = _PairModule(lambda x: torch.ones_like(x, dtype=torch.bool))
    # Slots are the answer's tokens but the last, each read with the token before it (x_t, x_{t+1}):
    # answer 1: (2, 3) right, (3, 5) wrong, (5, 0) wrong; answer 2: (7, 4) wrong, (4, 2) right;
    # answer 3 has one token, so no slot. The even module: 2 of 5; the oracle: 5 of 5.
    answers = [([1, 2], [3, 5, 0, 6]), ([7], [4, 2, 1]), ([0], [5])]
    out = answer_metrics(base, even, answers, resamples=200, compare=[oracle])
    assert (out["prompts"], out["slots"]) == (2, 5)
    assert out["agreement"] == pytest.approx(2 / 5)
    lo, hi = out["agreement_ci95"]  # every resample pools answers at 1/3 and 1/2
    assert 1 / 3 - 1e-12 <= lo <= hi <= 1 / 2 + 1e-12
    (cmp,) = out["compare"]
    assert cmp["agreement"] == 1.0 and cmp["difference"] == pytest.approx(3 / 5)
    assert (cmp["only_module_right"], cmp["only_compare_right"]) == (0, 3)
    with pytest.raises(EvalError, match="no stored answer has the 2 tokens"):
        answer_metrics(base, even, [([1], [2])])


def test_early_exit_agreement_counts_positions_where_layer_k_picks_the_greedy_token(shared_tiny):
    backbone = shared_tiny.backbone
    ids = ByteTokenizer().encode(TEXT)[:50]  # windows of 16, 16, 16 and 2 tokens
    assert early_exit_agreement(backbone, ids, layer=4, seq_len=16) == 1.0  # the last layer is the model
    with torch.no_grad():
        hits = 0
        for lo in range(0, 50, 16):
            logits, _, early = backbone(torch.tensor([ids[lo : lo + 16]]), exit_layer=1)
            hits += int((backbone.early_logits(early).argmax(-1) == logits.argmax(-1)).sum())
    share = early_exit_agreement(backbone, ids, layer=1, seq_len=16, batch_size=3)
    assert share == hits / 50 and share < 1.0  # measured on this random model: 0.66
    top3 = early_exit_agreement(backbone, ids, layer=1, seq_len=16, top=3)
    assert share < top3 <= 1.0  # the greedy token among the early exit's three most likely, more often
    with pytest.raises(EvalError, match=r"layer must be in \[1, 4\]"):
        early_exit_agreement(backbone, ids, layer=5, seq_len=16)
    with pytest.raises(EvalError, match="batch_size and top >= 1, got 16, 2 and 0"):
        early_exit_agreement(backbone, ids, layer=1, seq_len=16, top=0)
    with pytest.raises(EvalError, match=r"seq_len must be in \[1, 256\]"):
        early_exit_agreement(backbone, ids, layer=1, seq_len=512)
