import pytest
import torch

from recyclegpt.checkpoint import CheckpointError, load_model, load_module, save_model, save_module
from recyclegpt.config import PRESETS


def test_model_round_trip(tiny, tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(path, tiny, {"tokenizer": "byte"})
    loaded, identity = load_model(path)
    assert identity == {"tokenizer": "byte"}
    tokens = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        for a, b in zip(tiny(tokens), loaded(tokens), strict=True):
            assert torch.equal(a, b)
    assert loaded.backbone.lm_head.weight is loaded.backbone.embed_tokens.weight  # still tied
    # A module's draft vocabulary (a buffer absent from a fresh model) comes back with the model.
    tiny.module.set_draft_vocab(torch.arange(0, 256, 3))
    save_model(path, tiny)
    assert torch.equal(load_model(path)[0].module.draft_vocab, torch.arange(0, 256, 3))


def test_module_round_trip_and_shape_mismatch(tiny, tmp_path):
    path = tmp_path / "module.safetensors"
    save_module(path, tiny.module, base={"name": "tiny-test"})
    module = load_module(path, tiny.backbone.config)
    for (n, a), (_, b) in zip(tiny.module.state_dict().items(), module.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    other = PRESETS["tiny"].model.replace(d_model=32, head_dim=None)
    with pytest.raises(CheckpointError, match="d_model=64 .*this backbone has d_model=32"):
        load_module(path, other)


def test_truncated_and_foreign_files_are_refused(tiny, tmp_path):
    path = tmp_path / "module.safetensors"
    save_module(path, tiny.module)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_module(truncated, tiny.backbone.config)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_module(garbage, tiny.backbone.config)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_module(tmp_path / "nope.safetensors", tiny.backbone.config)
    with pytest.raises(CheckpointError, match="not a whole RecycleGPT model"):
        load_model(path)


def test_atomic_write_leaves_no_partial_file(tiny, tmp_path, monkeypatch):
    path = tmp_path / "module.safetensors"
    save_module(path, tiny.module)
    good = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("recyclegpt.checkpoint.save_file", boom)
    with pytest.raises(OSError):
        save_module(path, tiny.module)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["module.safetensors"]
