"""`deconver split`: deterministic stratified k-fold and the official splits."""
from __future__ import annotations

import json

import numpy as np
import pytest

from deconver.cli import main
from deconver.config import load_preset
from deconver.data import DatasetError, make_folds
from deconver.data.prepare import prepare_dataset
from deconver.data.split import load_split, official_folds
from deconver.data.synth import write_synthetic


def _check_partition(folds, ids):
    vals = [set(f["val"]) for f in folds]
    assert set().union(*vals) == set(ids) and sum(map(len, vals)) == len(ids)  # every case validated once
    for f in folds:
        assert set(f["train"]) | set(f["val"]) == set(ids) and not set(f["train"]) & set(f["val"])
    sizes = [len(v) for v in vals]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("n, k", [(10, 5), (13, 5), (27, 4), (7, 2)])
def test_partition_and_balance(n, k):
    ids = [f"case_{i:03d}" for i in range(n)]
    strata = list(np.random.default_rng(0).exponential(100, n))
    folds = make_folds(ids, strata, k, seed=123)
    assert [f["fold"] for f in folds] == list(range(k))
    _check_partition(folds, ids)


def test_deterministic_and_seeded():
    ids = [f"c{i}" for i in range(40)]
    strata = [float(i % 9) for i in range(40)]
    a = make_folds(ids, strata, 5, seed=1)
    assert make_folds(ids, strata, 5, seed=1) == a
    assert make_folds(list(reversed(ids)), list(reversed(strata)), 5, seed=1) == a  # input order does not matter
    assert make_folds(ids, strata, 5, seed=2) != a


def test_stratified_on_binned_volume():
    """Ten small and ten large lesions: every fold of five gets two of each."""
    ids = [f"c{i:02d}" for i in range(20)]
    strata = [float(i) if i < 10 else 1000.0 + i for i in range(20)]
    for seed in range(5):
        folds = make_folds(ids, strata, 5, seed=seed, num_bins=2)
        for f in folds:
            large = sum(strata[ids.index(c)] > 500 for c in f["val"])
            assert large == 2
    # quantile bins: a skewed distribution still splits evenly
    ids = ids[:16]
    strata = [0.0] * 8 + [float(v) for v in range(1, 9)]
    for seed in range(5):
        for f in make_folds(ids, strata, 4, seed=seed, num_bins=2):
            assert sum(strata[ids.index(c)] == 0 for c in f["val"]) == 2


def test_bad_inputs():
    with pytest.raises(DatasetError, match="cannot be split"):
        make_folds(["a", "b"], None, 5, seed=0)
    with pytest.raises(DatasetError, match="duplicate"):
        make_folds(["a", "a", "b"], None, 2, seed=0)
    with pytest.raises(DatasetError, match="subset"):
        official_folds(["a", "b"], ["train", None])


def test_official_split_glas_and_fives(tmp_path):
    glas = official_folds(["train_1", "testA_1", "testB_1", "train_2"], ["train", "testA", "testB", "train"])
    assert glas == [{"fold": 0, "train": ["train_1", "train_2"], "val": ["testA_1", "testB_1"]}]
    root = write_synthetic("fives", tmp_path / "fives", cases=4, seed=0)
    prepare_dataset(load_preset("fives"), root, tmp_path / "prep", progress=False)
    out = tmp_path / "fives.json"
    assert main(["split", "--prepared", str(tmp_path / "prep"), "--out", str(out), "--method", "official"]) == 0
    data = load_split(out)
    assert data["method"] == "official" and data["num_folds"] == 1
    assert all(c.startswith("train_") for c in data["folds"][0]["train"])
    assert data["folds"][0]["val"] and all(c.startswith("test_") for c in data["folds"][0]["val"])
    # the authors' folds need all 800 FIVES images: stand-ins whose names the real set lacks are named, and
    # the ids of the file without a case (10 of them, and the count)
    assert main(["split", "--prepared", str(tmp_path / "prep"), "--out", str(out), "--method", "authors"]) == 1
    from deconver.data import DatasetError, PreparedDataset
    from deconver.data.split import split_prepared

    with pytest.raises(DatasetError, match=r"2 case\(s\) of the data have no fold in the authors' file: train_2_D, "
                                           r"train_3_G; 798 id\(s\) of the authors' file are not in the data: "
                                           r"test/Original_100_D, (test/Original_\d+_[A-Z], ){8}test/Original_109_G "
                                           r"… \(798 in all\)"):
        split_prepared(PreparedDataset(tmp_path / "prep"), dataset="fives", num_folds=5, seed=0, method="authors")


def test_cli_kfold_noop_and_refusals(tmp_path, capsys):
    root = write_synthetic("brats23", tmp_path / "brats", cases=6, seed=0)
    prepare_dataset(load_preset("brats23"), root, tmp_path / "prep", progress=False)
    out = tmp_path / "splits" / "brats23.json"
    args = ["split", "--prepared", str(tmp_path / "prep"), "--out", str(out), "--num-folds", "3", "--seed", "9"]
    assert main(args) == 0
    data = load_split(out)
    assert (data["dataset"], data["seed"], data["num_folds"], data["method"]) == ("brats23", 9, 3, "kfold")
    assert "provenance" in data and [len(f["val"]) for f in data["folds"]] == [2, 2, 2]
    stamp = out.stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0 and "up to date" in capsys.readouterr().out and out.stat().st_mtime_ns == stamp
    assert main([*args[:-1], "10"]) == 0 and json.loads(out.read_text())["seed"] == 10
    assert main(["split", "--prepared", str(tmp_path / "prep"), "--out", str(out), "--method", "official"]) == 1
    assert "no official split" in capsys.readouterr().err
    assert main(["split", "--prepared", str(tmp_path / "nothing"), "--out", str(out)]) == 2  # a named input
    assert f"--prepared: {tmp_path / 'nothing'} does not exist" in capsys.readouterr().err
    (tmp_path / "nothing").mkdir()
    assert main(["split", "--prepared", str(tmp_path / "nothing"), "--out", str(out)]) == 1  # not a cache
    assert "manifest.json not found" in capsys.readouterr().err
