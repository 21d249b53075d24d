"""The recyclable module and RecycleGPT (a backbone plus its module).

Notation: h_t is the backbone's final hidden state at position t (what its head reads), e(x) the token
embedding, W the shared LM head.

    u_t = fuse([h_t ; e(x_{t+1})])          Linear 2d -> d
    g_t = Blocks(u_1..u_t)                  causal, with the module's own KV cache
    p(x_{t+2} | x_<=t+1) = softmax(W . norm(g_t))

Module position t is aligned with backbone position t: its cache slot t holds the pair
(h_t, x_{t+1}), so one ``KVCache`` length describes both.

Draft vocabulary: the shared head is the largest matrix of a small model (SmolLM2: 49152 x 576, read
in full for every module step). A module may carry ``draft_vocab``, the ids of the tokens it is
allowed to propose (the most frequent ones in the base's outputs); its logits are then computed for
those rows only (``draft_logits``) and every other token gets -inf. Verified decoding stays exact
(the draft distribution is what was sampled from); alternating can then only emit draft-vocabulary
tokens from the module.

Copy gate: a module may also carry ``copy_gate``, the weights of the in-context copy mixture of
``copy_gate.py``; decoding and evaluation then use the mixture q of the module's distribution and a token
copied from the context (``copy_logits`` / ``copy_gate.mix_scores``).
"""

from __future__ import annotations

import torch
from torch import nn

from recyclegpt.cache import KVCache
from recyclegpt.config import ModelConfig, RecycleConfig, get_preset
from recyclegpt.copy_gate import N_FEATURES, mix_logits
from recyclegpt.model import Backbone, PackedLinear, RMSNorm, Stack, _init_weights, count_parameters
from recyclegpt.quant import Int8Linear, QuantLinear


