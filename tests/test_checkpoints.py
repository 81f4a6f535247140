"""Checkpoints, skipped steps and rollbacks under faults a user meets: a save that writes a bad
file, a writer killed at a byte offset, a checkpoint holding inf, a disk that fails while reading,
a full or read-only filesystem (real tmpfs mounts where this machine allows them), bad steps
scattered through a run, two rollbacks, a resume after a rollback.

Every assertion is on what a user would see: the files left in the run folder, the step a resume
continues from, the counts in ``status.json``, the learning rates, the exit code and its line."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_bad_inputs import TINY, NaNSteps, cli, status_of, tiny_run
from test_system import FlakyPrior, _system

from threedgen.cameras import CameraSampler
from threedgen.checkpoints import (
    CorruptCheckpoint,
    checkpoint_paths,
    choose_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from threedgen.errors import UserError
from threedgen.rundir import write_status
from threedgen.system import CameraDataModule, DivergedError


# ---- helpers -----------------------------------------------------------------------------------
def _ckpt(step: int, value: float = 1.0, size: int = 16) -> dict:
    return {"state_dict": {"w": torch.full((size,), float(value))}, "global_step": step}


def _run_folder(tmp_path: Path, steps=(2, 4)) -> Path:
    """A run folder whose ``prev.ckpt`` and ``last.ckpt`` hold the given steps."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    last, prev = checkpoint_paths(run_dir)
    torch.save(_ckpt(steps[0]), prev)
    torch.save(_ckpt(steps[1]), last)
    return run_dir


def _bytes(run_dir: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "checkpoints").iterdir())}


class FakeTrainer:
    """What ``save_checkpoint`` needs of a Lightning trainer; ``write`` puts bytes at the path."""

    is_global_zero = True

    def __init__(self, step: int, write):
        self.global_step, self.write = step, write

    def save_checkpoint(self, path, weights_only=False):
        self.write(Path(path))


def _fit(cfg, system, trainer):
    trainer.fit(system, datamodule=CameraDataModule(CameraSampler(cfg.camera, 0)))


def _lrs(system) -> list[float]:
    return [g["lr"] for opt in system.named_optimizers().values() for g in opt.param_groups]


# ---- saving ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["truncated", "wrong-step", "inf", "not-a-checkpoint"])
def test_a_save_that_writes_a_bad_file_replaces_nothing(tmp_path, bad):
    """The writer returns normally but the file is bad: the read-back refuses it, ``last`` and
    ``prev`` keep their bytes, and no temporary file stays behind."""
    run_dir = _run_folder(tmp_path)
    before = _bytes(run_dir)

    def write(path):
        if bad == "truncated":
            torch.save(_ckpt(6, size=4096), path)
            path.write_bytes(path.read_bytes()[:3000])
        elif bad == "wrong-step":
            torch.save(_ckpt(5), path)
        elif bad == "inf":
            torch.save(_ckpt(6, value=float("inf")), path)
        else:
            torch.save({"weights": torch.ones(3)}, path)

    with pytest.raises(OSError, match="the checkpoint just written"):
        save_checkpoint(FakeTrainer(6, write), run_dir)
    assert _bytes(run_dir) == before


def test_a_good_save_moves_last_to_prev(tmp_path):
    run_dir = _run_folder(tmp_path)
    old_last = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    assert save_checkpoint(FakeTrainer(6, lambda p: torch.save(_ckpt(6), p)), run_dir) == run_dir / "checkpoints" / "last.ckpt"
    after = _bytes(run_dir)
    assert set(after) == {"last.ckpt", "prev.ckpt"} and after["prev.ckpt"] == old_last
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt", run_dir)["global_step"] == 6


def test_a_failed_write_names_the_checkpoint_and_leaves_both(tmp_path):
    run_dir = _run_folder(tmp_path)
    before = _bytes(run_dir)

    def write(path):
        path.write_bytes(b"PK\x03\x04half")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with pytest.raises(OSError) as info:
        save_checkpoint(FakeTrainer(6, write), run_dir)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(run_dir / "checkpoints" / "last.ckpt")
    assert info.value.strerror == "No space left on device"  # the reason as the disk gave it
    assert _bytes(run_dir) == before


