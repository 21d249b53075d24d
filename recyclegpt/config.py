"""Dataclass configs for the backbone and the recyclable module, with named presets.

Every config validates itself in ``__post_init__`` and round-trips through JSON, so the exact
config is saved beside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Self


class ConfigError(ValueError):
    """A config value is out of range or a config file cannot be read."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _positive_int(obj: Any, name: str) -> None:
    value = getattr(obj, name)
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}",
    )


class _JsonMixin:
    """to_dict / from_dict / JSON file round trip shared by the config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Build from a dict, refusing unknown keys (a typo must not be silently ignored)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__} expects a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        _require(not unknown, f"{cls.__name__}: unknown field(s) {unknown}; known fields: {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as exc:  # missing required fields
            raise ConfigError(f"{cls.__name__}: {exc}") from None

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> Self:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> Self:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class ModelConfig(_JsonMixin):
    """Shape of a Llama-style decoder-only backbone.

    ``head_dim`` defaults to ``d_model // n_heads``; set it explicitly for models (such as Gemma 3)
    whose attention width differs from the residual width. ``qkv_bias`` covers Qwen2-style models.

    ``n_unique_layers`` shares parameters across depth (SPEED, arXiv 2310.12072): the model runs
    ``n_layers`` logical layers over that many distinct blocks, logical layer i using block
    i % n_unique_layers (the blocks repeated in order). None: every layer has its own block.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    max_seq_len: int = 2048
    head_dim: int | None = None
    qkv_bias: bool = False
    n_unique_layers: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            _positive_int(self, name)
        if self.n_unique_layers is not None:
            _positive_int(self, "n_unique_layers")
            _require(
                self.n_unique_layers <= self.n_layers and self.n_layers % self.n_unique_layers == 0,
                f"ModelConfig.n_unique_layers ({self.n_unique_layers}) must divide n_layers ({self.n_layers}): "
                "the unique blocks repeat a whole number of times",
            )
        _require(
            self.n_heads % self.n_kv_heads == 0,
            f"ModelConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})",
        )
        if self.head_dim is None:
            _require(
                self.d_model % self.n_heads == 0,
                f"ModelConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}) "
                "unless head_dim is given",
            )
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        _positive_int(self, "head_dim")
        _require(self.head_dim % 2 == 0, f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        _require(self.rope_theta > 0, f"ModelConfig.rope_theta must be > 0, got {self.rope_theta}")
        _require(0 < self.norm_eps < 1, f"ModelConfig.norm_eps must be in (0, 1), got {self.norm_eps}")


@dataclass(frozen=True)
class RecycleConfig(_JsonMixin):
    """The recyclable module and its share of the training objective.

    Attributes:
        n_layers: transformer blocks in the module (the paper uses 6 on a 24-layer 1.3B model).
        recycle_weight: lambda in L = CE(main) + lambda * CE(recycle); 0 trains a plain GPT.
        grad_to_backbone: whether the recycle loss back-propagates into the backbone's hidden
            states (joint training) or sees them detached.
    """

    n_layers: int = 2
    recycle_weight: float = 1.0
    grad_to_backbone: bool = True

    def __post_init__(self) -> None:
        _positive_int(self, "n_layers")
        _require(
            isinstance(self.recycle_weight, int | float) and self.recycle_weight >= 0,
            f"RecycleConfig.recycle_weight must be a number >= 0, got {self.recycle_weight!r}",
        )


@dataclass(frozen=True)
class Preset:
    """A named pair of backbone and module configs."""

    model: ModelConfig
    recycle: RecycleConfig
    description: str


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256),
        RecycleConfig(n_layers=1),
        "a few hundred thousand parameters, for tests",
    ),
    "small": Preset(
        ModelConfig(
            vocab_size=49152, d_model=384, n_layers=6, n_heads=6, n_kv_heads=2, ffn_dim=1024,
            rope_theta=10000.0, max_seq_len=1024,
        ),
        RecycleConfig(n_layers=2),
        "about 30M parameters with the SmolLM2 tokenizer, trainable on a CPU",
    ),
    "small-shared-2x": Preset(
        ModelConfig(
            vocab_size=49152, d_model=384, n_layers=12, n_heads=6, n_kv_heads=2, ffn_dim=1024,
            rope_theta=10000.0, max_seq_len=1024, n_unique_layers=6,
        ),
        RecycleConfig(n_layers=2),
        "small's parameters (6 unique blocks) at twice its depth: 12 logical layers, each block used twice",
    ),
    "smollm2-135m": Preset(
        ModelConfig(
            vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
            rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True, max_seq_len=8192,
        ),
        RecycleConfig(n_layers=2),
        "the shape of SmolLM2-135M (the embedded default base)",
    ),
    "paper-1.3b": Preset(
        ModelConfig(
            vocab_size=32000, d_model=2048, n_layers=24, n_heads=16, n_kv_heads=16, ffn_dim=5504,
            rope_theta=10000.0, tie_embeddings=False, max_seq_len=2048,
        ),
        RecycleConfig(n_layers=6),
        "the paper's 1.3B LLaMA-style model with a 6-layer recyclable module",
    ),
}


