"""End-to-end runs of the engine on synthetic stand-ins, through the real `deconver synth`/`prepare`/`split`
outputs: run folder and no-op rerun, kill -9 and resume (bitwise on CPU), DDP on 2 CPU processes,
predictions in the native grid (3D NIfTI cropped + resampled, 2D PNG), and configuration errors that
stop before training."""
from __future__ import annotations

import copy
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import lightning.pytorch as L
import torch
import yaml
from PIL import Image

from deconver.cli import main as cli
from deconver.config import ConfigError
from deconver.data import PreparedDataset, write_synthetic
from deconver.engine import predict, train
from deconver.engine.module import lr_factor
from deconver.engine.predict import load_network

TINY_UNET = {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}
FAST = {"num_workers": 0, "lr": 0.003, "warmup_epochs": 1, "sw_batch_size": 8}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _study(root: Path, name: str = "eng", **changes) -> dict:
    """A study over the synthetic stand-ins in `root/data` with tiny protocols."""
    study = {
        "study": name, "seed": 11, "results_dir": str(root / "results"), "num_folds": 2, "folds": [0],
        "models": ["unet"], "model_overrides": {"unet": TINY_UNET},
        "trainer": {"accelerator": "cpu"},
        "datasets": {
            # margin 0 and 3 mm: every case is cropped to the head and resampled
            "isles22": {"preset": "isles22", "root": str(root / "data" / "isles22"), "overrides": {
                "preprocessing": {"spacing": [3.0, 3.0, 3.0], "crop_margin": 0},
                "protocol": {**FAST, "roi_size": [24, 24, 16], "batch_size": 2, "epochs": 4, "steps_per_epoch": 2,
                             "val_every": 2}}},
            "brats23": {"preset": "brats23", "root": str(root / "data" / "brats23"), "overrides": {
                "preprocessing": {"spacing": [2.0, 2.0, 2.0]},
                "protocol": {**FAST, "roi_size": [24, 24, 16], "batch_size": 4, "epochs": 2, "steps_per_epoch": 3,
                             "val_every": 1}}},
            "glas": {"preset": "glas", "root": str(root / "data" / "glas"), "overrides": {
                "protocol": {**FAST, "roi_size": [64, 64], "batch_size": 4, "epochs": 1, "steps_per_epoch": 2,
                             "sw_overlap": 0.25}}},
        },
    }
    for key, value in changes.items():
        study[key] = value
    return study


def _write(study: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(study))
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """Synthetic isles22/brats23/glas written, prepared and split through the real CLI steps."""
    root = tmp_path_factory.mktemp("engine")
    for kind in ("isles22", "brats23", "glas"):
        write_synthetic(kind, root / "data" / kind, cases=6, seed=0)
    cfg = _write(_study(root), root / "study.yaml")
    for kind in ("isles22", "brats23", "glas"):
        assert cli(["prepare", "--config", str(cfg), "--dataset", kind, "--no-progress"]) == 0
        assert cli(["split", "--config", str(cfg), "--dataset", kind]) == 0
    return root


def _clone(synthetic: Path, tmp_path: Path, study: dict) -> dict:
    """The same study under another results_dir, sharing the prepared caches and fold files (copied)."""
    study = copy.deepcopy(study)
    study["results_dir"] = str(tmp_path / "results")
    src = synthetic / "results" / study["study"]
    for part in ("prepared", "splits"):
        shutil.copytree(src / part, tmp_path / "results" / study["study"] / part)
    return study


