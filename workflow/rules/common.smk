"""Helpers of the workflow: the validated study, its paths, its runs and the rules' resources.

Everything a rule needs is computed here from one validated study (`deconver.config.load_study`), and
every path comes from `deconver.paths.StudyPaths` and every run from `deconver.plan`, so the rules and the `deconver` CLI can never
disagree. Paths are relative to the working directory (the repository root, or `--directory`).
"""

import copy
import functools
import re
import shlex
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError

from deconver.config import ConfigError, deep_merge, load_study
from deconver.cost.estimate import load_calibration
from deconver.engine.distributed import devices_per_node, launcher, slurm_train_request
from deconver.engine.run import changed_configurations, check_model_builds, config_digest
from deconver.io import output_problem, write_text_atomic
from deconver.data.readers._common import SYNTHETIC_MARKER
from deconver.paths import StudyPaths
from deconver.plan import PlanError, Run, StudyPlan, complexity_inputs, plan_study


# --------------------------------------------------------------------------- the study config
def _config_name() -> str:
    """The config file(s) this run reads, for messages (the default one, or those of --configfile)."""
    names = [str(Path(f).relative_to(Path.cwd())) if Path(f).is_relative_to(Path.cwd()) else str(f)
             for f in workflow.configfiles]
    name = ", ".join(names) or "config"
    return name + (" + --config" if workflow.config_settings.config_args else "")


def _typed_overrides() -> dict:
    """`--config key=value` overrides parsed as YAML, so nested values keep their types.

    Snakemake itself parses nested values as strings (`--config 'trainer={devices: 1}'` gives "1"),
    which the strict schema would reject; re-reading the raw arguments with YAML gives 1.
    """
    out: dict = {}
    for arg in workflow.config_settings.config_args or []:
        key, _, value = str(arg).partition("=")
        out = deep_merge(out, {key: yaml.safe_load(value) if value != "" else None})
    return out


def _load_study():
    """The resolved study mapping and its validated `Study`; a bad key stops here, before any job."""
    data = deep_merge(copy.deepcopy(dict(config)), _typed_overrides())
    try:
        study = load_study(data)
    except ConfigError as err:
        msg = str(err).replace("invalid configuration in config:", f"invalid configuration in {CONFIG_NAME}:", 1)
        msg = msg.replace("\n  config: ", "\n  ")
        raise WorkflowError(msg if CONFIG_NAME in msg else f"{CONFIG_NAME}: {msg}") from None
    return data, study


CONFIG_NAME = _config_name()
STUDY_DICT, STUDY = _load_study()
PATHS = StudyPaths.of(STUDY)
RESULTS = PATHS.results
LOGS = PATHS.logs
DATASETS = list(STUDY.datasets)
PRESETS = {name: STUDY.preset(name) for name in DATASETS}
FOLDS = list(STUDY.folds)
# The resolved study (config file(s) + --config overrides) that every `deconver` step reads.
STUDY_FILE = PATHS.study_file


def _write_study_file() -> None:
    """Write STUDY_FILE atomically, and only when its content changed (so reruns touch nothing)."""
    text = (f"# Resolved study config, written by the workflow from {CONFIG_NAME}.\n"
            "# Every `deconver` step of this study reads this file; edit the source config, not this one.\n"
            + yaml.safe_dump(STUDY_DICT, sort_keys=False))
    if not STUDY_FILE.is_file() or STUDY_FILE.read_text() != text:
        write_text_atomic(STUDY_FILE, text)


# --------------------------------------------------------------------------- dataset roots
def _check_roots() -> None:
    """Real data must be where the config says; synthetic and downloaded data are written by rules."""
    synthetic_roots: dict[str, str] = {}
    for name, entry in STUDY.datasets.items():
        root = Path(entry.root)
        key = f"datasets.{name}"
        if entry.synthetic and entry.download:
            raise WorkflowError(f"{CONFIG_NAME}: {key}: `synthetic` and `download` exclude each other")
        if entry.synthetic:
            other = synthetic_roots.setdefault(str(root), name)
            if other != name:
                raise WorkflowError(f"{CONFIG_NAME}: {key}.root: {root} is also the root of {other}; "
                                    "synthetic datasets need a root each")
        elif entry.download:
            if PRESETS[name].reader != "msd":
                raise WorkflowError(f"{CONFIG_NAME}: {key}.download: only Medical Segmentation Decathlon tasks "
                                    f"(reader msd) can be downloaded; preset {entry.preset!r} reads {PRESETS[name].reader!r}")
            if not re.fullmatch(r"Task\d\d_\w+", root.name):
                raise WorkflowError(f"{CONFIG_NAME}: {key}.root: with download: true the folder name must be the "
                                    f"Decathlon task (e.g. .../Task04_Hippocampus), got {root.name!r}")
        elif not root.exists():
            raise WorkflowError(
                f"{CONFIG_NAME}: {key}.root: the dataset folder {root} does not exist"
                + (f" (resolved: {root.resolve()})" if not root.is_absolute() else "")
                + f". Set datasets.{name}.root to your copy of the data in the config file, or on the "
                f"command line: --config 'datasets={{{name}: {{root: /path/to/data}}}}'.")


