"""A preallocated key/value cache written by position.

Each layer owns a key and a value tensor of shape (batch, kv_heads, max_len, head_dim), allocated
once. A forward over T new tokens writes slots ``[length, length + T)`` with ``index_copy_``, which
``torch.compile`` keeps in place (a slice assignment into one tensor shared by all layers made it copy
the whole cache on every write); rolling a rejected draft back is ``rollback(new_length)``: index
arithmetic, no reallocation. Slots beyond ``length`` hold stale values that the attention mask never
reads.

Left padding (batched prompts of different lengths) is recorded in ``valid``: a (batch, max_len)
bool tensor, False for padding slots, which the attention mask excludes as keys.

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
        self.has_padding = False
        self.length = 0
        self.max_len = max_len
        # causal[i, j]: slot i may attend to slot j. Sliced per forward, never rebuilt.
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
        self.has_padding = any(n > 0 for n in pad_lengths)

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
        self.length = length

    def reset(self) -> None:
        """Empty the cache for a new sequence (keeps the allocation)."""
        self.length = 0
        self.valid.fill_(True)
        self.has_padding = False


def _eye(n: int, m: int, offset: int, device: torch.device) -> torch.Tensor:
    """(n, m) bool matrix that is True at [i, i + offset]."""
    out = torch.zeros(n, m, dtype=torch.bool, device=device)
    idx = torch.arange(n, device=device)
    out[idx, idx + offset] = True
    return out
