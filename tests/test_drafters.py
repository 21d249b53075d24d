"""Drafters (drafters.py): prompt lookup by hand, the module drafter's cache against the backbone's, and
verified decoding with each drafter equal to standard decoding."""

import pytest
import torch

import recyclegpt.generate as gen
from recyclegpt.bases.tokenizer import ByteTokenizer
from recyclegpt.cache import KVCache
from recyclegpt.config import PRESETS
from recyclegpt.drafters import (
    Drafter,
    EarlyExitDrafter,
    ModuleDrafter,
    NoDrafter,
    PromptLookupDrafter,
    Proposal,
    default_exit_layer,
    make_drafter,
)
from recyclegpt.generate import DecodeStats, Engine
from recyclegpt.sampling import Sampler, SamplingConfig
from recyclegpt.strategies import Verified, make_strategy

GREEDY = Sampler(SamplingConfig())


def _peaked(model):
    with torch.no_grad():
        model.backbone.embed_tokens.weight.mul_(20)  # no near-ties in greedy decoding
    return model


def _repetitive(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        motif = torch.randint(1, 256, (6,), generator=g).tolist()
        out.append(motif * 3 + motif[: 2 + i % 3])  # different lengths: a batch is left-padded
    return out


@pytest.mark.parametrize(
    ("ctx", "k", "want"),
    [
        ([1, 2, 3, 4, 1, 2, 3], 3, [4, 1, 2]),  # the 3-gram (1, 2, 3) occurred at 0, followed by 4, 1, 2
        ([1, 2, 9, 1, 2, 7, 1, 2], 3, [7, 1, 2]),  # no earlier (7, 1, 2); (1, 2) twice: the latest wins
        ([5, 8, 6, 8], 3, [6, 8, 6]),  # only (8) matches; the copy runs on into its own proposal
        ([4, 4, 4], 4, [4, 4, 4, 4]),  # (4, 4) at 0: a one-token period
        ([1, 2, 3], 2, []),  # no token repeats: nothing to propose
        ([1, 2, 3, 9, 9, 9, 1, 2, 3], 2, [9, 9]),  # a longer match beats a later shorter one ((3) -> 9 too)
    ],
)
def test_prompt_lookup_proposes_what_followed_the_latest_match(ctx, k, want):
    drafter = PromptLookupDrafter()
    drafter.start([ctx[:-1]], torch.tensor([ctx[:-1]]), torch.zeros(1, len(ctx) - 1, 4), torch.tensor(ctx[-1:]), 0)
    assert drafter.lookup(drafter.indices[0], k) == want
    seen = torch.zeros(1, 16, dtype=torch.bool)
    p = drafter.propose(k, GREEDY, seen, keep_probs=True)
    assert p.tokens.tolist() == [want] and p.side is None
    assert p.probs.shape == (1, len(want), 16) and torch.equal(p.probs.argmax(-1), p.tokens)  # one-hot q
    assert p.probs.sum(-1).eq(1).all()


def test_prompt_lookup_batch_commit_and_finished_rows():
    drafter = PromptLookupDrafter(ngram=2)
    prompts = [[1, 2, 3, 1], [7, 8, 9]]
    drafter.start(prompts, torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, 4), torch.tensor([2, 7]), 0)
    seen = torch.zeros(2, 16, dtype=torch.bool)
    # Row 0 (..., 1, 2) matches; row 1 (7, 8, 9, 7) matches only (7): both propose, the batch takes 2.
    assert drafter.propose(2, GREEDY, seen).tokens.tolist() == [[3, 1], [8, 9]]
    assert drafter.propose(2, GREEDY, seen).probs.shape == (2, 2, 0)  # nobody reads q: none built
    # The cycle kept (3, 5) for row 0; row 1 stopped after its first token (e.g. EOS): its context stops there.
    drafter.commit(torch.tensor([[3, 5], [8, 6]]), torch.zeros(2, 2, 4), torch.tensor([2, 1]), [[3, 5], [8]])
    assert [index.tokens for index in drafter.indices] == [[1, 2, 3, 1, 2, 3, 5], [7, 8, 9, 7, 8]]
    # Row 0's tail (3, 5) never occurred, nor (5): no match, so it fills its chain with its last token.
    assert drafter.propose(3, GREEDY, seen).tokens.tolist() == [[5, 5, 5], [9, 7, 8]]
    # Rows leave and join between cycles: row 1 alone, then a new row after it.
    drafter.select([1])
    other = PromptLookupDrafter(ngram=2)
    other.start([[4, 4]], torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, 4), torch.tensor([4]), 0)
    drafter.extend(other)
    assert drafter.propose(2, GREEDY, seen).tokens.tolist() == [[9, 7], [4, 4]]
    with pytest.raises(ValueError, match="n-gram length must be >= 1"):
        PromptLookupDrafter(0)