KILLED_SAVE = r"""
import io, os, signal, sys
from pathlib import Path
import torch
from threedgen.checkpoints import save_checkpoint

run_dir, offset = Path(sys.argv[1]), int(sys.argv[2])

class Trainer:
    is_global_zero, global_step = True, 6
    def save_checkpoint(self, path, weights_only=False):
        buf = io.BytesIO()
        torch.save({"state_dict": {"w": torch.ones(4096)}, "global_step": 6}, buf)
        with open(path, "wb") as fh:
            fh.write(buf.getvalue()[:offset])
            fh.flush()
            os.fsync(fh.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

save_checkpoint(Trainer(), run_dir)
"""


@pytest.mark.parametrize("offset", [0, 512, 9000])
def test_a_save_killed_at_a_byte_offset_leaves_the_last_checkpoint(tmp_path, offset):
    """A real SIGKILL of the writing process mid-file: ``last.ckpt`` (step 4) and ``prev.ckpt``
    are untouched, the partial file is only a temporary, and a resume removes it and continues
    from step 4."""
    run_dir = _run_folder(tmp_path)
    before = _bytes(run_dir)
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(run_dir), str(offset)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    partial = sorted((run_dir / "checkpoints").glob(".last-*.ckpt"))
    assert len(partial) == 1 and partial[0].stat().st_size == offset
    assert {k: v for k, v in _bytes(run_dir).items() if not k.startswith(".")} == before
    chosen = choose_checkpoint(run_dir, repair=True)
    assert chosen == run_dir / "checkpoints" / "last.ckpt"
    assert read_checkpoint(chosen, run_dir)["global_step"] == 4
    assert _bytes(run_dir) == before  # the temporary is gone, nothing else changed


# ---- loading -----------------------------------------------------------------------------------
def test_a_checkpoint_holding_inf_is_set_aside_and_prev_used(tmp_path):
    run_dir = _run_folder(tmp_path)
    torch.save(_ckpt(4, value=float("inf")), run_dir / "checkpoints" / "last.ckpt")
    with pytest.raises(CorruptCheckpoint, match="last.ckpt holds non-finite values in w"):
        read_checkpoint(run_dir / "checkpoints" / "last.ckpt", run_dir)
    warnings = []
    assert choose_checkpoint(run_dir, warn=warnings.append) == run_dir / "checkpoints" / "prev.ckpt"
    assert warnings == ["last.ckpt holds non-finite values in w; using prev.ckpt (step 2) instead"]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()  # without repair (export, eval): nothing renamed
    assert choose_checkpoint(run_dir, repair=True) == run_dir / "checkpoints" / "prev.ckpt"
    assert sorted(_bytes(run_dir)) == ["last.ckpt.corrupt", "prev.ckpt"]


def test_no_usable_checkpoint_is_one_error_that_says_what_to_do(tmp_path):
    run_dir = _run_folder(tmp_path)
    for path in checkpoint_paths(run_dir):
        path.write_bytes(b"\x00" * 10)
    with pytest.raises(UserError, match=r"no usable checkpoint .*last.ckpt cannot be read .*prev.ckpt cannot be "
                                        r"read .*remove that folder to start the run again from step 0"):
        choose_checkpoint(run_dir, repair=True)
    with pytest.raises(UserError, match="last.ckpt.corrupt was set aside earlier as unusable"):
        choose_checkpoint(run_dir)  # a later look still says why
    assert choose_checkpoint(tmp_path / "never-saved") is None


