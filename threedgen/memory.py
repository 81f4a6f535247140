"""What a NeRF's training render keeps for the backward pass, estimated before a run starts, and
the refusal of a CUDA run whose estimate exceeds its GPU's memory.

The render keeps about ``marched x MARCH_BYTES + evaluated x field bytes``: every sample the
sampler marches keeps its compositing terms, every sample where the field is evaluated keeps the
field's (the PyTorch hash grid: each level's corner indices and interpolation weights, ~100 bytes
a level; tiny-cuda-nn: half-precision activations). The bytes were counted on the CPU with
``torch.autograd.graph.saved_tensors_hooks`` (``tests/test_cuda_bugs.py`` checks the estimate
against such a count); the samples come from the geometry of the first steps: the training
cameras (the closest and narrowest, where a render holds the most samples), the box, and the ball
where the initial density (the blob, or the SDF's sphere) is above what the sampler skips. A
trained object is usually larger than that ball, so the estimate is about what the first steps
need: a run refused here could not have started, and one allowed may still run out of memory
later (the runner's out-of-memory message says what to lower then). The CPU is never refused.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from threedgen.cameras import Cameras, ray_aabb
from threedgen.errors import UserError
from threedgen.representations.config import NeRFConfig, SDFNeRFConfig
from threedgen.schema import CameraSamplerConfig, RunConfig

MARCH_BYTES = 52  # per marched sample: positions' weights, transmittance, compositing (measured: 51)
GRID_BYTES = 4  # per evaluated sample of the dense-grid field (measured: 2; its grids are parameters)
HASH_BYTES, HASH_LEVEL_BYTES = 245, 104  # PyTorch hash grid: MLP + per level (measured: 349 at 1 level, 1910 at 16)
# The PyTorch hash grid's largest level temporaries (the corners' int64 indices and hashes, about
# 600 bytes a sample), alive on top of what is kept while a level is computed.
HASH_TRANSIENT_BYTES = 600
TCNN_BYTES, TCNN_LEVEL_BYTES = 200, 8  # tiny-cuda-nn: fp16 encoding and MLP activations (from its layout, not measured)
PROBE = 64  # rays a side of the low-resolution probe of the geometry


def field_bytes(field: str, backend: str, levels: int) -> tuple[int, int]:
    """(kept, transient) bytes per evaluated sample of a field: ``field`` grid or hash, ``backend``
    torch or tcnn (the hash grid's), ``levels`` its levels."""
    if field == "grid":
        return GRID_BYTES, 0
    if backend == "tcnn":
        return TCNN_BYTES + TCNN_LEVEL_BYTES * levels, 0
    return HASH_BYTES + HASH_LEVEL_BYTES * levels, HASH_TRANSIENT_BYTES


def _inverse_activation(sigma: float, activation: str) -> float:
    """The raw field value whose density is ``sigma``."""
    if activation == "exp":
        return math.log(sigma)
    return math.log(math.expm1(sigma)) if sigma < 30 else sigma  # softplus^-1


def initial_density(cfg: NeRFConfig, radius: torch.Tensor) -> torch.Tensor:
    """The density at distance ``radius`` from the centre before training (a zero field)."""
    if isinstance(cfg, SDFNeRFConfig):
        beta, sdf = cfg.beta_start, radius - cfg.init_radius
        return torch.where(sdf > 0, 0.5 * torch.exp(-sdf / beta), 1 - 0.5 * torch.exp(sdf / beta)) / beta
    raw = cfg.density_blob_scale * (1 - radius / cfg.density_blob_radius)
    return torch.nn.functional.softplus(raw) if cfg.density_activation == "softplus" else torch.exp(raw.clamp(max=15))


def occgrid_threshold(cfg: NeRFConfig) -> float:
    """The density above which nerfacc's first update marks a cell occupied: its opacity a step
    above ``min(mean over cells, 0.01)``."""
    ax = (torch.arange(32, dtype=torch.float64) + 0.5) / 32 * 2 * cfg.bound - cfg.bound
    points = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    mean = float((initial_density(cfg, points.norm(dim=-1)) * cfg.render_step_size).mean())
    return min(mean, 0.01) / cfg.render_step_size


def occupied_radius(cfg: NeRFConfig, sigma_min: float) -> float:
    """Radius of the ball where the initial density reaches ``sigma_min`` (inf: everywhere)."""
    if isinstance(cfg, SDFNeRFConfig):  # Laplace CDF of the sphere's signed distance: 0.5/beta exp(-sdf/beta) outside
        beta = cfg.beta_start
        return cfg.init_radius + beta * max(0.0, math.log(0.5 / (beta * sigma_min)))
    raw = _inverse_activation(sigma_min, cfg.density_activation)
    if cfg.density_blob_scale <= 0:  # a flat field (raw 0): all or nothing; nothing is filled to all
        return math.inf
    return max(0.0, cfg.density_blob_radius * (1 - raw / cfg.density_blob_scale))


def _probe_rays(camera: CameraSamplerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays ``[PROBE^2, 3]`` of the closest, narrowest training camera (at the middle elevation)."""
    elevation = 0.5 * (camera.elevation_range[0] + camera.elevation_range[1])
    cams = Cameras.from_angles([elevation], [0.0], min(camera.distance_range), min(camera.fovy_range))
    o, d = cams.rays(PROBE, PROBE)
    return o.reshape(-1, 3).double(), d.reshape(-1, 3).double()


def _ball_chord(o: torch.Tensor, d: torch.Tensor, radius: float, near: torch.Tensor, far: torch.Tensor):
    """Length of each ray inside the ball of ``radius`` at the origin, within ``[near, far]``."""
    if math.isinf(radius):
        return (far - near).clamp_min(0)
    centre = -(o * d).sum(-1)
    half = (radius ** 2 - ((o * o).sum(-1) - centre ** 2)).clamp_min(0).sqrt()
    return (torch.minimum(far, centre + half) - torch.maximum(near, centre - half)).clamp_min(0)


def samples_per_view(cfg: NeRFConfig, sampler: str, camera: CameraSamplerConfig, size: int) -> tuple[float, float]:
    """(marched, evaluated) samples of one ``size`` x ``size`` training view in the first steps."""
    o, d = _probe_rays(camera)
    near, far = ray_aabb(o, d, cfg.bound)
    scale = (size / PROBE) ** 2
    if sampler == "occgrid":  # the march steps through the occupied cells only (nerfacc's first
        # update's; a cell's width added for the cells' edges)
        cell = 2 * cfg.bound / cfg.occgrid_resolution
        radius = occupied_radius(cfg, occgrid_threshold(cfg)) + cell
        steps = _ball_chord(o, d, radius, near, far) / cfg.render_step_size
        return float(steps.sum()) * scale, float(steps.sum()) * scale
    n = cfg.num_samples
    if not cfg.skip_empty:  # every ray, every sample (a ray that misses the box too)
        return float(len(o) * n) * scale, float(len(o) * n) * scale
    # Empty-space skipping: a cell counts above skip_threshold opacity across it, dilated by a
    # cell (and half a cell for where in the cell it was tested); rays that miss the occupied
    # cells' box are not marched; the field is evaluated at the samples inside the occupied ball.
    cell = 2 * cfg.bound / cfg.skip_grid
    radius = occupied_radius(cfg, -math.log1p(-cfg.skip_threshold) / cell) + 1.5 * cell
    half = min(radius, cfg.bound)
    lo, hi = ray_aabb(o, d, -half, half)
    marched = hi > lo
    inside = _ball_chord(o, d, radius, near, far) / (far - near).clamp_min(1e-9)
    return float(marched.sum() * n) * scale, float((inside * marched).sum() * n) * scale


def render_bytes(cfg: NeRFConfig, field: str, backend: str, sampler: str, camera: CameraSamplerConfig,
                 size: int, views: int = 1) -> int:
    """Estimated bytes a training render of ``views`` views of ``size`` x ``size`` keeps for the
    backward pass (plus the field's largest temporaries)."""
    marched, evaluated = samples_per_view(cfg, sampler, camera, size)
    kept, transient = field_bytes(field, backend, cfg.hash_levels)
    return int(views * (marched * MARCH_BYTES + evaluated * (kept + transient)))


def _kinds(rep: NeRFConfig, device: torch.device) -> tuple[str, str, str]:
    """(field, hash backend, sampler) a NeRF on CUDA ``device`` will use, as it chooses them."""
    from threedgen import kernels  # after the CPU's early return: loading may build the kernels

    field = rep.field if rep.field != "auto" else "hash"
    backend = rep.hash_backend
    if field == "hash" and backend == "auto":
        try:
            import tinycudann  # noqa: F401  # optional, CUDA only: whether the hash field will use it
            backend = "tcnn"
        except Exception:  # not installed, or not built for this GPU: the PyTorch hash grid
            backend = "torch"
    sampler, _ = kernels.choose("nerfacc", "sampler", rep.sampler, "occgrid", "dense", device)
    return field, backend, sampler


@functools.lru_cache(maxsize=None)
def device_memory(device) -> int:
    """Total memory of a CUDA device (``cuda:N``, a name or a ``torch.device``), bytes."""
    return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n < 1e10 else f"{n / 1e9:.0f} GB"


def check_training_memory(cfg: RunConfig, device, memory: Optional[int] = None) -> Optional[int]:
    """A one-line UserError when a NeRF run's training render needs more than its CUDA device's
    memory (``memory``: that, default the device's); the estimate in bytes otherwise. The CPU and
    the other representations: None, never refused."""
    device = torch.device(device)
    rep = cfg.representation
    if device.type != "cuda" or not isinstance(rep, NeRFConfig):
        return None
    field, backend, sampler = _kinds(rep, device)
    size, views = max(cfg.render.resolution, cfg.render.coarse_resolution), cfg.camera.batch_size
    need = render_bytes(rep, field, backend, sampler, cfg.camera, size, views)
    have = device_memory(device) if memory is None else memory
    if need <= have:
        return need
    fits = int(size * math.sqrt(have / need)) // 8 * 8
    knob = "raise representation.render_step_size" if sampler == "occgrid" else "lower representation.num_samples"
    what = "the PyTorch hash grid" if field == "hash" and backend == "torch" else f"the {field} field"
    tcnn = "; or install tiny-cuda-nn for this GPU" if field == "hash" and backend == "torch" else ""
    batch = f" x {views} views (camera.batch_size)" if views > 1 else ""
    raise UserError(f"the NeRF's training render needs about {_gb(need)} ({size}x{size}{batch}, {what}, {sampler} "
                    f"sampler) but {device} has {_gb(have)}: lower render.resolution (about {max(fits, 8)} fits), "
                    f"or {knob}{tcnn}")
