"""Dry runs of the workflow on every config in config/ and the smoke config, and the checks that stop a
run before any job: unknown keys, wrong types, missing data, unknown models. Fast (one light job runs,
to show the rules find the suite's CLI without the environment on PATH)."""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT, SMOKE_CONFIG as SMOKE, run_snakemake, smoke_config, tool_env, write_study


def dry_run(workdir: Path, *args: str, check: bool = True):
    """`snakemake -n` in `workdir` (results, logs and .snakemake stay there)."""
    workdir.mkdir(parents=True, exist_ok=True)
    return run_snakemake("-n", "--cores", "2", "--directory", workdir, *args, check=check, timeout=300)


def blocks_of(output: str) -> list[tuple[str, str]]:
    """(rule, the job's text) for each job a dry run lists."""
    out = []
    for block in re.split(r"\n(?=\[[^\n]*\]\n(?:local)?rule \S+:\n)", output):
        head = re.search(r"^(?:local)?rule (\S+):\n", block, re.M)
        if head:
            out.append((head.group(1), block))
    return out


def jobs_of(output: str) -> dict[str, list[dict[str, str]]]:
    """rule -> the wildcards of each job that a dry run lists."""
    jobs: dict[str, list[dict[str, str]]] = {}
    for rule, block in blocks_of(output):
        wc = re.search(r"^\s+wildcards: (.*)$", block, re.M)
        fields = dict(kv.split("=", 1) for kv in wc.group(1).split(", ")) if wc else {}
        jobs.setdefault(rule, []).append(fields)
    return jobs


def resources_of(output: str, rule: str) -> set[str]:
    """The resources line(s) of a rule's jobs, as a set of `name=value`."""
    res = set()
    for r, block in blocks_of(output):
        line = re.search(r"^\s+resources: (.*)$", block, re.M)
        if r == rule and line:
            res |= set(line.group(1).split(", "))
    return res


def write_config(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def registry_dims() -> dict[str, tuple[int, ...]]:
    from deconver import registry

    return {name: tuple(registry.model_info(name).dims) for name in registry.list_models()}


# --------------------------------------------------------------------------- every shipped config
def test_dry_run_embedded_default(tmp_path):
    """`snakemake --cores all` on a fresh machine: the four synthetic datasets are written by the
    workflow, every listed model that fits runs on one fold, and the DAG ends in the report."""
    out = dry_run(tmp_path).stdout
    jobs = jobs_of(out)
    cfg = yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text())
    assert sorted(jobs) == sorted(["all", "report", "aggregate", "prepare", "split", "train", "predict",
                                   "evaluate", "complexity"] + [f"synth_{d}" for d in cfg["datasets"]])
    assert {j["dataset"] for j in jobs["prepare"]} == {"isles22", "brats23", "glas", "fives"}
    trained = {(j["dataset"], j["model"]) for j in jobs["train"]}
    dims = registry_dims()
    for model in ("deconver", "unet", "segresnet"):
        assert {d for d, m in trained if m == model} == {"isles22", "brats23", "glas", "fives"}, model
    # the dataset's own model lists (config comments): BraTS without dynunet and unetr, GlaS without
    # swin_unetr and unetr, FIVES without smp_unet
    for model in ("dynunet", "unetr"):
        assert f"{model} is left out of brats23: not in datasets.brats23.models" in out
    assert {d for d, m in trained if m == "dynunet"} == {"isles22", "glas", "fives"}
    assert {d for d, m in trained if m == "unetr"} == {"isles22", "fives"}
    for model in ("swin_unetr", "unetr"):
        assert f"{model} is left out of glas: not in datasets.glas.models" in out
    assert "smp_unet is left out of fives: not in datasets.fives.models" in out
    # 2D only: smp_unet by its dims, swin_unetr by the 32^3 roi of the 3D stand-ins (config comment)
    assert dims["smp_unet"] == (2,) and 3 in dims["swin_unetr"]
    assert {d for d, m in trained if m == "swin_unetr"} == {"fives"}
    assert {d for d, m in trained if m == "smp_unet"} == {"glas"}
    for model in ("smp_unet", "swin_unetr"):
        assert f"{model} is left out of isles22" in out
    assert set(cfg["models"]) == {m for _, m in trained}
    assert {j["fold"] for j in jobs["train"]} == {"0"}
    assert len(jobs["evaluate"]) == len(jobs["predict"]) == len(jobs["train"]) and len(jobs["complexity"]) == 1
    # nothing but the resolved study file was written by the dry run
    files = [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()]
    assert [f for f in files if not f.startswith(".snakemake/")] == ["results/default/study.yaml"]


