"""The single decode loop: prefill, cycles of (draft, verify, commit), stop criteria, streaming, stats.

Two seams plug in, and there is no second copy of this loop: a *drafter* (``drafters.py``) proposes
tokens and owns its own state; a *strategy* (``strategies.py``) decides how many to ask for and what
to keep.

Cache invariant between cycles: the backbone cache holds each row's x_0 .. x_{p-1} (rows may hold
different lengths: ``cache.KVCache``'s holes and per-row positions); the *pending* token x_p is chosen
but not yet ingested. A cycle feeds the full model [x_p, d_1 .. d_k (, side drafts)] in one call; each
row keeps its own n drafts plus one full-model token, the cache keeps those n + 1 slots per row (a kept
side draft moves next to its root first), and the drafter ingests the n + 1 real tokens with their
hidden states and rolls back its own state. ``Batch`` runs the cycle; rows join and leave it between
cycles (the server's continuous batching, ``scheduler.py``); ``decode_ids`` drives it for a fixed set
of prompts.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from recyclegpt.cache import KVCache, Tree
from recyclegpt.drafters import Drafter, make_drafter
from recyclegpt.sampling import Sampler, SamplingConfig
from recyclegpt.strategies import Accepted, Strategy, Verify, make_strategy


class GenerationError(ValueError):
    """A generation request is invalid (empty prompt, too long, missing module...)."""


@dataclass
class DecodeStats:
    """Counters of one generate call (or of one row of a served batch).

    ``tau`` is tokens generated per row per full-model forward, the prefill forward included (it
    produces the first token); standard decoding has tau = 1. Draft counters add up over rows.
    """

    batch: int = 1
    prompt_tokens: int = 0
    new_tokens: int = 0
    full_calls: int = 0
    row_calls: int = 0  # full calls times the rows in each (rows that finish leave the batch)
    module_calls: int = 0
    drafted: int = 0
    accepted: int = 0
    rejected: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reasons: list[str] = field(default_factory=list)  # per row: "stop" (EOS / stop string) or "length"

    @property
    def tau(self) -> float:
        return self.new_tokens / max(self.row_calls, 1)

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


@dataclass
class Row:
    """One sequence of a ``Batch``: what it emitted, when it stops, and its own counters.

    Attributes:
        key: the caller's name for it (an index, a request).
        max_new_tokens: the most tokens it emits.
        stop: ``stop(ids)`` is True once the emitted ids end the row (a stop string); None: EOS and length only.
        stats: its counters (batch 1): full calls it took part in, drafts it kept, its finish reason.
        out: the tokens emitted so far.
        done: it has finished (EOS, a stop string or its length).
    """

    key: Any
    max_new_tokens: int
    stop: Callable[[list[int]], bool] | None
    stats: DecodeStats
    out: list[int] = field(default_factory=list)
    done: bool = False

    def emit(self, ids: Sequence[int], eos_ids: set[int]) -> list[int]:
        """Append tokens until the row finishes; returns those appended."""
        added = []
        for tok in ids:
            if self.done:
                break
            self.out.append(tok)
            added.append(tok)
            if tok in eos_ids or (self.stop and self.stop(self.out)):
                self.done, self.stats.finish_reasons = True, ["stop"]
            elif len(self.out) >= self.max_new_tokens:
                self.done = True
        self.stats.new_tokens += len(added)
        return added


class Batch:
    """The one decode loop, one cycle at a time: rows decoded together, which may join and leave.

    ``add`` prefills prompts in one call of their own and appends them as rows; ``step`` runs one cycle
    (draft, verify, commit) over every row; ``drop`` removes rows between cycles. Each row keeps its own
    length in the caches, its own accepted drafts, stop criteria and counters, so a row decodes as it
    would alone. ``decode_ids`` drives it for a fixed set of prompts, the server's scheduler
    (``scheduler.py``) for requests that come and go. Rows join a running batch and keep their own
    lengths only on caches that hold rows of different lengths (the native backbone's ``KVCache``);
    on others a batch is built once and its rows keep the batch's smallest accepted count.

    Args:
        backbone, module: the full model and the recyclable module (None without one).
        strategy: the decoding strategy; one per batch.
        sampler: the sampling settings; one per batch.
        eos_ids: tokens that end a row.
        pad_id: the token that left-pads prompts of one ``add``.
    """

    def __init__(self, backbone: torch.nn.Module, module: torch.nn.Module | None, strategy: Strategy,
                 sampler: Sampler, eos_ids: set[int], pad_id: int = 0) -> None:
        if strategy.uses_module and module is None:
            raise GenerationError(f"strategy {strategy.name!r} needs a recyclable module; pass --module PATH")
        self.backbone, self.module, self.strategy, self.sampler = backbone, module, strategy, sampler
        self.eos_ids, self.pad_id = eos_ids, pad_id
        self.device = next(backbone.parameters()).device
        self.tree = _tree_on(strategy, backbone, self.device)
        self.keep_q = strategy.checks_drafts and not sampler.cfg.greedy  # only the sampled-draft test reads q
        self.rows: list[Row] = []
        self.stats = DecodeStats(batch=0)  # the whole batch's counters
        self.cache: KVCache | None = None
        self.drafter: Drafter | None = None
        self.pending = torch.zeros(0, dtype=torch.long, device=self.device)  # (B,) chosen, not yet ingested
        self.seen = torch.zeros(0, backbone.config.vocab_size, dtype=torch.bool, device=self.device)

    @property
    def ragged(self) -> bool:
        """Whether rows may hold different lengths (join a running batch, keep their own drafts)."""
        return getattr(self.cache, "ragged", False)

    @torch.inference_mode()
    def add(self, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int],
            stops: Sequence[Callable[[list[int]], bool] | None], keys: Sequence[Any]) -> list[list[int]]:
        """Prefill ``prompts`` (token ids) in one call and append them as rows; returns each new row's
        first token, as emitted (empty when ``max_new_tokens`` or a stop ends the row at once)."""
        if self.rows and not self.ragged:
            raise GenerationError("rows can join a running batch only on the native backbone's cache")
        t0 = time.perf_counter()
        room = max(len(p) for p in prompts) + max(max_new_tokens) + 1 + self.strategy.max_drafts
        tokens, cache, seen = _prompt_state(self.backbone, prompts, self.pad_id, room, self.device)
        drafter = make_drafter(self.strategy.drafter, self.backbone, self.module)
        logits, hidden = self.backbone(tokens, cache, logits_last=1)
        pending = self.sampler.token(logits[:, -1], seen)  # (B,)
        drafter.start(prompts, tokens, hidden, pending, room)
        seen.scatter_(1, pending[:, None], True)
        rows = [Row(key, m, stop, DecodeStats(prompt_tokens=len(p), full_calls=1, row_calls=1,
                                              module_calls=drafter.calls, finish_reasons=["length"]))
                for p, m, stop, key in zip(prompts, max_new_tokens, stops, keys, strict=True)]
        if self.rows:
            self.cache.extend(cache)
            self.drafter.extend(drafter)
        else:
            self.cache, self.drafter = cache, drafter
        self.pending, self.seen = torch.cat([self.pending, pending]), torch.cat([self.seen, seen])
        self.rows += rows
        self.stats.batch = max(self.stats.batch, len(self.rows))
        self.stats.prompt_tokens += sum(len(p) for p in prompts)
        self.stats.full_calls += 1
        self.stats.row_calls += len(rows)
        self.stats.module_calls += drafter.calls
        emitted = [row.emit([t], self.eos_ids) for row, t in zip(rows, pending.tolist(), strict=True)]
        self.stats.new_tokens += sum(map(len, emitted))
        self.stats.prefill_s += time.perf_counter() - t0
        return emitted

    @torch.inference_mode()
    def step(self) -> list[list[int]]:
        """One cycle over every row; returns, per row (in ``rows`` order), the tokens it emitted.

        Finished rows stay until ``drop``ped (and emit nothing)."""
        t0, strategy, drafter, cache = time.perf_counter(), self.strategy, self.drafter, self.cache
        self._make_room(1 + strategy.max_drafts)
        calls = drafter.calls
        # 1. Draft: the strategy sizes the request, the drafter proposes (side drafts with a tree).
        k = strategy.draft_len(drafter.first_logits())
        proposal = drafter.propose(k, self.sampler, self.seen, strategy.width, self.keep_q)
        # 2. Verify: one full call over [pending, drafts, side drafts]; each row keeps its drafts and
        # the full model's token after them.
        start = cache.length
        fed, logits, hidden = drafter.full_call(self.backbone, cache, self.pending, proposal, self.tree,
                                                strategy.checks_drafts)
        acc = strategy.accept(Verify(proposal.tokens, proposal.probs, logits, self.seen, proposal.side),
                              self.sampler)
        if not self.ragged:
            acc = acc.shortest(fed)
        # 3. Commit: the backbone keeps what each row kept; rows emit; the drafter ingests the real tokens.
        new, counts, kept_hidden = _commit(cache, start, fed, hidden, acc, self.ragged)
        real = torch.arange(new.shape[1], device=new.device)[None] < counts[:, None]
        self.seen.scatter_(1, torch.where(real, new, new[:, :1]), True)
        added = [row.emit(ids[:c], self.eos_ids)
                 for row, ids, c in zip(self.rows, new.tolist(), counts.tolist(), strict=True)]
        if not all(row.done for row in self.rows):
            drafter.commit(new, kept_hidden, counts, added)
        self.pending = acc.token
        self._count(proposal.tokens.shape[1], acc.n.tolist(), drafter.calls - calls, added)
        self.stats.decode_s += time.perf_counter() - t0
        return added

    @torch.inference_mode()
    def drop(self, keep: Sequence[int]) -> list[Row]:
        """Keep only the rows at these indices (in this order) and return the others."""
        gone = [row for i, row in enumerate(self.rows) if i not in set(keep)]
        if not gone:
            return []
        if len(keep) and not self.ragged:
            raise GenerationError("rows can leave a running batch only on the native backbone's cache")
        if len(keep):
            self.cache.select(keep)
            self.drafter.select(keep)
        idx = torch.tensor(list(keep), dtype=torch.long, device=self.device)
        self.pending, self.seen = self.pending[idx], self.seen[idx]
        self.rows = [self.rows[i] for i in keep]
        return gone

    def _make_room(self, n: int) -> None:
        """Room in every cache for one cycle of ``n`` new tokens: compact the holes when they fill half
        the caches, else grow them."""
        caches = [self.cache, *self.drafter.caches()] if self.ragged else []
        if caches and self.cache.length + n > self.cache.max_len:
            if self.cache.holes * 2 > self.cache.batch * self.cache.length:
                for c in caches:
                    c.compact()
            for c in caches:
                c.grow(n)

    def _count(self, drafted: int, kept: list[int], module_calls: int, added: list[list[int]]) -> None:
        """One cycle into the batch's and each row's counters."""
        st = self.stats
        st.full_calls += 1
        st.row_calls += len(self.rows)
        st.module_calls += module_calls
        st.new_tokens += sum(map(len, added))
        for row, n in zip(self.rows, kept, strict=True):
            for counters in (row.stats, st):
                counters.drafted += drafted
                counters.accepted += n
                counters.rejected += drafted - n
            row.stats.full_calls += 1
            row.stats.row_calls += 1
            row.stats.module_calls += module_calls


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
    the others go on (and leave the batch, where its cache allows). ``stats`` is filled in place.
    """
    batch = Batch(backbone, module, strategy, sampler, eos_ids, pad_id)
    batch.stats = stats
    stops = [None if stop_fn is None else functools.partial(stop_fn, row) for row in range(len(prompts))]
    first = batch.add(prompts, [max_new_tokens] * len(prompts), stops, range(len(prompts)))
    stats.finish_reasons = [row.stats.finish_reasons[0] for row in batch.rows]
    yield first
    rows = batch.rows
    while not all(row.done for row in rows):
        out: list[list[int]] = [[] for _ in prompts]
        for row, added in zip(batch.rows, batch.step(), strict=True):
            out[row.key] = added
        if batch.ragged:
            batch.drop([i for i, row in enumerate(batch.rows) if not row.done])
        stats.finish_reasons = [row.stats.finish_reasons[0] for row in rows]
        yield out


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


def _commit(cache: KVCache, start: int, fed: torch.Tensor, hidden: torch.Tensor, acc: Accepted, ragged: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep each row's accepted drafts in the backbone cache (from slot ``start``, the pending token's)
    and forget the rest. Returns the new tokens (B, m + 1), per row its kept drafts then the full model's
    token (entries past a row's count unused), the counts (B,) = drafts kept + 1, and the hidden states
    (B, m + 1, d) of the positions those tokens follow (the pending token's, then each kept draft's)."""
    m = int(acc.n.max())
    if acc.path is None:  # the first n chained drafts
        kept, kept_hidden = fed[:, 1 : m + 1], hidden[:, : m + 1]
    else:  # a branch of the tree: move its slots next to the root first
        cache.keep(start, acc.path)
        kept = fed.gather(1, acc.path)
        rows = torch.cat([torch.zeros_like(acc.path[:, :1]), acc.path], 1)  # (B, m + 1)
        kept_hidden = hidden.gather(1, rows[:, :, None].expand(-1, -1, hidden.shape[-1]))
    new = torch.cat([kept, acc.token[:, None]], 1).scatter_(1, acc.n[:, None], acc.token[:, None])
    counts = acc.n + 1
    if ragged:
        cache.commit_rows(start, counts)
    else:  # every row kept the same count
        cache.rollback(start + m + 1)
    return new, counts, kept_hidden


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

    def prepare(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Token ids of the prompts, checked: none empty, each fits the context with ``max_new_tokens``.

        Raises:
            GenerationError: what was wrong and what is accepted.
        """
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
        draft_width: int | None,
        exit_layer: int | None,
    ) -> tuple[Iterator[list[list[int]]], DecodeStats]:
        ids = self.prepare(prompts, max_new_tokens)
        strat = (strategy if isinstance(strategy, Strategy)
                 else make_strategy(strategy, draft_len, threshold, draft_width, exit_layer=exit_layer))
        stats = DecodeStats()
        ends = self.stop_check(stop)
        it = decode_ids(
            self._decoder, self._module_decoder, ids, strat, Sampler(sampling, self.device), max_new_tokens,
            set(self.tokenizer.eos_token_ids), stats, self.tokenizer.pad_token_id,
            None if ends is None else lambda row, toks: ends(toks),
        )
        return it, stats

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def batch(self, strategy: Strategy, sampling: SamplingConfig) -> Batch:
        """An empty ``Batch`` on this engine (its compiled copies, if any) that rows can join."""
        return Batch(self._decoder, self._module_decoder, strategy, Sampler(sampling, self.device),
                     set(self.tokenizer.eos_token_ids), self.tokenizer.pad_token_id)

    def stop_check(self, stop: Sequence[str]) -> Callable[[list[int]], bool] | None:
        """``check(ids)``: whether a row's emitted ids show one of the ``stop`` strings (None without any)."""
        if not stop:
            return None

        def check(toks: list[int]) -> bool:
            # Stop strings are short: the last 32 tokens are enough to see one complete.
            return any(s in self.tokenizer.decode(toks[-32:]) for s in stop)

        return check

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        strategy: str | Strategy = "standard",
        max_new_tokens: int = 128,
        sampling: SamplingConfig | None = None,
        stop: Sequence[str] = (),
        draft_len: int | None = None,
        threshold: float = 0.5,
        draft_width: int | None = None,
        exit_layer: int | None = None,
    ) -> list[Generation]:
        """Generate continuations for a batch of prompts (text or token ids, left-padded together).

        Args:
            prompts: texts (encoded as they are; apply a chat template first if wanted) or token ids.
            strategy: ``standard``, ``alternating``, ``verified``, ``adaptive``, ``lookup`` or ``speed`` (a key
                of ``strategies.STRATEGIES``), or a Strategy.
            max_new_tokens: upper bound on new tokens per row.
            sampling: sampling options; greedy by default.
            stop: strings that end a row (the text is cut before them).
            draft_len: drafts per cycle for ``verified`` (default 1) and ``lookup`` (default 10).
            threshold: module confidence needed by ``adaptive``.
            draft_width: candidates ``verified`` checks for the first draft's slot (default 1), or ``speed``
                speculates (default ``strategies.SPEED_WIDTH``) (native backbone).
            exit_layer: the logical layer ``speed`` speculates from (None: ``drafters.default_exit_layer``).

        Returns:
            One ``Generation`` per prompt; all share the batch's ``DecodeStats``.
        """
        it, stats = self._run(
            prompts, strategy, max_new_tokens, sampling or SamplingConfig(), stop, draft_len, threshold, draft_width,
            exit_layer,
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
        draft_width: int | None = None,
        exit_layer: int | None = None,
    ) -> Iterator[str]:
        """Yield the text of one prompt's continuation in chunks as it is decoded.

        A chunk never ends inside a multi-byte character: text is released only once the decoded
        string no longer ends with the replacement character. Stop strings are never released.
        ``stats_out``, if given, receives the ``DecodeStats`` when the stream ends; the other arguments are
        ``generate``'s.
        """
        it, stats = self._run(
            [prompt], strategy, max_new_tokens, sampling or SamplingConfig(), stop, draft_len, threshold, draft_width,
            exit_layer,
        )
        text = TextStream(self.tokenizer, stop)
        for added in it:
            if chunk := text.feed(added[0]):
                yield chunk
        if chunk := text.close():
            yield chunk
        if stats_out is not None:
            stats_out.append(stats)


