"""The single decode loop: prefill, cycles of (draft, verify, commit), stop criteria, streaming, stats.

Two seams plug in, and there is no second copy of this loop: a *drafter* (``drafters.py``) proposes
tokens and owns its own state; a *strategy* (``strategies.py``) decides how many to ask for and what
to keep.

Cache invariant between cycles (positions are slots of the backbone cache): the backbone cache holds
x_0 .. x_{p-1}; the *pending* token x_p is chosen but not yet ingested. A cycle feeds the full model
[x_p, d_1 .. d_k (, side drafts)] in one call, keeps n drafts plus one full-model token, rolls the
backbone cache back to p + n + 1 (a kept side draft moves next to its root first), and hands the
n + 1 real tokens with their hidden states to the drafter, which rolls back its own state.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch

from recyclegpt.cache import KVCache, Tree
from recyclegpt.drafters import Drafter, Proposal, make_drafter
from recyclegpt.sampling import Sampler, SamplingConfig
from recyclegpt.strategies import Accepted, Strategy, Verify, make_strategy


class GenerationError(ValueError):
    """A generation request is invalid (empty prompt, too long, missing module...)."""


@dataclass
class DecodeStats:
    """Counters of one generate call.

    ``tau`` is tokens generated per row per full-model forward, the prefill forward included (it
    produces the first token); standard decoding has tau = 1. Draft counters add up over rows.
    """

    batch: int = 1
    prompt_tokens: int = 0
    new_tokens: int = 0
    full_calls: int = 0
    module_calls: int = 0
    drafted: int = 0
    accepted: int = 0
    rejected: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reasons: list[str] = field(default_factory=list)  # per row: "stop" (EOS / stop string) or "length"

    @property
    def tau(self) -> float:
        return self.new_tokens / max(self.full_calls * self.batch, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.prefill_s + self.decode_s, 1e-9)

    def to_dict(self) -> dict[str, float]:
        return asdict(self) | {"tau": self.tau, "tokens_per_s": self.tokens_per_s}


@dataclass
class Generation:
    """One row's output."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    stats: DecodeStats = field(repr=False)


class _Rows:
    """Each row's emitted tokens and whether it has finished (EOS, a stop string, or its length)."""

    def __init__(self, batch: int, max_new_tokens: int, eos_ids: set[int],
                 stop_fn: Callable[[int, list[int]], bool] | None, stats: DecodeStats) -> None:
        self.out: list[list[int]] = [[] for _ in range(batch)]
        self.done = [False] * batch
        self.max_new_tokens, self.eos_ids, self.stop_fn, self.stats = max_new_tokens, eos_ids, stop_fn, stats
        stats.finish_reasons = ["length"] * batch

    @property
    def finished(self) -> bool:
        return all(self.done)

    def emit(self, new: torch.Tensor) -> list[list[int]]:
        """Append (B, n) tokens to unfinished rows, applying stop criteria; returns what was added."""
        added: list[list[int]] = [[] for _ in self.out]
        for row, ids in enumerate(new.tolist()):
            for tok in ids:
                if self.done[row]:
                    break
                self.out[row].append(tok)
                added[row].append(tok)
                if tok in self.eos_ids or (self.stop_fn and self.stop_fn(row, self.out[row])):
                    self.done[row], self.stats.finish_reasons[row] = True, "stop"
                elif len(self.out[row]) >= self.max_new_tokens:
                    self.done[row] = True
        self.stats.new_tokens += sum(len(a) for a in added)
        return added


