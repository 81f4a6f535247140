"""The guidance methods' settings and their registry, ``GUIDANCE`` (torch-free).

One dataclass per method, registered with its implementation (``threedgen.guidance.<m>``), its
paper and its teacher passes per step; docs/guidance.md explains each rule and default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from threedgen.errors import UserError, check_range
from threedgen.registry import Registry
from threedgen.schedule import check_schedule

GUIDANCE = Registry("guidance")
SDS_WEIGHTINGS = ("sds", "uniform", "fantasia3d")


@dataclass
class GuidanceConfig:
    """What every method has: a CFG scale and the timestep range schedules (fractions of T)."""

    name: str = "guidance"
    """The method (`threedgen guidance list`)."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale, diffusers' convention: eps_u + s (eps_y - eps_u)."""
    min_step_percent: Any = 0.02
    """Lower end of the timestep range as a fraction of T; a schedule: a number, [v0, v1] or [start, v0, v1, end]."""
    max_step_percent: Any = 0.98
    """Upper end of the timestep range as a fraction of T; a schedule like `min_step_percent`."""
    perp_neg_scale: float = -1.0
    """Perp-Neg only (prior.perp_neg): the negatives' weights are this times a exp(-b r) + c (threestudio -1; ScaleDreamer -0.5)."""

    def check(self) -> None:
        check_schedule("guidance.min_step_percent", self.min_step_percent, 0.0, 1.0)
        check_schedule("guidance.max_step_percent", self.max_step_percent, 0.0, 1.0)
        check_range("guidance.perp_neg_scale", self.perp_neg_scale, -10, 0)


@GUIDANCE.register("sds", "threedgen.guidance.sds:SDS", "DreamFusion (Poole et al. 2022)",
                   "2: cond + uncond in one call (4 with Perp-Neg)")
@dataclass
class SDSConfig(GuidanceConfig):
    name: str = "sds"
    guidance_scale: float = 100.0
    weighting: str = "sds"
    """w(t): sds (1 - abar_t), uniform (1) or fantasia3d (sqrt(abar_t) (1 - abar_t))."""
    grad_clip: Any = None
    """Clip the gradient element-wise to [-c, c]; a schedule, or null for no clipping."""

    def check(self) -> None:
        super().check()
        if self.weighting not in SDS_WEIGHTINGS:
            raise UserError(f"guidance.weighting must be one of {', '.join(SDS_WEIGHTINGS)}; got {self.weighting!r}")
        check_schedule("guidance.grad_clip", self.grad_clip, 0.0, float("inf"))


@GUIDANCE.register("vsd", "threedgen.guidance.vsd:VSD", "ProlificDreamer (Wang et al. 2023)",
                   "2 + fake score: 1 fwd and 1 fwd/bwd (LoRA); pixel priors +1 teacher")
@dataclass
class VSDConfig(GuidanceConfig):
    name: str = "vsd"
    max_step_percent: Any = (0.2, 0.98, 0.5, 0.2)
    """U{20..980}, then U{20..500} after 20% of the run (a schedule)."""
    camera_dropout: float = 0.1
    """Probability that the fake score is trained without the camera."""
    lambda_fake: float = 1.0
    """Weight of the fake score's denoising loss."""
    lora_rank: int = 4
    """Rank of the fake score's LoRA (diffusers priors)."""
    lora_lr: float = 1e-4
    """Learning rate of the LoRA fake score."""
    fake_score_channels: list[int] = field(default_factory=lambda: [16, 32, 32])
    """Channels of the small camera-conditioned UNet used as the fake score on pixel priors."""
    fake_score_lr: float = 1e-3
    """Learning rate of the pixel fake score."""

    def check(self) -> None:
        super().check()
        check_range("guidance.camera_dropout", self.camera_dropout, 0, 1)
        check_range("guidance.lambda_fake", self.lambda_fake, 0, 1e6)
        check_range("guidance.lora_rank", self.lora_rank, 1, 1024, integer=True)
        check_range("guidance.lora_lr", self.lora_lr, 0, 1)
        check_range("guidance.fake_score_lr", self.fake_score_lr, 0, 1)
        channels = self.fake_score_channels
        if not channels or any(not isinstance(c, int) or c < 8 or c % 8 for c in channels):
            raise UserError("guidance.fake_score_channels must be a list of multiples of 8, e.g. [32, 64, 64]; "
                            f"got {channels!r}")


@GUIDANCE.register("esd", "threedgen.guidance.esd:ESD", "Taming Mode Collapse (Wang et al. 2024)",
                   "as VSD + 1 fake-score fwd (camera-free branch)")
@dataclass
class ESDConfig(VSDConfig):
    name: str = "esd"
    entropy_weight: float = 0.5
    """lambda: the weight of the camera-free fake score (0 is VSD)."""

    def check(self) -> None:
        super().check()
        check_range("guidance.entropy_weight", self.entropy_weight, 0, 1)
        if self.entropy_weight > 0 and self.camera_dropout <= 0:
            raise UserError("ESD needs guidance.camera_dropout > 0: the camera-free branch of the fake score is "
                            "only trained through camera dropout (0.1 is the usual value)")


@GUIDANCE.register("asd", "threedgen.guidance.asd:ASD", "ScaleDreamer (Ma et al. 2024)",
                   "3: cond, uncond, cond at t+dt in one call")
@dataclass
class ASDConfig(GuidanceConfig):
    name: str = "asd"
    min_step_percent: Any = (0.5, 0.02)
    max_step_percent: Any = (0.98, 0.5)
    plus_ratio: float = 0.1
    """dt as a fraction of (t - min_step)."""
    plus_random: bool = True
    """dt uniform in [0, max]; false: always the max."""
    perp_neg_scale: float = -0.5
    """Perp-Neg only (prior.perp_neg): the negatives' weights are this times a exp(-b r) + c (ScaleDreamer's SD config: -0.5)."""

    def check(self) -> None:
        super().check()
        check_range("guidance.plus_ratio", self.plus_ratio, 0, 10)


