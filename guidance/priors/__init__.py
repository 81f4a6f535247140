"""Priors: the frozen 2D teachers. Registry: name -> (config dataclass, class).

``--prior`` takes a registered name, ``auto``, or a diffusers model (Hub id or local folder),
whose ``model_index.json`` says which prior it is. ``auto`` picks Stable Diffusion 2.1 base when
CUDA is present and the embedded ``shapes`` prior otherwise, and says which.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from threedgen.errors import UserError, nearest
from threedgen.guidance.priors.diffusion.deepfloyd import DeepFloydPrior, DeepFloydPriorConfig
from threedgen.guidance.priors.diffusion.stable_diffusion import StableDiffusionPrior, StableDiffusionPriorConfig
from threedgen.guidance.priors.shapes.prior import ShapesPrior, ShapesPriorConfig

PRIORS = {
    "shapes": (ShapesPriorConfig, ShapesPrior),
    "stable-diffusion": (StableDiffusionPriorConfig, StableDiffusionPrior),
    "deepfloyd-if": (DeepFloydPriorConfig, DeepFloydPrior),
}
PRIOR_CHOICES = ("auto",) + tuple(PRIORS)
AUTO_GPU_MODEL = StableDiffusionPriorConfig.model


@dataclass(frozen=True)
class PriorChoice:
    name: str  # a key of PRIORS
    model: Optional[str] = None  # the diffusers model given on the command line, if any
    note: Optional[str] = None  # what "auto" chose and why


def resolve_prior(value: str, device: torch.device) -> PriorChoice:
    """What ``--prior VALUE`` means on ``device``. A model id or folder is looked up (one line
    of error when it cannot be found) to learn which prior it is."""
    if value == "auto":
        if device.type == "cuda":
            return PriorChoice("stable-diffusion", AUTO_GPU_MODEL,
                               f"--prior auto -> Stable Diffusion 2.1 base ({AUTO_GPU_MODEL}) on CUDA; "
                               "--prior shapes for the embedded prior")
        return PriorChoice("shapes", None, "--prior auto -> the embedded 'shapes' prior (no CUDA device; "
                                           "Stable Diffusion needs a GPU to be practical)")
    if value in PRIORS:
        return PriorChoice(value)
    if "/" in value or "\\" in value or value.startswith((".", "~")) or Path(value).expanduser().exists():
        from threedgen.guidance.priors.diffusion.source import resolve_source

        source = resolve_source(value)
        return PriorChoice(source.kind, source.location)  # a folder as an absolute path (resume from anywhere)
    raise UserError(f"unknown prior {value!r}; valid: {', '.join(nearest(value, PRIOR_CHOICES))}, "
                    "a Hugging Face model id (owner/name) or a local diffusers folder")


def check_run(run_cfg) -> None:
    """What the chosen prior can check cheaply before it is built: the prompt, that the run's
    cameras suit it, and that its model can be found."""
    cls = PRIORS[run_cfg.prior.name][1]
    cls.check_prompt(run_cfg.prior, run_cfg.prompt, run_cfg.negative_prompt)
    cls.check_cameras(run_cfg.prior, run_cfg.camera)
    cls.check_model(run_cfg.prior)


def build_prior(cfg, device: torch.device):
    return PRIORS[cfg.name][1].build(cfg, device)
