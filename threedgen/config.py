"""Configuration: YAML presets + ``key=value`` overrides, merged with OmegaConf into typed
dataclasses. Strict: an unknown key is an error naming the nearest valid keys.

Layers, later wins: ``configs/<guidance>-<representation>.yaml`` -> ``configs/priors/<prior>.yaml``
-> ``configs/priors/<prior>-<guidance>.yaml`` (where one exists) -> ``key=value`` overrides -> CLI
flags (``--prompt``, ``--steps``, ...).

User text is data, never an expression: every string is escaped before it reaches OmegaConf, so
``${oc.env:HOME}`` in a prompt or an override stays those characters and nothing is resolved.
Override values are parsed with ``yaml.safe_load`` (numbers, booleans, lists), never evaluated.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
import unicodedata
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from threedgen.cameras import CameraSamplerConfig
from threedgen.errors import UserError, check_range, nearest, unknown_name

MAX_PROMPT_CHARS = 1000
MAX_STEPS = 1_000_000
REPRESENTATIONS = ("nerf", "gaussians")


@dataclass
class RenderConfig:
    resolution: int = 64  # training render size (square)
    # Progressive resolution: render at coarse_resolution (0 = off) for the first coarse_until of
    # the run (a fraction of the steps), then at resolution. The prior resizes what it is given.
    coarse_resolution: int = 0
    coarse_until: float = 0.0

    def size_at(self, step: int, max_steps: int) -> int:
        if self.coarse_resolution and step < self.coarse_until * max_steps:
            return self.coarse_resolution
        return self.resolution


@dataclass
class LossConfig:
    lambda_sparsity: float = 0.0  # mean opacity
    lambda_opaque: float = 0.0  # binary entropy of opacity (pushes alpha to 0 or 1)


@dataclass
class OptimizerConfig:
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-15
    # After this many steps in a row skipped as non-finite, go back to the last good checkpoint's
    # state with every learning rate times rollback_lr_factor; more than max_rollbacks such
    # rollbacks fail the run as diverged.
    rollback_after: int = 10
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 3


@dataclass
class ExportConfig:
    resolution: int = 128  # marching-cubes grid
    formats: list[str] = field(default_factory=lambda: ["glb", "obj", "ply"])
    texture: str = "uv"  # uv: xatlas unwrap + baked PNG (GLB, OBJ); vertex: vertex colours only
    texture_size: int = 1024  # texture image side in pixels
    faces: int = 10000  # decimate to about this many faces (0: keep marching cubes' mesh)
    scale: float = 1.0  # metres per world unit in the exported files
    video_frames: int = 36
    video_resolution: int = 128
    video_elevation: float = 20.0
    evaluate: bool = True  # run `threedgen eval` after the run when the prior has a truth


@dataclass
class RunConfig:
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 600
    device: str = "auto"
    checkpoint_every: int = 200
    preview_every: int = 100
    guidance: Any = None  # the method's own dataclass (threedgen.guidance.GUIDANCE)
    representation: Any = None  # threedgen.representations.REPRESENTATIONS
    prior: Any = None  # threedgen.guidance.priors.PRIORS
    camera: CameraSamplerConfig = field(default_factory=CameraSamplerConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


# ---- text safety ------------------------------------------------------------------------------

_INTERP = re.compile(r"(\\*)\$\{")


def escape_interpolation(text: str) -> str:
    """Make OmegaConf read ``text`` literally: k backslashes before ``${`` become 2k+1."""
    return _INTERP.sub(lambda m: "\\" * (2 * len(m.group(1)) + 1) + "${", text)


def _escape_all(value):
    if isinstance(value, str):
        return escape_interpolation(value)
    if isinstance(value, dict):
        return {k: _escape_all(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_escape_all(v) for v in value]
    return value


def clean_prompt(prompt: str, what: str = "prompt") -> str:
    """Strip control characters (NUL included) and surrounding space; enforce the length cap."""
    if not isinstance(prompt, str):
        raise UserError(f"{what} must be text")
    text = "".join(ch for ch in prompt if unicodedata.category(ch)[0] != "C" or ch in " ")
    text = " ".join(text.split()) if what == "prompt" else text.strip()
    if len(text) > MAX_PROMPT_CHARS:
        raise UserError(f"{what} is {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
    if what == "prompt" and not text:
        raise UserError("prompt is empty; give a description such as --prompt \"a red cube\"")
    return text


# ---- presets ----------------------------------------------------------------------------------

def _config_text(relative: str) -> Optional[str]:
    """A preset's text: from the installed package (``threedgen.configs``), else from the source
    tree's ``configs/`` (an editable install, where that folder is not importable)."""
    try:
        res = resources.files("threedgen.configs").joinpath(relative)
        if res.is_file():
            return res.read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        pass
    path = Path(__file__).resolve().parent.parent / "configs" / relative
    return path.read_text() if path.is_file() else None


def available_presets() -> list[str]:
    from threedgen.guidance import GUIDANCE

    return [f"{g}-{r}" for g in GUIDANCE for r in REPRESENTATIONS if _config_text(f"{g}-{r}.yaml") is not None]


def _load_yaml(relative: str) -> dict:
    text = _config_text(relative)
    return yaml.safe_load(text) or {} if text is not None else {}


def _load_preset(relative: str, seen: tuple = ()) -> dict:
    """A preset with its ``inherit: other.yaml`` (a preset file in the same folder) merged under it,
    so a method's settings live in one file (``vsd-gaussians.yaml`` inherits ``vsd-nerf.yaml``)."""
    data = _load_yaml(relative)
    parent = data.pop("inherit", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or parent in seen or _config_text(parent) is None or "/" in parent:
        raise UserError(f"configs/{relative}: inherit must name another preset file; got {parent!r}")
    base = _load_preset(parent, seen + (relative,))
    mine = data.get("representation", {}).get("name")
    if mine is not None and base.get("representation", {}).get("name", mine) != mine:
        base.pop("representation")  # another representation's settings do not carry over
    return deep_merge(base, data)


# ---- overrides --------------------------------------------------------------------------------

@dataclass(frozen=True)
class RawValue:
    """An override as typed and as YAML reads it; a text field takes the text (so that
    ``negative_prompt=no`` stays "no", not False)."""

    raw: str
    parsed: Any


def _resolve_raw(data: dict, schema) -> dict:
    hints = typing.get_type_hints(schema) if dataclasses.is_dataclass(schema) else {}
    out = {}
    for key, value in data.items():
        hint = hints.get(key)
        if isinstance(value, RawValue):
            out[key] = value.raw if hint in (str, Optional[str]) else value.parsed
        elif isinstance(value, dict):
            sub = None
            if schema is RunConfig and key in _SECTIONS:
                name = value.get("name")
                name = name.raw if isinstance(name, RawValue) else name
                sub = _registry(key).get(name, (None,))[0]
            elif key in hints and dataclasses.is_dataclass(hints[key]):
                sub = hints[key]
            out[key] = _resolve_raw(value, sub)
        else:
            out[key] = value
    return out


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def parse_overrides(items: list[str]) -> dict:
    """``["a.b=1", "c=[1,2]"]`` -> nested dict. Values via ``yaml.safe_load``; keys must be dotted names."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value (e.g. guidance.guidance_scale=50)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not _KEY.match(key):
            raise UserError(f"override key {key!r} is not a dotted name like guidance.guidance_scale")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, dict) or value is None and raw.strip() not in ("null", "~", "None"):
            value = raw
        if raw.strip() == "None":
            value = None
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"override {key!r} sets a field inside a value")
        node[parts[-1]] = RawValue(raw, value)
    return out


def deep_merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``, section by section: a nested dict updates the one below it key by key."""
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


_SECTIONS = ("guidance", "representation", "prior")


def _check_keys(data: dict, schema, prefix: str = "") -> None:
    """Unknown keys -> UserError with the nearest valid keys (full dotted names)."""
    names = [f.name for f in dataclasses.fields(schema)]
    for key, value in data.items():
        if key not in names:
            valid = [prefix + n for n in nearest(str(key), names)]
            raise UserError(f"unknown config key {prefix + str(key)!r}; nearest valid keys: {', '.join(valid[:5])}")
        if not prefix and key in _SECTIONS:
            continue  # checked against the chosen method's own dataclass
        sub = getattr(schema, "__dataclass_fields__")[key]
        sub_default = (sub.default_factory() if sub.default_factory is not dataclasses.MISSING else sub.default)
        if isinstance(value, dict) and dataclasses.is_dataclass(sub_default):
            _check_keys(value, type(sub_default), prefix + key + ".")
        elif isinstance(value, dict):
            raise UserError(f"config key {prefix + key!r} takes a value, not a section")


def _registry(section: str) -> dict:
    from threedgen.guidance import GUIDANCE
    from threedgen.guidance.priors import PRIORS
    from threedgen.representations import REPRESENTATION_CLASSES

    return {"guidance": GUIDANCE, "representation": REPRESENTATION_CLASSES, "prior": PRIORS}[section]


def _section_class(section: str, name: str):
    registry = _registry(section)
    if not isinstance(name, str) or name not in registry:
        raise unknown_name(section, name, registry)
    return registry[name][0]


def build_config(guidance: str = "sds", representation: str = "nerf", prior: str = "shapes",
                 overrides: Optional[dict] = None, flags: Optional[dict] = None,
                 base: Optional[dict] = None) -> RunConfig:
    """Merge the layers into a validated ``RunConfig``. ``base`` replaces the presets (resume)."""
    from threedgen.guidance import GUIDANCE
    from threedgen.guidance.priors import PRIORS

    if prior not in PRIORS:  # checked before its name picks an overlay file
        raise unknown_name("prior", prior, PRIORS)
    if guidance not in GUIDANCE:
        raise unknown_name("guidance", guidance, GUIDANCE)
    if representation not in REPRESENTATIONS:
        raise unknown_name("representation", representation, REPRESENTATIONS)
    if base is None:
        preset = f"{guidance}-{representation}"
        if _config_text(preset + ".yaml") is None:
            raise UserError(f"no preset configs/{preset}.yaml; available: {', '.join(available_presets())}")
        data = deep_merge(_load_preset(preset + ".yaml"), _load_yaml(f"priors/{prior}.yaml"))
        data = deep_merge(data, _load_yaml(f"priors/{prior}-{guidance}.yaml"))  # optional, e.g. shapes-sds
    else:
        data = base
    data = deep_merge(data, overrides or {})
    data = _resolve_raw(deep_merge(data, flags or {}), RunConfig)
    for section, name in (("guidance", guidance), ("representation", representation), ("prior", prior)):
        if not isinstance(data.setdefault(section, {}), dict):
            raise UserError(f"config key {section!r} is a section; set {section}.name=... instead")
        data[section].setdefault("name", name)
    _check_keys(data, RunConfig)
    sections = {}
    for section in ("guidance", "representation", "prior"):
        cls = _section_class(section, data[section]["name"])
        _check_keys(data[section], cls, section + ".")
        sections[section] = cls
    try:
        schema = OmegaConf.structured(RunConfig)
        for section, cls in sections.items():
            schema[section] = OmegaConf.structured(cls)
        merged = OmegaConf.merge(schema, _escape_all(data))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        msg = str(exc).splitlines()[0]
        if key in INT_LIMITS:
            lo, hi = INT_LIMITS[key]
            node = data
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            raise UserError(f"{key} must be an integer from {lo} to {hi}; got {node!r}") from None
        raise UserError(f"bad config value{' for ' + key if key else ''}: {msg}") from None
    validate(cfg)
    return cfg


INT_LIMITS = {
    "steps": (1, MAX_STEPS), "seed": (0, 2 ** 32 - 1), "checkpoint_every": (1, MAX_STEPS),
    "preview_every": (1, MAX_STEPS), "render.resolution": (8, 1024), "export.resolution": (8, 1024),
    "export.video_resolution": (16, 2048), "export.video_frames": (1, 1000), "camera.batch_size": (1, 64),
    "export.texture_size": (64, 8192), "export.faces": (0, 10_000_000), "render.coarse_resolution": (0, 1024),
    "optimizer.rollback_after": (1, 100_000), "optimizer.max_rollbacks": (0, 100),
}


def validate(cfg: RunConfig) -> None:
    """Ranges of the values a user sets most often; each error names the limits."""
    cfg.prompt = clean_prompt(cfg.prompt)
    cfg.negative_prompt = clean_prompt(cfg.negative_prompt, "negative prompt")

    def int_in(name, value, lo, hi):
        if isinstance(value, bool) or not isinstance(value, int) or not (lo <= value <= hi):
            raise UserError(f"{name} must be an integer from {lo} to {hi}; got {value!r}")

    for key, (lo, hi) in INT_LIMITS.items():
        obj = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        int_in(key, obj, lo, hi)
    if cfg.render.coarse_resolution and cfg.render.coarse_resolution < 8:
        raise UserError(f"render.coarse_resolution must be 0 (off) or from 8 to 1024; got {cfg.render.coarse_resolution}")
    until = cfg.render.coarse_until
    if isinstance(until, bool) or not isinstance(until, (int, float)) or not 0 <= until <= 1:
        raise UserError(f"render.coarse_until must be a fraction of the run from 0 to 1; got {until!r}")
    scale = getattr(cfg.guidance, "guidance_scale", 0.0)
    if not (math.isfinite(scale) and scale >= 0):
        raise UserError(f"guidance.guidance_scale must be a finite number >= 0; got {scale}")
    for section in (cfg.guidance, cfg.representation, cfg.prior):
        if hasattr(section, "check"):
            section.check()
    c = cfg.camera
    for name, rng, lo, hi in (("camera.elevation_range", c.elevation_range, -90, 90),
                              ("camera.azimuth_range", c.azimuth_range, -360, 360),
                              ("camera.distance_range", c.distance_range, 0.1, 100),
                              ("camera.fovy_range", c.fovy_range, 1, 170)):
        for v in rng:
            check_range(name, v, lo, hi)
        if len(rng) != 2 or rng[0] > rng[1]:
            raise UserError(f"{name} must be [low, high] with low <= high; got {list(rng)}")
    check_range("camera.random_background_prob", c.random_background_prob, 0, 1)
    for fmt in cfg.export.formats:
        if fmt not in ("glb", "obj", "ply"):
            raise UserError(f"export.formats: unknown format {fmt!r}; valid: glb, obj, ply")
    if cfg.export.texture not in ("uv", "vertex"):
        raise UserError(f"export.texture must be uv or vertex; got {cfg.export.texture!r}")
    if 0 < cfg.export.faces < 100:
        raise UserError(f"export.faces must be 0 (no decimation) or at least 100; got {cfg.export.faces}")
    check_range("export.scale", cfg.export.scale, 1e-6, 1e6)
    check_range("optimizer.rollback_lr_factor", cfg.optimizer.rollback_lr_factor, 1e-6, 1)
    if cfg.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", cfg.device):
        raise UserError(f"device must be auto, cpu, cuda or cuda:N; got {cfg.device!r}")


def to_yaml(cfg: RunConfig) -> str:
    """The config as plain YAML (strings literal, no interpolation)."""
    return yaml.safe_dump(_plain(dataclasses.asdict(cfg)), sort_keys=False, allow_unicode=True)


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_run_config(path: Path, flags: Optional[dict] = None) -> RunConfig:
    data = yaml.safe_load(Path(path).read_text()) or {}
    return build_config(data.get("guidance", {}).get("name", "sds"),
                        data.get("representation", {}).get("name", "nerf"),
                        data.get("prior", {}).get("name", "shapes"), flags=flags, base=data)
