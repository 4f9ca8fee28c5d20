"""What a study will cost: per-run predictions of wall time, device-hours and memory from a calibration.

Model of one training run (docs/cost.md), from the study plan (deconver.plan), the fold file or the
prepared cache, and a calibration (`deconver calibrate`):

    train  = startup + epochs × steps × (t_step + t_load) + passes × Σ_curve ceil(windows / sw_batch) × t_window
    predict = startup + Σ_val ceil(windows / sw_batch) × t_window
    complexity = (latency_repeats + 2) × t_window per pair (one job measures every pair: one start-up)

``steps`` = protocol.steps_per_epoch or ceil(training cases / global batch); ``passes`` = validations
(every val_every epochs and after the last) over the ``curve`` cases (the first ``val_cases`` validation cases,
or all); ``val`` = the fold's validation cases (all predicted); ``windows`` per case = MONAI's sliding-window count at the
preset's roi and overlap on the prepared shape; ``t_load`` = per-device batch / loading rate when the
data is loaded in the training process (num_workers 0), else 0 (workers overlap it). Device-hours =
processes × wall. A number the inputs cannot give (no calibration for the pair, no fold file and no
cache to count cases) is None, and `missing` says which input it needs: nothing is guessed. Before a
dataset is prepared, a study with `split: authors` counts its cases from the shipped fold assignment,
and the times then leave out validation and prediction (no shapes yet), which `missing` says.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deconver.config import Study
from deconver.engine.distributed import per_device_batch, world_size
from deconver.paths import StudyPaths
from deconver.plan import Run, plan_study

MARGIN = 1.5              # SLURM requests: predicted time and memory × this (docs/cost.md)
TOLERANCE = 0.30          # a prediction is close when |predicted − measured| ≤ this × measured (issue 18's goal)
MIN_RUNTIME_MIN = 10      # never ask for less (start-up, file system, queue latency)
MIN_MEM_MB = 4000         # never ask for less host memory per process


@dataclass
class RunCost:
    dataset: str
    model: str
    fold: int
    processes: int
    train_cases: int | None = None
    val_cases: int | None = None
    steps_per_epoch: int | None = None
    epochs: int = 0
    val_passes: int = 0
    windows_per_pass: int | None = None  # window batches of one prediction of the fold's validation cases
    curve_windows_per_pass: int | None = None  # of one in-training validation (protocol.val_cases)
    train_s: float | None = None
    startup_s: float | None = None  # of every job (imports, model build): in train_s, not in fit_s
    predict_s: float | None = None
    complexity_s: float | None = None
    peak_memory_mb: float | None = None
    host_memory_mb: float | None = None
    fits: bool | None = None
    missing: list[str] = field(default_factory=list)

    @property
    def device_hours(self) -> float | None:
        if self.train_s is None or self.predict_s is None:
            return None
        return (self.processes * self.train_s + self.predict_s) / 3600

    @property
    def fit_s(self) -> float | None:
        """The training time without the job's start-up: what a run measures from Lightning's fit start."""
        return None if self.train_s is None or self.startup_s is None else self.train_s - self.startup_s


def sliding_windows(shape, roi, overlap: float) -> int:
    """Windows MONAI's sliding_window_inference runs on an image of `shape` (interval roi × (1 − overlap))."""
    count = 1
    for size, r in zip(shape, roi):
        interval = max(1, int(r * (1 - overlap)))
        count *= 1 if size <= r else math.ceil((size - r) / interval) + 1
    return count


def validation_passes(epochs: int, every: int) -> int:
    """Validations of a run: after every `every`-th epoch, and after the last."""
    return epochs // every + (1 if epochs % every else 0)


def _cases(study: Study, dataset: str, fold: int, paths: StudyPaths) -> tuple[list | None, list | None, dict]:
    """(train ids, val ids, manifest cases) from the fold file and the cache, where present."""
    manifest = paths.manifest(dataset)
    entries = json.loads(manifest.read_text()).get("cases", []) if manifest.is_file() else []
    cases = {c["id"]: c for c in entries}
    split = paths.split(dataset)
    if split.is_file():
        from deconver.data.split import load_split

        entry = next((f for f in load_split(split)["folds"] if f["fold"] == fold), None)
        if entry is not None:
            return list(entry["train"]), list(entry["val"]), cases
    return None, None, cases


def _shapes(ids, cases: dict) -> list | None:
    try:
        return [cases[c]["image_shape"][1:] for c in ids]
    except (KeyError, TypeError):
        return None


