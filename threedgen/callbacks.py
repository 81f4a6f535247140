"""Lightning callbacks of a run: a step-counted progress bar and periodic previews.

Imported only when a trainer is made, so the CLI answers bad input without importing Lightning.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.plugins.io import TorchCheckpointIO

from threedgen.checkpoints import save_checkpoint
from threedgen.rundir import RunFolder, write_status
from threedgen.views import write_image


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, counted in optimizer steps out of ``max_steps`` (right after a resume too)."""

    def __init__(self, prompt: str, refresh_rate: int = 10):
        super().__init__(refresh_rate=refresh_rate)
        self.prompt = prompt

    def on_train_epoch_start(self, trainer, *_):
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        bar.n = trainer.global_step
        bar.set_description(self.prompt[:32])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        n = trainer.global_step
        if n % self.refresh_rate == 0 or n == trainer.max_steps:
            self.train_progress_bar.n = n
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            self.train_progress_bar.refresh()


class PreviewCallback(pl.Callback):
    """Saves a two-view preview every ``preview_every`` steps (previews/latest.png too) and the
    run's status with the step reached. ``stage`` (a later stage's name, e.g. ``refine``): the
    previews are named after it and the status says it; ``run_dir`` is the run folder either way."""

    def __init__(self, run_dir: Path, cfg, stage: str | None = None):
        self.run_dir, self.cfg, self.stage = Path(run_dir), cfg, stage
        self._last = -1

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.cfg.preview_every or step == self._last:
            return
        self._last = step
        if not trainer.is_global_zero:  # one process writes the run folder
            return
        image = module.preview_image()
        folder = RunFolder(self.run_dir).previews
        folder.mkdir(exist_ok=True)
        write_image(folder / RunFolder.preview_name(step, self.stage), image)
        write_image(RunFolder(self.run_dir).latest_preview, image)
        write_status(self.run_dir, "running", step=step, max_steps=self.cfg.steps,
                     **({"stage": self.stage} if self.stage else {}))


class SafeCheckpoint(pl.Callback):
    """Every ``every`` optimizer steps: check the parameters and buffers are finite (else the
    system rolls back), save a verified ``last.ckpt`` (the previous one kept as ``prev.ckpt``) and let the
    system remember this state as its last good one."""

    def __init__(self, run_dir: Path, every: int):
        self.run_dir, self.every = Path(run_dir), every
        self._last = -1
        self.saved_step = None  # the step of the last checkpoint this callback saved

    def on_train_start(self, trainer, module):
        self._last = trainer.global_step
        module.remember_good_state()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every or step == self._last:
            return
        self._last = step
        if not module.state_finite():
            module.roll_back("parameters became non-finite")
            return
        save_checkpoint(trainer, self.run_dir)
        self.saved_step = step
        module.remember_good_state()


LOW_SPACE = 4 * 2 ** 20  # free bytes below which a failed checkpoint write is taken for a full disk


class RunFolderCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint straight to the path it is given (``save_checkpoint``'s temporary file
    beside ``last.ckpt``). Lightning's own writer stages it in the system temp folder first, where
    a killed save would leave a checkpoint-sized file and a full /tmp would fail the run."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        # A path, not a Python file object: torch's C++ writer then owns the file, and a Ctrl-C
        # arriving mid-write is raised after it (through a Python file object it breaks the zip
        # writer with a RuntimeError instead of stopping the run as an interrupt).
        failed = None
        try:
            torch.save(checkpoint, str(path))
        except RuntimeError as exc:
            failed = str(exc).strip().splitlines()[0] if str(exc).strip() else "RuntimeError"
        if failed is not None:
            # The C++ writer reports a failed write as a RuntimeError ("unexpected pos ...",
            # "iostream error"): make it the OSError it is, so a full disk fails the run with its
            # one-line "disk full" message instead of a traceback. Raised outside the except block:
            # the writer's open file, held by that exception's frames, is closed first, so the
            # space the partial file took comes back when it is removed (and status.json fits).
            folder = Path(path).parent
            full = folder.is_dir() and shutil.disk_usage(folder).free < LOW_SPACE
            raise OSError(errno.ENOSPC if full else errno.EIO,
                          "No space left on device" if full else f"the checkpoint writer failed: {failed}",
                          str(path))