def _writing(write) -> None:
    """Run a write of the workflow's own files; a full disk or a read-only results folder stops the run
    with one line naming the file (`deconver.io.output_problem`), not a traceback."""
    try:
        write()
    except OSError as err:
        problem = output_problem(err)
        if problem is None:
            raise
        raise WorkflowError(problem) from None


_check_roots()
_writing(_write_study_file)


def _write_inventories() -> None:
    """Each real dataset's file inventory (paths, sizes, mtimes), rewritten only when the files changed.
    It is an input of `prepare`: a changed dataset is prepared again and everything after it rerun."""
    from deconver.data.inventory import write_inventory

    for name, entry in STUDY.datasets.items():
        if entry.synthetic or entry.download:
            continue
        if write_inventory(entry.root, PATHS.inventory(name)) and PATHS.manifest(name).is_file():
            _note(f"the files of dataset {name} ({entry.root}) changed since it was prepared: its prepare, split "
                  "and every job after them will run again (`snakemake -n` lists them)")


def dataset_input(wildcards) -> list[str]:
    """What `prepare` waits for: the synthetic stand-in, the download, or the real dataset's inventory."""
    entry = STUDY.datasets[wildcards.dataset]
    if entry.synthetic:
        return [str(PATHS.synthetic_record(wildcards.dataset))]
    if entry.download:
        return [str(Path(entry.root) / "dataset.json")]
    return [str(PATHS.inventory(wildcards.dataset))]


def _alternatives(values) -> str:
    """A regex matching exactly one of `values` (a never-matching one when there are none)."""
    return "|".join(re.escape(v) for v in sorted(values)) or "(?!x)x"


# --------------------------------------------------------------------------- models
def _note(msg: str) -> None:
    print(f"deconver workflow: {msg}", file=sys.stderr)


@functools.cache
def study_plan() -> StudyPlan:
    """The study's runs (`deconver.plan`): the models per dataset; a pair the registry refuses (dims,
    roi, batch, kwargs) is left out with a printed note, an unknown or unfitting model list stops here."""
    try:
        plan = plan_study(STUDY)
    except PlanError as err:
        raise WorkflowError(f"{CONFIG_NAME}: {err}") from None
    for skip in plan.skips:
        _note(f"{skip.model} is left out of {skip.dataset}: {skip.reason}")
    for dataset, model in plan.pairs():  # each network built once on the meta device: bad kwargs stop here
        try:
            check_model_builds(STUDY, dataset, model)
        except ConfigError as err:
            raise WorkflowError(f"{CONFIG_NAME}: {err}") from None
    return plan


def pairs() -> list[tuple[str, str]]:
    """Every (dataset, model) of the study."""
    return study_plan().pairs()


# --------------------------------------------------------------------------- targets
def evaluation_files(wildcards=None) -> list[str]:
    return [str(PATHS.evaluation(r.dataset, r.model, r.fold)) for r in study_plan().runs]


def complexity_records(wildcards=None) -> list[str]:
    """The complexity job's output as aggregate's input: the folder of every pair's record (a folder,
    not the files: the list needs the study plan, which cluster jobs do not compute when they re-read
    the workflow)."""
    return [str(PATHS.complexity_dir())] if STUDY.complexity.activate else []


AGGREGATE = PATHS.aggregate() / "aggregate.json"  # written last by `deconver aggregate`
REPORT = PATHS.report_html()  # written last by `deconver report`


def final_targets(wildcards=None) -> list[str]:
    return [str(REPORT)]