def test_dry_run_paper(tmp_path):
    """config/paper.yaml: four real datasets (here empty stand-in folders at its placeholder paths),
    every baseline on the datasets whose dims it supports, 5 folds, the per-dataset Deconver variant."""
    cfg = yaml.safe_load((REPO_ROOT / "config" / "paper.yaml").read_text())
    for entry in cfg["datasets"].values():
        (tmp_path / entry["root"]).mkdir(parents=True)
    out = dry_run(tmp_path, "--configfile", REPO_ROOT / "config" / "paper.yaml").stdout
    jobs = jobs_of(out)
    assert not any(r.startswith("synth") for r in jobs)
    dims = registry_dims()
    expected = {(d, m, str(k)) for d, e in cfg["datasets"].items() for m in cfg["models"]
                if (3 if d in ("isles22", "brats23") else 2) in dims[m] for k in range(5)}
    assert {(j["dataset"], j["model"], j["fold"]) for j in jobs["train"]} == expected
    assert len(expected) > 150
    study = yaml.safe_load((tmp_path / "results" / "paper" / "study.yaml").read_text())
    assert study["datasets"]["brats23"]["model_overrides"]["deconver"] == {"variant": "brats23"}


def test_dry_run_paper_names_missing_data(tmp_path):
    """Without the data, the paper study stops before any job, naming the key and the path."""
    out = dry_run(tmp_path, "--configfile", REPO_ROOT / "config" / "paper.yaml", check=False)
    assert out.returncode != 0
    assert "datasets.isles22.root" in out.stdout and "data/ISLES-2022 does not exist" in out.stdout
    assert "rule train" not in out.stdout


def test_dry_run_hippocampus(tmp_path):
    """config/hippocampus_full.yaml reads the data root the user gives (here an empty stand-in folder
    passed on the command line; without it, the documented data/Task04_Hippocampus must exist), and with
    `download: true` and no folder the DAG starts with the download rule (a dry run: nothing is fetched)."""
    work = tmp_path / "main"
    root = tmp_path / "mine" / "Task04_Hippocampus"
    root.mkdir(parents=True)
    cfg = REPO_ROOT / "config" / "hippocampus_full.yaml"
    missing = dry_run(work, "--configfile", cfg, check=False)
    assert missing.returncode != 0 and "datasets.hippocampus.root" in missing.stdout
    jobs = jobs_of(dry_run(work, "--configfile", cfg, "--config", f"datasets={{hippocampus: {{root: {root}}}}}").stdout)
    assert {j["dataset"] for j in jobs["train"]} == {"hippocampus"}
    assert {j["model"] for j in jobs["train"]} == set(yaml.safe_load(cfg.read_text())["models"])
    assert not any(r.startswith("download") for r in jobs)

    out = dry_run(work, "--configfile", cfg,
                  "--config", "datasets={hippocampus: {root: data/Task04_Hippocampus, download: true}}").stdout
    jobs = jobs_of(out)
    assert "download_hippocampus" in jobs and "output: data/Task04_Hippocampus/dataset.json" in out
    assert not (work / "data").exists()


