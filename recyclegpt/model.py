"""A Llama-style decoder-only backbone in one file.

RMSNorm, rotary position embeddings (the rotate-half convention of Hugging Face's Llama), grouped-query
attention through ``scaled_dot_product_attention`` and a SwiGLU feed-forward. Parameter names follow
Hugging Face's ``LlamaForCausalLM`` without the ``model.`` prefix, so converting a checkpoint is a
rename (see ``recyclegpt.bases``).

Every backbone, native or wrapped (``recyclegpt.bases.hf.HFBackbone``), offers the same interface to
the recyclable module and the decoder:

* ``forward(tokens, cache=None, logits_last=None) -> (logits, hidden)``: ``hidden`` is the final
  hidden state after the last norm, the vector the LM head reads;
* ``embed(tokens)``: the input embeddings the first layer reads;
* ``head(hidden)``: the LM head applied to final hidden states (``head_weight()`` is its matrix and
  ``head_transform`` what follows the product, e.g. soft-capping);
* ``new_cache(batch, max_len)``: a cache that takes several tokens per call and rolls back;
* ``config``: a ``ModelConfig`` describing its widths.

The native backbone may share blocks across depth (``ModelConfig.n_unique_layers``: logical layer i runs
block i % n_unique_layers, with its own cache slot) and hands out an early-layer state on request
(``forward(..., exit_layer=k)``, ``early_logits``), the two ingredients of SPEED (arXiv 2310.12072).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from recyclegpt.cache import KVCache, RowViews, Tree
from recyclegpt.config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 and cast back."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables, each (max_len, head_dim), for the rotate-half RoPE convention.

    The sin table is [-sin ; sin] over the two halves of a head, so that rotating is a roll by half a
    head (see ``apply_rope``). Always built on the CPU (also inside a ``torch.device("meta")``
    context), then moved with the model.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64, device="cpu"), inv_freq)  # (S, D/2)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1).float(), torch.cat([-sin, sin], dim=-1).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by the angles of its T positions (rows of the ``rope_tables``: (T, D), or
    (B, 1, T, D) when every row has positions of its own).

    x * cos + rotate_half(x) * sin, where rotate_half(x) = [-x2 ; x1] equals roll(x, D/2) times the
    signs already folded into the sin table.
    """
    return torch.addcmul(x * cos.to(x.dtype), x.roll(x.shape[-1] // 2, -1), sin.to(x.dtype))


class Attention(nn.Module):
    """Grouped-query self-attention that writes its keys and values into a ``KVCache``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.qkv_proj: nn.Module | None = None  # q, k and v as one product, once ``fuse_projections`` ran

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None,
                parts: list[Part]) -> torch.Tensor:
        """Attend x (B, T, d) at the positions of ``cos`` / ``sin``; without a cache causally over x itself, with
        one each part of the rows writing and reading its own logical layer's slot."""
        B, T, _ = x.shape
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            kv = self.n_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([self.n_heads * self.head_dim, kv, kv], -1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif len(parts) == 1:
            out = _attend(q, k, v, cache, parts[0])
        else:
            out = torch.cat([_attend(q[:, :, p.rows], k[:, :, p.rows], v[:, :, p.rows], cache, p) for p in parts], 2)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


@dataclass(frozen=True)
class Part:
    """Rows of one block call that write and read one logical layer's cache slot. A plain call is one part;
    SPEED's pipelined call (``Stack.wavefront``) runs tokens at two depths through one shared block as two.

    Attributes:
        rows: the part's tokens among the call's new tokens.
        layer: the logical layer whose keys and values they write and attend to.
        mask: their mask over that layer's keys (``KVCache.attn_mask``), ``RowViews``, or None (see every key).
        prefix: keys and values (B, kv_heads, n, head_dim) written in front of the part's own (a pipelined
            token's first layers, computed in an earlier call), or None.
    """

    rows: slice
    layer: int
    mask: torch.Tensor | RowViews | None
    prefix: tuple[torch.Tensor, torch.Tensor] | None = None


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, part: Part) -> torch.Tensor:
    """Write a part's keys and values (after its prefix) at the cache's next slots and attend its queries."""
    if part.prefix is not None:
        k, v = torch.cat([part.prefix[0], k], 2), torch.cat([part.prefix[1], v], 2)
    k, v = cache.write(part.layer, k, v)  # (B, KV, length + n, D)
    mask = part.mask
    if isinstance(mask, RowViews):  # one query at a time, each as a one-token call would see it
        return torch.cat([
            F.scaled_dot_product_attention(q[:, :, i : i + 1], k[:, :, cols], v[:, :, cols], attn_mask=m,
                                           enable_gqa=True)
            for i, (cols, m) in enumerate(zip(mask.keys, mask.masks, strict=True))], 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate and up as one product, once ``fuse_projections`` ran

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, -1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm transformer block; the recyclable module stacks the same class."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)
        # The compiled block (``kernels.attach``, quantized models): every call with a cache (prefill and decoding)
        # goes through it; calls without one (scoring, training) stay eager.
        self.fused = None

    def forward(self, x, cos, sin, cache, parts) -> torch.Tensor:
        if self.fused is not None and cache is not None:
            return self.fused(x, cos, sin, cache, parts)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, parts)
        return x + self.mlp(self.post_attention_layernorm(x))


class Stack(nn.Module):
    """N logical layers sharing rotary tables and one ``KVCache``: the body of backbone and module alike.

    With ``n_unique`` blocks (parameter sharing, ``ModelConfig.n_unique_layers``) logical layer i runs block
    i % n_unique; the cache still holds keys and values per logical layer, since a shared block sees another
    input at each of its depths.
    """

    def __init__(self, cfg: ModelConfig, n_layers: int, n_unique: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        # Attend row by row in calls over several new tokens (``cache.RowViews``): set for quantized products,
        # whose bfloat16 inputs turn a last-bit difference between one call and several into a flipped token.
        self.row_invariant = False
        # The compiled stack (``kernels.attach``, quantized models): calls with a cache run every layer in one call.
        self.fused = None
        self.n_layers = n_layers
        self.layers = nn.ModuleList(Block(cfg) for _ in range(n_unique or n_layers))
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None, tree: Tree | None = None, exit_layer: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run x (B, T, d) through every logical layer; with a cache, the T tokens follow its current length
        (in order, or laid out as ``tree``, which needs a cache).

        Returns:
            The output (B, T, d); with ``exit_layer`` k, (output, the residual stream after the first k
            logical layers (B, T, d)).
        """
        if exit_layer is not None and not 1 <= exit_layer <= self.n_layers:
            raise ValueError(f"exit_layer must be in [1, {self.n_layers}] (the logical layers), got {exit_layer}")
        T = x.shape[1]
        start = 0 if cache is None else cache.length
        if cache is not None:
            cache.check_room(T)
        elif T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        if tree is not None and (cache is None or tree.depth.shape[0] != T):
            raise ValueError(f"a tree of {T if tree is None else tree.depth.shape[0]} tokens needs a cache "
                             f"and {T} new tokens")
        cos, sin = self._rope(cache, T, tree)
        mask = None if cache is None else cache.attn_mask(T, None if tree is None else tree.mask)
        if self.row_invariant and cache is not None and T > 1 and start > 0:  # a decode call, not a prefill
            mask = cache.row_views(T, None if tree is None else tree.mask)
        early = None
        if self.fused is not None and cache is not None:  # compiled layers
            if exit_layer is not None:
                x = early = self.fused(x, cos, sin, cache, mask, 0, exit_layer)
            x = self.fused(x, cos, sin, cache, mask, exit_layer or 0, self.n_layers)
        else:
            for i in range(self.n_layers):
                x = self.block(i)(x, cos, sin, cache, [Part(slice(None), i, mask)])  # the cache's slot i: layer i's
                if i + 1 == exit_layer:
                    early = x
        if cache is not None:
            cache.advance(T)
        return x if exit_layer is None else (x, early)

    def block(self, layer: int) -> Block:
        """The block logical layer ``layer`` runs (block layer % n_unique)."""
        return self.layers[layer % len(self.layers)]

    def _rope(self, cache: KVCache | None, T: int, tree: Tree | None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables of T new tokens after the cache's length (in order, or at a tree's depths):
        (T, D), or (B, 1, T, D) where each row has positions of its own."""
        start = 0 if cache is None else cache.length
        if tree is None and (cache is None or not cache.has_padding):  # positions start .. start + T - 1
            return self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        offsets = torch.arange(T, device=self.rope_cos.device) if tree is None else tree.depth
        pos = cache.positions(offsets)
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        return (cos[:, None], sin[:, None]) if pos.dim() == 2 else (cos, sin)

    def head_start(self, x: torch.Tensor, cache: KVCache, exit_layer: int
                   ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Run one new token per row, x (B, 1, d), through the first ``exit_layer`` logical layers at the cache's
        next slot, as a one-token call would; the cache does not advance.

        Returns:
            The residual stream after those layers (B, 1, d), and their keys and values at that slot
            (``KVCache.read``), for ``wavefront``.
        """
        cache.check_room(1)
        cos, sin = self._rope(cache, 1, None)
        mask = cache.attn_mask(1)
        if self.fused is not None:
            x = self.fused(x, cos, sin, cache, mask, 0, exit_layer)
        else:
            for i in range(exit_layer):
                x = self.block(i)(x, cos, sin, cache, [Part(slice(None), i, mask)])
        return x, cache.read(exit_layer, torch.full((x.shape[0],), cache.length, device=x.device))

    def wavefront(self, late: torch.Tensor, stash: list[tuple[torch.Tensor, torch.Tensor]], early: torch.Tensor,
                  cache: KVCache, exit_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """SPEED's pipelined call: the pending token finishes while its speculated successors start.

        The pending token sits at the cache's next slot; its first ``exit_layer`` layers ran in an earlier
        call (``head_start`` or a ``wavefront`` that speculated it), which left ``late`` (B, 1, d), its residual
        after them, and ``stash``, their keys and values. It now runs layers exit_layer .. n_layers - 1, while
        w candidates for the token after it, ``early`` (B, w, d) embeddings at the w slots after it (each seeing
        the context, the pending token and itself), run layers 0 .. exit_layer - 1. Tick t runs the pending
        token at layer exit_layer + t and the candidates at layer t; where those layers share a block
        (``exit_layer`` a multiple of the unique blocks) both go through it in one call, so its weights are
        read once for both. The cache advances over the 1 + w slots, as a call over them would; the caller keeps the
        pending token's (``KVCache.commit_rows``), and a kept candidate's keys and values are read from its slot
        (``KVCache.read``) before the next call overwrites them.

        Returns:
            (the pending token's final residual (B, 1, d), the candidates' residual after exit_layer layers
            (B, w, d)).
        """
        w = early.shape[1]
        cache.check_room(1 + w)
        tree = _fan(w)  # the candidates hang off the pending token
        tree = Tree(tree.depth.to(early.device), tree.mask.to(early.device))
        cos, sin = self._rope(cache, 1 + w, tree)
        if self.row_invariant:
            views = cache.row_views(1 + w, tree.mask)
            mask = RowViews(views.keys[1:], views.masks[1:])
        else:
            mask = cache.attn_mask(1 + w, tree.mask)[..., 1:, :]
        root_mask = cache.attn_mask(1)
        for t in range(max(self.n_layers - exit_layer, exit_layer)):
            lay, ear = exit_layer + t, t  # the logical layers the pending token and the candidates are at
            root = Part(slice(0, 1), lay, root_mask) if lay < self.n_layers else None
            cand = Part(slice(1, None), ear, mask, stash[ear]) if ear < exit_layer else None
            if root and cand and self.block(lay) is self.block(ear):  # one shared block: one product for both
                x = self.block(lay)(torch.cat([late, early], 1), cos, sin, cache, [root, cand])
                late, early = x[:, :1], x[:, 1:]
                continue
            if root:
                late = self.block(lay)(late, cos[..., :1, :], sin[..., :1, :], cache, [root])
            if cand:
                early = self.block(ear)(early, cos[..., 1:, :], sin[..., 1:, :], cache, [cand])
        cache.advance(1 + w)
        return late, early

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """A cache sized for this stack, in the dtype and on the device of its parameters; float16 where the compiled
        blocks run (``kernels.attach``: the only readers and writers of its keys and values, which they convert as
        they go; attention reads half the bytes)."""
        p = next(self.parameters())
        max_len = self.cfg.max_seq_len if max_len is None else max_len
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds max_seq_len {self.cfg.max_seq_len}")
        dtype = torch.float16 if self.fused is not None else p.dtype
        return KVCache(self.n_layers, batch, self.cfg.n_kv_heads, self.cfg.head_dim, max_len, dtype, p.device)


@functools.lru_cache(maxsize=8)
def _fan(width: int) -> Tree:
    """A root and ``width`` children, on the CPU: the layout of a ``Stack.wavefront`` call, built once per width
    rather than once per decode cycle."""
    return Tree.from_parents([-1, *[0] * width])


class Backbone(nn.Module):
    """Llama-style language model returning logits and final hidden states.

    Args:
        cfg: the model's shape.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.stack = Stack(cfg, cfg.n_layers, cfg.n_unique_layers)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.apply(_init_weights)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Input embeddings (B, T, d) of token ids (B, T)."""
        return self.embed_tokens(tokens)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (..., vocab) from final (already normed) hidden states (..., d)."""
        return self.lm_head(hidden)

    def head_weight(self) -> torch.Tensor:
        """The LM head's (vocab, d) weight."""
        return self.lm_head.weight

    def head_transform(self, logits: torch.Tensor) -> torch.Tensor:
        """What ``head`` does after the matrix product (nothing for Llama-style models)."""
        return logits

    def early_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits (..., vocab) from the residual stream after the first k logical layers (..., d)
        (``forward(..., exit_layer=k)``), read through the model's own final norm and head."""
        return self.head(self.norm(hidden))

    supports_tree = True  # forward takes ``tree`` (wrapped transformers backbones do not)

    def forward(
        self, tokens: torch.Tensor, cache: KVCache | None = None, logits_last: int | None = None,
        tree: Tree | None = None, exit_layer: int | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Run the model over tokens (B, T).

        Args:
            tokens: token ids (B, T); with a cache they occupy the next T slots.
            cache: optional ``KVCache`` from ``new_cache``; advanced by T.
            logits_last: compute logits only for the last this-many positions (decode reads the last
                one, or every new one when it checks drafts; the head is the largest matrix of a small
                model). None: every position.
            tree: lay the T new tokens out as a tree of draft candidates (positions and mask from
                ``cache.Tree``) instead of one sequence; needs a cache.
            exit_layer: also return the residual stream after this many logical layers (1 .. n_layers), before
                any norm, for ``early_logits``. None: not kept (the forward is unchanged).

        Returns:
            (logits (B, T or logits_last, vocab), hidden (B, T, d) after the final norm), and with
            ``exit_layer`` a third element, the early hidden state (B, T, d).
        """
        out = self.stack(self.embed(tokens), cache, tree, exit_layer)
        if exit_layer is not None:
            out, early = out
        hidden = self.norm(out)
        logits = self.head(hidden if logits_last is None else hidden[:, -logits_last:])
        return (logits, hidden) if exit_layer is None else (logits, hidden, early)

    def head_start(self, tokens: torch.Tensor, cache: KVCache, exit_layer: int
                   ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Run one token per row (B, 1) through the first ``exit_layer`` logical layers (``Stack.head_start``):
        its residual after them (B, 1, d) and their keys and values, for ``wavefront``."""
        return self.stack.head_start(self.embed(tokens), cache, exit_layer)

    def wavefront(self, late: torch.Tensor, stash: list[tuple[torch.Tensor, torch.Tensor]], candidates: torch.Tensor,
                  cache: KVCache, exit_layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SPEED's pipelined call (``Stack.wavefront``): the pending token finishes its layers while candidates
        (B, w) for the token after it run the first ``exit_layer``.

        Returns:
            logits (B, 1 + w, V): the next token's after the pending one, then each candidate's early logits
            (``early_logits``); the final hidden states (B, 1 + w, d) of the same rows; and the candidates'
            residual after exit_layer layers (B, w, d), which a kept candidate continues from.
        """
        late, early = self.stack.wavefront(late, stash, self.embed(candidates), cache, exit_layer)
        hidden = self.norm(torch.cat([late, early], 1))
        return self.head(hidden), hidden, early

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """A preallocated cache for ``batch`` rows of at most ``max_len`` tokens."""
        return self.stack.new_cache(batch, max_len)


class PackedLinear(nn.Module):
    """A linear map for decoding only: multiplied through oneDNN, its weight reordered (packed) once.

    PyTorch's float32 products on a CPU are MKL's. On some CPUs (measured on an AMD EPYC with AVX-512:
    docs/performance.md) MKL's product over two rows costs twice its one-row product, which takes away the module's
    gain, while oneDNN's packed product costs the same for 1 to 4 rows and less than MKL's for one. The
    original weight stays (tied weights, ``head_weight``); the packed copy is extra memory. No gradient,
    no ``torch.compile`` (inductor packs weights its own way), no ``.to()`` after packing.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        self.register_buffer("packed", packed, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def fuse_projections(model: nn.Module) -> int:
    """Give every attention one product for q, k and v and every MLP one for gate and up, in place, for decoding:
    3 + 2 products per block become 2, and on a CPU each product call carries a fixed cost (a quantized one most).
    Each output row keeps its own weight row, so the results are those of the separate products up to how a
    kernel blocks them. The separate layers are removed (their weights live on, concatenated): run it on a
    model that is decoded, not trained or saved, before ``prepack_linears`` or ``quant.quantize_linears``.
    Returns how many products were fused.
    """
    n = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Attention) and m.qkv_proj is None:
                m.qkv_proj = _concat([m.q_proj, m.k_proj, m.v_proj])
                del m.q_proj, m.k_proj, m.v_proj
                n += 1
            elif isinstance(m, MLP) and m.gate_up_proj is None:
                m.gate_up_proj = _concat([m.gate_proj, m.up_proj])
                del m.gate_proj, m.up_proj
                n += 1
    return n


def _concat(layers: list[nn.Linear]) -> nn.Linear:
    """One ``nn.Linear`` computing ``layers`` side by side (their outputs concatenated)."""
    w = layers[0].weight
    bias = layers[0].bias is not None
    fused = nn.Linear(w.shape[1], sum(lin.weight.shape[0] for lin in layers), bias=bias, device=w.device,
                      dtype=w.dtype)
    fused.weight.copy_(torch.cat([lin.weight for lin in layers]))
    if bias:
        fused.bias.copy_(torch.cat([lin.bias for lin in layers]))
    return fused.requires_grad_(False)


def prepack_linears(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` of ``model`` by a ``PackedLinear``, in place; returns how many.

    Raises:
        ValueError: PyTorch was built without oneDNN, or the model is not on the CPU.
    """
    if not torch.backends.mkldnn.is_available():
        raise ValueError("prepacking needs PyTorch's oneDNN (mkldnn) backend, which this build lacks")
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                if child.weight.device.type != "cpu":
                    raise ValueError(f"prepacking is for CPU decoding; {name} is on {child.weight.device}")
                setattr(parent, name, PackedLinear(child.weight, child.bias))
                n += 1
    return n


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)


def count_parameters(module: nn.Module) -> int:
    """Unique parameters (a tied weight counts once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
