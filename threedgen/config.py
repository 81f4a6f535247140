"""A run's configuration: the layers merged into a validated ``RunConfig``, and where each value
came from.

Layers, later wins (each preset file states only what differs from the layer below it):

1. the dataclass defaults (``threedgen.schema`` and the component config modules);
2. ``configs/representations/<representation>.yaml``;
3. ``configs/guidance/<guidance>.yaml``, then ``configs/guidance/<guidance>-<representation>.yaml``
   where one exists;
4. ``configs/priors/<name>.yaml``, then ``configs/priors/<name>-<guidance>.yaml``, where they exist,
   for each of the prior's preset names (``prior_preset_names``: its family and the registered
   names along its config class's ancestry, most general first, so the more specific file wins);
5. ``key=value`` overrides, then the CLI's flags (``--prompt``, ``--steps``, ...).

A resumed run starts from its own ``config.yaml`` instead of layers 2-4. ``threedgen config show``
prints the merged result with each value's layer. Validation happens once, at the end of
``build_config`` (``RunConfig.check``), before anything is written.

User text is data, never an expression: every string is escaped before it reaches OmegaConf, so
``${oc.env:HOME}`` in a prompt or an override stays those characters and nothing is resolved.
Override values are parsed with ``yaml.safe_load`` (numbers, booleans, lists), never evaluated.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from threedgen.devices import cuda_for_auto, resolve_device
from threedgen.errors import UserError, nearest
from threedgen.guidance.config import GUIDANCE
from threedgen.guidance.priors import PRIOR_CHOICES, PriorChoice, resolve_prior
from threedgen.guidance.priors.config import PRIORS
from threedgen.registry import Registry
from threedgen.representations.config import REPRESENTATIONS
from threedgen.schema import MAX_STEPS, RenderConfig, RunConfig

__all__ = ["MAX_STEPS", "RenderConfig", "RunConfig", "build_config", "parse_overrides", "to_yaml",
           "load_run_config", "deep_merge", "escape_interpolation", "SECTIONS"]

SECTIONS: dict[str, Registry] = {"guidance": GUIDANCE, "representation": REPRESENTATIONS, "prior": PRIORS}
DEFAULT_LAYER = "default"
OVERRIDE_LAYER = "key=value"
FLAG_LAYER = "flag"
RUN_LAYER = "the run's config.yaml"


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


def prior_preset_names(prior: str) -> list[str]:
    """The names a prior's preset files go by, most general first: for each class of its config's
    ancestry (``__mro__``, from ``PriorConfig`` down to its own class), the ``family`` that class
    declares and the name the class is registered under, where it has them. ``shapes-unet-camera``
    -> ``["shapes-world", "shapes-unet", "shapes-unet-camera"]``: the learned teacher with a camera
    takes the learned teacher's presets, and both take those of the shapes world."""
    return ancestry_names(PRIORS, prior)


def ancestry_names(registry, name: str) -> list[str]:
    """For each class of a registered config's ancestry, most general first: the ``family`` the
    class declares and the name it is registered under, where it has them."""
    registered = {entry.config: entry.name for entry in registry.entries()}
    names: list[str] = []
    for klass in reversed(registry[name].config.__mro__):
        for found in (vars(klass).get("family"), registered.get(klass)):
            if found and found not in names:
                names.append(found)
    return names


def preset_files(guidance: str, representation: str, prior: str) -> list[str]:
    """The preset files a run's layers 2-4 read, in order (those that exist): a later file wins.
    A guidance method's file for a representation applies along the representation's ancestry
    (``sds-gaussians.yaml`` to the surfels, built on the 3D Gaussians); the representation's own
    file only to itself (``nerf.yaml``'s smoothing is not the SDF NeRF's)."""
    priors = prior_preset_names(prior)
    names = [f"representations/{representation}.yaml", f"guidance/{guidance}.yaml",
             *(f"guidance/{guidance}-{n}.yaml" for n in ancestry_names(REPRESENTATIONS, representation)),
             *(f"priors/{n}.yaml" for n in priors), *(f"priors/{n}-{guidance}.yaml" for n in priors)]
    return [n for n in names if _config_text(n) is not None]


