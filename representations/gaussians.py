"""3D Gaussian splatting: the representation, its initialisation, densification and exports.

Parameters follow gsplat's (and the standard ``.ply``'s) conventions: ``means [N,3]`` (world),
``scales [N,3]`` (log), ``quats [N,4]`` (wxyz, normalised when used), ``opacities [N]`` (logit),
``sh0 [N,1,3]`` and ``shN [N,K-1,3]`` (spherical-harmonic colour; degree 0 is a plain colour
``0.5 + 0.2821 * sh0``).

Rendering: gsplat's CUDA rasteriser on a CUDA device where its kernels load (``threedgen.kernels``),
the matched pure-PyTorch rasteriser (``splatting.rasterize_pytorch``) elsewhere, on any device;
``representation.backend`` forces one.

Densification and pruning: gsplat's ``DefaultStrategy`` (clone small / split large Gaussians whose
mean screen-space gradient is high, prune transparent ones), fed by either rasteriser. It edits the
parameters together with their optimizers, so the Gaussians own theirs in gsplat's convention: one
Adam per parameter, by name (``make_optimizers``). Settings for score distillation differ from
photogrammetry's (see ``GaussiansConfig``): the gradient comes from a noisy teacher, not a photo, so
the threshold is ~50x gsplat's default (DreamGaussian's 0.01), growth stops well before the end of
the run, the opacity reset is off (it would throw away the shape the teacher has agreed on), and a
cap on the number of Gaussians keeps a CPU step bounded. MCMC (``densify=mcmc``) needs CUDA (its
relocation kernel).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from gsplat import DefaultStrategy, MCMCStrategy, export_splats
from gsplat.strategy.ops import remove

from threedgen import kernels
from threedgen.cameras import Cameras
from threedgen.errors import UserError
from threedgen.meshing import LEVEL_RESOLUTION, level_cameras, mesh_level
from threedgen.representations import splatting
from threedgen.representations.base import RenderOutput, Representation, opacity_at_level
from threedgen.representations.config import GaussiansConfig
from threedgen.representations.gaussian_mesh import density_grids, gaussians_surface
from threedgen.rundir import RunFolder, atomic_path

SH_C0 = 0.28209479177387814
PARAM_NAMES = ("means", "scales", "quats", "opacities", "sh0", "shN")


def initial_points(cfg: GaussiansConfig, generator: torch.Generator) -> torch.Tensor:
    n = cfg.num_points
    direction = torch.randn(n, 3, generator=generator)
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    radius = cfg.init_radius * (torch.rand(n, 1, generator=generator) ** (1 / 3) if cfg.init == "ball" else 1.0)
    return direction * radius


def mean_spacing(cfg: GaussiansConfig) -> float:
    """Typical distance between initial points: the cube root of the volume (or the square root of
    the area) per point."""
    r, n = cfg.init_radius, cfg.num_points
    if cfg.init == "ball":
        return (4 / 3 * math.pi * r ** 3 / n) ** (1 / 3)
    return (4 * math.pi * r ** 2 / n) ** 0.5


class Gaussians(Representation):
    name = "gaussians"
    grad_key = "means2d"  # the render's screen-space tensor whose gradient densification reads

    def __init__(self, cfg: GaussiansConfig, device: torch.device | str = "cpu",
                 seed: Optional[int] = None):
        super().__init__()
        self.cfg = cfg  # checked once, with the whole run's config (threedgen.config.merge)
        device = torch.device(device)
        cuda = device.type == "cuda"
        self.backend, self.fallbacks = kernels.choose("gsplat", "backend", cfg.backend, "gsplat", "pytorch", device)
        if cfg.densify == "mcmc":
            if not cuda:
                raise UserError("representation.densify=mcmc needs CUDA (gsplat's relocation kernel); "
                                "use densify=default on CPU")
            if not kernels.usable("gsplat"):
                raise UserError(f"representation.densify=mcmc: gsplat's CUDA kernels are unavailable "
                                f"({kernels.load('gsplat').detail}); use densify=default")
        g = torch.Generator().manual_seed(seed) if seed is not None else None  # None: the global RNG
        means = initial_points(cfg, g)
        n = len(means)
        scale = cfg.init_scale if cfg.init_scale is not None else mean_spacing(cfg)
        k = (cfg.sh_degree + 1) ** 2
        # Random greys around 0.5 so no colour is favoured (sh0 = 0 is grey 0.5).
        sh0 = (torch.rand(n, 1, 3, generator=g) - 0.5) * 0.2 / SH_C0
        self.params = torch.nn.ParameterDict({
            "means": torch.nn.Parameter(means),
            "scales": torch.nn.Parameter(torch.full((n, 3), math.log(scale))),
            "quats": torch.nn.Parameter(torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1)),
            "opacities": torch.nn.Parameter(torch.full((n,), math.log(cfg.init_opacity / (1 - cfg.init_opacity)))),
            "sh0": torch.nn.Parameter(sh0),
            "shN": torch.nn.Parameter(torch.zeros(n, k - 1, 3)),
        })
        self.strategy = None
        self.strategy_state = None
        self._info = None
        if cfg.densify != "none":
            self.strategy, self.strategy_state = self._make_strategy()

    # ---- parameters ----------------------------------------------------------------------
    def __len__(self) -> int:
        return self.params["means"].shape[0]

    def colors(self) -> torch.Tensor:
        """SH coefficients ``[N,K,3]``."""
        return torch.cat([self.params["sh0"], self.params["shN"]], 1)

    def activated(self) -> dict[str, torch.Tensor]:
        p = self.params
        return {"means": p["means"], "quats": p["quats"], "scales": torch.exp(p["scales"]),
                "opacities": torch.sigmoid(p["opacities"]), "colors": self.colors()}

    def parameter_groups(self) -> list[dict]:
        cfg = self.cfg
        return [{"params": [self.params[k]], "lr": getattr(cfg, f"lr_{k}"), "name": k} for k in PARAM_NAMES]

    def make_optimizers(self, betas: tuple[float, float], eps: float) -> dict[str, torch.optim.Optimizer]:
        """gsplat's convention, which its strategies densify and prune through: one Adam per
        parameter, under the parameter's name."""
        self.optimizers = {group["name"]: torch.optim.Adam([group], betas=betas, eps=eps)
                           for group in self.parameter_groups()}
        return self.optimizers

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Densification changes N: take the checkpoint's sizes before loading its values, and point
        # the parameter's optimizer at the new tensor (its moments no longer fit: a rollback loads
        # the saved ones next).
        for name in PARAM_NAMES:
            key = f"{prefix}params.{name}"
            if key in state_dict and state_dict[key].shape != self.params[name].shape:
                old = self.params[name]
                self.params[name] = torch.nn.Parameter(torch.empty_like(state_dict[key], device=old.device))
                optimizer = self.optimizers.get(name)
                if optimizer is not None:
                    optimizer.state.pop(old, None)
                    optimizer.param_groups[0]["params"] = [self.params[name]]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def runtime_state(self):
        return self.strategy_state

    def load_runtime_state(self, state) -> None:
        # The densification statistics live beside the parameters (a checkpoint keeps the device
        # that saved it: another GPU, or the CPU).
        device = self.params["means"].device
        if isinstance(state, dict):
            state = {k: v.to(device) if torch.is_tensor(v) else v for k, v in state.items()}
        self.strategy_state, self._info = state, None

    def backends(self) -> dict:
        """What renders these Gaussians (recorded in ``status.json``)."""
        return {"rasteriser": self.backend, "densify": self.cfg.densify, "fallbacks": list(self.fallbacks)}

    # ---- rendering -----------------------------------------------------------------------
    def render(self, cameras: Cameras, height: int, width: int) -> RenderOutput:
        a = self.activated()
        dtype = a["means"].dtype
        viewmats, Ks = splatting.camera_matrices(cameras.c2w.to(dtype), cameras.fovy.to(dtype), height, width)
        raster = splatting.rasterize_gsplat if self.backend == "gsplat" else splatting.rasterize_pytorch
        rgb, alpha, depth, info = raster(a["means"], a["quats"], a["scales"], a["opacities"], a["colors"],
                                         viewmats, Ks, width, height, backgrounds=cameras.background.to(viewmats),
                                         sh_degree=self.cfg.sh_degree, eps2d=self.cfg.eps2d)
        if self.training and torch.is_grad_enabled() and info["means2d"].requires_grad:
            info["means2d"].retain_grad()  # the densification statistic
            self._info = info
        depth = depth * splatting.ray_distance_scale(Ks, height, width)
        return RenderOutput(rgb, alpha, depth)

    # ---- densification -------------------------------------------------------------------
    def _make_strategy(self):
        cfg = self.cfg
        if cfg.densify == "mcmc":
            strategy = MCMCStrategy(cap_max=cfg.max_gaussians, refine_every=cfg.densify_every,
                                    min_opacity=cfg.prune_opacity)
            return strategy, strategy.initialize_state()
        strategy = DefaultStrategy(
            prune_opa=cfg.prune_opacity, grow_grad2d=cfg.densify_grad_threshold,
            grow_scale3d=cfg.densify_scale_threshold, prune_scale3d=1e9,  # never prune for size
            refine_start_iter=0, refine_stop_iter=1 << 62, refine_every=cfg.densify_every,
            reset_every=1 << 62)
        return strategy, strategy.initialize_state(scene_scale=cfg.init_radius)

    def on_step(self, step: int, max_steps: int = 0) -> None:
        info, self._info = self._info, None
        if self.strategy is None or not self.optimizers or info is None or info[self.grad_key].grad is None:
            return
        cfg = self.cfg
        start, stop = int(cfg.densify_start * max_steps), int(cfg.densify_stop * max_steps)
        if cfg.densify != "mcmc" and not (start <= step < stop):
            return
        if cfg.densify == "mcmc":
            # MCMC relocates and grows inside [start, stop) (its own defaults, 500 and 25,000, would
            # leave a short run untouched) and perturbs the means every step (its noise).
            self.strategy.refine_start_iter, self.strategy.refine_stop_iter = start, stop
            self.strategy.step_post_backward(self.params, self.optimizers, self.strategy_state, step, info,
                                             lr=self.optimizers["means"].param_groups[0]["lr"])
            return
        s = self.strategy
        s.refine_start_iter, s.refine_stop_iter = start, stop
        # At the cap, refinement only prunes.
        s.grow_grad2d = cfg.densify_grad_threshold if len(self) < cfg.max_gaussians else float("inf")
        s.step_post_backward(self.params, self.optimizers, self.strategy_state, step, info, packed=False)
        if len(self) > cfg.max_gaussians:  # the last growth overshot: drop the newest Gaussians
            extra = torch.zeros(len(self), dtype=torch.bool, device=self.params["means"].device)
            extra[cfg.max_gaussians:] = True
            remove(self.params, self.optimizers, self.strategy_state, extra)

    # ---- export --------------------------------------------------------------------------
    @torch.no_grad()
    def export_files(self, run_dir: Path) -> list[Path]:
        """The standard 3D Gaussian splatting ``splats.ply`` (x y z, f_dc, f_rest, opacity logit,
        log scales, wxyz rotation), through gsplat's exporter."""
        p = {k: v.detach().float().cpu() for k, v in self.params.items()}
        path = RunFolder(run_dir).splats
        with atomic_path(path) as tmp:
            export_splats(p["means"], p["scales"], p["quats"], p["opacities"], p["sh0"], p["shN"],
                          format="ply", save_to=str(tmp))
        return [path]

    @torch.no_grad()
    def opacity_grid(self, bound: float, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        """From ``gaussian_mesh.density_grids`` (the mesh's extraction field): ``alpha =
        opacity_at_level(density, level)`` of the density ``sum_i o_i exp(-q_i(x) / 2)``, 0.5 at the
        level ``extract_surface`` meshes (``mesh_threshold``, or ``meshing.mesh_level`` of this
        grid with the splats' own renders, as the export finds it); the colour is the
        density-weighted mean of the Gaussians' degree-0 colours (see the base class)."""
        a = self.activated()
        means, quats, scales = a["means"].float(), a["quats"].float(), a["scales"].float()
        opacities = a["opacities"].float()
        rgb = torch.clamp(SH_C0 * self.params["sh0"][:, 0] + 0.5, 0, 1).float()
        density, colour = density_grids(means, quats, scales, opacities, rgb, bound, resolution)
        alpha = self.level_alpha(bound) if self.cfg.mesh_threshold is None else None
        density, level = mesh_level(density.cpu().numpy(), bound, self.cfg.mesh_threshold, self.cfg.mesh_smooth, alpha)
        return opacity_at_level(torch.from_numpy(density), level), colour.cpu()

    @torch.no_grad()
    def level_alpha(self, bound: float) -> np.ndarray:
        """The opacity of this representation's renders of ``meshing.level_cameras`` (for its level)."""
        cams = level_cameras(bound).to(self.params["means"].device)
        return self.render(cams, LEVEL_RESOLUTION, LEVEL_RESOLUTION).alpha.float().cpu().numpy().reshape(-1)

    @torch.no_grad()
    def extract_surface(self, resolution: int = 128):
        a = self.activated()
        rgb = torch.clamp(SH_C0 * self.params["sh0"][:, 0] + 0.5, 0, 1)
        alpha = self.level_alpha(self.cfg.bound) if self.cfg.mesh_threshold is None else None
        return gaussians_surface(a["means"], a["quats"], a["scales"], a["opacities"], rgb, self.cfg.bound,
                                 resolution, self.cfg.mesh_threshold, self.cfg.mesh_color_shell, alpha,
                                 self.cfg.mesh_smooth)

    def smoothness(self) -> torch.Tensor:
        """Flatness: the mean of each Gaussian's smallest standard deviation over the scene scale
        (``init_radius``), which flattens the Gaussians into discs that lie along the surface (the
        scale term of the surface-aligned splatting methods)."""
        return torch.exp(self.params["scales"]).amin(-1).mean() / self.cfg.init_radius


def read_splat_ply(path: str | Path) -> dict[str, np.ndarray]:
    """A binary little-endian splat ``.ply`` as ``{property: array}`` (for round trips and
    inspecting files from other tools)."""
    data = Path(path).read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    if header[0] != "ply" or "binary_little_endian" not in header[1]:
        raise UserError(f"{path}: not a binary little-endian PLY file")
    names, count = [], 0
    for line in header:
        parts = line.split()
        if parts[:2] == ["element", "vertex"]:
            count = int(parts[2])
        elif parts[:1] == ["property"]:
            if parts[1] != "float":
                raise UserError(f"{path}: property {parts[-1]} is {parts[1]}; only float splat files are read")
            names.append(parts[2])
    table = np.frombuffer(data, dtype="<f4", count=count * len(names), offset=end).reshape(count, len(names))
    return {name: table[:, i] for i, name in enumerate(names)}
