"""The Prior contract: a frozen diffusion model as score distillation sees it.

A prior maps rendered RGB into its model space (``encode_images``), predicts noise for a batch of
noisy inputs with one conditioning per item (``predict_noise``; cond and uncond are batched by the
caller into one call), and exposes its noise schedule as ``noise`` (a ``threedgen.noise.NoiseSchedule``:
``alphas_cumprod``, the model's ``prediction_type``, and the algebra the guidance methods share).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from threedgen.cameras import Cameras, view_tag
from threedgen.noise import NoiseSchedule

VIEW_TAGS = ("front", "side", "back", "overhead")


def sd_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                      beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's schedule: "scaled_linear" betas (linear in sqrt(beta)), cumulative
    product of ``1 - beta``. float32 ``[T]``, as diffusers' schedulers compute it."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def mix(a, b, r: float):
    """``r a + (1 - r) b`` for text embeddings; conditionings of other kinds mix themselves."""
    return r * a + (1 - r) * b if isinstance(a, torch.Tensor) else a.mix(b, r)


def can_mix(cond: Any) -> bool:
    return isinstance(cond, torch.Tensor) or hasattr(cond, "mix")


def azimuth_mix(azimuth: float) -> tuple[str, str, float]:
    """The two view prompts a camera at ``azimuth`` (degrees) interpolates and the weight ``r`` of
    the first (LucidDreamer's and Dreamer XL's ``train.py``, threestudio's Perp-Neg positive):
    ``|az| < 90``: front and side, ``r = 1 - |az| / 90``; else side and back, ``r = 2 - |az| / 90``."""
    az = abs((azimuth + 180.0) % 360.0 - 180.0)
    return ("front", "side", 1.0 - az / 90.0) if az < 90.0 else ("side", "back", 2.0 - az / 90.0)


@dataclass
class PromptEmbeds:
    """A prompt as the prior understands it, computed once per run.

    ``cond``: the prompt; ``uncond``: the negative prompt (or the empty prompt when none);
    ``empty``: the empty prompt; ``by_view``: view-dependent variants of ``cond`` keyed by view tag
    (empty when the prior does not use view-dependent prompting), chosen per camera with
    ``view_thresholds`` (front, back, overhead; degrees). Values are prior-specific conditioning
    objects (text-encoder tensors, or the shapes prior's object sets). ``perp_neg``: the guidance
    combines the views by Perp-Neg (``threedgen.guidance.classifier_free``); needs conditionings that
    mix (tensors, or conditionings with a ``mix(other, r)`` method). ``perp_neg_scale``: Perp-Neg's
    negatives weigh ``perp_neg_scale * (a exp(-b r) + c)`` (the guidance's setting, set per call).
    """

    prompt: str
    negative_prompt: str
    cond: Any
    uncond: Any
    empty: Any
    by_view: dict[str, Any] = field(default_factory=dict)
    view_thresholds: tuple[float, float, float] = (45.0, 45.0, 60.0)
    perp_neg: bool = False
    perp_neg_scale: float = -1.0

    def tags_for(self, cameras: Cameras) -> list[str]:
        front, back, overhead = self.view_thresholds
        return [view_tag(float(e), float(a), front, overhead, back)
                for e, a in zip(cameras.elevation.tolist(), cameras.azimuth.tolist())]

    def cond_for(self, cameras: Cameras) -> list[Any]:
        """One conditioning per camera: the view-dependent variant where there is one."""
        return [self.by_view.get(tag, self.cond) for tag in self.tags_for(cameras)] if self.by_view \
            else [self.cond] * len(cameras)

    def interpolated_for(self, cameras: Cameras) -> list[Any]:
        """One conditioning per camera: the view prompts interpolated by azimuth
        (``azimuth_mix``); cameras tagged overhead take the overhead prompt. Without
        front/side/back conditionings that mix, the view tag's (``cond_for``)."""
        views = self.by_view
        if any(v not in views for v in ("front", "side", "back")) or not can_mix(self.cond):
            return self.cond_for(cameras)
        out = []
        for tag, az in zip(self.tags_for(cameras), cameras.azimuth.tolist()):
            if tag == "overhead":
                out.append(views.get("overhead", self.cond))
            else:
                a, b, r = azimuth_mix(az)
                out.append(mix(views[a], views[b], r))
        return out

    def uncond_for(self, cameras: Cameras) -> list[Any]:
        return [self.uncond] * len(cameras)

    def empty_for(self, cameras: Cameras) -> list[Any]:
        return [self.empty] * len(cameras)


class Prior(torch.nn.Module):
    """Base class of priors. Subclasses set the attributes (``noise`` in ``__init__``) and
    implement the three methods."""

    num_train_timesteps: int = 1000
    resolution: int = 64  # model-space input size the prior expects from encode_images
    # A diffusers UNet that a LoRA fake score can adapt (``unet``, ``unet_output``, ``place``).
    supports_lora: bool = False
    noise: NoiseSchedule

    @property
    def camera_conditioned(self) -> bool:
        """Whether ``predict_noise`` uses the cameras' poses, so that a mirrored render is not the
        view its camera describes (Stable Diffusion and IF: no)."""
        return False

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.noise.alphas_cumprod

    @property
    def prediction_type(self) -> str:
        """What the model predicts: ``epsilon``, ``v_prediction`` or ``sample``."""
        return self.noise.prediction_type

    @classmethod
    def build(cls, cfg, device: torch.device) -> "Prior":
        return cls(cfg).to(device)

    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> PromptEmbeds:
        raise NotImplementedError

    def prompt_vector(self, embeds: PromptEmbeds) -> torch.Tensor:
        """One vector ``[D]`` per prompt, what an amortised generator is conditioned on: here the
        text encoder's hidden states of ``embeds.cond`` averaged over the tokens."""
        cond = embeds.cond
        if not torch.is_tensor(cond):
            raise NotImplementedError(f"{type(self).__name__} has no prompt vector")
        return cond.detach().float().reshape(-1, cond.shape[-1]).mean(0)

    def encode_images(self, rgb: torch.Tensor) -> torch.Tensor:
        """Differentiable: rgb ``[B,3,H,W]`` in [0,1] -> model space."""
        raise NotImplementedError

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Sequence[Any],
                      views: Optional[Cameras] = None) -> torch.Tensor:
        """eps prediction ``[N,C,h,w]`` for ``x_t [N,C,h,w]``, integer ``t [N]``, one conditioning
        per item, and optionally the camera (with its background) each item was rendered from."""
        raise NotImplementedError

    @classmethod
    def truth(cls, prompt: str):
        """The true object for ``prompt`` (shapes prior only); None where the prior has no truth."""
        return None
