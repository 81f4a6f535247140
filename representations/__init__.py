"""Representations and their registry: name -> (config dataclass, class)."""

from __future__ import annotations

from threedgen.representations.gaussians import Gaussians, GaussiansConfig
from threedgen.representations.nerf import NeRF, NeRFConfig

REPRESENTATION_CLASSES = {
    "nerf": (NeRFConfig, NeRF),
    "gaussians": (GaussiansConfig, Gaussians),
}
