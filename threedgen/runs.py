"""Reading a run folder: its config, its checkpoint, and the trained representation in it.

Shared by the runner (resume), ``threedgen export`` and ``threedgen eval``; writing a run folder
is ``threedgen.rundir``'s job.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import torch

from threedgen.checkpoints import CorruptCheckpoint, choose_checkpoint, read_checkpoint
from threedgen.config import RunConfig, load_run_config
from threedgen.devices import resolve_device
from threedgen.errors import UserError
from threedgen.refine import build_mesh, read_start, refine_config, refined
from threedgen.representations.config import REPRESENTATIONS
from threedgen.rundir import RunFolder

CONFIG_NAME = RunFolder.CONFIG


def print_err(*args) -> None:
    print(*args, file=sys.stderr)


def quiet_libraries() -> None:
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in (".*does not have many workers.*", ".*litlogger.*", ".*pytree.*", ".*LeafSpec.*",
                    ".*GPU available.*", ".*TPU available.*", ".*checkpoint.*callbacks.*",
                    ".*Checkpoint directory .* exists and is not empty.*", ".*upgrade.*litmodels.*",
                    ".*manual optimization and every_n_train_steps.*"):
        warnings.filterwarnings("ignore", pattern)


def run_config(run_dir: str | Path, flags: dict | None = None) -> tuple[RunConfig, Path]:
    """(cfg, resolved folder) of a run folder, or the one-line error that it is not one."""
    run_dir = Path(run_dir).expanduser().resolve()
    config_file = run_dir / CONFIG_NAME
    if not config_file.is_file():
        raise UserError(f"{str(run_dir)!r} is not a threedgen run folder (no {CONFIG_NAME})")
    return load_run_config(config_file, flags=flags), run_dir


def warn_checkpoint(message: str) -> None:
    print_err(f"threedgen: warning: {message}")


def open_run(run_dir: str | Path):
    """(cfg, run_dir, checkpoint) of a run folder (the last checkpoint, else the one before it),
    or a one-line UserError."""
    cfg, run_dir = run_config(run_dir)
    ckpt = choose_checkpoint(run_dir, warn=warn_checkpoint)
    if ckpt is None:
        raise UserError(f"run {str(run_dir)!r} has no checkpoint yet ({RunFolder.CHECKPOINTS}/{RunFolder.LAST_CHECKPOINT})")
    return cfg, run_dir, ckpt


def load_state(module: torch.nn.Module, ckpt: Path, run_dir: Path, device, prefix: str = "") -> None:
    try:
        state = read_checkpoint(ckpt, run_dir, map_location=device)["state_dict"]
        if prefix:
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(state)
    except (CorruptCheckpoint, RuntimeError, KeyError) as exc:
        if isinstance(exc, torch.OutOfMemoryError):
            raise
        raise UserError(f"checkpoint {str(ckpt)!r} cannot be loaded ({str(exc).splitlines()[0][:200]})") from None


def load_representation(run_dir: str | Path, device: str | None = None):
    """(cfg, representation, run_dir): the trained 3D representation alone, without building the
    prior (exporting a Stable Diffusion run does not load Stable Diffusion)."""
    quiet_libraries()
    cfg, run_dir, ckpt = open_run(run_dir)
    dev = resolve_device(device or cfg.device)
    if refined(run_dir):  # stage 2 ran: its mesh is the run's result
        folder = RunFolder(run_dir).refine
        representation = build_mesh(refine_config(cfg), read_start(run_dir), dev)
        load_state(representation, choose_checkpoint(folder, warn=warn_checkpoint), folder, dev, prefix="representation.")
    else:
        representation = REPRESENTATIONS[cfg.representation.name].cls(cfg.representation, dev).to(dev)
        load_state(representation, ckpt, run_dir, dev, prefix="representation.")
    representation.eval()
    return cfg, representation, run_dir
