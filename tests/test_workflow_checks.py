"""Values that used to crash hours into a study (a traceback in `prepare`, `train` or `aggregate`) stop
`snakemake -n` before any job, naming the key (issue 21): an orientation that is no axis codes, zero
devices, a negative HD95 penalty, and model keyword arguments that build no network (checked by
building each network once on the meta device)."""
from __future__ import annotations

import pytest

from conftest import run_snakemake, smoke_config, write_study


def _dataset(cfg, key, value):
    cfg["datasets"]["isles22"].setdefault("overrides", {}).setdefault(key[0], {})[key[1]] = value
    return cfg


@pytest.mark.parametrize("mutate, key, message", [
    (lambda c: _dataset(c, ("preprocessing", "orientation"), "XYZ"), "preprocessing.orientation", "not an orientation"),
    (lambda c: c["trainer"].update(devices=0), "trainer.devices", "greater than or equal to 1"),
    (lambda c: _dataset(c, ("metrics", "hd95_penalty"), -5), "metrics.hd95_penalty", "greater than 0"),
    (lambda c: c.update(models=["segresnet"], model_overrides={"segresnet": {"init_filters": 4}}),
     "model_overrides.segresnet", "num_channels (4) must be divisible by num_groups (8)"),
], ids=["orientation", "devices", "hd95_penalty", "model_kwargs"])
def test_dry_run_reports_it_before_any_job(tmp_path, mutate, key, message):
    cfg = smoke_config()
    mutate(cfg)
    work = tmp_path / "work"
    study = write_study(work, cfg)
    out = run_snakemake("-n", "--cores", "2", "--configfile", study, "--directory", work, check=False, timeout=600)
    assert out.returncode != 0, out.stdout[-3000:]
    assert key in out.stdout and message in out.stdout, out.stdout[-3000:]
    assert "Job stats" not in out.stdout
