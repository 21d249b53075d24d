"""Hugging Face Llama-family checkpoints -> the native ``Backbone``.

The native model names its parameters like ``LlamaForCausalLM`` minus the ``model.`` prefix, with the
blocks under ``stack.``; conversion is a rename plus a config translation. Llama, Mistral and Qwen2
configs are covered (Qwen2's q/k/v biases included); anything else is refused with a pointer to the
generic transformers path.
"""

from __future__ import annotations

from typing import Any

import torch

from recyclegpt.config import ModelConfig
from recyclegpt.model import Backbone

NATIVE_ARCHITECTURES = ("llama", "mistral", "qwen2")


class UnsupportedArchitecture(ValueError):
    """The checkpoint's architecture is not covered by the native backbone."""


def _rope_theta(hf_config: Any) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    rope_type = params.get("rope_type", params.get("type", "default"))
    scaling = getattr(hf_config, "rope_scaling", None)
    if rope_type != "default" or (isinstance(scaling, dict) and scaling.get("rope_type", "default") != "default"):
        raise UnsupportedArchitecture(
            f"RoPE scaling {rope_type!r} is not implemented by the native backbone; use the generic path"
        )
    return float(theta if theta is not None else 10000.0)


def hf_widths(text: Any) -> dict[str, int]:
    """The shape fields of a ``ModelConfig`` read from a transformers (text) config."""
    n_heads = text.num_attention_heads
    return {
        "vocab_size": text.vocab_size,
        "d_model": text.hidden_size,
        "n_layers": text.num_hidden_layers,
        "n_heads": n_heads,
        "n_kv_heads": getattr(text, "num_key_value_heads", None) or n_heads,
        "ffn_dim": getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * text.hidden_size,
        "head_dim": getattr(text, "head_dim", None) or text.hidden_size // n_heads,
    }


def config_from_hf(hf_config: Any, max_seq_len: int | None = None) -> ModelConfig:
    """Translate a transformers ``PretrainedConfig`` of a Llama-family model into a ``ModelConfig``.

    Args:
        hf_config: the transformers config (``model.config``).
        max_seq_len: context to preallocate for; defaults to the model's ``max_position_embeddings``.
    """
    arch = getattr(hf_config, "model_type", None)
    if arch not in NATIVE_ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"architecture {arch!r} is not covered by the native backbone (it covers "
            f"{', '.join(NATIVE_ARCHITECTURES)}); load it with the generic transformers path: --backend hf"
        )
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise UnsupportedArchitecture(f"activation {hf_config.hidden_act!r} is not SwiGLU; use --backend hf")
    window = getattr(hf_config, "sliding_window", None)
    ctx = max_seq_len or hf_config.max_position_embeddings
    if window is not None and getattr(hf_config, "use_sliding_window", True) and window < ctx:
        ctx = window  # sliding-window attention is exact up to the window length
    return ModelConfig(
        **hf_widths(hf_config),
        rope_theta=_rope_theta(hf_config),
        norm_eps=float(hf_config.rms_norm_eps),
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        max_seq_len=int(ctx),
        qkv_bias=arch == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
    )


def state_from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a ``LlamaForCausalLM`` state dict to the native ``Backbone``'s names."""
    out = {}
    for name, tensor in hf_state.items():
        if "rotary_emb" in name:
            continue
        if name.startswith("model.layers."):
            out["stack." + name.removeprefix("model.")] = tensor
        elif name.startswith("model."):
            out[name.removeprefix("model.")] = tensor
        else:
            out[name] = tensor
    return out


def backbone_from_hf(hf_model: torch.nn.Module, max_seq_len: int | None = None) -> Backbone:
    """Build a native ``Backbone`` holding the weights of a transformers Llama-family model."""
    cfg = config_from_hf(hf_model.config, max_seq_len)
    with torch.device("meta"):
        backbone = Backbone(cfg)
    state = state_from_hf(hf_model.state_dict())
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    expected = set(backbone.state_dict()) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    if set(state) != expected:
        raise UnsupportedArchitecture(
            f"unexpected weights for a {hf_model.config.model_type} checkpoint: missing "
            f"{sorted(expected - set(state))[:5]}, extra {sorted(set(state) - expected)[:5]}; use --backend hf"
        )
    backbone.load_state_dict({k: v.float() for k, v in state.items()}, strict=False, assign=True)
    if cfg.tie_embeddings:
        backbone.lm_head.weight = backbone.embed_tokens.weight
    return backbone.eval()
