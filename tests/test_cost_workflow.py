"""The cost of a study end to end: calibrate on this machine, every training job's SLURM request follows
its plan in `snakemake -n --profile slurm`, and a training run records its wall time and prediction."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import run_snakemake, smoke_config, tool_env, write_study
from test_workflow_dryrun import blocks_of

pytestmark = pytest.mark.slow


def _deconver(*args, cwd):
    proc = subprocess.run([sys.executable, "-m", "deconver", *map(str, args)], cwd=cwd, env=tool_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_calibrated_requests_follow_the_plan_and_runs_record_their_cost(smoke_roots, tmp_path):
    from deconver.config import load_study
    from deconver.cost.estimate import load_calibration, run_cost, slurm_request
    from deconver.cost.record import read_record
    from deconver.paths import StudyPaths
    from deconver.plan import Run

    cfg = smoke_config()
    cfg["datasets"] = {d: cfg["datasets"][d] for d in ("glas", "isles22")}
    for d in cfg["datasets"].values():  # a long schedule (never trained here): requests above the 10-min floor
        d["overrides"]["protocol"].update(epochs=400, steps_per_epoch=50, val_every=50)
    work = tmp_path / "work"
    study_file = write_study(work, cfg, roots={d: smoke_roots[d] for d in cfg["datasets"]})
    run_snakemake("--cores", "2", "--configfile", study_file, "--directory", work,
                  "results/smoke/splits/glas.json", "results/smoke/splits/isles22.json")
    resolved = work / "results" / "smoke" / "study.yaml"
    _deconver("calibrate", "--config", resolved, "--steps", "1", cwd=work)
    study = load_study(resolved)
    with_base = StudyPaths.of(study, base=work)
    calibration, path = load_calibration(study, next((work / "results" / "smoke" / "calibration").glob("*.json")))
    assert {(p["dataset"], p["model"]) for p in calibration["pairs"] if p["status"] == "ok"} == {
        (d, m) for d in ("glas", "isles22") for m in ("deconver", "unet")}
    assert all(calibration["loading_samples_per_s"][d] > 0 for d in ("glas", "isles22"))

    plan = _deconver("plan", "--config", resolved, "--json", cwd=work)
    runs = {(r["dataset"], r["model"]): r for r in json.loads(plan.stdout)["runs"]}
    assert all(r["train_s"] and r["missing"] == [] for r in runs.values()), runs

    out = run_snakemake("-n", "--profile", "slurm", "--configfile", study_file, "--directory", work).stdout
    requests = {}
    for rule, block in blocks_of(out):
        if rule == "train":
            wc = dict(kv.split("=", 1) for kv in re.search(r"wildcards: (.*)", block).group(1).split(", "))
            res = dict(kv.split("=", 1) for kv in re.search(r"resources: (.*)", block).group(1).split(", "))
            requests[(wc["dataset"], wc["model"])] = (int(res["runtime"]), int(res["mem_mb"]))
    assert set(requests) == set(runs)
    for (d, m), got in requests.items():
        cost = run_cost(study, Run(d, m, 0), calibration, paths=with_base)
        want = slurm_request(cost, max_runtime_min=study.cost.max_runtime_min, default_runtime_min=0,
                             default_mem_mb=0)
        assert got == (want["runtime"], want["mem_mb"]), (d, m, got, want)
    assert len({r for r, _ in requests.values()}) > 1  # the requests differ by model and dataset

    # a run (cut short to one epoch) records its wall time, device-hours and the plan's prediction
    _deconver("train", "--config", resolved, "--dataset", "glas", "--model", "unet", "--fold", "0",
              "--max-epochs", "1", "--no-progress", cwd=work)
    record = read_record(with_base.cost("glas", "unet", 0))
    total = record["total"]
    assert total["attempts"] == 1 and total["epochs"] == 1 and total["wall_s"] > 0
    assert total["device_hours"] == pytest.approx(total["wall_s"] / 3600)
    assert record["predicted_train_s"] == pytest.approx(runs[("glas", "unet")]["train_s"], rel=1e-6)
    # the measured wall time starts at Lightning's fit: it is compared with the prediction without start-up
    assert record["predicted_fit_s"] == pytest.approx(runs[("glas", "unet")]["fit_s"], rel=1e-6)
    assert record["predicted_fit_s"] == pytest.approx(record["predicted_train_s"] - runs[("glas", "unet")]["startup_s"])
    assert 0 < record["predicted_fit_s"] < record["predicted_train_s"]
