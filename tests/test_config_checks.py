"""Values that used to pass the schema and fail hours later (or write outside the results folder)
are refused when the study is loaded, naming the key (issue 21)."""
import pytest

from deconver.config import ConfigError, load_preset, load_study


def _study(**extra):
    data = {"study": "t", "models": ["unet"], "folds": [0], "num_folds": 2,
            "datasets": {"hippo": {"preset": "hippocampus", "root": "/nowhere"}}}
    data.update(extra)
    return data


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a/b", "../x", ""])
def test_study_name_must_be_a_plain_folder_name(name):
    with pytest.raises(ConfigError, match=r"study"):
        load_study(_study(study=name))


def test_plain_study_names_pass():
    for name in ("paper", "run-2.1", "t_3"):
        assert load_study(_study(study=name)).study == name


@pytest.mark.parametrize("name", ["..", "a/b", ".x"])
def test_dataset_name_must_be_a_plain_folder_name(name):
    data = _study(datasets={name: {"preset": "hippocampus", "root": "/nowhere"}})
    with pytest.raises(ConfigError, match=r"datasets.*not plain folder names"):
        load_study(data)


@pytest.mark.parametrize("axcodes", ["XYZ", "RRS", "RA", "RASX", "ras"])
def test_orientation_must_be_axis_codes(axcodes):
    with pytest.raises(ConfigError, match=r"preprocessing\.orientation.*not an orientation"):
        load_preset("hippocampus", {"preprocessing": {"orientation": axcodes}})


def test_valid_orientations_pass():
    for axcodes in ("RAS", "LPS", "SAR", None):
        assert load_preset("hippocampus", {"preprocessing": {"orientation": axcodes}}).preprocessing.orientation == axcodes


@pytest.mark.parametrize("spacing", [[0, 1, 1], [1.0, -1.0, 1.0], [1.0, 1.0, float("nan")], [1.0, float("inf"), 1.0]])
def test_spacing_must_be_positive(spacing):
    with pytest.raises(ConfigError, match=r"preprocessing\.spacing.*> 0"):
        load_preset("hippocampus", {"preprocessing": {"spacing": spacing}})


def test_positive_spacing_passes():
    assert load_preset("hippocampus", {"preprocessing": {"spacing": [1, 0.5, 2.0]}}).preprocessing.spacing == [1, 0.5, 2.0]


@pytest.mark.parametrize("devices", [0, -2])
def test_trainer_devices_must_be_positive(devices):
    with pytest.raises(ConfigError, match=r"trainer\.devices"):
        load_study(_study(trainer={"devices": devices}))


def test_trainer_devices_auto_or_positive():
    assert load_study(_study(trainer={"devices": 2})).trainer.devices == 2
    assert load_study(_study(trainer={"devices": "auto"})).trainer.devices == "auto"


@pytest.mark.parametrize("penalty", [-5, 0])
def test_hd95_penalty_must_be_positive(penalty):
    data = _study()
    data["datasets"]["hippo"]["overrides"] = {"metrics": {"hd95_penalty": penalty}}
    with pytest.raises(ConfigError, match=r"metrics\.hd95_penalty"):
        load_study(data)


def test_hd95_penalty_positive_or_diagonal():
    assert load_preset("hippocampus", {"metrics": {"hd95_penalty": 50}}).metrics.hd95_penalty == 50
    assert load_preset("hippocampus", {"metrics": {"hd95_penalty": "diagonal"}}).metrics.hd95_penalty == "diagonal"