def _read_log(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def isles_run(synthetic) -> Path:
    study = _study(synthetic)
    final = train(study, "isles22", "unet", 0, progress=False)
    return final.parent


# --------------------------------------------------------------------------- run folder
def test_run_folder_records_and_noop_rerun(synthetic, isles_run, capfd):
    run = isles_run
    for name in ("run.json", "model.json", "train_log.csv", "final.ckpt", "checkpoints/last.ckpt",
                 "checkpoints/best.ckpt"):
        assert (run / name).is_file(), name
    record = json.loads((run / "run.json").read_text())
    assert record["preset"]["protocol"]["epochs"] == 4 and record["model_kwargs"] == TINY_UNET
    assert {"deconver_version", "git_commit", "torch_version", "device"} <= set(record["provenance"])
    # the allocator's defaults unless trainer.keep_freed_memory: true (deconver.engine.allocator)
    assert record["provenance"]["allocator"] == {"keep_freed_memory": False, "reason": "trainer.keep_freed_memory: false"}
    model = json.loads((run / "model.json").read_text())
    assert (model["name"], model["in_channels"], model["out_channels"], model["roi_size"]) == ("unet", 2, 1, [24, 24, 16])
    recipe = json.loads((run / "protocol.json").read_text())  # `deconver protocol`, beside the checkpoints
    assert recipe["training"]["epochs"] == 4 and recipe["model"] == "unet" and recipe["model_kwargs"] == TINY_UNET
    assert recipe["crop_sampling"]["mode"] == "uniform" and recipe["split"]["val_sizes"][0] == record["val_cases"]
    assert [t["transform"] for t in recipe["training_transforms"]][:2] == ["SpatialPadd", "RandSpatialCropd"]
    rows = _read_log(run / "train_log.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    assert [bool(r["val_dice"]) for r in rows] == [False, True, False, True]  # every 2 epochs and the last
    assert all(0.0 <= float(r["val_dice"]) <= 1.0 for r in rows if r["val_dice"])
    protocol = PreparedDataset(synthetic / "results" / "eng" / "prepared" / "isles22").preset.protocol
    for r in rows:
        assert float(r["lr"]) == pytest.approx(0.003 * lr_factor(int(r["epoch"]), protocol, 4), rel=1e-4)
        assert float(r["seconds_per_step"]) > 0 and float(r["peak_memory_mb"]) > 0
        assert int(r["step"]) == 2 * (int(r["epoch"]) + 1)
    final = torch.load(run / "final.ckpt", map_location="cpu", weights_only=True)
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["epoch"] == 3 and final["model"]["name"] == "unet"
    assert all(torch.equal(final["state_dict"][k], v) for k, v in last["state_dict"].items())
    # a finished run is a no-op: nothing is rewritten, through the API and the CLI
    stamp = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    capfd.readouterr()
    assert train(_study(synthetic), "isles22", "unet", 0, progress=False) == run / "final.ckpt"
    cfg = _write(_study(synthetic), synthetic / "study.yaml")
    t0 = time.perf_counter()
    assert cli(["train", "--config", str(cfg), "--dataset", "isles22", "--model", "unet", "--fold", "0"]) == 0
    assert time.perf_counter() - t0 < 30
    assert "nothing to do" in capfd.readouterr().err
    assert stamp == {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- kill -9 and resume
def test_kill_9_then_rerun_gives_bitwise_identical_weights(synthetic, isles_run, tmp_path):
    study = _clone(synthetic, tmp_path, _study(synthetic))
    cfg = _write(study, tmp_path / "study.yaml")
    run = tmp_path / "results" / "eng" / "runs" / "isles22" / "unet" / "fold0"
    command = ["deconver", "train", "--config", str(cfg), "--dataset", "isles22", "--model", "unet", "--fold", "0",
               "--no-progress"]
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"training ended before it could be killed:\n{proc.stderr.read()[-3000:]}"
    assert last.exists(), "no checkpoint within 300 s"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "final.ckpt").exists()
    epochs_done = int(torch.load(last, map_location="cpu", weights_only=True)["epoch"]) + 1
    assert epochs_done < 4
    rerun = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming" in rerun.stderr and "last.ckpt" in rerun.stderr
    ref, got = _weights(isles_run / "final.ckpt"), _weights(run / "final.ckpt")
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref), "resumed weights differ from the uninterrupted run"
    ref_log, got_log = _read_log(isles_run / "train_log.csv"), _read_log(run / "train_log.csv")
    keys = ("epoch", "step", "train_loss", "val_dice", "lr")
    assert [[r[k] for k in keys] for r in got_log] == [[r[k] for k in keys] for r in ref_log]


# --------------------------------------------------------------------------- DDP
def test_ddp_two_cpu_processes_match_one_process(synthetic, tmp_path):
    """2 processes (gloo) with the same global batch (4: 2 per process) see the batches of 1 process."""
    one = _study(synthetic, "eng")
    train(one, "brats23", "unet", 0, progress=False)
    ref_run = synthetic / "results" / "eng" / "runs" / "brats23" / "unet" / "fold0"
    two = _clone(synthetic, tmp_path, one)
    two["trainer"] = {"accelerator": "cpu", "devices": 2, "strategy": "ddp"}
    assert two["datasets"]["brats23"]["overrides"]["protocol"]["batch_size"] == 4  # global: unchanged
    cfg = _write(two, tmp_path / "study.yaml")
    proc = subprocess.run(["deconver", "train", "--config", str(cfg), "--dataset", "brats23", "--model", "unet",
                           "--fold", "0", "--no-progress"], env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "results" / "eng" / "runs" / "brats23" / "unet" / "fold0"
    ref_log, got_log = _read_log(ref_run / "train_log.csv"), _read_log(run / "train_log.csv")
    assert len(got_log) == len(ref_log) == 2
    for a, b in zip(ref_log, got_log):
        assert int(a["step"]) == int(b["step"]) == 3 * (int(a["epoch"]) + 1)
        for key in ("val_dice", "val_dice_ET", "val_dice_TC", "val_dice_WT"):
            assert float(b[key]) == pytest.approx(float(a[key]), abs=0.01), key
        assert float(b["train_loss"]) == pytest.approx(float(a["train_loss"]), rel=1e-3)
    assert "MEMBER: 2/2" in proc.stderr  # really two processes
    assert json.loads((run / "run.json").read_text())["trainer"]["devices"] == 2
    # same function: Adam turns float noise into visible differences of parameters whose true gradient
    # is zero (conv biases before instance norm), so compare what the networks compute
    image, _ = PreparedDataset(synthetic / "results" / "eng" / "prepared" / "brats23").load("BraTS-GLI-00000-000")
    x = torch.from_numpy(np.ascontiguousarray(image[:, :24, :24, :16]))[None]
    with torch.no_grad():
        a = load_network(ref_run, ref_run / "final.ckpt")(x)
        b = load_network(run, run / "final.ckpt")(x)
    assert torch.allclose(a, b, atol=2e-3 * float(a.abs().max())), float((a - b).abs().max())


# --------------------------------------------------------------------------- predictions
def test_predict_3d_native_grid_of_cropped_resampled_cases(synthetic, isles_run, capfd):
    out = predict(_study(synthetic), "isles22", "unet", 0, probabilities=True, progress=False)
    assert out == isles_run / "predictions"
    prepared = PreparedDataset(synthetic / "results" / "eng" / "prepared" / "isles22")
    val = json.loads((synthetic / "results" / "eng" / "splits" / "isles22.json").read_text())["folds"][0]["val"]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == sorted(
        [f"{c}.nii.gz" for c in val] + [f"{c}_prob.nii.gz" for c in val])
    for case in val:
        entry = prepared.case(case)
        g = entry["geometry"]
        assert g["resampled"] and g["prepared_shape"] != g["native_shape"]
        assert any(s > 0 for s in g["crop_start"]) or g["crop_end"] != g["oriented_shape"]  # really cropped
        source = nib.load(entry["source"]["images"][0])
        pred = nib.load(out / f"{case}.nii.gz")
        assert pred.shape == source.shape
        np.testing.assert_allclose(pred.affine, source.affine, atol=1e-4)
        assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1}
        prob = nib.load(out / f"{case}_prob.nii.gz")
        assert prob.shape == (*source.shape, 1)
        np.testing.assert_allclose(prob.affine, source.affine, atol=1e-4)
        p = np.asarray(prob.dataobj)
        assert p.min() >= 0 and p.max() <= 1
        # the label map is the thresholded probability map
        np.testing.assert_array_equal(np.asarray(pred.dataobj) == 1, p[..., 0] > 0.5)
        # the thresholded outputs on the prepared grid, for the authors' metric convention
        with np.load(out / "masks" / f"{case}_prepared.npz") as f:
            masks = f["masks"]
        assert masks.shape == (1, *g["prepared_shape"]) and masks.dtype == bool
    record = json.loads((out / "predictions.json").read_text())
    assert record["cases"] == val and "provenance" in record
    # every convention from these predictions: suite and challenge on the native grid, authors on the prepared one
    from deconver.metrics.evaluate import evaluate_run

    cfg = _write(_study(synthetic), synthetic / "study_eval.yaml")
    table = pd.read_csv(evaluate_run(cfg, "isles22", "unet", 0, base=synthetic))
    assert set(table["convention"]) == {"suite", "authors", "challenge"}
    authors = table[table["convention"] == "authors"]
    assert set(authors["metric"]) == {"dice", "hd95"} and set(authors.loc[authors["metric"] == "hd95", "unit"]) == {"vox"}
    for case in val:  # Dice of the saved masks against the prepared label, as MONAI computes it
        with np.load(out / "masks" / f"{case}_prepared.npz") as f:
            m = f["masks"][0]
        lab = prepared.load(case)[1][0] > 0
        expected = 2 * (m & lab).sum() / (m.sum() + lab.sum()) if m.sum() + lab.sum() else float("nan")
        got = authors[(authors["case"] == case) & (authors["metric"] == "dice")]["value"].item()
        assert got == pytest.approx(expected, nan_ok=True)
    stamp = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    capfd.readouterr()
    predict(_study(synthetic), "isles22", "unet", 0, probabilities=True, progress=False)
    assert "nothing to do" in capfd.readouterr().err
    assert stamp == {p: p.stat().st_mtime_ns for p in out.iterdir()}


def test_2d_train_and_png_predictions_in_native_size(synthetic, tmp_path):
    study = _study(synthetic)
    study["trainer"]["tensorboard"] = True
    final = train(study, "glas", "unet", 0, progress=False)
    assert list((final.parent / "tensorboard").rglob("events.out.tfevents.*"))  # optional TensorBoard log
    out = predict(study, "glas", "unet", 0, progress=False)
    prepared = PreparedDataset(synthetic / "results" / "eng" / "prepared" / "glas")
    pngs = sorted(out.glob("*.png"))
    assert pngs
    for png in pngs:
        entry = prepared.case(png.name.removesuffix(".png"))
        with Image.open(entry["source"]["images"][0]) as src, Image.open(png) as pred:
            assert pred.size == src.size and pred.mode == "L"
            assert set(np.unique(np.asarray(pred)).tolist()) <= {0, 1}
    # any folder in the official layout: prepared on the fly, every case predicted
    cfg = _write(study, tmp_path / "study.yaml")
    assert cli(["predict", "--config", str(cfg), "--dataset", "glas", "--model", "unet", "--fold", "0",
                "--input-dir", str(synthetic / "data" / "glas"), "--output-dir", str(tmp_path / "pred"),
                "--probabilities", "--no-progress"]) == 0
    assert len(list((tmp_path / "pred").glob("*.png"))) == 6
    probs = sorted((tmp_path / "pred").glob("*_prob.npy"))
    assert len(probs) == 6 and np.load(probs[0]).shape[0] == 1


# --------------------------------------------------------------------------- errors before training
@pytest.mark.parametrize("change, match", [
    ({"protocol": {"epochs": -3}}, r"protocol\.epochs"),
    ({"protocol": {"loss": "focal"}}, r"protocol\.loss"),
    ({"protocol": {"roi_size": [96, 96, 96]}}, r"protocol\.roi_size"),
    ({"protocol": {"roi_size": [30, 24, 16]}}, r"roi_size"),  # not a multiple of the U-Net's divisor 4
    ({"protocol": {"precision": "16-mixed"}}, r"protocol\.precision"),
])
def test_bad_config_fails_before_training_naming_the_key(synthetic, tmp_path, change, match):
    study = _clone(synthetic, tmp_path, _study(synthetic))
    overrides = study["datasets"]["isles22"]["overrides"]
    overrides["protocol"].update(change["protocol"])
    with pytest.raises(ConfigError, match=match):
        train(study, "isles22", "unet", 0, progress=False)
    assert not (tmp_path / "results" / "eng" / "runs").exists()


def test_bad_cli_values_fail_naming_the_flag_or_key(synthetic, tmp_path, capfd):
    study = _clone(synthetic, tmp_path, _study(synthetic))
    with pytest.raises(ConfigError, match=r"--max-epochs"):
        train(study, "isles22", "unet", 0, max_epochs=0)
    study["model_overrides"] = {"unet": {**TINY_UNET, "num_res_units": "two"}}
    with pytest.raises(ConfigError, match=r"model_overrides\.unet"):
        train(study, "isles22", "unet", 0)
    cfg = _write(_study(synthetic), tmp_path / "study.yaml")
    capfd.readouterr()
    assert cli(["train", "--config", str(cfg), "--dataset", "isles22", "--model", "unet", "--fold", "7"]) == 2  # a usage error
    assert "--fold" in capfd.readouterr().err
    assert not (tmp_path / "results" / "eng" / "runs").exists()


class _Preempted(RuntimeError):
    pass


class _PreemptMidEpoch(L.Callback):
    """What Lightning's SLURM SIGUSR1 handler does (an hpc checkpoint in the run folder), in the middle
    of an epoch, then the job dies."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 2 and batch_idx == 0:
            trainer.save_checkpoint(Path(trainer.default_root_dir) / "hpc_ckpt_1.ckpt")
            raise _Preempted("simulated preemption")


def test_mid_epoch_hpc_checkpoint_resume_is_bitwise_identical(synthetic, isles_run, tmp_path, capfd):
    study = _clone(synthetic, tmp_path, _study(synthetic))
    run = tmp_path / "results" / "eng" / "runs" / "isles22" / "unet" / "fold0"
    with pytest.raises(_Preempted):
        train(study, "isles22", "unet", 0, progress=False, callbacks=[_PreemptMidEpoch()])
    assert (run / "hpc_ckpt_1.ckpt").is_file() and not (run / "final.ckpt").exists()
    changed = copy.deepcopy(study)
    changed["datasets"]["isles22"]["overrides"]["protocol"]["lr"] = 0.001
    with pytest.raises(ConfigError, match="different configuration"):  # never resume another configuration
        train(changed, "isles22", "unet", 0, progress=False)
    capfd.readouterr()
    train(study, "isles22", "unet", 0, progress=False)
    assert "from hpc_ckpt_1.ckpt" in capfd.readouterr().err
    ref, got = _weights(isles_run / "final.ckpt"), _weights(run / "final.ckpt")
    assert all(torch.equal(ref[k], got[k]) for k in ref), "mid-epoch resume differs from the uninterrupted run"
    assert not list(run.glob("hpc_ckpt_*.ckpt"))  # cleaned up once finished
