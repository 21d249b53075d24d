"""The generic path: any transformers ``AutoModelForCausalLM`` behind the backbone interface.

Hidden states come from ``output_hidden_states=True`` (the last one is after the final norm, what the
head reads); the cache is transformers' own ``DynamicCache``, rolled back with ``crop``. It is built
without the model's config, so sliding-window layers (Gemma 3) keep every key and can be cropped at any
length; their attention masks still apply the window, so outputs equal ``generate``'s. Batches
with left padding are not supported on this path (use the native path, or batch size 1).
"""

from __future__ import annotations

import torch
from torch import nn

from recyclegpt.bases.convert import hf_widths
from recyclegpt.config import ModelConfig


class HFCache:
    """A transformers ``DynamicCache`` with the length / rollback interface of ``KVCache``; its rows
    always hold the same length (not ``ragged``)."""

    ragged = False

    def __init__(self, max_len: int) -> None:
        from transformers import DynamicCache

        self.hf = DynamicCache()
        self.max_len = max_len

    @property
    def length(self) -> int:
        return self.hf.get_seq_length()

    def check_room(self, n_new: int) -> None:
        if self.length + n_new > self.max_len:
            raise ValueError(f"cache holds {self.max_len} tokens; {self.length} used, cannot add {n_new} more")

    def set_padding(self, pad_lengths: list[int]) -> None:
        raise ValueError(
            "batches of prompts with different lengths need the native backbone; "
            "the generic transformers path decodes one prompt at a time"
        )

    def rollback(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back to {length}: cache length is {self.length}")
        if length < self.length:
            self.hf.crop(length - self.length)  # transformers 5 crops by a negative count to remove


def module_config_from_hf(hf_config, max_seq_len: int) -> ModelConfig:
    """Widths for a recyclable module on a transformers model (Llama-style blocks at its width)."""
    text = getattr(hf_config, "text_config", None) or hf_config
    params = getattr(text, "rope_parameters", None) or {}
    if "full_attention" in params:  # per-layer-type RoPE (Gemma 3): take the global layers'
        params = params["full_attention"]
    theta = params.get("rope_theta", getattr(text, "rope_theta", 10000.0))
    return ModelConfig(
        **hf_widths(text),
        rope_theta=float(theta),
        norm_eps=float(getattr(text, "rms_norm_eps", 1e-6)),
        tie_embeddings=bool(getattr(text, "tie_word_embeddings", True)),
        max_seq_len=max_seq_len,
    )


class HFBackbone(nn.Module):
    """Wrap a transformers causal LM so the module and decoder can use it like a native backbone.

    Args:
        model: a loaded ``AutoModelForCausalLM``.
        max_seq_len: context to allow (defaults to the model's, capped at 8192).
    """

    def __init__(self, model: nn.Module, max_seq_len: int | None = None) -> None:
        super().__init__()
        self.model = model.eval()
        text = getattr(model.config, "text_config", None) or model.config
        ctx = max_seq_len or min(getattr(text, "max_position_embeddings", 8192), 8192)
        self.config = module_config_from_hf(model.config, ctx)
        self.softcap = getattr(text, "final_logit_softcapping", None)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(tokens)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head_transform(self.model.get_output_embeddings()(hidden))

    def head_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    def head_transform(self, logits: torch.Tensor) -> torch.Tensor:
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def forward(
        self, tokens: torch.Tensor, cache: HFCache | None = None, logits_last: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if cache is not None:
            cache.check_room(tokens.shape[1])
        out = self.model(
            input_ids=tokens,
            past_key_values=None if cache is None else cache.hf,
            use_cache=cache is not None,
            output_hidden_states=True,
            logits_to_keep=0 if logits_last is None else logits_last,
        )
        return out.logits, out.hidden_states[-1]

    def new_cache(self, batch: int, max_len: int | None = None) -> HFCache:
        return HFCache(max_len or self.config.max_seq_len)