def get_preset(name: str) -> Preset:
    """Look up a preset by name, listing the known ones if it does not exist."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class TrainConfig(_JsonMixin):
    """One training run (joint from scratch, or attaching a module to a frozen base).

    Attributes:
        mode: ``joint`` (whole model, L = CE + lambda * recycle CE) or ``attach`` (module only, KL to
            the frozen base's next-step distribution plus ``ce_weight`` * recycle CE plus
            ``feature_weight`` * SmoothL1 of the module's state to the base's next hidden state).
        steps: optimiser steps; one step sees ``batch_size * grad_accum`` windows of ``seq_len`` tokens.
        lr / min_lr: peak and final learning rate (linear warm-up for ``warmup`` steps, then cosine).
        bf16: autocast matmuls to bfloat16 on CPU (faster batched here) or GPU.
        eval_every / eval_batches: validation cadence and size; ckpt_every: checkpoint cadence.
        early_exit_weight / early_exit_layer: joint runs add ``early_exit_weight`` * CE of the next token
            predicted from the hidden state after the first ``early_exit_layer`` logical layers, through
            the model's own final norm and head (``Backbone.early_logits``); 0 leaves it out.
    """

    mode: str = "joint"
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    ce_weight: float = 0.0
    feature_weight: float = 0.0
    bf16: bool = False
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 100
    seed: int = 0
    early_exit_weight: float = 0.0
    early_exit_layer: int | None = None

    def __post_init__(self) -> None:
        _require(self.mode in ("joint", "attach"), f"TrainConfig.mode must be 'joint' or 'attach', got {self.mode!r}")
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_every", "eval_batches", "ckpt_every"):
            _positive_int(self, name)
        _require(self.seq_len >= 3, f"TrainConfig.seq_len must be >= 3 (the recycle loss looks two ahead), "
                 f"got {self.seq_len}")
        _require(0 < self.lr < 1 and 0 <= self.min_lr <= self.lr,
                 f"TrainConfig needs 0 < lr < 1 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        _require(isinstance(self.warmup, int) and self.warmup >= 0,
                 f"TrainConfig.warmup must be an integer >= 0, got {self.warmup}")
        _require(min(self.grad_clip, self.weight_decay, self.ce_weight, self.feature_weight) >= 0,
                 "TrainConfig.grad_clip, weight_decay, ce_weight and feature_weight must be >= 0")
        _require(
            isinstance(self.early_exit_weight, int | float) and self.early_exit_weight >= 0,
            f"TrainConfig.early_exit_weight must be a number >= 0, got {self.early_exit_weight!r}",
        )
        if self.early_exit_layer is not None:
            _positive_int(self, "early_exit_layer")
        if self.early_exit_weight > 0:
            _require(self.early_exit_layer is not None,
                     "TrainConfig.early_exit_weight > 0 needs early_exit_layer (the logical layer to predict from)")
            _require(self.mode == "joint", "TrainConfig.early_exit_weight applies to joint training only "
                     "(attach training freezes the backbone)")
