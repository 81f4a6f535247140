"""The Python entry point of a run, shared by the CLI and the web UI.

``run(cfg, out)`` validates everything that can be checked before work starts (prompt against the
prior's vocabulary, output folder writable), then trains with Lightning, exports the mesh, video
and previews, and scores the result when the prior knows the truth.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from threedgen.config import RunConfig, load_run_config, to_yaml
from threedgen.errors import UserError
from threedgen.rundir import atomic_write_text, check_writable, new_run_dir

CONFIG_NAME = "config.yaml"


def quiet_libraries() -> None:
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in (".*does not have many workers.*", ".*litlogger.*", ".*pytree.*", ".*LeafSpec.*",
                    ".*GPU available.*", ".*TPU available.*", ".*checkpoint.*callbacks.*",
                    ".*Checkpoint directory .* exists and is not empty.*", ".*upgrade.*litmodels.*",
                    ".*manual optimization and every_n_train_steps.*"):
        warnings.filterwarnings("ignore", pattern)


def resolve_device(name: str) -> torch.device:
    import re

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name or ""):
        raise UserError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} requested but CUDA is not available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def build_components(cfg: RunConfig, device: torch.device, prior=None):
    """prior, prompt embeddings, representation, guidance and the system for ``cfg``."""
    from threedgen.guidance import GUIDANCE
    from threedgen.guidance.priors import build_prior, check_prompt
    from threedgen.representations import REPRESENTATION_CLASSES
    from threedgen.system import System

    check_prompt(cfg.prior, cfg.prompt, cfg.negative_prompt)
    check_prior_cameras(cfg)
    if prior is None:
        prior = build_prior(cfg.prior, device)
    embeds = prior.encode_prompt(cfg.prompt, cfg.negative_prompt)
    representation = REPRESENTATION_CLASSES[cfg.representation.name][1](cfg.representation, device)
    guidance = GUIDANCE[cfg.guidance.name][1](cfg.guidance, prior)
    return System(cfg, prior, representation, guidance, embeds).to(device)


def check_prior_cameras(cfg: RunConfig) -> None:
    """The shapes prior's images were rendered at one distance and field of view: the training
    cameras must use the same ones."""
    p, c = cfg.prior, cfg.camera
    if cfg.prior.name == "shapes":
        if tuple(c.distance_range) != (p.distance, p.distance) or tuple(c.fovy_range) != (p.fovy, p.fovy):
            raise UserError(f"the shapes prior sees the object from distance {p.distance} with fovy {p.fovy}; "
                            f"set camera.distance_range=[{p.distance},{p.distance}] and "
                            f"camera.fovy_range=[{p.fovy},{p.fovy}] (or change prior.distance/prior.fovy)")


class _StepProgressBar:
    """Lightning's tqdm bar, counted in optimizer steps out of ``max_steps`` (right after a resume too)."""

    def __new__(cls, prompt: str):
        from pytorch_lightning.callbacks import TQDMProgressBar

        class StepProgressBar(TQDMProgressBar):
            def on_train_epoch_start(self, trainer, *_):
                bar = self.train_progress_bar
                bar.reset(total=trainer.max_steps)
                bar.n = trainer.global_step
                bar.set_description(prompt[:32])

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                n = trainer.global_step
                if n % self.refresh_rate == 0 or n == trainer.max_steps:
                    self.train_progress_bar.n = n
                    self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
                    self.train_progress_bar.refresh()

        return StepProgressBar(refresh_rate=10)


class _PreviewCallback:
    """Saves a front-view preview every ``preview_every`` steps (previews/latest.png too)."""

    def __new__(cls, *args, **kwargs):
        import pytorch_lightning as pl

        class PreviewCallback(pl.Callback):
            def __init__(self, run_dir: Path, cfg: RunConfig):
                self.run_dir, self.cfg = run_dir, cfg

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                step = trainer.global_step
                if step % self.cfg.preview_every or step == getattr(self, "_last", -1):
                    return
                self._last = step
                from threedgen.cameras import Cameras
                from threedgen.export import render_views, write_image
                import numpy as np

                c = self.cfg.camera
                cams = Cameras.from_angles([20.0, 20.0], [0.0, 90.0], float(np.mean(c.distance_range)),
                                           float(np.mean(c.fovy_range))).to(module.device)
                rgb, _ = render_views(module.representation, cams, 128)
                image = np.concatenate(list(rgb), axis=1)
                folder = self.run_dir / "previews"
                folder.mkdir(exist_ok=True)
                write_image(folder / f"step-{step:06d}.png", image)
                write_image(folder / "latest.png", image)
                write_status(self.run_dir, "running", step=step, max_steps=self.cfg.steps)

        return PreviewCallback(*args, **kwargs)


def write_status(run_dir: Path, status: str, **extra) -> None:
    atomic_write_text(Path(run_dir) / "status.json",
                      json.dumps({"status": status, "time": time.time(), **extra}, indent=1))


