"""The Representation contract: the 3D thing that is optimised and rendered."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from threedgen.cameras import Cameras


@dataclass
class RenderOutput:
    """Renders in ``[B,H,W,C]``: ``rgb`` (C=3, composited over each camera's background),
    ``alpha`` (C=1, accumulated opacity), ``depth`` (C=1, expected ray distance)."""

    rgb: torch.Tensor
    alpha: torch.Tensor
    depth: torch.Tensor


class Representation(torch.nn.Module):
    """Base class. Subclasses implement ``render``, ``parameter_groups`` and ``extract_surface``.

    A representation owns its optimizers (``optimizers``, name -> optimizer, made by
    :meth:`make_optimizers`): the system steps, checkpoints and rolls them back, and a
    representation that adds or removes parameters (Gaussians' densification) updates them itself."""

    name = "representation"

    def __init__(self):
        super().__init__()
        self.optimizers: dict[str, torch.optim.Optimizer] = {}

    def render(self, cameras: Cameras, height: int, width: int) -> RenderOutput:
        raise NotImplementedError

    def parameter_groups(self) -> list[dict]:
        """Optimizer parameter groups (``params``, ``lr``, ``name``) from the representation's config."""
        raise NotImplementedError

    def make_optimizers(self, betas: tuple[float, float], eps: float) -> dict[str, torch.optim.Optimizer]:
        """Make (replacing any earlier ones) and keep in ``optimizers`` the Adam optimizers of
        :meth:`parameter_groups`; here one over every group, named after the representation."""
        self.optimizers = {self.name: torch.optim.Adam(self.parameter_groups(), betas=betas, eps=eps)}
        return self.optimizers

    def on_step(self, step: int, max_steps: int = 0) -> None:
        """Maintenance after an optimizer step (occupancy grid update, densify/prune through
        ``optimizers``)."""

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

    def extract_surface(self, resolution: int = 128):
        """The surface for export: a ``threedgen.meshing.Surface`` (mesh +Y up in world units, and
        the colour function that vertex colours and textures are baked from)."""
        raise NotImplementedError
