"""Typed, validated configuration: dataset presets and study configs.

Presets are data (``config/datasets/<name>.yaml``); a study config (``config/*.yaml``) names datasets ×
models × folds and overrides. Everything is validated with pydantic in strict mode, so an unknown
key or a wrong type (the string "false" where a boolean is meant) is an error that names the key,
e.g. ``datasets.isles22.overrides.protocol.epochs: Input should be greater than 0``.
"""
from __future__ import annotations

import copy
import math
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deconver.steps import UsageError

REPO_ROOT = Path(__file__).resolve().parent.parent
PRESET_DIR = REPO_ROOT / "config" / "datasets"


class ConfigError(UsageError):
    """A configuration file or value is invalid; the message names the file and the key (a usage error: exit 2)."""


# A name that becomes one folder of the results layout (study, dataset): letters, digits, `_.-`,
# not starting with a dot (so never `.`, `..` or a hidden folder) and no path separator.
PLAIN_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"
_AXES = ({"L", "R"}, {"A", "P"}, {"S", "I"})
# the deterministic preprocessing steps of `deconver prepare`, in the suite's default order
PREPROCESSING_STEPS = ("orientation", "crop", "resample", "normalize")
# how `deconver split` makes the fold file (docs/data.md, "Split")
SplitMethod = Literal["kfold", "official", "authors"]
SPLIT_METHODS = typing.get_args(SplitMethod)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=False)


