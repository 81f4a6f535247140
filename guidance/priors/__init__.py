"""Priors: the frozen 2D teachers; their settings and registry (``PRIORS``) are in ``config.py``.

``--prior`` takes a registered name, ``auto``, or a diffusers model (Hub id or local folder),
whose ``model_index.json`` says which prior it is. ``auto`` picks Stable Diffusion 2.1 base when
CUDA is present and the embedded ``shapes`` prior otherwise, and says which.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from threedgen.errors import UserError, nearest
from threedgen.guidance.priors.config import PRIORS, StableDiffusionPriorConfig
from threedgen.guidance.priors.diffusion.source import resolve_source

PRIOR_CHOICES = ("auto",) + tuple(PRIORS)
AUTO_GPU_MODEL = StableDiffusionPriorConfig.model


@dataclass(frozen=True)
class PriorChoice:
    name: str  # a name in PRIORS
    model: Optional[str] = None  # the diffusers model given on the command line, if any
    note: Optional[str] = None  # what "auto" chose and why


def resolve_prior(value: str, cuda: bool) -> PriorChoice:
    """What ``--prior VALUE`` means on a machine with (``cuda``) or without a CUDA device. A model id or folder is looked up (one line
    of error when it cannot be found) to learn which prior it is."""
    if value == "auto":
        if cuda:
            return PriorChoice("stable-diffusion", AUTO_GPU_MODEL,
                               f"--prior auto -> Stable Diffusion 2.1 base ({AUTO_GPU_MODEL}) on CUDA; "
                               "--prior shapes for the embedded prior")
        return PriorChoice("shapes", None, "--prior auto -> the embedded 'shapes' prior (no CUDA device; "
                                           "Stable Diffusion needs a GPU to be practical)")
    if value in PRIORS:
        return PriorChoice(value)
    if "/" in value or "\\" in value or value.startswith((".", "~")) or Path(value).expanduser().exists():
        source = resolve_source(value)
        return PriorChoice(source.kind, source.location)  # a folder as an absolute path (resume from anywhere)
    raise UserError(f"unknown prior {value!r}; valid: {', '.join(nearest(value, PRIOR_CHOICES))}, "
                    "a Hugging Face model id (owner/name) or a local diffusers folder")


def build_prior(cfg, device):
    """The prior of a validated config, on ``device``."""
    return PRIORS[cfg.name].cls.build(cfg, device)
