"""NeRF: a density + colour field rendered by volume rendering (nerfacc).

Two paths, chosen at construction:
- **dense** (CPU, and anywhere as the reference): stratified samples between each ray's entry and
  exit of the bounding box, ``[n_rays, n_samples]``, weights from nerfacc's
  ``render_weight_from_density`` (runs on CPU), composited over the camera's background. With
  ``skip_empty`` the field is evaluated only at samples inside the occupied cells of a coarse
  occupancy grid (``EmptySpaceGrid``, updated every ``skip_every`` steps, dilated by a cell so the
  shape can grow); elsewhere the density is zero. Same samples, same compositing: the image differs
  from the full evaluation only by the skipped cells' opacity (below ``skip_threshold`` per cell).
- **occgrid** (CUDA): nerfacc's ``OccGridEstimator`` skips empty space and renders packed samples;
  its sampling kernels need CUDA and are compiled on first use (``threedgen.kernels``); where they do
  not load, ``auto`` takes the dense sampler. The grid starts empty, so it is updated before the
  first training sample, then every 16 steps.

Density is ``activation(raw + blob(x))``: a blob bias (threestudio's "blob_magic3d") starts the
optimisation from a soft ball so early renders have something to shade.
"""

from __future__ import annotations

import nerfacc
import torch
import torch.nn.functional as F

from threedgen import kernels
from threedgen.cameras import Cameras, ray_aabb  # ray_aabb: re-exported
from threedgen.meshing import mesh_level, surface_from_field
from threedgen.representations.base import RenderOutput, Representation, opacity_at_level
from threedgen.representations.config import NeRFConfig
from threedgen.representations.fields import DenseGridField, HashGridField

OCC_EVERY = 16  # steps between updates of nerfacc's occupancy grid (its examples' and its default)


class EmptySpaceGrid(torch.nn.Module):
    """Which cells of a ``res^3`` grid over ``[-bound, bound]^3`` hold density: a cell is occupied
    when the opacity across one cell, ``1 - exp(-sigma * cell)``, of its running maximum density
    (decayed by ``decay`` per update, sampled at a random point of the cell in training and at its
    centre otherwise) reaches ``threshold``; the occupied set is then dilated by one cell. The
    running maximum is saved in checkpoints, so a resumed run skips the cells the uninterrupted run
    would have; a checkpoint without it (older ones) rebuilds the grid from the field on first use."""

    def __init__(self, bound: float, res: int, threshold: float, decay: float = 0.95):
        super().__init__()
        self.bound, self.res, self.threshold, self.decay = bound, res, threshold, decay
        self.register_buffer("value", torch.zeros(res ** 3))
        self.register_buffer("built", torch.zeros((), dtype=torch.bool))
        self.register_buffer("occupied", torch.ones(res ** 3, dtype=torch.bool), persistent=False)
        # The occupied cells' bounding box [lower; upper]: a buffer, so that it moves with the module.
        self.register_buffer("box", torch.zeros(2, 3), persistent=False)
        self.fresh = False

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        saved = prefix + "value" in state_dict and prefix + "built" in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if saved and bool(self.built):
            self._derive()
        else:  # nothing saved: rebuild from the field on next use
            missing_keys[:] = [k for k in missing_keys if k not in (prefix + "value", prefix + "built")]
            self.fresh = False

    def cell_index(self, points: torch.Tensor) -> torch.Tensor:
        r = self.res
        cell = ((points / self.bound + 1) * (0.5 * r)).long().clamp_(0, r - 1)
        return (cell[:, 0] * r + cell[:, 1]) * r + cell[:, 2]

    @torch.no_grad()
    def update(self, density_fn, jitter: bool) -> None:
        r = self.res
        ax = torch.arange(r, device=self.value.device, dtype=torch.float32)
        ijk = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
        offset = torch.rand_like(ijk) if jitter else torch.full_like(ijk, 0.5)
        points = ((ijk + offset) / r * 2 - 1) * self.bound
        sigma = torch.cat([density_fn(chunk) for chunk in points.split(1 << 18)])
        self.value = torch.maximum(self.value * self.decay, sigma) if self.fresh else sigma
        self.built.fill_(True)
        self._derive()

    def _derive(self) -> None:
        """The occupied cells and their bounding box, from ``value``."""
        r = self.res
        opacity = 1 - torch.exp(-self.value * (2 * self.bound / r))
        occ = (opacity >= self.threshold).float().view(1, 1, r, r, r)
        self.occupied = (torch.nn.functional.max_pool3d(occ, 3, stride=1, padding=1) > 0).view(-1)
        cells = torch.nonzero(self.occupied.view(r, r, r))
        cell = 2 * self.bound / r
        # The occupied cells' bounding box [lower; upper] (an empty box when nothing is occupied).
        self.box = (torch.stack([cells.amin(0) * cell - self.bound, (cells.amax(0) + 1) * cell - self.bound]).float()
                    if len(cells) else torch.zeros(2, 3, device=self.value.device))
        self.fresh = True