class RecyclableModule(nn.Module):
    """A few transformer blocks that predict the token after next from (h_t, x_{t+1}).

    It owns no embedding and no head: both are the backbone's, shared, not copied.

    Args:
        cfg: the backbone's shape (the module's blocks take its widths).
        rcfg: module depth and loss settings.
    """

    # Buffers that stay None until set (so absent from a fresh state dict), with their setters.
    OPTIONAL_BUFFERS = {"draft_vocab": "set_draft_vocab", "copy_gate": "set_copy_gate"}

    def __init__(self, cfg: ModelConfig, rcfg: RecycleConfig) -> None:
        super().__init__()
        self.config, self.recycle_config = cfg, rcfg
        self.fuse = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        self.stack = Stack(cfg, rcfg.n_layers)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.register_buffer("draft_vocab", None)
        self.register_buffer("copy_gate", None)
        self.apply(_init_weights)

    def forward(self, hidden: torch.Tensor, emb: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Module states g (B, T, d), normed, ready for the shared head.

        Args:
            hidden: backbone final hidden states h_t (B, T, d) (or, when drafting a chain, the
                module's own previous output in place of h).
            emb: embeddings e(x_{t+1}) of the tokens that follow each h_t (B, T, d).
            cache: the module's own cache; the T pairs occupy its next T slots.
        """
        u = self.fuse(torch.cat([hidden, emb], dim=-1))  # (B, T, 2d) -> (B, T, d)
        return self.norm(self.stack(u, cache))

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """A preallocated cache for the module's blocks."""
        return self.stack.new_cache(batch, max_len)

    def set_draft_vocab(self, ids: torch.Tensor | None) -> None:
        """Restrict the module's proposals to these token ids (saved with the module); None = all."""
        if ids is not None:
            ids = torch.as_tensor(ids, dtype=torch.long).flatten()
            if ids.numel() == 0 or ids.min() < 0 or ids.max() >= self.config.vocab_size:
                raise ValueError(f"draft vocabulary ids must be in [0, {self.config.vocab_size}) and not empty")
            ids = ids.unique().to(self.fuse.weight.device)  # sorted, beside the weights
        self.draft_vocab = ids

    def set_copy_gate(self, weights: torch.Tensor | None) -> None:
        """Mix in-context copies into the module's proposals with these gate weights (``copy_gate.fit_gate``,
        saved with the module); None = the module alone."""
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float32).flatten()
            if weights.numel() != N_FEATURES + 1 or not bool(weights.isfinite().all()):
                raise ValueError(f"copy gate weights must be {N_FEATURES + 1} finite numbers, got {weights.numel()}")
            weights = weights.to(self.fuse.weight.device)
        self.copy_gate = weights

    def copy_logits(self, logits: torch.Tensor, cand: torch.Tensor, index_feats: torch.Tensor) -> torch.Tensor:
        """The draft distribution (B, V) as log-probabilities: ``logits`` mixed with each row's copy candidate
        (``copy_gate.CopyIndex.propose``; -1 for none); ``logits`` unchanged without a copy gate."""
        if self.copy_gate is None:
            return logits
        return mix_logits(logits, cand, index_feats, self.copy_gate, self.draft_vocab)

    def head_rows(self, backbone: nn.Module) -> torch.Tensor | None:
        """The backbone head's weight rows of the draft vocabulary (V_d, d), cached; None without one."""
        if self.draft_vocab is None:
            return None
        weight = backbone.head_weight()
        key = (weight.data_ptr(), weight.dtype, self.draft_vocab.data_ptr())
        if getattr(self, "_rows_key", None) != key:
            self._rows = weight.detach()[self.draft_vocab].contiguous()  # (V_d, d), a copy: fast to read
            # A module prepacked (``model.prepack_linears``) or quantized (``quant.quantize_linears``) for
            # decoding packs its draft head too; quantized, in int8, as the backbone's head.
            self._rows_packed = (PackedLinear(self._rows) if isinstance(self.fuse, PackedLinear)
                                 else Int8Linear(self._rows) if isinstance(self.fuse, QuantLinear) else None)
            self._rows_key = key
        return self._rows

    def draft_logits(self, backbone: nn.Module, g: torch.Tensor) -> torch.Tensor:
        """Full-width logits (..., V) of module states g; -inf outside the draft vocabulary if it has one."""
        rows = self.head_rows(backbone)
        if rows is None:
            return backbone.head(g)
        sub = backbone.head_transform(g @ rows.T if self._rows_packed is None else self._rows_packed(g))  # (..., V_d)
        out = sub.new_full((*g.shape[:-1], self.config.vocab_size), float("-inf"))
        return out.index_copy_(-1, self.draft_vocab, sub)

    def draft_targets(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids mapped to draft-vocabulary indices; tokens outside it become -100 (ignored)."""
        remap = torch.full((self.config.vocab_size,), -100, dtype=torch.long, device=tokens.device)
        remap[self.draft_vocab] = torch.arange(self.draft_vocab.numel(), device=tokens.device)
        return remap[tokens]


class RecycleGPT(nn.Module):
    """A backbone and its recyclable module.

    Args:
        backbone: a native ``Backbone`` or any object with the backbone interface (see ``model.py``).
        module: the recyclable module; built fresh from ``rcfg`` when None.
        rcfg: module settings (depth, recycle loss weight, gradient to backbone).
    """

    def __init__(
        self, backbone: nn.Module, module: RecyclableModule | None = None, rcfg: RecycleConfig | None = None
    ) -> None:
        super().__init__()
        if module is None:
            module = RecyclableModule(backbone.config, rcfg or RecycleConfig())
        self.backbone = backbone
        self.module = module
        self.recycle_config = module.recycle_config

    @classmethod
    def from_config(cls, cfg: ModelConfig, rcfg: RecycleConfig) -> RecycleGPT:
        """A randomly initialised native backbone with a fresh module."""
        return cls(Backbone(cfg), RecyclableModule(cfg, rcfg))

    def forward(self, tokens: torch.Tensor, exit_layer: int | None = None) -> tuple[torch.Tensor, ...]:
        """Training forward over a whole sequence in one pass.

        Args:
            tokens: (B, T) token ids.
            exit_layer: also predict the next token from the backbone's state after this many logical
                layers (``Backbone.early_logits``; native backbones only).

        Returns:
            main_logits (B, T, V): position t predicts x_{t+1};
            recycle_logits (B, T-1, V): position t predicts x_{t+2} from (h_t, x_{t+1});
            with ``exit_layer``, early_logits (B, T, V): position t predicts x_{t+1}.
        """
        if exit_layer is None:
            main_logits, hidden = self.backbone(tokens)
        else:
            main_logits, hidden, early = self.backbone(tokens, exit_layer=exit_layer)
        h = hidden[:, :-1]  # h_0 .. h_{T-2}
        if not self.recycle_config.grad_to_backbone:
            h = h.detach()
        g = self.module(h, self.backbone.embed(tokens[:, 1:]))  # pairs (h_t, x_{t+1})
        logits = (main_logits, self.backbone.head(g))
        return logits if exit_layer is None else (*logits, self.backbone.early_logits(early))

    def parameter_counts(self) -> dict[str, float]:
        """Backbone and module parameter counts and the module's share of the backbone."""
        backbone, module = count_parameters(self.backbone), count_parameters(self.module)
        return {"backbone": backbone, "module": module, "module_share": module / backbone}


def preset_summary(name: str) -> dict:
    """A preset's configs, depth and parameter counts (``RecycleGPT.parameter_counts``), counted on the meta
    device: nothing is allocated, so the largest presets cost nothing either (``recyclegpt info``).

    ``logical_layers`` is the backbone's depth, ``unique_layers`` its distinct blocks (fewer when parameters
    are shared, ``ModelConfig.n_unique_layers``); the backbone count holds each shared block once.
    """
    preset = get_preset(name)
    cfg = preset.model
    with torch.device("meta"):
        model = RecycleGPT.from_config(cfg, preset.recycle)
    return {"preset": name, "description": preset.description, "model": cfg.to_dict(),
            "recycle": preset.recycle.to_dict(), "logical_layers": cfg.n_layers,
            "unique_layers": cfg.n_unique_layers or cfg.n_layers, **model.parameter_counts()}
