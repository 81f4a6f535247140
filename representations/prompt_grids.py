"""The amortised generator: one network that turns any prompt of a trained set into a NeRF.

ATT3D (Lorraine et al. 2023) and LATTE3D amortise score distillation over prompts: a text
embedding modulates a shared 3D field, and the whole set is optimised at once. Here the field is
the CPU NeRF's own (``DenseGridField``: a density grid and a colour grid), and the network is a
hypernetwork with a linear decoder:

    v = prior.prompt_vector(prompt)                      # the prior's text embedding [D]
    a, b = split(mlp(v)); a, b = a / |a|, b / |b|        # two unit codes [K]
    density = mean_density + a @ basis_density           # [R^3]
    colour  = mean_colour  + b @ basis_colour            # [3 C^3]

The mean grids carry what every prompt shares (a centred object); the ``K`` basis grids span how
prompts differ. A prompt's NeRF is rendered by the ordinary ``NeRF`` code with these grids in
place of its parameters (``torch.func.functional_call``), so renders, export, the mesh and the
eval are exactly a per-prompt NeRF's. Unit codes keep a step's change of any grid value at about
the basis learning rate whatever ``K`` is. Generation is one MLP call and one matrix product
(milliseconds on a CPU).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from threedgen.cameras import Cameras
from threedgen.modules import hold
from threedgen.representations.base import RenderOutput, Representation
from threedgen.representations.config import NeRFConfig, PromptGridsConfig
from threedgen.representations.fields import total_variation
from threedgen.representations.nerf import NeRF


def grid_nerf_config(cfg: NeRFConfig) -> NeRFConfig:
    """``cfg`` for a dense-grid NeRF on the dense sampler (what the generator's grids fill)."""
    out = copy.deepcopy(cfg)
    out.field, out.sampler = "grid", "dense"
    return out


class _Render(torch.nn.Module):
    """``render`` as ``forward``, so that ``functional_call`` can swap the grids in."""

    def __init__(self, nerf: NeRF):
        super().__init__()
        self.nerf = nerf

    def forward(self, cameras: Cameras, height: int, width: int) -> RenderOutput:
        return self.nerf.render(cameras, height, width)


class PromptGrids(Representation):
    name = "prompt_grids"

    def __init__(self, nerf_cfg: NeRFConfig, cfg: PromptGridsConfig, embed_dim: int,
                 device: torch.device | str = "cpu"):
        super().__init__()
        self.cfg, self.embed_dim = cfg, int(embed_dim)
        self.nerf_cfg = grid_nerf_config(nerf_cfg)
        r, c, k, h = nerf_cfg.density_resolution, nerf_cfg.color_resolution, cfg.latent, cfg.hidden
        self.density_shape, self.color_shape = (1, r, r, r), (3, c, c, c)
        self.mapping = torch.nn.Sequential(
            torch.nn.Linear(self.embed_dim, h), torch.nn.SiLU(), torch.nn.Linear(h, h), torch.nn.SiLU(),
            torch.nn.Linear(h, 2 * k))
        # Zero grids: at the start every prompt is the per-prompt NeRF's initial blob.
        self.mean_density = torch.nn.Parameter(torch.zeros(r ** 3))
        self.mean_color = torch.nn.Parameter(torch.zeros(3 * c ** 3))
        self.basis_density = torch.nn.Parameter(torch.zeros(k, r ** 3))
        self.basis_color = torch.nn.Parameter(torch.zeros(k, 3 * c ** 3))
        nerf = NeRF(self.nerf_cfg, device)
        hold(self, "_renderer", _Render(nerf))  # its own grids are never used: each prompt's replace them
        self.to(device)  # the renderer too (``_apply``): its empty-space grid's buffers are used as they are

    def _apply(self, fn, recurse=True):
        """``to``/``cuda``/``cpu``/... move the held renderer with the generator: it is not a
        submodule (not saved, not counted), but its buffers (the empty-space grid) take part in
        every render on the generator's device."""
        super()._apply(fn, recurse)
        renderer = self.__dict__.get("_renderer")
        if renderer is not None:
            renderer._apply(fn, recurse)
        return self

    def codes(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit density and colour codes ``[P,K]`` each, for prompt vectors ``[P,D]``."""
        a, b = self.mapping(vectors.to(self.mean_density)).chunk(2, dim=-1)
        return F.normalize(a, dim=-1), F.normalize(b, dim=-1)

    def grids(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw density ``[P,1,R,R,R]`` and colour ``[P,3,C,C,C]`` grids (the NeRF field's parameters)."""
        a, b = self.codes(vectors)
        density = self.mean_density + a @ self.basis_density
        color = self.mean_color + b @ self.basis_color
        return density.view(-1, *self.density_shape), color.view(-1, *self.color_shape)

    def render_grids(self, density: torch.Tensor, color: torch.Tensor, cameras: Cameras, height: int,
                     width: int) -> RenderOutput:
        """One prompt's render: the NeRF with ``density [1,R,R,R]`` and ``color [3,C,C,C]`` as its field."""
        renderer = self._renderer
        renderer.nerf.train(self.training)
        if renderer.nerf.empty_grid is not None:
            # Empty-space skipping from this prompt's own density: the grid is rebuilt (at cell
            # centres, no running maximum) from the swapped-in field before the render.
            renderer.nerf.empty_grid.fresh = False
        return torch.func.functional_call(renderer, {"nerf.field.density": density, "nerf.field.color": color},
                                          (cameras, height, width))

    @staticmethod
    def total_variation(density: torch.Tensor) -> torch.Tensor:
        """The density grids' total variation (``loss.lambda_smooth``), averaged over prompts."""
        return total_variation(density)

    def parameter_groups(self) -> list[dict]:
        cfg = self.cfg
        return [{"params": list(self.mapping.parameters()), "lr": cfg.lr_mapping, "name": "mapping"},
                {"params": [self.basis_density, self.basis_color], "lr": cfg.lr_basis, "name": "basis"},
                {"params": [self.mean_density, self.mean_color], "lr": cfg.lr_mean, "name": "mean"}]

    def make_optimizers(self, betas: tuple[float, float], eps: float) -> dict[str, torch.optim.Optimizer]:
        """One Adam over every group, fused (one kernel over all tensors: 15 ms instead of 83 ms a
        step for the default model's 11.5 M numbers on one CPU core)."""
        self.optimizers = {self.name: torch.optim.Adam(self.parameter_groups(), betas=betas, eps=eps, fused=True)}
        return self.optimizers

    def backends(self) -> dict:
        return {"field": "prompt grids", "sampler": "dense", "fallbacks": []}

    @torch.no_grad()
    def nerf_for(self, vector: torch.Tensor, nerf_cfg: NeRFConfig) -> NeRF:
        """A per-prompt ``NeRF`` (dense grids, configured by ``nerf_cfg``) holding the grids
        generated for one prompt vector ``[D]``: render, export and evaluate it like a trained run's."""
        density, color = self.grids(vector.view(1, -1))
        device = self.mean_density.device
        nerf = NeRF(nerf_cfg, device).to(device)  # NeRF(cfg, device) chooses by the device; .to places it
        nerf.field.density.copy_(density[0])
        nerf.field.color.copy_(color[0])
        return nerf.eval()
