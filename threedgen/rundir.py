"""Run folders and safe writes.

A run folder is ``<out>/<slug>-<YYYYmmdd-HHMMSS>[-n]``: the slug keeps ASCII letters and digits of
the prompt only (never separators, dots or the raw prompt), so no prompt can name a path.
Files are written to a temporary name in the same folder and renamed into place.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
import threading
import time
import unicodedata
from contextlib import contextmanager
from pathlib import Path

from threedgen.errors import UserError

# errno values of a write that failed for want of space, and of one the disk itself refused.
NO_SPACE = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
DISK_ERRORS = NO_SPACE | {errno.EROFS, errno.EIO}


def slugify(text: str, max_len: int = 40) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")[:max_len].strip("-")
    return slug or "prompt"


def check_writable(out: Path) -> Path:
    """Create ``out`` if needed and prove it is writable; UserError with the path otherwise."""
    out = Path(out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"output folder {str(out)!r} is not writable ({exc.strerror or exc})") from None
    return out.resolve()


def new_run_dir(out: Path, prompt: str) -> Path:
    out = check_writable(out)
    base = f"{slugify(prompt)}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1000):
        path = out / (base if n == 0 else f"{base}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UserError(f"could not create a run folder in {out}")


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (``/proc/self/status``);
    elsewhere set and restored under a lock."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def follow_umask(path) -> None:
    """Give a file made by ``tempfile.mkstemp`` (always 0600) the mode a plain ``open`` would have
    given it, ``0666 & ~umask``, so a teammate, a file server or a web server can read outputs as
    they read any other file of the user's."""
    os.chmod(path, 0o666 & ~current_umask())


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside ``path``; rename it into place when the block succeeds. The
    file ends with the mode the user's umask gives new files, not ``mkstemp``'s 0600."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.stem + "-", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        follow_umask(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# Keys of status.json that describe the whole run, not one moment of it: a later write without
# them keeps the earlier value (previews, failures and interruptions do not lose them).
RUN_KEYS = ("backends",)


def write_status(run_dir: Path, status: str, **extra) -> None:
    """``status.json``: running / succeeded / failed / interrupted, with the step and timings, and
    the run's ``RUN_KEYS`` from the last write that gave them."""
    path = Path(run_dir) / "status.json"
    missing = [key for key in RUN_KEYS if key not in extra]
    if missing:
        try:
            earlier = json.loads(path.read_text())
        except (OSError, ValueError):
            earlier = {}
        extra.update({key: earlier[key] for key in missing if isinstance(earlier, dict) and key in earlier})
    atomic_write_text(path, json.dumps({"status": status, "time": time.time(), **extra}, indent=1))
