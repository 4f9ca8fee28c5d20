"""What a study costs (deconver.cost): the schedule arithmetic against the engine and MONAI, the
prediction model, the SLURM requests derived from it, and what a real training run records."""
from __future__ import annotations

import json
import math

import pytest
import torch

from deconver.config import load_study
from deconver.cost.estimate import (MARGIN, RunCost, run_cost, slurm_request, sliding_windows,
                                    validation_passes)
from deconver.plan import Run


@pytest.mark.parametrize("shape, roi, overlap", [((100, 90, 40), (64, 64, 32), 0.5), ((64, 64), (64, 64), 0.25),
                                                   ((30, 200), (64, 64), 0.5), ((129, 77, 33), (32, 32, 32), 0.25)])
def test_window_count_is_monais(shape, roi, overlap):
    """The predicted windows per case are the windows MONAI's sliding_window_inference really runs."""
    from monai.inferers import sliding_window_inference

    calls = []

    def net(x):
        calls.append(x.shape[0])
        return x

    sliding_window_inference(torch.zeros(1, 1, *shape), roi, 1, net, overlap=overlap)
    assert sum(calls) == sliding_windows(shape, roi, overlap)


@pytest.mark.parametrize("epochs, every", [(1, 1), (2, 2), (5, 2), (10, 3), (500, 20), (7, 10)])
def test_validation_passes_follow_the_schedule(epochs, every):
    """As engine/callbacks.ValidationSchedule: every `every` epochs and after the last."""
    validated = [e for e in range(epochs) if (e + 1) % every == 0 or e == epochs - 1]
    assert validation_passes(epochs, every) == len(validated)


def _study(tmp_path, **protocol):
    cfg = {"study": "c", "results_dir": str(tmp_path / "results"), "num_folds": 2, "folds": [0],
           "models": ["unet"], "trainer": {"accelerator": "cpu", "devices": 1},
           "datasets": {"glas": {"preset": "glas", "root": str(tmp_path / "glas"),
                                 "overrides": {"protocol": {"roi_size": [64, 64], "batch_size": 2, "epochs": 4,
                                                            "val_every": 2, "sw_overlap": 0.5, "sw_batch_size": 2,
                                                            "num_workers": 0, **protocol}}}}}
    return load_study(cfg)


def _write_inputs(study, tmp_path, shapes):
    from deconver.paths import StudyPaths

    paths = StudyPaths.of(study)
    ids = [f"c{i}" for i in range(len(shapes))]
    paths.manifest("glas").parent.mkdir(parents=True)
    paths.manifest("glas").write_text(json.dumps({"cases": [{"id": c, "image_shape": [3, *s]}
                                                            for c, s in zip(ids, shapes)]}))
    paths.split("glas").parent.mkdir(parents=True)
    paths.split("glas").write_text(json.dumps({"folds": [{"fold": 0, "train": ids[2:], "val": ids[:2]}]}))


def test_run_cost_from_calibration_fold_file_and_cache(tmp_path):
    study = _study(tmp_path)
    _write_inputs(study, tmp_path, [(100, 100), (64, 64), (64, 64), (64, 64), (64, 64), (64, 64), (64, 64)])
    pair = {"dataset": "glas", "model": "unet", "status": "ok", "seconds_per_step": 0.5, "startup_s": 3.0,
            "seconds_per_window_batch": 0.1, "peak_memory_mb": 900.0, "host_peak_rss_mb": 1200.0}
    calibration = {"device_kind": "cuda", "device_memory_mb": 1000.0, "pairs": [pair],
                   "loading_samples_per_s": {"glas": 20.0}}
    cost = run_cost(study, Run("glas", "unet", 0), calibration)
    # 5 training cases / global batch 2 -> 3 steps; 4 epochs, validation after epochs 2 and 4
    assert (cost.train_cases, cost.val_cases, cost.steps_per_epoch, cost.val_passes) == (5, 2, 3, 2)
    # windows: 100x100 at roi 64, interval 32 -> 3x3 = 9 -> 5 batches of 2; 64x64 -> 1 window -> 1 batch
    assert cost.windows_per_pass == 6
    t_step = 0.5 + 2 / 20.0  # data loaded in the training process (num_workers 0)
    assert cost.train_s == pytest.approx(3.0 + 4 * 3 * t_step + 2 * 6 * 0.1)
    assert cost.predict_s == pytest.approx(3.0 + 6 * 0.1)
    assert cost.fits is True and cost.missing == []
    assert cost.device_hours == pytest.approx((cost.train_s + cost.predict_s) / 3600)
    calibration["device_memory_mb"] = 800.0
    assert run_cost(study, Run("glas", "unet", 0), calibration).fits is False


