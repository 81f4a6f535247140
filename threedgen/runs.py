"""Reading a run folder: its config, its checkpoint, and the trained representation in it.

Shared by the runner (resume), ``threedgen export`` and ``threedgen eval``; writing a run folder
is ``threedgen.rundir``'s job.
"""

from __future__ import annotations

import copy
import logging
import sys
import warnings
from pathlib import Path
from typing import NoReturn

import torch

from threedgen import kernels
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


def read_state(ckpt: Path, run_dir: Path, device, prefix: str = "") -> dict:
    """The checkpoint's state dict (its keys under ``prefix``, without it), or a one-line UserError."""
    try:
        state = read_checkpoint(ckpt, run_dir, map_location=device)["state_dict"]
    except (CorruptCheckpoint, RuntimeError, KeyError) as exc:
        _cannot_load(ckpt, exc)
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if prefix else state


def load_state(module: torch.nn.Module, ckpt: Path, run_dir: Path, device, prefix: str = "",
               state: dict | None = None) -> None:
    """``module`` with the checkpoint's weights (``state``: already read by ``read_state``)."""
    if state is None:
        state = read_state(ckpt, run_dir, device, prefix)
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError) as exc:
        _cannot_load(ckpt, exc)


def _cannot_load(ckpt: Path, exc: BaseException) -> NoReturn:
    if isinstance(exc, torch.OutOfMemoryError):
        raise exc
    raise UserError(f"checkpoint {str(ckpt)!r} cannot be loaded ({str(exc).splitlines()[0][:200]})") from None


ESTIMATOR = "estimator."  # the state of nerfacc's occupancy grid, in a NeRF trained with the occgrid sampler


def sampler_here(rep_cfg, state: dict, device, prefix: str = ""):
    """The representation's config to build a trained NeRF with here, and its ``state`` to load:
    the sampler the run trained with (``representation.sampler`` as it recorded it; a run that
    recorded ``auto``, before the sampler was recorded, trained with ``occgrid`` exactly when its
    checkpoint holds the occupancy grid). Where that is ``occgrid`` and nerfacc's kernels do not
    run (the CPU, or a GPU without them), the dense sampler renders the same field instead, said
    on stderr: the occupancy grid (a cache of where the density is) is left out of the state.
    Other representations are returned as they are."""
    if getattr(rep_cfg, "sampler", None) not in ("auto", "occgrid"):
        return rep_cfg, state
    has_grid = any(k.startswith(prefix + ESTIMATOR) for k in state)
    trained = rep_cfg.sampler if rep_cfg.sampler != "auto" else ("occgrid" if has_grid else "dense")
    rep_cfg = copy.deepcopy(rep_cfg)  # the run's own config stays as it recorded it
    device = torch.device(device)
    if trained == "dense" or (device.type == "cuda" and kernels.usable("nerfacc")):
        rep_cfg.sampler = trained
        return rep_cfg, state
    why = "on the CPU" if device.type != "cuda" else f"here ({kernels.load('nerfacc').detail})"
    print_err(f"threedgen: this run trained with nerfacc's occupancy-grid sampler, whose CUDA kernels do not run "
              f"{why}; rendering it with the dense sampler ({rep_cfg.num_samples} samples a ray) instead")
    rep_cfg.sampler = "dense"
    return rep_cfg, {k: v for k, v in state.items() if not k.startswith(prefix + ESTIMATOR)}


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
        rep_cfg, state = sampler_here(cfg.representation, read_state(ckpt, run_dir, dev, "representation."), dev)
        representation = REPRESENTATIONS[cfg.representation.name].cls(rep_cfg, dev).to(dev)
        load_state(representation, ckpt, run_dir, dev, state=state)
    representation.eval()
    return cfg, representation, run_dir
