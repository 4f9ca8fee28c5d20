"""Per-case work on the cores a job has: worker processes, a progress bar, one log line per finished case.

`deconver evaluate` runs its cases through `map_cases`. With more than one worker the cases go to forked
processes (the work function and its inputs are inherited by the fork, so closures need no pickling;
only each case's result travels back). Every finished case prints one line on stderr at once, so a job's
log shows where it is (and where it stopped, if it was killed); on a terminal a tqdm bar sits below the
lines. The first error stops the remaining cases and is raised in the caller.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# (function, items) of the running map, inherited by forked workers
_JOB: tuple[Callable, Sequence] | None = None


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity set: a SLURM job's allocation, taskset …)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _run(index: int):
    fn, items = _JOB
    t0 = time.perf_counter()
    return fn(items[index]), time.perf_counter() - t0


def map_cases(fn: Callable[[T], R], items: Sequence[T], *, names: Sequence[str], workers: int | None = None,
              desc: str = "cases", unit: str = "case") -> list[R]:
    """``[fn(item) for item in items]`` on `workers` processes (default: `available_cores()`), in order.

    Logs ``<desc>: <name> done (k/n, t s)`` per finished item and a start line with the worker count.
    """
    global _JOB
    from tqdm import tqdm

    n = len(items)
    workers = max(1, min(workers or available_cores(), n))
    can_fork = "fork" in multiprocessing.get_all_start_methods()
    if not can_fork:
        workers = 1
    print(f"{desc}: {n} {unit}{'s' if n != 1 else ''} on {workers} worker{'s' if workers > 1 else ''}", file=sys.stderr,
          flush=True)
    results: list = [None] * n
    bar = tqdm(total=n, desc=desc, unit=unit, disable=None, file=sys.stderr)

    def done(index: int, result, seconds: float, k: int) -> None:
        results[index] = result
        bar.update(1)
        tqdm.write(f"{desc}: {names[index]} done ({k}/{n}, {seconds:.1f} s)", file=sys.stderr)
        sys.stderr.flush()

    try:
        if workers == 1:
            for i, item in enumerate(items):
                t0 = time.perf_counter()
                done(i, fn(item), time.perf_counter() - t0, i + 1)
            return results
        _JOB = (fn, items)
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
            pending = {pool.submit(_run, i): i for i in range(n)}
            finished = 0
            while pending:
                complete, _ = wait(pending, return_when=FIRST_EXCEPTION)
                for future in complete:
                    index = pending.pop(future)
                    error = future.exception()
                    if error is not None:
                        for other in pending:
                            other.cancel()
                        raise error
                    finished += 1
                    result, seconds = future.result()
                    done(index, result, seconds, finished)
        return results
    finally:
        _JOB = None
        bar.close()