class TextStream:
    """One row's text, released in chunks as its tokens come.

    A chunk never ends inside a multi-byte character (text is held while the decoded string ends with
    the replacement character), never contains a stop string or what follows it, and holds back a tail
    that could be the start of one. EOS tokens are dropped.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.eos = set(tokenizer.eos_token_ids)
        self.tokens: list[int] = []
        self.sent = 0
        self.hold = max((len(s) for s in stop), default=1) - 1  # what could start a stop string

    def feed(self, ids: Sequence[int]) -> str:
        """Take new tokens; returns the text now safe to release ("" if none)."""
        self.tokens.extend(t for t in ids if t not in self.eos)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):  # a multi-byte character is still incomplete
            return ""
        cut = _cut(text, self.stop)
        ready = len(cut) if len(cut) < len(text) else len(text) - self.hold
        if ready <= self.sent:
            return ""
        chunk, self.sent = cut[self.sent : ready], ready
        return chunk

    def close(self) -> str:
        """The rest of the text once the row has ended."""
        text = _cut(self.tokenizer.decode(self.tokens), self.stop)
        chunk, self.sent = text[self.sent :], max(len(text), self.sent)
        return chunk


def _cut(text: str, stop: Sequence[str]) -> str:
    """Text up to the earliest stop string."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]
