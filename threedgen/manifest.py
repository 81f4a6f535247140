"""A run's reproducibility manifest, ``<run>/manifest.json``: what produced the run.

Written once, when a fresh run starts (a resumed run leaves it alone), beside ``config.yaml``:

- ``format`` and ``threedgen`` (version, git revision and whether the checkout had uncommitted
  changes, when the package sits in a git checkout);
- ``config`` (the merged config as plain values, what ``config.yaml`` holds) and ``config_sha256``:
  SHA-256 of its canonical JSON (keys sorted, no spaces, UTF-8; see :func:`config_sha256`), so a
  reformatted but equal ``config.yaml`` hashes the same;
- ``seed`` and ``rng``: the seed and every random source it seeded;
- ``libraries``: versions of Python, torch, diffusers, gsplat, nerfacc, pytorch_lightning, numpy;
- ``device``: type and name (the CPU's model, or the GPU's name and CUDA/cuDNN versions);
- ``prior``: the prior's weights (SHA-256 of each file of a local diffusers folder; the Hub id,
  revision and cached snapshot of a Hub model) or, for the ``shapes`` prior, the key of what
  determines its teacher images;
- ``determinism``: the settings in force (deterministic algorithms, cuDNN, cuBLAS workspace, TF32,
  CPU threads);
- ``verify``: how many first steps ``fingerprints.json`` covers.

Torch-free at import (the web UI's service reads a manifest's short hash without torch); ``build_manifest``
imports torch when it runs, inside a run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

import yaml

import threedgen
from threedgen.config import flatten, to_yaml
from threedgen.errors import UserError
from threedgen.guidance.priors.config import DiffusionPriorConfig, ShapesPriorConfig
from threedgen.rundir import RunFolder, atomic_write_text

MANIFEST_NAME = RunFolder.MANIFEST
FORMAT = 1
SHORT_HASH = 12
# distribution name -> the manifest's key
LIBRARIES = {"torch": "torch", "diffusers": "diffusers", "gsplat": "gsplat", "nerfacc": "nerfacc",
             "pytorch-lightning": "pytorch_lightning", "numpy": "numpy"}
# files of a diffusers folder that decide what the prior computes: weights, configs, tokenizers
PRIOR_FILE_SUFFIXES = (".safetensors", ".json", ".txt", ".model")
GIT_TIMEOUT_S = 3.0
HASH_CACHE = "file-hashes.json"


# ---- the config -------------------------------------------------------------------------------

def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def config_sha256(values: dict) -> str:
    """SHA-256 of a config's plain values (``yaml.safe_load`` of ``config.yaml``) as canonical JSON."""
    return hashlib.sha256(canonical_json(values).encode("utf-8")).hexdigest()


def config_values(cfg) -> dict:
    """The config as the plain values ``config.yaml`` holds."""
    return yaml.safe_load(to_yaml(cfg))


def config_changes(before: dict, after: dict) -> list[str]:
    """``key before -> after`` for every dotted key whose value differs (``(none)`` where absent)."""
    a, b = flatten(before), flatten(after)
    missing = object()
    changes = []
    for key in [*a, *(k for k in b if k not in a)]:
        old, new = a.get(key, missing), b.get(key, missing)
        if old != new:
            show = [json.dumps(v, ensure_ascii=False) if v is not missing else "(none)" for v in (old, new)]
            changes.append(f"{key} {show[0]} -> {show[1]}")
    return changes


# ---- this machine -----------------------------------------------------------------------------

