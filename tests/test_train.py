"""Trainer: both modes learn, resume is exact, bad checkpoints are refused, DDP equals one process."""

import json
import os
import subprocess
import sys

import pytest
import torch

from recyclegpt.bases.tokenizer import ByteTokenizer
from recyclegpt.config import PRESETS, ConfigError, RecycleConfig, TrainConfig
from recyclegpt.data import DataError, HiddenData, TokenData, cache_hidden, prepare
from recyclegpt.recycle import RecycleGPT
from recyclegpt.train import Objective, Trainer, TrainError

TEXT = (
    "It is a truth universally acknowledged that a decoder which has already computed its last hidden "
    "state should not throw it away. The small module reads that state together with the token that "
    "was just chosen, and proposes the token after it; the large model checks the proposal for free.\n\n"
)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> TokenData:
    d = tmp_path_factory.mktemp("data")
    (d / "text.txt").write_text(TEXT * 1200)
    prepare([d / "text.txt"], ByteTokenizer(), d / "prepared", val_fraction=0.2)
    return TokenData(d / "prepared")


def _model(grad_to_backbone=True) -> RecycleGPT:
    torch.manual_seed(0)
    p = PRESETS["tiny"]
    return RecycleGPT.from_config(p.model, RecycleConfig(n_layers=1, grad_to_backbone=grad_to_backbone))


CFG = TrainConfig(steps=60, batch_size=8, seq_len=64, lr=3e-3, min_lr=3e-4, warmup=5, eval_every=30,
                  eval_batches=2, ckpt_every=30)


def test_joint_training_reduces_both_losses(data, tmp_path):
    history = Trainer(_model(), data, CFG, tmp_path).run(progress=False)
    first, last = history[0], history[-1]
    # Measured: main 5.55 -> 2.83, recycle 5.54 -> 2.59 (validation) in 60 steps; bars leave room for noise.
    assert first["main_loss"] > 5 and last["val_main_loss"] < 3.1 and last["val_recycle_loss"] < 2.9
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "module.safetensors").is_file()
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 60 and "tokens_per_s" in json.loads(lines[-1])
    # The same metrics in TensorBoard (the dev install has it).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "tensorboard"))
    board.Reload()
    main_loss = board.Scalars("main_loss")
    assert [e.step for e in main_loss] == list(range(1, 61))
    assert main_loss[-1].value == pytest.approx(last["main_loss"], rel=1e-6)
    assert [e.step for e in board.Scalars("val_recycle_loss")] == [30, 60]


def test_attach_training_reduces_kl_and_keeps_the_base(data, tmp_path):
    model = _model(grad_to_backbone=False)
    Trainer(model, data, CFG.replace(steps=40), tmp_path / "pre").run(progress=False)  # a base that knows text
    base_state = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.module = RecycleGPT(model.backbone, rcfg=RecycleConfig(n_layers=1, grad_to_backbone=False)).module
    cfg = CFG.replace(mode="attach", steps=40, ce_weight=0.1)
    history = Trainer(model, data, cfg, tmp_path / "attach").run(progress=False)
    # Measured: KL 1.63 -> 0.023 (validation), agreement 0.91, in 40 steps.
    assert history[0]["kl"] > 1.0 and history[-1]["val_kl"] < 0.2 and history[-1]["val_agreement"] > 0.7
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, base_state[k]), k


