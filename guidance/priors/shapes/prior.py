"""The embedded ``shapes`` prior: an exact diffusion model of a small world of coloured shapes.

For a finite image set {X_i} with prior weights pi_i, diffused as ``x_t = a_t x0 + s_t eps``, the
optimal denoiser is exact:

    w_i    = softmax_i( log pi_i - ||x_t - a_t X_i||^2 / (2 s_t^2) )
    x0_hat = sum_i w_i X_i,        eps_hat = (x_t - a_t x0_hat) / s_t

The images are every (shape, colour, teacher view) of the world, composited over the background
the render used. Colour is separable (``X = 2 albedo * shade - 2 b * alpha + (2 b - 1)`` in [-1,1]
pixel space), so the squared distances to all colours of a (shape, view) come from a handful of dot
products: the whole mixture is two matrix products per batch.

Conditioning: the prompt selects its object's images; the unconditional branch is every object of
the world (or the negative prompt's objects), so classifier-free guidance means something. The
optional camera kernel ``log pi_v = kappa * <d, d_v>`` (von Mises-Fisher on viewing directions)
weights teacher views by their closeness to the render's camera; both branches keep it (the text is
dropped, not the camera). With ``camera_kappa = 0`` the prior is text-only, like Stable Diffusion,
and view-dependent prompt tags restrict the text branch to teacher views with the same tag (softly
when ``view_tag_strength < 1``); ``front_bias`` then puts a chosen share of the teacher's view mass
on front views, the bias a 2D model learns from images that mostly show fronts.

Objects with a front have a second part, the marker, in a fixed colour:
``X = 2 albedo * shade + 2 marker_colour * marker - 2 b * alpha + (2 b - 1)``, still separable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from threedgen.cameras import Cameras, view_tag
from threedgen.errors import UserError
from threedgen.guidance.priors.base import VIEW_TAGS, Prior, PromptEmbeds, sd_alphas_cumprod
from threedgen.guidance.priors.config import ShapesPriorConfig
from threedgen.guidance.priors.shapes import render as shapes_render
from threedgen.guidance.priors.shapes.sdf import SDFS, marker_share
from threedgen.guidance.priors.shapes.vocab import (
    COLOURS,
    FRONT_MARKERS,
    MARKER_COLOUR,
    SHAPES,
    parse_negative,
    parse_prompt,
)
from threedgen.noise import NoiseSchedule


@dataclass(frozen=True)
class ShapesCondition:
    """A set of objects (indices into ``ShapesPrior.objects``) and the view tags it asks for:
    ``views`` holds ``(tag, weight)`` pairs (empty: no view tag). Perp-Neg mixes two view
    conditionings (``mix``), the analogue of interpolating two text embeddings: the result asks
    for either tag with those weights."""

    objects: tuple[int, ...]
    views: tuple[tuple[str, float], ...] = ()

    @property
    def view_tag(self) -> Optional[str]:
        """The one tag asked for (None when there is none, or a mixture)."""
        return self.views[0][0] if len(self.views) == 1 else None

    def mix(self, other: "ShapesCondition", r: float) -> "ShapesCondition":
        """``r`` of this conditioning's tags and ``1 - r`` of ``other``'s, over the same objects."""
        if self.objects != other.objects:
            raise ValueError("only conditionings over the same objects mix")
        weights: dict[str, float] = {}
        for views, share in ((self.views, r), (other.views, 1.0 - r)):
            for tag, w in views:
                weights[tag] = weights.get(tag, 0.0) + share * w
        return ShapesCondition(self.objects, tuple((t, w) for t, w in weights.items() if w > 0))


def truth_mesh(shape: str, resolution: int = 160):
    """A triangle mesh of the shape's zero level set (marching cubes on the exact SDF), built once
    and cached on disk beside the teacher maps."""
    import trimesh  # heavy: only for evaluation's truth mesh

    def build():
        import mcubes  # only when the truth mesh is not cached yet

        bound = 0.55
        lin = torch.linspace(-bound, bound, resolution, dtype=torch.float64)
        grid = torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), -1)
        values = SDFS[shape](grid).numpy()
        verts, faces = mcubes.marching_cubes(-values, 0.0)
        verts = verts * (2 * bound / (resolution - 1)) - bound
        mesh = trimesh.Trimesh(np.asarray(verts, np.float64), np.asarray(faces, np.int64), process=True)
        trimesh.repair.fix_normals(mesh)
        return {"vertices": np.asarray(mesh.vertices), "faces": np.asarray(mesh.faces)}

    arrays = shapes_render.disk_cached("truth", f"{shape}-{resolution}",
                                       {"version": shapes_render.RENDER_VERSION, "shape": shape,
                                        "resolution": resolution, "mesher": 1}, build)
    return trimesh.Trimesh(arrays["vertices"], arrays["faces"], process=False)


@dataclass
class ShapeTruth:
    """The true object of a prompt: its SDF, colours and a mesh, for evaluation. Objects with a
    front (``has_front``) carry a marker in ``marker_colour`` on their +Z side."""

    shape: str
    colour: str
    albedo: tuple[float, float, float]
    _mesh: object = None

    @property
    def has_front(self) -> bool:
        return self.shape in FRONT_MARKERS

    @property
    def marker_colour(self) -> Optional[tuple[float, float, float]]:
        return MARKER_COLOUR if self.has_front else None

    def sdf(self, points: torch.Tensor) -> torch.Tensor:
        return SDFS[self.shape](points)

    def albedo_at(self, points: torch.Tensor) -> torch.Tensor:
        """The colour of the part nearest each point ``[...,3]``: the marker's or the body's."""
        share = marker_share(self.shape, points)[..., None]
        body, marker = points.new_tensor(self.albedo), points.new_tensor(MARKER_COLOUR)
        return body * (1 - share) + marker * share

    def nearest_surface(self, points: torch.Tensor, iterations: int = 3, eps: float = 1e-5):
        """``(surface points, outward unit normals)`` at the truth's surface point nearest each point
        ``[N,3]`` (float64): steps ``p <- p - sdf(p) grad(p)`` along the SDF's central-difference
        gradient, exact for a point whose nearest surface point is on a smooth part."""
        p = points.double()
        offsets = torch.eye(3, dtype=torch.float64) * eps

        def gradient(q):
            g = torch.stack([self.sdf(q + o) - self.sdf(q - o) for o in offsets], -1) / (2 * eps)
            return g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)

        for _ in range(iterations):
            p = p - self.sdf(p)[..., None] * gradient(p)
        return p, gradient(p)

    def shaded_color(self, points: torch.Tensor) -> torch.Tensor:
        """The colour the teacher's renders show at the surface point nearest each point ``[N,3]``:
        albedo (the marker's or the body's) x ``ambient + diffuse * max(0, n . light)``, the
        view-independent shading of ``shapes_render``, which a representation learns as its colour."""
        surface, normal = self.nearest_surface(points)
        light = torch.tensor(shapes_render.LIGHT_DIR, dtype=torch.float64)
        shade = shapes_render.AMBIENT + shapes_render.DIFFUSE * (normal @ (light / light.norm())).clamp(min=0)
        return self.albedo_at(surface) * shade[:, None]

    def mesh(self):
        if self._mesh is None:
            self._mesh = truth_mesh(self.shape)
        return self._mesh

    def render(self, cameras: Cameras, height: int, width: int, supersample: int = 2):
        """``rgb [B,H,W,3]`` over each camera's background and ``alpha [B,H,W]``."""
        maps = shapes_render.sphere_trace(self.shape, cameras, height, width, supersample)
        bg = cameras.background[:, None, None, :].float()
        rgb = (torch.tensor(self.albedo) * maps.shade[..., None] + torch.tensor(MARKER_COLOUR) * maps.marker[..., None]
               + bg * (1 - maps.alpha[..., None]))
        return rgb, maps.alpha


