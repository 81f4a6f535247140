"""Priors: the frozen 2D teachers. Registry: name -> (config dataclass, builder).

``auto`` picks the embedded ``shapes`` prior on machines without CUDA (and says so).
"""

from __future__ import annotations

import torch

from threedgen.errors import unknown_name
from threedgen.guidance.priors.shapes.prior import ShapesPrior, ShapesPriorConfig

PRIORS = {
    "shapes": (ShapesPriorConfig, ShapesPrior),
}
PRIOR_CHOICES = ("auto",) + tuple(PRIORS)


def resolve_prior_name(name: str, device: torch.device) -> tuple[str, str | None]:
    """The prior to use for ``name`` and, when ``auto`` chose it, a note saying which and why."""
    if name == "auto":
        why = ("diffusers priors are not in this version yet" if device.type == "cuda" else "no CUDA device")
        return "shapes", f"--prior auto -> the embedded 'shapes' prior ({why})"
    if name not in PRIORS:
        raise unknown_name("prior", name, PRIOR_CHOICES)
    return name, None


def check_run(run_cfg) -> None:
    """What the chosen prior can check cheaply before it is built: the prompt, and that the run's
    cameras suit it."""
    cls = PRIORS[run_cfg.prior.name][1]
    cls.check_prompt(run_cfg.prior, run_cfg.prompt, run_cfg.negative_prompt)
    cls.check_cameras(run_cfg.prior, run_cfg.camera)


def build_prior(cfg, device: torch.device):
    _, cls = PRIORS[cfg.name]
    return cls(cfg).to(device)