def test_run_cost_validates_on_val_cases_and_predicts_all(tmp_path):
    """protocol.val_cases: the training run validates on the first N validation cases (the engine's
    `Protocol.validated`), prediction still covers every one."""
    from deconver.engine.datamodule import SegmentationDataModule

    shapes = [(100, 100), (64, 64), (64, 64), (64, 64), (64, 64), (64, 64), (64, 64)]
    study = _study(tmp_path, val_cases=1)
    _write_inputs(study, tmp_path, shapes)
    pair = {"dataset": "glas", "model": "unet", "status": "ok", "seconds_per_step": 0.5, "startup_s": 3.0,
            "seconds_per_window_batch": 0.1, "peak_memory_mb": 900.0}
    cost = run_cost(study, Run("glas", "unet", 0), {"pairs": [pair]})
    protocol = study.preset("glas").protocol
    data = SegmentationDataModule(None, ["x"], ["c0", "c1"], protocol, 2, seed=0)
    assert data.val_ids == ["c0"]  # the engine validates on the first val_cases of the fold's validation cases
    first = 5  # c0 (the fold's first validation case), 100x100: 9 windows -> 5 batches of 2
    assert (cost.windows_per_pass, cost.curve_windows_per_pass) == (6, first)
    assert cost.train_s == pytest.approx(3.0 + 4 * 3 * 0.5 + 2 * first * 0.1)
    assert cost.predict_s == pytest.approx(3.0 + 6 * 0.1)


def test_missing_inputs_are_named_not_guessed(tmp_path):
    study = _study(tmp_path)
    cost = run_cost(study, Run("glas", "unet", 0), None)
    assert cost.train_s is None and cost.peak_memory_mb is None and cost.device_hours is None
    assert any("case counts" in m for m in cost.missing) and "a calibration file" in cost.missing


def test_slurm_request_margin_floor_and_cap():
    cost = RunCost("glas", "unet", 0, processes=1, train_s=3600.0, host_memory_mb=10000.0)
    assert slurm_request(cost, max_runtime_min=1440, default_runtime_min=60, default_mem_mb=8000) == {
        "runtime": math.ceil(60 * MARGIN), "mem_mb": math.ceil(10000 * MARGIN)}
    assert slurm_request(cost, max_runtime_min=30, default_runtime_min=60, default_mem_mb=8000)["runtime"] == 30
    quick = RunCost("glas", "unet", 0, processes=1, train_s=5.0, host_memory_mb=10.0)
    assert slurm_request(quick, max_runtime_min=1440, default_runtime_min=60, default_mem_mb=8000) == {
        "runtime": 10, "mem_mb": 4000}
    unknown = RunCost("glas", "unet", 0, processes=1)
    assert slurm_request(unknown, max_runtime_min=1440, default_runtime_min=60, default_mem_mb=8000) == {
        "runtime": 60, "mem_mb": 8000}


def test_report_compares_measured_fit_with_predicted_fit(tmp_path):
    """The report's predicted-vs-measured table: cost.json's wall time (from the fit start) against the
    prediction without start-up, and the share within the tolerance by the one rule (within_tolerance)."""
    import pandas as pd

    from deconver.cost.estimate import within_tolerance
    from deconver.cost.record import cost_rows
    from deconver.io import write_json_atomic
    from deconver.report.cost_section import cost_tables

    runs = []
    for i, (wall, train, fit) in enumerate([(100.0, 110.0, 95.0), (100.0, 80.0, 60.0), (50.0, None, None)]):
        attempt = {"started": "t", "device": "cpu", "processes": 1, "wall_s": wall, "epochs": 2, "last_epoch": 1,
                   "peak_memory_mb": 10.0}
        record = {"attempts": [attempt]}
        if train is not None:
            record.update(predicted_train_s=train, predicted_fit_s=fit)
        write_json_atomic(tmp_path / f"{i}.json", record)
        runs.append(("glas", f"m{i}", 0, tmp_path / f"{i}.json"))
    rows = cost_rows(runs)
    assert [r["measured_over_predicted"] for r in rows] == [pytest.approx(100 / 95), pytest.approx(100 / 60), None]
    assert within_tolerance(100, 95) and not within_tolerance(100, 60) and within_tolerance(100, 130.0)
    tables = dict(cost_tables(pd.DataFrame(rows)))
    table = tables["cost_prediction"]
    assert [r[1]["predicted_s"] for r in table.rows] == [95.0, 60.0]  # the fit, not the whole job (110, 80)
    assert "50% of 2 runs" in table.caption