def test_make_drafter_kinds_and_errors(tiny):
    assert isinstance(make_drafter(None, tiny.backbone, None), NoDrafter)
    assert isinstance(make_drafter("lookup", tiny.backbone, None), PromptLookupDrafter)
    assert isinstance(make_drafter("module", tiny.backbone, tiny.module), ModuleDrafter)
    with pytest.raises(ValueError, match="the module drafter needs a recyclable module"):
        make_drafter("module", tiny.backbone, None)
    with pytest.raises(ValueError, match="unknown drafter 'psychic'; known drafters: module, lookup"):
        make_drafter("psychic", tiny.backbone, None)


def test_module_drafter_commit_leaves_no_trace_of_rejected_drafts(tiny):
    """Chained drafts, then a commit of one kept draft and the full model's token: the module's cache is as
    long as the backbone's and its next draft distribution is what a drafter started on the whole
    context gives (float32 rounding apart: one call over many pairs against several shorter ones)."""
    backbone, prompt = _peaked(tiny).backbone, [5, 17, 99, 3, 42, 8]
    with torch.inference_mode():
        cache = backbone.new_cache(1, 64)
        _, hidden = backbone(torch.tensor([prompt]), cache, logits_last=1)
        first = torch.tensor([7])
        drafter = ModuleDrafter(backbone, tiny.module)
        drafter.start([prompt], torch.tensor([prompt]), hidden, first, 64)
        assert drafter.cache.length == cache.length == 6 and drafter.calls == 1
        proposal = drafter.propose(3, GREEDY, torch.zeros(1, 256, dtype=torch.bool))
        assert proposal.tokens.shape == (1, 3) and drafter.calls == 3  # two chained steps after the first
        assert drafter.cache.length == 8  # the chained steps' pairs, until the commit
        fed = torch.cat([first[:, None], proposal.tokens], 1)
        _, full_hidden = backbone(fed, cache)
        cache.rollback(6 + 2)  # kept: the first draft and the full model's token after it (here 11)
        new = torch.tensor([[int(proposal.tokens[0, 0]), 11]])
        drafter.commit(new, full_hidden[:, :2], torch.tensor([2]), new.tolist())
        assert drafter.cache.length == cache.length == 8
        context = prompt + [7, int(new[0, 0])]
        fresh = ModuleDrafter(backbone, tiny.module)
        _, h = backbone(torch.tensor([context]))
        fresh.start([context], torch.tensor([context]), h, torch.tensor([11]), 64)
        torch.testing.assert_close(drafter.first_logits(), fresh.first_logits(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("strategy", "kwargs"), [("verified", {"draft_len": 3}), ("verified", {"draft_width": 3}),
                                                  ("alternating", {}), ("adaptive", {"threshold": 0.2})])
def test_module_drafter_cache_stays_as_long_as_the_backbones_through_the_loop(tiny, monkeypatch, strategy, kwargs):
    """Between cycles (after each commit) the module cache and the backbone cache hold the same number of
    slots, single rows and left-padded batches, chains and trees."""
    backbone = _peaked(tiny).backbone
    made, caches = [], []
    make, new_cache = gen.make_drafter, backbone.new_cache
    monkeypatch.setattr(gen, "make_drafter", lambda *a: made.append(make(*a)) or made[-1])
    monkeypatch.setattr(backbone, "new_cache", lambda *a: caches.append(new_cache(*a)) or caches[-1])
    for batch in (_repetitive(1, 0), _repetitive(3, 1)):
        made.clear(), caches.clear()
        strat = make_strategy(strategy, kwargs.get("draft_len"), kwargs.get("threshold", 0.5),
                              kwargs.get("draft_width", 1))
        lengths = [(made[0].cache.length, caches[0].length) for _ in gen.decode_ids(
            backbone, tiny.module, batch, strat, GREEDY, 12, set(), DecodeStats())]
        assert len(lengths) > 2
        for module_len, backbone_len in lengths[:-1]:  # the last cycle ends the run: nothing to ingest
            assert module_len == backbone_len


def test_verified_with_prompt_lookup_equals_standard_on_a_repetitive_prompt(tiny):
    """No module needed; greedy output is the base's exactly, rows and left-padded batches, and on text that
    repeats itself the drafts are kept: more than one token per full call."""
    engine = Engine(_peaked(tiny).backbone, ByteTokenizer())
    prompts = _repetitive(4, 2)
    for k in (1, 4):
        for strategy in (make_strategy("lookup", k), make_strategy("verified", k, drafter="lookup")):
            stats = []
            for p in prompts:
                std = engine.generate([p], "standard", max_new_tokens=24)[0].token_ids
                g = engine.generate([p], strategy, max_new_tokens=24)[0]
                assert g.token_ids == std
                stats.append(g.stats)
            assert min(s.tau for s in stats) > 1 and sum(s.module_calls for s in stats) == 0
            batch = engine.generate(prompts, strategy, max_new_tokens=16)
            for p, g in zip(prompts, batch, strict=True):
                assert g.token_ids == engine.generate([p], "standard", max_new_tokens=16)[0].token_ids
            assert batch[0].stats.tau > 1
    assert engine.generate([prompts[0]], "lookup", max_new_tokens=20)[0].stats.drafted % 10 == 0  # default k


class _Bigram(torch.nn.Module):
    """A base whose next-token logits depend on the current token only, over the tokens 1 .. 12: token x
    prefers ``PERM[x]`` (greedy decoding walks its cycles), with broad odds on a few others (sampling)."""

    PERM = {1: 5, 5: 9, 9: 2, 2: 12, 12: 1, 3: 7, 7: 4, 4: 3, 6: 10, 10: 8, 8: 11, 11: 6}

    def __init__(self):
        super().__init__()
        self.config = PRESETS["tiny"].model
        self.p = torch.nn.Parameter(torch.zeros(1))
        g = torch.Generator().manual_seed(0)
        table = torch.full((256, 256), -30.0)
        table[:, 1:13] = torch.randn(256, 12, generator=g)
        for x, y in self.PERM.items():
            table[x, y] += 3.0
        self.table = table

    def new_cache(self, batch, max_len=None):
        return KVCache(1, batch, 1, 2, max_len)

    def forward(self, tokens, cache=None, logits_last=None):
        if cache is not None:
            cache.check_room(tokens.shape[1])
            cache.advance(tokens.shape[1])
        logits = self.table[tokens]  # (B, T, V)
        return logits[:, -(logits_last or tokens.shape[1]) :], torch.zeros(*tokens.shape, self.config.d_model)


def _misleading() -> list[list[int]]:
    """Prompts where a token was followed by another than the base's greedy choice: lookup drafts are
    rejected first, then kept once the output repeats itself."""
    return [[3, 7, 9, 4, 1, 3], [12, 5, 1, 8, 2, 12, 1], [10, 6, 11, 8, 3, 10], [6, 10, 9, 2, 12, 6, 10]]


def _covering() -> list[list[int]]:
    """Prompts holding every token 1 .. 12 (mostly in the base's likely order): every tail has a match, so
    every row proposes every cycle, and the drafts are often kept."""
    return [[9, 2, 12, 1, 12, 5, 10, 8, 11, 6, 10, 3, 7, 4, 3], [5, 10, 8, 11, 6, 10, 3, 7, 4, 3, 9, 2, 12, 1, 12, 1],
            [4, 3, 7, 4, 9, 2, 12, 1, 5, 10, 8, 11, 6]]


def test_prompt_lookup_keeps_and_rejects_drafts_and_stays_exact():
    engine = Engine(_Bigram(), ByteTokenizer())
    accepted = rejected = 0
    for p in _misleading():
        std = engine.generate([p], max_new_tokens=20)[0].token_ids
        g = engine.generate([p], "lookup", max_new_tokens=20, draft_len=3)[0]
        assert g.token_ids == std
        accepted, rejected = accepted + g.stats.accepted, rejected + g.stats.rejected
    assert accepted > 0 and rejected > 0
    batch = engine.generate(_misleading(), "lookup", max_new_tokens=20, draft_len=3)
    want = [engine.generate([p], max_new_tokens=20)[0].token_ids for p in _misleading()]
    assert [g.token_ids for g in batch] == want


def test_sampled_prompt_lookup_batches_follow_the_base_distribution():
    """Sampling (temperature 1) a batch of three prompts 2,000 times with lookup drafts gives each row's
    first four tokens the distribution 2,000 batches of standard sampling give: total variation under 0.10,
    where two samples of this size from one distribution differ by 0.02-0.06. A row that passed the test
    while another row set the batch's count lower must emit its draft there: drawing afresh from p (the
    rule before) moved these distributions by up to 0.16."""
    engine, n = Engine(_Bigram(), ByteTokenizer()), 2000

    def tokens(strategy: str, seeds: range) -> tuple[torch.Tensor, int]:
        rows, accepted = [], 0
        for seed in seeds:
            gens = engine.generate(_covering(), strategy, max_new_tokens=4, draft_len=3,
                                   sampling=SamplingConfig(temperature=1.0, seed=seed))
            rows.append([g.token_ids for g in gens])
            accepted += gens[0].stats.accepted
        return torch.tensor(rows), accepted  # (n, B, 4)

    std, _ = tokens("standard", range(n))
    ver, accepted = tokens("lookup", range(n, 2 * n))
    assert accepted > 0
    for row in range(3):
        for pos in range(4):
            a, b = (torch.bincount(t[:, row, pos], minlength=256) / n for t in (std, ver))
            assert 0.5 * (a - b).abs().sum() < 0.10, (row, pos)


class _Fixed(Drafter):
    """A drafter of another kind (no model): always proposes token 1, k times; shows the seam."""

    def start(self, prompts, tokens, hidden, first, room):
        self.committed = []

    def select(self, rows):
        pass

    def propose(self, k, sampler, seen, width=1, keep_probs=False):
        tokens = torch.ones(seen.shape[0], k, dtype=torch.long)
        probs = torch.nn.functional.one_hot(tokens, seen.shape[1]).float() if keep_probs else tokens[..., None][..., :0]
        return Proposal(tokens, probs.float())

    def commit(self, tokens, hidden, counts, emitted):
        self.committed.append(tokens.shape[1])


def test_a_drafter_of_another_kind_plugs_in_without_touching_the_loop(tiny):
    engine = Engine(_peaked(tiny).backbone, ByteTokenizer())
    made = []
    strategy = Verified(draft_len=2, drafter=lambda backbone, module: made.append(_Fixed()) or made[-1])
    assert not strategy.uses_module
    for p in _repetitive(3, 4):
        assert engine.generate([p], strategy, max_new_tokens=10)[0].token_ids == \
            engine.generate([p], max_new_tokens=10)[0].token_ids
    assert made and all(1 <= n <= 3 for n in made[-1].committed)


@pytest.mark.parametrize("model", ["tiny", "shared_tiny"])
@pytest.mark.parametrize(("exit_layer", "width"), [(None, 1), (1, 3)])
def test_speed_equals_standard_greedy_and_sampled(model, exit_layer, width, request):
    """SPEED emits the full model's own token every cycle: greedy output equals standard decoding on 50 prompts
    (alone and as one left-padded batch), and a seeded sampled run draws the same tokens, on an unshared and a
    parameter-shared model (random, not sharpened: its early exit is sometimes wrong)."""
    backbone = request.getfixturevalue(model).backbone
    engine = Engine(backbone, ByteTokenizer())
    strategy = make_strategy("speed", width=width, exit_layer=exit_layer)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, 256, (4 + i % 9,), generator=g).tolist() for i in range(50)]
    catch_ups = calls = 0
    for p in prompts:
        std = engine.generate([p], max_new_tokens=16)[0]
        spd = engine.generate([p], strategy, max_new_tokens=16)[0]
        assert spd.token_ids == std.token_ids, p
        assert spd.stats.full_calls == std.stats.full_calls  # one full call per token, as standard
        catch_ups, calls = catch_ups + spd.stats.module_calls, calls + spd.stats.full_calls - 1
    assert catch_ups < calls and (width > 1 or catch_ups > len(prompts))  # kept, and (top-1) missed, somewhere
    assert [g.token_ids for g in engine.generate(prompts, strategy, max_new_tokens=16)] == \
        [g.token_ids for g in engine.generate(prompts, max_new_tokens=16)]
    sampled = SamplingConfig(temperature=1.0, top_k=20, seed=3)
    for p in prompts[:10]:
        assert engine.generate([p], strategy, 16, sampled)[0].token_ids == \
            engine.generate([p], "standard", 16, sampled)[0].token_ids


