"""Drafters: the sources of draft tokens the decode loop verifies (or, for lossy strategies, emits).

A drafter proposes tokens and owns whatever state it needs to do so (a model cache, an n-gram index);
the strategy (``strategies.py``) decides how many drafts to ask for and which to keep; the loop
(``generate.py``) owns the backbone's cache, stop criteria and stats. One cycle of the loop reads::

    k = strategy.draft_len(drafter.first_logits())
    proposal = drafter.propose(k, sampler, seen, width, keep_probs)     # (B, k') drafts, k' <= k
    fed, logits, hidden = drafter.full_call(backbone, cache, pending, proposal, ...)  # [pending, drafts]
    ... strategy.accept(...) keeps n drafts + 1 token ...
    drafter.commit(new, hidden_of_new, counts, emitted)                 # ingest each row's n + 1 real tokens

Between cycles rows may leave (``select``) and join (``extend``: the rows of a drafter started on new
prompts), as the server's batching needs.

Implementations: ``ModuleDrafter`` (the recyclable module, chaining on its own state, with its copy
gate), ``PromptLookupDrafter`` (n-gram lookup in the context, no model), ``NoDrafter`` (plain decoding) and
``EarlyExitDrafter`` (SPEED's speculation from an early layer, which runs the full call itself, the backbone
split by layer: ``Backbone.wavefront``). Another drafter plugs in the same way: pass its factory as a
strategy's drafter (``Verified(draft_len, drafter=factory)``, see ``make_drafter``); the loop does not change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from recyclegpt.copy_gate import CopyIndex, proposal_tensors
from recyclegpt.sampling import Sampler

LOOKUP_NGRAM = 3  # the longest context suffix prompt lookup matches (then 2, then 1)


@dataclass
class Proposal:
    """What a drafter proposes for one cycle.

    Attributes:
        tokens: (B, k') draft tokens, a chain: draft j continues the context and drafts 1 .. j-1, k' <= k
            (a row with fewer drafts fills its chain with guesses, which verification rejects).
        probs: (B, k', V) the distributions the drafts were drawn from (after the sampler's filters),
            for the speculative-sampling test; (B, k', 0) when not asked for (greedy decoding, or a
            strategy that checks no draft). A deterministic drafter gives one-hot rows.
        side: (B, w - 1) other candidates for the first draft's slot, checked beside it as a tree;
            None when none were asked for (width 1) or the drafter has none.
    """

    tokens: torch.Tensor
    probs: torch.Tensor
    side: torch.Tensor | None = None


class Drafter:
    """Interface: proposes draft tokens for the decode loop and owns the state it needs.

    Lifecycle, per batch (a drafter serves one batch; make a new one for the next)::

        start(prompts, tokens, hidden, first, room)    once, after the prefill
        then per cycle: first_logits(), propose(k, ...), and, unless every row has finished,
        commit(new, hidden, counts, emitted); between cycles select(rows), extend(other)

    Between cycles the drafter's view of each row is the prompt plus every token emitted so far (the
    prefill's ``first`` included); drafts not kept must leave no trace after ``commit``.
    """

    calls = 0  # model calls the drafter made (DecodeStats.module_calls)

    def start(self, prompts: Sequence[Sequence[int]], tokens: torch.Tensor, hidden: torch.Tensor,
              first: torch.Tensor, room: int) -> None:
        """Ingest the prompt.

        Args:
            prompts: each row's prompt ids, unpadded.
            tokens: (B, P) the prompts left-padded together, as the backbone saw them.
            hidden: (B, P, d) the backbone's final hidden states over ``tokens``.
            first: (B,) the token the prefill chose after each prompt (emitted by every row).
            room: slots a cache of the drafter's own needs (prompt, new tokens and one cycle's drafts).
        """
        raise NotImplementedError

    def first_logits(self) -> torch.Tensor | None:
        """Logits (B, V) the first draft will be drawn from (log-probabilities for a mixture), for a
        strategy that sizes its request on the drafter's confidence; None for a drafter without a
        distribution. Cheap to call twice in a cycle (computed once)."""
        return None

    def propose(self, k: int, sampler: Sampler, seen: torch.Tensor, width: int = 1,
                keep_probs: bool = False) -> Proposal:
        """Up to ``k`` chained drafts per row (the same count for every row; fewer, or none, when the
        drafter has nothing to propose: the loop then verifies what it got, and 0 is a plain step).

        Args:
            k: drafts wanted.
            sampler: draws the drafts from a drafter's distribution (and its generator keeps seeded
                runs reproducible); a deterministic drafter ignores it.
            seen: (B, V) tokens already in the context, for the repetition penalty.
            width: candidates wanted for the first draft's slot (``width - 1`` side drafts), when k >= 1.
            keep_probs: return the distributions the drafts were drawn from (sampled verification).
        """
        raise NotImplementedError

    def commit(self, tokens: torch.Tensor, hidden: torch.Tensor, counts: torch.Tensor,
               emitted: Sequence[Sequence[int]]) -> None:
        """Ingest what the cycle kept and forget the rest of the proposal.

        Args:
            tokens: (B, m + 1) per row its kept drafts and the full model's token (the first
                ``counts[b]`` entries; the rest unused).
            hidden: (B, m + 1, d) the full call's hidden states at the positions those tokens follow
                (the pending token's, then each kept draft's).
            counts: (B,) real tokens per row (drafts kept + 1).
            emitted: per row, the prefix of its tokens the output kept (shorter once a row stops; empty
                for a finished row): what a drafter reading the context indexes.
        """
        raise NotImplementedError

    def full_call(self, backbone: torch.nn.Module, cache, pending: torch.Tensor, proposal: Proposal, tree,
                  checks_drafts: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cycle's full call: feed [pending, drafts, side drafts] (laid out as ``tree`` when side drafts
        go along) to the backbone, its cache advancing over them. A drafter that runs part of that call itself
        (``EarlyExitDrafter``) overrides it.

        Returns:
            fed (B, T) the tokens fed; logits (B, T or 1, V): at every position when the strategy checks
            drafts (``checks_drafts``), else at the last; hidden (B, T, d).
        """
        side = [] if proposal.side is None else [proposal.side]
        fed = torch.cat([pending[:, None], proposal.tokens, *side], 1)
        layout = {"tree": tree} if side else {}
        logits, hidden = backbone(fed, cache, logits_last=fed.shape[1] if checks_drafts else 1, **layout)
        return fed, logits, hidden

    def select(self, rows: Sequence[int]) -> None:
        """Keep only these rows, in this order."""
        raise NotImplementedError

    def extend(self, other: Drafter) -> None:
        """Append the rows of ``other``, a drafter of the same kind started on new prompts."""
        raise NotImplementedError

    def caches(self) -> list:
        """The drafter's caches that follow the backbone's slot for slot (grown and compacted with it)."""
        return []


