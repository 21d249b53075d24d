"""A preallocated key/value cache written by position.

Each layer owns a key and a value tensor of shape (batch, kv_heads, max_len, head_dim), allocated
once. A forward over T new tokens writes slots ``[length, length + T)`` with ``index_copy_``, which
``torch.compile`` keeps in place (a slice assignment into one tensor shared by all layers made it copy
the whole cache on every write); rolling a rejected draft back is ``rollback(new_length)``: index
arithmetic, no reallocation. Slots beyond ``length`` hold stale values that the attention mask never
reads.

Rows need not hold the same number of tokens. ``valid``, a (batch, max_len) bool tensor, is False
for the slots of a row that hold nothing of it: left padding (batched prompts of different lengths),
drafts one row kept and another did not (``commit_rows``), filler in front of a row's tokens
(``skip``), or the slots before a row that joined a running batch (``extend``). The attention mask
excludes them as keys, and ``shift`` (batch,) keeps every row's positions its own: the token in slot s
of row b sits at position s - shift[b], the count of its tokens before it, so each row is positioned as
if it were decoded alone. ``compact`` squeezes the holes out when they pile up. Slots at or beyond
``length`` are always valid (rollback restores them).

A call's new tokens may also form a tree (``Tree``): several candidates for the same position, each
seeing the cache and its own ancestors only. After verification ``keep`` moves the slots of the kept
branch next to the cached prefix, so the cache is again one sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tree:
    """The layout of one call's new tokens as a tree (draft candidates verified side by side).

    Attributes:
        depth: (T,) position of each new token counted from the cache's length (the root is 0).
        mask: (T, T) bool, ``mask[i, j]``: new token i may attend to new token j (its ancestors and itself).
    """

    depth: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def from_parents(cls, parents: Sequence[int]) -> Tree:
        """A tree (on the CPU) from each new token's parent index (-1 for the root, which must come
        first; a parent comes before its children)."""
        if not parents or parents[0] != -1 or any(not 0 <= q < i for i, q in enumerate(parents) if i):
            raise ValueError(f"parents must start with -1 and name earlier tokens, got {list(parents)}")
        T = len(parents)
        mask = torch.eye(T, dtype=torch.bool)
        depth = [0] * T
        for i in range(1, T):
            mask[i] |= mask[parents[i]]
            depth[i] = depth[parents[i]] + 1
        return cls(torch.tensor(depth), mask)


@dataclass(frozen=True)
class RowViews:
    """For each new token of a call, the keys it attends to laid out as a one-token call would see them.

    A one-token call at the slot right after ``length`` keys reads the slice ``[:length + 1]`` of the cache
    (with the padding mask, if any). Attending row by row through these views gives every new token
    bit for bit that call's result, whatever the other tokens of the call; one call over all of them may
    round differently (its kernel blocks the queries), which matters where the products round their inputs
    to bfloat16 (``quant.py``).

    Attributes:
        keys: per new token, a slice of the cache (a chain) or the slot indices (a tree branch: the prefix,
            then the token's ancestors and itself in order).
        masks: per new token, the (batch, 1, 1, n) key mask, or None without padding.
    """

    keys: list[slice | torch.Tensor]
    masks: list[torch.Tensor | None]


class CacheFullError(ValueError):
    """Writing would run past the cache's preallocated length."""


class KVCache:
    """Static KV cache for one stack of attention layers (a backbone or a recyclable module).

    Args:
        n_layers: attention layers that write into it.
        batch: rows decoded together.
        n_kv_heads: key/value heads per layer.
        head_dim: width of one head.
        max_len: slots preallocated per row; the hard limit on prompt + generated tokens.
        dtype: storage dtype (match the model's parameters).
        device: where the tensors live.
    """

    ragged = True  # rows may hold different lengths (``commit_rows``, ``skip``, ``select``, ``extend``)

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.shift = torch.zeros(batch, dtype=torch.long, device=device)
        self.has_padding = False  # some slot below ``length`` is not valid (and ``shift`` is not all zero)
        self.length = 0
        self.max_len = max_len
        # causal[i, j]: slot i may attend to slot j. Sliced per forward, rebuilt only when the cache grows.
        self._causal = torch.ones(max_len, max_len, dtype=torch.bool, device=device).tril()

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    def set_padding(self, pad_lengths: list[int]) -> None:
        """Mark the first ``pad_lengths[b]`` slots of row b as left padding (never attended to)."""
        if len(pad_lengths) != self.batch:
            raise ValueError(f"expected {self.batch} pad lengths, got {len(pad_lengths)}")
        self.valid.fill_(True)
        for row, n in enumerate(pad_lengths):
            self.valid[row, :n] = False
        self.shift.copy_(torch.tensor(pad_lengths))
        self.has_padding = any(n > 0 for n in pad_lengths)

    def positions(self, offsets: torch.Tensor) -> torch.Tensor:
        """Positions of new tokens at slots ``length + offsets`` (offsets (T,)): (T,) when no row is
        shifted, else (batch, T), each row's own (clamped at 0 for filler slots, which nothing reads)."""
        pos = self.length + offsets
        if not self.has_padding:
            return pos
        return (pos[None] - self.shift[:, None]).clamp(min=0)

    def check_room(self, n_new: int) -> None:
        """Raise a clear error if ``n_new`` more tokens do not fit."""
        if self.length + n_new > self.max_len:
            raise CacheFullError(
                f"cache holds {self.max_len} tokens; {self.length} used, cannot add {n_new} more"
            )

    def attn_mask(self, n_new: int, tree: torch.Tensor | None = None) -> torch.Tensor | None:
        """Boolean mask (batch or 1, 1, n_new, length + n_new) for queries at the next n_new slots.

        ``tree`` (n_new, n_new), from ``Tree.mask``, replaces the causal order among the new tokens.
        Returns None when every visible key may be attended (one new token, no padding), which lets
        ``scaled_dot_product_attention`` take its fastest path.
        """
        start, end = self.length, self.length + n_new
        if n_new == 1 and not self.has_padding:
            return None
        mask = self._causal[start:end, :end]  # (T, end), a view
        if tree is not None:
            mask = torch.cat([mask[:, :start], tree], 1)  # every new token sees the whole prefix
        if self.has_padding:
            mask = mask & self.valid[:, None, None, :end]  # (B, 1, T, end)
            # A padding query must attend somewhere (else softmax is NaN): let it see itself.
            mask = mask | _eye(n_new, end, start, mask.device)
            return mask
        return mask[None, None]

    def row_views(self, n_new: int, tree: torch.Tensor | None = None) -> RowViews:
        """``RowViews`` for queries at the next ``n_new`` slots, laid out as a chain or as ``tree`` (n_new, n_new)."""
        start, keys, masks = self.length, [], []
        seen = self._causal[:n_new, :n_new] if tree is None else tree
        for i in range(n_new):
            own = seen[i].nonzero().flatten()  # the new tokens query i sees: its ancestors and itself
            if torch.equal(own, torch.arange(i + 1, device=own.device)):
                keys.append(slice(0, start + i + 1))
                slots = None
            else:
                slots = torch.cat([torch.arange(start, device=own.device), start + own])
                keys.append(slots)
            if self.has_padding:
                valid = self.valid[:, : start + i + 1] if slots is None else self.valid[:, slots]
                masks.append(valid[:, None, None, :])
            else:
                masks.append(None)
        return RowViews(keys, masks)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values (B, kv_heads, T, head_dim) at slots [length, length+T).

        Returns views of all keys and values up to the new end. ``advance`` must be called once
        after every layer has written.
        """
        start, end = self.length, self.length + k.shape[2]
        slots = torch.arange(start, end, device=k.device)
        self.k[layer].index_copy_(2, slots, k)
        self.v[layer].index_copy_(2, slots, v)
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def read(self, n_layers: int, slots: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of the keys and values of the first ``n_layers`` layers at one slot per row (slots (batch,)):
        per layer, (keys, values), each (batch, kv_heads, 1, head_dim)."""
        k0 = self.k[0]
        idx = slots.view(-1, 1, 1, 1).expand(k0.shape[0], k0.shape[1], 1, k0.shape[3])
        return [(self.k[i].gather(2, idx), self.v[i].gather(2, idx)) for i in range(n_layers)]

    def advance(self, n_new: int) -> None:
        """Count ``n_new`` written slots as part of the sequence."""
        self.length += n_new

    def keep(self, start: int, path: torch.Tensor) -> None:
        """Move the kept branch of a tree call next to its root: for each row b, the slots
        ``start + path[b]`` (path (B, n) offsets from the root at ``start``) go to slots
        ``start + 1 .. start + n``. Call ``rollback(start + n + 1)`` afterwards."""
        B, n = path.shape
        for cache in (self.k, self.v):
            for t in cache:
                idx = (start + path)[:, None, :, None].expand(B, t.shape[1], n, t.shape[3])
                t[:, :, start + 1 : start + 1 + n] = t.gather(2, idx)  # gather copies first: no overlap issue

    def rollback(self, length: int) -> None:
        """Forget every slot from ``length`` on (e.g. a rejected draft token)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back to {length}: cache length is {self.length}")
        if self.has_padding:
            self.valid[:, length : self.length] = True
        self.length = length

    def commit_rows(self, start: int, kept: torch.Tensor) -> None:
        """After a call that wrote slots from ``start``, keep the first ``kept[b]`` of them in row b
        (kept (batch,) >= 1) and forget the rest: the cache ends at ``start + max(kept)``, and a row that
        kept fewer has holes there."""
        width = int(kept.max())
        short = width - kept
        if bool(short.any()):
            hole = torch.arange(width, device=kept.device)[None] >= kept[:, None]  # (B, width)
            self.valid[:, start : start + width] &= ~hole
            self.shift += short
            self.has_padding = True
        self.rollback(start + width)

    def skip(self, short: torch.Tensor, width: int) -> None:
        """The next call writes ``width`` slots of which, in row b, the first ``short[b]`` are filler (a
        row with fewer tokens than others, right-aligned): make them holes before the call."""
        if not bool(short.any()):
            return
        self.check_room(width)
        hole = torch.arange(width, device=short.device)[None] < short[:, None]
        self.valid[:, self.length : self.length + width] &= ~hole
        self.shift += short
        self.has_padding = True

    def select(self, rows: Sequence[int]) -> None:
        """Keep only these rows, in this order (rows that left a running batch are dropped)."""
        idx = torch.tensor(list(rows), dtype=torch.long, device=self.valid.device)
        self.k = [t.index_select(0, idx) for t in self.k]
        self.v = [t.index_select(0, idx) for t in self.v]
        self.valid, self.shift = self.valid.index_select(0, idx), self.shift.index_select(0, idx)

    def extend(self, other: KVCache) -> None:
        """Append ``other``'s rows (e.g. prompts just prefilled) after this cache's, aligned on the end:
        the shorter side gets holes in front, so both continue at the same next slot."""
        if other.batch == 0:
            return
        if self.batch == 0:
            self.length = 0
        if other.length > self.length:  # this cache's rows skip ahead: holes at [length, other.length)
            self.grow(other.length - self.length)
            self.valid[:, self.length : other.length] = False
            self.shift += other.length - self.length
            self.has_padding = self.has_padding or self.batch > 0
            self.length = other.length
        gap = self.length - other.length
        self.grow(other.max_len - other.length)  # at least the room the newcomers had
        moved = [self._placed(t, gap, other.length) for t in other.k], [self._placed(t, gap, other.length)
                                                                          for t in other.v]
        valid = torch.ones(other.batch, self.max_len, dtype=torch.bool, device=self.valid.device)
        valid[:, :gap] = False
        valid[:, gap : self.length] = other.valid[:, : other.length]
        self.k = [torch.cat([a, b]) for a, b in zip(self.k, moved[0], strict=True)]
        self.v = [torch.cat([a, b]) for a, b in zip(self.v, moved[1], strict=True)]
        self.valid = torch.cat([self.valid, valid])
        self.shift = torch.cat([self.shift, other.shift + gap])
        self.has_padding = self.has_padding or gap > 0 or other.has_padding

    def _placed(self, t: torch.Tensor, gap: int, n: int) -> torch.Tensor:
        """``t``'s first n slots at slots [gap, gap + n) of a tensor as long as this cache's."""
        out = t.new_zeros(t.shape[0], t.shape[1], self.max_len, t.shape[3])
        out[:, :, gap : gap + n] = t[:, :, :n]
        return out

    def grow(self, n_more: int) -> None:
        """Make room for ``n_more`` slots after ``length`` (reallocating, at least 1.5 times as long)."""
        need = self.length + n_more
        if need <= self.max_len:
            return
        size = max(need, self.max_len * 3 // 2)
        pad = size - self.max_len
        self.k = [torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in self.k]
        self.v = [torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in self.v]
        self.valid = torch.nn.functional.pad(self.valid, (0, pad), value=True)
        self.max_len = size
        self._causal = torch.ones(size, size, dtype=torch.bool, device=self.valid.device).tril()

    def compact(self) -> None:
        """Squeeze out every hole: each row's tokens move, in order, to the end of the shortest prefix
        that holds the longest row (the shorter rows left-padded), positions unchanged."""
        if not self.has_padding:
            return
        L = self.length
        valid = self.valid[:, :L]
        counts = valid.sum(1)  # (B,)
        new = int(counts.max())
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # each row's token slots first
        offset = torch.arange(new, device=valid.device)[None] - (new - counts)[:, None]  # < 0: padding
        src = order.gather(1, offset.clamp(min=0))  # (B, new)
        for cache in (self.k, self.v):
            for t in cache:
                idx = src[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])
                t[:, :, :new] = t.gather(2, idx)
        self.valid[:, :new] = offset >= 0
        self.valid[:, new:] = True
        self.shift = new - counts
        self.has_padding = bool((self.shift > 0).any())
        self.length = new

    @property
    def holes(self) -> int:
        """Slots below ``length`` that hold nothing, over all rows (what ``compact`` would free)."""
        return int((~self.valid[:, : self.length]).sum()) if self.has_padding else 0

    def reset(self) -> None:
        """Empty the cache for a new sequence (keeps the allocation)."""
        self.length = 0
        self.valid.fill_(True)
        self.shift.zero_()
        self.has_padding = False


def _eye(n: int, m: int, offset: int, device: torch.device) -> torch.Tensor:
    """(n, m) bool matrix that is True at [i, i + offset]."""
    out = torch.zeros(n, m, dtype=torch.bool, device=device)
    idx = torch.arange(n, device=device)
    out[idx, idx + offset] = True
    return out
