"""One exit-status rule for every `deconver <step>` (deconver/steps.py): 2 for a usage or configuration
error, with one line naming the argument or the file; 1 when the step fails while running; 0 when done."""
from __future__ import annotations

import argparse

import pytest
import yaml

from deconver.cli import COMMANDS, main
from deconver.steps import FAILED, USAGE, UsageError, exit_status, named_input, pipeline_mode

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def study(tmp_path):
    """A study whose synthetic GlaS stand-in is not written: enough for every check made before any work."""
    cfg = tmp_path / "study.yaml"
    cfg.write_text(yaml.safe_dump({
        "study": "exits", "results_dir": str(tmp_path / "results"), "reports_dir": str(tmp_path / "reports"),
        "num_folds": 2, "folds": [0], "models": ["unet"],
        "datasets": {"glas": {"preset": "glas", "root": str(tmp_path / "glas"), "synthetic": True}}}))
    return cfg


# step -> (arguments, what the one-line message must name); {cfg} is the study, {tmp} the test's folder
BAD_ARGUMENTS = {
    "models": (["--config", "{tmp}/missing.yaml"], "{tmp}/missing.yaml"),
    "synth": (["--dataset", "lidc", "--out", "{tmp}/x"], "--dataset"),
    "preset": (["--from", "{tmp}/nowhere"], "--from"),
    "prepare": (["--preset", "glas", "--out", "{tmp}/prep"], "--root"),
    "split": (["--prepared", "{tmp}/nowhere", "--out", "{tmp}/split.json"], "--prepared"),
    "protocol": (["--config", "{cfg}", "--dataset", "nosuch"], "nosuch"),
    "calibrate": (["--config", "{tmp}/missing.yaml"], "{tmp}/missing.yaml"),
    "plan": (["--config", "{cfg}", "--calibration", "{tmp}/none.json"], "--calibration"),
    "train": (["--config", "{cfg}", "--dataset", "glas", "--model", "unet", "--fold", "7"], "--fold"),
    "predict": (["--config", "{cfg}", "--dataset", "glas", "--model", "no_model", "--fold", "0"], "--model"),
    "evaluate": (["--config", "{cfg}", "--dataset", "glas"], "--model"),
    "complexity": (["--dataset", "glas", "--model", "no_such_model", "--no-runtime"], "no_such_model"),
    "aggregate": (["--reference", "unet"], "--results"),
    "report": (["--aggregate", "{tmp}/nowhere", "--out", "{tmp}/rep"], "--aggregate"),
}


def test_every_step_is_checked():
    assert set(BAD_ARGUMENTS) == set(COMMANDS)


@pytest.mark.parametrize("step", sorted(BAD_ARGUMENTS))
def test_a_bad_argument_exits_2_naming_it(step, study, tmp_path, capsys):
    args, named = BAD_ARGUMENTS[step]
    fill = {"cfg": str(study), "tmp": str(tmp_path)}
    assert main([step, *(a.format(**fill) for a in args)]) == USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"deconver {step}: error: ") and named.format(**fill) in err[0], err
    assert not (tmp_path / "results").exists()  # found before any work


def test_argparse_errors_exit_2_too(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--config", "c.yaml", "--dataset", "d", "--model", "m", "--fold", "x"])
    assert stop.value.code == USAGE and "--fold" in capsys.readouterr().err


def test_failures_while_running_exit_1(tmp_path, capsys):
    from deconver.data.synth import write_synthetic

    root = write_synthetic("glas", tmp_path / "glas", cases=4, seed=0)
    prep, split = tmp_path / "prep", tmp_path / "split.json"
    assert main(["prepare", "--preset", "glas", "--root", str(root), "--out", str(prep), "--no-progress"]) == 0
    # four cases cannot make nine folds: the data, not the request as written, stops the split
    assert main(["split", "--prepared", str(prep), "--out", str(split), "--num-folds", "9"]) == FAILED
    assert "cannot be split into 9 folds" in capsys.readouterr().err
    # a corrupt image file of the dataset
    image = sorted(root.glob("*.bmp"))[0]
    image.write_bytes(image.read_bytes()[:100])
    assert main(["prepare", "--preset", "glas", "--root", str(root), "--out", str(tmp_path / "prep2"),
                 "--no-progress"]) == FAILED
    assert image.name in capsys.readouterr().err
    # an input an earlier step should have written (the aggregate folder exists, aggregate.json does not)
    (tmp_path / "agg").mkdir()
    assert main(["report", "--aggregate", str(tmp_path / "agg"), "--out", str(tmp_path / "rep")]) == FAILED
    assert "aggregate.json" in capsys.readouterr().err
    # and rerunning a finished step is done (0), saying so
    assert main(["prepare", "--preset", "glas", "--root", str(write_synthetic("glas", tmp_path / "g2", cases=4, seed=0)),
                 "--out", str(prep), "--no-progress"]) == 0


def test_the_rule_and_the_argument_checks():
    from deconver.config import ConfigError
    from deconver.data import DatasetError
    from deconver.registry import ModelError
    from deconver.registry.errors import ModelBuildError, ModelFileError, UnknownModelError

    for usage in (UsageError("x"), ConfigError("x"), ModelError("x"), UnknownModelError("x")):
        assert exit_status(usage) == USAGE
    for failure in (DatasetError("x"), ModelFileError("x"), ModelBuildError("x")):
        assert exit_status(failure) == FAILED
    assert exit_status(KeyError("a bug")) is None
    hand = argparse.Namespace(config=None, dataset="d", pred_dir="p", gt_dir=None)
    with pytest.raises(UsageError, match=r"--config STUDY.yaml --dataset, or by hand --pred-dir --gt-dir "
                                         r"\(missing --gt-dir\)"):
        pipeline_mode(hand, pipeline=["dataset"], by_hand=["pred_dir", "gt_dir"])
    both = argparse.Namespace(config="s.yaml", dataset="d", pred_dir="p")
    with pytest.raises(UsageError, match="not both"):
        pipeline_mode(both, pipeline=["dataset"], not_with_config=["pred_dir"])
    assert pipeline_mode(argparse.Namespace(config="s.yaml", dataset="d"), pipeline=["dataset"])
    assert named_input(None, "--x") is None
    with pytest.raises(UsageError, match="--x: nowhere does not exist"):
        named_input("nowhere", "--x")
