import os
import tempfile
from pathlib import Path

import pytest

# One render cache for the whole session (the shapes prior renders each shape once), and a scratch
# folder for any CUDA extension build nerfacc or gsplat might attempt.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="threedgen-tests-"))
os.environ.setdefault("THREEDGEN_CACHE", str(_SESSION_DIR / "cache"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_SESSION_DIR / "torch_extensions"))


@pytest.fixture
def tiny_prior_cfg():
    """A small shapes world: 16x16 images, 8 views, two shapes (fast, still every code path)."""
    from threedgen.guidance.priors.shapes.prior import ShapesPriorConfig

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

