"""Small I/O helpers every step uses: atomic writes, the provenance header, reading a step's last record."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

from deconver import __version__


# errno values of an output that cannot be written for lack of space, or of permission
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    An interrupted or failing writer leaves `path` untouched (old content or absent), never half-written.
    The temporary name keeps the suffix(es) so libraries that infer the format from it still work.
    A full disk or a read-only folder is raised as an OSError that names `path` (`output_problem`).
    """
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        suffix = "".join(path.suffixes)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name.removesuffix(suffix)}.", suffix=f".tmp{suffix}",
                                   dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        tmp_path.chmod(0o666 & ~umask)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp_path, path)
    except OSError as err:
        if err.errno in NO_SPACE + NOT_WRITABLE:
            raise OSError(err.errno, os.strerror(err.errno), str(path)) from err
        if err.errno is None and _disk_full(path.parent):  # numpy: "N requested and M written"
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err
        raise
    except RuntimeError as err:  # torch.save reports a failed write as RuntimeError ("file write failed", ...)
        if _disk_full(path.parent):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err
        raise
    finally:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)


def _disk_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def output_problem(err: BaseException) -> str | None:
    """One line saying which output could not be written and what to do, for a full disk or a read-only
    (or not permitted) folder; None for any other error."""
    if not isinstance(err, OSError) or err.errno not in NO_SPACE + NOT_WRITABLE:
        return None
    where = err.filename or "an output file"
    if err.errno in NO_SPACE:
        return (f"no space left on the device while writing {where}: free some space there (or set results_dir "
                "to a larger disk) and rerun the same command; finished work is kept and interrupted work resumes")
    folder = Path(where).parent if err.filename else "the results folder"
    return (f"cannot write {where} ({err.strerror}): make {folder} writable (or set results_dir to a writable "
            "folder) and rerun the same command")


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def git_commit() -> str | None:
    """The commit of the source tree the package runs from (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def device_name(device: str | None = None) -> str:
    """A human-readable name of the compute device (GPU model, or the CPU)."""
    import torch

    if (device is None or str(device).startswith("cuda")) and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device or "cuda"))
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def provenance(device: str | None = None) -> dict[str, Any]:
    """What produced a result file: package version, git commit, torch version, device."""
    import torch

    return {
        "deconver_version": __version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": device_name(device),
    }


def read_record(path: str | Path) -> dict | None:
    """The JSON object a step wrote at `path` (a record, a sidecar, a manifest); None when it is absent,
    unreadable or not an object: what every "already done" check starts from."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def inputs_digest(files: list[Path], options: dict, label=str) -> str:
    """sha256 of `options` (JSON) and of every file's label (`label(path)`) and bytes: what a step's
    "already done" check compares with the digest its last output recorded."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    for f in files:
        h.update(label(Path(f)).encode())
        h.update(Path(f).read_bytes())
    return h.hexdigest()


def already_done(record: Path, digest: str, outputs: list[Path], *, touch: Path | None = None) -> dict | None:
    """The JSON `record` a step wrote last, when it holds `digest` under ``inputs_digest`` and every one of
    `outputs` exists (the step is done: `touch`, default `record`, is made newer than the inputs again so
    make-like tools agree, and the record comes back with ``_up_to_date``); else None."""
    if not all(Path(o).is_file() for o in outputs):
        return None
    old = read_record(record)
    if old is None or old.get("inputs_digest") != digest:
        return None
    os.utime(touch or record)
    old["_up_to_date"] = True
    return old