# --------------------------------------------------------------------------- resources
def local_threads(wanted: int) -> int:
    """Threads of a compute job: `wanted`, but leave room for two jobs at once on a small machine.

    On a cluster the profile's `set-threads` replaces this (threads become `--cpus-per-task`).
    """
    return max(1, min(wanted, (workflow.cores or 1) // 2))


# Per-step requests (runtime in minutes, memory in MB). Local runs ignore them; with
# `--profile slurm` they become sbatch's -t / --mem, and the profile's set-resources adapt them
# (and add the GPUs). Sized for the paper's datasets on a GPU node.
RESOURCES = {
    "prepare": dict(runtime=240, mem_mb=16000),
    "train": dict(runtime=1440, mem_mb=64000),  # memory per training process (device)
    "predict": dict(runtime=240, mem_mb=32000),
    "evaluate": dict(runtime=240, mem_mb=16000),
    "complexity": dict(runtime=240, mem_mb=16000),  # every pair of the study, one after the other
}
# A training job's request follows the study's trainer block (deconver.engine.distributed): one task
# per device, GPUs per node, nodes and memory per node; nothing to keep in sync in the profile.
RESOURCES["train"] = {"runtime": RESOURCES["train"]["runtime"],
                      **slurm_train_request(STUDY.trainer, mem_mb_per_task=RESOURCES["train"]["mem_mb"])}
# `srun …` before the training command inside a SLURM job of several tasks (one process per device).
TRAIN_LAUNCHER = launcher(STUDY.trainer)


# With a calibration (`deconver calibrate`; `cost.calibration`, or the study's only file under
# <results>/<study>/calibration/), each training job asks for the time and host memory its plan predicts
# (deconver.cost.estimate.slurm_request: × MARGIN, runtime capped by `cost.max_runtime_min`; a longer
# run is resubmitted and resumes). Evaluated when the job is ready, with its fold file and cache present.
def _calibration():
    try:
        return load_calibration(STUDY)
    except ConfigError as err:
        raise WorkflowError(str(err)) from None


CALIBRATION, CALIBRATION_FILE = _calibration()


_TRAIN_DEFAULTS = dict(default_runtime_min=RESOURCES["train"]["runtime"],
                       default_mem_mb=RESOURCES["train"]["mem_mb"] // devices_per_node(STUDY.trainer))


def _planned_request(wildcards) -> dict:
    from deconver.cost.estimate import run_cost, slurm_request

    cost = run_cost(STUDY, Run(wildcards.dataset, wildcards.model, int(wildcards.fold)), CALIBRATION, paths=PATHS)
    return slurm_request(cost, max_runtime_min=STUDY.cost.max_runtime_min, **_TRAIN_DEFAULTS)


if CALIBRATION is not None:
    RESOURCES["train"].update(
        runtime=lambda wildcards: _planned_request(wildcards)["runtime"],
        mem_mb=lambda wildcards: _planned_request(wildcards)["mem_mb"] * devices_per_node(STUDY.trainer))


# The `deconver` command run by the interpreter that runs Snakemake (`python -m deconver`), so
# `.venv/bin/snakemake --cores all` works without the environment's bin folder on PATH.
DECONVER = f"{shlex.quote(sys.executable)} -m deconver"


def cli(step: str, *, model: bool = False, fold: bool = False, prefix: str = "") -> str:
    """The `deconver <step>` command line of a rule (wildcards are filled in by Snakemake); `prefix`
    starts it (a launcher such as `srun`)."""
    cmd = f"{prefix}{DECONVER} {step} --config {{params.study}} --dataset {{wildcards.dataset}}"
    if model:
        cmd += " --model {wildcards.model}"
    if fold:
        cmd += " --fold {wildcards.fold}"
    return cmd


def complexity_config(wildcards=None) -> str:
    """The complexity job's inputs (`deconver.plan.complexity_inputs` of every pair) as a param: a change
    of a model's kwargs, a roi or the complexity settings reruns the measurement."""
    return config_digest({f"{d}/{m}": complexity_inputs(STUDY, d, m) for d, m in pairs()})


def attempts_log(log: str) -> str:
    """Beside a job's log, the log of all its attempts (Snakemake empties the job's own log before each)."""
    return log.removesuffix(".log") + ".attempts.log"


def logfile(rule: str, *parts: str) -> str:
    """The log file of a job: <results>/<study>/logs/<rule>/<dataset>[/<model>[/fold<k>]].log."""
    *folders, name = parts
    return str(LOGS.joinpath(rule, *folders, f"{name}.log"))


# Resolve the model lists now in the main process, so an unknown or unfitting model stops the run
# before any job with a plain message, and take the datasets' inventories (cluster jobs re-read this
# file and skip both).
if not workflow.remote_exec:
    study_plan()
    _writing(_write_inventories)
    if _changed := changed_configurations(STUDY, study_plan().runs):
        raise WorkflowError(
            f"{CONFIG_NAME}: the configuration of {len(_changed)} run(s) of study {STUDY.study!r} changed since they "
            "were trained (protocol, model kwargs, seed or trainer.threads); their results would be reported "
            "under the new configuration. Give the changed study a new `study` name (e.g. --config "
            f"study={STUDY.study}-v2), or delete these run folders to train them again:\n  " + "\n  ".join(_changed))
