"""Checkpoints: safetensors weights with the JSON config inside the file's metadata.

Two kinds of file:

* a **module** file (``save_module``): the recyclable module alone plus the configs and the identity
  of the base it was trained on; this is what ships and what ``--module PATH`` loads;
* a **model** file (``save_model``): a whole native RecycleGPT (backbone and module).

Every write goes to a temporary file in the same directory and is renamed into place, so a crash
mid-write never leaves a truncated checkpoint under the real name.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from recyclegpt.config import ConfigError, ModelConfig, RecycleConfig
from recyclegpt.model import Backbone
from recyclegpt.recycle import RecyclableModule, RecycleGPT

FORMAT_VERSION = "1"
MODULE, MODEL, BACKBONE = "recyclegpt-module", "recyclegpt-model", "recyclegpt-backbone"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, corrupt or does not fit the model it is loaded into."""


def atomic_write(path: str | Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Tied weights appear under two names; safetensors refuses shared storage, so keep the first.
    aliases = _tied_aliases(module)
    return {k: t.detach().contiguous().cpu() for k, t in module.state_dict().items() if k not in aliases}


def _save(path: str | Path, module: torch.nn.Module, kind: str, cfg: ModelConfig, rcfg: RecycleConfig,
          **extra: dict[str, Any]) -> None:
    """Write ``module``'s weights with the configs (and ``extra`` JSON fields) as metadata, atomically."""
    meta = {
        "format": FORMAT_VERSION,
        "kind": kind,
        "model_config": json.dumps(cfg.to_dict()),
        "recycle_config": json.dumps(rcfg.to_dict()),
        **{k: json.dumps(v) for k, v in extra.items()},
    }
    state = _state(module)
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def save_module(path: str | Path, module: RecyclableModule, base: dict[str, Any] | None = None) -> None:
    """Save a recyclable module alone.

    Args:
        path: destination ``.safetensors`` file.
        module: the module to save.
        base: identity of the base it belongs to, e.g. ``{"name": "smollm2-135m"}``; stored as is
            and reported when the module is loaded onto a different base.
    """
    _save(path, module, MODULE, module.config, module.recycle_config, base=base or {})


def save_model(path: str | Path, model: RecycleGPT, extra: dict[str, Any] | None = None) -> None:
    """Save a whole native RecycleGPT (backbone + module) with its configs."""
    if not isinstance(model.backbone, Backbone):
        raise CheckpointError("save_model saves native backbones only; save the module with save_module")
    _save(path, model, MODEL, model.backbone.config, model.recycle_config, extra=extra or {})


def save_backbone(path: str | Path, backbone: Backbone, extra: dict[str, Any] | None = None) -> None:
    """Save a native backbone alone (used for the converted-base cache, never committed)."""
    _save(path, backbone, BACKBONE, backbone.config, RecycleConfig(), extra=extra or {})


def load_backbone(path: str | Path, max_seq_len: int | None = None) -> Backbone:
    """Load a native backbone saved with ``save_backbone``; optionally with another context length."""
    path = Path(path)
    tensors, meta = read_checkpoint(path, BACKBONE)
    cfg, _ = _configs(path, meta)
    if max_seq_len is not None:
        cfg = cfg.replace(max_seq_len=max_seq_len)
    with torch.device("meta"):
        backbone = Backbone(cfg)
    _check_state(path, backbone, tensors)
    backbone.load_state_dict(tensors, strict=False, assign=True)
    if cfg.tie_embeddings:
        backbone.lm_head.weight = backbone.embed_tokens.weight
    return backbone.eval()


def read_checkpoint(path: str | Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors and metadata of a checkpoint of ``kind``; every failure is a one-line ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors checkpoint (truncated or corrupt?): {exc}"
        ) from None
    if meta.get("format") != FORMAT_VERSION or "model_config" not in meta:
        raise CheckpointError(f"{path} is a safetensors file but not a RecycleGPT checkpoint (no config metadata)")
    if meta.get("kind") != kind:
        what = {MODULE: "a recyclable module", MODEL: "a whole RecycleGPT model", BACKBONE: "a backbone"}[kind]
        raise CheckpointError(f"{path} holds a {meta.get('kind')!r}, not {what}")
    return tensors, meta


def _configs(path: Path, meta: dict[str, str]) -> tuple[ModelConfig, RecycleConfig]:
    try:
        return (
            ModelConfig.from_dict(json.loads(meta["model_config"])),
            RecycleConfig.from_dict(json.loads(meta["recycle_config"])),
        )
    except (ConfigError, json.JSONDecodeError, KeyError) as exc:
        raise CheckpointError(f"{path}: config metadata is invalid: {exc}") from None


def _load_state(path: Path, module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load checked tensors; a recyclable module's optional buffers (its draft vocabulary and copy gate,
    None until set, so absent from a fresh state dict) go through their setters."""
    optional = RecyclableModule.OPTIONAL_BUFFERS
    extras = {k: tensors.pop(k) for k in [k for k in tensors if k.rpartition(".")[2] in optional]}
    _check_state(path, module, tensors)
    module.load_state_dict(tensors, strict=False)
    for key, value in extras.items():
        owner, _, name = key.rpartition(".")
        try:
            getattr(module.get_submodule(owner), optional[name])(value)
        except ValueError as exc:
            raise CheckpointError(f"{path}: tensor {key} is invalid: {exc}") from None


def _check_state(path: Path, module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    expected = module.state_dict()
    missing = [k for k in expected if k not in tensors and k not in _tied_aliases(module)]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
    for name, tensor in tensors.items():
        if tuple(expected[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{path}: tensor {name} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(expected[name].shape)}"
            )


def _tied_aliases(module: torch.nn.Module) -> set[str]:
    """State-dict names that share storage with an earlier name (saved once, under the first)."""
    seen: set[int] = set()
    aliases = set()
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        seen.add(id(param))
    return aliases


def load_module_file(path: str | Path) -> tuple[RecyclableModule, dict[str, Any]]:
    """Load a module file on its own; returns the module and the base identity it records."""
    path = Path(path)
    tensors, meta = read_checkpoint(path, MODULE)
    cfg, rcfg = _configs(path, meta)
    module = RecyclableModule(cfg, rcfg)
    _load_state(path, module, tensors)
    return module, json.loads(meta.get("base", "{}"))


def average_modules(paths: list[str | Path], weights: list[float] | None = None
                    ) -> tuple[RecyclableModule, dict[str, Any]]:
    """Average the weights of modules trained for one base (a "model soup", as WiSE-FT averages a model
    with its fine-tune): each parameter becomes the weighted mean of the files' parameters.

    The modules must share their configs, base and draft vocabulary (fine-tunes made with ``attach --init``
    do). Copy gates are dropped: a gate is fitted to one module's proposals, so refit the average's with
    ``recyclegpt copy-gate``.

    Args:
        paths: two or more module files.
        weights: one non-negative weight per file (normalised to sum 1); None = equal weights.

    Returns:
        The averaged module and the base identity the files record.
    """
    if len(paths) < 2:
        raise CheckpointError(f"averaging needs two or more module files, got {len(paths)}")
    weights = [1.0] * len(paths) if weights is None else [float(w) for w in weights]
    if len(weights) != len(paths) or any(not w >= 0 for w in weights) or sum(weights) <= 0:
        raise CheckpointError(
            f"averaging needs one non-negative weight per module file ({len(paths)}), not all zero; got {weights}"
        )
    weights = [w / sum(weights) for w in weights]
    first, base = load_module_file(paths[0])
    start = {k: t for k, t in first.state_dict().items() if k not in RecyclableModule.OPTIONAL_BUFFERS}
    total = {k: t.double() * weights[0] for k, t in start.items()}
    for path, w in zip(paths[1:], weights[1:], strict=True):
        module, other = load_module_file(path)
        if (module.config, module.recycle_config) != (first.config, first.recycle_config):
            raise CheckpointError(f"{path} has another shape or depth than {paths[0]}: only fine-tunes of one "
                                  "module (same configs) can be averaged")
        if other.get("name") != base.get("name"):
            raise CheckpointError(f"{path} was trained for base {other.get('name')!r}, {paths[0]} for "
                                  f"{base.get('name')!r}")
        vocabs = (module.draft_vocab, first.draft_vocab)
        if (vocabs[0] is None) != (vocabs[1] is None) or (vocabs[0] is not None and not torch.equal(*vocabs)):
            raise CheckpointError(f"{path} has another draft vocabulary than {paths[0]}")
        state = module.state_dict()
        for k in total:
            total[k] += state[k].double() * w
    first.load_state_dict({k: t.to(start[k].dtype) for k, t in total.items()}, strict=False)
    first.set_copy_gate(None)
    return first, base


def average_module_files(modules: list[str], out: str | Path, weights: list[float] | None = None,
                         base: str = "smollm2-135m") -> dict[str, Any]:
    """``recyclegpt average``: average module files (``average_modules``) and save the result at ``out`` with
    the recipe in its metadata.

    Args:
        modules: module files, or ``default`` for ``base``'s shipped module.
        out: the module file to write.
        weights: one weight per module (None: equal).
        base: the base whose shipped module ``default`` names.

    Returns:
        ``out`` and the recipe saved with the module: ``averaged`` (each input as named, with its content's
        SHA-256: a path alone stops identifying a file once that file is replaced, as the shipped module is by
        an average of itself) and ``weights``.
    """
    import hashlib

    from recyclegpt.modules import resolve_module

    paths = [resolve_module(m, base) for m in modules]
    module, identity = average_modules(paths, weights)
    inputs = [{"file": m, "sha256": hashlib.sha256(Path(p).read_bytes()).hexdigest()}
              for m, p in zip(modules, paths, strict=True)]
    recipe = {"averaged": inputs, "weights": weights or [1.0] * len(paths)}
    save_module(out, module, {**identity, **recipe})
    return {"out": str(out), **recipe}


def set_draft_vocab_file(module_path: str | Path, data_dir: str | Path, size: int, out: str | Path) -> dict[str, Any]:
    """``recyclegpt draft-vocab``: give a module file a draft vocabulary, the ``size`` most frequent tokens of
    prepared data's train split, and save it at ``out`` (which may be ``module_path``).

    Returns:
        ``out``, the vocabulary's ``size`` and its ``coverage`` (share of the data's tokens it holds).

    Raises:
        CheckpointError: data tokenized with a larger vocabulary than the module's.
    """
    from recyclegpt.data import TokenData

    module, base = load_module_file(module_path)
    data = TokenData(data_dir)
    if data.vocab_size > module.config.vocab_size:
        raise CheckpointError(
            f"{data_dir} was tokenized with a vocabulary of {data.vocab_size}; the module {module_path} has "
            f"{module.config.vocab_size}: use data prepared with the module's tokenizer"
        )
    ids, coverage = data.draft_vocab(size)
    module.set_draft_vocab(ids)
    save_module(out, module, {**base, "draft_vocab_coverage": coverage})
    return {"out": str(out), "size": int(ids.numel()), "coverage": coverage}


def load_module(path: str | Path, backbone_config: ModelConfig) -> RecyclableModule:
    """Load a module file for a given backbone, refusing one whose widths do not fit it.

    The module's rotary tables and cache length follow the backbone's ``max_seq_len``.
    """
    module, base = load_module_file(path)
    mc = module.config
    for name in ("d_model", "vocab_size"):
        if getattr(mc, name) != getattr(backbone_config, name):
            raise CheckpointError(
                f"module {path} was trained for a base with {name}={getattr(mc, name)} "
                f"(base {base.get('name', 'unknown')}); this backbone has {name}={getattr(backbone_config, name)}"
            )
    if mc.max_seq_len != backbone_config.max_seq_len:
        resized = RecyclableModule(mc.replace(max_seq_len=backbone_config.max_seq_len), module.recycle_config)
        state = module.state_dict()
        for name, setter in RecyclableModule.OPTIONAL_BUFFERS.items():
            getattr(resized, setter)(state.pop(name, None))
        resized.load_state_dict(state, strict=False)
        module = resized
    return module


def load_model(path: str | Path, max_seq_len: int | None = None) -> tuple[RecycleGPT, dict[str, Any]]:
    """Load a whole native RecycleGPT saved with ``save_model``, optionally with another context length.

    Returns the model (in eval mode) and the identity stored with it (for a ``recyclegpt train`` run,
    ``{"tokenizer": <the data's tokenizer>}``).
    """
    path = Path(path)
    tensors, meta = read_checkpoint(path, MODEL)
    cfg, rcfg = _configs(path, meta)
    if max_seq_len is not None:
        cfg = cfg.replace(max_seq_len=max_seq_len)
    model = RecycleGPT.from_config(cfg, rcfg)
    _load_state(path, model, tensors)
    return model.eval(), json.loads(meta.get("extra", "{}"))
