"""Cameras: look-at poses on a sphere around the object, rays, and the random camera stream.

Conventions (used everywhere in threedgen):
- world: right-handed, **+Y up** (as glTF); the object sits at the origin;
- azimuth 0 puts the camera on +Z looking at the origin (the object's front), azimuth grows towards
  +X; elevation is the angle above the XZ plane; angles are given in degrees;
- ``c2w`` is camera-to-world in the OpenGL convention (the camera looks along its -Z, +Y is up);
- ``fovy`` is the vertical field of view in degrees.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator

import torch

from threedgen.schema import CameraSamplerConfig


def look_at_c2w(elevation: torch.Tensor, azimuth: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """Camera-to-world matrices ``[B,4,4]`` for cameras looking at the origin."""
    el, az = torch.deg2rad(elevation), torch.deg2rad(azimuth)
    eye = torch.stack([torch.cos(el) * torch.sin(az), torch.sin(el), torch.cos(el) * torch.cos(az)], -1)
    eye = eye * distance[:, None]
    forward = -eye / eye.norm(dim=-1, keepdim=True)  # camera looks along -z_cam = forward
    up = torch.tensor([0.0, 1.0, 0.0], dtype=eye.dtype).expand_as(forward)
    right = torch.cross(forward, up, dim=-1)
    # Straight up or down: any right vector works; pick world +X rotated by the azimuth.
    degenerate = right.norm(dim=-1) < 1e-6
    if degenerate.any():
        alt = torch.stack([torch.cos(az), torch.zeros_like(az), -torch.sin(az)], -1)
        right = torch.where(degenerate[:, None], alt, right)
    right = right / right.norm(dim=-1, keepdim=True)
    true_up = torch.cross(right, forward, dim=-1)
    c2w = torch.zeros(eye.shape[0], 4, 4, dtype=eye.dtype)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, true_up, -forward, eye
    c2w[:, 3, 3] = 1.0
    return c2w


def view_tag(elevation: float, azimuth: float, front_threshold: float = 45.0, overhead_threshold: float = 60.0,
             back_threshold: float | None = None) -> str:
    """The view-dependent prompt tag of a camera: ``front``, ``side``, ``back`` or ``overhead``
    (thresholds in degrees; ``back_threshold`` defaults to ``front_threshold``)."""
    if elevation > overhead_threshold:
        return "overhead"
    az = (azimuth + 180.0) % 360.0 - 180.0
    if abs(az) < front_threshold:
        return "front"
    if abs(az) > 180.0 - (front_threshold if back_threshold is None else back_threshold):
        return "back"
    return "side"


@dataclass
class Cameras:
    """A batch of B cameras plus the background colour each render uses.

    Shapes: ``c2w [B,4,4]``, ``fovy/elevation/azimuth/distance [B]`` (degrees for angles),
    ``background [B,3]`` in [0,1]; ``view_tags`` has B strings.
    """

    c2w: torch.Tensor
    fovy: torch.Tensor
    elevation: torch.Tensor
    azimuth: torch.Tensor
    distance: torch.Tensor
    background: torch.Tensor
    view_tags: list[str] = field(default_factory=list)

    @classmethod
    def from_angles(cls, elevation, azimuth, distance, fovy, background=(1.0, 1.0, 1.0)) -> "Cameras":
        el = torch.as_tensor(elevation, dtype=torch.float32).reshape(-1)
        az = torch.as_tensor(azimuth, dtype=torch.float32).reshape(-1)
        n = max(el.numel(), az.numel())
        el, az = el.expand(n).clone(), az.expand(n).clone()
        dist = torch.as_tensor(distance, dtype=torch.float32).reshape(-1).expand(n).clone()
        fov = torch.as_tensor(fovy, dtype=torch.float32).reshape(-1).expand(n).clone()
        bg = torch.as_tensor(background, dtype=torch.float32).reshape(-1, 3).expand(n, 3).clone()
        tags = [view_tag(float(e), float(a)) for e, a in zip(el, az)]
        return cls(look_at_c2w(el, az, dist), fov, el, az, dist, bg, tags)

    TENSORS = ("c2w", "fovy", "elevation", "azimuth", "distance", "background")

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def __getitem__(self, index: slice) -> "Cameras":
        """A slice of the batch (``cams[2:4]``)."""
        return Cameras(*(getattr(self, k)[index] for k in self.TENSORS), view_tags=self.view_tags[index])

    def to(self, device) -> "Cameras":
        return replace(self, **{k: getattr(self, k).to(device) for k in self.TENSORS})

    def cat(self, other: "Cameras") -> "Cameras":
        return Cameras(*(torch.cat([getattr(self, k), getattr(other, k)]) for k in self.TENSORS),
                       view_tags=self.view_tags + other.view_tags)

    def take(self, indices: list[int]) -> "Cameras":
        """The cameras at ``indices``, in that order."""
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.c2w.device)
        return Cameras(*(getattr(self, k)[idx] for k in self.TENSORS),
                       view_tags=[self.view_tags[i] for i in indices] if self.view_tags else [])

    def repeat_interleave(self, n: int) -> "Cameras":
        """Each camera ``n`` times in a row (``[c0, c0, c1, c1, ...]`` for n = 2)."""
        return Cameras(*(getattr(self, k).repeat_interleave(n, dim=0) for k in self.TENSORS),
                       view_tags=[tag for tag in self.view_tags for _ in range(n)])

    def with_background(self, background: torch.Tensor) -> "Cameras":
        return replace(self, background=background.to(self.c2w).expand(len(self), 3).clone())

    @property
    def view_dirs(self) -> torch.Tensor:
        """Unit vectors from the origin towards each camera ``[B,3]``."""
        eye = self.c2w[:, :3, 3]
        return eye / eye.norm(dim=-1, keepdim=True)

    def rays(self, height: int, width: int, jitter: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Ray origins and unit directions, each ``[B,H,W,3]``, through pixel centres."""
        device = self.c2w.device
        ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                                torch.arange(width, device=device, dtype=torch.float32), indexing="ij")
        xs, ys = xs.expand(len(self), height, width), ys.expand(len(self), height, width)
        if jitter:
            xs = xs + torch.rand_like(xs) - 0.5
            ys = ys + torch.rand_like(ys) - 0.5
        focal = 0.5 * height / torch.tan(0.5 * torch.deg2rad(self.fovy))  # [B] pixels
        u = (xs + 0.5 - 0.5 * width) / focal[:, None, None]
        v = -(ys + 0.5 - 0.5 * height) / focal[:, None, None]
        dirs_cam = torch.stack([u, v, -torch.ones_like(u)], -1)
        dirs = torch.einsum("bij,bhwj->bhwi", self.c2w[:, :3, :3], dirs_cam)
        dirs = dirs / dirs.norm(dim=-1, keepdim=True)
        origins = self.c2w[:, None, None, :3, 3].expand_as(dirs)
        return origins, dirs




