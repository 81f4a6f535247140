"""The Representation contract: the 3D thing that is optimised and rendered."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from threedgen.cameras import Cameras


@dataclass
class RenderOutput:
    """Renders in ``[B,H,W,C]``: ``rgb`` (C=3, composited over each camera's background),
    ``alpha`` (C=1, accumulated opacity), ``depth`` (C=1, expected ray distance); ``aux``: what a
    representation renders besides (the surfels' normals, median depth and distortion), by name."""

    rgb: torch.Tensor
    alpha: torch.Tensor
    depth: torch.Tensor
    aux: dict = field(default_factory=dict)


def opacity_at_level(values: torch.Tensor, level: float) -> torch.Tensor:
    """``1 - 2^(-values / level)`` (densities ``values >= 0``): exactly 0.5 at ``level``, towards 1
    above it and 0 below; ``values > 0`` when the level is 0, none opaque when it is infinite. That is
    ``1 - exp(-values * l)``, the opacity of a path of length ``l = ln 2 / level``: the depth over
    which the surface's own density becomes half opaque."""
    values = values.clamp_min(0)
    if level <= 0:
        return (values > 0).to(values.dtype)
    if not math.isfinite(level):
        return torch.zeros_like(values)
    return 1 - torch.exp2(-values / level)


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

    def smoothness(self) -> torch.Tensor | None:
        """The representation's own regulariser towards clean surfaces (``loss.lambda_smooth``
        weighs it), or None where it has none."""
        return None

    def regularizer(self, out: RenderOutput) -> torch.Tensor | None:
        """The representation's own loss terms on this step's render ``out``, already weighted by its
        settings (the SDF's eikonal, the surfels' depth-normal and distortion terms), or None."""
        return None

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

    def opacity_grid(self, bound: float, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each voxel's opacity and colour on the grid ``linspace(-bound, bound, R)`` per axis,
        indexed ``[x,y,z]``: ``alpha [R,R,R]`` in [0,1] and ``colour [R,R,R,3]`` (CPU tensors), for
        ``threedgen eval``'s Janus metrics (``threedgen.janus``), which count marker-coloured parts
        on the surface of the voxels with ``alpha > 0.5``. The representations here make that the
        inside of the surface their export meshes (:func:`opacity_at_level` of their density at the
        export's level, found on this grid)."""
        raise NotImplementedError(f"{type(self).__name__} has no opacity_grid (per-voxel opacity and colour), "
                                  "so `threedgen eval` cannot count its front markers")

    def extract_surface(self, resolution: int = 128):
        """The surface for export: a ``threedgen.meshing.Surface`` (mesh +Y up in world units, and
        the colour function that vertex colours and textures are baked from)."""
        raise NotImplementedError