class ShapesPrior(Prior):
    def __init__(self, cfg: ShapesPriorConfig | None = None):
        super().__init__()
        cfg = cfg or ShapesPriorConfig()
        self.cfg = cfg
        self.resolution = int(cfg.resolution)
        self.shapes = tuple(cfg.shapes) if cfg.shapes else SHAPES
        for s in self.shapes:
            if s not in SHAPES:
                raise UserError(f"unknown shape {s!r} in prior.shapes; valid: {', '.join(SHAPES)}")
        self.colours = tuple(COLOURS)
        self.objects = [(s, c) for s in range(len(self.shapes)) for c in range(len(self.colours))]
        self.grid = shapes_render.ViewGrid(tuple(float(e) for e in cfg.elevations), float(cfg.azimuth_step),
                                           float(cfg.distance), float(cfg.fovy))
        teacher = self.grid.cameras()
        self.teacher_tags = [view_tag(float(e), float(a)) for e, a in zip(teacher.elevation, teacher.azimuth)]
        maps = [torch.stack(shapes_render.cached_maps(s, self.grid, self.resolution, cfg.supersample), 1)
                for s in self.shapes]  # each [V,3,H,W]
        m = torch.stack(maps).flatten(3)  # [S,V,3,HW]: body shade, marker shade (premultiplied), alpha
        ones = torch.ones_like(m[:, :, :1])
        basis = torch.cat([m, ones], 2).double()
        self.register_buffer("maps", m, persistent=False)
        self.register_buffer("gram", basis @ basis.transpose(-1, -2), persistent=False)  # [S,V,4,4]
        self.register_buffer("teacher_dirs", teacher.view_dirs, persistent=False)  # [V,3]
        self.register_buffer("albedo", torch.tensor([COLOURS[c] for c in self.colours]), persistent=False)
        self.register_buffer("marker_colour", torch.tensor(MARKER_COLOUR, dtype=torch.float64), persistent=False)
        self.noise = NoiseSchedule(sd_alphas_cumprod(self.num_train_timesteps))  # predict_noise returns eps
        tags = torch.tensor([[t == tag for t in self.teacher_tags] for tag in VIEW_TAGS])
        self.register_buffer("tag_mask", tags, persistent=False)  # [4,V]
        self.register_buffer("view_bias", self.front_bias_log_prior(teacher.azimuth, cfg.front_bias), persistent=False)

    @property
    def camera_conditioned(self) -> bool:
        return float(self.cfg.camera_kappa) > 0

    @staticmethod
    def front_bias_log_prior(azimuth: torch.Tensor, front_bias: Optional[float]) -> torch.Tensor:
        """``log pi_v`` ``[V]`` that gives front views (|azimuth| <= 45) the share ``front_bias`` of the
        mass, spread evenly over them and over the other views; zeros (uniform) when None."""
        az = (azimuth.double() + 180.0) % 360.0 - 180.0
        front = az.abs() <= 45.0 + 1e-6
        if front_bias is None or front.all() or not front.any():
            return torch.zeros(len(azimuth), dtype=torch.float64)
        n_front = int(front.sum())
        share = front.double() * (front_bias / n_front) + (~front).double() * ((1.0 - front_bias) / (len(azimuth) - n_front))
        return share.log() + math.log(len(azimuth))  # uniform -> 0

    # ---- prompts -------------------------------------------------------------------------
    def _object_index(self, colour: str, shape: str) -> int:
        if shape not in self.shapes:
            raise UserError(f"shape {shape!r} is not in this prior's world ({', '.join(self.shapes)})")
        return self.shapes.index(shape) * len(self.colours) + self.colours.index(colour)

    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> PromptEmbeds:
        colour, shape = parse_prompt(prompt)
        cond = ShapesCondition((self._object_index(colour, shape),))
        everything = ShapesCondition(tuple(range(len(self.objects))))
        uncond = everything
        patterns = parse_negative(negative_prompt) if negative_prompt.strip() else []
        if patterns:
            chosen = tuple(i for i, (s, c) in enumerate(self.objects)
                           if any((pc is None or self.colours[c] == pc) and (ps is None or self.shapes[s] == ps)
                                  for pc, ps in patterns))
            if not chosen:
                raise UserError(f"negative prompt {negative_prompt!r} names nothing in this prior's world")
            uncond = ShapesCondition(chosen)
        by_view = {}
        if self.cfg.camera_kappa == 0 and self.cfg.view_dependent_prompting:
            by_view = {tag: ShapesCondition(cond.objects, ((tag, 1.0),)) for tag in VIEW_TAGS}
        return PromptEmbeds(prompt, negative_prompt, cond, uncond, everything, by_view,
                            perp_neg=bool(self.cfg.perp_neg and by_view))

    def prompt_vector(self, embeds: PromptEmbeds) -> torch.Tensor:
        """The exact prior's text embedding: one-hot colour (12) then one-hot shape (its world's)."""
        colour, shape = parse_prompt(embeds.prompt)
        vector = torch.zeros(len(self.colours) + len(self.shapes))
        vector[self.colours.index(colour)] = 1.0
        vector[len(self.colours) + self.shapes.index(shape)] = 1.0
        return vector

    @classmethod
    def truth(cls, prompt: str) -> ShapeTruth:
        colour, shape = parse_prompt(prompt)
        return ShapeTruth(shape, colour, COLOURS[colour])

    # ---- images --------------------------------------------------------------------------
    def encode_images(self, rgb: torch.Tensor) -> torch.Tensor:
        if rgb.shape[-2:] != (self.resolution, self.resolution):
            rgb = F.interpolate(rgb, (self.resolution, self.resolution), mode="bilinear",
                                align_corners=False, antialias=True)
        return rgb * 2.0 - 1.0

    # ---- the exact denoiser --------------------------------------------------------------
    def log_view_prior(self, views: Optional[Cameras], n: int) -> torch.Tensor:
        """``log pi_v`` per item ``[N,V]`` (unnormalised; constants cancel in the softmax);
        ``-inf`` outside the kernel's support. Text-only: the front bias alone."""
        kappa, max_angle = float(self.cfg.camera_kappa), float(self.cfg.camera_kernel_max_angle)
        if views is None or kappa == 0:
            return self.view_bias[None].expand(n, -1).to(self.maps.device)
        cos = views.view_dirs.to(self.teacher_dirs).double() @ self.teacher_dirs.double().T
        log_pi = kappa * cos
        if 0 < max_angle < 180:
            support = cos >= math.cos(math.radians(max_angle))
            # Never leave an item without views: keep its nearest teacher view at least.
            support |= cos >= cos.max(dim=1, keepdim=True).values
            log_pi = log_pi.masked_fill(~support, float("-inf"))
        return log_pi

    def log_tag_weights(self, views: tuple[tuple[str, float], ...], view_ids: torch.Tensor) -> Optional[torch.Tensor]:
        """``log sum_tag w_tag L_tag(v)`` over the teacher views ``view_ids``, where ``L_tag(v)`` is 1 for
        views with the tag, ``1 - view_tag_strength`` for views with another azimuth tag (front, side,
        back leak into each other) and 0 across the overhead line (elevation stays strict); None when
        nothing is asked."""
        if not views:
            return None
        leak = 1.0 - float(self.cfg.view_tag_strength)
        overhead = self.tag_mask[VIEW_TAGS.index("overhead")][view_ids]
        total = torch.zeros(len(view_ids), dtype=torch.float64, device=view_ids.device)
        for tag, w in views:
            mask = self.tag_mask[VIEW_TAGS.index(tag)][view_ids]
            other = ~mask & ~overhead if tag != "overhead" else torch.zeros_like(mask)
            total += w * (mask.double() + leak * other.double())
        if not (total > 0).any():  # a tag no teacher view has: the tag is ignored
            return None
        return total.log()

    @torch.no_grad()
    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Sequence[ShapesCondition],
                   views: Optional[Cameras] = None) -> torch.Tensor:
        """Posterior mean ``x0_hat [N,3,H,W]`` of the image given ``x_t``."""
        n, c, h, w = x_t.shape
        if (h, w) != (self.resolution, self.resolution) or c != 3:
            raise ValueError(f"shapes prior expects [N,3,{self.resolution},{self.resolution}], got {list(x_t.shape)}")
        if len(cond) != n:
            raise ValueError(f"{len(cond)} conditionings for {n} inputs")
        device = x_t.device
        n_colours = len(self.colours)
        log_pi = self.log_view_prior(views, n)
        # Only the (shape, view) maps some item can weight are read: the union over the batch, where
        # strict view tags (view_tag_strength 1) leave an item the views with its tags only.
        support = torch.isfinite(log_pi)
        if float(self.cfg.view_tag_strength) >= 1.0:
            every_view = torch.arange(support.shape[1], device=device)
            for i, cnd in enumerate(cond):
                tags = self.log_tag_weights(cnd.views, every_view)
                if tags is not None:
                    support[i] &= torch.isfinite(tags)
        view_ids = torch.nonzero(support.any(0)).flatten()
        shape_ids = torch.unique(torch.cat([torch.tensor(cnd.objects) // n_colours for cnd in cond])).to(device)
        log_pi = log_pi[:, view_ids]
        maps, gram = self.maps, self.gram  # [S',V',3,HW]: read in place when everything is needed (text-only)
        if len(view_ids) < maps.shape[1]:
            maps, gram = maps[:, view_ids], gram[:, view_ids]
        if len(shape_ids) < maps.shape[0]:
            maps, gram = maps[shape_ids], gram[shape_ids]
        S, V = maps.shape[:2]
        shape_pos = torch.full((len(self.shapes),), -1, dtype=torch.long, device=device)
        shape_pos[shape_ids] = torch.arange(S, device=device)
        x = x_t.reshape(n, 3, -1).float()
        flat = maps.reshape(S * V * maps.shape[2], -1)
        dots = (x @ flat.T).double().reshape(n, 3, S, V, maps.shape[2])  # x_ch . {shade, marker, alpha}
        sums = x.double().sum(-1)  # x_ch . 1
        abar = self.noise.alphas_cumprod.to(device)[t.long()].double()
        a, s2 = abar.sqrt(), 1.0 - abar
        bg = (views.background.to(device).double() if views is not None
              else torch.ones(n, 3, dtype=torch.float64, device=device))
        K = maps.shape[2]  # body shade, marker shade, alpha; the constant map is the 4th basis element
        agg = torch.zeros(n, 3, S, V, K + 1, dtype=torch.float64, device=device)
        for i, cnd in enumerate(cond):
            objs = torch.tensor(cnd.objects, device=device)
            shape_idx = shape_pos[objs // n_colours]
            albedo = self.albedo[objs % n_colours].double()  # [O,3]
            coef = torch.stack([2 * albedo, (2 * self.marker_colour).expand_as(albedo), (-2 * bg[i]).expand_as(albedo),
                                (2 * bg[i] - 1).expand_as(albedo)], -1)  # [O,3ch,4k]
            d = torch.cat([dots[i][:, shape_idx], sums[i][:, None, None, None].expand(3, len(objs), V, 1)], -1)  # [3ch,O,V,4k]
            x_dot_X = torch.einsum("ock,covk->ov", coef, d)
            X_norm2 = torch.einsum("ock,ovkl,ocl->ov", coef, gram[shape_idx], coef)
            logits = log_pi[i][None, :] - (a[i] ** 2 * X_norm2 - 2 * a[i] * x_dot_X) / (2 * s2[i])
            tag_weights = self.log_tag_weights(cnd.views, view_ids)
            if tag_weights is not None:
                logits = logits + tag_weights[None, :]
            weights = torch.softmax(logits.flatten(), 0).reshape(logits.shape)  # [O,V]
            # x0_hat = sum_i w_i X_i, collected per channel onto each (shape, view) basis map.
            agg[i].index_add_(1, shape_idx, torch.einsum("ov,ock->covk", weights, coef))
        out = (agg[..., :K].reshape(n * 3, S * V * K).float() @ flat).double()
        out = out.reshape(n, 3, h * w) + agg[..., K].sum((2, 3))[..., None]
        return out.reshape(n, 3, h, w).to(x_t.dtype)

    @torch.no_grad()
    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Sequence[ShapesCondition],
                      views: Optional[Cameras] = None) -> torch.Tensor:
        return self.noise.eps_from_x0(self.predict_x0(x_t, t, cond, views), x_t, t.long())