class CameraSampler:
    """Draws random camera batches; reproducible from ``(seed, step)`` so a resumed run sees the
    same cameras as an uninterrupted one."""

    def __init__(self, cfg: CameraSamplerConfig, seed: int = 0):
        self.cfg, self.seed = cfg, seed

    def sample(self, step: int) -> Cameras:
        cfg = self.cfg
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        b = cfg.batch_size

        def uniform(lo_hi):
            lo, hi = float(lo_hi[0]), float(lo_hi[1])
            return lo + (hi - lo) * torch.rand(b, generator=g)

        el, az = uniform(cfg.elevation_range), uniform(cfg.azimuth_range)
        dist, fov = uniform(cfg.distance_range), uniform(cfg.fovy_range)
        bg = torch.tensor(cfg.background, dtype=torch.float32).expand(b, 3).clone()
        random_bg = torch.rand(b, generator=g) < cfg.random_background_prob
        bg = torch.where(random_bg[:, None], torch.rand(b, 3, generator=g), bg)
        return Cameras.from_angles(el, az, dist, fov, bg)


class CameraStream(torch.utils.data.IterableDataset):
    """An endless stream of camera batches for Lightning (``batch_size=None`` in the loader)."""

    def __init__(self, sampler: CameraSampler, start_step: int = 0):
        super().__init__()
        self.sampler, self.start_step = sampler, start_step

    def __iter__(self) -> Iterator[Cameras]:
        step = self.start_step
        while True:
            yield self.sampler.sample(step)
            step += 1


def orbit(n: int, elevation: float, distance: float, fovy: float, background=(1.0, 1.0, 1.0),
          start_azimuth: float = 0.0) -> Cameras:
    """``n`` cameras evenly spaced in azimuth at one elevation (turntables, previews, eval)."""
    az = start_azimuth + torch.arange(n, dtype=torch.float32) * (360.0 / n)
    return Cameras.from_angles(torch.full((n,), float(elevation)), az, distance, fovy, background)


def ray_aabb(origins: torch.Tensor, dirs: torch.Tensor, bound, upper=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry and exit distances of rays ``[R,3]`` through the box ``[-bound, bound]^3`` (or
    ``[bound, upper]`` given both corners) by the slab test; rays that miss get ``near == far``."""
    lower = -bound if upper is None else bound
    upper = bound if upper is None else upper
    inv = 1.0 / torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    t0, t1 = (lower - origins) * inv, (upper - origins) * inv
    near = torch.minimum(t0, t1).amax(-1).clamp(min=0.0)
    far = torch.minimum(torch.maximum(t0, t1).amin(-1), torch.full_like(near, 1e30))
    far = torch.maximum(far, near)
    return near, far
