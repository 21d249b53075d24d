import json

import pytest

from recyclegpt.config import PRESETS, ConfigError, ModelConfig, RecycleConfig, TrainConfig, get_preset


def test_presets_round_trip_through_json(tmp_path):
    for name, preset in PRESETS.items():
        path = tmp_path / f"{name}.json"
        preset.model.to_json(path)
        assert ModelConfig.from_json(path) == preset.model
        preset.recycle.to_json(path)
        assert RecycleConfig.from_json(path) == preset.recycle


def test_smollm2_preset_matches_the_published_shape():
    cfg = PRESETS["smollm2-135m"].model
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size) == (
        30, 576, 9, 3, 1536, 49152
    )
    assert cfg.rope_theta == 1e5 and cfg.tie_embeddings and cfg.head_dim == 64


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_heads": 6, "n_kv_heads": 4}, "must be a multiple of n_kv_heads"),
        ({"d_model": 65}, "divisible by n_heads"),
        ({"n_layers": 0}, "n_layers must be a positive integer"),
        ({"norm_eps": 2.0}, "norm_eps must be in (0, 1)"),
        ({"rope_theta": -1.0}, "rope_theta must be > 0"),
        ({"n_unique_layers": 0}, "n_unique_layers must be a positive integer, got 0"),
        ({"n_unique_layers": 1.5}, "n_unique_layers must be a positive integer"),
        ({"n_layers": 4, "n_unique_layers": 3}, "n_unique_layers (3) must divide n_layers (4)"),
        ({"n_layers": 2, "n_unique_layers": 4}, "n_unique_layers (4) must divide n_layers (2)"),
    ],
)
def test_invalid_model_config_says_what_is_wrong(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(**(PRESETS["tiny"].model.to_dict() | {"head_dim": None} | changes))


def test_invalid_recycle_config_and_unknown_fields():
    with pytest.raises(ConfigError, match="recycle_weight must be a number >= 0"):
        RecycleConfig(recycle_weight=-1)
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['n_layer'\]"):
        RecycleConfig.from_dict({"n_layer": 2})
    with pytest.raises(ConfigError, match="known presets: tiny, small"):
        get_preset("huge")


def test_bad_config_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        ModelConfig.from_json(tmp_path / "missing.json")


def test_shared_depth_config_and_old_files_without_the_field(tmp_path):
    shared = PRESETS["small-shared-2x"].model
    assert (shared.n_layers, shared.n_unique_layers) == (12, 6)
    assert shared.replace(n_layers=6, n_unique_layers=None) == PRESETS["small"].model  # only the depth differs
    # A config file written before n_unique_layers existed loads as an unshared model.
    old = PRESETS["tiny"].model.to_dict()
    del old["n_unique_layers"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert ModelConfig.from_json(tmp_path / "old.json") == PRESETS["tiny"].model
    assert PRESETS["tiny"].model.n_unique_layers is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"early_exit_weight": -0.5, "early_exit_layer": 1}, "early_exit_weight must be a number >= 0, got -0.5"),
        ({"early_exit_weight": 0.5}, "early_exit_weight > 0 needs early_exit_layer"),
        ({"early_exit_weight": 0.5, "early_exit_layer": 0}, "early_exit_layer must be a positive integer, got 0"),
        ({"early_exit_weight": 0.5, "early_exit_layer": 1, "mode": "attach"}, "applies to joint training only"),
    ],
)
def test_invalid_early_exit_settings_say_what_is_wrong(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes)