def test_a_disk_error_while_reading_is_not_a_corrupt_checkpoint(tmp_path, monkeypatch):
    """EIO from the disk is the machine's fault, not the file's: it reaches the caller and the
    checkpoint is neither set aside nor skipped for the previous one."""
    run_dir = _run_folder(tmp_path)
    before = _bytes(run_dir)

    def failing_load(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(torch, "load", failing_load)
    with pytest.raises(OSError, match="Input/output error"):
        choose_checkpoint(run_dir, repair=True)
    assert _bytes(run_dir) == before


def test_status_json_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A disk that fills up while ``status.json`` is written leaves the previous status whole."""
    write_status(tmp_path, "running", step=5, max_steps=10, backends={"field": "dense"})
    real = Path.write_text

    def half_then_full(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", half_then_full)
    with pytest.raises(OSError):
        write_status(tmp_path, "running", step=6, max_steps=10)
    monkeypatch.undo()
    assert json.loads((tmp_path / "status.json").read_text())["step"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]
    write_status(tmp_path, "failed", step=7)  # a write without the run's keys keeps them
    assert status_of(tmp_path) == {**status_of(tmp_path), "status": "failed", "step": 7,
                                   "backends": {"field": "dense"}}


# ---- skipped steps and rollbacks through the System's own step ---------------------------------
def test_scattered_bad_steps_never_add_up_to_a_rollback(tmp_path):
    """Two bad steps, a good one, two bad, ...: never three in a row, so no rollback happens
    (and none is allowed), though six steps are skipped in all."""
    prior = FlakyPrior(bad_calls={1, 2, 4, 5, 7, 8})
    cfg, system, trainer = _system(tmp_path, prior, steps=6, max_bad=3, rollbacks=0)
    _fit(cfg, system, trainer)
    assert system.skipped_steps == 6 and system.rollbacks == 0 and trainer.global_step == 6


def test_a_non_finite_gradient_skips_the_step_though_the_loss_is_finite(tmp_path):
    """The loss of every step is finite; on two steps one gradient is NaN: those steps are
    skipped and no parameter ever becomes non-finite."""
    prior = FlakyPrior(bad_calls=set())
    cfg, system, trainer = _system(tmp_path, prior, steps=4)
    param = next(system.representation.parameters())
    param.register_hook(lambda g: g * float("nan") if prior.calls in (2, 3) else g)
    losses = []
    real_optimise = system.optimise

    def optimise(loss):
        losses.append(float(loss.detach()))
        real_optimise(loss)

    system.optimise = optimise
    _fit(cfg, system, trainer)
    assert all(torch.isfinite(torch.tensor(losses))) and len(losses) == 6
    assert system.skipped_steps == 2 and trainer.global_step == 4
    assert all(bool(torch.isfinite(p).all()) for p in system.parameters())


def test_a_second_rollback_compounds_the_learning_rate_factor(tmp_path):
    """Two bad steps in a row roll back (rate x0.5); two more later roll back again: every
    learning rate ends at x0.25 of its start, not x0.5."""
    prior = FlakyPrior(bad_calls={3, 4, 9, 10})
    cfg, system, trainer = _system(tmp_path, prior, steps=8, max_bad=2, rollbacks=2)
    start = None
    real = system.configure_optimizers

    def configure():
        nonlocal start
        optimizers = real()
        start = _lrs(system)
        return optimizers

    system.configure_optimizers = configure
    _fit(cfg, system, trainer)
    assert system.rollbacks == 2 and system.lr_scale == 0.25
    assert _lrs(system) == pytest.approx([lr * 0.25 for lr in start])
    ckpt = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt", tmp_path)
    assert ckpt["threedgen"]["rollbacks"] == 2 and ckpt["threedgen"]["lr_scale"] == 0.25
    assert [g["lr"] for g in ckpt["optimizer_states"][0]["param_groups"]] == pytest.approx(
        [lr * 0.25 for lr in start])


def test_one_rollback_too_many_fails_as_diverged(tmp_path):
    prior = FlakyPrior(bad_calls={3, 4, 9, 10})
    cfg, system, trainer = _system(tmp_path, prior, steps=8, max_bad=2, rollbacks=1)
    with pytest.raises(DivergedError, match="after 1 rollback"):
        _fit(cfg, system, trainer)


def test_parameters_that_become_non_finite_are_rolled_back_never_saved(tmp_path):
    """A step that leaves a NaN in the parameters (the loss and gradients were finite): the
    checkpoint at that step is not written; the run rolls back to the last good one and goes on."""
    prior = FlakyPrior(bad_calls=set())
    cfg, system, trainer = _system(tmp_path, prior, steps=6, max_bad=2, rollbacks=1)
    rep = system.representation
    real_on_step = rep.on_step

    def poison(step, max_steps):
        real_on_step(step, max_steps)
        if step == 4 and system.rollbacks == 0:  # the step a checkpoint follows
            with torch.no_grad():
                next(rep.parameters()).view(-1)[0] = float("nan")

    rep.on_step = poison
    saved = []
    real_save = trainer.save_checkpoint

    def spy(path, weights_only=False):
        saved.append(trainer.global_step)
        real_save(path, weights_only=weights_only)

    trainer.save_checkpoint = spy
    _fit(cfg, system, trainer)
    assert system.rollbacks == 1 and trainer.global_step == 6
    assert saved == [2, 6]  # not step 4, whose parameters held the NaN
    assert all(bool(torch.isfinite(p).all()) for p in system.parameters())


# ---- through the command line: a rollback survives a resume; a failed run exits 1 -------------
def test_a_resumed_run_keeps_its_rollbacks_and_their_learning_rates(tmp_path, monkeypatch, capsys):
    """A run rolls back once (rates x0.5) and is resumed through the CLI; three bad steps in the
    resumed process roll back a second time: the count goes on (2, not 1) and the rates the
    optimizers in use end with are x0.25."""
    NaNSteps(monkeypatch, calls={9, 10, 11})
    extra = ["checkpoint_every=4", "optimizer.rollback_after=3", "optimizer.max_rollbacks=2"]
    run_dir = tiny_run(tmp_path, steps=12, extra=extra)
    assert status_of(run_dir)["rollbacks"] == 1
    monkeypatch.undo()
    NaNSteps(monkeypatch, calls={1, 2, 3})  # the resumed process's first three steps are bad
    code, out, err = cli(capsys, ["run", "--resume", run_dir, "--steps", "16", "--no-progress"])
    assert code == 0, err
    st = status_of(run_dir)
    assert st["status"] == "succeeded" and st["step"] == 16 and st["rollbacks"] == 2 and st["skipped_steps"] == 6
    ckpt = read_checkpoint(run_dir / "checkpoints" / "last.ckpt", run_dir)
    assert ckpt["threedgen"]["rollbacks"] == 2 and ckpt["threedgen"]["lr_scale"] == 0.25
    from test_bad_inputs import tiny_cfg

    from threedgen.representations.nerf import NeRF

    start = {g["name"]: g["lr"] for g in NeRF(tiny_cfg().representation).parameter_groups()}
    rates = {g["name"]: g["lr"] for g in ckpt["optimizer_states"][0]["param_groups"]}
    assert rates == pytest.approx({name: lr * 0.25 for name, lr in start.items()})


# ---- real filesystems: full and read-only (tmpfs, mounted as root) -----------------------------
def _mount_tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the disk-full and read-only cases are also injected in "
                    "tests/test_bad_inputs.py")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()})")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_full_filesystem_fails_the_run_with_exit_1_and_keeps_its_files(tmp_path, capsys):
    full = tmp_path / "full"
    _mount_tmpfs(full, "600k")
    try:
        code, out, err = cli(capsys, ["run", "--prompt", "a red cube", "--out", full, "--steps", "8",
                                      "--no-progress", *TINY, "checkpoint_every=4"])
        assert code == 1, err
        line = err.strip().splitlines()[-1]
        assert line.startswith("threedgen: error: disk full writing ") and "--resume" in line
        (run_dir,) = list(full.iterdir())
        assert status_of(run_dir)["status"] == "failed"
        assert not list(run_dir.rglob(".*")), "a temporary file was left on the full disk"
    finally:
        _umount(full)


def test_a_read_only_filesystem_refuses_a_resume_and_an_export(tmp_path, capsys):
    ro = tmp_path / "ro"
    _mount_tmpfs(ro, "64m")
    try:
        run_dir = tiny_run(ro, steps=4, extra=["checkpoint_every=4"])
        before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        code, _, err = cli(capsys, ["run", "--resume", run_dir, "--steps", "8", "--no-progress"])
        assert code == 2 and f"output folder {str(run_dir)!r} is not writable (Read-only file system)" in err
        code, _, err = cli(capsys, ["export", run_dir])
        assert code == 1 and "Read-only file system; earlier files are intact" in err, err
        assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    finally:
        _umount(ro)


# ---- what a damaged or missing checkpoint is reported as ----------------------------------------
def test_an_empty_or_unreadable_checkpoint_says_why_in_one_bounded_line(tmp_path):
    """An empty file is "empty"; bytes the loader refuses are reported with the first line of the
    loader's own reason, cut at 160 characters (torch's reasons run to several long lines)."""
    run_dir = _run_folder(tmp_path)
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(b"")
    with pytest.raises(CorruptCheckpoint) as info:
        read_checkpoint(last, run_dir)
    assert str(info.value) == "last.ckpt is empty"
    last.write_bytes(os.urandom(3000))
    try:
        torch.load(last, weights_only=True)
    except Exception as exc:  # what the loader itself says
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"
    with pytest.raises(CorruptCheckpoint) as info:
        read_checkpoint(last, run_dir)
    assert str(info.value) == f"last.ckpt cannot be read ({reason})" and "\n" not in str(info.value)
    assert len(reason) > 150  # the cut mattered: torch's first line is longer than 160 characters


def test_the_first_non_finite_tensor_is_named(tmp_path):
    run_dir = _run_folder(tmp_path)
    torch.save({"state_dict": {"a.ok": torch.ones(2), "b.inf": torch.tensor([float("inf")]),
                               "c.nan": torch.tensor([float("nan")]), "d.int": torch.ones(2, dtype=torch.long)},
                "global_step": 4}, run_dir / "checkpoints" / "last.ckpt")
    with pytest.raises(CorruptCheckpoint, match=r"^last.ckpt holds non-finite values in b.inf$"):
        read_checkpoint(run_dir / "checkpoints" / "last.ckpt", run_dir)


def test_a_missing_last_checkpoint_falls_back_to_prev(tmp_path):
    """``last.ckpt`` gone (set aside by an earlier resume) but ``prev.ckpt`` good: prev is used."""
    run_dir = _run_folder(tmp_path)
    (run_dir / "checkpoints" / "last.ckpt").unlink()
    assert choose_checkpoint(run_dir, repair=True) == run_dir / "checkpoints" / "prev.ckpt"


def test_a_corrupt_checkpoint_that_cannot_be_renamed_is_still_skipped(tmp_path, monkeypatch):
    run_dir = _run_folder(tmp_path)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"junk")

    def refuse(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", str(src))

    monkeypatch.setattr(os, "replace", refuse)
    assert choose_checkpoint(run_dir, repair=True) == run_dir / "checkpoints" / "prev.ckpt"
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == b"junk"


@pytest.mark.parametrize("quirk", ["no-hard-links", "no-directory-fsync", "no-directory-open"])
def test_saves_work_on_filesystems_with_quirks(tmp_path, monkeypatch, quirk):
    """Filesystems without hard links (some network and FAT mounts), or that refuse to fsync or open a
    folder: a save still verifies, keeps the old checkpoint as ``prev`` and replaces ``last``."""
    import stat

    run_dir = _run_folder(tmp_path)
    old_last = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    if quirk == "no-hard-links":
        def link(src, dst):
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", link)
    elif quirk == "no-directory-fsync":
        real_fsync = os.fsync

        def fsync(fd):
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "Invalid argument")
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
    else:
        real_open = os.open

        def open_(path, flags, *args, **kwargs):
            if Path(path).is_dir():
                raise OSError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", open_)
    save_checkpoint(FakeTrainer(6, lambda p: torch.save(_ckpt(6), p)), run_dir)
    monkeypatch.undo()
    after = _bytes(run_dir)
    assert set(after) == {"last.ckpt", "prev.ckpt"} and after["prev.ckpt"] == old_last
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt", run_dir)["global_step"] == 6


def test_other_processes_of_a_multi_process_run_never_touch_the_checkpoints(tmp_path):
    """Under DDP every process takes part in a save, and only the first writes the run folder's
    checkpoints."""
    run_dir = _run_folder(tmp_path)
    before = _bytes(run_dir)
    written = []
    trainer = FakeTrainer(6, written.append)
    trainer.is_global_zero = False
    assert save_checkpoint(trainer, run_dir) == run_dir / "checkpoints" / "last.ckpt"
    assert _bytes(run_dir) == before and [p.parent for p in written] == [run_dir / "checkpoints"]
    assert written[0].name.startswith(".")  # a hidden name no resume ever picks up


def test_a_rollback_returns_exactly_to_the_last_verified_checkpoint(tmp_path):
    """Good steps taken after the last checkpoint are undone too: the parameters after the
    rollback equal, tensor for tensor, those the checkpoint file on disk holds."""
    prior = FlakyPrior(bad_calls={6, 7})  # steps 5 and 6 would follow the step-4 checkpoint; 5 is good
    cfg, system, trainer = _system(tmp_path, prior, steps=6, max_bad=2, rollbacks=1)
    seen = {}
    real = system.roll_back

    def spy(reason):
        seen["file"] = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt", tmp_path)
        real(reason)
        seen["after"] = {k: v.detach().clone() for k, v in system.state_dict().items()}

    system.roll_back = spy
    _fit(cfg, system, trainer)
    assert system.rollbacks == 1 and seen["file"]["global_step"] == 4
    saved = seen["file"]["state_dict"]
    assert set(saved) == set(seen["after"])
    for key, value in saved.items():
        assert torch.equal(seen["after"][key], value), key


def test_every_optimizer_steps_once_per_step_taken(tmp_path):
    """VSD trains a fake score beside the representation: two optimizers (or more), each of which
    takes exactly one step per training step and none on a skipped one."""
    from threedgen.guidance.config import VSDConfig
    from threedgen.guidance.vsd import VSD

    prior = FlakyPrior(bad_calls={2})
    cfg, system, trainer = _system(tmp_path, prior, steps=3)
    system.guidance = VSD(VSDConfig(), prior)
    _fit(cfg, system, trainer)
    named = system.named_optimizers()
    assert len(named) >= 2 and system.skipped_steps == 1 and trainer.global_step == 3
    for name, opt in named.items():
        steps = {int(s["step"]) for s in opt.state.values() if "step" in s}
        assert steps == {3}, (name, steps)


def test_a_resumed_run_puts_back_the_cuda_generator_only_on_a_gpu(tmp_path, monkeypatch):
    """A checkpoint from a GPU run carries the CUDA generator's state beside the CPU one. Resumed
    on a GPU both are put back at the first step; resumed on the CPU the CUDA one is left alone.
    (CPU twin of the CUDA path: the device is set by hand, ``torch.cuda.set_rng_state`` recorded.)"""
    prior = FlakyPrior(bad_calls=set())
    cfg, system, trainer = _system(tmp_path, prior, steps=1)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: calls.append((state, device)))
    cpu_state, cuda_state = torch.get_rng_state(), torch.arange(8, dtype=torch.uint8)
    for device, expected in (("cpu", []), ("cuda:0", [cuda_state])):
        calls.clear()
        system._device = torch.device(device)
        system._resume_rng = (cpu_state, cuda_state)
        torch.manual_seed(123)
        system.on_train_batch_start(None, 0)
        assert torch.equal(torch.get_rng_state(), cpu_state)
        assert len(calls) == len(expected) and all(torch.equal(a, b) for (a, _), b in zip(calls, expected))
        assert system._resume_rng == (None, None)  # applied once
        system._resume_rng = (cpu_state, None)  # a CPU run's checkpoint resumed on a GPU: nothing for CUDA
        system.on_train_batch_start(None, 1)
        assert len(calls) == len(expected)
    system._device = torch.device("cpu")


def test_a_checkpoint_without_the_run_counters_resumes_with_them_at_zero(tmp_path):
    """A checkpoint of an earlier threedgen that did not record skipped steps, rollbacks or the
    rate factor: a resume starts them at 0, 0 and x1 (the CPU generator state stays as it is)."""
    prior = FlakyPrior(bad_calls=set())
    cfg, system, trainer = _system(tmp_path, prior, steps=1)
    system.skipped_steps, system.rollbacks, system.lr_scale, system.rolled_back_steps = 5, 2, 0.25, 7
    system.on_load_checkpoint({"threedgen": {"optimizers": list(system.named_optimizers())}})
    assert (system.skipped_steps, system.rollbacks, system.lr_scale, system.rolled_back_steps) == (0, 0, 1.0, 0)
    assert system._resume_rng == (None, None)


# ---- the run's status.json from start to end --------------------------------------------------
def test_status_json_through_a_run_its_phases_and_its_evaluation(tmp_path):
    """While training starts, the status says running at step 0; at the end each phase's seconds are
    between 0 and the total and add up to it; evaluation runs (metrics.json, mask IoU) only when
    ``export.evaluate`` is on."""
    import pytorch_lightning as pl

    seen = []

    class Look(pl.Callback):
        def on_train_start(self, trainer, module):
            seen.append(status_of(trainer.default_root_dir))

    run_dir = tiny_run(tmp_path / "a", steps=2, extra=["export.evaluate=true"], callbacks=[Look()])
    assert seen and {k: seen[0][k] for k in ("status", "step", "max_steps")} == {"status": "running", "step": 0,
                                                                                  "max_steps": 2}
    st = status_of(run_dir)
    phases = [st["train_seconds"], st["export_seconds"], st["eval_seconds"]]
    assert all(0 <= p <= st["total_seconds"] for p in phases), st
    assert sum(phases) == pytest.approx(st["total_seconds"], abs=0.05)
    assert (run_dir / "metrics.json").is_file() and 0 <= st["mask_iou"] <= 1
    run_dir = tiny_run(tmp_path / "b", steps=2)  # export.evaluate=false
    assert not (run_dir / "metrics.json").exists() and status_of(run_dir)["mask_iou"] is None


def test_a_failure_without_a_message_is_recorded_by_its_type(tmp_path, monkeypatch):
    from threedgen.system import System

    def broken(self, loss):
        raise RuntimeError()

    monkeypatch.setattr(System, "optimise", broken)
    with pytest.raises(RuntimeError) as info:
        tiny_run(tmp_path, steps=4)
    assert str(info.value) == ""
    (run_dir,) = list(tmp_path.iterdir())
    st = status_of(run_dir)
    assert st["status"] == "failed" and st["error"] == "RuntimeError" and st["step"] == 0


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(tmp_path, capsys):
    run_dir = tiny_run(tmp_path, steps=2, extra=["checkpoint_every=2"])
    for path in (run_dir / "checkpoints").iterdir():
        path.unlink()
    write_status(run_dir, "interrupted", step=1, max_steps=2)
    code, out, err = cli(capsys, ["run", "--resume", run_dir, "--no-progress"])
    assert code == 0, err
    st = status_of(run_dir)
    assert st["status"] == "succeeded" and st["step"] == 2


def test_after_a_rollback_the_bad_steps_in_a_row_count_from_zero(tmp_path):
    """Three bad steps in a row roll back; the bad steps right after it count afresh: two more do
    not roll back again (a), three more do (b)."""
    prior = FlakyPrior(bad_calls={3, 4, 5, 6, 7})
    cfg, system, trainer = _system(tmp_path / "a", prior, steps=6, max_bad=3, rollbacks=1)
    _fit(cfg, system, trainer)
    assert system.rollbacks == 1 and system.skipped_steps == 5
    prior = FlakyPrior(bad_calls={3, 4, 5, 6, 7, 8})
    cfg, system, trainer = _system(tmp_path / "b", prior, steps=6, max_bad=3, rollbacks=2)
    _fit(cfg, system, trainer)
    assert system.rollbacks == 2 and system.skipped_steps == 6


@pytest.mark.parametrize("guidance", ["sds", "vsd"])
def test_an_older_checkpoint_whose_optimizers_match_still_resumes(tmp_path, guidance):
    """A checkpoint written before each part owned its optimizers (no optimizer names recorded)
    loads when it holds as many optimizer states as the run has optimizers (VSD: one more, the
    fake score's), and is refused in one line otherwise."""
    prior = FlakyPrior(bad_calls=set())
    cfg, system, trainer = _system(tmp_path, prior, steps=1)
    if guidance == "vsd":
        from threedgen.guidance.config import VSDConfig
        from threedgen.guidance.vsd import VSD

        system.guidance = VSD(VSDConfig(), prior)
    count = len(system.representation.make_optimizers(tuple(cfg.optimizer.betas), cfg.optimizer.eps))
    count += 1 if system.guidance.extra_parameters() else 0
    system.on_load_checkpoint({"threedgen": {"skipped_steps": 2}, "optimizer_states": [{}] * count})
    assert system.skipped_steps == 2
    with pytest.raises(UserError, match="written by an earlier threedgen"):
        system.on_load_checkpoint({"threedgen": {}, "optimizer_states": [{}] * (count + 1)})


@pytest.mark.parametrize("free, errno_, message", [
    (4 * 2 ** 20 - 1, errno.ENOSPC, "No space left on device"),
    (4 * 2 ** 20, errno.EIO, "the checkpoint writer failed: PytorchStreamWriter failed writing file data/0: file "
                             "write failed"),
])
def test_torch_s_writer_failing_is_an_os_error_full_disk_below_4_mib(tmp_path, monkeypatch, free, errno_, message):
    """torch's C++ writer reports a failed write as a RuntimeError; the run sees the OSError it
    is: "no space" when the folder's disk has less than 4 MiB free, else the writer's first line."""
    import shutil
    from collections import namedtuple

    from threedgen.callbacks import RunFolderCheckpointIO

    def failing_save(obj, path):
        Path(path).write_bytes(b"PK partial")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed\nat inline_container.cc")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage(2 ** 30, 2 ** 30 - free, free))
    with pytest.raises(OSError) as info:
        RunFolderCheckpointIO().save_checkpoint({"state_dict": {}}, tmp_path / ".last-x.ckpt")
    assert (info.value.errno, info.value.strerror, info.value.filename) == (errno_, message,
                                                                           str(tmp_path / ".last-x.ckpt"))
