"""The smoke study (.test/config/config.yaml: the embedded-default study on a tiny budget) end to end
through Snakemake on this machine, a dropped-in model file joining it by name, and a failing job
reported with its log."""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import job_stats, outputs_of, run_snakemake, smoke_config, table_models, write_study

pytestmark = pytest.mark.slow

DATASETS = ["isles22", "brats23", "glas", "fives"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The smoke study run once with `snakemake --cores 2` in a fresh folder (synthetic data included)."""
    work = tmp_path_factory.mktemp("smoke")
    study = write_study(work, smoke_config())
    start = time.monotonic()
    out = run_snakemake("--cores", "2", "--configfile", study, "--directory", work, timeout=900)
    return {"work": work, "study": study, "output": out.stdout, "seconds": time.monotonic() - start}


def test_smoke_study_end_to_end(smoke_run):
    """Every step ran once per dataset × model × fold, the data were written by the workflow, and the
    report holds a row per model × dataset; a rerun has nothing to do."""
    work, out = smoke_run["work"], smoke_run["output"]
    print(f"smoke study: {smoke_run['seconds']:.0f} s")
    stats = job_stats(out)
    pairs = 4 * 2  # four datasets × (deconver, unet)
    assert {k: stats.get(k) for k in ("prepare", "split", "train", "predict", "evaluate", "complexity",
                                      "aggregate", "report")} == \
        dict(prepare=4, split=4, train=pairs, predict=pairs, evaluate=pairs, complexity=1, aggregate=1, report=1)
    assert len(list((work / "results" / "smoke" / "complexity").glob("*/*.json"))) == pairs
    assert all(stats.get(f"synth_{d}") == 1 for d in DATASETS)
    for d in DATASETS:
        assert (work / "data" / d / "SYNTHETIC.txt").is_file()
    rep = work / "reports" / "smoke"
    assert (rep / "report.html").stat().st_size > 1000
    for d in DATASETS:
        assert table_models(rep / "tables" / f"{d}.csv") == ["deconver", "unet"], d
    summary = pd.read_csv(work / "results" / "smoke" / "aggregate" / "summary.csv")
    assert {(r.dataset, r.model) for r in summary.itertuples()} == {(d, m) for d in DATASETS for m in ("deconver", "unet")}
    # every job has its log, and the resolved study every step read
    logs = work / "results" / "smoke" / "logs"
    assert len(list(logs.glob("train/*/*/fold0.log"))) == pairs and (logs / "report" / "smoke.log").is_file()
    assert (work / "results" / "smoke" / "study.yaml").is_file()
    # a rerun is a no-op
    again = run_snakemake("--cores", "2", "--configfile", smoke_run["study"], "--directory", work, "-n")
    assert "Nothing to be done" in again.stdout


MODEL_FILE = '''"""A tiny two-layer convolutional net: the drop-in model of the workflow test."""
import torch.nn as nn

from deconver.registry import register_model


@register_model("tiny_dropin", dims=(2, 3), source="test", notes="two convolutions")
def tiny_dropin(in_channels, out_channels, spatial_dims, roi_size, width: int = 4):
    conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
    return nn.Sequential(conv(in_channels, width, 3, padding=1), nn.ReLU(), conv(width, out_channels, 1))
'''


def _complexity_records(work: Path) -> dict[str, dict]:
    return {p.relative_to(work).as_posix(): json.loads(p.read_text())
            for p in (work / "results" / "smoke" / "complexity").glob("*/*.json")}


def test_dropped_in_model_joins_the_study(smoke_run, tmp_path):
    """A model file dropped into the study's model folder joins it by name: only its jobs (and the
    complexity, aggregate and report, which cover every pair) run, the finished ones are kept, and the
    report gains its rows."""
    work = tmp_path / "smoke"
    shutil.copytree(smoke_run["work"], work, symlinks=True)
    before = outputs_of(work, "smoke")
    smoke_records = _complexity_records(work)
    (work / "my_models").mkdir()
    (work / "my_models" / "tiny_dropin.py").write_text(MODEL_FILE)
    out = run_snakemake("--cores", "2", "--configfile", work / "study.yaml", "--directory", work, "--config",
                        "models=[deconver, unet, tiny_dropin]", "model_dirs=[my_models]", timeout=600).stdout
    stats = job_stats(out)
    assert {k: stats.get(k) for k in ("prepare", "split", "train", "predict", "evaluate", "complexity")} == \
        dict(prepare=None, split=None, train=4, predict=4, evaluate=4, complexity=1)
    assert set(re.findall(r"model=([\w.+-]+)", out)) == {"tiny_dropin"}
    after = outputs_of(work, "smoke")
    pooled = ("results/smoke/aggregate/", "results/smoke/complexity/")  # rewritten: they cover every pair
    assert {k: v for k, v in after.items() if k in before and not k.startswith(pooled)} == \
        {k: v for k, v in before.items() if not k.startswith(pooled)}
    # the one complexity job measured the old pairs again (same inputs, same counts) and the new model
    now = _complexity_records(work)
    assert len(now) == 12 and sum("tiny_dropin" in k for k in now) == 4
    for key, record in smoke_records.items():
        assert (now[key]["inputs"], now[key]["flops"]) == (record["inputs"], record["flops"]), key
    for d in DATASETS:
        assert table_models(work / "reports" / "smoke" / "tables" / f"{d}.csv") == ["deconver", "tiny_dropin", "unet"]


BROKEN_BUILDER = '''"""A model whose builder fails: stopped before any job."""
from deconver.registry import register_model


@register_model("broken_net", dims=(2, 3), source="test")
def broken_net(in_channels, out_channels, spatial_dims, roi_size):
    raise RuntimeError("deliberately broken builder")
'''

BROKEN_FORWARD = '''"""A model that builds but fails in its first training step: the failing-job test."""
import torch

from deconver.registry import register_model


class Broken(torch.nn.Conv2d):
    def forward(self, x):
        raise RuntimeError("deliberately broken forward")


@register_model("broken_net", dims=(2, 3), source="test")
def broken_net(in_channels, out_channels, spatial_dims, roi_size):
    return Broken(in_channels, out_channels, 1)
'''


def _broken_study(smoke_roots, tmp_path, source):
    work = tmp_path / "work"
    cfg = smoke_config(models=["broken_net"], model_dirs=["my_models"], complexity={"activate": False})
    cfg["datasets"] = {"glas": cfg["datasets"]["glas"]}
    study = write_study(work, cfg, roots={"glas": smoke_roots["glas"]})
    (work / "my_models").mkdir()
    (work / "my_models" / "broken_net.py").write_text(source)
    return work, study


def test_broken_builder_stops_before_any_job(smoke_roots, tmp_path):
    """A builder that raises stops the workflow while the DAG is built, naming the model, the dataset and
    the file, before any job starts."""
    work, study = _broken_study(smoke_roots, tmp_path, BROKEN_BUILDER)
    out = run_snakemake("--cores", "2", "--configfile", study, "--directory", work, check=False, timeout=600)
    assert out.returncode != 0
    assert "model 'broken_net' on dataset 'glas'" in out.stdout and "deliberately broken builder" in out.stdout
    assert "broken_net.py" in out.stdout and "Error in rule" not in out.stdout, out.stdout[-3000:]
    assert not (work / "results" / "smoke" / "runs").exists()


def test_failing_job_is_reported_with_its_log(smoke_roots, tmp_path):
    """A job that fails stops the run with Snakemake's error naming the rule, the job and its log;
    the log holds the step's own message."""
    work, study = _broken_study(smoke_roots, tmp_path, BROKEN_FORWARD)
    out = run_snakemake("--cores", "2", "--configfile", study, "--directory", work, check=False, timeout=600)
    assert out.returncode != 0
    log = "results/smoke/logs/train/glas/broken_net/fold0.log"
    assert "Error in rule train:" in out.stdout and f"log: {log}" in out.stdout, out.stdout[-3000:]
    assert "deliberately broken forward" in (work / log).read_text()
    assert not (work / "results" / "smoke" / "runs" / "glas" / "broken_net" / "fold0" / "final.ckpt").exists()
