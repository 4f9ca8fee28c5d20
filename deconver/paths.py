"""Where every step reads and writes: the one definition of the results layout.

The CLI steps and the Snakemake rules both build paths through `StudyPaths`, so the two can never
disagree. Layout (``<R>`` = results_dir/<study>)::

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
    reports_dir/<study>/                    rendered report (`deconver report`)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from deconver.config import Study


@dataclass(frozen=True)
class StudyPaths:
    results: Path
    reports: Path

    @classmethod
    def of(cls, study: Study, base: Path | str = ".") -> "StudyPaths":
        base = Path(base)
        return cls(results=base / study.results_dir / study.study, reports=base / study.reports_dir / study.study)

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

    def run(self, dataset: str, model: str, fold: int) -> Path:
        return self.results / "runs" / dataset / model / f"fold{fold}"

    def final_checkpoint(self, dataset: str, model: str, fold: int) -> Path:
        return self.run(dataset, model, fold) / "final.ckpt"

    def protocol(self, dataset: str, model: str, fold: int) -> Path:
        """The resolved recipe of a run (`deconver protocol`), written by `deconver train`."""
        return self.run(dataset, model, fold) / "protocol.json"

    def predictions(self, dataset: str, model: str, fold: int) -> Path:
        return self.run(dataset, model, fold) / "predictions"

    def evaluation(self, dataset: str, model: str, fold: int) -> Path:
        return self.run(dataset, model, fold) / "evaluation.csv"

    def complexity(self, dataset: str, model: str) -> Path:
        return self.results / "complexity" / dataset / f"{model}.json"

    def aggregate(self) -> Path:
        return self.results / "aggregate"
