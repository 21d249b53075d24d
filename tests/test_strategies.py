"""Strategies on hand-made logits: what each asks the drafter for and what it keeps (strategies.py)."""

import pytest
import torch

from recyclegpt.sampling import Sampler, SamplingConfig
from recyclegpt.strategies import (
    LOOKUP_DRAFT_LEN,
    STRATEGIES,
    Accepted,
    Adaptive,
    Alternating,
    Lookup,
    Standard,
    Verified,
    Verify,
    make_strategy,
)

V = 8
GREEDY = Sampler(SamplingConfig())


def _logits(*rows: list[int]) -> torch.Tensor:
    """(B, T, V) logits whose argmax at row b, position t is rows[b][t]."""
    out = torch.zeros(len(rows), len(rows[0]), V)
    for b, row in enumerate(rows):
        for t, tok in enumerate(row):
            out[b, t, tok] = 5.0
    return out


def _verify(drafts: list[list[int]], argmax: list[list[int]], side: list[list[int]] | None = None) -> Verify:
    d = torch.tensor(drafts).view(len(drafts), -1)
    return Verify(d, torch.zeros(*d.shape, 0), _logits(*argmax), torch.zeros(len(drafts), V, dtype=torch.bool),
                  None if side is None else torch.tensor(side))


def _check(acc: Accepted, n: int | list[int], token: list[int], path: list[list[int]] | None = None) -> None:
    """``n``: drafts kept per row (one int: every row)."""
    assert isinstance(acc, Accepted)
    assert acc.n.tolist() == (n if isinstance(n, list) else [n] * len(token)) and acc.token.tolist() == token
    assert (acc.path is None) if path is None else acc.path.tolist() == path


def test_greedy_chain_keeps_the_matching_prefix_then_the_full_models_token():
    verified = Verified(draft_len=2)
    # The full model agrees with the first draft (3), not the second (5 vs 6): keep 1, then its 6.
    _check(verified.accept(_verify([[3, 5]], [[3, 6, 1]]), GREEDY), 1, [6])
    # Every draft right: keep both, plus the bonus token after them.
    _check(verified.accept(_verify([[3, 6]], [[3, 6, 1]]), GREEDY), 2, [1])
    # The first draft wrong: nothing kept, the full model's token at the first slot.
    _check(verified.accept(_verify([[4, 6]], [[3, 6, 1]]), GREEDY), 0, [3])
    # In a batch each row keeps its own count, then the full model's token after it.
    batch = _verify([[3, 6], [2, 2]], [[3, 6, 1], [2, 7, 0]])
    acc = verified.accept(batch, GREEDY)
    _check(acc, [2, 1], [1, 7])
    # For a cache whose rows must stay aligned: the smallest count; a row that kept more emits its
    # (accepted) draft there, the full model's token at that position.
    _check(acc.shortest(torch.cat([torch.tensor([[9], [9]]), batch.drafts], 1)), 1, [6, 7])
    # No drafts at all (a drafter with nothing to propose): the full model's next token.
    _check(verified.accept(_verify([[]], [[4]]), GREEDY), 0, [4])


def test_tree_keeps_a_side_draft_and_says_where_it_sits():
    verified = Verified(draft_len=1, width=3)
    # Fed: [pending, d1=3, side 4, side 6]; the full model's first-slot token is 4: side draft 1 (position 2).
    _check(verified.accept(_verify([[3]], [[4, 0, 5, 0]], side=[[4, 6]]), GREEDY), 1, [5], path=[[2]])
    # Two rows: one keeps the chain's draft (position 1), the other its second side draft (position 3).
    acc = verified.accept(_verify([[3], [3]], [[3, 2, 0, 0], [6, 0, 0, 7]], side=[[4, 6], [4, 6]]), GREEDY)
    _check(acc, 1, [2, 7], path=[[1], [3]])
    # No candidate matches in one row: nothing kept there, the full model's first-slot token; the other
    # row keeps its chain draft and the token after it.
    _check(verified.accept(_verify([[3], [3]], [[3, 1, 1, 1], [5, 1, 1, 1]], side=[[4, 6], [4, 6]]), GREEDY),
           [1, 0], [1, 5])
    # Aligned rows: the smallest count (0), and the first row emits its kept draft 3 at the first slot.
    acc = verified.accept(_verify([[3], [3]], [[3, 1, 1, 1], [6, 0, 0, 7]], side=[[4, 6], [4, 6]]), GREEDY)
    _check(acc, 1, [1, 7], path=[[1], [3]])
    fed = torch.tensor([[9, 3, 4, 6], [9, 3, 4, 6]])
    _check(verified.accept(_verify([[3], [3]], [[3, 1, 1, 1], [5, 1, 1, 1]], side=[[4, 6], [4, 6]]), GREEDY)
           .shortest(fed), 0, [3, 5])
    _check(acc.shortest(fed), 1, [1, 7], path=[[1], [3]])
    # Every row on the chain: the drafts behind the first are checked as a chain (here all kept: bonus).
    chain = Verified(draft_len=2, width=2)
    _check(chain.accept(_verify([[3, 5]], [[3, 5, 2, 0]], side=[[4]]), GREEDY), 2, [2])


