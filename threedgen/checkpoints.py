"""Checkpoints that survive kills, full disks and tampered files.

A run folder keeps two checkpoints: ``checkpoints/last.ckpt`` and the one before it,
``checkpoints/prev.ckpt``. A save writes a temporary file in the same folder, flushes it to disk,
reads it back (``weights_only``, every tensor finite, the step it claims), and only then moves
``last`` to ``prev`` and the new file to ``last``. A kill at any moment therefore leaves a loadable
checkpoint; a failed save (disk full) leaves both old ones as they were.

Loading goes through :func:`read_checkpoint` only: the file must lie inside the run folder (no
symlink out of it), and ``torch.load(weights_only=True)`` refuses pickles that would run code. A
checkpoint that fails to load is set aside as ``*.corrupt`` and the previous one is used.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from threedgen.errors import UserError
from threedgen.rundir import RunFolder, atomic_path

FOLDER = RunFolder.CHECKPOINTS
LAST, PREV = RunFolder.LAST_CHECKPOINT, RunFolder.PREVIOUS_CHECKPOINT


class CorruptCheckpoint(Exception):
    """A checkpoint file that cannot be used; the message says why."""


def checkpoint_paths(run_dir: Path) -> tuple[Path, Path]:
    folder = Path(run_dir) / FOLDER
    return folder / LAST, folder / PREV


def read_checkpoint(path: Path, run_dir: Path, map_location="cpu") -> dict:
    """The checkpoint's dict, or CorruptCheckpoint: outside the run folder, unreadable, not a
    Lightning checkpoint of this program, carrying code, or holding a non-finite tensor."""
    path, run_dir = Path(path), Path(run_dir).resolve()
    real = path.resolve()
    if not real.is_relative_to(run_dir):
        raise CorruptCheckpoint(f"{path.name} points outside the run folder ({real}); refused")
    if not real.is_file():
        raise CorruptCheckpoint(f"{path.name} is missing")
    if real.stat().st_size == 0:
        raise CorruptCheckpoint(f"{path.name} is empty")
    try:
        ckpt = torch.load(real, map_location=map_location, weights_only=True)
    except (OSError, MemoryError):
        raise  # the disk or the machine, not the file: never set a checkpoint aside for that
    except Exception as exc:  # weights_only: no code ran; damaged bytes fail in many ways (IndexError too)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CorruptCheckpoint(f"{path.name} cannot be read ({type(exc).__name__}: {first})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict) or "global_step" not in ckpt:
        raise CorruptCheckpoint(f"{path.name} is not a threedgen checkpoint (no state_dict / global_step)")
    bad = [k for k, v in ckpt["state_dict"].items() if torch.is_tensor(v) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise CorruptCheckpoint(f"{path.name} holds non-finite values in {bad[0]}")
    return ckpt


def remove_stale_temporaries(run_dir: Path) -> None:
    """Temporary files a killed save left behind (``.last-*.ckpt``)."""
    folder = Path(run_dir) / FOLDER
    if folder.is_dir():
        for tmp in folder.glob(".*.ckpt"):
            tmp.unlink(missing_ok=True)


def choose_checkpoint(run_dir: Path, warn: Callable[[str], None] = lambda msg: None,
                      repair: bool = False) -> Optional[Path]:
    """The checkpoint to load: ``last.ckpt``, else (said through ``warn``) ``prev.ckpt``; None when
    the run never saved one; UserError when every checkpoint it has (or had) is unusable.
    ``repair`` (resuming, the only writer of the folder then) removes temporary files a killed
    save left and renames an unusable checkpoint ``*.corrupt`` so that later saves do not rotate
    it in; without it (export, eval, which may run beside a live run) nothing is changed."""
    if repair:
        remove_stale_temporaries(run_dir)
    reasons = []
    for path in checkpoint_paths(run_dir):
        if not path.exists() and not path.is_symlink():
            continue
        try:
            step = read_checkpoint(path, run_dir)["global_step"]
        except CorruptCheckpoint as exc:
            reasons.append(str(exc))
            if repair:
                set_aside(path)
            continue
        if reasons:
            warn(f"{'; '.join(reasons)}; using {path.name} (step {step}) instead")
        return path
    folder = Path(run_dir) / FOLDER
    if not reasons:  # a later look at a run whose damaged checkpoints were set aside before
        reasons = [f"{p.name} was set aside earlier as unusable" for p in sorted(folder.glob("*.corrupt"))]
    if reasons:
        raise UserError(f"no usable checkpoint in {str(folder)!r}: {'; '.join(reasons)}; remove that folder to "
                        "start the run again from step 0")
    return None


def set_aside(path: Path) -> None:
    try:
        os.replace(path, path.with_name(path.name + ".corrupt"))
    except OSError:
        pass


def save_checkpoint(trainer, run_dir: Path) -> Path:
    """Save the trainer's state as ``last.ckpt`` (the old one becomes ``prev.ckpt``), verified
    before it replaces anything. OSError (disk full, folder gone) leaves the old files intact."""
    last, prev = checkpoint_paths(run_dir)
    if not trainer.is_global_zero:
        # Under DDP every process takes part in a save (Lightning gathers the state and waits for
        # all of them) and the first one writes; the others have nothing to verify or rotate.
        trainer.save_checkpoint(last.parent / ".unwritten.ckpt", weights_only=False)
        return last
    last.parent.mkdir(exist_ok=True)
    with atomic_path(last) as tmp:
        try:
            trainer.save_checkpoint(tmp, weights_only=False)  # all state; RunFolderCheckpointIO writes it here
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        except OSError as exc:  # name the checkpoint, not its temporary file
            raise OSError(exc.errno, exc.strerror or str(exc), str(last)) from exc
        try:
            step = read_checkpoint(tmp, run_dir)["global_step"]
        except CorruptCheckpoint as exc:
            raise OSError(f"the checkpoint just written does not read back: {exc}") from None
        if step != trainer.global_step:
            raise OSError(f"the checkpoint just written holds step {step}, not {trainer.global_step}")
        if last.is_file():
            _keep_as(last, prev)  # last.ckpt stays in place until the new one replaces it
    _fsync_dir(last.parent)  # the renames survive a power cut too
    return last


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _keep_as(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:  # a filesystem without hard links
            shutil.copyfile(src, tmp)