# --------------------------------------------------------------------------- dataset presets
class Preprocessing(Strict):
    """Deterministic preprocessing applied once by `deconver prepare`."""

    orientation: str | None = Field("RAS", description="axcodes for 3D images (None keeps the native orientation)")
    spacing: list[float] | None = Field(None, description="target spacing per axis; None keeps the native grid")
    crop_foreground: bool = Field(True, description="crop to the non-zero bounding box of the image channels")
    crop_margin: int = Field(10, ge=0)
    normalize: Literal["zscore_nonzero", "zscore", "ct", "none"] = Field(
        "zscore_nonzero", description="z-score per channel (on non-zero voxels, or all); ct: clip to ct_stats' "
        "window, then z-score with its mean and std (nnU-Net's CT normalisation)")
    ct_stats: list[list[float]] | None = Field(
        None, description="normalize: ct only: per channel [clip low, clip high, mean, std] of the foreground "
        "intensities (written by `deconver preset --from`)")
    order: list[Literal["orientation", "crop", "resample", "normalize"]] = Field(
        default_factory=lambda: list(PREPROCESSING_STEPS),
        description="the order of the four steps (the authors' ISLES/BraTS bundles: crop, orientation, normalize, "
        "resample); a step that is off (no orientation, spacing or crop) is skipped where it stands")
    align_corners: bool = Field(False, description="resampling grid convention of MONAI `Spacing` (the authors' "
                                "bundles: true)")

    @model_validator(mode="after")
    def _check_order(self):
        if sorted(self.order) != sorted(PREPROCESSING_STEPS):
            raise ValueError(f"order must name each of {', '.join(PREPROCESSING_STEPS)} once, got {self.order}")
        if (self.normalize == "ct") != (self.ct_stats is not None):
            raise ValueError("normalize: ct needs ct_stats (per channel [low, high, mean, std]), and only it does")
        if self.ct_stats and any(len(s) != 4 or s[0] >= s[1] or s[3] <= 0 for s in self.ct_stats):
            raise ValueError("ct_stats: each entry is [low, high, mean, std] with low < high and std > 0")
        return self

    @field_validator("orientation")
    @classmethod
    def _axcodes(cls, value: str | None) -> str | None:
        if value is not None and (len(value) != 3 or sorted(next((i for i, a in enumerate(_AXES) if c in a), -1)
                                                            for c in value) != [0, 1, 2]):
            raise ValueError(f"{value!r} is not an orientation: three axis codes, one of L/R, one of A/P and "
                             "one of S/I (e.g. 'RAS', 'LPS')")
        return value

    @field_validator("spacing")
    @classmethod
    def _positive_spacing(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and not all(math.isfinite(v) and v > 0 for v in value):
            raise ValueError(f"every spacing must be a finite number > 0 (mm, or px in 2D), got {value}")
        return value


class Augmentation(Strict):
    """Random augmentation at training time (the authors' MONAI bundle recipe by default)."""

    enabled: bool = True
    affine_prob: float = Field(0.2, ge=0, le=1)
    rotate_range: float = Field(0.26, ge=0, description="radians, per axis")
    scale_range: float = Field(0.2, ge=0)
    noise_prob: float = Field(0.2, ge=0, le=1)
    noise_std: float = Field(0.1, ge=0)
    smooth_prob: float = Field(0.2, ge=0, le=1)
    smooth_sigma: list[float] = Field(default_factory=lambda: [0.5, 1.0], min_length=2, max_length=2)
    intensity_scale_prob: float = Field(0.2, ge=0, le=1)
    intensity_scale: float = Field(0.3, ge=0)
    intensity_shift_prob: float = Field(0.2, ge=0, le=1)
    intensity_shift: float = Field(0.1, ge=0)
    flip_prob: float = Field(0.5, ge=0, le=1)
    padding_mode: Literal["border", "zeros", "reflection"] = Field(
        "border", description="RandAffine's padding outside the crop (the authors' bundles: border)")


class Protocol(Strict):
    """How every model is trained and validated on this dataset (docs/paper.md §4 defaults)."""

    roi_size: list[int] = Field(..., min_length=2, max_length=3, description="training crop = sliding-window roi")
    batch_size: int = Field(..., gt=0)
    epochs: int = Field(500, gt=0)
    steps_per_epoch: int | None = Field(None, gt=0, description="None: one pass over the training cases")
    val_every: int = Field(20, gt=0, description="validate every N epochs (and after the last)")
    val_cases: int | None = Field(None, gt=0, description="validate during training on the first N of the fold's "
                                  "validation cases only (the learning curve; `evaluate` scores every case); "
                                  "None: all of them")
    optimizer: Literal["adamw"] = "adamw"
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    warmup_epochs: int = Field(5, ge=0)
    warmup_start_factor: float = Field(0.1, gt=0, le=1)
    loss: Literal["dicece"] = "dicece"
    crop: Literal["uniform", "posneg"] = Field(
        "uniform", description="training crops: uniform = one uniformly placed crop per sample (MONAI "
        "RandSpatialCropd, the authors' bundles); posneg = RandCropByPosNegLabeld with pos_neg_ratio")
    pos_neg_ratio: float = Field(1.0, ge=0, description="foreground:background ratio of posneg crops")
    sw_overlap: float = Field(0.5, ge=0, lt=1)
    sw_mode: Literal["gaussian", "constant"] = "gaussian"
    sw_batch_size: int = Field(4, gt=0)
    threshold: float = Field(0.5, gt=0, lt=1, description="sigmoid threshold for binary/region outputs")
    region_decoding: Literal["match", "priority"] = Field(
        "match", description="regions tasks, the written label map: match = the label value whose region membership "
        "agrees with most thresholded channels; priority = the authors' recombination, first entry of `labels` "
        "over the next (BraTS: ET -> 3 over TC -> 1 over WT -> 2)")
    precision: Literal["32", "bf16-mixed", "16-mixed"] = "32"
    accumulate_grad_batches: int = Field(1, gt=0)
    num_workers: int = Field(2, ge=0)
    augmentation: Augmentation = Field(default_factory=Augmentation)

    def validated(self, per_val_case) -> list:
        """What the training run validates on: the first `val_cases` entries of a per-validation-case
        sequence in the fold's order (the ids themselves, or a value per case), or all of them."""
        return list(per_val_case)[: self.val_cases] if self.val_cases else list(per_val_case)


class MetricRules(Strict):
    """Metric conventions (docs/datasets.md, "Metric conventions"): raw values are stored, rules apply at aggregation."""

    empty_rule: Literal["penalize", "exclude"] = Field(
        "penalize", description="penalize: both empty → Dice 1/HD95 0, one empty → Dice 0/HD95 penalty; "
        "exclude: drop cases with an empty side (the authors' MONAI behaviour)")
    hd95_penalty: Annotated[float, Field(gt=0)] | Literal["diagonal"] = Field(
        "diagonal", description="mm (or px), > 0, or the image diagonal")
    nsd_tolerance: float = Field(1.0, gt=0, description="normalized surface Dice tolerance, mm (px in 2D)")
    challenge: Literal["isles22", "brats23", "glas"] | None = Field(None, description="also compute this challenge's metrics")
    region_source: Literal["channels", "label_map"] = Field(
        "label_map", description="regions tasks: score each region from its own thresholded sigmoid channel "
        "(channels, the authors' way) or from the decoded label map (label_map)")


class DatasetPreset(Strict):
    """Everything the suite knows about one dataset: reader, channels, labels, protocol, metrics."""

    name: str
    description: str = ""
    reader: Literal["isles22", "brats23", "glas", "fives", "msd", "nnunet"]
    reader_options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the reader")
    spatial_dims: Literal[2, 3]
    channels: list[str] = Field(..., min_length=1, description="input channel names, in model input order")
    task: Literal["binary", "regions", "multiclass"] = Field(
        ..., description="binary/regions: one sigmoid channel per entry of `labels`; multiclass: softmax over "
        "background + one class per entry")
    labels: dict[str, list[int]] = Field(..., min_length=1, description="output name -> label values it covers")
    stratify: Literal["foreground_volume", "none"] = "foreground_volume"
    official_split: bool = Field(False, description="the dataset ships a train/test split (GlaS, FIVES)")
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    protocol: Protocol
    metrics: MetricRules = Field(default_factory=MetricRules)

    @property
    def in_channels(self) -> int:
        return len(self.channels)

    @property
    def out_channels(self) -> int:
        return len(self.labels) + (1 if self.task == "multiclass" else 0)

    @model_validator(mode="after")
    def _check(self):
        if len(self.protocol.roi_size) != self.spatial_dims:
            raise ValueError(f"protocol.roi_size has {len(self.protocol.roi_size)} entries but spatial_dims is {self.spatial_dims}")
        if self.preprocessing.spacing is not None and len(self.preprocessing.spacing) != self.spatial_dims:
            raise ValueError(f"preprocessing.spacing has {len(self.preprocessing.spacing)} entries but spatial_dims is {self.spatial_dims}")
        if self.preprocessing.ct_stats is not None and len(self.preprocessing.ct_stats) != len(self.channels):
            raise ValueError(f"preprocessing.ct_stats has {len(self.preprocessing.ct_stats)} entries for "
                             f"{len(self.channels)} channels")
        if self.task == "binary" and len(self.labels) != 1:
            raise ValueError("task 'binary' needs exactly one entry in labels")
        if any(v <= 0 for vals in self.labels.values() for v in vals):
            raise ValueError("labels: label values must be positive (0 is background)")
        return self


# --------------------------------------------------------------------------- study config
class DatasetEntry(Strict):
    """One dataset of a study: which preset, where the data lies, and what the study changes."""

    preset: str | None = Field(None, description="preset name (config/datasets/<preset>.yaml) or a path to a preset "
                               "file; omitted: planned from the data at `root` (an nnU-Net v2 or MSD dataset), as "
                               "`deconver preset --from` does, and kept in <results>/<study>/presets/<dataset>.yaml")
    root: str = Field(..., description="dataset root in its official layout")
    synthetic: bool = Field(False, description="write a synthetic stand-in at `root` when it is absent")
    synth_cases: int = Field(12, gt=0, description="number of synthetic cases")
    synth_seed: int = Field(123, description="seed of the synthetic stand-in: fixed, not the study's `seed`, so studies "
                            "that differ only in their seed train on the same data whichever runs first")
    download: bool = Field(False, description="MSD tasks only: fetch the task with MONAI's DecathlonDataset into "
                           "`root` (its folder name is the task, e.g. Task04_Hippocampus) when absent; needs a network")
    overrides: dict[str, Any] = Field(default_factory=dict, description="deep-merged into the preset")
    model_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict, description="model -> kwargs, this dataset only")
    models: list[str] | None = Field(None, min_length=1, description="the models run on this dataset, a subset of "
                                     "the study's `models` (default: all of them); the others are left out of it "
                                     "with a note")
    split: SplitMethod | None = Field(None, description="this dataset's split method (default: the study's `split`)")
    region_names: dict[str, str] = Field(default_factory=dict, description="rename the preset's regions (keys of its "
                                         "`labels`) in this study, e.g. {gland: nucleus} for nuclei in the GlaS layout")
    paper: bool = Field(False, description="this is the paper's dataset: the report sets the paper's reported numbers "
                        "for its preset beside ours (on in config/paper.yaml; off for other data reusing a preset)")

    @model_validator(mode="after")
    def _check(self):
        if self.preset is None and (self.synthetic or self.download):
            raise ValueError("preset: needed with synthetic or download (a preset is planned only from data on disk)")
        return self


