"""Decoding strategies. Each decides only what one cycle of the decode loop does:

1. how many tokens the module drafts this cycle (``draft_len``), and
2. given the full model's logits over [pending token, drafts...], how many drafts to keep and which
   token the full model contributes (``accept``).

The loop in ``generate.py`` owns caches, rollback, stop criteria and stats. The number of kept drafts
is one integer for the whole batch, so every row's caches stay the same length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recyclegpt.sampling import Sampler, accept_draft, residual_distribution


@dataclass
class Verify:
    """What a strategy sees after the full model scored the pending token and the drafts.

    Attributes:
        drafts: (B, k) the module's draft tokens.
        draft_probs: (B, k, V) the distributions they were drawn from (after sampling filters).
        target_logits: (B, k+1, V) full-model logits; position j predicts the token after draft j
            (position 0 predicts the first draft's slot).
        seen: (B, V) tokens already in the context (for the repetition penalty), drafts excluded.
    """

    drafts: torch.Tensor
    draft_probs: torch.Tensor
    target_logits: torch.Tensor
    seen: torch.Tensor


class Strategy:
    """Base class: plain decoding, no drafts."""

    name = "standard"
    uses_module = False

    def draft_len(self, draft_logits: torch.Tensor | None) -> int:
        """Drafts to make this cycle, given the module's raw logits (B, V) for the first one."""
        return 0

    def accept(self, v: Verify, sampler: Sampler) -> tuple[int, torch.Tensor]:
        """(drafts kept, next token (B,) chosen from the full model's distribution after them)."""
        n = v.drafts.shape[1]
        seen = _with(v.seen, v.drafts)
        return n, sampler.choose(sampler.probs(v.target_logits[:, n], seen))


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

    Args:
        draft_len: module steps per cycle (k >= 1); steps after the first feed the module its own
            output state in place of the backbone's hidden state.
    """

    name = "verified"
    uses_module = True

    def __init__(self, draft_len: int = 1) -> None:
        if draft_len < 1:
            raise ValueError(f"draft_len must be >= 1, got {draft_len}")
        self.k = draft_len

    def draft_len(self, draft_logits: torch.Tensor | None) -> int:
        return self.k

    def accept(self, v: Verify, sampler: Sampler) -> tuple[int, torch.Tensor]:
        B, k = v.drafts.shape
        rejected_at = torch.full((B,), k, dtype=torch.long, device=v.drafts.device)
        p_all = []
        for j in range(k):
            p = sampler.probs(v.target_logits[:, j], _with(v.seen, v.drafts[:, :j]))
            p_all.append(p)
            if sampler.cfg.greedy:
                ok = p.argmax(-1) == v.drafts[:, j]
            else:
                ok = accept_draft(p, v.draft_probs[:, j], v.drafts[:, j], sampler.uniform(B))
            rejected_at = torch.where((~ok) & (rejected_at == k), j, rejected_at)
        n = int(rejected_at.min())
        if n == k:  # every row kept every draft: the bonus token
            seen = _with(v.seen, v.drafts)
            return n, sampler.choose(sampler.probs(v.target_logits[:, k], seen))
        p = p_all[n]
        if not sampler.cfg.greedy:
            # Rows rejected at n resample from the residual; rows that accepted beyond n from p.
            resid = residual_distribution(p, v.draft_probs[:, n])
            p = torch.where((rejected_at == n)[:, None], resid, p)
        return n, sampler.choose(p)


STRATEGIES = {"standard": Standard, "alternating": Alternating, "verified": Verified, "adaptive": Adaptive}


def make_strategy(name: str, draft_len: int = 1, threshold: float = 0.5) -> Strategy:
    """Build a strategy by name; unknown names list the known ones."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known strategies: {', '.join(STRATEGIES)}")
    if name == "verified":
        return Verified(draft_len)
    if name == "adaptive":
        return Adaptive(threshold)
    return STRATEGIES[name]()


def _with(seen: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``seen`` (B, V) with ``tokens`` (B, n) marked too (a copy when n > 0)."""
    if tokens.shape[1] == 0:
        return seen
    return seen.clone().scatter_(1, tokens, True)
