"""Shared test fixtures: repository paths, the real data beside the repository, running Snakemake,
and a real single-node SLURM (../shared/tools/slurm-up.sh). Keep this file additive: other test
modules use it too."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton's interpreter runs the fused NDC kernels on the CPU (tests/test_ndc_triton.py).
# It must be on before Triton is first imported: Triton's own library functions are decorated then.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_DATA = SHARED / "data"
SLURM_UP = SHARED / "tools" / "slurm-up.sh"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests (``pytestmark =
    pytest.mark.usefixtures("one_thread")``): on a shared 2-core machine OpenMP spinning makes two
    threads many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (where Snakefile, config/ and models/ are)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real MSD Task04 Hippocampus and an ISLES'22 case); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA}")
    return SHARED_DATA


def tool_env(**extra: str) -> dict[str, str]:
    """The environment for subprocesses: this interpreter's bin folder first on PATH (so `deconver`
    and `snakemake` are the ones of this environment), unbuffered Python output."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def snakemake_cmd(*args: str | os.PathLike) -> list[str]:
    """`snakemake --snakefile <repo>/Snakefile ARGS` run by this interpreter."""
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO_ROOT / "Snakefile"), *map(str, args)]


def run_snakemake(*args: str | os.PathLike, cwd: Path = REPO_ROOT, timeout: float = 600,
                  check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run Snakemake to completion; output (stdout + stderr) is in `.stdout`. `check`: rc must be 0."""
    proc = subprocess.run(snakemake_cmd(*args), cwd=cwd, env=env or tool_env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(map(str, args))} failed (rc {proc.returncode}):\n{proc.stdout[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real single-node SLURM with one fake GPU (gres gpu, no CUDA behind it), started with
    ../shared/tools/slurm-up.sh (installs Debian packages on first use). Skips cleanly where it
    cannot start (no script, not root, no sbatch afterwards). Stopped at the end of the session only
    if this fixture started it."""
    if not SLURM_UP.is_file():
        pytest.skip(f"{SLURM_UP} not found")
    if os.geteuid() != 0:
        pytest.skip("slurm-up.sh needs root")
    env = dict(os.environ, SLURM_CI_GPUS=os.environ.get("SLURM_CI_GPUS", "2"))
    was_up = shutil.which("sinfo") is not None and subprocess.run(
        ["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0
    try:
        up = subprocess.run(["bash", str(SLURM_UP)], env=env, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"slurm-up.sh could not run: {err}")
    if up.returncode != 0 or shutil.which("sbatch") is None:
        pytest.skip(f"slurm-up.sh could not start SLURM (rc {up.returncode}): {(up.stdout + up.stderr)[-2000:]}")
    partition = os.environ.get("SLURM_CI_PARTITION", "debug")
    yield {"partition": partition, "gpus": int(env["SLURM_CI_GPUS"])}
    if not was_up:
        subprocess.run(["bash", str(SLURM_UP), "down"], env=env, capture_output=True, timeout=300)


# --------------------------------------------------------------------------- workflow studies
SMOKE_CONFIG = REPO_ROOT / ".test" / "config" / "config.yaml"


def smoke_config(**changes) -> dict:
    """The smoke study (.test/config/config.yaml) as a mapping, with top-level keys replaced."""
    import yaml

    cfg = yaml.safe_load(SMOKE_CONFIG.read_text())
    cfg.update(changes)
    return cfg


def write_study(workdir: Path, cfg: dict, roots: dict[str, Path] | None = None) -> Path:
    """Write `cfg` as `<workdir>/study.yaml`, pointing dataset roots at `roots` where given."""
    import copy

    import yaml

    cfg = copy.deepcopy(cfg)
    for name, root in (roots or {}).items():
        cfg["datasets"][name]["root"] = str(root)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "study.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def job_stats(output: str) -> dict[str, int]:
    """The "Job stats" table Snakemake prints before running: rule -> number of jobs."""
    m = re.search(r"Job stats:\njob\s+count\n[- ]+\n(.*?)\ntotal\s+(\d+)", output, re.S)
    assert m, output[-3000:]
    return {line.split()[0]: int(line.split()[1]) for line in m.group(1).strip().splitlines()}


def table_models(path: Path) -> list[str]:
    """The models (rows) of a report table CSV."""
    import pandas as pd

    frame = pd.read_csv(path)
    col = next(c for c in frame.columns if c.lower() == "model")
    return sorted(frame[col].astype(str).str.strip("* "))


def outputs_of(work: Path, study: str) -> dict[str, int]:
    """Every finished step output of a study: relative path -> mtime (ns)."""
    res = work / "results" / study
    pats = ["prepared/*/manifest.json", "splits/*.json", "runs/*/*/fold*/final.ckpt",
            "runs/*/*/fold*/evaluation.csv", "complexity/*/*.json", "aggregate/aggregate.json"]
    return {p.relative_to(work).as_posix(): p.stat().st_mtime_ns for pat in pats for p in res.glob(pat)}


@pytest.fixture(scope="session")
def smoke_roots(tmp_path_factory) -> dict[str, Path]:
    """The smoke study's synthetic datasets, written once per session (as the workflow's `synth`
    rule would: same kind, cases and seed), for tests that need the data but not the synth step."""
    from deconver.config import DatasetEntry
    from deconver.data.synth import write_synthetic

    cfg = smoke_config()
    base = tmp_path_factory.mktemp("smoke-data")
    roots = {}
    for name, entry in cfg["datasets"].items():
        from deconver.config import load_preset

        kind = load_preset(entry["preset"]).reader
        spec = DatasetEntry.model_validate(entry)
        roots[name] = write_synthetic(kind, base / name, cases=spec.synth_cases, seed=spec.synth_seed)
    return roots


def hippocampus_subset(root: Path, cases: int) -> Path:
    """`root` as an MSD Task04 Hippocampus holding the first `cases` training cases of the real task
    (../shared/data; skips when absent). Called again with more cases, it adds the missing ones — a
    dataset that grew, as a user's does."""
    import json

    source = SHARED_DATA / "Task04_Hippocampus"
    if not (source / "dataset.json").is_file():
        pytest.skip(f"real Hippocampus data not found at {source}")
    spec = json.loads((source / "dataset.json").read_text())
    spec["training"] = spec["training"][:cases]
    spec["numTraining"] = len(spec["training"])
    for item in spec["training"]:
        for key in ("image", "label"):
            target = root / item[key]
            if not target.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(source / item[key], target)
    (root / "dataset.json").write_text(json.dumps(spec, indent=1))
    return root