class TrainerSettings(Strict):
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: Annotated[int, Field(ge=1)] | Literal["auto"] = Field("auto", description="devices per node (>= 1) or auto")
    num_nodes: int = Field(1, gt=0)
    strategy: Literal["auto", "ddp", "ddp_spawn"] = "auto"
    deterministic: bool = True
    threads: int = Field(1, ge=1, description="CPU threads of torch's intra-op pool while training, in hand runs and "
                         "workflow jobs alike; part of the run fingerprint (CPU results are bitwise reproducible "
                         "only at a fixed thread count)")
    tensorboard: bool = False
    keep_freed_memory: bool = Field(False, description="CPU training: glibc's malloc keeps freed memory for reuse instead "
                                    "of unmapping large blocks (deconver.engine.allocator; no effect on results, "
                                    "Linux/glibc only): less CPU time, a higher peak resident set (docs/engine.md)")


class ComplexitySettings(Strict):
    activate: bool = True
    latency_repeats: int = Field(5, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class CostSettings(Strict):
    calibration: str | None = Field(None, description="calibration file for `deconver plan` and the SLURM requests "
                                    "(default: the study's only <results>/<study>/calibration/*.json)")
    max_runtime_min: int = Field(1440, gt=0, description="cap of a training job's SLURM time request (minutes); "
                                 "a longer run is resubmitted and resumes")


class Study(Strict):
    """A study: datasets × models × folds, with the seed and the places results go."""

    study: str = Field(..., pattern=PLAIN_NAME, description="a plain folder name (letters, digits, _.-; not starting with a dot)")
    seed: int = 123
    results_dir: str = "results"
    reports_dir: str = "reports"
    num_folds: int = Field(5, ge=2)
    folds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4])
    split: SplitMethod = Field("kfold", description="kfold: stratified k-fold; official: the dataset's train/test "
                               "split; authors: the Deconver authors' folds (ISLES'22, BraTS'23, FIVES)")
    datasets: dict[str, DatasetEntry] = Field(..., min_length=1)
    models: list[str] | Literal["all"] = Field(..., description="registered model names, or 'all'")
    model_dirs: list[str] = Field(default_factory=list, description="extra folders of model files")
    model_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict, description="model -> kwargs, all datasets")
    trainer: TrainerSettings = Field(default_factory=TrainerSettings)
    complexity: ComplexitySettings = Field(default_factory=ComplexitySettings)
    cost: CostSettings = Field(default_factory=CostSettings)

    @model_validator(mode="after")
    def _check(self):
        bad = [f for f in self.folds if not 0 <= f < self.num_folds]
        if bad:
            raise ValueError(f"folds {bad} out of range for num_folds={self.num_folds}")
        odd = [d for d in self.datasets if not re.match(PLAIN_NAME, d)]
        if odd:
            raise ValueError(f"datasets: {odd} are not plain folder names (letters, digits, _.-; not starting "
                             "with a dot)")
        return self

    # ------------------------------------------------------------------ resolved views
    def preset(self, dataset: str) -> DatasetPreset:
        """The dataset's preset with this study's overrides merged in, validated."""
        entry = self._entry(dataset)
        if entry.preset is None:
            from deconver.data.autopreset import study_preset  # heavy (reads the data once, then a cached file)

            base = study_preset(self, dataset)
        else:
            base = load_preset_dict(entry.preset)
        merged = deep_merge(base, entry.overrides)
        unknown = sorted(set(entry.region_names) - set(merged.get("labels", {})))
        if unknown:
            raise ConfigError(f"datasets.{dataset}.region_names: {unknown} not among the preset's regions "
                              f"{sorted(merged.get('labels', {}))}")
        renamed = [entry.region_names.get(k, k) for k in merged.get("labels", {})]
        if len(set(renamed)) != len(renamed):
            raise ConfigError(f"datasets.{dataset}.region_names: two regions would be called the same ({renamed})")
        merged["labels"] = dict(zip(renamed, merged.get("labels", {}).values()))
        return _validate(DatasetPreset, merged, where=f"datasets.{dataset}.overrides")

    def split_method(self, dataset: str) -> str:
        """How this dataset's fold file is made: its own `split`, else the study's."""
        return self._entry(dataset).split or self.split

    def model_kwargs(self, dataset: str, model: str) -> dict[str, Any]:
        """Model keyword arguments: study-wide overrides, then this dataset's (which win)."""
        entry = self._entry(dataset)
        return {**self.model_overrides.get(model, {}), **entry.model_overrides.get(model, {})}

    def _entry(self, dataset: str) -> DatasetEntry:
        if dataset not in self.datasets:
            raise ConfigError(f"dataset {dataset!r} is not in study {self.study!r}; it has {sorted(self.datasets)}")
        return self.datasets[dataset]


