"""Rendering the shapes prior's images: sphere tracing of the exact SDFs, cached on disk.

Each image is stored as three maps at the prior's resolution: ``shade`` = shading x coverage of
the body (premultiplied), ``marker`` = the same for the front marker (zero for shapes without one)
and ``alpha`` = coverage, all from ``supersample^2`` rays per pixel. Shading is view-independent:
``ambient + diffuse * max(0, n . light)``; an object's RGB over a background ``b`` is
``albedo * shade + MARKER_COLOUR * marker + b * (1 - alpha)``. Colour is separable, so one set of
maps per (shape, view) serves every colour.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from threedgen.cameras import Cameras
from threedgen.guidance.priors.shapes.sdf import TRACE_SDFS, marker_share
from threedgen.rundir import atomic_path

RENDER_VERSION = 3  # bump whenever a shape, the shading or the tracer changes
LIGHT_DIR = (0.35, 0.85, 0.40)  # world space, normalised at use
AMBIENT, DIFFUSE = 0.30, 0.70


@dataclass(frozen=True)
class ViewGrid:
    """The teacher's views: every ``azimuth_step`` degrees at each elevation."""

    elevations: tuple[float, ...] = (-10.0, 5.0, 20.0, 35.0, 50.0, 65.0)
    azimuth_step: float = 10.0
    distance: float = 2.5
    fovy: float = 40.0

    def cameras(self) -> Cameras:
        n_az = int(round(360.0 / self.azimuth_step))
        az = torch.arange(n_az, dtype=torch.float32) * self.azimuth_step
        el = torch.tensor(self.elevations, dtype=torch.float32)
        el_grid, az_grid = torch.meshgrid(el, az, indexing="ij")
        return Cameras.from_angles(el_grid.reshape(-1), az_grid.reshape(-1), self.distance, self.fovy)


class Maps(NamedTuple):
    """A shape's images as maps ``[B,H,W]`` (float32): body shading, marker shading, coverage."""

    shade: torch.Tensor
    marker: torch.Tensor
    alpha: torch.Tensor


def sphere_trace(shape: str, cameras: Cameras, height: int, width: int, supersample: int = 2,
                 iterations: int = 96, chunk: int = 16) -> Maps:
    """The maps of one shape seen by ``cameras``."""
    sdf = TRACE_SDFS[shape]
    light = torch.tensor(LIGHT_DIR, dtype=torch.float64)
    light = light / light.norm()
    shades, markers, alphas = [], [], []
    for start in range(0, len(cameras), chunk):
        cams = cameras[start:start + chunk]
        o, d = cams.rays(height * supersample, width * supersample)
        o, d = o.reshape(-1, 3).double(), d.reshape(-1, 3).double()
        dist = cams.distance.double()[:, None].expand(-1, o.shape[0] // len(cams)).reshape(-1)
        t = dist - 0.9
        hit = torch.zeros(o.shape[0], dtype=torch.bool)
        idx = torch.arange(o.shape[0])  # rays still marching
        for _ in range(iterations):
            step = sdf(o[idx] + d[idx] * t[idx, None])
            done = step < 1e-4
            hit[idx[done]] = True
            t[idx] += step
            idx = idx[~done & (t[idx] < dist[idx] + 0.9)]
            if idx.numel() == 0:
                break
        p = o + d * t[..., None]
        eps = 1e-4
        grad = torch.stack([sdf(p + eps * e) - sdf(p - eps * e) for e in torch.eye(3, dtype=torch.float64)], -1)
        normal = grad / grad.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        shade = (AMBIENT + DIFFUSE * (normal @ light).clamp(min=0)) * hit
        share = marker_share(shape, p)
        size = (len(cams), height * supersample, width * supersample)

        def pooled(m):
            return torch.nn.functional.avg_pool2d(m.reshape(size)[:, None].double(), supersample)[:, 0].float()
        shades.append(pooled(shade * (1 - share)))
        markers.append(pooled(shade * share))
        alphas.append(pooled(hit))
    return Maps(torch.cat(shades), torch.cat(markers), torch.cat(alphas))


def cache_root() -> Path:
    env = os.environ.get("THREEDGEN_CACHE")
    if env:
        return Path(env)
    import platformdirs  # only where THREEDGEN_CACHE is not set

    return Path(platformdirs.user_cache_dir("threedgen"))


def disk_cached(folder: str, name: str, params: dict, compute) -> dict[str, np.ndarray]:
    """``compute()`` (a dict of arrays), stored once as ``<cache>/<folder>/<name>-<key>.npz`` where
    the key hashes ``params`` (every parameter that changes the result, so a stale file is never
    used). A damaged file is computed again; files are written atomically."""
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_root() / folder / f"{name}-{key}.npz"
    if path.exists():
        try:
            with np.load(path) as data:
                return {k: data[k].copy() for k in data.files}
        except Exception:  # a damaged cache file is simply computed again
            pass
    arrays = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # whole or absent, and readable as the user's umask says
        np.savez(tmp, **arrays)
    return arrays


def cached_maps(shape: str, grid: ViewGrid, resolution: int, supersample: int) -> Maps:
    """The teacher maps of one shape, ``[V,H,W]`` each, rendered once and cached on disk."""
    params = {"version": RENDER_VERSION, "shape": shape, "grid": asdict(grid), "resolution": resolution,
              "supersample": supersample, "light": LIGHT_DIR, "ambient": AMBIENT, "diffuse": DIFFUSE}

    def render():
        return {k: v.numpy() for k, v in sphere_trace(shape, grid.cameras(), resolution, resolution,
                                                      supersample)._asdict().items()}

    maps = disk_cached("shapes", f"{shape}-{resolution}", params, render)
    return Maps(*(torch.from_numpy(maps[k]) for k in Maps._fields))
