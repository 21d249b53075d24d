"""The single decode loop: prefill, cycles of (draft, full call, accept), stop criteria, streaming, stats.

Strategies (``strategies.py``) plug in; there is no second copy of this loop.

Cache invariant between cycles (positions are slots of the backbone cache):
  * the backbone cache holds x_0 .. x_{p-1}; the *pending* token x_p is chosen but not yet ingested;
  * the module cache holds the pairs (h_i, x_{i+1}) for i = 0 .. p-1, and its output at pair p-1 gives
    the distribution of the first draft, for x_{p+1}.
A cycle feeds the full model [x_p, d_1 .. d_k] in one call, keeps n drafts plus one full-model token,
rolls the backbone cache back to p + n + 1 and the module cache back to p (the chained drafts used
the module's own state in place of h), then lets the module ingest the n + 1 real pairs.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch

from recyclegpt.cache import Tree
from recyclegpt.copy import CopyIndex, proposal_tensors
from recyclegpt.sampling import Sampler, SamplingConfig
from recyclegpt.strategies import Strategy, Verify, make_strategy


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
    if strategy.uses_module and module is None:
        raise GenerationError(f"strategy {strategy.name!r} needs a recyclable module; pass --module PATH")
    B = len(prompts)
    P = max(len(p) for p in prompts)
    device = next(backbone.parameters()).device
    room = P + max_new_tokens + getattr(strategy, "k", 1) + getattr(strategy, "width", 1)
    tree = strategy.tree
    if tree is not None:
        if not getattr(backbone, "supports_tree", False):
            raise GenerationError(
                f"a draft width above 1 needs the native backbone, not {type(backbone).__name__}: "
                "use --backend native (Llama-family models) or a draft width of 1"
            )
        tree = Tree(tree.depth.to(device), tree.mask.to(device))
    pads = [P - len(p) for p in prompts]
    tokens = torch.tensor([[pad_id] * n + list(p) for n, p in zip(pads, prompts, strict=True)], device=device)
    cache = backbone.new_cache(B, room)
    mcache = module.new_cache(B, room) if strategy.uses_module else None
    if any(pads):
        cache.set_padding(pads)
        if mcache is not None:
            mcache.set_padding(pads)
    vocab = backbone.config.vocab_size
    seen = torch.zeros(B, vocab, dtype=torch.bool, device=device)
    for row, p in enumerate(prompts):
        seen[row, list(p)] = True
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    # A module with a copy gate drafts from its mixture with tokens copied from each row's context (a module
    # without the attribute, e.g. a test stub, has none).
    copying = strategy.uses_module and getattr(module, "copy_gate", None) is not None
    indices = [CopyIndex(p) for p in prompts] if copying else []
    stats.batch, stats.prompt_tokens = B, sum(len(p) for p in prompts)
    stats.finish_reasons = ["length"] * B

    def emit(new: torch.Tensor) -> list[list[int]]:
        """Append (B, n) tokens to unfinished rows, applying stop criteria; returns what was added."""
        added: list[list[int]] = [[] for _ in range(B)]
        for row, ids in enumerate(new.tolist()):
            for tok in ids:
                if done[row]:
                    break
                out[row].append(tok)
                added[row].append(tok)
                if copying:
                    indices[row].extend([tok])
                if tok in eos_ids or (stop_fn and stop_fn(row, out[row])):
                    done[row], stats.finish_reasons[row] = True, "stop"
                elif len(out[row]) >= max_new_tokens:
                    done[row] = True
        stats.new_tokens += sum(len(a) for a in added)
        return added

    def module_step(hidden: torch.Tensor, nxt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = module(hidden, backbone.embed(nxt), mcache)  # (B, T, d)
        stats.module_calls += 1
        return module.draft_logits(backbone, g[:, -1]), g[:, -1:]  # next draft's logits, state for chaining

    def with_copies(logits: torch.Tensor, drafts: list[torch.Tensor]) -> torch.Tensor:
        """The module's logits mixed with each row's copy candidate after its context and ``drafts``."""
        suffix = torch.stack(drafts, 1).tolist() if drafts else [[]] * B
        cand, feats = proposal_tensors([index.propose(s) for index, s in zip(indices, suffix, strict=True)], device)
        return module.copy_logits(logits, cand, feats)

    # 1. Prefill: one full call over the prompt; the module ingests every prompt pair.
    t0 = time.perf_counter()
    logits, hidden = backbone(tokens, cache, logits_last=1)
    stats.full_calls += 1
    pending = sampler.token(logits[:, -1], seen)  # (B,)
    if strategy.uses_module:
        draft_logits, state = module_step(hidden, torch.cat([tokens[:, 1:], pending[:, None]], 1))
    stats.prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    yield emit(pending[:, None])
    seen.scatter_(1, pending[:, None], True)
    keep_q = strategy.checks_drafts and not sampler.cfg.greedy  # only the sampled-draft test reads q

    while not all(done):
        # 2. Draft: k module steps; the first reuses the logits from the last ingest. Side drafts
        # (other candidates for the first slot) go along when the strategy lays the call out as a tree.
        if copying:
            draft_logits = with_copies(draft_logits, [])
        k = strategy.draft_len(draft_logits if strategy.uses_module else None)
        start, mstart = cache.length, (mcache.length if mcache is not None else 0)
        drafts, qs, side = [], [], None
        for j in range(k):
            if j > 0:
                draft_logits, state = module_step(state, drafts[-1][:, None])
                if copying:
                    draft_logits = with_copies(draft_logits, drafts)
            if keep_q:
                qs.append(sampler.probs(draft_logits, seen))
                drafts.append(sampler.choose(qs[-1]))
            else:
                drafts.append(sampler.token(draft_logits, seen))
            if j == 0 and tree is not None:
                side = strategy.side_drafts(draft_logits, drafts[0])
        drafts_t = torch.stack(drafts, 1) if drafts else pending.new_zeros(B, 0)
        # 3. Full call over [pending, drafts, side drafts], then the strategy keeps n drafts and picks one token.
        fed = torch.cat([pending[:, None], drafts_t, *([] if side is None else [side])], 1)
        scored = fed.shape[1] if strategy.checks_drafts else 1
        logits, hidden = backbone(fed, cache, logits_last=scored, **({} if side is None else {"tree": tree}))
        stats.full_calls += 1
        draft_probs = torch.stack(qs, 1) if qs else logits.new_zeros(B, k, 0)
        n, nxt, path = strategy.accept(Verify(drafts_t, draft_probs, logits, seen, side), sampler)
        stats.drafted += k * B
        stats.accepted += n * B
        stats.rejected += (k - n) * B
        # 4. Roll back what was not kept (a side branch moves next to its root first); emit; the module
        # ingests the n + 1 real pairs.
        if path is None:
            kept, hid = drafts_t[:, :n], hidden[:, : n + 1]
        else:
            cache.keep(start, path)
            kept = fed.gather(1, path)
            rows = torch.cat([torch.zeros_like(path[:, :1]), path], 1)  # (B, n + 1)
            hid = hidden.gather(1, rows[:, :, None].expand(-1, -1, hidden.shape[-1]))
        cache.rollback(start + n + 1)
        new = torch.cat([kept, nxt[:, None]], 1)  # (B, n + 1)
        seen.scatter_(1, new, True)
        added = emit(new)
        if strategy.uses_module and not all(done):
            mcache.rollback(mstart)
            draft_logits, state = module_step(hid, new)
        pending = nxt
        yield added
    stats.decode_s = time.perf_counter() - t0


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
        draft_len: int,
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
        draft_len: int = 1,
        threshold: float = 0.5,
        draft_width: int = 1,
    ) -> list[Generation]:
        """Generate continuations for a batch of prompts (text or token ids, left-padded together).

        Args:
            prompts: texts (encoded as they are; apply a chat template first if wanted) or token ids.
            strategy: ``standard``, ``alternating``, ``verified`` or ``adaptive`` (or a Strategy).
            max_new_tokens: upper bound on new tokens per row.
            sampling: sampling options; greedy by default.
            stop: strings that end a row (the text is cut before them).
            draft_len: module steps per cycle for ``verified``.
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
        draft_len: int = 1,
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