def _load_yaml(relative: str) -> dict:
    text = _config_text(relative)
    data = yaml.safe_load(text) if text is not None else None
    if data is not None and not isinstance(data, dict):
        raise UserError(f"configs/{relative} must hold a mapping of keys to values")
    return data or {}


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
            if schema is RunConfig and key in SECTIONS:
                name = value.get("name")
                name = name.raw if isinstance(name, RawValue) else name
                entry = SECTIONS[key].get(name)
                sub = entry.config if entry else None
            elif key in hints and dataclasses.is_dataclass(hints[key]):
                sub = hints[key]
            out[key] = _resolve_raw(value, sub)
        else:
            out[key] = value
    return out


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _numeric(text: str) -> bool:
    """Whether Python's ``int``/``float`` (or ``str.isdigit``) would read ``text`` as a number."""
    try:
        float(text)
        return True
    except ValueError:
        return text.strip().isdigit()


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
        if isinstance(value, str) and not value.isascii() and _numeric(value):
            # OmegaConf would take "\u0663" (an Arabic-Indic 3) as 3 and fail on "\u00b2" with its own words
            raise UserError(f"override {key}={raw.strip()}: write numbers with the digits 0-9")
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


def _leaves(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in data.items():
        keys.extend(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + str(k)])
    return keys


# ---- schema checks ----------------------------------------------------------------------------

def _check_keys(data: dict, schema, prefix: str = "") -> None:
    """Unknown keys -> UserError with the nearest valid keys (full dotted names)."""
    names = [f.name for f in dataclasses.fields(schema)]
    for key, value in data.items():
        if key not in names:
            valid = [prefix + n for n in nearest(str(key), names)]
            raise UserError(f"unknown config key {prefix + str(key)!r}; nearest valid keys: {', '.join(valid[:5])}")
        if not prefix and key in SECTIONS:
            continue  # checked against the chosen component's own dataclass
        sub = schema.__dataclass_fields__[key]
        sub_default = (sub.default_factory() if sub.default_factory is not dataclasses.MISSING else sub.default)
        if isinstance(value, dict) and dataclasses.is_dataclass(sub_default):
            _check_keys(value, type(sub_default), prefix + key + ".")
        elif isinstance(value, dict):
            raise UserError(f"config key {prefix + key!r} takes a value, not a section")


def _lookup(data: dict, key: str):
    node: Any = data
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _failing_key(schema, data: dict) -> str:
    """The key OmegaConf refused when its error names none (a list of the wrong length for a
    pair): each value merged alone; "" when none fails alone."""
    for key in _leaves(data):
        single: dict = {}
        node = single
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = _lookup(data, key)
        try:
            OmegaConf.to_object(OmegaConf.merge(schema, _escape_all(single)))
        except OmegaConfBaseException:
            return key
    return ""


def _explain(key: str, value, sections: dict) -> UserError:
    """A value OmegaConf could not take (a text where a number goes, ...): the owning section's
    own check says what is allowed; OmegaConf's first line otherwise."""
    cfg = RunConfig(prompt="x", **{s: cls() for s, cls in sections.items()})
    obj, parts = cfg, key.split(".")
    for part in parts[:-1]:
        obj = getattr(obj, part, None)
    if obj is not None and hasattr(obj, parts[-1]):
        object.__setattr__(obj, parts[-1], value)
        try:
            cfg.check(whole_run=False)
        except UserError as exc:
            return exc
        except (TypeError, ValueError):
            pass
    return UserError(f"bad config value for {key}: {value!r}")


# ---- the merge --------------------------------------------------------------------------------

@dataclass
class Merged:
    """A validated config and, for each dotted key set by a layer above the defaults, that layer."""

    cfg: RunConfig
    origin: dict[str, str]