def test_attach_from_cached_hidden_states(data, tmp_path):
    model = _model(grad_to_backbone=False)
    Trainer(model, data, CFG.replace(steps=40), tmp_path / "pre").run(progress=False)  # a base that knows text
    model.module = RecycleGPT(model.backbone, rcfg=RecycleConfig(n_layers=1, grad_to_backbone=False)).module
    model.eval()
    ident = {"name": "tiny-test"}
    cached = cache_hidden(model.backbone, data, tmp_path / "cache", 64, ident, bf16=False)
    assert cached.meta["windows"] == {s: len(data.splits[s]) // 64 for s in ("train", "val")}
    # The cache holds what the base computes on each window, rounded to bfloat16 (8 mantissa bits).
    tokens, hidden = cached.batch("train", 4, 64, seed=0, step=3)
    with torch.no_grad():
        _, ref = model.backbone(tokens)
    torch.testing.assert_close(hidden, ref, rtol=8e-3, atol=1e-2)
    # ...so the attach loss from the cache equals the loss that recomputes the base (measured: 1.69677 vs 1.69671).
    objective = Objective(model, CFG.replace(mode="attach"))
    with torch.no_grad():
        assert objective(tokens, hidden)[0].item() == pytest.approx(objective(tokens)[0].item(), abs=2e-3)
    # Training from the cache learns like uncached training (same bars as the test above), here with the
    # feature term too, which regresses the module's state onto the base's next hidden state (measured:
    # KL 1.67 -> 0.047, agreement 0.87, training-batch feature loss 0.68 -> 0.032).
    cfg = CFG.replace(mode="attach", steps=40, ce_weight=0.1, feature_weight=1.0)
    history = Trainer(model, cached, cfg, tmp_path / "run").run(progress=False)
    assert history[0]["kl"] > 1.0 and history[-1]["val_kl"] < 0.2 and history[-1]["val_agreement"] > 0.7
    assert history[-1]["val_feature_loss"] < history[0]["feature_loss"] / 2
    # Reused when it fits; refused, with the reason, when it does not.
    assert cache_hidden(model.backbone, data, tmp_path / "cache", 64, ident, bf16=False).meta == cached.meta
    with pytest.raises(DataError, match=r"built for other settings \(bf16, seq_len differ\)"):
        cache_hidden(model.backbone, data, tmp_path / "cache", 32, ident, bf16=True)
    with pytest.raises(DataError, match="holds windows of 64 tokens, not 32"):
        cached.batch("train", 2, 32, seed=0, step=0)
    with pytest.raises(DataError, match="is not a hidden-state cache"):
        HiddenData(tmp_path / "run")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="exists and is not a hidden-state cache"):
        cache_hidden(model.backbone, data, tmp_path / "other", 64, ident)
    with pytest.raises(TrainError, match="serves attach training only"):
        Trainer(_model(), cached, CFG, tmp_path / "joint")


def test_resume_continues_exactly(data, tmp_path):
    full = Trainer(_model(), data, CFG, tmp_path / "full").run(progress=False)
    Trainer(_model(), data, CFG, tmp_path / "cut").run(progress=False, until=30)  # "killed" after the checkpoint
    resumed = Trainer(_model(), data, CFG, tmp_path / "cut").run(resume=True, progress=False)
    assert resumed[0]["step"] == 31
    assert resumed[-1]["loss"] == pytest.approx(full[-1]["loss"], abs=1e-5)


def test_bad_checkpoints_and_settings_are_refused(data, tmp_path):
    Trainer(_model(), data, CFG, tmp_path).run(progress=False, until=30)
    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(TrainError, match="only --steps may change"):
        Trainer(_model(), data, CFG.replace(lr=1e-3), tmp_path).run(resume=True, progress=False)
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(TrainError, match="truncated or corrupt"):
        Trainer(_model(), data, CFG, tmp_path).run(resume=True, progress=False)
    with pytest.raises(TrainError, match="nothing to resume"):
        Trainer(_model(), data, CFG, tmp_path / "new").run(resume=True, progress=False)
    with pytest.raises(ConfigError, match="mode must be 'joint' or 'attach'"):
        TrainConfig(mode="finetune")


def test_early_exit_weight_trains_the_layer_k_prediction(data, tmp_path):
    cfg = CFG.replace(steps=20, eval_every=20, ckpt_every=10, early_exit_weight=0.5, early_exit_layer=1)
    history = Trainer(_model(), data, cfg, tmp_path).run(progress=False)
    # Measured: early CE (layer 1 of 2) 5.54 -> 3.12 (validation) in 20 steps; the bar leaves room for noise.
    assert history[0]["early_ce"] > 5 and history[-1]["val_early_ce"] < 3.5
    assert history[-1]["loss"] == pytest.approx(
        history[-1]["main_loss"] + history[-1]["recycle_loss"] + 0.5 * history[-1]["early_ce"], rel=1e-5)
    with pytest.raises(TrainError, match="early_exit_layer 3 is deeper than the model's 2 logical layers"):
        Trainer(_model(), data, cfg.replace(early_exit_layer=3), tmp_path / "deep")


