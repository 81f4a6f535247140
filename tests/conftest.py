import os
import tempfile
from pathlib import Path

import pytest
import torch

# One render cache for the whole session (the shapes prior renders each shape once).
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="threedgen-tests-"))
os.environ.setdefault("THREEDGEN_CACHE", str(_SESSION_DIR / "cache"))
# The suite runs on the CPU on any machine: `auto` (device, and so the prior) means the CPU, in
# this process and in every process it starts. Tests marked `cuda` ask for CUDA by name.
os.environ["THREEDGEN_DEVICE"] = "cpu"
if not torch.cuda.is_available():
    # A scratch folder for any CUDA extension build. On a GPU machine the user's own folder is
    # kept, so that gsplat and nerfacc are compiled once, not once per test session.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_SESSION_DIR / "torch_extensions"))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one; `pytest -m cuda` runs "
                            "only these, as benchmarks/gpu_check.sh does)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (benchmarks/gpu_check.sh runs it on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_prior_cfg():
    """A small shapes world: 16x16 images, 8 views, two shapes (fast, still every code path)."""
    from threedgen.guidance.priors.config import ShapesPriorConfig

    return ShapesPriorConfig(resolution=16, elevations=[10.0, 40.0], azimuth_step=90.0,
                             shapes=["cube", "torus"], camera_kappa=50.0, camera_kernel_max_angle=0.0)


# ---- tiny diffusers models (random weights, saved in the layout users download) ----------------

@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    from tiny_diffusers import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sd_v_dir(tmp_path_factory):
    from tiny_diffusers import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd-v", prediction_type="v_prediction", seed=1)


@pytest.fixture(scope="session")
def tiny_if_dir(tmp_path_factory):
    from tiny_diffusers import build_tiny_if

    return build_tiny_if(tmp_path_factory.mktemp("models") / "tiny-if")



# ---- the Khronos glTF validator over every GLB the suite writes -------------------------------

GLTF_DIR = Path(__file__).parent / "gltf"
GLTF_VALIDATOR = GLTF_DIR / "node_modules" / "gltf-validator"


def gltf_validator_available() -> bool:
    import shutil

    return shutil.which("node") is not None and GLTF_VALIDATOR.is_dir()


def validate_gltf(paths) -> list[dict]:
    """One report per file from tests/gltf/validate.cjs (``errors``, ``warnings``, ``messages``)."""
    import json
    import subprocess

    paths = [str(p) for p in paths]
    if not paths:
        return []
    out = subprocess.run(["node", str(GLTF_DIR / "validate.cjs"), *paths], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


_validated: dict = {}


@pytest.fixture(autouse=True)
def _every_written_glb_is_valid(tmp_path_factory):
    """After each test, every new or rewritten ``.glb`` under the session's temporary folders
    (run folders, web UI outputs) goes through the validator: zero errors, or the test errors.
    Without node and tests/gltf/node_modules (``npm ci --prefix tests/gltf``) this check is off;
    .ci/run installs both."""
    yield
    if not gltf_validator_available():
        return
    fresh = []
    for path in tmp_path_factory.getbasetemp().rglob("*.glb"):
        if path.name.startswith("."):  # a file still being written (threedgen.rundir.atomic_path)
            continue
        try:
            key = (str(path), path.stat().st_mtime_ns)
        except FileNotFoundError:
            continue
        if key not in _validated:
            _validated[key] = True
            fresh.append(path)
    bad = [r for r in validate_gltf(fresh) if r["errors"]]
    assert not bad, f"glTF validator errors: {bad}"