@torch.inference_mode()  # also the prompt tensor: a compiled backbone then sees one kind of input
def decode_ids(
    backbone: torch.nn.Module,
    module: torch.nn.Module | None,
    prompts: Sequence[Sequence[int]],
    strategy: Strategy,
    sampler: Sampler,
    max_new_tokens: int,
    eos_ids: set[int],
    stats: DecodeStats,
    pad_id: int = 0,
    stop_fn: Callable[[int, list[int]], bool] | None = None,
) -> Iterator[list[list[int]]]:
    """Decode a batch of token-id prompts; yields, once per cycle, each row's newly emitted tokens.

    Rows that have finished (EOS, ``max_new_tokens`` or ``stop_fn(row, ids)``) yield empty lists while
    the others go on. ``stats`` is filled in place.
    """
    device = next(backbone.parameters()).device
    drafter, tree = _drafter_for(strategy, backbone, module), _tree_on(strategy, backbone, device)
    B, room = len(prompts), max(len(p) for p in prompts) + max_new_tokens + 1 + strategy.max_drafts
    tokens, cache, seen = _prompt_state(backbone, prompts, pad_id, room, device)
    rows = _Rows(B, max_new_tokens, eos_ids, stop_fn, stats)
    stats.batch, stats.prompt_tokens = B, sum(len(p) for p in prompts)
    keep_q = strategy.checks_drafts and not sampler.cfg.greedy  # only the sampled-draft test reads q

    # 1. Prefill: one full call over the prompt; the drafter ingests the prompt and the first token.
    t0 = time.perf_counter()
    logits, hidden = backbone(tokens, cache, logits_last=1)
    stats.full_calls += 1
    pending = sampler.token(logits[:, -1], seen)  # (B,)
    drafter.start(prompts, tokens, hidden, pending, room)
    stats.module_calls = drafter.calls
    stats.prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    yield rows.emit(pending[:, None])
    seen.scatter_(1, pending[:, None], True)

    while not rows.finished:
        # 2. Draft: the strategy sizes the request, the drafter proposes (side drafts with a tree).
        k = strategy.draft_len(drafter.first_logits())
        proposal = drafter.propose(k, sampler, seen, strategy.width, keep_q)
        # 3. Verify: one full call over [pending, drafts, side drafts]; the strategy keeps n drafts
        # and picks the full model's token after them.
        start = cache.length
        fed, logits, hidden = _full_call(backbone, cache, pending, proposal, tree, strategy.checks_drafts)
        acc = strategy.accept(Verify(proposal.tokens, proposal.probs, logits, seen, proposal.side), sampler)
        _count(stats, B, proposal.tokens.shape[1], acc.n)
        # 4. Commit: roll the backbone back to what was kept; emit; the drafter ingests the n + 1 real tokens.
        new, kept_hidden = _commit(cache, start, fed, hidden, acc)
        seen.scatter_(1, new, True)
        added = rows.emit(new)
        if not rows.finished:
            drafter.commit(new, kept_hidden, added)
        stats.module_calls = drafter.calls
        pending = acc.token
        yield added
    stats.decode_s = time.perf_counter() - t0


def _drafter_for(strategy: Strategy, backbone: torch.nn.Module, module: torch.nn.Module | None) -> Drafter:
    """A fresh drafter of the kind the strategy asks for."""
    if strategy.uses_module and module is None:
        raise GenerationError(f"strategy {strategy.name!r} needs a recyclable module; pass --module PATH")
    return make_drafter(strategy.drafter, backbone, module)


def _tree_on(strategy: Strategy, backbone: torch.nn.Module, device: torch.device) -> Tree | None:
    """The strategy's tree layout on ``device`` (None for a chain); checks the backbone can run one."""
    if strategy.tree is None:
        return None
    if not getattr(backbone, "supports_tree", False):
        raise GenerationError(
            f"a draft width above 1 needs the native backbone, not {type(backbone).__name__}: "
            "use --backend native (Llama-family models) or a draft width of 1"
        )
    return Tree(strategy.tree.depth.to(device), strategy.tree.mask.to(device))


def _prompt_state(backbone: torch.nn.Module, prompts: Sequence[Sequence[int]], pad_id: int, room: int,
                  device: torch.device) -> tuple[torch.Tensor, KVCache, torch.Tensor]:
    """The prompts left-padded with ``pad_id`` into one (B, P) tensor, a backbone cache of ``room`` slots
    that knows the padding, and the (B, V) mask of the tokens each row has seen."""
    P = max(len(p) for p in prompts)
    tokens = torch.tensor([[pad_id] * (P - len(p)) + list(p) for p in prompts], device=device)
    cache = backbone.new_cache(len(prompts), room)
    if any(len(p) < P for p in prompts):
        cache.set_padding([P - len(p) for p in prompts])
    seen = torch.zeros(len(prompts), backbone.config.vocab_size, dtype=torch.bool, device=device)
    for row, p in enumerate(prompts):
        seen[row, list(p)] = True
    return tokens, cache, seen