def test_train_command_takes_the_early_exit_loss(data, tmp_path, capsys):
    from recyclegpt.cli import main

    run = ["train", "--preset", "tiny", "--module-layers", "1", "--data", str(data.dir), "--steps", "3",
           "--batch-size", "4", "--seq-len", "64", "--eval-every", "3", "--ckpt-every", "3", "--threads", "1"]
    assert main([*run, "--out", str(tmp_path / "e"), "--early-exit-weight", "0.5", "--early-exit-layer", "1"]) == 0
    log = [json.loads(line) for line in (tmp_path / "e" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(r["early_ce"] > 0 for r in log)
    assert main([*run, "--out", str(tmp_path / "x"), "--early-exit-weight", "0.5"]) == 2
    assert "early_exit_weight > 0 needs early_exit_layer" in capsys.readouterr().err


def test_checkpoints_from_before_new_config_fields_resume(data, tmp_path):
    """A checkpoint whose saved configs lack fields added since (here n_unique_layers and early_exit_*) resumes:
    missing fields take their defaults."""
    Trainer(_model(), data, CFG, tmp_path).run(progress=False, until=30)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del state["model_config"]["n_unique_layers"], state["train_config"]["early_exit_weight"]
    del state["train_config"]["early_exit_layer"]
    torch.save(state, tmp_path / "checkpoint.pt")
    assert Trainer(_model(), data, CFG, tmp_path).run(resume=True, progress=False, until=31)[0]["step"] == 31


def test_ddp_two_processes_match_one(data, tmp_path):
    """2 CPU processes (gloo) with the same global batch follow the single-process loss curve."""
    cmd = ["-m", "recyclegpt.cli", "train", "--preset", "tiny", "--module-layers", "1", "--data", str(data.dir),
           "--steps", "8", "--batch-size", "8", "--seq-len", "64", "--lr", "3e-3", "--warmup", "2",
           "--eval-every", "100", "--ckpt-every", "100", "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, *cmd, "--out", str(tmp_path / "one")], check=True, env=env,
                   capture_output=True, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                    *cmd, "--out", str(tmp_path / "two")], check=True, env=env, capture_output=True, timeout=300)

    def losses(d):
        return [json.loads(line)["loss"] for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]

    one, two = losses("one"), losses("two")
    assert len(one) == len(two) == 8
    # Logged losses are means over ranks; curves agree within float reduction-order noise.
    assert two == pytest.approx(one, abs=1e-4)
    model_one = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)["trainable"]
    model_two = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)["trainable"]
    for k in model_one:
        torch.testing.assert_close(model_one[k], model_two[k], atol=2e-5, rtol=1e-4)


def test_keep_freed_memory_serves_large_blocks_from_the_heap():
    # glibc maps a block over 32 MB freshly from the kernel (mallinfo2's hblkhd counts such bytes); after
    # keep_freed_memory it comes from the heap. Each case runs in its own process: the setting is per process.
    probe = """
import ctypes, sys, torch
from recyclegpt.hardware import keep_freed_memory
libc = ctypes.CDLL(None)
if not hasattr(libc, "mallinfo2"):
    print("skip"); sys.exit()
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = Info
if sys.argv[1] == "keep":
    assert keep_freed_memory()
before = libc.mallinfo2().hblkhd
x = torch.ones(64 * 2**20 // 4)  # 64 MB
print(libc.mallinfo2().hblkhd - before)
"""
    mapped = {case: subprocess.run([sys.executable, "-c", probe, case], capture_output=True, text=True, check=True)
              .stdout.strip() for case in ("default", "keep")}
    if mapped["default"] == "skip":
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    assert int(mapped["default"]) >= 64 * 2**20  # a fresh mapping by default
    assert int(mapped["keep"]) == 0  # from the heap