def test_adaptive_drafts_only_when_every_row_is_confident():
    adaptive = Adaptive(threshold=0.6)
    sure, unsure = torch.tensor([[4.0, 0, 0, 0]]), torch.tensor([[0.5, 0, 0, 0]])  # top-1 p = 0.95 and 0.37
    assert adaptive.draft_len(sure) == 1 and adaptive.draft_len(unsure) == 0
    assert adaptive.draft_len(torch.cat([sure, unsure])) == 0
    assert Adaptive(0.0).draft_len(unsure) == 1 and Adaptive(1.0).draft_len(sure) == 0
    with pytest.raises(ValueError, match=r"adaptive threshold must be in \[0, 1\]"):
        Adaptive(1.5)


def test_unchecked_strategies_keep_every_draft():
    # Alternating (and adaptive when confident) emit the drafter's token unchecked, then the full model's.
    _check(Alternating().accept(_verify([[3]], [[6]]), GREEDY), 1, [6])
    _check(Standard().accept(_verify([[]], [[2]]), GREEDY), 0, [2])
    assert Standard().draft_len(None) == 0 and Alternating().draft_len(None) == 1


def test_sampled_acceptance_of_a_one_hot_draft_keeps_the_full_models_distribution():
    """A deterministic drafter (prompt lookup) reports one-hot q: the speculative-sampling test and its
    residual then emit each row's token with the full model's probabilities."""
    rows = 20000
    p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0, 0, 0, 0])
    logits = p.clamp_min(1e-12).log().expand(rows, 2, V)  # the position after the draft: p again
    drafts = torch.full((rows, 1), 1)  # the drafter proposes token 1 every time
    q = torch.nn.functional.one_hot(drafts, V).float()
    acc = Verified(draft_len=1).accept(Verify(drafts, q, logits, torch.zeros(rows, V, dtype=torch.bool)),
                                       Sampler(SamplingConfig(temperature=1.0, seed=0)))
    # A row that kept the draft emits it, then draws the next token from p; a row that rejected it draws
    # from the residual. Either way the first token is distributed as p.
    first = torch.where(acc.n == 1, drafts[:, 0], acc.token)
    freq = torch.bincount(first, minlength=V) / rows
    assert 0.5 * (freq - p).abs().sum() < 0.02
    assert abs(float((acc.n == 1).float().mean()) - 0.3) < 0.02  # kept with probability p(1) / q(1) = 0.3
    # Rows aligned to the smallest count (0): a row that kept token 1 emits it at the first slot; still p.
    aligned = acc.shortest(torch.cat([drafts, drafts], 1))
    assert aligned.n.tolist() == [0] * rows
    freq = torch.bincount(aligned.token, minlength=V) / rows
    assert 0.5 * (freq - p).abs().sum() < 0.02


def test_what_each_strategy_asks_for():
    assert STRATEGIES["lookup"] is Lookup and list(STRATEGIES)[:4] == ["standard", "alternating", "verified",
                                                                        "adaptive"]
    cases = [(make_strategy("standard"), None, 0), (make_strategy("alternating"), "module", 1),
             (make_strategy("adaptive", threshold=0.3), "module", 1), (make_strategy("verified"), "module", 1),
             (make_strategy("verified", 3, width=4), "module", 6), (make_strategy("lookup"), "lookup", 10),
             (make_strategy("lookup", 4), "lookup", 4), (make_strategy("verified", 2, drafter="lookup"), "lookup", 2)]
    for strategy, drafter, most in cases:
        assert strategy.drafter == drafter and strategy.max_drafts == most, strategy.name
        assert strategy.uses_module == (drafter == "module")
    assert make_strategy("lookup").draft_len(None) == LOOKUP_DRAFT_LEN
    assert make_strategy("verified", drafter="lookup").name == "lookup"
    assert make_strategy("verified", 3, width=4).tree.depth.tolist() == [0, 1, 2, 3, 1, 1, 1]


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("fastest",), {}, "known strategies: standard, alternating, verified, adaptive, lookup, speed"),
        (("verified", 0), {}, "draft_len must be >= 1, got 0"),
        (("lookup", 0), {}, "draft_len must be >= 1, got 0"),
        (("verified", 1, 0.5, 0), {}, "draft width must be >= 1, got 0"),
        (("lookup", 4, 0.5, 2), {}, "a draft width above 1 needs the module drafter"),
        (("adaptive",), {"drafter": "lookup"}, "strategy 'adaptive' takes no drafter"),
        (("speed",), {"width": 0}, "speculation width must be >= 1, got 0"),
        (("speed",), {"exit_layer": 0}, "early exit layer must be >= 1, got 0"),
    ],
)
def test_bad_strategy_settings_are_clear_errors(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_strategy(*args, **kwargs)