class NoDrafter(Drafter):
    """Proposes nothing: plain decoding (the ``standard`` strategy)."""

    def start(self, prompts, tokens, hidden, first, room) -> None:
        pass

    def propose(self, k, sampler, seen, width=1, keep_probs=False) -> Proposal:
        return _nothing(seen)

    def commit(self, tokens, hidden, counts, emitted) -> None:
        pass

    def select(self, rows) -> None:
        pass

    def extend(self, other) -> None:
        pass


class ModuleDrafter(Drafter):
    """The recyclable module: drafts the token after next from (h_t, x_{t+1}), chaining on its own state.

    Cache invariant between cycles: the module cache holds the pairs (h_i, x_{i+1}) for i = 0 .. p-1,
    as long as the backbone's cache (x_0 .. x_{p-1}); its output at pair p-1 gives the first draft's
    distribution, for x_{p+1}. Drafts after the first feed the module its own output state in place of
    h; ``commit`` rolls those chained steps back and ingests the n + 1 real pairs.

    A module with a copy gate (``module.copy_gate``) drafts from the mixture of its distribution with
    the token copied from each row's context (``copy_gate.CopyIndex``, the drafts so far matched as context).

    Args:
        backbone: the backbone (its embedding and head are the module's).
        module: the recyclable module (or any object with its interface: ``new_cache``, ``forward``,
            ``draft_logits`` and optionally ``copy_gate`` / ``copy_logits``).
    """

    def __init__(self, backbone: torch.nn.Module, module: torch.nn.Module) -> None:
        self.backbone, self.module = backbone, module
        self.copying = getattr(module, "copy_gate", None) is not None  # a test stub may have no attribute
        self.calls = 0

    def start(self, prompts, tokens, hidden, first, room) -> None:
        B, P = tokens.shape
        self.cache = self.module.new_cache(B, room)
        pads = [P - len(p) for p in prompts]
        if any(pads):
            self.cache.set_padding(pads)
        self.indices = [CopyIndex([*p, t]) for p, t in zip(prompts, first.tolist(), strict=True)] \
            if self.copying else []
        self._ingest(hidden, torch.cat([tokens[:, 1:], first[:, None]], 1))

    def select(self, rows) -> None:
        idx = torch.tensor(list(rows), dtype=torch.long, device=self._logits.device)
        self.cache.select(rows)
        self.indices = [self.indices[i] for i in rows] if self.copying else []
        self._logits, self._state, self._first = self._logits[idx], self._state[idx], None

    def extend(self, other: ModuleDrafter) -> None:
        self.cache.extend(other.cache)
        self.indices += other.indices
        self._logits, self._first = torch.cat([self._logits, other._logits]), None
        self._state = torch.cat([self._state, other._state])
        self.calls += other.calls

    def caches(self) -> list:
        return [self.cache]

    def first_logits(self) -> torch.Tensor:
        if self._first is None:
            self._first = self._with_copies(self._logits, [])
        return self._first

    def propose(self, k, sampler, seen, width=1, keep_probs=False) -> Proposal:
        logits, drafts, qs, side = self.first_logits(), [], [], None
        self._length = self.cache.length  # where commit rolls the chained drafts' pairs back to
        for j in range(k):
            if j > 0:
                logits = self._with_copies(self._step(self._state, drafts[-1][:, None]), drafts)
            if keep_probs:
                qs.append(sampler.probs(logits, seen))
                drafts.append(sampler.choose(qs[-1]))
            else:
                drafts.append(sampler.token(logits, seen))
            if j == 0 and width > 1:  # the module's next most likely tokens (the first draft is in the chain)
                others = logits.float().scatter(1, drafts[0][:, None], float("-inf"))
                side = others.topk(width - 1, -1).indices  # (B, w-1)
        tokens = torch.stack(drafts, 1) if drafts else seen.new_zeros(seen.shape[0], 0, dtype=torch.long)
        return Proposal(tokens, torch.stack(qs, 1) if qs else _no_probs(tokens), side)

    def commit(self, tokens, hidden, counts, emitted) -> None:
        for index, ids in zip(self.indices, emitted, strict=True) if self.copying else ():
            index.extend(ids)
        self.cache.rollback(self._length)  # forget the chained drafts' pairs
        width = tokens.shape[1]
        short = width - counts  # rows with fewer real pairs put filler (holes) in front of them
        if bool(short.any()):
            at = (torch.arange(width, device=tokens.device)[None] - short[:, None]).clamp(min=0)
            tokens, hidden = tokens.gather(1, at), hidden.gather(1, at[:, :, None].expand(-1, -1, hidden.shape[-1]))
            self.cache.skip(short, width)
        self._ingest(hidden, tokens)

    def _ingest(self, hidden: torch.Tensor, tokens: torch.Tensor) -> None:
        """Real pairs (hidden (B, T, d), the tokens after them (B, T)) into the cache; each row's last
        pair gives its next draft."""
        self._logits, self._first = self._step(hidden, tokens), None

    def _step(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """One module call; returns the next draft's raw logits (B, V) and keeps the state for chaining."""
        g = self.module(hidden, self.backbone.embed(tokens), self.cache)  # (B, T, d)
        self.calls += 1
        self._state = g[:, -1:]
        return self.module.draft_logits(self.backbone, g[:, -1])

    def _with_copies(self, logits: torch.Tensor, drafts: list[torch.Tensor]) -> torch.Tensor:
        """``logits`` mixed with each row's copy candidate after its context and ``drafts`` (no gate: as is)."""
        if not self.copying:
            return logits
        suffix = torch.stack(drafts, 1).tolist() if drafts else [[]] * len(self.indices)
        found = [index.propose(s) for index, s in zip(self.indices, suffix, strict=True)]
        cand, feats = proposal_tensors(found, logits.device)
        return self.module.copy_logits(logits, cand, feats)


class PromptLookupDrafter(Drafter):
    """Prompt lookup: no model; proposes what followed the latest earlier occurrence of the context's tail.

    For each row it matches the last n tokens of the context (prompt and output so far), n = ``ngram``
    down to 1, against every earlier position, takes the latest match and proposes the k tokens that
    followed it: the copy gate's n-gram index (``copy_gate.CopyIndex``) read k tokens on. A match near
    the end of the context runs on into the tokens it proposes itself (the copy overlaps, as in LZ77), so
    a repeating pattern is proposed for all k drafts. Greedy or sampled,
    the proposal is deterministic: its distributions are one-hot, so the speculative-sampling test
    keeps verified decoding exact.

    In a batch, a row with a shorter proposal (or none) fills its chain with its last token repeated,
    a guess that verification keeps only where it is right; with no match in any row the cycle is a
    plain step.

    Args:
        ngram: the longest suffix matched (>= 1).
    """

    def __init__(self, ngram: int = LOOKUP_NGRAM) -> None:
        if ngram < 1:
            raise ValueError(f"prompt lookup n-gram length must be >= 1, got {ngram}")
        self.ngram = ngram

    def start(self, prompts, tokens, hidden, first, room) -> None:
        self.indices = [CopyIndex([*p, t], max_n=self.ngram) for p, t in zip(prompts, first.tolist(), strict=True)]

    def propose(self, k, sampler, seen, width=1, keep_probs=False) -> Proposal:
        rows = [self.lookup(index, k) for index in self.indices]
        n = max(len(r) for r in rows)
        filled = [r + [index.tokens[-1]] * (n - len(r)) for r, index in zip(rows, self.indices, strict=True)]
        tokens = torch.tensor(filled, dtype=torch.long, device=seen.device).view(len(rows), n)
        if keep_probs:
            probs = torch.nn.functional.one_hot(tokens, seen.shape[1]).float()  # (B, n, V)
        else:
            probs = _no_probs(tokens)
        return Proposal(tokens, probs)

    def commit(self, tokens, hidden, counts, emitted) -> None:
        for index, ids in zip(self.indices, emitted, strict=True):
            index.extend(ids)

    def select(self, rows) -> None:
        self.indices = [self.indices[i] for i in rows]

    def extend(self, other: PromptLookupDrafter) -> None:
        self.indices += other.indices

    @staticmethod
    def lookup(index: CopyIndex, k: int) -> list[int]:
        """Up to ``k`` tokens continuing a row's context (``index.tokens``) from the latest earlier match of
        its tail ([] without one)."""
        found = index.latest_follower()
        if found is None:
            return []
        ctx, after = index.tokens, found[1]
        out = ctx[after : after + k]
        while len(out) < k:  # the match runs on into its own proposal
            out.append(out[len(out) - (len(ctx) - after)])
        return out


class EarlyExitDrafter(Drafter):
    """SPEED's speculation (arXiv 2310.12072): the token after the pending one, guessed from the pending token's
    state after its first ``exit_layer`` layers, starts those layers while the pending token finishes its own.

    It drafts nothing the loop checks: every cycle emits exactly the full model's token after the pending one
    (greedy or sampled, the output is the model's own). What speculation buys is that token's first layers:
    the cycle's full call (``full_call``, ``model.Backbone.wavefront``) runs the pending token through layers
    exit_layer .. L - 1 and the ``width`` most likely tokens of its early logits through layers 0 .. exit_layer
    - 1, tick by tick, and on a model whose blocks are shared (``ModelConfig.n_unique_layers``, ``exit_layer``
    a multiple of the unique blocks) both go through each block in one product, its weights read once. If the
    full model's token is among the candidates, its early state, keys and values are kept and its own early
    logits give the next candidates; if not (a miss), or for rows that just joined, the next call first runs
    the new pending token's first layers alone (``model.Backbone.head_start``), counted in ``calls``.

    Args:
        backbone: the native backbone (a wrapped transformers model cannot split a call by layer).
        exit_layer: the logical layer speculation reads (1 .. L - 1); None: the number of unique blocks on a
            parameter-shared model (the pipeline's two halves then run the same blocks), else L // 2.
        width: candidates speculated per cycle (>= 1).

    Raises:
        ValueError: a backbone that cannot split a call by layer, an exit layer or width out of range.
    """

    def __init__(self, backbone: torch.nn.Module, exit_layer: int | None = None, width: int = 1) -> None:
        if not hasattr(backbone, "wavefront"):
            raise ValueError(f"strategy 'speed' splits the full call by layer, which {type(backbone).__name__} "
                             "cannot; use --backend native (Llama-family models and `recyclegpt train` runs)")
        self.exit_layer = default_exit_layer(backbone.config) if exit_layer is None else exit_layer
        L = backbone.config.n_layers
        if not 1 <= self.exit_layer < L:
            raise ValueError(f"early exit layer must be in [1, {L - 1}] for this model of {L} logical layers, "
                             f"got {self.exit_layer}")
        if width < 1:
            raise ValueError(f"speculation width must be >= 1, got {width}")
        self.width = width
        self.late = None  # (B, 1, d) the pending token's residual after exit_layer layers; None: not run yet
        self.calls = 0

    def start(self, prompts, tokens, hidden, first, room) -> None:
        self.late = None

    def propose(self, k, sampler, seen, width=1, keep_probs=False) -> Proposal:
        return _nothing(seen)

    def full_call(self, backbone, cache, pending, proposal, tree, checks_drafts):
        if self.late is None:  # the pending token's first layers, then its candidates from their exit
            self.late, self.stash = backbone.head_start(pending[:, None], cache, self.exit_layer)
            self.candidates = backbone.early_logits(self.late[:, 0]).topk(self.width, -1).indices
            self.calls += 1
        self._cache, self._start = cache, cache.length
        logits, hidden, self._early = backbone.wavefront(self.late, self.stash, self.candidates, cache,
                                                         self.exit_layer)
        self._early_logits = logits[:, 1:]
        return torch.cat([pending[:, None], self.candidates], 1), logits[:, :1], hidden[:, :1]

    def commit(self, tokens, hidden, counts, emitted) -> None:
        hit = self.candidates == tokens[:, :1]  # (B, w): the full model's token among the candidates
        if not bool(hit.any(-1).all()):
            self.late = None
            return
        i = hit.int().argmax(-1)
        rows = torch.arange(i.shape[0], device=i.device)
        self.late = self._early[rows, i][:, None]
        self.stash = self._cache.read(self.exit_layer, self._start + 1 + i)  # its keys and values, in layers < exit
        self.candidates = self._early_logits[rows, i].topk(self.width, -1).indices

    def select(self, rows) -> None:
        if self.late is not None:
            idx = torch.tensor(list(rows), dtype=torch.long, device=self.late.device)
            self.late, self.candidates = self.late[idx], self.candidates[idx]
            self.stash = [(k[idx], v[idx]) for k, v in self.stash]

    def extend(self, other: EarlyExitDrafter) -> None:
        self.late = None  # the newcomers' first layers have not run: every row starts again (one catch-up call)
        self.calls += other.calls


def default_exit_layer(cfg) -> int:
    """The early exit SPEED reads by default: after the unique blocks of a parameter-shared model (both halves
    of the pipeline then run the same blocks), else half the depth."""
    unique = cfg.n_unique_layers
    return unique if unique and unique < cfg.n_layers else max(cfg.n_layers // 2, 1)


DRAFTERS = ("module", "lookup")


def make_drafter(kind: str | Callable[[torch.nn.Module, torch.nn.Module | None], Drafter] | None,
                 backbone: torch.nn.Module, module: torch.nn.Module | None) -> Drafter:
    """The drafter a strategy asks for (``Strategy.drafter``), fresh for one generate call.

    Args:
        kind: ``"module"`` (the recyclable module), ``"lookup"`` (prompt lookup), None (no drafts) or a
            factory ``(backbone, module) -> Drafter`` for a drafter of another kind.
        backbone: the backbone the loop decodes with.
        module: the engine's recyclable module, if any.

    Raises:
        ValueError: an unknown kind, or ``"module"`` without a module.
    """
    if kind is None:
        return NoDrafter()
    if callable(kind):
        return kind(backbone, module)
    if kind == "module":
        if module is None:
            raise ValueError("the module drafter needs a recyclable module")
        return ModuleDrafter(backbone, module)
    if kind == "lookup":
        return PromptLookupDrafter()
    raise ValueError(f"unknown drafter {kind!r}; known drafters: {', '.join(DRAFTERS)}")


def _nothing(seen: torch.Tensor) -> Proposal:
    """A proposal of no drafts for each of ``seen``'s (B, V) rows."""
    empty = seen.new_zeros(seen.shape[0], 0, dtype=torch.long)
    return Proposal(empty, _no_probs(empty))


def _no_probs(tokens: torch.Tensor) -> torch.Tensor:
    """The empty (B, k, 0) distributions of drafts whose distributions nobody reads."""
    return torch.zeros(*tokens.shape, 0, device=tokens.device)
