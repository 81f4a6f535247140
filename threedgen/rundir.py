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
from typing import Optional

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


class RunFolder:
    """Every name in a run folder, in one place: no other module spells one. A run folder holds
    the merged config, the status, the metrics of an eval, the reproducibility manifest and the
    replay fingerprints, the checkpoints, the previews, Lightning's CSV log and the deliverables
    (meshes, texture, splats, turntable)."""

    CONFIG = "config.yaml"
    STATUS = "status.json"
    METRICS = "metrics.json"
    MANIFEST = "manifest.json"
    FINGERPRINTS = "fingerprints.json"
    CHECKPOINTS = "checkpoints"
    LAST_CHECKPOINT, PREVIOUS_CHECKPOINT = "last.ckpt", "prev.ckpt"
    PREVIEWS = "previews"
    FINAL_PREVIEW, LATEST_PREVIEW = "final.png", "latest.png"
    LOGS = "logs"  # Lightning's CSVLogger(name=LOGS, version=""): LOGS/CURVE
    CURVE = "metrics.csv"
    MESH = "mesh"  # mesh.glb, mesh.obj (+ mesh.mtl), mesh.ply
    TEXTURE = "mesh_texture.png"  # the OBJ's base-colour image (the GLB embeds its own copy)
    SPLATS = "splats.ply"
    VIDEO, GIF = "turntable.mp4", "turntable.gif"
    REFINE = "refine"  # stage 2's own checkpoints and log, and the mesh it started from
    REFINE_START = "start.npz"
    FAILED_REFINE = "refine-failed"  # a refinement that failed for good, set aside
    JANUS_GATE = "janus_gate.json"  # the Janus gate's attempts (threedgen run --janus-retry)

    @classmethod
    def preview_name(cls, step: int, stage: Optional[str] = None) -> str:
        """A training preview's file name in ``previews/``: ``step-000100.png``, or with the stage
        (``refine-step-000050.png``) for a later stage's."""
        return f"{stage + '-' if stage else ''}step-{step:06d}.png"

    def __init__(self, path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def _at(self, *parts: str) -> Path:
        return self.path.joinpath(*parts)

    config = property(lambda self: self._at(self.CONFIG))
    status = property(lambda self: self._at(self.STATUS))
    metrics = property(lambda self: self._at(self.METRICS))
    manifest = property(lambda self: self._at(self.MANIFEST))
    fingerprints = property(lambda self: self._at(self.FINGERPRINTS))
    checkpoints = property(lambda self: self._at(self.CHECKPOINTS))
    last_checkpoint = property(lambda self: self._at(self.CHECKPOINTS, self.LAST_CHECKPOINT))
    previews = property(lambda self: self._at(self.PREVIEWS))
    final_preview = property(lambda self: self._at(self.PREVIEWS, self.FINAL_PREVIEW))
    latest_preview = property(lambda self: self._at(self.PREVIEWS, self.LATEST_PREVIEW))
    logs = property(lambda self: self._at(self.LOGS))
    curve = property(lambda self: self._at(self.LOGS, self.CURVE))
    texture = property(lambda self: self._at(self.TEXTURE))
    splats = property(lambda self: self._at(self.SPLATS))
    video = property(lambda self: self._at(self.VIDEO))
    gif = property(lambda self: self._at(self.GIF))
    refine = property(lambda self: self._at(self.REFINE))
    refine_start = property(lambda self: self._at(self.REFINE, self.REFINE_START))
    failed_refine = property(lambda self: self._at(self.FAILED_REFINE))
    janus_gate = property(lambda self: self._at(self.JANUS_GATE))

    def mesh(self, fmt: str) -> Path:
        """``mesh.<fmt>``: glb, obj, ply, or mtl (the OBJ's material file)."""
        return self._at(f"{self.MESH}.{fmt}")

    def public_files(self) -> dict[str, Path]:
        """The deliverables a user downloads, by kind (the web UI's and the batch's download names)."""
        return {"glb": self.mesh("glb"), "obj": self.mesh("obj"), "mtl": self.mesh("mtl"), "texture": self.texture,
                "ply": self.mesh("ply"), "splats": self.splats, "video": self.video, "preview": self.final_preview,
                "metrics": self.metrics}

    def read_status(self) -> dict:
        """``status.json`` as a dict; empty when it is missing or unreadable."""
        return _read_json(self.status)

    def read_metrics(self) -> Optional[dict]:
        """``metrics.json`` (an eval's scores) as a dict; None when there is none or it is unreadable."""
        return _read_json(self.metrics) or None

    def step(self) -> int:
        """The step the status records (0 when it cannot be read)."""
        try:
            return int(self.read_status().get("step") or 0)
        except (TypeError, ValueError):
            return 0


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# Keys of status.json that describe the whole run, not one moment of it: a later write without
# them keeps the earlier value (previews, failures and interruptions do not lose them).
RUN_KEYS = ("backends", "coarse")  # coarse: stage 1's numbers once a refinement follows it


def write_status(run_dir: Path, status: str, **extra) -> None:
    """``status.json``: running / succeeded / failed / interrupted, with the step and timings, and
    the run's ``RUN_KEYS`` from the last write that gave them."""
    path = RunFolder(run_dir).status
    missing = [key for key in RUN_KEYS if key not in extra]
    if missing:
        try:
            earlier = json.loads(path.read_text())
        except (OSError, ValueError):
            earlier = {}
        extra.update({key: earlier[key] for key in missing if isinstance(earlier, dict) and key in earlier})
    atomic_write_text(path, json.dumps({"status": status, "time": time.time(), **extra}, indent=1))
