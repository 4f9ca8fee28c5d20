"""Instance maps with more than 255 objects: 16-bit PNG/TIFF GlaS layouts round-trip exactly; an 8-bit map
whose ids may have wrapped is refused, one whose ids look wrapped is warned about (deconver.data.instances)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from deconver.config import load_preset
from deconver.data import DatasetError, PreparedDataset, load_native_instances, read_dataset
from deconver.data.instances import decode_instances, read_instance_file
from deconver.data.prepare import prepare_dataset
from deconver.metrics.evaluate import evaluate_folder

GRADES = "name,patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)\r"


def dense_instances(shape=(330, 300), seed=0) -> np.ndarray:
    """About 1,200 small blobs (4×5 px, some touching their neighbour) with shuffled ids up to ~1,500."""
    rng = np.random.default_rng(seed)
    inst = np.zeros(shape, np.int32)
    cells = [(y, x) for y in range(2, shape[0] - 6, 9) for x in range(2, shape[1] - 6, 7)]
    ids = rng.permutation(np.arange(1, int(len(cells) * 1.25)))[: len(cells)]
    for (y, x), k in zip(cells, ids):
        inst[y:y + 4, x:x + 5 + (k % 3 == 0)] = k  # every third blob touches the next one
    return inst


def write_glas(root, instances: np.ndarray, anno_name: str, anno_mode: str | None = None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (*instances.shape, 3), dtype=np.uint8)
    Image.fromarray(rgb, mode="RGB").save(root / "train_1.bmp")
    Image.fromarray(instances if anno_mode is None else instances.astype(np.uint8), mode=anno_mode).save(root / anno_name)
    (root / "Grade.csv").write_bytes((GRADES + "train_1,1, benign, adenomatous\r").encode())


@pytest.mark.parametrize("anno_name", ["train_1_anno.png", "train_1_anno.tif"])
def test_glas_layout_with_1000_objects_round_trips_exactly(tmp_path, anno_name):
    inst = dense_instances()
    assert len(np.unique(inst)) - 1 >= 1000 and inst.max() > 1000
    write_glas(tmp_path / "glas", inst.astype(np.uint16), anno_name)
    cases = read_dataset(load_preset("glas"), tmp_path / "glas")
    assert [c.label.name for c in cases] == [anno_name]
    prepare_dataset(load_preset("glas"), tmp_path / "glas", tmp_path / "prep", progress=False)
    prepared = PreparedDataset(tmp_path / "prep")
    entry = prepared.case("train_1")
    assert entry["warnings"] == []
    np.testing.assert_array_equal(load_native_instances(entry), inst)
    _, label = prepared.load("train_1")
    np.testing.assert_array_equal(label[0] > 0, inst > 0)
    np.testing.assert_array_equal(read_instance_file(tmp_path / "glas" / anno_name), inst)


def test_evaluate_by_hand_counts_every_object_of_a_16_bit_map(tmp_path):
    inst = dense_instances()
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir(), pred_dir.mkdir()
    Image.fromarray(inst.astype(np.uint16)).save(gt_dir / "testA_1_anno.png")
    Image.fromarray((inst > 0).astype(np.uint8)).save(pred_dir / "testA_1.png")  # label space: 1
    preset = load_preset("glas")
    out = evaluate_folder(pred_dir, gt_dir, preset, tmp_path / "eval.csv", gt_suffix="_anno")
    import pandas as pd

    table = pd.read_csv(out)
    rows = table[table["convention"] == "suite"].set_index("metric")["value"]
    n = len(np.unique(inst)) - 1
    merged = n - int(label_count(inst > 0))  # touching blobs are one predicted component
    assert rows["glas_tp"] + rows["glas_fn"] == n
    assert rows["glas_fp"] == 0 and rows["glas_fn"] == merged


def label_count(mask: np.ndarray) -> int:
    from deconver.metrics.challenge import label_components

    return label_components(mask)[1]


def test_8_bit_map_with_wrapped_ids_is_refused(tmp_path):
    inst = dense_instances(shape=(160, 150))
    ids = np.unique(inst)[1:]
    inst = np.searchsorted(np.concatenate([[0], ids]), inst).astype(np.int32)  # ids 1..n, n > 255
    assert inst.max() > 255
    write_glas(tmp_path / "glas", inst, "train_1_anno.bmp", anno_mode="L")  # a plain cast: ids wrap around
    with pytest.raises(DatasetError, match=r"train_1_anno\.bmp.*8-bit.*255.*16-bit"):
        prepare_dataset(load_preset("glas"), tmp_path / "glas", tmp_path / "prep", progress=False)
    with pytest.raises(DatasetError, match="8-bit"):
        read_instance_file(tmp_path / "glas" / "train_1_anno.bmp")


def test_8_bit_map_whose_ids_look_wrapped_is_warned_about(tmp_path, capsys):
    inst = np.zeros((60, 60), np.int32)
    for k in range(40):  # ids 1..20 and 257..276: the second twenty wrap onto the first
        y, x = divmod(k, 8)
        inst[y * 11 + 2:y * 11 + 8, x * 7 + 1:x * 7 + 5] = k + 1 if k < 20 else k + 237
    write_glas(tmp_path / "glas", inst, "train_1_anno.bmp", anno_mode="L")
    result = prepare_dataset(load_preset("glas"), tmp_path / "glas", tmp_path / "prep", progress=False)
    assert len(result["warnings"]) == 1
    assert "train_1_anno.bmp" in result["warnings"][0] and "20 in all" in result["warnings"][0]
    read_instance_file(tmp_path / "glas" / "train_1_anno.bmp")
    assert "several separate objects" in capsys.readouterr().err


def test_rgb_instance_maps(tmp_path):
    grey = np.zeros((10, 12), np.uint8)
    grey[1:4, 1:4], grey[6:9, 6:9] = 7, 9
    same = np.repeat(grey[..., None], 3, axis=2)
    np.testing.assert_array_equal(decode_instances(same, tmp_path / "x.bmp"), grey)
    colour = np.zeros((10, 12, 3), np.uint8)
    colour[1:4, 1:4] = (200, 0, 0)
    colour[6:9, 6:9] = (0, 0, 200)  # channel 0 alone would lose this object
    colour[1:4, 6:9] = (200, 0, 1)
    decoded = decode_instances(colour, tmp_path / "x.png")
    assert len(np.unique(decoded)) == 4 and (decoded[6:9, 6:9] > 0).all()
    with pytest.raises(DatasetError, match="non-negative integers"):
        decode_instances(np.full((4, 4), 1.5, np.float32), tmp_path / "x.tif")
