"""The smoke study through the SLURM profile (`--profile slurm`, slurm/config.yaml) on a real
single-node SLURM started by ../shared/tools/slurm-up.sh (skipped where it cannot start): every
compute job goes through sbatch (the GPU steps with a GPU request), the outputs appear and the
run finishes."""
from __future__ import annotations

import re
import subprocess

import pytest

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
    assert "Using profile slurm" in out

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
