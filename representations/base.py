"""The Representation contract: the 3D thing that is optimised and rendered."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from threedgen.cameras import Cameras


@dataclass
class RenderOutput:
    """Renders in ``[B,H,W,C]``: ``rgb`` (C=3, composited over each camera's background),
    ``alpha`` (C=1, accumulated opacity), ``depth`` (C=1, expected ray distance), ``normal``
    (C=3) where the representation provides it."""

    rgb: torch.Tensor
    alpha: torch.Tensor
    depth: torch.Tensor
    normal: Optional[torch.Tensor] = None


class Representation(torch.nn.Module):
    """Base class. Subclasses implement ``render``, ``parameter_groups`` and ``extract_surface``."""

    name = "representation"

    def render(self, cameras: Cameras, height: int, width: int) -> RenderOutput:
        raise NotImplementedError

    def parameter_groups(self) -> list[dict]:
        """Optimizer parameter groups (``params``, ``lr``, ``name``) from the representation's config."""
        raise NotImplementedError

    def on_step(self, step: int, max_steps: int = 0, optimizer=None) -> None:
        """Maintenance after an optimizer step (occupancy grid update, densify/prune). ``optimizer``
        is the system's optimizer: a representation that adds or removes parameters (Gaussians'
        densification) updates its groups and state there, so the system keeps owning it."""

    def backends(self) -> dict:
        """Which implementations render it (rasteriser, sampler, field) and any fallback from a
        CUDA kernel that did not load, for ``status.json``."""
        return {}

    def runtime_state(self):
        """Training state outside the parameters that a rollback must restore with them (the
        Gaussians' densification statistics); None when there is none."""
        return None

    def load_runtime_state(self, state) -> None:
        """Restore what :meth:`runtime_state` returned (after the parameters were loaded)."""

    def export_files(self, run_dir) -> list:
        """Representation-specific files written next to the meshes (Gaussians' ``splats.ply``)."""
        return []

    def regularizers(self, out: RenderOutput) -> dict[str, torch.Tensor]:
        """Representation-specific losses on a render (name -> scalar, weighted in the system)."""
        return {}

    def extract_surface(self, resolution: int = 128):
        """The surface for export: a ``threedgen.meshing.Surface`` (mesh +Y up in world units, and
        the colour function that vertex colours and textures are baked from)."""
        raise NotImplementedError

    def extract_mesh(self, resolution: int = 128):
        """A ``trimesh.Trimesh`` with vertex colours, +Y up, in world units."""
        return self.extract_surface(resolution).colored_mesh()
