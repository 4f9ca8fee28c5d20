"""The typed configuration: presets load, overrides merge, and bad values fail naming the key."""
import pytest
import yaml

from deconver.config import ConfigError, available_presets, deep_merge, load_preset, load_study


@pytest.mark.parametrize("name", ["isles22", "brats23", "glas", "fives", "hippocampus"])
def test_every_preset_validates(name):
    preset = load_preset(name)
    assert preset.name == name
    assert len(preset.protocol.roi_size) == preset.spatial_dims


def test_preset_channels_follow_task():
    assert (load_preset("isles22").in_channels, load_preset("isles22").out_channels) == (2, 1)
    brats = load_preset("brats23")
    assert (brats.in_channels, brats.out_channels) == (4, 3)
    assert brats.labels == {"ET": [3], "TC": [1, 3], "WT": [1, 2, 3]}
    hippo = load_preset("hippocampus")  # softmax: background + 2 classes
    assert (hippo.in_channels, hippo.out_channels) == (1, 3)


def test_paper_protocol_defaults():
    p = load_preset("isles22").protocol
    assert (p.lr, p.weight_decay, p.epochs, p.warmup_epochs, p.val_every) == (1e-4, 1e-5, 500, 5, 20)
    assert (p.roi_size, p.batch_size) == ([64, 64, 64], 8)
    assert load_preset("brats23").metrics.hd95_penalty == 374.0


def test_deep_merge_keeps_base_untouched():
    base = {"a": {"b": 1, "c": 2}, "d": [1]}
    merged = deep_merge(base, {"a": {"b": 5}, "d": [2]})
    assert merged == {"a": {"b": 5, "c": 2}, "d": [2]}
    assert base == {"a": {"b": 1, "c": 2}, "d": [1]}


def test_string_false_is_not_a_boolean():
    with pytest.raises(ConfigError, match=r"augmentation\.enabled"):
        load_preset("isles22", {"protocol": {"augmentation": {"enabled": "false"}}})


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"protocol\.epoch\b.*Extra inputs"):
        load_preset("isles22", {"protocol": {"epoch": 3}})


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError, match="available"):
        load_preset("no-such-dataset")
    assert "brats23" in available_presets()


def _study(**extra):
    data = {"study": "t", "models": ["unet"], "folds": [0], "num_folds": 2,
            "datasets": {"hippo": {"preset": "hippocampus", "root": "/nowhere"}}}
    data.update(extra)
    return data


def test_study_override_is_validated_with_its_path(tmp_path):
    data = _study()
    data["datasets"]["hippo"]["overrides"] = {"protocol": {"epochs": -3}}
    with pytest.raises(ConfigError, match=r"datasets\.hippo\.overrides\.protocol\.epochs"):
        load_study(data)


def test_study_from_file_and_views(tmp_path):
    data = _study(model_overrides={"unet": {"channels": [8, 16]}})
    data["datasets"]["hippo"]["overrides"] = {"protocol": {"epochs": 3}}
    data["datasets"]["hippo"]["model_overrides"] = {"unet": {"strides": [2]}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    study = load_study(path)
    assert study.preset("hippo").protocol.epochs == 3
    assert study.preset("hippo").protocol.lr == 1e-4  # untouched defaults survive the merge
    assert study.model_kwargs("hippo", "unet") == {"channels": [8, 16], "strides": [2]}
    with pytest.raises(ConfigError, match="not in study"):
        study.preset("brats")


def test_folds_must_exist():
    with pytest.raises(ConfigError, match="out of range"):
        load_study(_study(folds=[0, 2]))


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("study: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_study(path)
