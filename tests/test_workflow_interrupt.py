"""A smoke study interrupted midway (SIGINT to Snakemake and its jobs, as Ctrl-C in a terminal) and
rerun with the same command: it completes, and the jobs that had finished before the interrupt are
not run again."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections import Counter

import pytest

from conftest import REPO_ROOT, job_stats, run_snakemake, smoke_config, snakemake_cmd, table_models, tool_env, write_study

pytestmark = pytest.mark.slow


def finished_jobs(log: str) -> list[tuple[str, list[str]]]:
    """(rule, outputs) of every job a Snakemake log reports as finished."""
    started = {}
    for m in re.finditer(r"^(?:local)?rule (\S+):\n((?:    .*\n)+)", log, re.M):
        jobid = re.search(r"jobid: (\d+)", m.group(2)).group(1)
        out = re.search(r"^    output: (.*)$", m.group(2), re.M)
        started[jobid] = (m.group(1), out.group(1).split(", ") if out else [])
    return [started[j] for j in re.findall(r"^Finished jobid: (\d+)", log, re.M) if j in started]


def test_interrupted_study_resumes_without_redoing_work(smoke_roots, tmp_path):
    work = tmp_path / "work"
    # complexity off: it has no part in resumption (the e2e and SLURM tests run it), and saves time
    study = write_study(work, smoke_config(complexity={"activate": False}), roots=smoke_roots)
    first_log = tmp_path / "first.log"
    with first_log.open("w") as log:
        # its own process group, so the interrupt reaches Snakemake and its jobs, as Ctrl-C in a terminal;
        # SIGINT back to its default action: a test run started in the background by a shell (`cmd &`)
        # inherits it ignored, and Python then installs no KeyboardInterrupt handler
        proc = subprocess.Popen(snakemake_cmd("--cores", "2", "--configfile", study, "--directory", work),
                                cwd=REPO_ROOT, env=tool_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 420
        try:
            # midway: the data prepared and two runs trained (others training), far from the report
            while time.monotonic() < deadline and proc.poll() is None:
                if first_log.read_text().count("(Rule: train)") >= 2:
                    break
                time.sleep(0.5)
            assert proc.poll() is None, "the study ended before the interrupt:\n" + first_log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no run finished in time"
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    first = first_log.read_text()
    assert proc.returncode != 0 and "Terminating processes on user request" in first
    assert not (work / "reports" / "smoke" / "report.html").exists()
    done = finished_jobs(first)
    done_rules = Counter(rule for rule, _ in done)
    assert 2 <= done_rules["train"] < 8 and done_rules["prepare"] == 4, done_rules
    stamps = {f: (work / f).stat().st_mtime_ns for _, outs in done for f in outs}

    # the same command again: only what was left runs, nothing finished is redone
    out = run_snakemake("--cores", "2", "--configfile", study, "--directory", work, timeout=600).stdout
    stats = job_stats(out)
    total = dict(prepare=4, split=4, train=8, predict=8, evaluate=8, complexity=0, aggregate=1, report=1)
    assert {rule: stats.get(rule, 0) for rule in total} == {rule: n - done_rules[rule] for rule, n in total.items()}
    assert {f: (work / f).stat().st_mtime_ns for f in stamps} == stamps
    for d in ("isles22", "brats23", "glas", "fives"):
        assert table_models(work / "reports" / "smoke" / "tables" / f"{d}.csv") == ["deconver", "unet"]
