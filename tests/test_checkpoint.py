import hashlib

import pytest
import torch

from recyclegpt.checkpoint import (
    CheckpointError,
    load_backbone,
    load_model,
    load_module,
    save_backbone,
    save_model,
    save_module,
)
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


def test_shared_model_round_trips_exactly_with_its_blocks_still_shared(shared_tiny, tmp_path):
    """A backbone with 4 logical layers over 2 blocks saves each block once and loads back the same model."""
    from recyclegpt.model import count_parameters

    save_model(tmp_path / "m.safetensors", shared_tiny)
    save_backbone(tmp_path / "b.safetensors", shared_tiny.backbone)
    loaded, _ = load_model(tmp_path / "m.safetensors")
    backbone = load_backbone(tmp_path / "b.safetensors")
    assert loaded.backbone.config == backbone.config == shared_tiny.backbone.config
    assert list(loaded.state_dict()) == list(shared_tiny.state_dict())
    tokens = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        for a, b in zip(shared_tiny(tokens), loaded(tokens), strict=True):
            assert torch.equal(a, b)
        assert torch.equal(backbone(tokens)[0], shared_tiny.backbone(tokens)[0])
    for model in (loaded.backbone, backbone):
        assert len(model.stack.layers) == 2 and len(model.new_cache(1, 8).k) == 4
        assert count_parameters(model) == count_parameters(shared_tiny.backbone)


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


def test_average_modules_is_the_weighted_mean_and_refuses_misfits(tiny, tmp_path):
    from recyclegpt.checkpoint import average_modules
    from recyclegpt.config import RecycleConfig
    from recyclegpt.recycle import RecyclableModule

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    tiny.module.set_draft_vocab(torch.arange(0, 256, 2))
    tiny.module.set_copy_gate(torch.zeros(12))
    save_module(a, tiny.module, base={"name": "tiny-test"})
    other = RecyclableModule(tiny.module.config, tiny.module.recycle_config)  # fresh weights, same shapes
    other.set_draft_vocab(torch.arange(0, 256, 2))
    save_module(b, other, base={"name": "tiny-test"})

    soup, base = average_modules([a, b], [3, 1])
    assert base == {"name": "tiny-test"}
    assert soup.copy_gate is None and torch.equal(soup.draft_vocab, torch.arange(0, 256, 2))
    want = 0.75 * tiny.module.fuse.weight + 0.25 * other.fuse.weight
    assert torch.allclose(soup.fuse.weight, want, atol=1e-6)
    assert not torch.allclose(soup.fuse.weight, tiny.module.fuse.weight, atol=1e-3)

    with pytest.raises(CheckpointError, match="two or more"):
        average_modules([a])
    with pytest.raises(CheckpointError, match="one non-negative weight per module"):
        average_modules([a, b], [1, -1])
    other.set_draft_vocab(torch.arange(0, 256, 3))
    save_module(b, other, base={"name": "tiny-test"})
    with pytest.raises(CheckpointError, match="another draft vocabulary"):
        average_modules([a, b])
    deeper = RecyclableModule(tiny.module.config, RecycleConfig(n_layers=2))
    save_module(b, deeper, base={"name": "tiny-test"})
    with pytest.raises(CheckpointError, match="another shape or depth"):
        average_modules([a, b])


def test_average_command_writes_the_mean_and_explains_bad_input(tiny, tmp_path, capsys):
    from recyclegpt.checkpoint import load_module_file
    from recyclegpt.cli import main
    from recyclegpt.recycle import RecyclableModule

    a, b, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "soup.safetensors"
    save_module(a, tiny.module, base={"name": "tiny-test"})
    save_module(b, RecyclableModule(tiny.module.config, tiny.module.recycle_config), base={"name": "tiny-test"})
    assert main(["average", str(a), str(b), "--out", str(out)]) == 0
    soup, base = load_module_file(out)
    assert base["name"] == "tiny-test" and base["weights"] == [1.0, 1.0]
    # Inputs are recorded as named, with their contents' hashes, so they stay identifiable once replaced.
    assert base["averaged"] == [{"file": str(f), "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
                                for f in (a, b)]
    halves = 0.5 * (load_module_file(a)[0].fuse.weight + load_module_file(b)[0].fuse.weight)
    assert torch.allclose(soup.fuse.weight, halves, atol=1e-6)

    assert main(["average", str(a), str(tmp_path / "missing.safetensors"), "--out", str(out)]) == 2
    assert "module file not found" in capsys.readouterr().err
    assert main(["average", str(a), str(b), "--weights", "1", "--out", str(out)]) == 2
    assert "one non-negative weight per module file (2)" in capsys.readouterr().err
