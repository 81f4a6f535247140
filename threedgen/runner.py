"""The Python entry point of a run, shared by the CLI and the web UI.

``run(cfg, out)`` validates everything that can be checked before work starts (prompt against the
prior's vocabulary, output folder writable), then trains with Lightning, exports the mesh, video
and previews, and scores the result when the prior knows the truth.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from threedgen.config import RunConfig, load_run_config, to_yaml
from threedgen.errors import UserError
from threedgen.rundir import atomic_write_text, check_writable, new_run_dir, write_status

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
    from threedgen.guidance.priors import build_prior, check_run
    from threedgen.representations import REPRESENTATION_CLASSES
    from threedgen.system import System

    check_run(cfg)
    if prior is None:
        prior = build_prior(cfg.prior, device)
    embeds = prior.encode_prompt(cfg.prompt, cfg.negative_prompt)
    representation = REPRESENTATION_CLASSES[cfg.representation.name][1](cfg.representation, device)
    guidance = GUIDANCE[cfg.guidance.name][1](cfg.guidance, prior)
    return System(cfg, prior, representation, guidance, embeds).to(device)


def make_trainer(cfg: RunConfig, run_dir: Path, device: torch.device, progress_bar: bool = True, callbacks=()):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    from threedgen.callbacks import PreviewCallback, StepProgressBar

    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step-{step:06d}",
                                 auto_insert_metric_name=False, every_n_train_steps=cfg.checkpoint_every,
                                 save_last=True, save_top_k=1)
    if progress_bar:
        callbacks = [*callbacks, StepProgressBar(cfg.prompt)]
    return pl.Trainer(
        max_steps=cfg.steps, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
        logger=CSVLogger(run_dir, name="logs", version=""), log_every_n_steps=10,
        callbacks=[checkpoint, PreviewCallback(run_dir, cfg), *callbacks],
        enable_progress_bar=progress_bar, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=run_dir, max_epochs=-1)


def run(cfg: Optional[RunConfig] = None, out: str | Path = "outputs", resume: str | Path | None = None,
        steps: Optional[int] = None, progress_bar: bool = True, callbacks=(), note: Optional[str] = None) -> Path:
    """Train, export and (where the prior has a truth) evaluate. Returns the run folder."""
    import pytorch_lightning as pl

    from threedgen.export import export_run_outputs
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
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    if resume is None:
        from threedgen.guidance.priors import check_run

        check_run(cfg)  # prompt and prior settings, before any folder is made or prior built
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
        export_seconds = time.time() - started - train_seconds
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
                 export_seconds=round(export_seconds, 2), eval_seconds=round(time.time() - started - train_seconds
                                                                             - export_seconds, 2),
                 total_seconds=round(time.time() - started, 2), mesh_faces=summary["faces"],
                 mask_iou=None if metrics is None else metrics["mask_iou"])
    return run_dir


def open_run(run_dir: str | Path):
    """(cfg, run_dir, last checkpoint) of a run folder, or a one-line UserError."""
    run_dir = Path(run_dir).expanduser().resolve()
    config_file = run_dir / CONFIG_NAME
    if not config_file.is_file():
        raise UserError(f"{str(run_dir)!r} is not a threedgen run folder (no {CONFIG_NAME})")
    cfg = load_run_config(config_file)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise UserError(f"run {str(run_dir)!r} has no checkpoint yet (checkpoints/last.ckpt)")
    return cfg, run_dir, ckpt


def _load_state(module: torch.nn.Module, ckpt: Path, device, prefix: str = "") -> None:
    try:
        state = torch.load(ckpt, map_location=device, weights_only=True)["state_dict"]
        if prefix:
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(state)
    except Exception as exc:
        raise UserError(f"checkpoint {str(ckpt)!r} cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None


def load_trained(run_dir: str | Path, device: str | None = None):
    """(cfg, system, run_dir) of a run folder with the weights of its last checkpoint."""
    quiet_libraries()
    cfg, run_dir, ckpt = open_run(run_dir)
    dev = resolve_device(device or cfg.device)
    system = build_components(cfg, dev)
    _load_state(system, ckpt, dev)
    system.eval()
    return cfg, system, run_dir


def load_representation(run_dir: str | Path, device: str | None = None):
    """(cfg, representation, run_dir): the trained 3D representation alone, without building the
    prior (exporting a Stable Diffusion run does not load Stable Diffusion)."""
    from threedgen.representations import REPRESENTATION_CLASSES

    quiet_libraries()
    cfg, run_dir, ckpt = open_run(run_dir)
    dev = resolve_device(device or cfg.device)
    representation = REPRESENTATION_CLASSES[cfg.representation.name][1](cfg.representation, dev)
    _load_state(representation, ckpt, dev, prefix="representation.")
    representation.eval()
    return cfg, representation, run_dir


def print_err(*args) -> None:
    print(*args, file=sys.stderr)
