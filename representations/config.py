"""The representations' settings and their registry, ``REPRESENTATIONS`` (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from threedgen.errors import UserError, check_range
from threedgen.registry import Registry

REPRESENTATIONS = Registry("representation")


@dataclass
class RepresentationConfig:
    """What every representation has: a name and a scene box (a prior's world may set the box)."""

    name: str = "representation"
    """The representation (`threedgen config keys` lists them)."""
    bound: float = 1.0
    """Scene box half-size: everything lives in [-bound, bound]^3."""

    def memory_hint(self, cuda: bool) -> str:
        """The setting to change after running out of memory, besides resolution and batch size."""
        return ""

    def check(self) -> None:
        check_range("representation.bound", self.bound, 1e-3, 100)

@REPRESENTATIONS.register("nerf", "threedgen.representations.nerf:NeRF",
                          "NeRF: dense voxel grids or a hash grid, volume-rendered")
@dataclass
class NeRFConfig(RepresentationConfig):
    name: str = "nerf"
    field: str = "auto"
    """Field: 'grid' (dense voxel grids, the CPU default), 'hash' (hash grid + MLP, the CUDA default; tiny-cuda-nn when importable), or 'auto'."""
    sampler: str = "auto"
    """Sampler: 'dense' (stratified, any device), 'occgrid' (nerfacc occupancy grid, CUDA), 'auto'. A run records the one it used here (export and eval render with it; an occgrid run is rendered with 'dense' where nerfacc's kernels do not run)."""
    density_resolution: int = 64
    """Dense density grid size along each axis."""
    color_resolution: int = 32
    """Dense colour grid size along each axis."""
    hash_levels: int = 16
    """Levels of the hash grid."""
    hash_log2_table: int = 19
    """log2 of the hash table size per level."""
    hash_backend: str = "auto"
    """Hash grid implementation: 'auto' (tiny-cuda-nn on CUDA when it imports, else PyTorch), 'tcnn', 'torch'. A run records the one it used here (their checkpoints differ)."""
    num_samples: int = 32
    """Samples per ray of the dense sampler."""
    render_step_size: float = 0.005
    """Ray-marching step of the occupancy-grid sampler, world units."""
    occgrid_resolution: int = 128
    """Cells per axis of nerfacc's occupancy grid."""
    skip_empty: bool = True
    """Empty-space skipping for the dense sampler (any device): a skip_grid^3 occupancy grid."""
    skip_grid: int = 32
    """Cells per axis of the empty-space grid."""
    skip_every: int = 16
    """Steps between updates of the empty-space grid."""
    skip_threshold: float = 0.001
    """A cell is empty below this opacity across one cell."""
    density_activation: str = "softplus"
    """softplus or exp: raw field value -> density."""
    density_blob_scale: float = 10.0
    """Initial density bump at the centre (DreamFusion's blob), its height."""
    density_blob_radius: float = 0.5
    """Initial density bump at the centre, its radius."""
    lr_density: float = 0.3
    """Learning rate of the dense density grid."""
    lr_color: float = 0.3
    """Learning rate of the dense colour grid."""
    lr_hash: float = 0.01
    """Learning rate of the hash encoding (threestudio's order of magnitude)."""
    lr_mlp: float = 0.001
    """Learning rate of the hash field's MLP."""
    mesh_threshold: Optional[float] = None
    """Isosurface level for export; None = automatic (see threedgen.meshing)."""
    mesh_color_shell: float = 0.1
    """Export: a surface point's colour is what a ray along its inward normal sees, from this far (world units) outside the surface to this far inside; 0 = the colour field at the point."""
    mesh_smooth: float = 0.01
    """Export: blur the density grid by a Gaussian of this standard deviation (world units) before marching cubes (flattens a noisy field's pits); 0 = off."""

    def memory_hint(self, cuda: bool) -> str:
        occgrid = self.sampler == "occgrid" or (self.sampler == "auto" and cuda)
        return "raise representation.render_step_size" if occgrid else "lower representation.num_samples"

    def check(self) -> None:
        for key, allowed in (("field", ("auto", "grid", "hash")), ("sampler", ("auto", "dense", "occgrid")),
                             ("hash_backend", ("auto", "tcnn", "torch")),
                             ("density_activation", ("softplus", "exp"))):
            if getattr(self, key) not in allowed:
                raise UserError(f"representation.{key} must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")
        super().check()
        check_range("representation.density_resolution", self.density_resolution, 4, 512, integer=True)
        check_range("representation.color_resolution", self.color_resolution, 4, 512, integer=True)
        check_range("representation.num_samples", self.num_samples, 1, 1024, integer=True)
        check_range("representation.hash_levels", self.hash_levels, 1, 32, integer=True)
        check_range("representation.hash_log2_table", self.hash_log2_table, 8, 24, integer=True)
        check_range("representation.render_step_size", self.render_step_size, 1e-5, 1)
        check_range("representation.occgrid_resolution", self.occgrid_resolution, 8, 512, integer=True)
        check_range("representation.skip_grid", self.skip_grid, 4, 256, integer=True)
        check_range("representation.skip_every", self.skip_every, 1, 1_000_000, integer=True)
        check_range("representation.skip_threshold", self.skip_threshold, 0, 1)
        check_range("representation.density_blob_scale", self.density_blob_scale, 0, 1e4)
        check_range("representation.density_blob_radius", self.density_blob_radius, 1e-3, 100)
        check_range("representation.lr_density", self.lr_density, 0, 100)
        check_range("representation.lr_color", self.lr_color, 0, 100)
        check_range("representation.lr_hash", self.lr_hash, 0, 100)
        check_range("representation.lr_mlp", self.lr_mlp, 0, 100)
        if self.mesh_threshold is not None:
            check_range("representation.mesh_threshold", self.mesh_threshold, 0, 1e9)
        check_range("representation.mesh_color_shell", self.mesh_color_shell, 0, self.bound)
        check_range("representation.mesh_smooth", self.mesh_smooth, 0, self.bound)


@REPRESENTATIONS.register("nerf-sdf", "threedgen.representations.sdf:SDFNeRF",
                          "NeRF with a signed-distance geometry (VolSDF density, eikonal): flat faces, true normals")
@dataclass
class SDFNeRFConfig(NeRFConfig):
    name: str = "nerf-sdf"
    init_radius: float = 0.5
    """The geometry starts as a sphere of this radius (the field's residual starts at 0)."""
    beta_start: float = 0.1
    """VolSDF sharpness at the start, world units: the density is Psi_beta(-sdf)/beta (Laplace CDF)."""
    beta_end: float = 0.02
    """VolSDF sharpness once annealed (geometric from beta_start over beta_anneal of the run)."""
    beta_anneal: float = 0.5
    """Fraction of the run over which beta goes from beta_start to beta_end."""
    eikonal_weight: float = 0.1
    """Weight of the eikonal term (|grad sdf| - 1)^2 that keeps the geometry a signed distance."""
    curvature_weight: float = 0.01
    """Weight of the curvature term (the squared Laplacian of the sdf near the surface): smoother normals; 0 = off. Measured on a tuning prompt (BENCHMARKS.md, "Surfaces"): normal error 32 -> 15 degrees at 0.01; 0.1 and more round the shape off."""
    eikonal_points: int = 16384
    """Random points per step for the eikonal term (dense grid: voxels of its lattice; hash field: points of the box, also used for its curvature term)."""
    lr_density: float = 0.01
    """Learning rate of the dense grid of the signed distance's residual (world units per step)."""
    skip_threshold: float = 0.01
    """Empty-space skipping: a cell is skipped below this opacity. Higher than the NeRF's 0.001: the Laplace density's faint halo outside the surface (within a few beta) would keep most of the box occupied; 0.01 skips it at no measured cost to the mesh and saves a fifth of the run time."""
    coarse_resolution: int = 8
    """Dense field: a coarse grid of this many voxels a side added to the fine residual, so large moves of the surface (carving the initial sphere into a torus) take few steps; 0 = off. Measured on tuning prompts (BENCHMARKS.md, "Surfaces"): a donut's IoU 0.67 -> 0.91 at 8."""
    lr_coarse: float = 0.01
    """Learning rate of the coarse residual grid (world units per step)."""
    mesh_threshold: Optional[float] = None
    """Unused: the signed distance is meshed at its zero level (setting a level is an error)."""
    mesh_smooth: float = 0.03
    """Export: blur the signed distance by a Gaussian of this standard deviation (world units) before marching cubes; a plane stays a plane. 0 = off."""

    def check(self) -> None:
        super().check()
        if self.mesh_threshold is not None:
            raise UserError("representation.mesh_threshold does not apply to nerf-sdf: its mesh is the signed "
                            "distance's zero level; leave it unset")
        check_range("representation.init_radius", self.init_radius, 1e-3, self.bound)
        check_range("representation.beta_start", self.beta_start, 1e-4, self.bound)
        check_range("representation.beta_end", self.beta_end, 1e-4, self.beta_start)
        check_range("representation.beta_anneal", self.beta_anneal, 0, 1)
        check_range("representation.eikonal_weight", self.eikonal_weight, 0, 1e6)
        check_range("representation.curvature_weight", self.curvature_weight, 0, 1e6)
        if self.coarse_resolution:
            check_range("representation.coarse_resolution", self.coarse_resolution, 2, 256, integer=True)
        check_range("representation.lr_coarse", self.lr_coarse, 0, 10)
        check_range("representation.eikonal_points", self.eikonal_points, 1, 1 << 22, integer=True)


@REPRESENTATIONS.register("gaussians", "threedgen.representations.gaussians:Gaussians",
                          "3D Gaussian splatting (gsplat on CUDA, a PyTorch rasteriser elsewhere)")
@dataclass
class GaussiansConfig(RepresentationConfig):
    name: str = "gaussians"
    backend: str = "auto"
    """Rasteriser: 'auto' (gsplat on CUDA, PyTorch elsewhere), 'gsplat' (CUDA only), 'pytorch'."""
    num_points: int = 2000
    """Initial number of Gaussians."""
    init: str = "ball"
    """'ball': uniform in a ball of init_radius; 'sphere': on its surface."""
    init_radius: float = 0.5
    """Radius of the initial ball or sphere."""
    init_opacity: float = 0.1
    """Initial opacity of every Gaussian."""
    init_scale: Optional[float] = None
    """Initial standard deviation; None = the mean spacing of the initial points."""
    sh_degree: int = 0
    """Spherical-harmonics degree of the colour (0: one colour per Gaussian)."""
    eps2d: float = 0.3
    """Added to the 2D covariance's diagonal (pixels^2), as gsplat does."""
    lr_means: float = 0.001
    """Learning rate of the centres."""
    lr_scales: float = 0.005
    """Learning rate of the log-scales."""
    lr_quats: float = 0.005
    """Learning rate of the rotations."""
    lr_opacities: float = 0.05
    """Learning rate of the opacity logits."""
    lr_sh0: float = 0.01
    """Learning rate of the base colour."""
    lr_shN: float = 0.0005
    """Learning rate of the higher spherical harmonics."""
    densify: str = "default"
    """Densification: 'default' (gsplat DefaultStrategy, any device), 'mcmc' (CUDA), 'none'."""
    densify_start: float = 0.1
    """Densification starts at this fraction of the run."""
    densify_stop: float = 0.6
    """Densification stops at this fraction of the run."""
    densify_every: int = 50
    """Steps between densifications."""
    densify_grad_threshold: float = 0.01
    """Mean 2D position gradient above which a Gaussian is cloned or split."""
    densify_scale_threshold: float = 0.05
    """Clone (below) or split (above) at this fraction of the scene scale (init_radius)."""
    prune_opacity: float = 0.01
    """Gaussians below this opacity are pruned."""
    max_gaussians: int = 5000
    """Densification stops adding Gaussians at this count."""
    mesh_threshold: Optional[float] = None
    """Isosurface level of the Gaussians' density for export; None = automatic."""
    mesh_color_shell: float = 0.1
    """Export: a surface point's colour is what a ray along its inward normal sees through the Gaussians' density, from this far (world units) outside the surface to this far inside; 0 = the colour grid at the point."""
    mesh_smooth: float = 0.0
    """Export: blur the density grid by a Gaussian of this standard deviation (world units) before marching cubes; 0 = off (measured: no gain for Gaussians)."""

    def memory_hint(self, cuda: bool) -> str:
        return "lower representation.max_gaussians"

    def check(self) -> None:
        for key, allowed in (("backend", ("auto", "gsplat", "pytorch")), ("init", ("ball", "sphere")),
                             ("densify", ("default", "mcmc", "none"))):
            if getattr(self, key) not in allowed:
                raise UserError(f"representation.{key} must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")
        super().check()
        check_range("representation.num_points", self.num_points, 1, 10_000_000, integer=True)
        check_range("representation.init_radius", self.init_radius, 1e-4, self.bound)
        check_range("representation.init_opacity", self.init_opacity, 1e-3, 0.999)
        if self.init_scale is not None:
            check_range("representation.init_scale", self.init_scale, 1e-5, self.bound)
        check_range("representation.sh_degree", self.sh_degree, 0, 3, integer=True)
        check_range("representation.eps2d", self.eps2d, 0, 10)
        for key in ("lr_means", "lr_scales", "lr_quats", "lr_opacities", "lr_sh0", "lr_shN"):
            check_range(f"representation.{key}", getattr(self, key), 0, 10)
        check_range("representation.densify_start", self.densify_start, 0, 1)
        check_range("representation.densify_stop", self.densify_stop, 0, 1)
        check_range("representation.densify_every", self.densify_every, 1, 1_000_000, integer=True)
        check_range("representation.densify_grad_threshold", self.densify_grad_threshold, 0, 1e6)
        check_range("representation.densify_scale_threshold", self.densify_scale_threshold, 0, 100)
        check_range("representation.prune_opacity", self.prune_opacity, 0, 1)
        check_range("representation.max_gaussians", self.max_gaussians, 1, 100_000_000, integer=True)
        check_range("representation.mesh_color_shell", self.mesh_color_shell, 0, self.bound)
        check_range("representation.mesh_smooth", self.mesh_smooth, 0, self.bound)
        if self.max_gaussians < self.num_points:
            raise UserError(f"representation.max_gaussians ({self.max_gaussians}) is below "
                            f"representation.num_points ({self.num_points})")
        if self.mesh_threshold is not None:
            check_range("representation.mesh_threshold", self.mesh_threshold, 0, 1e9)


@REPRESENTATIONS.register("surfels", "threedgen.representations.surfels:Surfels",
                          "2D Gaussian surfels (2DGS): oriented discs, depth-normal consistency, TSDF-fused mesh")
@dataclass
class SurfelsConfig(GaussiansConfig):
    name: str = "surfels"
    normal_weight: float = 100.0
    """Weight of the depth-normal consistency term (1 - rendered normal . normal of the median depth). The 2DGS paper's 0.05 is for a photometric loss; against SDS's gradient, measured on a tuning prompt (BENCHMARKS.md, "Surfaces"): normal error 70 degrees at 0.05, 26 at 100."""
    distortion_weight: float = 10.0
    """Weight of the depth distortion term (surfels along a ray drawn together; depth units)."""
    regularize_from: float = 0.1
    """The two terms start at this fraction of the run (first the shape, then the surface)."""
    mesh_views_per_ring: int = 8
    """Export: views per elevation ring whose median depth is fused into the mesh's TSDF (4 rings, plus top and bottom)."""
    mesh_view_size: int = 128
    """Export: size in pixels of the fused depth renders."""
    tsdf_truncation: float = 4.0
    """Export: TSDF truncation distance, in voxels of the mesh grid."""

    def check(self) -> None:
        super().check()
        if self.densify == "mcmc":
            raise UserError("representation.densify=mcmc is not offered for surfels (its relocation is 3D "
                            "Gaussians'); use densify=default or none")
        check_range("representation.normal_weight", self.normal_weight, 0, 1e6)
        check_range("representation.distortion_weight", self.distortion_weight, 0, 1e6)
        check_range("representation.regularize_from", self.regularize_from, 0, 1)
        check_range("representation.mesh_views_per_ring", self.mesh_views_per_ring, 1, 64, integer=True)
        check_range("representation.mesh_view_size", self.mesh_view_size, 16, 1024, integer=True)
        check_range("representation.tsdf_truncation", self.tsdf_truncation, 0.5, 64)


@dataclass
class PromptGridsConfig:
    """The amortised generator (``threedgen train-amortised``): one network for many prompts. A
    prompt's vector (the prior's own text embedding, ``Prior.prompt_vector``) goes through a
    mapping MLP to two codes; each code mixes a learned basis of voxel grids into the density and
    colour grids of a NeRF (``representation.density_resolution``, ``color_resolution``)."""

    latent: int = 32
    """Basis grids per code (density and colour each): the number of directions prompts can differ in."""
    hidden: int = 256
    """Width of the mapping MLP's two hidden layers."""
    prompts_per_step: int = 4
    """Prompts rendered and guided per optimizer step (per process under DDP); each gets camera.batch_size views."""
    lr_mapping: float = 0.001
    """Learning rate of the mapping MLP."""
    lr_basis: float = 0.05
    """Learning rate of the basis grids (codes have unit length, so a step moves a grid by about this much)."""
    lr_mean: float = 0.3
    """Learning rate of the mean grids every prompt shares (the per-prompt NeRF's grid learning rate)."""
    color_smooth: float = 10.0
    """Weight of the generated colour grids' total variation (the density's is loss.lambda_smooth). On the shapes grid (BENCHMARKS.md) 10 removes the colour speckle that 0 leaves; IoU, PSNR and Chamfer move within their seed-to-seed spread."""

    def check(self) -> None:
        check_range("amortised.latent", self.latent, 1, 1024, integer=True)
        check_range("amortised.hidden", self.hidden, 1, 8192, integer=True)
        check_range("amortised.prompts_per_step", self.prompts_per_step, 1, 1024, integer=True)
        for key in ("lr_mapping", "lr_basis", "lr_mean", "color_smooth"):
            check_range(f"amortised.{key}", getattr(self, key), 0, 100)