class NeRF(Representation):
    name = "nerf"

    def __init__(self, cfg: NeRFConfig, device: torch.device | str = "cpu"):
        super().__init__()
        self.cfg = cfg
        device = torch.device(device)  # cfg was checked once, with the whole run's config
        cuda = device.type == "cuda"
        self.field_kind = cfg.field if cfg.field != "auto" else ("hash" if cuda else "grid")
        self.sampler_kind, self.fallbacks = kernels.choose("nerfacc", "sampler", cfg.sampler, "occgrid", "dense", device)
        # Record the sampler chosen, as the hash backend below: config.yaml keeps it, so that export,
        # eval and a resume use the one the run trained with (occgrid's checkpoint has its grid).
        cfg.sampler = self.sampler_kind
        if self.field_kind == "grid":
            self.field = DenseGridField(cfg.bound, cfg.density_resolution, cfg.color_resolution)
        else:
            self.field = HashGridField(cfg.bound, cfg.hash_levels, cfg.hash_log2_table, device=device,
                                       backend=cfg.hash_backend)
            # Record the implementation chosen: its checkpoint keys are its own (config.yaml keeps it).
            cfg.hash_backend = self.field.backend
            if self.field.fallback:
                self.fallbacks.append(self.field.fallback)
        self.estimator = None
        self.empty_grid = None
        self._occ_started = False
        if self.sampler_kind == "dense" and cfg.skip_empty:
            self.empty_grid = EmptySpaceGrid(cfg.bound, cfg.skip_grid, cfg.skip_threshold)
        if self.sampler_kind == "occgrid":  # nerfacc's CUDA kernels were loaded (or built) by kernels.choose
            b = cfg.bound
            self.estimator = nerfacc.OccGridEstimator(roi_aabb=[-b, -b, -b, b, b, b],
                                                      resolution=cfg.occgrid_resolution, levels=1)

    def backends(self) -> dict:
        """What renders this NeRF (recorded in ``status.json``)."""
        field = self.field_kind if self.field_kind == "grid" else f"hash ({self.field.backend})"
        return {"field": field, "sampler": self.sampler_kind, "fallbacks": list(self.fallbacks)}

    # ---- the field -----------------------------------------------------------------------
    def _field(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw density and colour at ``points``: the field's own (a subclass may add to the density)."""
        return self.field(points)

    def density(self, points: torch.Tensor) -> torch.Tensor:
        raw, _ = self._field(points)
        return self._activate(raw, points)

    def density_and_color(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw, rgb = self._field(points)
        return self._activate(raw, points), rgb

    def _activate(self, raw: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.density_blob_scale:
            raw = raw + cfg.density_blob_scale * (1 - points.norm(dim=-1) / cfg.density_blob_radius)
        return F.softplus(raw) if cfg.density_activation == "softplus" else torch.exp(raw.clamp(max=15))

    def color(self, points: torch.Tensor) -> torch.Tensor:
        return self.field(points)[1]

    def smoothness(self) -> torch.Tensor | None:
        """The density grid's total variation (the dense field); None for the hash field."""
        return self.field.total_variation() if self.field_kind == "grid" else None

    # ---- rendering -----------------------------------------------------------------------
    def render(self, cameras: Cameras, height: int, width: int) -> RenderOutput:
        origins, dirs = cameras.rays(height, width)
        b = len(cameras)
        o, d = origins.reshape(-1, 3), dirs.reshape(-1, 3)
        bg = cameras.background[:, None, :].expand(b, height * width, 3).reshape(-1, 3).to(o)
        render = self._render_occgrid if self.estimator is not None else self._render_dense
        rgb, acc, depth = render(o, d)
        rgb = rgb + (1.0 - acc) * bg
        return RenderOutput(rgb.view(b, height, width, 3), acc.view(b, height, width, 1),
                            depth.view(b, height, width, 1))

    def _render_dense(self, o: torch.Tensor, d: torch.Tensor):
        grid = self.empty_grid
        if grid is None:
            return self._march_dense(o, d)
        if not grid.fresh:
            grid.update(self.density, jitter=False)
        # Rays that miss every occupied cell see nothing: march only the others.
        near, far = ray_aabb(o, d, grid.box[0], grid.box[1])
        hit = torch.nonzero(far > near).flatten()
        if len(hit) == len(o):
            return self._march_dense(o, d)
        color, acc, depth = self._march_dense(o.index_select(0, hit), d.index_select(0, hit))
        return tuple(v.new_zeros(len(o), v.shape[1]).index_copy(0, hit, v) for v in (color, acc, depth))

    def _march_dense(self, o: torch.Tensor, d: torch.Tensor):
        n = self.cfg.num_samples
        near, far = ray_aabb(o, d, self.cfg.bound)
        u = torch.rand(o.shape[0], n, device=o.device) if self.training else torch.full((o.shape[0], n), 0.5, device=o.device)
        edges = torch.linspace(0, 1, n + 1, device=o.device)
        span = (far - near)[:, None]
        t_starts = near[:, None] + span * edges[:-1]
        t_ends = near[:, None] + span * edges[1:]
        t_mid = near[:, None] + span * (edges[:-1] + u / n)
        points = (o[:, None, :] + d[:, None, :] * t_mid[..., None]).reshape(-1, 3)
        grid = self.empty_grid
        if grid is None:
            sigma, rgb = self.density_and_color(points)
        else:
            keep = torch.nonzero(grid.occupied[grid.cell_index(points)]).flatten()
            sigma_kept, rgb_kept = self.density_and_color(points.index_select(0, keep))
            sigma = sigma_kept.new_zeros(points.shape[0]).index_copy(0, keep, sigma_kept)
            rgb = rgb_kept.new_zeros(points.shape[0], 3).index_copy(0, keep, rgb_kept)
        weights, _, _ = nerfacc.render_weight_from_density(t_starts, t_ends, sigma.view(-1, n))
        color = nerfacc.accumulate_along_rays(weights, rgb.view(-1, n, 3))
        acc = nerfacc.accumulate_along_rays(weights, None)
        # The expected depth along the ray (divided by the opacity), as nerfacc's rendering gives.
        depth = nerfacc.accumulate_along_rays(weights, t_mid[..., None]) / acc.clamp_min(1e-10)
        return color, acc, depth

    def _render_occgrid(self, o: torch.Tensor, d: torch.Tensor):
        def sigma_fn(t_starts, t_ends, ray_indices):
            p = o[ray_indices] + d[ray_indices] * ((t_starts + t_ends) / 2)[:, None]
            return self.density(p)

        def rgb_sigma_fn(t_starts, t_ends, ray_indices):
            p = o[ray_indices] + d[ray_indices] * ((t_starts + t_ends) / 2)[:, None]
            sigma, rgb = self.density_and_color(p)
            return rgb, sigma

        if self.training and not self._occ_started:
            # nerfacc's grid starts empty (every cell unoccupied): a render before its first update
            # samples nothing, so the loss has no graph. Update it first, as nerfacc's examples do
            # (a resumed run's grid comes from its checkpoint and is left as it is).
            if not bool(self.estimator.binaries.any()):
                self._update_occgrid(0)
            self._occ_started = True
        ray_indices, t_starts, t_ends = self.estimator.sampling(
            o, d, sigma_fn=sigma_fn, render_step_size=self.cfg.render_step_size, stratified=self.training)
        color, acc, depth, _ = nerfacc.rendering(t_starts, t_ends, ray_indices, n_rays=o.shape[0],
                                                 rgb_sigma_fn=rgb_sigma_fn)
        return color, acc, depth

    def on_step(self, step: int, max_steps: int = 0) -> None:
        if self.empty_grid is not None and step % self.cfg.skip_every == 0:
            self.empty_grid.update(self.density, jitter=True)
        if self.estimator is not None:
            self._update_occgrid(step)

    def _update_occgrid(self, step: int) -> None:
        estimator = self.estimator
        estimator.update_every_n_steps(
            step, occ_eval_fn=lambda x: self.density(x) * self.cfg.render_step_size, occ_thre=0.01, n=OCC_EVERY)
        if step % OCC_EVERY == 0 and not bool(estimator.binaries.any()):
            # nerfacc marks a cell occupied above min(mean, occ_thre): on a uniform field the mean
            # may round above every cell, leaving nothing to sample (no graph, nothing to learn).
            # Every cell occupied instead: the march then samples the whole box.
            estimator.binaries.fill_(True)

    # ---- optimisation and export ---------------------------------------------------------
    def parameter_groups(self) -> list[dict]:
        cfg = self.cfg
        if self.field_kind == "grid":
            return self.field.parameter_groups(cfg.lr_density, cfg.lr_color)
        return self.field.parameter_groups(cfg.lr_hash, cfg.lr_mlp)

    @torch.no_grad()
    def opacity_grid(self, bound: float, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The field's colour at the voxel centres and ``alpha = opacity_at_level(sigma, level)``, 0.5
        at the density ``level`` that ``extract_surface`` meshes: ``mesh_threshold``, or
        ``meshing.mesh_level`` of this grid (the level whose silhouettes match the renders).
        Zero density outside the scene box, where renders take no samples.

        Not the opacity across one voxel edge ``h``, ``1 - exp(-sigma h)``: a trained field's density
        is soft (three 250-400-step CPU house runs peaked at sigma 15-20, so no voxel of edge 0.0175
        reached alpha 0.3, while 0.5 needs sigma 40), and no voxel would count as opaque. Their
        levels were 4.1-5.7, a path of ``ln 2 / level`` ~ 7-10 voxels."""
        device = next(self.parameters()).device
        lin = torch.linspace(-bound, bound, resolution, device=device)
        sigmas, colours = [], []
        for xs in lin.split(max(1, (1 << 18) // resolution ** 2)):  # slabs of at most 2^18 points
            points = torch.stack(torch.meshgrid(xs, lin, lin, indexing="ij"), -1).reshape(-1, 3)
            sigma, rgb = self.density_and_color(points)
            sigmas.append(torch.where((points.abs() <= self.cfg.bound).all(-1), sigma, torch.zeros_like(sigma))
                          .float().cpu())
            colours.append(rgb.float().cpu())
        sigma, level = mesh_level(torch.cat(sigmas).view(resolution, resolution, resolution).numpy(), bound,
                                  self.cfg.mesh_threshold, self.cfg.mesh_smooth)
        return (opacity_at_level(torch.from_numpy(sigma), level),
                torch.cat(colours).view(resolution, resolution, resolution, 3))

    @torch.no_grad()
    def extract_surface(self, resolution: int = 128):
        return surface_from_field(self.density, self.color, self.cfg.bound, resolution, self.cfg.mesh_threshold,
                                  device=next(self.parameters()).device, shell=self.cfg.mesh_color_shell,
                                  smooth=self.cfg.mesh_smooth)
