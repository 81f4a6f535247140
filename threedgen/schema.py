"""The run's configuration schema: the fixed sections of ``RunConfig`` and their rules.

Every default of the project lives in a dataclass (here, or in the component config modules
``threedgen.guidance.config``, ``threedgen.representations.config``,
``threedgen.guidance.priors.config``), with a docstring under each field that
``threedgen config keys`` prints. Each section's ``check()`` owns its rules; ``RunConfig.check()``
runs them all, once, in ``threedgen.config.build_config``. Torch-free on purpose.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from threedgen.errors import UserError, check_range

MAX_PROMPT_CHARS = 1000
ASCII_INTEGER = re.compile(r"[0-9]{1,18}")


def is_ascii_integer(text) -> bool:
    """``text`` is a plain decimal integer of ASCII digits, nothing around it: what ``int()`` may
    then be given. (``str.isdigit`` accepts superscripts, on which ``int`` fails, and ``int``
    accepts other scripts' digits, which a form or a flag should not.)"""
    return isinstance(text, str) and ASCII_INTEGER.fullmatch(text) is not None


MAX_STEPS = 1_000_000
MAX_VERIFY_STEPS = 1000  # fingerprinted steps at most (threedgen verify replays them)
MESH_FORMATS = ("glb", "obj", "ply")
TEXTURE_MODES = ("uv", "vertex")


def check_int(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not (low <= value <= high):
        raise UserError(f"{name} must be an integer from {low} to {high}; got {value!r}")


def check_pair(name: str, value, low: float, high: float) -> None:
    for v in value:
        check_range(name, v, low, high)
    if len(value) != 2 or value[0] > value[1]:
        raise UserError(f"{name} must be [low, high] with low <= high; got {list(value)}")


def check_faces(value, name: str = "export.faces") -> None:
    """``export.faces`` and ``threedgen export --faces``: 0 (no decimation) or at least 100."""
    check_int(name, value, 0, 10_000_000)
    if 0 < value < 100:
        raise UserError(f"{name} must be 0 (no decimation) or at least 100; got {value}")


def check_device(value) -> None:
    if value not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", str(value)):
        raise UserError(f"device must be auto, cpu, cuda or cuda:N; got {value!r}")


def clean_prompt(prompt: str, what: str = "prompt") -> str:
    """Strip control characters (NUL included; tabs and line breaks become spaces) and surrounding
    space; enforce the length cap."""
    if not isinstance(prompt, str):
        raise UserError(f"{what} must be text")
    if len(prompt) > 4 * MAX_PROMPT_CHARS:  # before the character-by-character cleaning, whatever it would strip
        raise UserError(f"{what} is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
    # a tab or line break separates words as a space does; other controls (NUL, bidi marks) go
    text = "".join(" " if ch.isspace() else ch for ch in prompt if ch.isspace() or unicodedata.category(ch)[0] != "C")
    text = " ".join(text.split()) if what == "prompt" else text.strip()
    if len(text) > MAX_PROMPT_CHARS:
        raise UserError(f"{what} is {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
    if what == "prompt" and not text:
        raise UserError("prompt is empty; give a description such as --prompt \"a red cube\"")
    return text


@dataclass
class CameraSamplerConfig:
    """Ranges of the random training cameras (degrees for angles)."""

    batch_size: int = 1
    """Views rendered per training step."""
    elevation_range: tuple[float, float] = (-10.0, 65.0)
    """[low, high] elevation of the training cameras, degrees above the horizon."""
    azimuth_range: tuple[float, float] = (-180.0, 180.0)
    """[low, high] azimuth of the training cameras, degrees (0 = the front, +Z)."""
    distance_range: tuple[float, float] = (2.5, 2.5)
    """[low, high] distance of the training cameras from the origin, world units."""
    fovy_range: tuple[float, float] = (40.0, 40.0)
    """[low, high] vertical field of view of the training cameras, degrees."""
    random_background_prob: float = 0.5
    """Probability that a step renders over a random background colour (the rest use `background`)."""
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """The background colour (RGB in [0, 1]) of the steps without a random one."""

    def check(self) -> None:
        check_int("camera.batch_size", self.batch_size, 1, 64)
        check_pair("camera.elevation_range", self.elevation_range, -90, 90)
        check_pair("camera.azimuth_range", self.azimuth_range, -360, 360)
        check_pair("camera.distance_range", self.distance_range, 0.1, 100)
        check_pair("camera.fovy_range", self.fovy_range, 1, 170)
        check_range("camera.random_background_prob", self.random_background_prob, 0, 1)
        for v in self.background:
            check_range("camera.background", v, 0, 1)


@dataclass
class RenderConfig:
    resolution: int = 64
    """Training render size in pixels (square); the prior resizes what it is given."""
    coarse_resolution: int = 0
    """Progressive resolution: render at this size (0 = off) for the first `coarse_until` of the run."""
    coarse_until: float = 0.0
    """The fraction of the steps rendered at `coarse_resolution`."""

    def size_at(self, step: int, max_steps: int) -> int:
        if self.coarse_resolution and step < self.coarse_until * max_steps:
            return self.coarse_resolution
        return self.resolution

    def check(self) -> None:
        check_int("render.resolution", self.resolution, 8, 1024)
        check_int("render.coarse_resolution", self.coarse_resolution, 0, 1024)
        if self.coarse_resolution and self.coarse_resolution < 8:
            raise UserError(f"render.coarse_resolution must be 0 (off) or from 8 to 1024; got {self.coarse_resolution}")
        until = self.coarse_until
        if isinstance(until, bool) or not isinstance(until, (int, float)) or not 0 <= until <= 1:
            raise UserError(f"render.coarse_until must be a fraction of the run from 0 to 1; got {until!r}")


@dataclass
class LossConfig:
    lambda_sparsity: float = 0.0
    """Weight of the mean opacity of the render (fewer floaters)."""
    lambda_opaque: float = 0.0
    """Weight of the binary entropy of the render's opacity (pushes alpha to 0 or 1)."""
    lambda_smooth: float = 0.0
    """Weight of the representation's smoothness term: a dense NeRF's density total variation (none for the hash field), the Gaussians' flatness (mean smallest scale over init_radius)."""

    def check(self) -> None:
        check_range("loss.lambda_sparsity", self.lambda_sparsity, 0, 1e6)
        check_range("loss.lambda_opaque", self.lambda_opaque, 0, 1e6)
        check_range("loss.lambda_smooth", self.lambda_smooth, 0, 1e6)


@dataclass
class OptimizerConfig:
    betas: tuple[float, float] = (0.9, 0.99)
    """Adam's betas."""
    eps: float = 1e-15
    """Adam's epsilon."""
    rollback_after: int = 10
    """After this many steps in a row skipped as non-finite, go back to the last good state."""
    rollback_lr_factor: float = 0.5
    """Every learning rate is multiplied by this at a rollback."""
    max_rollbacks: int = 3
    """More rollbacks than this fail the run as diverged."""

    def check(self) -> None:
        check_int("optimizer.rollback_after", self.rollback_after, 1, 100_000)
        check_int("optimizer.max_rollbacks", self.max_rollbacks, 0, 100)
        check_range("optimizer.rollback_lr_factor", self.rollback_lr_factor, 1e-6, 1)


@dataclass
class ExportConfig:
    resolution: int = 128
    """Marching-cubes grid size along each axis."""
    formats: list[str] = field(default_factory=lambda: list(MESH_FORMATS))
    """Mesh files to write: any of glb, obj, ply."""
    texture: str = "uv"
    """uv: xatlas unwrap + a baked PNG texture (GLB, OBJ); vertex: vertex colours only."""
    texture_size: int = 1024
    """Side of the baked texture image in pixels."""
    faces: int = 10000
    """Decimate to about this many faces (0: keep the marching-cubes mesh)."""
    scale: float = 1.0
    """Metres per world unit in the exported files."""
    video_frames: int = 36
    """Frames of the turntable video."""
    video_resolution: int = 128
    """Side of the turntable video in pixels."""
    video_elevation: float = 20.0
    """Elevation of the turntable camera, degrees."""
    evaluate: bool = True
    """Run `threedgen eval` after the run when the prior has a truth."""

    def check(self) -> None:
        check_int("export.resolution", self.resolution, 8, 1024)
        for fmt in self.formats:
            if fmt not in MESH_FORMATS:
                raise UserError(f"export.formats: unknown format {fmt!r}; valid: {', '.join(MESH_FORMATS)}")
        if self.texture not in TEXTURE_MODES:
            raise UserError(f"export.texture must be uv or vertex; got {self.texture!r}")
        check_int("export.texture_size", self.texture_size, 64, 8192)
        check_faces(self.faces)
        check_range("export.scale", self.scale, 1e-6, 1e6)
        check_int("export.video_frames", self.video_frames, 1, 1000)
        check_int("export.video_resolution", self.video_resolution, 16, 2048)
        check_range("export.video_elevation", self.video_elevation, -90, 90)


REFINE_LOSSES = ("denoised", "guidance")


@dataclass
class RefineConfig:
    """Stage 2: the exported mesh refined under the same prior (`threedgen refine`, `--refine`)."""

    enabled: bool = False
    """Refine the exported mesh after training (`threedgen run --refine`)."""
    steps: int = 100
    """Optimisation steps of the refinement."""
    loss: str = "denoised"
    """denoised: MSE to the prior's own multi-step denoise of each render from a moderate noise level (DreamGaussian's stage 2); guidance: the run's guidance method."""
    strength: float = 0.3
    """denoised: the noise level the denoise starts from, as a fraction of the prior's timesteps."""
    denoise_steps: int = 3
    """denoised: DDIM steps from that level down to a clean image."""
    guidance_scale: float = 7.5
    """denoised: classifier-free guidance scale of the denoise."""
    min_step_percent: float = 0.02
    """guidance: lowest timestep, as a fraction of the prior's."""
    max_step_percent: float = 0.5
    """guidance: highest timestep, as a fraction of the prior's."""
    resolution: int = 0
    """Render size in pixels (0: render.resolution, the prior's)."""
    supersample: int = 2
    """Rays per pixel along each axis (edges antialiased)."""
    texture_resolution: int = 128
    """Side of the texture correction's grid, added to the baked texture (bilinear)."""
    texture_lr: float = 0.005
    """Learning rate of the texture correction."""
    geometry: bool = False
    """Also move the mesh's vertices (per-vertex offsets; the surface stays closed)."""
    geometry_lr: float = 0.0005
    """Learning rate of the vertex offsets, world units."""
    lambda_laplacian: float = 100.0
    """geometry: weight of the offsets' uniform Laplacian."""
    lambda_normal: float = 1.0
    """geometry: weight of 1 - cos between neighbouring faces' normals."""

    def check(self) -> None:
        check_int("refine.steps", self.steps, 1, MAX_STEPS)
        if self.loss not in REFINE_LOSSES:
            raise UserError(f"refine.loss must be one of {', '.join(REFINE_LOSSES)}; got {self.loss!r}")
        check_range("refine.strength", self.strength, 0.01, 1)
        check_int("refine.denoise_steps", self.denoise_steps, 1, 100)
        check_range("refine.guidance_scale", self.guidance_scale, 0, 1000)
        check_range("refine.min_step_percent", self.min_step_percent, 0, 1)
        check_range("refine.max_step_percent", self.max_step_percent, 0, 1)
        if self.min_step_percent > self.max_step_percent:
            raise UserError(f"refine.min_step_percent ({self.min_step_percent}) is above refine.max_step_percent "
                            f"({self.max_step_percent})")
        check_int("refine.resolution", self.resolution, 0, 2048)
        if 0 < self.resolution < 8:
            raise UserError(f"refine.resolution must be 0 (the render resolution) or from 8 to 2048; got {self.resolution}")
        check_int("refine.supersample", self.supersample, 1, 4)
        check_int("refine.texture_resolution", self.texture_resolution, 4, 4096)
        check_range("refine.texture_lr", self.texture_lr, 0, 10)
        check_range("refine.geometry_lr", self.geometry_lr, 0, 1)
        check_range("refine.lambda_laplacian", self.lambda_laplacian, 0, 1e9)
        check_range("refine.lambda_normal", self.lambda_normal, 0, 1e9)
        for name in ("enabled", "geometry"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"refine.{name} must be true or false; got {getattr(self, name)!r}")


MAX_JANUS_RETRIES = 10
JUDGES = ("unbiased", "run")


@dataclass
class JanusConfig:
    """The Janus check from the prior itself (``threedgen.janus_prior``: a diffusion-classifier test of
    the result's views against the prompt's view tags; no ground truth needed) and the gate on it."""

    enabled: bool = True
    """Score every finished run (janus_score_prior in metrics.json): the share of its back views the prior calls a front."""
    judge: str = "unbiased"
    """unbiased: the run's prior without camera input or view bias, with strict view tags; run: the run's prior as configured (its view tags on)."""
    views: int = 12
    """Azimuths the result is rendered at (evenly spaced from the front)."""
    elevation: float = 15.0
    """Elevation of those views, degrees."""
    noise_levels: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7])
    """Noise levels of the test, as fractions of the prior's timesteps."""
    samples: int = 2
    """Noise draws per level (the same draws for every view tag)."""
    margin: float = 0.02
    """A back view is called a front only when its front-tag error is this fraction below every other tag's."""
    threshold: float = 0.2
    """The gate: a run passes when janus_score_prior is at most this."""
    retries: int = 0
    """The gate (`--janus-retry N`): after a run that fails the threshold, run the next seed, up to N more times; the best attempt is the run's result."""

    def check(self) -> None:
        if not isinstance(self.enabled, bool):
            raise UserError(f"janus.enabled must be true or false; got {self.enabled!r}")
        if self.judge not in JUDGES:
            raise UserError(f"janus.judge must be one of {', '.join(JUDGES)}; got {self.judge!r}")
        check_int("janus.views", self.views, 4, 72)
        check_range("janus.elevation", self.elevation, -60, 60)
        if not self.noise_levels or len(self.noise_levels) > 10:
            raise UserError("janus.noise_levels must list 1 to 10 fractions of the prior's timesteps")
        for level in self.noise_levels:
            check_range("janus.noise_levels[]", level, 0.02, 0.98)
        check_int("janus.samples", self.samples, 1, 16)
        check_range("janus.margin", self.margin, 0, 1)
        check_range("janus.threshold", self.threshold, 0, 1)
        check_int("janus.retries", self.retries, 0, MAX_JANUS_RETRIES)
        if self.retries and not self.enabled:
            raise UserError("janus.retries needs janus.enabled=true: the gate reads the check's score")


@dataclass
class RunConfig:
    prompt: str = ""
    """What to make, e.g. "a red cube"."""
    negative_prompt: str = ""
    """What the prior should steer away from."""
    seed: int = 0
    """Seed of every random draw of the run (cameras, noise, initialisation)."""
    steps: int = 600
    """Optimisation steps."""
    max_seconds: float = 0.0
    """Stop training after this many seconds even before `steps` (0: no time limit; `threedgen compare --budget-seconds`)."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N."""
    checkpoint_every: int = 200
    """Steps between checkpoints (a run can resume from the last one)."""
    preview_every: int = 100
    """Steps between preview images in the run folder."""
    verify_steps: int = 10
    """Steps fingerprinted for `threedgen verify`: a digest of the parameters and the loss after each of the first N steps (fingerprints.json), and the parameters at step N (0 = off)."""
    guidance: Any = None
    """The guidance method's own section (`threedgen config keys --guidance NAME`)."""
    representation: Any = None
    """The representation's own section."""
    prior: Any = None
    """The prior's own section."""
    camera: CameraSamplerConfig = field(default_factory=CameraSamplerConfig)
    """Training cameras."""
    render: RenderConfig = field(default_factory=RenderConfig)
    """Training render size."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Regulariser weights."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Adam and divergence handling."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """Meshes, textures, turntable and evaluation after training."""
    refine: RefineConfig = field(default_factory=RefineConfig)
    """Stage 2: the exported mesh refined under the same prior."""
    janus: JanusConfig = field(default_factory=JanusConfig)
    """The Janus check from the prior and the gate on it."""

    def check(self, whole_run: bool = True) -> None:
        """Every rule of every section, once. ``whole_run`` adds the prompt (cleaned in place) and
        the prior's checks of the run (prompt, cameras, model); ``threedgen config show`` without a
        prompt leaves them out."""
        if whole_run:
            self.prompt = clean_prompt(self.prompt)
        self.negative_prompt = clean_prompt(self.negative_prompt, "negative prompt")
        check_int("steps", self.steps, 1, MAX_STEPS)
        check_int("seed", self.seed, 0, 2 ** 32 - 1)
        check_int("checkpoint_every", self.checkpoint_every, 1, MAX_STEPS)
        check_int("preview_every", self.preview_every, 1, MAX_STEPS)
        check_int("verify_steps", self.verify_steps, 0, MAX_VERIFY_STEPS)
        check_range("max_seconds", self.max_seconds, 0, 1e7)
        check_device(self.device)
        for section in (self.camera, self.render, self.loss, self.optimizer, self.export, self.refine, self.janus,
                        self.guidance, self.representation, self.prior):
            section.check()
        if self.janus.retries and not self.export.evaluate:
            raise UserError("janus.retries (--janus-retry) needs export.evaluate=true: the gate reads the check that "
                            "the eval runs")
        if self.refine.enabled and self.export.texture != "uv":
            raise UserError("refine.enabled needs export.texture=uv: the refinement optimises the mesh's UV texture")
        scale = getattr(self.guidance, "guidance_scale", 0.0)
        if not (math.isfinite(scale) and scale >= 0):
            raise UserError(f"guidance.guidance_scale must be a finite number >= 0; got {scale}")
        if whole_run:
            self.prior.check_run(self)
