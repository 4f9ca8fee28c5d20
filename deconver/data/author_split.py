"""The authors' published folds (`split: authors`): their ids mapped onto each reader's case ids.

The Deconver authors ship one fold assignment per dataset with every model bundle (the ``fold`` field of
``configs/datalist.json`` in github.com/pashtari/factorizer, Apache-2.0); ``author_folds/<reader>.json``
holds it as ``{"dataset", "source", "num_folds", "folds": {authors' id: fold}}`` (attribution in
``author_folds/NOTICE``). The authors spell ids their own way; `case_id` maps one onto a reader's id:

* ISLES'22 ``sub-strokecase0001_ses-0001`` → ``sub-strokecase0001`` (the reader drops the session of a
  single-session subject) or the id itself;
* BraTS'23 ``BraTS-GLI-00000-000`` → the same;
* FIVES ``train/Original_1_A`` (``<subset>/Original_<file stem>``) → ``train_1_A``.

Every case of the data must have a fold and every id of the file a case: otherwise `author_folds` fails
naming up to 10 ids of each side.
"""
from __future__ import annotations

import json
from pathlib import Path

from deconver.data.records import DatasetError

AUTHOR_FOLDS_DIR = Path(__file__).resolve().parent / "author_folds"
SHOWN = 10  # ids named in an error message, per side


def available() -> list[str]:
    """Readers with a shipped fold file."""
    return sorted(p.stem for p in AUTHOR_FOLDS_DIR.glob("*.json"))


def load_author_folds(reader: str) -> dict:
    """The shipped fold file of a reader (isles22, brats23, fives), checked."""
    path = AUTHOR_FOLDS_DIR / f"{reader}.json"
    if not path.is_file():
        raise DatasetError(f"no fold file of the authors for reader {reader!r} (none at {path}); "
                           f"they exist for {available()}: use split kfold for this dataset")
    data = json.loads(path.read_text())
    bad = {k: v for k, v in data["folds"].items() if not (isinstance(v, int) and 0 <= v < data["num_folds"])}
    if bad:
        raise DatasetError(f"{path}: folds outside 0..{data['num_folds'] - 1}: {sorted(bad)[:SHOWN]}")
    return data


def case_id(reader: str, author_id: str, known: set[str] | frozenset[str] = frozenset()) -> str:
    """The reader's case id of one of the authors' ids (`known`: the case ids of the data, for ISLES'22)."""
    if reader == "fives":
        subset, sep, rest = author_id.partition("/Original_")
        return f"{subset}_{rest}" if sep else author_id
    if reader == "isles22" and author_id not in known:
        subject = author_id.split("_ses-")[0]
        if subject in known:
            return subject
    return author_id


def _listing(ids: list[str]) -> str:
    shown = ", ".join(ids[:SHOWN])
    return shown + (f" … ({len(ids)} in all)" if len(ids) > SHOWN else "")


def author_assignment(reader: str, case_ids: list[str]) -> tuple[dict[str, int], dict]:
    """({case id: fold} for every case, the fold file); fails naming ids missing on either side."""
    data = load_author_folds(reader)
    known = set(case_ids)
    mapped: dict[str, int] = {}
    for aid, fold in data["folds"].items():
        mapped[case_id(reader, aid, known)] = fold
    not_in_file = sorted(known - set(mapped))
    not_in_data = sorted(a for a in data["folds"] if case_id(reader, a, known) not in known)
    if not_in_file or not_in_data:
        parts = []
        if not_in_file:
            parts.append(f"{len(not_in_file)} case(s) of the data have no fold in the authors' file: "
                         f"{_listing(not_in_file)}")
        if not_in_data:
            parts.append(f"{len(not_in_data)} id(s) of the authors' file are not in the data: {_listing(not_in_data)}")
        raise DatasetError(f"split 'authors' ({AUTHOR_FOLDS_DIR / (reader + '.json')}, {data['source']}): "
                           + "; ".join(parts) + ". The authors' folds need the complete dataset; use split kfold "
                           "for a subset")
    return mapped, data


def author_folds(reader: str, case_ids: list[str], num_folds: int) -> list[dict]:
    """[{"fold": k, "train": [ids], "val": [ids]}] of the authors' assignment (ids sorted)."""
    assignment, data = author_assignment(reader, case_ids)
    if num_folds != data["num_folds"]:
        raise DatasetError(f"split 'authors': the authors' {reader} folds are {data['num_folds']}, "
                           f"the study asks for num_folds={num_folds}")
    folds = []
    for k in range(num_folds):
        val = sorted(c for c, f in assignment.items() if f == k)
        train = sorted(c for c, f in assignment.items() if f != k)
        folds.append({"fold": k, "train": train, "val": val})
    return folds
