"""GlaS (MICCAI 2015) reader.

Layout: one flat folder (possibly inside one wrapper folder) with ``train_N.bmp``/``train_N_anno.bmp``,
``testA_N…``, ``testB_N…`` and ``Grade.csv`` (PNG and TIFF files are taken too: instance maps with more than
255 objects must be 16-bit, which BMP cannot hold; see ``deconver.data.instances``). The official subset comes from the name prefix. The
annotation is an instance map (0 background, one integer per gland): the target is anno > 0 and the
instances stay available for object-level metrics. Grade.csv's headers and values carry leading spaces
and its line endings may be CR-only; both are normalised.
"""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from deconver.data.readers._common import rgb_root, unique_cases, walk_files
from deconver.data.records import Case, DatasetError

# the official files are BMP; PNG and TIFF too, so that instance maps with more than 255 objects can be
# 16-bit (an 8-bit map holds ids up to 255: deconver.data.instances)
_FILE_RE = re.compile(r"^(train|testa|testb)_(\d+)(_anno)?\.(bmp|png|tiff?)$", re.IGNORECASE)
_SUBSETS = {"train": "train", "testa": "testA", "testb": "testB"}


def read_grade_csv(path: Path) -> dict[str, dict[str, str]]:
    """name -> {column: value} from GlaS' Grade.csv (spaces stripped, any line ending)."""
    try:
        text = path.read_bytes().decode("utf-8-sig", errors="replace")
    except OSError as err:
        raise DatasetError(f"{path}: cannot read: {err}") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    rows = [[cell.strip() for cell in row] for row in csv.reader(io.StringIO(text)) if any(c.strip() for c in row)]
    if not rows or not rows[0] or rows[0][0].lower() != "name":
        raise DatasetError(f"{path}: expected a header starting with 'name', got {rows[0] if rows else 'nothing'}")
    header = rows[0]
    out = {}
    for row in rows[1:]:
        if len(row) != len(header):
            raise DatasetError(f"{path}: row {row} has {len(row)} fields, the header {len(header)}")
        out[row[0]] = dict(zip(header[1:], row[1:]))
    return out


def read_glas(root: Path, channels: list[str], *, require_label: bool = True) -> list[Case]:
    """Case records of a GlaS root; channels must be the three RGB channels."""
    root, synthetic = rgb_root(root, channels, "glas")
    images: dict[str, Path] = {}
    annos: dict[str, Path] = {}
    grades: dict[str, dict[str, str]] = {}
    for path in walk_files(root):
        if path.name.lower() == "grade.csv":
            grades.update(read_grade_csv(path))
            continue
        m = _FILE_RE.match(path.name)
        if not m:
            continue
        case_id = f"{_SUBSETS[m.group(1).lower()]}_{int(m.group(2))}"
        table = annos if m.group(3) else images
        if case_id in table:
            raise DatasetError(f"duplicate case id {case_id!r}: {table[case_id]} and {path}")
        table[case_id] = path
    if not images:
        raise DatasetError(f"no GlaS images (train_N.bmp, testA_N.bmp, testB_N.bmp) found under {root}")
    orphans = sorted(set(annos) - set(images))
    if orphans:
        raise DatasetError(f"annotation without image: {annos[orphans[0]]}")
    cases = []
    for case_id, image in images.items():
        label = annos.get(case_id)
        if label is None and require_label:
            raise DatasetError(f"case {case_id}: missing annotation {image.with_name(image.stem + '_anno' + image.suffix)}")
        grade = grades.get(case_id, {})
        meta = {"format": "image2d", "spacing": [1.0, 1.0], "label_encoding": "instances", "synthetic": synthetic,
                "resample_channels": [], "zero_channels": [], "grade": grade}
        cases.append(Case(id=case_id, images=[image], label=label, subset=case_id.split("_")[0], meta=meta))
    return unique_cases(cases, root)
