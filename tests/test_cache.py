"""The KV cache on its own, on tiny tensors: writes by position, rollback, keeping a tree branch, left padding,
the attention masks and row views. (The cache inside a model, against the uncached forward: test_model.py.)"""

import pytest
import torch

from recyclegpt.cache import CacheFullError, KVCache, Tree


def _cache(batch: int = 1, max_len: int = 8, layers: int = 2) -> KVCache:
    return KVCache(layers, batch, n_kv_heads=1, head_dim=2, max_len=max_len)


def _kv(batch: int, start: int, n: int) -> torch.Tensor:
    """(batch, 1, n, 2) keys whose values name their slot (and row): slot s of row b holds [s, 10 * b]."""
    slots = torch.arange(start, start + n, dtype=torch.float32).expand(batch, n)
    rows = 10 * torch.arange(batch, dtype=torch.float32)[:, None].expand(batch, n)
    return torch.stack([slots, rows], -1)[:, None]  # (batch, 1, n, 2)


def _write(cache: KVCache, n: int) -> None:
    """Every layer writes ``n`` slots, as a forward does, then the cache advances."""
    kv = _kv(cache.batch, cache.length, n)
    for layer in range(len(cache.k)):
        cache.write(layer, kv, -kv)
    cache.advance(n)


def test_write_stores_at_the_next_slots_and_returns_everything_so_far():
    cache = _cache()
    k, v = cache.write(0, _kv(1, 0, 3), -_kv(1, 0, 3))
    assert k.shape == (1, 1, 3, 2) and torch.equal(k, _kv(1, 0, 3)) and torch.equal(v, -_kv(1, 0, 3))
    assert cache.length == 0  # until advance
    cache.write(1, _kv(1, 0, 3), -_kv(1, 0, 3))
    cache.advance(3)
    k, _ = cache.write(0, _kv(1, 3, 2), -_kv(1, 3, 2))
    assert k.shape == (1, 1, 5, 2) and k[0, 0, :, 0].tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(cache.k[0][0, 0, 5:], torch.zeros(3, 2))  # nothing written past the call


def test_rollback_forgets_slots_and_rewrites_them_in_place():
    cache = _cache()
    _write(cache, 5)
    storage = [t.data_ptr() for t in cache.k + cache.v]
    cache.rollback(3)
    assert cache.length == 3
    other = torch.full((1, 1, 2, 2), 7.0)
    k, _ = cache.write(0, other, other)
    assert torch.equal(k[0, 0, 3:], other[0, 0]) and k[0, 0, :3, 0].tolist() == [0, 1, 2]
    assert [t.data_ptr() for t in cache.k + cache.v] == storage  # no reallocation
    for bad in (4, -1):
        with pytest.raises(ValueError, match=f"cannot roll back to {bad}: cache length is 3"):
            cache.rollback(bad)


def test_a_full_cache_says_how_full():
    cache = _cache(max_len=4)
    _write(cache, 3)
    cache.check_room(1)
    with pytest.raises(CacheFullError, match="cache holds 4 tokens; 3 used, cannot add 2 more"):
        cache.check_room(2)


def test_causal_mask_of_a_chain_call():
    cache = _cache()
    _write(cache, 2)
    assert cache.attn_mask(1) is None  # one token, no padding: every key, the fast path
    mask = cache.attn_mask(3)
    assert mask.shape == (1, 1, 3, 5)
    assert mask[0, 0].int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_tree_mask_lets_each_candidate_see_the_prefix_and_its_ancestors():
    tree = Tree.from_parents([-1, 0, 1, 0])  # root, a chain of two drafts, and a side candidate of the first
    assert tree.depth.tolist() == [0, 1, 2, 1]
    assert tree.mask.int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]]
    cache = _cache()
    _write(cache, 2)
    mask = cache.attn_mask(4, tree.mask)
    assert mask[0, 0].int().tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0],
                                         [1, 1, 1, 0, 0, 1]]


@pytest.mark.parametrize("parents", [[], [0, 0], [-1, 1], [-1, 0, 3, 0]])
def test_tree_parents_are_checked(parents):
    with pytest.raises(ValueError, match="parents must start with -1 and name earlier tokens"):
        Tree.from_parents(parents)


def test_left_padding_is_never_a_key_and_a_padding_query_sees_itself():
    cache = _cache(batch=2)
    cache.set_padding([2, 0])
    assert cache.has_padding and cache.valid[:, :3].int().tolist() == [[0, 0, 1], [1, 1, 1]]
    mask = cache.attn_mask(3)  # the prompts' call: slots 0..2
    assert mask.shape == (2, 1, 3, 3)
    assert mask[0, 0].int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]  # padding queries: themselves only
    assert mask[1, 0].int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    _write(cache, 3)
    mask = cache.attn_mask(1)  # one token, but padding: a mask all the same
    assert mask[:, 0, 0].int().tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    with pytest.raises(ValueError, match="expected 2 pad lengths, got 1"):
        cache.set_padding([1])
    cache.reset()
    assert cache.length == 0 and not cache.has_padding and bool(cache.valid.all())