def merge(guidance: str = "sds", representation: str = "nerf", prior: str = "shapes",
          overrides: Optional[dict] = None, flags: Optional[dict] = None, base: Optional[dict] = None,
          whole_run: bool = True) -> Merged:
    """Merge the layers into a validated ``RunConfig``. ``base`` replaces the presets (resume);
    ``whole_run=False`` leaves out the checks that need the prompt."""
    for section, name in (("prior", prior), ("guidance", guidance), ("representation", representation)):
        SECTIONS[section][name]  # an unknown name is an error before its name picks a file
    origin: dict[str, str] = {}
    layers = ([(RUN_LAYER, base)] if base is not None else
              [(f"configs/{f}", _load_yaml(f)) for f in preset_files(guidance, representation, prior)])
    layers += [(OVERRIDE_LAYER, overrides or {}), (FLAG_LAYER, flags or {})]
    data: dict = {}
    for label, layer in layers:
        if not isinstance(layer, dict):
            raise UserError(f"{label} must hold a mapping of keys to values")
        data = deep_merge(data, layer)
        origin.update({k: "--" + k.replace("_", "-") if label == FLAG_LAYER else label for k in _leaves(layer)})
    data = _resolve_raw(data, RunConfig)
    for section, name in (("guidance", guidance), ("representation", representation), ("prior", prior)):
        if not isinstance(data.setdefault(section, {}), dict):
            raise UserError(f"config key {section!r} is a section; set {section}.name=... instead")
        if "name" not in data[section]:
            data[section]["name"] = name
            origin.setdefault(f"{section}.name", RUN_LAYER if base is not None else f"--{section}")
    _check_keys(data, RunConfig)
    sections = {}
    for section in SECTIONS:
        cls = SECTIONS[section][data[section]["name"]].config
        _check_keys(data[section], cls, section + ".")
        sections[section] = cls
    try:
        schema = OmegaConf.structured(RunConfig)
        for section, cls in sections.items():
            schema[section] = OmegaConf.structured(cls)
        cfg = OmegaConf.to_object(OmegaConf.merge(schema, _escape_all(data)))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or _failing_key(schema, data)
        if key:
            raise _explain(key, _lookup(data, key), sections) from None
        raise UserError(f"bad config value: {str(exc).splitlines()[0]}") from None
    cfg.check(whole_run)
    return Merged(cfg, origin)


def resolve_request(guidance: str, representation: str, prior: str, overrides: Optional[dict] = None,
                    flags: Optional[dict] = None, whole_run: bool = True) -> tuple[Merged, Optional[str]]:
    """A request as a user makes it (the CLI's flags, the web form) -> the merged config and a note
    on what ``--prior auto`` chose. ``prior`` is a registered name, ``auto``, or a diffusers model
    (Hub id or folder); ``prior.model=...`` among the overrides also names the model, and decides
    which prior it is."""
    overrides, flags = dict(overrides or {}), dict(flags or {})
    cuda = False
    if prior == "auto":  # what auto means depends on the run's device
        device = flags.get("device") or "auto"
        cuda = device != "cpu" and (cuda_for_auto() if device == "auto" else resolve_device(device).type == "cuda")
    choice = resolve_prior(prior, cuda)
    model = overrides.get("prior", {}).get("model") if isinstance(overrides.get("prior"), dict) else None
    if model is not None:
        raw = model.raw if isinstance(model, RawValue) else str(model)
        if prior not in PRIOR_CHOICES:
            raise UserError(f"give the model once: --prior {prior} or prior.model={raw}, not both")
        chosen = resolve_prior(raw.strip(), False)
        kind = prior if prior == "auto" else PRIORS[prior].config.model_kind or prior
        if prior != "auto" and chosen.name != kind:
            raise UserError(f"prior.model={raw} is a {chosen.name} model, not {prior}; "
                            f"use --prior {chosen.name} or --prior {raw}")
        choice = PriorChoice(chosen.name if prior == "auto" else prior, chosen.model)
    if choice.model is not None:
        flags["prior"] = {**flags.get("prior", {}), "model": choice.model}
    return merge(guidance, representation, choice.name, overrides, flags, whole_run=whole_run), choice.note


def build_config(guidance: str = "sds", representation: str = "nerf", prior: str = "shapes",
                 overrides: Optional[dict] = None, flags: Optional[dict] = None,
                 base: Optional[dict] = None, whole_run: bool = True) -> RunConfig:
    """The validated ``RunConfig`` of a run (see :func:`merge`)."""
    return merge(guidance, representation, prior, overrides, flags, base, whole_run).cfg


def to_yaml(cfg: RunConfig) -> str:
    """The config as plain YAML (strings literal, no interpolation)."""
    return yaml.safe_dump(_plain(dataclasses.asdict(cfg)), sort_keys=False, allow_unicode=True)


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def flat(cfg: RunConfig) -> dict[str, Any]:
    """Dotted key -> value of every leaf of a config."""
    return flatten(_plain(dataclasses.asdict(cfg)))


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every leaf of nested mappings (a config's values, a preset file)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_run_config(path: Path, flags: Optional[dict] = None) -> RunConfig:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path} is damaged ({reason}); restore it from a copy, or start a new run") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is damaged (it must hold a mapping of keys to values); restore it from a copy, "
                        "or start a new run")
    return build_config(data.get("guidance", {}).get("name", "sds"),
                        data.get("representation", {}).get("name", "nerf"),
                        data.get("prior", {}).get("name", "shapes"), flags=flags, base=data)