def test_dry_run_smoke_and_slurm_profile(tmp_path):
    """The smoke config dry-runs, also through `--profile slurm` from the repository root: the GPU
    steps ask for a GPU (training: as its trainer block says) and every compute job has a runtime and
    memory; local rules stay local."""
    out = run_snakemake("-n", "--profile", "slurm", "--configfile", SMOKE, "--directory", tmp_path,
                        "--config", "trainer={accelerator: auto}", cwd=REPO_ROOT, timeout=300).stdout
    assert re.search(r"Using profiles? slurm", out)  # (and the workflow profile profiles/default)
    train, predict = resources_of(out, "train"), resources_of(out, "predict")
    assert {"gpu=1", "runtime=1440", "mem_mb=64000", "tasks_per_gpu=0"} <= train and "gpu=1" in predict
    assert not any(r.startswith("mpi") for r in train)  # one device: one task, no srun
    assert "gpu=1" in resources_of(out, "complexity")
    assert not any(r.startswith("gpu") for r in resources_of(out, "evaluate") | resources_of(out, "prepare"))
    # locally (no profile) nothing asks for a GPU
    local = dry_run(tmp_path / "local", "--configfile", SMOKE).stdout
    assert resources_of(local, "train") and not any(r.startswith("gpu") for _, b in blocks_of(local)
                                                     for r in re.findall(r"gpu=\d+", b))


# --------------------------------------------------------------------------- stop before any job
@pytest.mark.parametrize("mutate, key, message", [
    (lambda c: c["datasets"]["glas"]["overrides"]["protocol"].update(epoks=3),
     "datasets.glas.overrides.protocol.epoks", "Extra inputs are not permitted"),
    (lambda c: c["trainer"].update(deterministic="false"), "trainer.deterministic", "valid boolean"),
    (lambda c: c.update(colour="blue"), "colour", "Extra inputs are not permitted"),
    (lambda c: c["datasets"]["isles22"].update(synthetic=False), "datasets.isles22.root", "does not exist"),
])
def test_bad_config_stops_before_any_job(tmp_path, mutate, key, message):
    """An unknown key, a wrong type (the string "false" for a boolean) or missing data stop a real
    (not dry) run at parse time, naming the key; no job runs, nothing is written."""
    cfg = smoke_config()
    mutate(cfg)
    path = write_config(tmp_path / "study.yaml", cfg)
    work = tmp_path / "work"
    work.mkdir()
    out = run_snakemake("--cores", "1", "--configfile", path, "--directory", work, check=False, timeout=300)
    assert out.returncode != 0
    assert key in out.stdout and message in out.stdout, out.stdout[-3000:]
    assert "study.yaml" in out.stdout  # the config file is named
    assert not (work / "results").exists() and not (work / "data").exists()


def test_unknown_model_is_named(tmp_path):
    cfg = smoke_config()
    cfg["models"] = ["deconver", "unett"]
    out = dry_run(tmp_path, "--configfile", write_config(tmp_path / "s.yaml", cfg), check=False)
    assert out.returncode != 0
    assert "unknown model 'unett'" in out.stdout and "did you mean 'unet'" in out.stdout


def test_command_line_overrides_are_typed(tmp_path):
    """`--config` overrides are read as YAML (nested values keep their types), validated like the
    file, and land in the resolved study file every step reads."""
    over = ("study=smoke-over", "folds=[0, 2]",
            "datasets={glas: {overrides: {protocol: {epochs: 3, lr: 2.0e-3}}}}", "trainer={deterministic: false}")
    jobs = jobs_of(dry_run(tmp_path, "--configfile", SMOKE, "--config", *over).stdout)
    assert {j["fold"] for j in jobs["train"]} == {"0", "2"}
    resolved = yaml.safe_load((tmp_path / "results" / "smoke-over" / "study.yaml").read_text())
    assert resolved["datasets"]["glas"]["overrides"]["protocol"]["epochs"] == 3
    assert resolved["datasets"]["glas"]["overrides"]["protocol"]["lr"] == 2.0e-3
    assert resolved["datasets"]["glas"]["overrides"]["protocol"]["roi_size"] == [64, 64]  # merged, not replaced
    assert resolved["trainer"]["deterministic"] is False
    from deconver.config import load_study

    assert load_study(tmp_path / "results" / "smoke-over" / "study.yaml").folds == [0, 2]

    bad = dry_run(tmp_path, "--configfile", SMOKE, "--config", "trainer={devices: two}", check=False)
    assert bad.returncode != 0 and "trainer.devices" in bad.stdout


