"""A full disk or a read-only results folder ends a step with one line naming the path and what to do,
not a traceback (issue 21). Real faults: a size-limited or read-only tmpfs mounted over the output
folder in a private mount namespace (`unshare -rm`), around the real `deconver` command."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deconver.data.synth import write_synthetic

pytestmark = pytest.mark.skipif(
    shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode,
    reason="needs `unshare -rm` (user and mount namespaces) to mount a small or read-only tmpfs")


def _in_mount(target: Path, options: str, command: list[str], setup: str = "") -> subprocess.CompletedProcess:
    """Run `command` with a tmpfs (`options`) mounted over `target`, after shell `setup` inside it."""
    target.mkdir(parents=True, exist_ok=True)
    script = (f"mount -t tmpfs -o {options} tmpfs '{target}' && {setup or 'true'} && "
              f"exec {' '.join(map(repr, command))}")
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600)


def _one_error_line(proc: subprocess.CompletedProcess, step: str, path_part: str, *words: str) -> str:
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = lines[-1]
    assert last.startswith(f"deconver {step}: error:") and path_part in last, last
    assert all(w in last for w in words), last
    return last


@pytest.fixture(scope="module")
def isles(tmp_path_factory):
    return write_synthetic("isles22", tmp_path_factory.mktemp("faults") / "isles22", cases=3, seed=4)


def _prepare(isles: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "deconver", "prepare", "--preset", "isles22", "--root", str(isles),
            "--out", str(out), "--no-progress"]


def test_disk_full_during_prepare(isles, tmp_path):
    out = tmp_path / "results"
    proc = _in_mount(out, "size=48k", _prepare(isles, out / "prepared"))
    _one_error_line(proc, "prepare", str(out / "prepared"), "no space left", "rerun the same command")


def test_read_only_results_folder(isles, tmp_path):
    out = tmp_path / "results"
    proc = _in_mount(out, "ro", _prepare(isles, out / "prepared"))
    _one_error_line(proc, "prepare", str(out), "cannot write", "writable")


@pytest.mark.slow
def test_disk_full_while_training_checkpoints(isles, tmp_path):
    """The prepared cache and fold file fit, the first checkpoint does not."""
    results = tmp_path / "results"
    study = {"study": "full", "results_dir": str(results), "num_folds": 2, "folds": [0], "models": ["unet"],
             "model_overrides": {"unet": {"channels": [4, 8], "strides": [2], "num_res_units": 0}},
             "trainer": {"accelerator": "cpu"},
             "datasets": {"isles22": {"preset": "isles22", "root": str(isles), "overrides": {"protocol": {
                 "roi_size": [16, 16, 16], "batch_size": 2, "epochs": 1, "steps_per_epoch": 1, "val_every": 1,
                 "warmup_epochs": 0, "num_workers": 0}}}}}
    cfg = tmp_path / "study.yaml"
    cfg.write_text(yaml.safe_dump(study))
    base = [sys.executable, "-m", "deconver"]
    args = ["--config", str(cfg), "--dataset", "isles22"]
    for step in (["prepare", *args, "--no-progress"], ["split", *args]):
        assert subprocess.run(base + step, capture_output=True, timeout=600).returncode == 0
    staged = tmp_path / "staged"
    shutil.copytree(results, staged)
    used = sum(f.stat().st_size for f in staged.rglob("*") if f.is_file())
    size_k = (used + 4096 * len(list(staged.rglob("*"))) + 16 * 1024) // 1024
    proc = _in_mount(results, f"size={size_k}k", base + ["train", *args, "--model", "unet", "--fold", "0",
                                                          "--no-progress"],
                     setup=f"cp -a '{staged}/.' '{results}/'")
    _one_error_line(proc, "train", str(results / "full" / "runs"), "no space left")


def test_read_only_results_folder_stops_the_workflow_before_any_job(tmp_path):
    from conftest import smoke_config, snakemake_cmd, write_study

    work = tmp_path / "work"
    study = write_study(work, smoke_config())
    proc = _in_mount(work / "results", "ro", snakemake_cmd("-n", "--cores", "1", "--configfile", study,
                                                           "--directory", work))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out, out[-3000:]
    assert "cannot write results/smoke/study.yaml" in out and "writable" in out, out[-3000:]
