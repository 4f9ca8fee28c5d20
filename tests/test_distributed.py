"""The rule that maps a study's trainer block onto processes (deconver.engine.distributed): world size,
per-device share of the global batch, and the SLURM request of a training job in every arrangement."""
from __future__ import annotations

import pytest

from deconver.config import ConfigError, TrainerSettings
from deconver.engine.distributed import SRUN, launcher, per_device_batch, slurm_train_request, world_size


def _trainer(**kw) -> TrainerSettings:
    return TrainerSettings(**kw)


def test_world_size_and_global_batch():
    assert world_size(_trainer(devices=4, num_nodes=2)) == 8
    assert world_size(_trainer(devices="auto")) == 1
    assert per_device_batch(8, 4) == 2 and per_device_batch(2, 1) == 2
    with pytest.raises(ConfigError, match=r"protocol.batch_size: 6 is the global batch.*\(devices × num_nodes = 4\)"):
        per_device_batch(6, 4)


@pytest.mark.parametrize("kw, expected", [
    # one device: no tasks, one GPU
    (dict(accelerator="gpu", devices=1), {"gpu": 1, "tasks_per_gpu": 0, "mem_mb": 1000}),
    # 1 node x 4 GPUs: 4 tasks on the node, srun-started, 4 GPUs, memory for the 4 processes
    (dict(accelerator="gpu", devices=4, strategy="ddp"),
     {"gpu": 4, "tasks_per_gpu": 0, "mpi": "srun", "tasks_per_node": 4, "mem_mb": 4000}),
    # 2 nodes x 4 GPUs: GPUs per node as gres, 4 tasks per node, 2 nodes
    (dict(accelerator="auto", devices=4, num_nodes=2, strategy="ddp"),
     {"gres": "gpu:4", "tasks_per_gpu": 0, "mpi": "srun", "tasks_per_node": 4, "nodes": 2, "mem_mb": 4000}),
    # 3 nodes x 1 GPU: one task per node
    (dict(accelerator="gpu", devices=1, num_nodes=3, strategy="ddp"),
     {"gres": "gpu:1", "tasks_per_gpu": 0, "mpi": "srun", "tasks": 3, "nodes": 3, "mem_mb": 1000}),
    # CPU ranks: tasks without GPUs
    (dict(accelerator="cpu", devices=2, strategy="ddp"), {"mpi": "srun", "tasks_per_node": 2, "mem_mb": 2000}),
])
def test_slurm_request_follows_the_trainer_block(kw, expected):
    assert slurm_train_request(_trainer(**kw), mem_mb_per_task=1000) == expected


def test_launcher_only_inside_a_multi_task_allocation(monkeypatch):
    ddp = _trainer(devices=2, strategy="ddp")
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert launcher(ddp) == ""                              # Lightning starts the second process
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert launcher(ddp) == SRUN + " "                      # srun starts one process per task
    assert launcher(_trainer(devices=1)) == ""              # one device: never srun


def test_workflow_train_job_requests_what_the_study_says(tmp_path):
    """`snakemake -n --profile slurm` on a 2 nodes × 2 GPUs study: the train job asks for one task per
    device on 2 nodes, 2 GPUs per node and memory for its 2 processes per node."""
    import yaml

    from conftest import run_snakemake, smoke_config

    cfg = smoke_config(models=["unet"], trainer={"accelerator": "gpu", "devices": 2, "num_nodes": 2,
                                                 "strategy": "ddp"})
    cfg["datasets"] = {"glas": cfg["datasets"]["glas"]}
    cfg["datasets"]["glas"]["overrides"]["protocol"]["batch_size"] = 4
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(cfg))
    out = run_snakemake("-n", "--profile", "slurm", "--configfile", tmp_path / "study.yaml",
                        "--directory", tmp_path).stdout
    train = out[out.index("rule train:"):]
    resources = dict(kv.split("=", 1) for kv in train[train.index("resources:") + 10:].split("\n")[0].split(", "))
    assert resources["gres"] == "gpu:2" and resources["nodes"] == "2" and resources["tasks_per_node"] == "2"
    assert resources["mpi"] == "srun" and resources["tasks_per_gpu"] == "0"
    assert resources["mem_mb"] == str(2 * 64000)  # per node: two processes

    # a global batch the 4 processes cannot share stops the run before any job, naming the key
    cfg["datasets"]["glas"]["overrides"]["protocol"]["batch_size"] = 6
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(cfg))
    bad = run_snakemake("-n", "--configfile", tmp_path / "study.yaml", "--directory", tmp_path, check=False)
    assert bad.returncode != 0 and "protocol.batch_size: 6 is the global batch" in bad.stdout, bad.stdout[-2000:]
