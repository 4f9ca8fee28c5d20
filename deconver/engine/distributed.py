"""How a study's trainer settings become processes: world size, per-device batch and the SLURM request.

One rule for every arrangement (docs/workflow.md, "Training on several GPUs"):

- **World size** ``W = devices × num_nodes`` (``devices: auto`` counts as 1 here: set a number to
  train on several devices).
- **The batch is global.** ``protocol.batch_size`` is the batch of one optimiser step, as in the
  paper; each of the W processes takes ``batch_size / W`` samples of it (the r-th slice, see
  engine/datamodule.py), so a run on W devices sees the same global batches, steps per epoch,
  schedule and learning rate as a run on one device. A batch that W does not divide is refused.
- **Processes.** Outside SLURM, one task: Lightning starts the other W−1 processes itself. Under SLURM
  (a job submitted by the workflow's `--profile slurm`), the job asks for one task per device —
  ``--ntasks-per-node=devices``, ``--nodes=num_nodes`` — and the training command is started by
  ``srun`` once per task; Lightning's SLURMEnvironment then reads each task's rank from SLURM.
"""
from __future__ import annotations

import os
from typing import Any

from deconver.config import ConfigError, TrainerSettings

# `srun` options of the training step of a multi-task job: one failed rank ends the step (no rank
# waiting forever in a collective), and the CPUs are not pinned (threads are set per task).
SRUN = "srun --kill-on-bad-exit=1 --cpu-bind=none"


def devices_per_node(trainer: TrainerSettings) -> int:
    return 1 if trainer.devices == "auto" else int(trainer.devices)


def world_size(trainer: TrainerSettings) -> int:
    """Processes of a training run: devices per node × nodes."""
    return devices_per_node(trainer) * trainer.num_nodes


def per_device_batch(batch_size: int, world: int, *, where: str = "protocol") -> int:
    """The samples each of `world` processes takes from a global batch of `batch_size`."""
    if world < 1 or batch_size % world:
        raise ConfigError(f"{where}.batch_size: {batch_size} is the global batch and must be a multiple of the "
                          f"number of training processes (devices × num_nodes = {world}); "
                          f"use a batch of {max(world, batch_size // world * world)} or {(batch_size // world + 1) * world}")
    return batch_size // world


def slurm_train_request(trainer: TrainerSettings, *, mem_mb_per_task: int) -> dict[str, Any]:
    """The snakemake-executor-plugin-slurm resources of a training job, from the study's trainer block.

    One task per device (`tasks_per_node`, `nodes`; the plugin's `mpi` resource makes the job run the
    command as given, which starts it with `srun`), GPUs per node on a GPU run (`gpu` on one node —
    `--gpus` —, `gres: gpu:N` per node on several, so every node gets its N), memory per node for
    its tasks. `tasks_per_gpu: 0` keeps the plugin from adding `--ntasks-per-gpu`, which newer SLURMs
    refuse together with a CPUs-per-task setting.
    """
    per_node, nodes = devices_per_node(trainer), trainer.num_nodes
    world = per_node * nodes
    request: dict[str, Any] = {"mem_mb": mem_mb_per_task * per_node}
    if trainer.accelerator != "cpu":
        request["tasks_per_gpu"] = 0
        if nodes == 1:
            request["gpu"] = per_node
        else:
            request["gres"] = f"gpu:{per_node}"
    if world > 1:
        request["mpi"] = "srun"
        if per_node > 1:
            request["tasks_per_node"] = per_node
        else:
            request["tasks"] = world
    if nodes > 1:
        request["nodes"] = nodes
    return request


def launcher(trainer: TrainerSettings) -> str:
    """The command prefix of a training job: `srun …` inside a SLURM allocation of several tasks (the
    request above), else nothing (one process, or Lightning starting its own processes)."""
    if world_size(trainer) > 1 and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return SRUN + " "
    return ""
