"""Where every step reads and writes: the one definition of the results layout.

The CLI steps, the Snakemake rules and the report all build paths through `StudyPaths`, so they can
never disagree. Layout (``<R>`` = results_dir/<study>)::

    <R>/study.yaml                          the resolved study the workflow passes to every step
    <R>/inventory/<dataset>.json            raw files of a dataset root (paths, sizes, mtimes; the workflow)
    <R>/prepared/<dataset>/manifest.json    preprocessing cache (`deconver prepare`)
    <R>/presets/<dataset>.yaml              preset planned from the data (a dataset without `preset`)
    <R>/splits/<dataset>.json               fold file (`deconver split`)
    <R>/runs/<dataset>/<model>/fold<k>/     one training run (`deconver train`):
        checkpoints/{last,best}.ckpt, final.ckpt, train_log.csv, run.json, model.json, protocol.json
        predictions/<case>.nii.gz|.png      (`deconver predict`)
        evaluation.csv                      per-case metrics (`deconver evaluate`)
    <R>/complexity/<dataset>/<model>.json   (`deconver complexity`)
    <R>/aggregate/                          pooled tables (`deconver aggregate`)
    <R>/logs/<rule>/...                     the workflow's job logs
    reports_dir/<study>/                    rendered report (`deconver report`)

By hand: ``StudyPaths.at("results/default")`` for a results folder without its config, and
``StudyPaths.parse(path)`` says what a path of the layout is (``PathKey(kind, dataset, model, fold)``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from deconver.config import Study

class PathKey(NamedTuple):
    """What a path of the layout is: its kind (study, inventory, prepared, preset, split, run, complexity, aggregate, logs) and the keys it carries."""

    kind: str
    dataset: str | None = None
    model: str | None = None
    fold: int | None = None


@dataclass(frozen=True)
class RunFolder:
    """The files of one run folder ``<R>/runs/<dataset>/<model>/fold<k>/`` (also for a folder found by hand)."""

    dir: Path

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.ckpt"

    @property
    def final(self) -> Path:
        """Written last by `deconver train`: its presence means the run is finished."""
        return self.dir / "final.ckpt"

    @property
    def train_log(self) -> Path:
        return self.dir / "train_log.csv"

    @property
    def run_record(self) -> Path:
        return self.dir / "run.json"

    @property
    def model_record(self) -> Path:
        return self.dir / "model.json"

    @property
    def protocol(self) -> Path:
        """The resolved recipe of the run (`deconver protocol`), written by `deconver train`."""
        return self.dir / "protocol.json"

    @property
    def cost(self) -> Path:
        """What the run consumed (wall time per attempt, device-hours, peak memory), written by `deconver train`."""
        return self.dir / "cost.json"

    @property
    def predictions(self) -> Path:
        return self.dir / "predictions"

    @property
    def evaluation(self) -> Path:
        return self.dir / "evaluation.csv"


@dataclass(frozen=True)
class StudyPaths:
    """The paths of one study's results (`results`) and report (`reports`; None when unknown)."""

    results: Path
    reports: Path | None = None

    @classmethod
    def of(cls, study: Study, base: Path | str = ".") -> "StudyPaths":
        base = Path(base)
        return cls(results=base / study.results_dir / study.study, reports=base / study.reports_dir / study.study)

    @classmethod
    def at(cls, results: Path | str, reports: Path | str | None = None) -> "StudyPaths":
        """Hand use: the layout under a results folder `<results_dir>/<study>` (no config needed)."""
        return cls(results=Path(results), reports=Path(reports) if reports is not None else None)

    # ------------------------------------------------------------------ the layout
    @property
    def study_file(self) -> Path:
        return self.results / "study.yaml"

    @property
    def logs(self) -> Path:
        return self.results / "logs"

    def synthetic_record(self, dataset: str) -> Path:
        """This study's copy of a synthetic stand-in's marker (what it used: kind, cases, seed); the
        workflow's `synth` output, so that Snakemake never deletes the shared stand-in's own marker."""
        return self.results / "synthetic" / f"{dataset}.txt"

    def inventory(self, dataset: str) -> Path:
        return self.results / "inventory" / f"{dataset}.json"

    def prepared(self, dataset: str) -> Path:
        return self.results / "prepared" / dataset

    def manifest(self, dataset: str) -> Path:
        return self.prepared(dataset) / "manifest.json"

    def preset(self, dataset: str) -> Path:
        """The preset planned from the data for a dataset the study names without one."""
        return self.results / "presets" / f"{dataset}.yaml"

    def split(self, dataset: str) -> Path:
        return self.results / "splits" / f"{dataset}.json"

    def runs(self) -> Path:
        return self.results / "runs"

    def run(self, dataset: str, model: str, fold: int | str) -> Path:
        return self.runs() / dataset / model / f"fold{fold}"

    def run_folder(self, dataset: str, model: str, fold: int | str) -> RunFolder:
        return RunFolder(self.run(dataset, model, fold))

    def final_checkpoint(self, dataset: str, model: str, fold: int | str) -> Path:
        return self.run_folder(dataset, model, fold).final

    def protocol(self, dataset: str, model: str, fold: int | str) -> Path:
        return self.run_folder(dataset, model, fold).protocol

    def train_log(self, dataset: str, model: str, fold: int | str) -> Path:
        return self.run_folder(dataset, model, fold).train_log

    def cost(self, dataset: str, model: str, fold: int | str) -> Path:
        return self.run_folder(dataset, model, fold).cost

    def calibration(self, device: str) -> Path:
        """Per-device timings of the study's (dataset, model) pairs (`deconver calibrate`)."""
        return self.results / "calibration" / f"{device}.json"

    def predictions(self, dataset: str, model: str, fold: int | str) -> Path:
        return self.run_folder(dataset, model, fold).predictions

    def evaluation(self, dataset: str, model: str, fold: int | str) -> Path:
        return self.run_folder(dataset, model, fold).evaluation

    def complexity_dir(self) -> Path:
        return self.results / "complexity"

    def complexity(self, dataset: str, model: str) -> Path:
        return self.complexity_dir() / dataset / f"{model}.json"

    def aggregate(self) -> Path:
        return self.results / "aggregate"

    def report_html(self) -> Path:
        if self.reports is None:
            raise ValueError(f"no reports folder is known for {self.results} (give one to StudyPaths.at)")
        return self.reports / "report.html"

    # ------------------------------------------------------------------ hand use
    def evaluations(self) -> list[tuple[PathKey, Path]]:
        """Every run's evaluation.csv under `runs/`, with its (dataset, model, fold), sorted."""
        found = []
        for path in sorted(self.runs().glob("*/*/fold*/evaluation.csv")):
            found.append((self.parse(path), path))
        return found

    def parse(self, path: Path | str) -> PathKey:
        """What `path` (a file or folder of this layout) is; ValueError naming it when it is none."""
        try:
            rel = Path(path).relative_to(self.results).as_posix()
        except ValueError:
            raise ValueError(f"{path} is not under the results folder {self.results}") from None
        for kind, pattern in _PATTERNS:
            found = re.fullmatch(pattern, rel)
            if found:
                keys = found.groupdict()
                fold = keys.get("fold")
                return PathKey(kind, keys.get("dataset"), keys.get("model"), int(fold) if fold is not None else None)
        raise ValueError(f"{path} is not a path of the results layout (docs/ARCHITECTURE.md)")


# kind -> the path relative to <R> (the same layout as the methods above, for `StudyPaths.parse`)
_PATTERNS = (
    ("study", r"study\.yaml"),
    ("inventory", r"inventory/(?P<dataset>[^/]+)\.json"),
    ("prepared", r"prepared/(?P<dataset>[^/]+)(/.*)?"),
    ("preset", r"presets/(?P<dataset>[^/]+)\.yaml"),
    ("split", r"splits/(?P<dataset>[^/]+)\.json"),
    ("run", r"runs/(?P<dataset>[^/]+)/(?P<model>[^/]+)/fold(?P<fold>\d+)(/.*)?"),
    ("complexity", r"complexity/(?P<dataset>[^/]+)/(?P<model>[^/]+)\.json"),
    ("aggregate", r"aggregate(/.*)?"),
    ("logs", r"logs(/.*)?"),
)