def test_models_all_filters_by_dims(tmp_path):
    """`models: all` runs every registered model on the datasets it fits and says which it leaves out."""
    out = dry_run(tmp_path, "--configfile", SMOKE, "--config", "models=all",
                  "datasets={isles22: {overrides: {protocol: {roi_size: [32, 64, 32]}}}}").stdout
    trained = {(j["dataset"], j["model"]) for j in jobs_of(out)["train"]}
    dims = registry_dims()
    assert {m for d, m in trained if d == "isles22"} == {m for m, d in dims.items() if 3 in d}
    assert "smp_unet is left out of isles22" in out


def test_schema_file_is_current():
    """workflow/schemas/study.schema.json is regenerated from deconver.config.Study."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_schema", REPO_ROOT / "workflow" / "scripts" / "make_schema.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert json.loads((REPO_ROOT / "workflow" / "schemas" / "study.schema.json").read_text()) == \
        json.loads(module.schema_text()), "run: python workflow/scripts/make_schema.py"


def test_jobs_find_the_cli_without_the_environment_on_path(tmp_path):
    """`.venv/bin/snakemake` without an activated environment: the rules run `deconver` through the
    interpreter that runs Snakemake (`python -m deconver`), so a job succeeds with only the system's
    folders on PATH (before, it failed with `deconver: command not found`)."""
    study = write_study(tmp_path, smoke_config(datasets={"glas": smoke_config()["datasets"]["glas"]}))
    env = tool_env(PATH=os.pathsep.join(["/usr/bin", "/bin"]))
    assert sys.prefix not in env["PATH"]
    run_snakemake("--cores", "1", "--configfile", study, "--directory", tmp_path, "results/smoke/synthetic/glas.txt",
                  env=env, timeout=300)
    assert "wrote 6 synthetic glas cases" in (tmp_path / "results" / "smoke" / "logs" / "synth" / "glas.log").read_text()


def test_a_second_study_and_seed_reuse_the_synthetic_root_without_touching_it(tmp_path):
    """`--config study=default-seed7 seed=7` beside the first study: the second study's synth job reuses the
    shared stand-in as it is (its marker, its files and their times untouched), records what it used in
    its own results, and the first study then has nothing to redo (before, the second study's synth job
    deleted the shared marker, failed, and left the first study's data unmarked)."""
    study = write_study(tmp_path, smoke_config(datasets={"glas": smoke_config()["datasets"]["glas"]}))
    args = ("--cores", "1", "--configfile", study, "--directory", tmp_path)
    run_snakemake(*args, "results/smoke/synthetic/glas.txt", timeout=300)
    root = tmp_path / "data" / "glas"
    marker = root / "SYNTHETIC.txt"
    before = {p.name: p.stat().st_mtime_ns for p in root.iterdir()}
    text = marker.read_text()
    run_snakemake(*args, "--config", "study=smoke-seed7", "seed=7", "--", "results/smoke-seed7/synthetic/glas.txt",
                  timeout=300)
    assert {p.name: p.stat().st_mtime_ns for p in root.iterdir()} == before
    assert marker.read_text() == text and (tmp_path / "results" / "smoke-seed7" / "synthetic" / "glas.txt").read_text() == text
    assert "already present" in (tmp_path / "results" / "smoke-seed7" / "logs" / "synth" / "glas.log").read_text()
    dry = run_snakemake(*args, "-n", "results/smoke/synthetic/glas.txt", timeout=300).stdout
    assert "Nothing to be done" in dry, dry[-2000:]
