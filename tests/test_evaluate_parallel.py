"""`deconver evaluate` runs cases in worker processes with one log line per case (deconver.metrics.parallel)."""
from __future__ import annotations

import argparse
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from deconver.config import load_preset
from deconver.metrics import evaluate as ev
from deconver.metrics.parallel import available_cores, map_cases
from test_metrics_dense import bench


@pytest.fixture(scope="module")
def glas_fold(tmp_path_factory):
    """Four nuclei tiles in the GlaS layout: 16-bit GT instance maps, predictions in label space."""
    root = tmp_path_factory.mktemp("dense")
    gt_dir, pred_dir = root / "gt", root / "pred"
    gt_dir.mkdir(), pred_dir.mkdir()
    for k in range(4):
        pred, gt = bench.nuclei_case(220, seed=k)
        Image.fromarray(gt.astype(np.uint16)).save(gt_dir / f"testA_{k + 1}_anno.png")
        Image.fromarray((pred > 0).astype(np.uint8)).save(pred_dir / f"testA_{k + 1}.png")
    return root


def _evaluate(root, out, workers, capsys):
    ev.evaluate_folder(root / "pred", root / "gt", load_preset("glas"), out, gt_suffix="_anno", workers=workers)
    return pd.read_csv(out), capsys.readouterr().err


def test_parallel_evaluation_equals_serial_and_logs_every_case(glas_fold, tmp_path, capsys):
    serial, log1 = _evaluate(glas_fold, tmp_path / "one.csv", 1, capsys)
    parallel, log2 = _evaluate(glas_fold, tmp_path / "two.csv", 2, capsys)
    pd.testing.assert_frame_equal(serial, parallel)
    assert set(serial["case"]) == {f"testA_{k}" for k in range(1, 5)}
    assert ((serial["metric"] == "glas_object_hausdorff") & (serial["convention"] == "suite")).sum() == 4
    assert "4 cases on 1 worker" in log1 and "4 cases on 2 workers" in log2
    for log in (log1, log2):
        done = re.findall(r": (testA_\d) done \((\d)/4, [\d.]+ s\)", log)
        assert sorted(c for c, _ in done) == [f"testA_{k}" for k in range(1, 5)]
        assert sorted(k for _, k in done) == ["1", "2", "3", "4"]


def test_an_error_in_a_worker_names_the_case(glas_fold, tmp_path, capsys):
    bad = tmp_path / "pred"
    bad.mkdir()
    for path in (glas_fold / "pred").iterdir():
        (bad / path.name).write_bytes(path.read_bytes())
    Image.fromarray(np.full((220, 220), 7, np.uint8)).save(bad / "testA_3.png")
    with pytest.raises(ev.EvaluationError, match=r"testA_3\.png: unexpected label values \[7\]"):
        ev.evaluate_folder(bad, glas_fold / "gt", load_preset("glas"), tmp_path / "x.csv", gt_suffix="_anno",
                           workers=2)
    assert not (tmp_path / "x.csv").exists()


def test_map_cases_keeps_order_and_defaults_to_the_available_cores(capsys):
    offset = 10  # a closure: inherited by the forked workers, never pickled
    assert map_cases(lambda x: x * x + offset, list(range(7)), names=[str(i) for i in range(7)], workers=3) == \
        [x * x + offset for x in range(7)]
    assert available_cores() >= 1
    map_cases(lambda x: x, [1], names=["a"])
    assert "1 case on 1 worker" in capsys.readouterr().err  # never more workers than items


def test_cli_has_workers_option():
    parser = argparse.ArgumentParser()
    ev.configure(parser)
    assert parser.parse_args(["--workers", "3"]).workers == 3
    assert parser.parse_args([]).workers is None
