"""The `deconver` command: version, help, and every pipeline step reachable."""
import subprocess
import sys

import pytest

from deconver import __version__
from deconver.cli import COMMANDS


def _run(*args):
    return subprocess.run([sys.executable, "-m", "deconver.cli", *args], capture_output=True, text=True, timeout=300)


def test_version():
    out = _run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"deconver {__version__}"


def test_help_lists_every_step():
    out = _run("--help")
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout
    assert "1 the step failed while running, 2 a usage or configuration error" in " ".join(out.stdout.split())


def test_unknown_step_fails():
    out = _run("frobnicate")
    assert out.returncode != 0 and "invalid choice" in out.stderr


@pytest.mark.parametrize("step", sorted(COMMANDS))
def test_every_step_has_help(step):
    out = _run(step, "--help")
    assert out.returncode == 0, out.stderr
    assert f"deconver {step}" in out.stdout