def run_cost(study: Study, run: Run, calibration: dict | None, *, paths: StudyPaths | None = None,
             gpu_memory_mb: float | None = None) -> RunCost:
    """The predicted cost of one run (see the module docstring)."""
    paths = paths or StudyPaths.of(study)
    preset = study.preset(run.dataset)
    p = preset.protocol
    world = world_size(study.trainer)
    out = RunCost(run.dataset, run.model, run.fold, processes=world, epochs=p.epochs,
                  val_passes=validation_passes(p.epochs, p.val_every))
    train_ids, val_ids, cases = _cases(study, run.dataset, run.fold, paths)
    if train_ids is None and cases:  # no fold file yet: the k-fold shares of the prepared cases
        n = len(cases)
        out.val_cases = math.ceil(n / study.num_folds)
        out.train_cases = n - out.val_cases
        val_shapes = _shapes(list(cases)[: out.val_cases], cases)
    elif train_ids is not None:
        out.train_cases, out.val_cases = len(train_ids), len(val_ids)
        val_shapes = _shapes(val_ids, cases)
    elif study.split_method(run.dataset) == "authors":  # before any data: the shipped fold assignment
        from deconver.data.author_split import load_author_folds

        folds = list(load_author_folds(preset.reader)["folds"].values())
        out.val_cases = folds.count(run.fold)
        out.train_cases = len(folds) - out.val_cases
        val_shapes = None
    else:
        val_shapes = None
        out.missing.append(f"case counts (no fold file {paths.split(run.dataset)} and no cache {paths.manifest(run.dataset)})")
    batch = p.batch_size
    if p.steps_per_epoch:
        out.steps_per_epoch = p.steps_per_epoch
    elif out.train_cases is not None:
        out.steps_per_epoch = max(1, math.ceil(out.train_cases / batch))
    if val_shapes is not None:
        batches = [math.ceil(sliding_windows(s, p.roi_size, p.sw_overlap) / p.sw_batch_size) for s in val_shapes]
        out.windows_per_pass, out.curve_windows_per_pass = sum(batches), sum(p.validated(batches))
    elif out.train_cases is not None:
        out.missing.append(f"validation and prediction windows: {run.dataset} is not prepared (no "
                           f"{paths.manifest(run.dataset)}), its times leave them out")
    pair = calibrated_pair(calibration, run.dataset, run.model)
    if pair is None:
        out.missing.append("calibration of this (dataset, model)" if calibration else "a calibration file")
        return out
    out.peak_memory_mb = pair["peak_memory_mb"]
    out.host_memory_mb = pair.get("host_peak_rss_mb")
    limit = gpu_memory_mb or (calibration.get("device_memory_mb") if calibration.get("device_kind") == "cuda" else None)
    out.fits = None if limit is None else out.peak_memory_mb <= limit
    rate = (calibration.get("loading_samples_per_s") or {}).get(run.dataset)
    t_load = per_device_batch(batch, world) / rate if rate and p.num_workers == 0 else 0.0
    t_step, t_win, startup = pair["seconds_per_step"], pair["seconds_per_window_batch"], pair["startup_s"]
    out.startup_s = startup
    if out.steps_per_epoch is not None:  # without prepared shapes: training steps only (named in `missing`)
        curve, windows = out.curve_windows_per_pass or 0, out.windows_per_pass or 0
        out.train_s = startup + p.epochs * out.steps_per_epoch * (t_step + t_load) + out.val_passes * curve * t_win
        out.predict_s = startup + windows * t_win
    out.complexity_s = (study.complexity.latency_repeats + 2) * t_win
    return out


def within_tolerance(measured: float, predicted: float) -> bool:
    """Whether a predicted time is within TOLERANCE of the measured one (the report and the benchmark)."""
    return abs(predicted - measured) <= TOLERANCE * measured


def calibrated_pair(calibration: dict | None, dataset: str, model: str) -> dict | None:
    """The calibration's measured row of (dataset, model), None when it has none (or it failed)."""
    for row in (calibration or {}).get("pairs", []):
        if row.get("dataset") == dataset and row.get("model") == model and row.get("status") == "ok":
            return row
    return None


def study_costs(study: Study, calibration: dict | None, **kw) -> list[RunCost]:
    """Predicted cost of every run of the study plan."""
    return [run_cost(study, run, calibration, **kw) for run in plan_study(study).runs]


def load_calibration(study: Study, path: str | Path | None = None) -> tuple[dict | None, Path | None]:
    """The calibration to plan with: `path`, else the study's `cost.calibration`, else the study's only
    file under <results>/<study>/calibration/; (None, None) when there is none."""
    path = path or study.cost.calibration
    if path is None:
        found = sorted(StudyPaths.of(study).calibration("x").parent.glob("*.json"))
        if len(found) != 1:
            return None, None
        path = found[0]
    path = Path(path)
    try:
        return json.loads(path.read_text()), path
    except (OSError, json.JSONDecodeError) as err:
        from deconver.config import ConfigError

        raise ConfigError(f"{path}: not a readable calibration file ({err}); rerun `deconver calibrate`") from None


def slurm_request(cost: RunCost, *, max_runtime_min: int, default_runtime_min: int,
                  default_mem_mb: int) -> dict[str, int]:
    """runtime (min) and mem_mb (per process) of a training job from its prediction × MARGIN; the
    defaults where the prediction is missing. A run longer than the cap resumes in the next attempt."""
    runtime = default_runtime_min
    if cost.train_s is not None:
        runtime = max(MIN_RUNTIME_MIN, math.ceil(cost.train_s * MARGIN / 60))
    mem = default_mem_mb
    if cost.host_memory_mb is not None:
        mem = max(MIN_MEM_MB, math.ceil(cost.host_memory_mb * MARGIN))
    return {"runtime": min(runtime, max_runtime_min), "mem_mb": mem}


def as_dict(cost: RunCost) -> dict:
    return {**asdict(cost), "device_hours": cost.device_hours, "fit_s": cost.fit_s}


def predicted_train_seconds(study: Study, run: Run, paths: StudyPaths | None = None) -> dict | None:
    """The plan's training time of `run` with the study's calibration, {"train_s": the whole job,
    "fit_s": without its start-up}; None without a calibration (or when it cannot be read: a run never
    fails for its cost estimate)."""
    from deconver.config import ConfigError

    try:
        calibration, _ = load_calibration(study)
    except ConfigError:
        return None
    cost = run_cost(study, run, calibration, paths=paths) if calibration else None
    if cost is None or cost.train_s is None:
        return None
    return {"train_s": cost.train_s, "fit_s": cost.fit_s}
