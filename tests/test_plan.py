"""The study plan (deconver.plan) is the one run list: the workflow's jobs, aggregate's inputs and the
pairs `deconver complexity` accepts are the plan's, for every config in config/ and for a batch-1
override under which smp_deeplabv3plus (min_batch 2) cannot train."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT
from test_workflow_dryrun import blocks_of, dry_run, jobs_of

from deconver.cli import main as cli
from deconver.config import deep_merge, load_study
from deconver.plan import PlanError, Run, check_pair, model_names, plan_study, skipped, study_runs

CONFIGS = sorted(p.name for p in (REPO_ROOT / "config").glob("*.yaml"))
# on top of config/config.yaml, whose model list gains smp_deeplabv3plus (min_batch 2)
BATCH1 = {"glas": {"overrides": {"protocol": {"batch_size": 1}}}}


def _study_file(tmp: Path, name: str, datasets_override: dict | None = None) -> Path:
    """The config as a stand-alone study in `tmp`: real-data roots are empty folders there."""
    data = yaml.safe_load((REPO_ROOT / "config" / name).read_text())
    data["datasets"] = deep_merge(data["datasets"], datasets_override or {})
    if datasets_override is BATCH1:
        data["models"] = [*data["models"], "smp_deeplabv3plus"]
        for entry in data["datasets"].values():  # a dataset's own model list gains it too
            if "models" in entry and entry.get("preset") in ("glas", "fives"):
                entry["models"] = [*entry["models"], "smp_deeplabv3plus"]
    for key, entry in data["datasets"].items():
        if not entry.get("synthetic"):
            entry["root"] = str(tmp / "data" / key / "Task04_Hippocampus")  # a Decathlon-like name fits any reader
            Path(entry["root"]).mkdir(parents=True)
            entry["download"] = False
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("name, override", [(c, None) for c in CONFIGS] + [("config.yaml", BATCH1)],
                         ids=[*CONFIGS, "config.yaml+glas-batch1"])
def test_workflow_aggregate_and_complexity_share_the_plan(tmp_path, capfd, name, override):
    from deconver.report.aggregate import plan_from_study

    path = _study_file(tmp_path, name, override)
    study = load_study(path)
    plan = plan_study(study)
    runs = set(study_runs(study))
    assert runs == set(plan.runs) and len(runs) == len(plan.runs) > 0

    # the workflow: its train jobs are the plan's runs, its one complexity job writes the plan's pairs
    out = dry_run(tmp_path / "work", "--configfile", path).stdout
    jobs = jobs_of(out)
    assert {Run(j["dataset"], j["model"], int(j["fold"])) for j in jobs["train"]} == runs
    if study.complexity.activate:  # one job writing every pair's record (`complexity --every-pair`: the plan's)
        assert len(jobs["complexity"]) == 1
        block = next(b for rule, b in blocks_of(out) if rule == "complexity")
        assert re.search(rf"output: \S*results/{study.study}/complexity\b", block), block
    for skip in skipped(study):
        assert f"{skip.model} is left out of {skip.dataset}: {skip.reason.splitlines()[0]}" in out

    # aggregate: the same datasets × models × folds, and the same reasons for the others
    agg = plan_from_study(path)
    assert {Run(ds.name, m, k) for ds in agg.datasets for m in ds.models for k in ds.folds} == runs
    assert {(ds.name, m, why) for ds in agg.datasets for m, why in ds.skipped_models.items()} == \
        {(s.dataset, s.model, s.reason) for s in plan.skips}

    # complexity: every pair the plan skips is refused (exit 2, with the plan's reason); the plan's pairs pass
    for skip in plan.skips:
        capfd.readouterr()
        assert cli(["complexity", "--config", str(path), "--dataset", skip.dataset, "--model", skip.model]) == 2
        assert skip.reason.splitlines()[0] in capfd.readouterr().err
    for dataset, model in plan.pairs():
        check_pair(study, dataset, model)
    names = model_names(study)
    assert {(d, m) for d in study.datasets for m in names} == set(plan.pairs()) | {(s.dataset, s.model) for s in plan.skips}

    if override is BATCH1:
        assert "smp_deeplabv3plus" not in plan.models["glas"] and "smp_deeplabv3plus" in plan.models["fives"]
        assert "batch size of at least 2" in plan.skipped_models("glas")["smp_deeplabv3plus"]


def test_a_model_list_without_runs_is_an_error_naming_the_key(tmp_path):
    data = yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text())
    data["datasets"] = {"isles22": data["datasets"]["isles22"]}
    data["models"] = ["unet", "smp_unet"]  # smp_unet is 2D only
    with pytest.raises(PlanError, match=r"models: \['smp_unet'\] fit none of the datasets"):
        plan_study(load_study(data))
    data["models"] = ["smp_unet"]
    with pytest.raises(PlanError, match="no model of .* fits dataset 'isles22'"):
        plan_study(load_study(data))
    data["models"] = ["unett"]
    with pytest.raises(PlanError, match="models: unknown model 'unett'.*did you mean 'unet'"):
        plan_study(load_study(data))
    with pytest.raises(PlanError, match="--dataset: 'glas' is not a dataset"):
        check_pair(load_study({**data, "models": ["unet"]}), "glas", "unet")


def test_a_dataset_model_list_narrows_that_dataset_only(tmp_path):
    data = yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text())
    data["datasets"] = {d: data["datasets"][d] for d in ("isles22", "brats23")}
    data["models"] = ["deconver", "unet", "dynunet"]
    data["datasets"]["brats23"]["models"] = ["unet", "deconver"]
    plan = plan_study(load_study(data))
    assert plan.models == {"isles22": ("deconver", "unet", "dynunet"), "brats23": ("deconver", "unet")}
    assert plan.skipped_models("brats23") == {"dynunet": "not in datasets.brats23.models ['unet', 'deconver']"}
    with pytest.raises(PlanError, match="does not run 'dynunet' on 'brats23': not in datasets.brats23.models"):
        check_pair(load_study(data), "brats23", "dynunet")
    data["datasets"]["brats23"]["models"] = ["unet", "segresnet"]
    with pytest.raises(PlanError, match=r"datasets.brats23.models: \['segresnet'\] are not among the study's models"):
        plan_study(load_study(data))