# --------------------------------------------------------------------------- loading
def deep_merge(base: dict, override: dict) -> dict:
    """Recursively merge `override` into a copy of `base` (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _format_errors(err: ValidationError, where: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if where.endswith((".yaml", ".yml")) or where == "config":
            key = f"{where}: {loc or '<root>'}"
        else:
            key = f"{where}.{loc}" if where and loc else (where or loc or "<root>")
        lines.append(f"  {key}: {e['msg']}" + (f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""))
    return "\n".join(lines)


def _validate(model: type[BaseModel], data: Any, where: str):
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid configuration in {where or 'config'}:\n{_format_errors(err, where)}") from None


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def preset_path(name: str) -> Path:
    """A preset by name (config/datasets/<name>.yaml) or by path."""
    candidate = Path(name)
    if candidate.suffix in {".yaml", ".yml"}:
        return candidate
    return PRESET_DIR / f"{name}.yaml"


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset_dict(name: str) -> dict:
    path = preset_path(name)
    if not path.is_file():
        raise ConfigError(f"unknown dataset preset {name!r} (no {path}); available: {available_presets()}")
    return _read_yaml(path)


def load_preset(name: str, overrides: dict | None = None) -> DatasetPreset:
    """A dataset preset by name or path, optionally with overrides, validated."""
    data = deep_merge(load_preset_dict(name), overrides or {})
    return _validate(DatasetPreset, data, where=str(preset_path(name)))


def load_study(source: str | Path | dict) -> Study:
    """A study from a YAML file or an already-parsed mapping (e.g. Snakemake's `config`), validated.

    Every dataset's preset is resolved too, so a bad override fails here, before any job runs.
    """
    if isinstance(source, dict):
        data, where = source, "config"
    else:
        data, where = _read_yaml(Path(source)), str(source)
    study = _validate(Study, data, where=where)
    for name in study.datasets:
        preset = study.preset(name)
        if study.split_method(name) == "authors":
            from deconver.data.author_split import available

            if preset.reader not in available():
                key = f"datasets.{name}.split" if study.datasets[name].split else "split"
                raise ConfigError(f"invalid configuration in {where}:\n  {key}: 'authors' folds exist for the "
                                  f"readers {available()}, not for {preset.reader!r} (dataset {name!r}); "
                                  f"give datasets.{name}.split: kfold")
    return study
