"""The smoke study through the SLURM profile (`--profile slurm`, slurm/config.yaml) on a real
single-node SLURM started by ../shared/tools/slurm-up.sh (skipped where it cannot start): every
compute job goes through sbatch (the GPU steps with a GPU request), the outputs appear and the
run finishes."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, snakemake_cmd, smoke_config, table_models, tool_env, write_study

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

# This node has 2 CPUs and ~20 GB: the profile's cluster-sized requests are scaled down here, as a
# user adapts them to their cluster; everything else comes from slurm/config.yaml.
SMALL = ["--default-resources", "mem_mb=1500", "runtime=30",
         "--set-resources", "train:gpu=1", "train:mem_mb=2000", "predict:gpu=1", "predict:mem_mb=2000",
         "complexity:gpu=1", "complexity:mem_mb=2000",
         "--set-threads", "prepare=1", "train=1", "predict=1", "evaluate=1", "complexity=1"]


def scontrol(jobid: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", jobid], capture_output=True, text=True, timeout=60).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def test_smoke_study_on_slurm(slurm_cluster, smoke_roots, tmp_path):
    work = tmp_path / "work"
    study = write_study(work, smoke_config(), roots=smoke_roots)
    cmd = ["timeout", "-s", "INT", "-k", "30", "480",
           *snakemake_cmd("--cores", "2", "--profile", "slurm", "--configfile", study, "--directory", work,
                          "--slurm-init-seconds-before-status-checks", "2", *SMALL)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=tool_env(), text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out[-6000:]
    assert re.search(r"Using profiles? slurm", out)  # (and the workflow profile profiles/default)

    # every compute job went through sbatch; the light steps ran on the submitting node
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", out)
    jobs = {jid: scontrol(jid) for jid in submitted}
    rules = [re.match(r"rule_([a-z]+)", j.get("Comment", "")).group(1) for j in jobs.values()]
    assert sorted(set(rules)) == ["complexity", "evaluate", "predict", "prepare", "train"]
    assert rules.count("train") == 8 and rules.count("prepare") == 4 and rules.count("evaluate") == 8
    assert all(j.get("JobState") == "COMPLETED" for j in jobs.values()), jobs
    for job, rule in zip(jobs.values(), rules):
        gpu = "gpu" in job.get("TresPerJob", "") + job.get("TresPerNode", "")
        assert gpu == (rule in ("train", "predict", "complexity")), (rule, job)
        assert job.get("Partition") == slurm_cluster["partition"]

    # the outputs appeared and the report holds a row per model × dataset
    res = work / "results" / "smoke"
    assert len(list(res.glob("runs/*/*/fold0/final.ckpt"))) == 8
    for d in ("isles22", "brats23", "glas", "fives"):
        assert table_models(work / "reports" / "smoke" / "tables" / f"{d}.csv") == ["deconver", "unet"]


# --------------------------------------------------------------------------- DDP through the profile
def _train_log(run) -> list[dict[str, str]]:
    import csv

    with open(run / "train_log.csv", newline="") as fh:
        return list(csv.DictReader(row for row in fh if not row.startswith("#")))


def _weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_ddp_training_job_through_the_profile(slurm_cluster, smoke_roots, tmp_path):
    """`devices: 2, strategy: ddp` in the study becomes a SLURM job of 2 tasks, both ranks train, the job
    cancelled mid-run is resubmitted and resumes, and the result equals the same run outside SLURM."""
    import time

    import yaml

    cfg = smoke_config(models=["unet"], trainer={"accelerator": "cpu", "devices": 2, "num_nodes": 1,
                                                 "strategy": "ddp", "deterministic": True, "tensorboard": False})
    cfg["datasets"] = {"glas": cfg["datasets"]["glas"]}
    cfg["datasets"]["glas"]["overrides"]["protocol"].update(epochs=3, steps_per_epoch=6, batch_size=2)
    work = tmp_path / "work"
    study = write_study(work, cfg, roots={"glas": smoke_roots["glas"]})
    run = work / "results" / "smoke" / "runs" / "glas" / "unet" / "fold0"
    target = run.relative_to(work) / "final.ckpt"
    small = [a for a in SMALL if a != "train:gpu=1"]  # a CPU run: the study asks for no GPU
    cmd = ["timeout", "-s", "INT", "-k", "30", "540",
           *snakemake_cmd(target, "--cores", "2", "--profile", "slurm", "--configfile", study, "--directory", work,
                          "--slurm-init-seconds-before-status-checks", "2", *small)]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=tool_env(), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    # cancel the training job once it has saved its first epoch (mid-run): the profile's retries resubmit it
    cancelled, deadline = None, time.monotonic() + 420
    while proc.poll() is None and time.monotonic() < deadline and cancelled is None:
        time.sleep(1)
        if (run / "checkpoints" / "last.ckpt").is_file():
            jobs = subprocess.run(["squeue", "-h", "-o", "%i %k"], capture_output=True, text=True).stdout.split("\n")
            train_jobs = [line.split()[0] for line in jobs if "rule_train" in line]
            if train_jobs:
                request = scontrol(train_jobs[0])
                subprocess.run(["scancel", train_jobs[0]], check=True)
                cancelled = train_jobs[0]
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-6000:]
    assert cancelled is not None, "the training job was never seen running after its first epoch:\n" + out[-4000:]

    # one task per device, no GPU for a CPU run, one final checkpoint
    assert request["NumTasks"] == "2" and request.get("NumNodes", "1").startswith("1"), request
    assert "gpu" not in request.get("TresPerJob", "") + request.get("TresPerNode", ""), request
    assert (run / "final.ckpt").is_file() and len(list(work.rglob("final.ckpt"))) == 1
    log = (work / "results" / "smoke" / "logs" / "train" / "glas" / "unet" / "fold0.log").read_text()
    assert "MEMBER: 1/2" in log and "MEMBER: 2/2" in log, log[-3000:]  # both ranks, world size 2
    assert "resuming" in log and "last.ckpt" in log, log[-3000:]

    # the same study outside SLURM (Lightning starts the second process): the same run
    ref_work = tmp_path / "ref"
    ref_study = ref_work / "study.yaml"
    ref_work.mkdir()
    ref_study.write_text(yaml.safe_dump({**yaml.safe_load(study.read_text()),
                                         "results_dir": str(ref_work / "results")}, sort_keys=False))
    for step in (["prepare"], ["split"], ["train", "--model", "unet", "--fold", "0", "--no-progress"]):
        done = subprocess.run([sys.executable, "-m", "deconver", *step[:1], "--config", str(ref_study),
                               "--dataset", "glas", *step[1:]], cwd=ref_work, env=tool_env(),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
    ref_run = ref_work / "results" / "smoke" / "runs" / "glas" / "unet" / "fold0"
    keys = ("epoch", "step", "train_loss", "val_dice")
    assert [[r[k] for k in keys] for r in _train_log(run)] == [[r[k] for k in keys] for r in _train_log(ref_run)]
    ref, got = _weights(ref_run / "final.ckpt"), _weights(run / "final.ckpt")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