def test_keep_moves_each_row_kept_branch_next_to_its_root():
    cache = _cache(batch=2)
    _write(cache, 2)  # prefix: slots 0, 1
    _write(cache, 4)  # a tree call: root at slot 2, new tokens at offsets 0..3 (slots 2..5)
    before = [t.clone() for t in cache.k + cache.v]
    cache.keep(2, torch.tensor([[3], [1]]))  # row 0 keeps offset 3 (slot 5), row 1 offset 1 (slot 3)
    cache.rollback(4)
    for t, old in zip(cache.k + cache.v, before, strict=True):
        assert torch.equal(t[0, :, 3], old[0, :, 5]) and torch.equal(t[1, :, 3], old[1, :, 3])
        assert torch.equal(t[:, :, :3], old[:, :, :3])  # the prefix and the root stay
    assert cache.k[0][:, 0, :4, 0].tolist() == [[0, 1, 2, 5], [0, 1, 2, 3]]


def test_keep_moves_a_branch_of_several_tokens_in_order():
    cache = _cache(max_len=10)
    _write(cache, 1)
    _write(cache, 6)  # root at slot 1, offsets 1..5 at slots 2..6
    cache.keep(1, torch.tensor([[4, 5]]))  # a side branch of two: slots 5, 6 -> 2, 3
    cache.rollback(4)
    assert cache.k[0][0, 0, :4, 0].tolist() == [0, 1, 5, 6]


def test_row_views_lay_out_each_token_as_a_one_token_call():
    cache = _cache()
    _write(cache, 2)
    views = cache.row_views(3)  # a chain: token i reads the slots up to its own
    assert views.keys == [slice(0, 3), slice(0, 4), slice(0, 5)] and views.masks == [None, None, None]
    views = cache.row_views(3, Tree.from_parents([-1, 0, 0]).mask)  # the third token is the second's sibling
    assert views.keys[:2] == [slice(0, 3), slice(0, 4)]
    assert views.keys[2].tolist() == [0, 1, 2, 4]  # the prefix, the root, itself: not its sibling at slot 3


def test_row_views_carry_the_padding_mask():
    cache = _cache(batch=2)
    cache.set_padding([1, 0])
    _write(cache, 3)
    views = cache.row_views(2)
    assert views.keys == [slice(0, 4), slice(0, 5)]
    assert views.masks[0].shape == (2, 1, 1, 4) and views.masks[1].shape == (2, 1, 1, 5)
    assert views.masks[1][:, 0, 0].int().tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]


def _row_slots(cache: KVCache, row: int) -> list[int]:
    """The slot numbers (as written by ``_kv``) a row holds, in order, holes skipped."""
    k = cache.k[0][row, 0, : cache.length, 0]
    return [int(s) for s, ok in zip(k, cache.valid[row, : cache.length], strict=True) if ok]


def test_rows_keep_their_own_counts_as_holes_and_positions_stay_their_own():
    cache = _cache(batch=2, max_len=12)
    _write(cache, 3)  # a prompt of 3 in both rows
    _write(cache, 3)  # a call over [pending, d1, d2]: row 0 keeps all 3 slots, row 1 only the pending one
    cache.commit_rows(3, torch.tensor([3, 1]))
    assert cache.length == 6 and _row_slots(cache, 0) == [0, 1, 2, 3, 4, 5] and _row_slots(cache, 1) == [0, 1, 2, 3]
    assert cache.positions(torch.arange(2)).tolist() == [[6, 7], [4, 5]]  # each row's next positions
    # ``skip``: a call whose first slots in row 0 are filler (a row with fewer tokens, right-aligned).
    cache.skip(torch.tensor([2, 0]), 3)
    _write(cache, 3)
    assert _row_slots(cache, 0) == [0, 1, 2, 3, 4, 5, 8] and _row_slots(cache, 1) == [0, 1, 2, 3, 6, 7, 8]
    assert cache.positions(torch.arange(1)).tolist() == [[7], [7]]  # both rows now hold 7 tokens
    # Rolling back past a write leaves those slots valid for the next one.
    _write(cache, 2)
    cache.rollback(9)
    assert bool(cache.valid[:, 9:].all()) and cache.holes == 2 + 2


def test_rows_leave_join_grow_and_compact_without_moving_positions():
    cache = _cache(batch=2, max_len=6)
    _write(cache, 4)
    _write(cache, 2)
    cache.commit_rows(4, torch.tensor([1, 2]))  # row 0: a hole at slot 5
    cache.select([1, 0])  # reorder (and a row could leave)
    assert _row_slots(cache, 1) == [0, 1, 2, 3, 4] and cache.shift.tolist() == [0, 1]
    # A newcomer prefilled alone with 8 tokens (more than this cache's 6): the old rows skip ahead.
    other = _cache(batch=1, max_len=10)
    _write(other, 8)
    cache.extend(other)
    assert cache.batch == 3 and cache.length == 8 and cache.max_len >= 10
    assert _row_slots(cache, 2) == list(range(8)) and cache.shift.tolist() == [2, 3, 0]
    before = cache.positions(torch.arange(1)).tolist()
    # A shorter newcomer (2 tokens) lands right-aligned, its positions its own.
    short = _cache(batch=1, max_len=4)
    _write(short, 2)
    cache.extend(short)
    assert _row_slots(cache, 3) == [0, 1] and cache.positions(torch.arange(1)).tolist()[3] == [2]
    assert cache.holes == 2 + 3 + 0 + 6
    cache.compact()  # the longest row (8) sets the length; each row's tokens keep their order and positions
    assert cache.length == 8 and cache.holes == 2 + 3 + 6
    assert [_row_slots(cache, r) for r in range(4)] == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4], list(range(8)), [0, 1]]
    assert cache.positions(torch.arange(1)).tolist() == [*before, [2]]
    cache.grow(20)
    assert cache.max_len >= 28 and _row_slots(cache, 2) == list(range(8))
