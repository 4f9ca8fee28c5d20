"""A run folder is only ever the run of the data, split, configuration and thread count it records:
after a data change a finished run is redone from scratch (never "resumed" from a last.ckpt already at
its final epoch), a changed configuration is refused with the reason, a truncated last.ckpt is named
with what to do, and training uses the study's thread count (issue 21). Real MSD Hippocampus cases."""
from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
import yaml

from conftest import hippocampus_subset
from deconver.cli import main as cli
from deconver.config import ConfigError
from deconver.engine import predict, train

TINY = {"channels": [4, 8], "strides": [2], "num_res_units": 0}


def _study(tmp: Path, **trainer) -> dict:
    return {"study": "stale", "seed": 5, "results_dir": str(tmp / "results"), "num_folds": 2, "folds": [0],
            "models": ["unet"], "model_overrides": {"unet": TINY},
            "trainer": {"accelerator": "cpu", **trainer},
            "datasets": {"hippocampus": {"preset": "hippocampus", "root": str(tmp / "Task04_Hippocampus"),
                                         "overrides": {"protocol": {
                                             "roi_size": [16, 16, 16], "batch_size": 2, "epochs": 2,
                                             "steps_per_epoch": 1, "val_every": 2, "warmup_epochs": 0,
                                             "sw_batch_size": 4, "num_workers": 0}}}}}


def _prepare_and_split(cfg: Path) -> None:
    args = ["--config", str(cfg), "--dataset", "hippocampus"]
    assert cli(["prepare", *args, "--no-progress"]) == 0
    assert cli(["split", *args]) == 0


def _fold0(tmp: Path) -> dict:
    return json.loads((tmp / "results" / "stale" / "splits" / "hippocampus.json").read_text())["folds"][0]


def _record(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


class _Threads(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.seen = torch.get_num_threads()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """10 real cases prepared, split and one tiny run trained to the end."""
    tmp = tmp_path_factory.mktemp("stale")
    hippocampus_subset(tmp / "Task04_Hippocampus", 10)
    cfg = tmp / "study.yaml"
    cfg.write_text(yaml.safe_dump(_study(tmp)))
    _prepare_and_split(cfg)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the process default differs from the study's trainer.threads (1)
    probe = _Threads()
    try:
        final = train(cfg, "hippocampus", "unet", 0, progress=False, callbacks=[probe])
    finally:
        torch.set_num_threads(before)
    return {"tmp": tmp, "cfg": cfg, "run": final.parent, "threads_seen": probe.seen}


def test_run_records_its_cases_threads_and_fingerprint_parts(finished):
    record, fold = _record(finished["run"]), _fold0(finished["tmp"])
    assert record["train_ids"] == fold["train"] and record["val_ids"] == fold["val"]
    assert record["train_cases"] == 5 and record["val_cases"] == 5
    assert set(record["fingerprint_parts"]) == {"config", "data", "split"}
    assert record["threads"] == 1 and finished["threads_seen"] == 1


def test_changed_thread_count_or_protocol_is_refused_with_the_reason(finished):
    for study in (_study(finished["tmp"], threads=2),):
        with pytest.raises(ConfigError, match="different configuration.*trainer.threads"):
            train(study, "hippocampus", "unet", 0, progress=False)
    study = _study(finished["tmp"])
    study["datasets"]["hippocampus"]["overrides"]["protocol"]["lr"] = 0.01
    with pytest.raises(ConfigError, match="different configuration"):
        train(study, "hippocampus", "unet", 0, progress=False)
    assert (finished["run"] / "final.ckpt").is_file()


def test_truncated_last_checkpoint_is_named_with_what_to_do(finished, tmp_path, capfd):
    import shutil

    tmp = tmp_path
    shutil.copytree(finished["tmp"] / "Task04_Hippocampus", tmp / "Task04_Hippocampus")
    shutil.copytree(finished["tmp"] / "results", tmp / "results")
    cfg = tmp / "study.yaml"
    cfg.write_text(yaml.safe_dump(_study(tmp)))
    run = tmp / "results" / "stale" / "runs" / "hippocampus" / "unet" / "fold0"
    (run / "final.ckpt").unlink()
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    capfd.readouterr()
    assert cli(["train", "--config", str(cfg), "--dataset", "hippocampus", "--model", "unet", "--fold", "0",
                "--no-progress"]) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(last) in err[0] and "truncated" in err[0] and f"rm {last}" in err[0]


def test_after_the_data_grew_a_finished_run_is_retrained_from_scratch(finished, capfd):
    """10 → 16 cases: prepare and split again, then (as Snakemake does) final.ckpt is removed and the
    run restarted. It must start over on the new fold, not finish from the old last.ckpt."""
    tmp, run = finished["tmp"], finished["run"]
    old = _record(run)
    old_weights = torch.load(run / "final.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    hippocampus_subset(tmp / "Task04_Hippocampus", 16)
    _prepare_and_split(finished["cfg"])
    fold = _fold0(tmp)
    assert set(fold["val"]) & set(old["train_ids"]), "the new fold must validate on old training cases"
    with pytest.raises(ConfigError, match="trained on other data.*train it again"):
        predict(finished["cfg"], "hippocampus", "unet", 0, progress=False)   # would score training cases
    (run / "final.ckpt").unlink()
    capfd.readouterr()
    train(finished["cfg"], "hippocampus", "unet", 0, progress=False)
    err = capfd.readouterr().err
    assert "starting over from scratch" in err and "resuming" not in err
    record = _record(run)
    assert record["train_ids"] == fold["train"] and record["val_ids"] == fold["val"]
    assert not set(record["train_ids"]) & set(record["val_ids"])
    assert record["fingerprint_parts"]["data"] != old["fingerprint_parts"]["data"]
    new = torch.load(run / "final.ckpt", map_location="cpu", weights_only=True)
    assert new["epoch"] == 1
    assert any(not torch.equal(new["state_dict"][k], v) for k, v in old_weights.items())
    # and a finished run whose data is unchanged is left alone
    capfd.readouterr()
    train(finished["cfg"], "hippocampus", "unet", 0, progress=False)
    assert "nothing to do" in capfd.readouterr().err