def _full_call(backbone: torch.nn.Module, cache: KVCache, pending: torch.Tensor, proposal: Proposal,
               tree: Tree | None, checks_drafts: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Feed [pending, drafts, side drafts] (a tree when side drafts go along); returns (fed (B, T),
    logits (B, T or 1, V): every position when the strategy checks drafts, else the last; hidden (B, T, d))."""
    side = [] if proposal.side is None else [proposal.side]
    fed = torch.cat([pending[:, None], proposal.tokens, *side], 1)
    layout = {"tree": tree} if side else {}
    logits, hidden = backbone(fed, cache, logits_last=fed.shape[1] if checks_drafts else 1, **layout)
    return fed, logits, hidden


def _count(stats: DecodeStats, batch: int, drafted: int, kept: int) -> None:
    """One cycle into the counters: a full call, its drafts kept and rejected (summed over rows)."""
    stats.full_calls += 1
    stats.drafted += drafted * batch
    stats.accepted += kept * batch
    stats.rejected += (drafted - kept) * batch


def _commit(cache: KVCache, start: int, fed: torch.Tensor, hidden: torch.Tensor, acc: Accepted
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the accepted drafts in the backbone cache (from slot ``start``, the pending token's) and
    forget the rest. Returns the new tokens (B, n + 1), kept drafts then the full model's token, and the
    hidden states (B, n + 1, d) of the positions they follow (the pending token's, then each kept draft's)."""
    n = acc.n
    if acc.path is None:  # the first n chained drafts
        kept, kept_hidden = fed[:, 1 : n + 1], hidden[:, : n + 1]
    else:  # a branch of the tree: move its slots next to the root first
        cache.keep(start, acc.path)
        kept = fed.gather(1, acc.path)
        rows = torch.cat([torch.zeros_like(acc.path[:, :1]), acc.path], 1)  # (B, n + 1)
        kept_hidden = hidden.gather(1, rows[:, :, None].expand(-1, -1, hidden.shape[-1]))
    cache.rollback(start + n + 1)
    return torch.cat([kept, acc.token[:, None]], 1), kept_hidden


class Engine:
    """A backbone, its tokenizer and (optionally) a recyclable module, ready to generate text.

    Args:
        backbone: native ``Backbone`` or a wrapped transformers model (same interface).
        tokenizer: object with ``encode(text) -> list[int]`` (a model input: the model's BOS first where it
            expects one), ``decode(ids) -> str``, ``eos_token_ids`` (a set) and ``pad_token_id``.
        module: a ``RecyclableModule`` trained for this backbone, or None (standard decoding only).
        compile: decode through ``torch.compile``d copies of a native backbone and its module (shapes
            dynamic, so one compilation serves every cache length). The first calls compile (tens of
            seconds on a CPU; cached on disk by PyTorch); then each step saves the per-operation overhead
            of eager mode.
    """

    def __init__(
        self, backbone: torch.nn.Module, tokenizer, module: torch.nn.Module | None = None, compile: bool = False
    ) -> None:
        self.backbone, self.tokenizer, self.module = backbone.eval(), tokenizer, module
        if module is not None:
            module.eval()
        self._decoder, self._module_decoder = self.backbone, module
        if compile:
            from recyclegpt.model import Backbone

            if not isinstance(backbone, Backbone):
                raise GenerationError(
                    f"compile needs the native backbone, not {type(backbone).__name__}: use --backend native "
                    "(Llama-family models) or leave compile off"
                )
            self._decoder = torch.compile(self.backbone, dynamic=True)
            if module is not None:
                self._module_decoder = torch.compile(module, dynamic=True)

    def with_module(self, module: torch.nn.Module) -> Engine:
        """An engine on the same backbone (compiled copy included, not compiled again) with another module."""
        other = copy.copy(self)
        other.module = other._module_decoder = module.eval()
        if self._decoder is not self.backbone:  # this engine compiles: so does the new module
            other._module_decoder = torch.compile(module, dynamic=True)
        return other

    def _prepare(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        if not prompts:
            raise GenerationError("no prompt given")
        ids = []
        for i, p in enumerate(prompts):
            row = self.tokenizer.encode(p) if isinstance(p, str) else list(p)
            if not row:
                raise GenerationError(f"prompt {i} is empty; give at least one token of text")
            ids.append(row)
        if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
            raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        limit = self.backbone.config.max_seq_len
        longest = max(len(r) for r in ids)
        if longest + max_new_tokens + 1 > limit:
            raise GenerationError(
                f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context of "
                f"{limit} tokens; shorten the prompt or ask for at most {max(limit - longest - 1, 0)} new tokens"
            )
        return ids

    def _run(
        self,
        prompts: Sequence[str | Sequence[int]],
        strategy: str | Strategy,
        max_new_tokens: int,
        sampling: SamplingConfig,
        stop: Sequence[str],
        draft_len: int | None,
        threshold: float,
        draft_width: int,
    ) -> tuple[Iterator[list[list[int]]], DecodeStats]:
        ids = self._prepare(prompts, max_new_tokens)
        strat = (strategy if isinstance(strategy, Strategy)
                 else make_strategy(strategy, draft_len, threshold, draft_width))
        stats = DecodeStats()

        def stop_fn(row: int, toks: list[int]) -> bool:
            # Stop strings are short: the last 32 tokens are enough to see one complete.
            return any(s in self.tokenizer.decode(toks[-32:]) for s in stop)

        device = next(self.backbone.parameters()).device
        it = decode_ids(
            self._decoder, self._module_decoder, ids, strat, Sampler(sampling, device), max_new_tokens,
            set(self.tokenizer.eos_token_ids), stats, self.tokenizer.pad_token_id, stop_fn if stop else None,
        )
        return it, stats

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        strategy: str | Strategy = "standard",
        max_new_tokens: int = 128,
        sampling: SamplingConfig | None = None,
        stop: Sequence[str] = (),
        draft_len: int | None = None,
        threshold: float = 0.5,
        draft_width: int = 1,
    ) -> list[Generation]:
        """Generate continuations for a batch of prompts (text or token ids, left-padded together).

        Args:
            prompts: texts (encoded as they are; apply a chat template first if wanted) or token ids.
            strategy: ``standard``, ``alternating``, ``verified``, ``adaptive`` or ``lookup`` (a key of
                ``strategies.STRATEGIES``), or a Strategy.
            max_new_tokens: upper bound on new tokens per row.
            sampling: sampling options; greedy by default.
            stop: strings that end a row (the text is cut before them).
            draft_len: drafts per cycle for ``verified`` (default 1) and ``lookup`` (default 10).
            threshold: module confidence needed by ``adaptive``.
            draft_width: candidates ``verified`` checks for the first draft's slot (native backbone).

        Returns:
            One ``Generation`` per prompt; all share the batch's ``DecodeStats``.
        """
        it, stats = self._run(
            prompts, strategy, max_new_tokens, sampling or SamplingConfig(), stop, draft_len, threshold, draft_width
        )
        rows: list[list[int]] = [[] for _ in prompts]
        for added in it:
            for row, toks in enumerate(added):
                rows[row].extend(toks)
        eos = set(self.tokenizer.eos_token_ids)
        return [
            Generation(_cut(self.tokenizer.decode([t for t in toks if t not in eos]), stop), toks,
                       stats.finish_reasons[row], stats)
            for row, toks in enumerate(rows)
        ]

    def stream(
        self,
        prompt: str | Sequence[int],
        strategy: str | Strategy = "standard",
        max_new_tokens: int = 128,
        sampling: SamplingConfig | None = None,
        stop: Sequence[str] = (),
        draft_len: int | None = None,
        threshold: float = 0.5,
        stats_out: list[DecodeStats] | None = None,
        draft_width: int = 1,
    ) -> Iterator[str]:
        """Yield the text of one prompt's continuation in chunks as it is decoded.

        A chunk never ends inside a multi-byte character: text is released only once the decoded
        string no longer ends with the replacement character. Stop strings are never released.
        ``stats_out``, if given, receives the ``DecodeStats`` when the stream ends.
        """
        it, stats = self._run(
            [prompt], strategy, max_new_tokens, sampling or SamplingConfig(), stop, draft_len, threshold, draft_width
        )
        eos = set(self.tokenizer.eos_token_ids)
        toks: list[int] = []
        sent = 0
        hold = max((len(s) for s in stop), default=1) - 1  # keep back what could start a stop string
        for added in it:
            toks.extend(t for t in added[0] if t not in eos)
            text = self.tokenizer.decode(toks)
            if text.endswith("\ufffd"):  # a multi-byte character is still incomplete
                continue
            cut = _cut(text, stop)
            ready = len(cut) if len(cut) < len(text) else len(text) - hold
            if ready > sent:
                yield cut[sent:ready]
                sent = ready
        text = _cut(self.tokenizer.decode(toks), stop)
        if len(text) > sent:
            yield text[sent:]
        if stats_out is not None:
            stats_out.append(stats)


def _cut(text: str, stop: Sequence[str]) -> str:
    """Text up to the earliest stop string."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]