def library_versions() -> dict[str, Optional[str]]:
    versions: dict[str, Optional[str]] = {"python": platform.python_version()}
    for dist, key in LIBRARIES.items():
        try:
            versions[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[key] = None
    return versions


def _git(root: Path, *args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def threedgen_record() -> dict:
    """threedgen's version and, in a git checkout, the revision and whether tracked files changed."""
    root = Path(threedgen.__file__).resolve().parent.parent
    revision = dirty = None
    if (root / ".git").exists():
        head = _git(root, "rev-parse", "HEAD")
        revision = head.strip() if head and re.fullmatch(r"[0-9a-f]{40,64}", head.strip()) else None
        if revision is not None:
            status = _git(root, "status", "--porcelain", "--untracked-files=no")
            dirty = bool(status.strip()) if status is not None else None
    return {"version": threedgen.__version__, "git_revision": revision, "git_dirty": dirty}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_record(device) -> dict:
    import torch  # heavy: a manifest is built inside a run, where torch is loaded

    device = torch.device(device)
    record = {"type": device.type, "name": cpu_name(), "machine": platform.machine(),
              "platform": platform.platform(terse=True)}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        record.update(name=torch.cuda.get_device_name(index), capability=f"{major}.{minor}",
                      cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), cpu=cpu_name())
    return record


def determinism_settings() -> dict:
    import torch  # heavy: a manifest is built inside a run, where torch is loaded

    return {"deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "cuda_matmul_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_tf32": bool(torch.backends.cudnn.allow_tf32),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads()}


def rng_record(seed: int, device) -> dict:
    """The random sources a run's seed reaches (``pl.seed_everything(seed, workers=True)`` in the
    runner), with what Lightning left in the environment as the evidence that it ran."""
    cuda = str(device).startswith("cuda")
    return {"seeded_by": "pytorch_lightning.seed_everything(seed, workers=True)",
            "python_random": seed, "numpy": seed, "torch_cpu": seed, "torch_cuda": seed if cuda else None,
            "dataloader_workers": os.environ.get("PL_SEED_WORKERS") == "1",
            "pl_global_seed": os.environ.get("PL_GLOBAL_SEED"),
            "cameras": "a torch.Generator per step, seeded with seed * 1000003 + step (threedgen.cameras)"}


# ---- the prior --------------------------------------------------------------------------------

class _HashCache:
    """SHA-256 of files by (path, size, mtime), kept in the threedgen cache folder so that a
    multi-gigabyte model is read once, not at every run."""

    def __init__(self):
        self.path: Optional[Path] = None
        self.known: dict[str, str] = {}
        self.dirty = False

    def load(self) -> None:
        if self.path is not None:
            return
        from threedgen.guidance.priors.shapes.render import cache_root  # heavy (torch): inside a run only

        self.path = cache_root() / HASH_CACHE
        try:
            data = json.loads(self.path.read_text())
            self.known = {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}
        except (OSError, ValueError):
            self.known = {}

    def sha256(self, path: Path) -> str:
        self.load()
        real = path.resolve()
        st = real.stat()
        key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
        if key not in self.known:
            h = hashlib.sha256()
            with open(real, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            self.known[key] = h.hexdigest()
            self.dirty = True
        return self.known[key]

    def save(self) -> None:
        if not self.dirty or self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(self.known, indent=0))
            self.dirty = False
        except OSError:
            pass  # a cache: the next run hashes again


HASHES = _HashCache()


def _prior_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in PRIOR_FILE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _files_record(folder: Path, hub_blobs: bool = False) -> dict:
    """``{relative path: sha256}`` of a model folder's files, and one SHA-256 over them all. In a
    Hub snapshot a large (LFS) file's blob is named by its SHA-256, which is used as it is."""
    files = {}
    for path in _prior_files(folder):
        blob = path.resolve().name
        known = hub_blobs and re.fullmatch(r"[0-9a-f]{64}", blob)
        files[path.relative_to(folder).as_posix()] = blob if known else HASHES.sha256(path)
    HASHES.save()
    return {"files": files, "sha256": hashlib.sha256(canonical_json(files).encode()).hexdigest()}


def _hub_snapshot(model: str, revision: Optional[str]) -> Optional[Path]:
    """The cached snapshot folder of a Hub model (no network), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache  # heavy: only for a Hub model
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(model, "model_index.json", revision=revision)
    except Exception:  # a malformed id or cache: the manifest records no snapshot
        return None
    return Path(found).parent if isinstance(found, str) else None


def shapes_cache_key(prior_cfg: ShapesPriorConfig) -> str:
    """What decides the shapes prior's teacher: its config (world, view grid, resolution, camera
    kernel), the renderer's version and lighting, and the vocabulary (colours, shapes, synonyms)."""
    from threedgen.guidance.priors.shapes import render, vocab  # heavy (torch): inside a run only

    what = {"prior": dataclasses.asdict(prior_cfg), "render_version": render.RENDER_VERSION,
            "light": render.LIGHT_DIR, "ambient": render.AMBIENT, "diffuse": render.DIFFUSE,
            "shapes": vocab.SHAPES, "colours": vocab.COLOURS, "marker_colour": vocab.MARKER_COLOUR,
            "front_markers": vocab.FRONT_MARKERS, "synonyms": [vocab.SHAPE_SYNONYMS, vocab.COLOUR_SYNONYMS]}
    return hashlib.sha256(canonical_json(what).encode()).hexdigest()


def prior_record(prior_cfg, prior=None) -> dict:
    """The prior and what decides its output (see the module docstring); ``prior`` (the built
    one, when there is one) adds the dtype it loaded its weights in."""
    record: dict[str, Any] = {"name": prior_cfg.name,
                              "config_sha256": hashlib.sha256(canonical_json(dataclasses.asdict(prior_cfg))
                                                              .encode()).hexdigest()}
    if isinstance(prior_cfg, ShapesPriorConfig):
        record.update(family="shapes", cache_key=shapes_cache_key(prior_cfg))
    elif isinstance(prior_cfg, DiffusionPriorConfig):
        record.update(family="diffusers", model=prior_cfg.model, revision=prior_cfg.revision)
        folder = Path(prior_cfg.model).expanduser()
        if folder.is_dir():
            record.update(location=str(folder.resolve()), **_files_record(folder))
        else:
            snapshot = _hub_snapshot(prior_cfg.model, prior_cfg.revision)
            record.update(hub_id=prior_cfg.model, snapshot=str(snapshot) if snapshot else None,
                          commit=snapshot.name if snapshot else None,
                          **(_files_record(snapshot, hub_blobs=True) if snapshot else {"files": {}, "sha256": None}))
        if prior is not None and getattr(prior, "dtype", None) is not None:
            record["dtype"] = str(prior.dtype).removeprefix("torch.")
            record["variant"] = getattr(prior, "variant", None)
    else:
        record["family"] = "other"
    return record


# ---- the manifest -----------------------------------------------------------------------------

def build_manifest(cfg, run_dir: Path, device, prior=None) -> dict:
    """The manifest of a run about to start with ``cfg`` on ``device`` (see the module docstring)."""
    values = config_values(cfg)
    return {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run": Path(run_dir).name,
            "threedgen": threedgen_record(),
            "config_sha256": config_sha256(values), "config": values,
            "seed": cfg.seed, "rng": rng_record(cfg.seed, device),
            "libraries": library_versions(), "device": device_record(device),
            "prior": prior_record(cfg.prior, prior), "determinism": determinism_settings(),
            "verify": {"steps": min(cfg.verify_steps, cfg.steps), "fingerprints": RunFolder.FINGERPRINTS}}


def write_manifest(cfg, run_dir: Path, device, prior=None) -> dict:
    """Write ``<run_dir>/manifest.json`` (atomically) for a run starting; returns what was written."""
    manifest = build_manifest(cfg, run_dir, device, prior)
    atomic_write_text(Path(run_dir) / MANIFEST_NAME, json.dumps(manifest, indent=1, ensure_ascii=False))
    return manifest


def manifest_short_hash(manifest: dict) -> str:
    """The first 12 hex digits of the manifest's config hash: a run's recipe, short enough to print
    under a figure (equal for two runs of the same config, whatever machine ran them)."""
    return str(manifest["config_sha256"])[:SHORT_HASH]


def read_manifest(run_dir: Path) -> dict:
    """A run folder's manifest, checked to be this threedgen's format and version; one-line
    UserError otherwise."""
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST_NAME
    if not run_dir.is_dir():
        raise UserError(f"{str(run_dir)!r} is not a folder")
    if not path.is_file():
        raise UserError(f"{str(run_dir)!r} has no {MANIFEST_NAME} (a run started before threedgen wrote manifests, "
                        "or not a run folder); it cannot be verified")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is damaged ({str(exc).splitlines()[0][:120]}); it cannot be verified") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("threedgen"), dict):
        raise UserError(f"{path} is not a threedgen manifest")
    fmt, version = manifest.get("format"), manifest["threedgen"].get("version")
    if fmt != FORMAT or version != threedgen.__version__:
        raise UserError(f"{path} was written by threedgen {version} (manifest format {fmt}); this is threedgen "
                        f"{threedgen.__version__} (format {FORMAT}): verify the run with the version that made it")
    if not isinstance(manifest.get("config"), dict) or not isinstance(manifest.get("config_sha256"), str):
        raise UserError(f"{path} has no config or config hash; it cannot be verified")
    return manifest