def make_trainer(cfg: RunConfig, run_dir: Path, device: torch.device, progress_bar: bool = True, callbacks=()):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step-{step:06d}",
                                 auto_insert_metric_name=False, every_n_train_steps=cfg.checkpoint_every,
                                 save_last=True, save_top_k=1)
    if progress_bar:
        callbacks = [*callbacks, _StepProgressBar(cfg.prompt)]
    return pl.Trainer(
        max_steps=cfg.steps, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
        logger=CSVLogger(run_dir, name="logs", version=""), log_every_n_steps=10,
        callbacks=[checkpoint, _PreviewCallback(run_dir, cfg), *callbacks],
        enable_progress_bar=progress_bar, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=run_dir, max_epochs=-1)


def run(cfg: Optional[RunConfig] = None, out: str | Path = "outputs", resume: str | Path | None = None,
        steps: Optional[int] = None, progress_bar: bool = True, callbacks=(), note: Optional[str] = None) -> Path:
    """Train, export and (where the prior has a truth) evaluate. Returns the run folder."""
    import pytorch_lightning as pl

    from threedgen.export import export_run_outputs
    from threedgen.guidance.priors import resolve_prior_name
    from threedgen.system import CameraDataModule
    from threedgen.cameras import CameraSampler

    quiet_libraries()
    ckpt_path = None
    if resume is not None:
        run_dir = Path(resume).expanduser().resolve()
        config_file = run_dir / CONFIG_NAME
        if not config_file.is_file():
            raise UserError(f"{str(run_dir)!r} is not a threedgen run folder (no {CONFIG_NAME})")
        cfg = load_run_config(config_file, flags={"steps": steps} if steps is not None else None)
        last = run_dir / "checkpoints" / "last.ckpt"
        ckpt_path = str(last) if last.is_file() else None
        check_writable(run_dir)
    assert cfg is not None
    device = resolve_device(cfg.device)
    cfg.prior.name, auto_note = resolve_prior_name(cfg.prior.name, device)
    note = note or auto_note
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    if resume is None:
        from threedgen.guidance.priors import check_prompt

        check_prompt(cfg.prior, cfg.prompt, cfg.negative_prompt)  # before any folder is made
        check_writable(Path(out))
    if note:
        print_err(f"threedgen: {note}")
    system = build_components(cfg, device)
    if resume is None:
        run_dir = new_run_dir(Path(out), cfg.prompt)
    atomic_write_text(run_dir / CONFIG_NAME, to_yaml(cfg))
    write_status(run_dir, "running", step=None if resume else 0, max_steps=cfg.steps)
    started = time.time()
    trainer = None
    try:
        trainer = make_trainer(cfg, run_dir, device, progress_bar, callbacks)
        try:
            trainer.fit(system, datamodule=CameraDataModule(CameraSampler(cfg.camera, cfg.seed)), ckpt_path=ckpt_path)
        except SystemExit:
            # Lightning turns Ctrl-C into a graceful stop and sys.exit(1), leaving SIGINT ignored.
            if not trainer.interrupted:
                raise
            import signal

            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt(f"continue with: threedgen run --resume {run_dir}") from None
        trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")
        train_seconds = time.time() - started
        system.representation.eval()
        summary = export_run_outputs(system.representation, cfg, run_dir)
        metrics = None
        if cfg.export.evaluate and system.prior.truth(cfg.prompt) is not None:
            from threedgen.evaluate import evaluate_run

            metrics = evaluate_run(run_dir, system=system)
    except KeyboardInterrupt:
        write_status(run_dir, "interrupted", max_steps=cfg.steps,
                     step=int(trainer.global_step) if trainer is not None else None)
        raise
    except BaseException as exc:
        write_status(run_dir, "failed", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise
    write_status(run_dir, "succeeded", step=int(trainer.global_step), max_steps=cfg.steps,
                 skipped_steps=system.skipped_steps, train_seconds=round(train_seconds, 2),
                 total_seconds=round(time.time() - started, 2), mesh_faces=summary["faces"],
                 mask_iou=None if metrics is None else metrics["mask_iou"])
    return run_dir


def load_trained(run_dir: str | Path, device: str | None = None):
    """(cfg, system) of a run folder with the weights of its last checkpoint."""
    quiet_libraries()
    run_dir = Path(run_dir).expanduser().resolve()
    config_file = run_dir / CONFIG_NAME
    if not config_file.is_file():
        raise UserError(f"{str(run_dir)!r} is not a threedgen run folder (no {CONFIG_NAME})")
    cfg = load_run_config(config_file)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise UserError(f"run {str(run_dir)!r} has no checkpoint yet (checkpoints/last.ckpt)")
    dev = resolve_device(device or cfg.device)
    system = build_components(cfg, dev)
    try:
        state = torch.load(ckpt, map_location=dev, weights_only=True)
        system.load_state_dict(state["state_dict"])
    except Exception as exc:
        raise UserError(f"checkpoint {str(ckpt)!r} cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    system.eval()
    return cfg, system, run_dir


def print_err(*args) -> None:
    print(*args, file=sys.stderr)
