"""The workflow never answers from stale work (issue 21), end to end on real MSD Hippocampus cases:

* SIGINT to the Snakemake process alone mid-run, then the same command: the jobs it left incomplete
  are redone (profiles/default sets rerun-incomplete), it does not stop with IncompleteFilesException,
  and with the data unchanged a dry run then has nothing to do (the inventory is stable);
* a changed model configuration of finished runs stops the workflow before any job, naming the runs
  (a changed study is a new study name), and deletes nothing; the original configuration has nothing to do;
* the dataset grows from 10 to 16 cases: `snakemake -n` lists exactly the changed dataset's prepare,
  split, train, predict and evaluate (and aggregate, report) with the inventory as the reason, the rerun
  retrains that run from scratch on the new fold (no validation case seen in training, from the run's
  recorded case lists), the other dataset's run is untouched, and the train log keeps every attempt.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

from conftest import REPO_ROOT, hippocampus_subset, run_snakemake, snakemake_cmd, tool_env, write_study
from test_workflow_dryrun import blocks_of

pytestmark = pytest.mark.slow
PROTOCOL = {"roi_size": [16, 16, 16], "batch_size": 2, "epochs": 2, "steps_per_epoch": 1, "val_every": 2,
            "warmup_epochs": 0, "sw_batch_size": 4, "num_workers": 0}


def _study(work) -> dict:
    entry = {"preset": "hippocampus", "overrides": {"protocol": PROTOCOL}}
    return {"study": "grow", "seed": 3, "num_folds": 2, "folds": [0], "models": ["unet"],
            "model_overrides": {"unet": {"channels": [4, 8], "strides": [2], "num_res_units": 0}},
            "trainer": {"accelerator": "cpu", "devices": 1}, "complexity": {"activate": False},
            "datasets": {"growing": {**entry, "root": str(work / "growing" / "Task04_Hippocampus")},
                         "steady": {**entry, "root": str(work / "steady" / "Task04_Hippocampus")}}}


def _wait_group_gone(pgid: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    os.killpg(pgid, signal.SIGKILL)
    raise AssertionError("the jobs left by the interrupted Snakemake did not end")


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    work = tmp_path_factory.mktemp("grow")
    hippocampus_subset(work / "growing" / "Task04_Hippocampus", 10)
    hippocampus_subset(work / "steady" / "Task04_Hippocampus", 6)
    study = write_study(work, _study(work))
    args = ("--cores", "2", "--configfile", study, "--directory", work)
    # 1. interrupt Snakemake alone (not its jobs) while it trains; its jobs finish on their own
    first_log = work / "first.log"
    with first_log.open("w") as log:
        proc = subprocess.Popen(snakemake_cmd(*args), cwd=REPO_ROOT, env=tool_env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 420
        while proc.poll() is None and time.monotonic() < deadline and "rule train:" not in first_log.read_text():
            time.sleep(0.2)
        assert proc.poll() is None, first_log.read_text()[-3000:]
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    _wait_group_gone(proc.pid)
    # 2. the same command again
    resumed = run_snakemake(*args, check=False, timeout=900)
    run = work / "results" / "grow" / "runs" / "growing" / "unet" / "fold0"
    steady = work / "results" / "grow" / "runs" / "steady" / "unet" / "fold0"
    state = {"work": work, "args": args, "first": first_log.read_text(), "resumed": resumed, "run": run,
             "steady": steady}
    if resumed.returncode != 0:
        return state
    state["settled"] = run_snakemake(*args, "-n", timeout=300).stdout  # unchanged data: nothing to redo
    state["old_record"] = json.loads((run / "run.json").read_text())
    state["steady_mtime"] = (steady / "final.ckpt").stat().st_mtime_ns
    # 3. the dataset grows; dry run, then the rerun
    hippocampus_subset(work / "growing" / "Task04_Hippocampus", 16)
    state["dry"] = run_snakemake(*args, "-n", timeout=300).stdout
    state["rerun"] = run_snakemake(*args, timeout=900).stdout
    # 4. the study's model configuration changes under the finished runs: the workflow stops before any
    # job, naming the changed runs; nothing of the old runs is touched
    changed = _study(work)
    changed["model_overrides"]["unet"]["channels"] = [4, 12]
    write_study(work, changed)
    state["changed_run"] = run_snakemake(*args, check=False, timeout=300)
    state["after_change"] = {p: p.stat().st_mtime_ns if p.is_file() else None for p in (run / "final.ckpt", steady / "final.ckpt")}
    write_study(work, _study(work))  # the original again: nothing to do
    state["restored_dry"] = run_snakemake(*args, "-n", timeout=300).stdout
    return state


def test_sigint_to_snakemake_alone_then_rerun_completes(grown):
    assert "rule train:" in grown["first"]
    out = grown["resumed"].stdout
    assert grown["resumed"].returncode == 0, out[-4000:]
    assert "IncompleteFilesException" not in out
    assert (grown["work"] / "reports" / "grow" / "report.html").is_file()
    assert "Nothing to be done" in grown["settled"], grown["settled"][-3000:]


def test_dry_run_lists_exactly_the_jobs_of_the_changed_dataset_and_why(grown):
    if "dry" not in grown:
        pytest.fail("the interrupted study did not complete: " + grown["resumed"].stdout[-2000:])
    listed = []
    for rule, block in blocks_of(grown["dry"]):
        wc = re.search(r"^\s+wildcards: (.*)$", block, re.M)
        reason = re.search(r"^\s+reason: (.*)$", block, re.M)
        listed.append((rule, wc.group(1) if wc else "", reason.group(1) if reason else ""))
    jobs = {rule: (wc, reason) for rule, wc, reason in listed if rule != "all"}
    assert sorted(rule for rule, _, _ in listed if rule != "all") == \
        ["aggregate", "evaluate", "predict", "prepare", "report", "split", "train"]
    assert all("dataset=growing" in wc for rule, (wc, _) in jobs.items() if rule not in ("aggregate", "report"))
    assert "Updated input files" in jobs["prepare"][1] and "inventory/growing.json" in jobs["prepare"][1]
    assert "updated by another job" in jobs["train"][1]
    assert "growing" in grown["dry"] and "changed since it was prepared" in grown["dry"]


def test_the_grown_dataset_is_retrained_from_scratch_and_validated_on_unseen_cases(grown):
    if "rerun" not in grown:
        pytest.fail("the interrupted study did not complete: " + grown["resumed"].stdout[-2000:])
    run, work = grown["run"], grown["work"]
    record = json.loads((run / "run.json").read_text())
    split = json.loads((work / "results" / "grow" / "splits" / "growing.json").read_text())["folds"][0]
    assert record["train_ids"] == split["train"] and record["val_ids"] == split["val"]
    assert record["train_cases"] + record["val_cases"] == 16
    assert not set(record["train_ids"]) & set(record["val_ids"])
    assert set(record["val_ids"]) & set(grown["old_record"]["train_ids"]), "the new fold must reuse old cases"
    log = (work / "results" / "grow" / "logs" / "train" / "growing" / "unet" / "fold0.attempts.log").read_text()
    assert "starting over from scratch" in log and "resuming" not in log.split("starting over")[1]
    assert log.count("== ") >= 2   # every attempt kept (the interrupted run's, its redo, the retraining)
    import pandas as pd

    evaluated = set(pd.read_csv(run / "evaluation.csv")["case"].astype(str))
    assert evaluated == set(record["val_ids"])
    # the dataset that did not change kept its run
    assert (grown["steady"] / "final.ckpt").stat().st_mtime_ns == grown["steady_mtime"]


def test_a_changed_model_configuration_stops_the_workflow_before_any_job(grown):
    if "changed_run" not in grown:
        pytest.fail("the study did not complete: " + grown["resumed"].stdout[-2000:])
    out = grown["changed_run"]
    assert out.returncode != 0
    text = out.stdout  # (stderr is merged into it)
    assert "configuration of 2 run(s)" in text and "new `study` name" in text, text[-3000:]
    assert "runs/growing/unet/fold0" in text and "runs/steady/unet/fold0" in text
    assert "rule train" not in text  # no job ran
    assert None not in grown["after_change"].values()  # nothing deleted
    assert grown["after_change"][grown["steady"] / "final.ckpt"] == grown["steady_mtime"]
    assert "Nothing to be done" in grown["restored_dry"], grown["restored_dry"][-2000:]
