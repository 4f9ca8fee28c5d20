"""The house rules of the package (HELPERS.md, "Standards"): each module's first docstring line says its
one job in one sentence, and no file of deconver/ is over 450 lines."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "deconver"
MAX_LINES = 450
MODULES = sorted(PACKAGE.rglob("*.py"))
# a sentence: starts with a capital letter, a digit, a backtick or a quote, and ends with a full stop
SENTENCE = re.compile(r"^[A-Z0-9`'\"].*\S[.]$")


def _name(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def test_there_are_modules():
    assert len(MODULES) > 50 and PACKAGE / "steps.py" in MODULES


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_first_docstring_line_is_one_sentence(path):
    doc = ast.get_docstring(ast.parse(path.read_text()), clean=False)
    assert doc, f"{_name(path)} has no module docstring"
    first = doc.splitlines()[0].strip()
    assert SENTENCE.match(first), f"{_name(path)}: the first docstring line is not a sentence: {first!r}"
    assert len(first) <= 120, f"{_name(path)}: the first docstring line is {len(first)} characters"


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_no_file_is_over_the_limit(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{_name(path)} has {lines} lines (at most {MAX_LINES})"
