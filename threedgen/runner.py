"""The Python entry point of a run, shared by the CLI and the web UI.

``run(cfg, out)`` validates everything that can be checked before work starts (prompt against the
prior's vocabulary, output folder writable), then trains with Lightning, exports the mesh, video
and previews, and scores the result when the prior knows the truth.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from threedgen.checkpoints import CorruptCheckpoint, choose_checkpoint, read_checkpoint, save_checkpoint
from threedgen.config import RunConfig, load_run_config, to_yaml
from threedgen.errors import RunFailed, UserError
from threedgen.rundir import NO_SPACE, atomic_write_text, check_writable, new_run_dir, write_status

CONFIG_NAME = "config.yaml"


def quiet_libraries() -> None:
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in (".*does not have many workers.*", ".*litlogger.*", ".*pytree.*", ".*LeafSpec.*",
                    ".*GPU available.*", ".*TPU available.*", ".*checkpoint.*callbacks.*",
                    ".*Checkpoint directory .* exists and is not empty.*", ".*upgrade.*litmodels.*",
                    ".*manual optimization and every_n_train_steps.*"):
        warnings.filterwarnings("ignore", pattern)


AUTO_DEVICE_ENV = "THREEDGEN_DEVICE"


def cuda_for_auto() -> bool:
    """Whether ``auto`` means CUDA here: a CUDA device is present and ``THREEDGEN_DEVICE`` (when
    set) does not say ``cpu``. The test suite sets ``THREEDGEN_DEVICE=cpu`` so that its runs stay on
    the CPU on a GPU machine too; CUDA tests ask for CUDA by name."""
    return os.environ.get(AUTO_DEVICE_ENV, "").strip().lower() != "cpu" and torch.cuda.is_available()


def resolve_device(name: str) -> torch.device:
    import re

    if name == "auto":
        return torch.device("cuda" if cuda_for_auto() else "cpu")
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


def trainer_devices(device: torch.device):
    """Lightning's ``devices`` for one device: its index as a list (``devices=1`` would mean the
    first visible GPU, whatever ``cuda:N`` the run asked for), or 1 on the CPU."""
    if device.type != "cuda":
        return 1
    return [device.index if device.index is not None else torch.cuda.current_device()]


def make_trainer(cfg: RunConfig, run_dir: Path, device: torch.device, progress_bar: bool = True, callbacks=()):
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    from threedgen.callbacks import PreviewCallback, RunFolderCheckpointIO, SafeCheckpoint, StepProgressBar

    if progress_bar:
        callbacks = [*callbacks, StepProgressBar(cfg.prompt)]
    return pl.Trainer(
        max_steps=cfg.steps, accelerator="gpu" if device.type == "cuda" else "cpu", devices=trainer_devices(device),
        logger=CSVLogger(run_dir, name="logs", version=""), log_every_n_steps=10,
        callbacks=[SafeCheckpoint(run_dir, cfg.checkpoint_every), PreviewCallback(run_dir, cfg), *callbacks],
        plugins=[RunFolderCheckpointIO()], enable_checkpointing=False, enable_progress_bar=progress_bar,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=run_dir, max_epochs=-1)


def run(cfg: Optional[RunConfig] = None, out: str | Path = "outputs", resume: str | Path | None = None,
        steps: Optional[int] = None, progress_bar: bool = True, callbacks=(), note: Optional[str] = None,
        device: Optional[str] = None) -> Path:
    """Train, export and (where the prior has a truth) evaluate. Returns the run folder.

    ``device`` (``cpu``, ``cuda``, ``cuda:N``) replaces the config's device: a resumed web UI job
    runs on the GPU of the worker that resumes it, not on the one that started it."""
    import pytorch_lightning as pl

    from threedgen.callbacks import SafeCheckpoint
    from threedgen.cameras import CameraSampler
    from threedgen.export import export_run_outputs
    from threedgen.system import CameraDataModule, DivergedError

    quiet_libraries()
    ckpt_path = None
    if resume is not None:
        run_dir = Path(resume).expanduser().resolve()
        config_file = run_dir / CONFIG_NAME
        if not config_file.is_file():
            raise UserError(f"{str(run_dir)!r} is not a threedgen run folder (no {CONFIG_NAME})")
        flags = {k: v for k, v in (("steps", steps), ("device", device)) if v is not None}
        cfg = load_run_config(config_file, flags=flags or None)
        check_writable(run_dir)
        chosen = choose_checkpoint(run_dir, warn=lambda msg: print_err(f"threedgen: warning: {msg}"), repair=True)
        ckpt_path = str(chosen) if chosen is not None else None
    assert cfg is not None
    if device is not None and resume is None:
        cfg.device = device
    device = resolve_device(cfg.device)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    if resume is None:
        from threedgen.guidance.priors import check_run

        check_run(cfg)  # prompt and prior settings, before any folder is made or prior built
        check_writable(Path(out))
    if note:
        print_err(f"threedgen: {note}")
    try:
        system = build_components(cfg, device)
    except RuntimeError as exc:
        failure = out_of_memory(exc, cfg, None)
        if failure is None:
            raise
        raise failure from exc
    if resume is None:
        run_dir = new_run_dir(Path(out), cfg.prompt)
    started = time.time()
    trainer = None
    try:
        atomic_write_text(run_dir / CONFIG_NAME, to_yaml(cfg))
        write_status(run_dir, "running", step=None if resume else 0, max_steps=cfg.steps,
                     backends=system.representation.backends())
        trainer = make_trainer(cfg, run_dir, device, progress_bar, callbacks)
        try:
            trainer.fit(system, datamodule=CameraDataModule(CameraSampler(cfg.camera, cfg.seed)), ckpt_path=ckpt_path,
                        weights_only=True)
        except SystemExit:
            # Lightning turns Ctrl-C into a graceful stop and sys.exit(1), leaving SIGINT ignored.
            if not trainer.interrupted:
                raise
            import signal

            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt(f"continue with: threedgen run --resume {run_dir}") from None
        # Lightning's teardown moved the module to the CPU; export renders on the run's device.
        system.to(device)
        if not system.state_finite():
            raise DivergedError("diverged: the trained parameters are not finite; nothing was exported")
        if next(c for c in trainer.callbacks if isinstance(c, SafeCheckpoint)).saved_step != trainer.global_step:
            save_checkpoint(trainer, run_dir)
        train_seconds = time.time() - started
        system.representation.eval()
        summary = export_run_outputs(system.representation, cfg, run_dir)
        export_seconds = time.time() - started - train_seconds
        metrics = None
        if cfg.export.evaluate and system.prior.truth(cfg.prompt) is not None:
            from threedgen.evaluate import evaluate_run

            metrics = evaluate_run(run_dir, system=system)
        eval_seconds = time.time() - started - train_seconds - export_seconds
        write_status(run_dir, "succeeded", step=int(trainer.global_step), max_steps=cfg.steps,
                     skipped_steps=system.skipped_steps, rollbacks=system.rollbacks,
                     rolled_back_steps=system.rolled_back_steps, train_seconds=round(train_seconds, 2),
                     export_seconds=round(export_seconds, 2), eval_seconds=round(eval_seconds, 2),
                     total_seconds=round(time.time() - started, 2), mesh_faces=summary["faces"],
                     mask_iou=None if metrics is None else metrics["mask_iou"])
    except KeyboardInterrupt:
        _try_status(run_dir, "interrupted", max_steps=cfg.steps,
                    step=int(trainer.global_step) if trainer is not None else None)
        raise
    except BaseException as exc:
        failure = as_run_failure(exc, run_dir, cfg)
        message = str(failure or exc).splitlines()[0] if str(failure or exc) else type(exc).__name__
        _try_status(run_dir, "failed", error=message,
                    step=int(trainer.global_step) if trainer is not None else None)
        if failure is not None:
            raise failure from exc
        raise
    return run_dir


def _try_status(run_dir: Path, status: str, **extra) -> None:
    """Record the outcome where the folder still takes it (it may be the thing that failed)."""
    try:
        write_status(run_dir, status, **extra)
    except OSError:
        pass


def out_of_memory(exc: BaseException, cfg: RunConfig, run_dir: Optional[Path]) -> Optional[RunFailed]:
    """A one-line RunFailed with what to lower, for an out-of-memory error; None otherwise."""
    text = str(exc).lower()
    if not (isinstance(exc, torch.OutOfMemoryError) or isinstance(exc, RuntimeError) and (
            "out of memory" in text or "can't allocate memory" in text)):
        return None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if run_dir is None:
        return RunFailed(f"out of memory building the prior and the representation on {cfg.device}; free memory "
                         "(other jobs), use a smaller model, or run with --device cpu")
    return RunFailed(f"out of memory at render.resolution={cfg.render.resolution} with camera.batch_size="
                     f"{cfg.camera.batch_size}; lower those (or {_nerf_sample_key(cfg)} for a NeRF, "
                     f"representation.max_gaussians for Gaussians) in {run_dir / CONFIG_NAME}, then continue with: "
                     f"threedgen run --resume {run_dir}")


def _nerf_sample_key(cfg: RunConfig) -> str:
    """The setting that sets a NeRF's samples per ray: the step size for nerfacc's occupancy grid
    (CUDA), the sample count for the dense sampler."""
    rep = cfg.representation
    occgrid = getattr(rep, "sampler", "dense") == "occgrid" or (
        getattr(rep, "sampler", "dense") == "auto" and resolve_device(cfg.device).type == "cuda")
    return "raise representation.render_step_size" if occgrid else "representation.num_samples"


def as_run_failure(exc: BaseException, run_dir: Path, cfg: RunConfig) -> Optional[RunFailed]:
    """A one-line RunFailed for faults of the machine (disk full, folder gone or read-only, out of
    memory), saying what to do; None for anything else (raised as it is)."""
    oom = out_of_memory(exc, cfg, run_dir)
    if oom is not None:
        return oom
    if isinstance(exc, OSError):
        where = exc.filename or run_dir
        if exc.errno in NO_SPACE:
            return RunFailed(f"disk full writing {where}; free space, then continue with: threedgen run --resume "
                             f"{run_dir} (the last checkpoint and earlier outputs are intact)")
        if not Path(run_dir).is_dir():
            return RunFailed(f"the run folder {run_dir} was deleted while the run wrote to it")
        return RunFailed(f"cannot write {where} ({exc.strerror or exc}); check the folder's permissions and space, "
                         f"then continue with: threedgen run --resume {run_dir}")
    return None


def open_run(run_dir: str | Path):
    """(cfg, run_dir, checkpoint) of a run folder (the last checkpoint, else the one before it),
    or a one-line UserError."""
    run_dir = Path(run_dir).expanduser().resolve()
    config_file = run_dir / CONFIG_NAME
    if not config_file.is_file():
        raise UserError(f"{str(run_dir)!r} is not a threedgen run folder (no {CONFIG_NAME})")
    cfg = load_run_config(config_file)
    ckpt = choose_checkpoint(run_dir, warn=lambda msg: print_err(f"threedgen: warning: {msg}"))
    if ckpt is None:
        raise UserError(f"run {str(run_dir)!r} has no checkpoint yet (checkpoints/last.ckpt)")
    return cfg, run_dir, ckpt


def _load_state(module: torch.nn.Module, ckpt: Path, run_dir: Path, device, prefix: str = "") -> None:
    try:
        state = read_checkpoint(ckpt, run_dir, map_location=device)["state_dict"]
        if prefix:
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(state)
    except (CorruptCheckpoint, RuntimeError, KeyError) as exc:
        if isinstance(exc, torch.OutOfMemoryError):
            raise
        raise UserError(f"checkpoint {str(ckpt)!r} cannot be loaded ({str(exc).splitlines()[0][:200]})") from None


def load_trained(run_dir: str | Path, device: str | None = None):
    """(cfg, system, run_dir) of a run folder with the weights of its last checkpoint."""
    quiet_libraries()
    cfg, run_dir, ckpt = open_run(run_dir)
    dev = resolve_device(device or cfg.device)
    system = build_components(cfg, dev)
    _load_state(system, ckpt, run_dir, dev)
    system.eval()
    return cfg, system, run_dir


def load_representation(run_dir: str | Path, device: str | None = None):
    """(cfg, representation, run_dir): the trained 3D representation alone, without building the
    prior (exporting a Stable Diffusion run does not load Stable Diffusion)."""
    from threedgen.representations import REPRESENTATION_CLASSES

    quiet_libraries()
    cfg, run_dir, ckpt = open_run(run_dir)
    dev = resolve_device(device or cfg.device)
    representation = REPRESENTATION_CLASSES[cfg.representation.name][1](cfg.representation, dev).to(dev)
    _load_state(representation, ckpt, run_dir, dev, prefix="representation.")
    representation.eval()
    return cfg, representation, run_dir


def print_err(*args) -> None:
    print(*args, file=sys.stderr)
