"""Decoding strategies. Each decides only what one cycle of the decode loop does:

1. how many tokens the module drafts this cycle (``draft_len``), and which other candidates for the
   first draft's position it sends along (``side_drafts``; the full call then runs as a ``Tree``), and
2. given the full model's logits over [pending token, drafts..., side drafts...], which drafts to
   keep and which token the full model contributes (``accept``).

The loop in ``generate.py`` owns caches, rollback, stop criteria and stats. The number of kept drafts
is one integer for the whole batch, so every row's caches stay the same length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recyclegpt.cache import Tree
from recyclegpt.sampling import Sampler, accept_draft, residual_distribution


@dataclass
class Verify:
    """What a strategy sees after the full model scored the pending token and the drafts.

    Attributes:
        drafts: (B, k) the module's draft tokens.
        draft_probs: (B, k, V) the distributions they were drawn from (after sampling filters);
            (B, k, 0) when nothing reads them (greedy decoding, or a strategy that checks no draft).
        target_logits: (B, 1+k+s, V) full-model logits; position j <= k predicts the token after
            draft j (position 0 predicts the first draft's slot), position k+i the token after side
            draft i. For a strategy that checks no draft (``checks_drafts`` False) only the last
            position's logits are computed: (B, 1, V).
        seen: (B, V) tokens already in the context (for the repetition penalty), drafts excluded.
        side: (B, s) other candidates for the first draft's slot (empty without a tree).
    """

    drafts: torch.Tensor
    draft_probs: torch.Tensor
    target_logits: torch.Tensor
    seen: torch.Tensor
    side: torch.Tensor | None = None


class Strategy:
    """Base class: plain decoding, no drafts."""

    name = "standard"
    uses_module = False

    tree: Tree | None = None  # the full call's layout when side drafts go along; None: a sequence
    # Whether ``accept`` reads the full model's logits at every new position. When it does not, the
    # full call computes its head for the last position only (the head is the largest matrix of a
    # small model: a second row of it cost 0.4 ms, 5 % of a step, for paper_small's model on the EPYC).
    checks_drafts = False

    def draft_len(self, draft_logits: torch.Tensor | None) -> int:
        """Drafts to make this cycle, given the module's raw logits (B, V) for the first one."""
        return 0

    def side_drafts(self, first_logits: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """Other candidates (B, s) for the first draft's slot, given the module's logits for it and
        the first draft (B,). The loop asks only strategies that set ``tree``."""
        raise NotImplementedError(f"strategy {self.name!r} lays out no tree, so it has no side drafts")

    def accept(self, v: Verify, sampler: Sampler) -> tuple[int, torch.Tensor, torch.Tensor | None]:
        """(drafts kept n, next token (B,) chosen from the full model's distribution after them, path).

        ``path`` (B, n) gives, per row, the positions of the kept drafts among the full call's new
        tokens (the pending token is 0); None means the first n chained drafts (positions 1..n).
        """
        seen = _with(v.seen, v.drafts)
        return v.drafts.shape[1], sampler.token(v.target_logits[:, -1], seen), None


class Standard(Strategy):
    """Plain autoregressive decoding on the same engine: the baseline of every speed ratio."""


class Alternating(Strategy):
    """The paper's scheme: full model, module, full model... The module's token is never checked.

    Each full call ingests two tokens (its own last choice and the module's), so it runs about half
    as often as in standard decoding. Lossy by design.
    """

    name = "alternating"
    uses_module = True

    def draft_len(self, draft_logits: torch.Tensor | None) -> int:
        return 1


class Adaptive(Alternating):
    """Alternating, but a cycle uses the module's token only when the module is confident.

    Args:
        threshold: minimum module probability (softmax at temperature 1) of its top token, for every
            row of the batch; 0 behaves as ``alternating``, above 1 as ``standard``.
    """

    name = "adaptive"

    def __init__(self, threshold: float = 0.5) -> None:
        if not 0 <= threshold <= 1:
            raise ValueError(f"adaptive threshold must be in [0, 1], got {threshold}")
        self.threshold = threshold

    def draft_len(self, draft_logits: torch.Tensor | None) -> int:
        conf = draft_logits.float().softmax(-1).max(-1).values
        return int(bool((conf >= self.threshold).all()))


class Verified(Strategy):
    """Lossless: keep a draft only if the full model would have produced it.

    Greedy: a draft is kept while it equals the full model's argmax; the first mismatch is replaced by
    the full model's token (plus the bonus token when every draft is kept). Sampling: the
    speculative-sampling test, so outputs are distributed exactly as the base model's. For a batch,
    the rows keep the smallest accepted count; a row that would have kept more samples its next token
    from the full model's distribution instead, which is still exact.

    With ``width`` w > 1 the full call also checks the module's next w - 1 most likely tokens for
    the first draft's slot, side by side (a ``Tree``: each candidate sees the context, not the other
    candidates). On a CPU where a call over a few tokens costs what a call over one does, this keeps
    a first draft far more often for little extra time. The first slot is then decided by drawing the
    full model's own token there (argmax when greedy) and keeping the candidate equal to it, which is
    exact for greedy and sampled decoding alike; the chain behind the first draft is checked as above.

    Args:
        draft_len: module steps per cycle (k >= 1); steps after the first feed the module its own
            output state in place of the backbone's hidden state.
        width: candidates for the first draft's slot (w >= 1; 1 is a plain chain).
    """

    name = "verified"
    uses_module = True
    checks_drafts = True

    def __init__(self, draft_len: int = 1, width: int = 1) -> None:
        if draft_len < 1:
            raise ValueError(f"draft_len must be >= 1, got {draft_len}")
        if width < 1:
            raise ValueError(f"draft width must be >= 1, got {width}")
        self.k, self.width = draft_len, width
        if width > 1:  # [pending, d_1 .. d_k, side_1 .. side_{w-1}]: side drafts hang off the pending token
            self.tree = Tree.from_parents([-1, *range(draft_len), *[0] * (width - 1)])

    def draft_len(self, draft_logits: torch.Tensor | None) -> int:
        return self.k

    def side_drafts(self, first_logits: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        others = first_logits.float().scatter(1, first[:, None], float("-inf"))  # the first draft is in the chain
        return others.topk(self.width - 1, -1).indices  # (B, w-1)

    def accept(self, v: Verify, sampler: Sampler) -> tuple[int, torch.Tensor, torch.Tensor | None]:
        if v.side is None:
            n, token = self._accept_chain(v, sampler)
            return n, token, None
        # 1. The first slot: the full model's own token there, matched against every candidate.
        B, k = v.drafts.shape
        y = sampler.token(v.target_logits[:, 0], v.seen)  # (B,)
        cands = torch.cat([v.drafts[:, :1], v.side], 1)  # (B, w)
        hit = cands == y[:, None]
        if not bool(hit.any(-1).all()):  # some row kept no candidate: y is its exact next token
            return 0, y, None
        col = hit.int().argmax(-1)  # (B,) the matching candidate (0 = the chain's first draft)
        # 2. Every row on the chain: check the drafts behind the first as a chain of k - 1 (for k = 1
        # an empty chain, which gives the bonus token).
        if bool((col == 0).all()):
            rest = Verify(v.drafts[:, 1:], v.draft_probs[:, 1:], v.target_logits[:, 1 : k + 1],
                          _with(v.seen, v.drafts[:, :1]))
            n, token = self._accept_chain(rest, sampler)
            return n + 1, token, None
        # 3. Some row kept a side draft: one draft kept per row; the next token from the full model
        # after each row's kept candidate (not tested further, so drawn from p: exact).
        path = torch.where(col == 0, 1, k + col)[:, None]  # (B, 1) position of the kept candidate
        logits = v.target_logits.gather(1, path[:, :, None].expand(-1, 1, v.target_logits.shape[-1]))[:, 0]
        seen = _with(v.seen, y[:, None])
        return 1, sampler.token(logits, seen), path

    def _accept_chain(self, v: Verify, sampler: Sampler) -> tuple[int, torch.Tensor]:
        """Verify a plain chain of drafts (the tests above), returning (drafts kept, next token)."""
        B, k = v.drafts.shape
        rejected_at = torch.full((B,), k, dtype=torch.long, device=v.drafts.device)
        picked = []  # per draft: the full model's token there (greedy) or its distribution (sampling)
        for j in range(k):
            seen = _with(v.seen, v.drafts[:, :j])
            if sampler.cfg.greedy:
                picked.append(sampler.token(v.target_logits[:, j], seen))
                ok = picked[-1] == v.drafts[:, j]
            else:
                picked.append(sampler.probs(v.target_logits[:, j], seen))
                ok = accept_draft(picked[-1], v.draft_probs[:, j], v.drafts[:, j], sampler.uniform(B))
            rejected_at = torch.where((~ok) & (rejected_at == k), j, rejected_at)
        n = int(rejected_at.min())
        if n == k:  # every row kept every draft: the bonus token
            return n, sampler.token(v.target_logits[:, k], _with(v.seen, v.drafts))
        if sampler.cfg.greedy:
            return n, picked[n]
        # Rows rejected at n resample from the residual; rows that accepted beyond n from p.
        p = picked[n]
        resid = residual_distribution(p, v.draft_probs[:, n])
        return n, sampler.choose(torch.where((rejected_at == n)[:, None], resid, p))


STRATEGIES = {"standard": Standard, "alternating": Alternating, "verified": Verified, "adaptive": Adaptive}


def make_strategy(name: str, draft_len: int = 1, threshold: float = 0.5, width: int = 1) -> Strategy:
    """Build a strategy by name; unknown names list the known ones."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known strategies: {', '.join(STRATEGIES)}")
    if name == "verified":
        return Verified(draft_len, width)
    if name == "adaptive":
        return Adaptive(threshold)
    return STRATEGIES[name]()


def _with(seen: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``seen`` (B, V) with ``tokens`` (B, n) marked too (a copy when n > 0)."""
    if tokens.shape[1] == 0:
        return seen
    return seen.clone().scatter_(1, tokens, True)