def test_speed_reads_the_shared_blocks_once_per_tick(shared_tiny):
    """On a shared model at the default exit (after the unique blocks), the pending token's late layers and the
    candidates' early layers go through each block together: one block call per tick, half a plain step's."""
    backbone = shared_tiny.backbone
    assert default_exit_layer(backbone.config) == 2 and default_exit_layer(PRESETS["tiny"].model) == 1
    calls = []
    hooks = [b.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[1]))
             for b in backbone.stack.layers]
    engine = Engine(backbone, ByteTokenizer())
    engine.generate([[5, 6, 7]], "speed", max_new_tokens=2, draft_width=2)
    for h in hooks:
        h.remove()
    # prefill: 4 layers over 3 tokens; cycle 1: the first 2 layers of the pending token alone (a catch-up), then
    # 2 ticks of 1 + 2 rows each through one block
    assert calls == [3, 3, 3, 3, 1, 1, 3, 3]


def test_speed_refuses_what_it_cannot_run(tiny):
    backbone = tiny.backbone
    for kwargs, message in (({"exit_layer": 2}, r"early exit layer must be in \[1, 1\] for this model of 2 logical"),
                            ({"exit_layer": 0}, "early exit layer must be >= 1, got 0"),
                            ({"width": 0}, "speculation width must be >= 1, got 0")):
        with pytest.raises(ValueError, match=message):
            make_drafter(make_strategy("speed", **kwargs).drafter, backbone, None)
    with pytest.raises(ValueError, match="an early exit layer is a setting of strategy 'speed', not 'verified'"):
        make_strategy("verified", exit_layer=3)
    with pytest.raises(ValueError, match="splits the full call by layer, which Wrapped cannot; use --backend native"):
        EarlyExitDrafter(type("Wrapped", (), {"config": backbone.config})())
