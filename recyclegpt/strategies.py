"""Decoding strategies. Each decides only what one cycle of the decode loop asks for and keeps:

1. which drafter proposes (``drafter``: the recyclable module, prompt lookup, none), how many drafts to
   ask for this cycle (``draft_len``) and how many candidates for the first draft's slot (``width``;
   the full call then runs as a ``Tree``), and
2. given the full model's logits over [pending token, drafts..., side drafts...], which drafts to
   keep and which token the full model contributes (``accept``, an ``Accepted``).

The drafter (``drafters.py``) owns the drafts' state; the loop in ``generate.py`` owns the backbone's
cache, rollback, stop criteria and stats. Each row keeps its own number of drafts (the caches hold
rows of different lengths, ``cache.KVCache.commit_rows``); a cache that cannot
(``Accepted.shortest``) has every row keep the batch's smallest number, still exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from recyclegpt.cache import Tree
from recyclegpt.drafters import EarlyExitDrafter
from recyclegpt.sampling import Sampler, accept_draft, residual_distribution

LOOKUP_DRAFT_LEN = 10  # prompt lookup's default drafts per cycle (transformers' prompt_lookup_num_tokens)


@dataclass
class Verify:
    """What a strategy sees after the full model scored the pending token and the drafts.

    Attributes:
        drafts: (B, k) the drafter's tokens (k may be fewer than asked for, down to 0).
        draft_probs: (B, k, V) the distributions they were drawn from (after sampling filters);
            (B, k, 0) when nothing reads them (greedy decoding, or a strategy that checks no draft).
        target_logits: (B, 1+k+s, V) full-model logits; position j <= k predicts the token after
            draft j (position 0 predicts the first draft's slot), position k+i the token after side
            draft i. For a strategy that checks no draft (``checks_drafts`` False) only the last
            position's logits are computed: (B, 1, V).
        seen: (B, V) tokens already in the context (for the repetition penalty), drafts excluded.
        side: (B, s) other candidates for the first draft's slot (None without a tree).
    """

    drafts: torch.Tensor
    draft_probs: torch.Tensor
    target_logits: torch.Tensor
    seen: torch.Tensor
    side: torch.Tensor | None = None


@dataclass(frozen=True)
class Accepted:
    """A strategy's verdict on one cycle.

    Attributes:
        n: (B,) drafts kept per row.
        token: (B,) the full model's token after them (sampled from its distribution there, or the
            residual after a rejected sampled draft).
        path: (B, max n) per row, the positions of the kept drafts among the full call's new tokens (the
            pending token is 0; a side draft i sits at k + i; entries past a row's n are unused); None
            means the first n chained drafts (positions 1 .. n).
    """

    n: torch.Tensor
    token: torch.Tensor
    path: torch.Tensor | None = None

    def shortest(self, fed: torch.Tensor) -> Accepted:
        """The same verdict with every row keeping the batch's smallest count m, for caches whose rows
        must stay the same length. ``fed`` (B, T) are the full call's new tokens.

        A row that kept more than m emits its kept draft at m as the full model's token there. That is
        still exact: greedily it is the full model's argmax; sampled, it passed the speculative test,
        which makes it distributed as the full model's token (a fresh draw from p after a pass would
        count p's share min(p, q) twice).
        """
        m = int(self.n.min())
        if m == int(self.n.max()):
            return self
        at = (torch.full_like(self.n, m + 1) if self.path is None else self.path[:, m])[:, None]
        token = torch.where(self.n > m, fed.gather(1, at)[:, 0], self.token)
        return Accepted(torch.full_like(self.n, m), token, None if self.path is None else self.path[:, :m])


class Strategy:
    """Base class: plain decoding, no drafts.

    Attributes:
        name: the name ``make_strategy`` knows it by.
        drafter: which drafter proposes (``drafters.make_drafter``): ``"module"``, ``"lookup"``, None
            (no drafts) or a factory ``(backbone, module) -> Drafter``.
        width: candidates asked for the first draft's slot (1: a plain chain).
        tree: the full call's layout when side drafts go along; None: a sequence.
        checks_drafts: whether ``accept`` reads the full model's logits at every new position. When it
            does not, the full call computes its head for the last position only (the head is the
            largest matrix of a small model: a second row of it cost 0.4 ms, 5 % of a step, for
            paper_small's model on the EPYC).
    """

    name = "standard"
    drafter: str | Callable | None = None
    width = 1
    tree: Tree | None = None
    checks_drafts = False

    @property
    def uses_module(self) -> bool:
        """Whether decoding needs the engine's recyclable module."""
        return self.drafter == "module"

    @property
    def max_drafts(self) -> int:
        """The most tokens a cycle feeds the full model beside the pending one (drafts and side drafts);
        the loop sizes the caches with it."""
        return 0

    def draft_len(self, first_logits: torch.Tensor | None) -> int:
        """Drafts to ask for this cycle, given the drafter's logits (B, V) for the first one (None for a
        drafter without a distribution)."""
        return 0

    def accept(self, v: Verify, sampler: Sampler) -> Accepted:
        """Which drafts to keep, and the full model's token after them."""
        B, k = v.drafts.shape
        n = torch.full((B,), k, dtype=torch.long, device=v.drafts.device)
        return Accepted(n, sampler.token(v.target_logits[:, -1], _with(v.seen, v.drafts)))


class Standard(Strategy):
    """Plain autoregressive decoding on the same engine: the baseline of every speed ratio."""


class Alternating(Strategy):
    """The paper's scheme: full model, module, full model... The module's token is never checked.

    Each full call ingests two tokens (its own last choice and the module's), so it runs about half
    as often as in standard decoding. Lossy by design.
    """

    name = "alternating"
    drafter = "module"

    @property
    def max_drafts(self) -> int:
        return 1

    def draft_len(self, first_logits: torch.Tensor | None) -> int:
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

    def draft_len(self, first_logits: torch.Tensor | None) -> int:
        conf = first_logits.float().softmax(-1).max(-1).values
        return int(bool((conf >= self.threshold).all()))


class Verified(Strategy):
    """Lossless: keep a draft only if the full model would have produced it.

    Greedy: a draft is kept while it equals the full model's argmax; the first mismatch is replaced by
    the full model's token (plus the bonus token when every draft is kept). Sampling: the
    speculative-sampling test, so outputs are distributed exactly as the base model's. In a batch
    each row keeps its own drafts.

    The drafts come from the recyclable module by default, or from any other drafter (``drafter``;
    ``Lookup`` is this strategy with prompt lookup): exactness needs only that the drafts were drawn
    from the distributions the drafter reports (one-hot for a deterministic drafter).

    With ``width`` w > 1 the full call also checks the module's next w - 1 most likely tokens for
    the first draft's slot, side by side (a ``Tree``: each candidate sees the context, not the other
    candidates). On a CPU where a call over a few tokens costs what a call over one does, this keeps
    a first draft far more often for little extra time. The first slot is then decided by drawing the
    full model's own token there (argmax when greedy) and keeping the candidate equal to it, which is
    exact for greedy and sampled decoding alike; the chain behind the first draft is checked as above.

    Args:
        draft_len: drafts asked for per cycle (k >= 1); the module's steps after the first feed it its
            own output state in place of the backbone's hidden state.
        width: candidates for the first draft's slot (w >= 1; 1 is a plain chain; above 1 needs the
            module drafter, whose next most likely tokens they are).
        drafter: ``"module"``, ``"lookup"`` or a factory ``(backbone, module) -> Drafter``.
    """

    name = "verified"
    checks_drafts = True

    def __init__(self, draft_len: int = 1, width: int = 1, drafter: str | Callable = "module") -> None:
        if draft_len < 1:
            raise ValueError(f"draft_len must be >= 1, got {draft_len}")
        if width < 1:
            raise ValueError(f"draft width must be >= 1, got {width}")
        if width > 1 and drafter != "module":
            raise ValueError(f"a draft width above 1 needs the module drafter (its side candidates are the "
                             f"module's next most likely tokens), not {drafter!r}; use a draft width of 1")
        self.k, self.width, self.drafter = draft_len, width, drafter
        if width > 1:  # [pending, d_1 .. d_k, side_1 .. side_{w-1}]: side drafts hang off the pending token
            self.tree = Tree.from_parents([-1, *range(draft_len), *[0] * (width - 1)])

    @property
    def max_drafts(self) -> int:
        return self.k + self.width - 1

    def draft_len(self, first_logits: torch.Tensor | None) -> int:
        return self.k

    def accept(self, v: Verify, sampler: Sampler) -> Accepted:
        if v.side is None:
            return Accepted(*self._accept_chain(v, sampler))
        # 1. The first slot: the full model's own token there, matched against every candidate.
        B, k = v.drafts.shape
        y = sampler.token(v.target_logits[:, 0], v.seen)  # (B,)
        hit = torch.cat([v.drafts[:, :1], v.side], 1) == y[:, None]  # (B, w)
        col = torch.where(hit.any(-1), hit.int().argmax(-1), -1)  # the matching candidate (0: the chain's)
        n, token = torch.zeros_like(y), y  # a row that kept no candidate: y is its exact next token
        # 2. Rows on the chain: check the drafts behind the first as a chain of k - 1 (for k = 1 an empty
        # chain, which gives the bonus token).
        if bool((col == 0).any()):
            rest = Verify(v.drafts[:, 1:], v.draft_probs[:, 1:], v.target_logits[:, 1 : k + 1],
                          _with(v.seen, v.drafts[:, :1]))
            n_chain, after = self._accept_chain(rest, sampler)
            n, token = torch.where(col == 0, n_chain + 1, n), torch.where(col == 0, after, token)
        if not bool((col > 0).any()):
            return Accepted(n, token)
        # 3. Rows that kept a side draft: one draft kept; the next token from the full model after it
        # (not tested further, so drawn from p: exact).
        side = col > 0
        at = torch.where(side, k + col, 1)  # (B,) the kept candidate's position
        logits = v.target_logits.gather(1, at[:, None, None].expand(-1, 1, v.target_logits.shape[-1]))[:, 0]
        after = sampler.token(logits, _with(v.seen, y[:, None]))
        width = int(torch.where(side, 1, n).max())
        path = torch.arange(1, width + 1, device=y.device).repeat(B, 1)
        path[:, 0] = at
        return Accepted(torch.where(side, 1, n), torch.where(side, after, token), path)

    def _accept_chain(self, v: Verify, sampler: Sampler) -> tuple[torch.Tensor, torch.Tensor]:
        """Verify a plain chain of drafts (the tests above), returning per row (drafts kept, next token).

        A private step of ``accept`` (a plain pair, which tests replace to break verification on purpose)."""
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
        n = rejected_at
        rows = torch.arange(B, device=n.device)
        if sampler.cfg.greedy:  # the full model's token where each row stopped (the bonus token after all k)
            bonus = [sampler.token(v.target_logits[:, k], _with(v.seen, v.drafts))] if bool((n == k).any()) else []
            return n, torch.stack([*picked, *bonus], 1)[rows, n.clamp(max=len(picked) + len(bonus) - 1)]
        # A row rejected at j draws from the residual there; a row that kept all k from p after them.
        dists = [residual_distribution(p, v.draft_probs[:, j]) for j, p in enumerate(picked)]
        if bool((n == k).any()):
            dists.append(sampler.probs(v.target_logits[:, k], _with(v.seen, v.drafts)))
        return n, sampler.choose(torch.stack(dists, 1)[rows, n.clamp(max=len(dists) - 1)])


class Lookup(Verified):
    """Verified decoding with prompt-lookup drafts (``drafters.PromptLookupDrafter``): no module needed.

    Each cycle proposes the ``draft_len`` tokens that followed the latest earlier occurrence of the
    context's last 3 (else 2, else 1) tokens (none without a match: a plain step), and the full model
    checks them; exact like ``Verified``. It pays where the output repeats its context (quoting,
    editing code, summaries, loops).

    Args:
        draft_len: drafts asked for per cycle (k >= 1; default ``LOOKUP_DRAFT_LEN``).
        width: must be 1 (prompt lookup proposes no side candidates); taken so ``make_strategy``'s
            arguments validate alike for every strategy.
    """

    name = "lookup"

    def __init__(self, draft_len: int = LOOKUP_DRAFT_LEN, width: int = 1) -> None:
        super().__init__(draft_len, width, "lookup")


SPEED_WIDTH = 3  # tokens ``speed`` speculates per call by default (experiments/speed_small)


class Speed(Strategy):
    """SPEED (Hooper et al., arXiv 2310.12072): speculative pipelined execution from an early exit.

    Each full call finishes the pending token's layers while the token after it, speculated from the pending
    token's state after ``exit_layer`` layers, runs its first layers in the same call
    (``drafters.EarlyExitDrafter``, ``model.Backbone.wavefront``). Every cycle emits the full model's own token,
    greedy or sampled, so the output equals standard decoding's; a wrong speculation only costs its work and
    a call over the first layers of the right token. It pays on a model whose blocks are shared across depth
    (``ModelConfig.n_unique_layers``): the pending token's late layers and the speculated token's early layers
    run the same blocks, whose weights one product reads for both. On an unshared model it is early-exit
    self-speculation with no such saving.

    Args:
        exit_layer: the logical layer speculation reads (None: the drafter's default, ``default_exit_layer``).
        width: candidates speculated per call (the early exit's most likely tokens, run side by side).
            On the small models of experiments/speed_small, trained with the early-exit loss, the exit's top
            token was the model's 86-87 % of the time on held-out text and its top 3 99 %: the wider call
            costs little and saves most catch-ups.
    """

    name = "speed"

    def __init__(self, exit_layer: int | None = None, width: int = SPEED_WIDTH) -> None:
        if width < 1:
            raise ValueError(f"speculation width must be >= 1, got {width}")
        if exit_layer is not None and exit_layer < 1:
            raise ValueError(f"early exit layer must be >= 1, got {exit_layer}")
        self.exit_layer, self.width = exit_layer, width
        self.drafter = functools.partial(_early_exit_drafter, exit_layer=exit_layer, width=width)

    @property
    def max_drafts(self) -> int:
        return self.width  # the candidates' slots after the pending token's


def _early_exit_drafter(backbone: torch.nn.Module, module: torch.nn.Module | None, exit_layer: int | None,
                        width: int) -> EarlyExitDrafter:
    """``Speed``'s drafter factory (the module is not used)."""
    return EarlyExitDrafter(backbone, exit_layer, width)


STRATEGIES = {"standard": Standard, "alternating": Alternating, "verified": Verified, "adaptive": Adaptive,
              "lookup": Lookup,
              "speed": Speed}


def make_strategy(name: str, draft_len: int | None = None, threshold: float = 0.5, width: int | None = None,
                  drafter: str | Callable | None = None, exit_layer: int | None = None) -> Strategy:
    """Build a strategy by name; unknown names list the known ones.

    Args:
        name: a key of ``STRATEGIES``.
        draft_len: drafts per cycle for ``verified`` (default 1) and ``lookup`` (default
            ``LOOKUP_DRAFT_LEN``); None: the strategy's default.
        threshold: the module confidence ``adaptive`` needs.
        width: candidates for the first draft's slot (``verified`` with the module drafter; default 1); ``speed``:
            tokens speculated per call (default ``SPEED_WIDTH``).
        drafter: for ``verified``, the drafter (``"module"``, the default, ``"lookup"`` or a factory);
            ``make_strategy("verified", drafter="lookup")`` is ``make_strategy("lookup")``.
        exit_layer: for ``speed``, the logical layer speculation reads (None: its default).

    Raises:
        ValueError: an unknown name, a setting out of range, or a drafter for a strategy that takes none.
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known strategies: {', '.join(STRATEGIES)}")
    if exit_layer is not None and name != "speed":
        raise ValueError(f"an early exit layer is a setting of strategy 'speed', not {name!r}")
    if drafter is not None and name != "verified":
        raise ValueError(f"strategy {name!r} takes no drafter; give one to 'verified'")
    if name == "lookup" or (name == "verified" and drafter == "lookup"):
        return Lookup(LOOKUP_DRAFT_LEN if draft_len is None else draft_len, 1 if width is None else width)
    if name == "verified":
        return Verified(1 if draft_len is None else draft_len, 1 if width is None else width, drafter or "module")
    if name == "adaptive":
        return Adaptive(threshold)
    if name == "speed":
        return Speed(exit_layer, SPEED_WIDTH if width is None else width)
    return STRATEGIES[name]()


def _with(seen: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``seen`` (B, V) with ``tokens`` (B, n) marked too (a copy when n > 0)."""
    if tokens.shape[1] == 0:
        return seen
    return seen.clone().scatter_(1, tokens, True)
