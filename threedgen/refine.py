"""Stage 2 of a run: the exported mesh itself, refined under the run's prior (``refine.*``).

After the coarse stage has trained a field and exported it (``mesh.glb``: a closed surface with an
xatlas-unwrapped, baked texture), the refinement loads that mesh (``MeshStart``), saves it as
``refine/start.npz`` and optimises a texture correction (and, with ``refine.geometry``, per-vertex
offsets) through the differentiable mesh renderer (``threedgen.rasterize``) with the same
Lightning system as the coarse stage: its checkpoints (``refine/checkpoints``), rollbacks, log
(``refine/logs``), previews (``previews/refine-step-*.png``) and progress bar. The loss is either
the run's guidance method at low noise levels (``refine.loss=guidance``) or an MSE to the prior's
own denoise of each render (``refine.loss=denoised``, ``threedgen.guidance.denoised``).

This module holds the stage's pieces; ``threedgen.runner`` runs it (after a run's coarse stage,
or on an existing run folder: ``threedgen refine``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import trimesh

from threedgen.errors import UserError
from threedgen.guidance.config import GUIDANCE
from threedgen.guidance.denoised import denoised_target_loss
from threedgen.representations.mesh import MeshStart, TexturedMesh
from threedgen.rundir import RunFolder, atomic_path
from threedgen.system import System

STAGE = "refine"


def refine_config(cfg):
    """The stage's own copy of the run's config: ``refine.steps`` steps at ``refine.resolution``
    (no coarse renders), and the guidance's timesteps in ``refine``'s range."""
    rc = cfg.refine
    stage = copy.deepcopy(cfg)
    stage.steps = rc.steps
    stage.render.resolution = rc.resolution or cfg.render.resolution
    stage.render.coarse_resolution = 0
    stage.render.coarse_until = 0.0
    # The coarse stage's terms on the render's opacity and the field's smoothness: a closed mesh's
    # coverage is the silhouette itself, which they would only pull inward.
    stage.loss.lambda_sparsity = stage.loss.lambda_opaque = stage.loss.lambda_smooth = 0.0
    if hasattr(stage.guidance, "min_step_percent"):
        stage.guidance.min_step_percent = rc.min_step_percent
        stage.guidance.max_step_percent = rc.max_step_percent
    return stage


def load_start(run_dir: Path, cfg) -> MeshStart:
    """The run's exported ``mesh.glb`` as a refinement's start (world units). UserError, one line,
    for a folder without it, a mesh without UVs, or (when the geometry is refined) one that is not
    closed."""
    path = RunFolder(run_dir).mesh("glb")
    if not path.is_file():
        raise UserError(f"run {str(run_dir)!r} has no mesh.glb to refine; export it first: threedgen export {run_dir}")
    try:
        mesh = trimesh.load(path, force="mesh", process=False)
    except Exception as exc:  # a damaged file: what trimesh says, on one line
        raise UserError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    start = MeshStart.from_textured(mesh, cfg.export.scale)
    if cfg.refine.geometry:
        surface = start.surface()
        if not surface.is_watertight:
            raise UserError(f"{path} is not a closed surface, so its vertices cannot move without opening it; "
                            "refine its texture only (refine.geometry=false)")
    return start


def save_start(run_dir: Path, start: MeshStart) -> Path:
    path = RunFolder(run_dir).refine_start
    path.parent.mkdir(exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **start.arrays())
    return path


def read_start(run_dir: Path) -> MeshStart:
    path = RunFolder(run_dir).refine_start
    try:
        with np.load(path) as data:
            return MeshStart.from_arrays(data)
    except MemoryError:
        raise
    except Exception as exc:  # damaged bytes fail in many ways (BadZipFile, EOFError, ValueError, KeyError)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"the refinement's starting mesh {path} cannot be read ({reason}); remove "
                        f"{path.parent} and refine again: threedgen refine {run_dir}") from None


def build_mesh(cfg, start: MeshStart, device) -> TexturedMesh:
    rc = cfg.refine
    return TexturedMesh(start, rc.texture_resolution, rc.texture_lr, rc.geometry, rc.geometry_lr, rc.lambda_laplacian,
                        rc.lambda_normal, rc.supersample, device).to(device)


class RefineSystem(System):
    """The coarse stage's system on a mesh, with the refinement's loss."""

    def guide(self, rgb, cameras, step: int, max_steps: int):
        rc = self.cfg.refine
        if rc.loss == "denoised":
            return denoised_target_loss(self.prior, rgb, self.embeds, cameras, rc.strength, rc.denoise_steps,
                                        rc.guidance_scale)
        return super().guide(rgb, cameras, step, max_steps)


def build_refine_system(cfg, prior, embeds, start: MeshStart, device) -> RefineSystem:
    """The stage's system for the run's ``cfg``: the stage config, the mesh, a fresh guidance."""
    stage = refine_config(cfg)
    mesh = build_mesh(stage, start, device)
    guidance = GUIDANCE[stage.guidance.name].cls(stage.guidance, prior)
    return RefineSystem(stage, prior, mesh, guidance, embeds).to(device)


def refined(run_dir: Path) -> bool:
    """Whether the run folder's published asset is a finished refinement's (its start, a
    checkpoint, and a status that records the refinement's end); an interrupted one's is not."""
    folder = RunFolder(run_dir)
    done = "step" in (folder.read_status().get("refine") or {})
    return done and folder.refine_start.is_file() and RunFolder(folder.refine).last_checkpoint.is_file()


def stage_keys(coarse: dict) -> dict:
    """The top-level keys of a refined run's final status that describe its coarse stage."""
    return {k: coarse[k] for k in ("step", "max_steps", "skipped_steps", "rollbacks", "rolled_back_steps",
                                   "train_seconds") if k in coarse}