@GUIDANCE.register("tsm", "threedgen.guidance.tsm:TSM", "Dreamer XL (Miao et al. 2024)",
                   "ceil(s/200) inversion + 1 + 3 (target at mu with CFG)")
@dataclass
class TSMConfig(GuidanceConfig):
    name: str = "tsm"
    max_step_percent: Any = (0, 0.98, 0.5, 0.3)
    """0.98 -> 0.5 over the warm-up (LucidDreamer: 1,500 of 5,000 iterations)."""
    interval: Any = (0, 100, 80, 0.3)
    """dT = t - s in timesteps, annealed over the warm-up like the range (a schedule)."""
    gamma: float = 0.3
    """Weight of the predicted clean image in the target (1 = ISM)."""
    inversion_stride: int = 200
    """DDIM inversion step size in timesteps."""
    inversion_max_steps: int = 5
    """At most this many DDIM inversion steps to reach s."""
    noise_offset: float = 0.1
    """Offset noise: this times a per-channel constant (one per batch) is added to the noise."""
    grad_scale: float = 1.0
    """Multiplies the gradient."""
    pixel_grad_clip: Optional[float] = None
    """Rescale the loss so that its largest pixel-gradient channel is at most this (Dreamer XL: 0.05); null: off."""
    steps_offset: int = 1
    """Timesteps are indices plus this (diffusers' DDIM steps_offset in the official code): t ~ U{lo+offset..hi}, x~_0 noised at t = offset."""
    flip_prob: float = 0.5
    """Probability that the whole batch of renders is mirrored left-right (official: 0.5); never with a camera-conditioned prior."""
    view_interpolation: bool = True
    """CFG's prompt: the front/side/back prompts interpolated by azimuth (official); false: the view tag's prompt."""

    def check(self) -> None:
        super().check()
        check_range("guidance.steps_offset", self.steps_offset, 0, 10, integer=True)
        check_range("guidance.flip_prob", self.flip_prob, 0, 1)
        check_range("guidance.gamma", self.gamma, 0, 1)
        check_schedule("guidance.interval", self.interval, 0, 1000)
        check_range("guidance.inversion_stride", self.inversion_stride, 1, 1000, integer=True)
        check_range("guidance.inversion_max_steps", self.inversion_max_steps, 1, 1000, integer=True)
        check_range("guidance.noise_offset", self.noise_offset, 0, 10)
        check_range("guidance.grad_scale", self.grad_scale, 0, 1e6)
        if self.pixel_grad_clip is not None:
            check_range("guidance.pixel_grad_clip", self.pixel_grad_clip, 1e-12, 1e6)


@GUIDANCE.register("ism", "threedgen.guidance.tsm:TSM", "LucidDreamer (Liang et al. 2024)",
                   "ceil(s/200) inversion + 1 + 2")
@dataclass
class ISMConfig(TSMConfig):
    name: str = "ism"
    gamma: float = 1.0


@GUIDANCE.register("bsd", "threedgen.guidance.bsd:BSD", "PlacidDreamer (Huang et al. 2024)",
                   "2: cond + uncond in one call")
@dataclass
class BSDConfig(GuidanceConfig):
    name: str = "bsd"
    guidance_scale: float = 15.0
    """The classifier : smoothing ratio."""
    max_step_percent: Any = (0, 0.98, 0.5, 0.3)
    noise_offset: float = 0.1
    """Offset noise: this times a per-channel constant (one per batch) is added to the noise."""
    grad_scale: float = 1.0
    """Multiplies the gradient."""
    steps_offset: int = 1
    """Timesteps are indices plus this (diffusers' DDIM steps_offset in the official code): t ~ U{lo+offset..hi}."""
    flip_prob: float = 0.5
    """Probability that the whole batch of renders is mirrored left-right (official: 0.5); never with a camera-conditioned prior."""
    view_interpolation: bool = True
    """The prompt: the front/side/back prompts interpolated by azimuth (official); false: the view tag's prompt."""

    def check(self) -> None:
        super().check()
        check_range("guidance.noise_offset", self.noise_offset, 0, 10)
        check_range("guidance.grad_scale", self.grad_scale, 0, 1e6)
        check_range("guidance.steps_offset", self.steps_offset, 0, 10, integer=True)
        check_range("guidance.flip_prob", self.flip_prob, 0, 1)


@GUIDANCE.register("csm", "threedgen.guidance.csm:CSM", "TV-3DG (2024), after CSD (Yu et al. 2024)",
                   "ceil(t/200) inversion + 2")
@dataclass
class CSMConfig(GuidanceConfig):
    name: str = "csm"
    weighting: str = "sds"
    """w(t): sds (1 - abar_t) or uniform."""
    normalize: bool = False
    """g <- g / ||g|| over the whole batch (CSD's grad_normalize)."""
    inversion_stride: int = 200
    """DDIM inversion step size in timesteps."""
    inversion_max_steps: int = 5
    """At most this many DDIM inversion steps to reach t."""

    def check(self) -> None:
        super().check()
        if self.weighting not in ("sds", "uniform"):
            raise UserError(f"guidance.weighting must be sds or uniform; got {self.weighting!r}")
        check_range("guidance.inversion_stride", self.inversion_stride, 1, 1000, integer=True)
        check_range("guidance.inversion_max_steps", self.inversion_max_steps, 1, 1000, integer=True)
