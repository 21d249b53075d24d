"""One trainer for joint training from scratch and for attaching a module to a frozen base.

* joint: the whole RecycleGPT trains on L = CE(main, x_{t+1}) + lambda * CE(recycle, x_{t+2});
  lambda = 0 trains a plain GPT with the same code.
* attach: the backbone is frozen; only the module trains, towards the base's own next-step
  distribution (KL), optionally mixed with the text token (CE). The frozen base's final hidden states
  may come from a cache on disk (``hidden_cache``): a step then costs the module alone.

A checkpoint (``checkpoint.pt``: trainable weights, optimiser, schedule, RNG, step) is written
atomically every ``ckpt_every`` steps, with the module (and, for joint runs, the whole model) as
safetensors beside it; ``resume=True`` continues exactly where it stopped. The data windows of a step
depend only on (seed, step), so the resumed run sees the same data. Under ``torchrun`` the same code
runs DistributedDataParallel (gloo on CPU, nccl on GPU): each rank takes its rows of the global batch.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from recyclegpt.checkpoint import atomic_write, save_model, save_module
from recyclegpt.config import TrainConfig
from recyclegpt.data import HiddenData, TokenData, cache_hidden
from recyclegpt.loss import attach_loss, joint_loss
from recyclegpt.recycle import RecycleGPT


class TrainError(ValueError):
    """A training run cannot start or resume as asked."""


class Objective(nn.Module):
    """The loss of one batch as a module, so DistributedDataParallel can wrap it."""

    def __init__(self, model: RecycleGPT, cfg: TrainConfig) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(
        self, tokens: torch.Tensor, hidden: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss and metrics of a batch of tokens (B, T); attach runs may pass the frozen base's cached
        final hidden states (B, T, d) instead of recomputing them (``recyclegpt.data.HiddenData``)."""
        if self.cfg.mode == "joint":
            weight = self.model.recycle_config.recycle_weight
            if self.cfg.early_exit_weight == 0:
                return joint_loss(*self.model(tokens), tokens, weight)
            main, rec, early = self.model(tokens, exit_layer=self.cfg.early_exit_layer)
            return joint_loss(main, rec, tokens, weight, early, self.cfg.early_exit_weight)
        backbone, module = self.model.backbone, self.model.module
        rows = module.head_rows(backbone)  # the draft vocabulary's head rows, or None for all
        with torch.no_grad():
            if hidden is None:
                _, hidden = backbone(tokens, logits_last=1)
            # the teacher's logits are the head on h: (B, T, V), or (B, T, V_d) over the draft vocabulary
            teacher = backbone.head(hidden) if rows is None else backbone.head_transform(hidden @ rows.T)
            emb = backbone.embed(tokens[:, 1:])
        g = module(hidden[:, :-1], emb)
        extra = {"states": (g, hidden[:, 1:]), "feature_weight": self.cfg.feature_weight}
        if rows is None:
            return attach_loss(backbone.head(g), teacher, tokens, self.cfg.ce_weight, **extra)
        rec = backbone.head_transform(g @ rows.T)
        return attach_loss(rec, teacher, module.draft_targets(tokens), self.cfg.ce_weight, **extra)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr`` at ``steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min((step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1), 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def _trainable(model: RecycleGPT, cfg: TrainConfig) -> nn.Module:
    return model.module if cfg.mode == "attach" else model


def hidden_cache(model: RecycleGPT, data: TokenData, out_dir: str | Path, seq_len: int, identity: dict,
                 bf16: bool) -> HiddenData:
    """The hidden-state cache of ``data`` for an attach run (``recyclegpt.data.cache_hidden``).

    Under ``torchrun`` rank 0 builds (or checks) it while the other ranks wait, then all open it.
    """
    rank, world = _dist_info(next(model.parameters()).device)
    if rank == 0:
        cached = cache_hidden(model.backbone, data, out_dir, seq_len, identity, bf16=bf16)
    if world > 1:
        dist.barrier()
        if rank != 0:
            cached = HiddenData(out_dir)
    return cached


def _dist_info(device: torch.device) -> tuple[int, int]:
    """(rank, world size), joining the torchrun process group first: nccl for a model on a GPU, gloo on the CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    """Runs a ``TrainConfig`` on a model and a prepared data directory, writing into ``out_dir``.

    Args:
        model: the RecycleGPT to train (for attach, its backbone is frozen here).
        data: prepared token data (``TokenData``), or for attach runs a hidden-state cache
            (``HiddenData``) built from it for this base.
        cfg: the run's settings.
        out_dir: where checkpoints, exported weights and ``log.jsonl`` go.
        base: identity of the frozen base (attach), stored with the exported module.
    """

    def __init__(
        self, model: RecycleGPT, data: TokenData, cfg: TrainConfig, out_dir: str | Path, base: dict | None = None
    ) -> None:
        if data.vocab_size > model.backbone.config.vocab_size:
            raise TrainError(
                f"data was tokenized with a vocabulary of {data.vocab_size}; the model has "
                f"{model.backbone.config.vocab_size}: prepare the data with this model's tokenizer"
            )
        if isinstance(data, HiddenData) and cfg.mode != "attach":
            raise TrainError("a hidden-state cache serves attach training only (the base must be frozen)")
        depth = model.backbone.config.n_layers
        if cfg.early_exit_weight > 0 and cfg.early_exit_layer > depth:
            raise TrainError(f"early_exit_layer {cfg.early_exit_layer} is deeper than the model's {depth} "
                             f"logical layers: choose 1 .. {depth}")
        self.model, self.data, self.cfg, self.out, self.base = model, data, cfg, Path(out_dir), base or {}
        self.rank, self.world = _dist_info(next(model.parameters()).device)
        if cfg.batch_size % self.world:
            raise TrainError(f"batch_size {cfg.batch_size} must be divisible by the {self.world} processes")
        if cfg.mode == "attach":
            model.backbone.requires_grad_(False)
            model.backbone.eval()
        self.trainable = _trainable(model, cfg)
        self.trainable.train()
        params = [p for p in self.trainable.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(0.9, 0.95),
        )
        self.objective: nn.Module = Objective(model, cfg)
        if self.world > 1:
            self.objective = nn.parallel.DistributedDataParallel(self.objective)
        self.step = 0
        self.device = next(model.parameters()).device

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def _rows(self, batch: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """This rank's rows of a batch (tokens, or tokens and cached hidden states), on the device."""
        parts = batch if isinstance(batch, tuple) else (batch,)
        return tuple(t[self.rank :: self.world].to(self.device) for t in parts)

    def _autocast(self):
        kind = "cuda" if self.device.type == "cuda" else "cpu"
        return torch.autocast(kind, dtype=torch.bfloat16, enabled=self.cfg.bf16)

    def evaluate(self) -> dict[str, float]:
        """Mean metrics over ``eval_batches`` fixed validation batches."""
        self.trainable.eval()
        totals: dict[str, float] = {}
        with torch.no_grad(), self._autocast():
            for i in range(self.cfg.eval_batches):
                batch = self.data.batch("val", self.cfg.batch_size, self.cfg.seq_len, self.cfg.seed, 10**9 + i)
                _, metrics = self.objective(*self._rows(batch))
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + v / self.cfg.eval_batches
        self.trainable.train()
        return {f"val_{k}": v for k, v in self._mean_over_ranks(totals).items()}

    def save(self) -> None:
        """Write the checkpoint and exported weights atomically (rank 0 only)."""
        if self.rank != 0:
            return
        state = {
            "step": self.step,
            "train_config": self.cfg.to_dict(),
            "model_config": self.model.backbone.config.to_dict(),
            "recycle_config": self.model.recycle_config.to_dict(),
            "trainable": self.trainable.state_dict(),
            "optimizer": self.opt.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        atomic_write(self.checkpoint_path, lambda tmp: torch.save(state, tmp))
        save_module(self.out / "module.safetensors", self.model.module, self.base)
        if self.cfg.mode == "joint":
            save_model(self.out / "model.safetensors", self.model, self.base)

    def load(self) -> None:
        """Restore everything from ``checkpoint.pt`` (refusing a checkpoint of a different run)."""
        path = self.checkpoint_path
        if not path.is_file():
            raise TrainError(f"nothing to resume: {path} does not exist")
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as exc:  # torch raises many types for a damaged pickle/zip
            raise TrainError(f"{path} is unreadable (truncated or corrupt?): {type(exc).__name__}: {exc}") from None
        if not isinstance(state, dict) or "trainable" not in state:
            raise TrainError(f"{path} is not a RecycleGPT training checkpoint")
        for key, now in (("model_config", self.model.backbone.config), ("recycle_config", self.model.recycle_config)):
            if type(now).from_dict(state[key]) != now:  # through the class: fields added since get their defaults
                raise TrainError(f"{path} was written for a different {key.replace('_', ' ')}: {state[key]} vs "
                                 f"{now.to_dict()}")
        saved = {k: v for k, v in TrainConfig.from_dict(state["train_config"]).to_dict().items() if k != "steps"}
        if saved != {k: v for k, v in self.cfg.to_dict().items() if k != "steps"}:
            raise TrainError(f"{path} was written with other training settings ({saved}); only --steps may change")
        self.trainable.load_state_dict(state["trainable"])
        self.opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"].cpu())
        self.step = int(state["step"])

    def _mean_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        """Average metrics over DDP ranks, so the log shows the global batch's numbers."""
        if self.world == 1:
            return metrics
        keys = sorted(metrics)
        t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return {k: v / self.world for k, v in zip(keys, t.tolist(), strict=True)}

    def _log(self, record: dict[str, Any], board) -> None:
        if self.rank == 0:
            with (self.out / "log.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            if board is not None:
                for key, value in record.items():
                    if key != "step":
                        board.add_scalar(key, value, record["step"])

    def _tensorboard(self):
        """A TensorBoard writer on ``out/tensorboard`` (rank 0) when the tensorboard package is installed."""
        if self.rank != 0:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # optional: pip install 'recyclegpt[train]'
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

    def run(self, resume: bool = False, progress: bool = True, until: int | None = None) -> list[dict[str, Any]]:
        """Train to ``cfg.steps`` (or stop early at step ``until``); returns this call's per-step records."""
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self.load()
        elif self.rank == 0:
            (self.out / "log.jsonl").unlink(missing_ok=True)
            self.cfg.to_json(self.out / "train_config.json")
        cfg = self.cfg
        tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
        history = []
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not progress or self.rank != 0,
                   desc=f"{cfg.mode} training", unit="step")
        board = self._tensorboard()
        t_start, start_step = time.perf_counter(), self.step
        last = cfg.steps if until is None else min(until, cfg.steps)
        while self.step < last:
            for group in self.opt.param_groups:
                group["lr"] = lr_at(self.step, cfg)
            self.opt.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                batch = self.data.batch("train", cfg.batch_size, cfg.seq_len, cfg.seed,
                                        self.step * cfg.grad_accum + micro)
                with self._autocast():
                    loss, metrics = self.objective(*self._rows(batch))
                (loss / cfg.grad_accum).backward()
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
            sums = self._mean_over_ranks(sums)
            if cfg.grad_clip > 0:
                sums["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.trainable.parameters(), cfg.grad_clip))
            self.opt.step()
            self.step += 1
            elapsed = time.perf_counter() - t_start
            record = {"step": self.step, "tokens": self.step * tokens_per_step, "lr": lr_at(self.step - 1, cfg),
                      **sums, "tokens_per_s": (self.step - start_step) * tokens_per_step / max(elapsed, 1e-9)}
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                record |= self.evaluate()
            history.append(record)
            self._log(record, board)
            bar.set_postfix(loss=f"{sums['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update()
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                self.save()
        bar.close()
        if board is not None:
            board.close()
        return history


def build_model(cfg: TrainConfig, data: TokenData, preset: str = "small", base: str = "smollm2-135m",
                backend: str = "auto", module_layers: int | None = None, recycle_weight: float = 1.0,
                draft_vocab: int = 8192, init: str | None = None, device: str = "cpu") -> tuple[RecycleGPT, dict]:
    """The RecycleGPT a run trains: for ``cfg.mode`` joint a preset from scratch, for attach a loaded base
    plus a new module (or, with ``init``, a trained one to fine-tune).

    Args:
        cfg: the run's settings (mode, seed: the initialisation is the same in every process and rerun; seq_len).
        data: the prepared data (its tokenizer is recorded for joint runs; its draft vocabulary for attach).
        preset / recycle_weight: joint: the model's shape and lambda of the recycle loss.
        base / backend / draft_vocab / init: attach: the frozen base, the module's draft vocabulary size (0: the
            whole vocabulary) and the module file (or ``default``) to start from.
        module_layers: module depth (default: the preset's; attach: 1, or the ``init`` module's).
        device: where the model trains (``bases.resolve_device``; checked before anything loads).

    Returns:
        The model and the identity stored with its weights: the base (attach) or the data's tokenizer (joint),
        which is how ``--model RUN_DIR`` finds the tokenizer of a model trained from scratch.
    """
    from recyclegpt.bases import load_base, resolve_device
    from recyclegpt.config import RecycleConfig, get_preset

    dev = resolve_device(device)
    torch.manual_seed(cfg.seed)
    if cfg.mode == "joint":
        spec = get_preset(preset)
        rcfg = spec.recycle.replace(n_layers=module_layers or spec.recycle.n_layers, recycle_weight=recycle_weight)
        model = RecycleGPT.from_config(spec.model.replace(max_seq_len=max(cfg.seq_len, 8)), rcfg).to(dev)
        return model, {"tokenizer": data.meta["tokenizer"]} if data.meta.get("tokenizer") else {}
    loaded = load_base(base, backend=backend)
    identity = {"name": loaded.name, "backend": loaded.backend}
    if init:
        return RecycleGPT(loaded.backbone, _init_module(init, loaded, module_layers)).to(dev), identity
    model = RecycleGPT(loaded.backbone, rcfg=RecycleConfig(n_layers=module_layers or 1, grad_to_backbone=False))
    if draft_vocab:
        ids, identity["draft_vocab_coverage"] = data.draft_vocab(draft_vocab)
        model.module.set_draft_vocab(ids)
    return model.to(dev), identity


def _init_module(init: str, base, module_layers: int | None):
    """The trained module an attach run starts from (``--init``): its depth and draft vocabulary are kept,
    its copy gate is dropped (it was fitted to the old weights: refit it with ``copy-gate``)."""
    from recyclegpt.checkpoint import CheckpointError, load_module
    from recyclegpt.modules import resolve_module

    module = load_module(resolve_module(init, base.name), base.backbone.config)
    layers = module.recycle_config.n_layers
    if module_layers not in (None, layers):
        raise CheckpointError(f"--init {init} has {layers} module layers; --module-layers {module_layers} "
                              f"disagrees (leave it out to keep the module's depth)")
    module.recycle_config = module.recycle_config.replace(grad_to_backbone=False)
    module.set_copy_gate(None)
    return module


def run_training(cfg: TrainConfig, data_dir: str | Path, out_dir: str | Path,
                 hidden_cache_dir: str | Path | None = None, resume: bool = False, **model: Any) -> dict[str, float]:
    """One training run, as ``recyclegpt train`` (joint) and ``recyclegpt attach`` run it.

    Args:
        cfg: the run's settings.
        data_dir: a prepared data directory (``data prepare`` / ``data distill``).
        out_dir: the run directory (checkpoint, exported weights, ``log.jsonl``).
        hidden_cache_dir: attach: train from the base's hidden states cached there (``hidden_cache``).
        resume: continue from ``out_dir/checkpoint.pt``.
        model: ``build_model``'s options (preset, base, module_layers, init, device...).

    Returns:
        The numbers of the last step's record (loss, validation...), or {} when no step ran.
    """
    data = TokenData(data_dir)
    net, identity = build_model(cfg, data, **model)
    if hidden_cache_dir:
        data = hidden_cache(net, data, hidden_cache_dir, cfg.seq_len, {k: identity[k] for k in ("name", "backend")},
                            cfg.bf16)
    history = Trainer(net, data, cfg, out_dir, identity).run(resume=resume)
    return {k: v for k, v in (history[-1] if history else {}).items() if isinstance(v, int | float)}
