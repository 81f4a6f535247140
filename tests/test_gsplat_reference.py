"""gsplat's private PyTorch reference functions, which the CPU rasteriser and the Gaussians' mesh
extraction are built on (through ``threedgen.representations.gsplat_reference``): still there, still
taking the parameters threedgen passes, still computing what they did. A failure names the gsplat
version and the function, so an upgrade that moves or changes them is caught here, not as wrong
images."""

from __future__ import annotations

import importlib
import inspect
import math
import re
from pathlib import Path

import gsplat
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PRIVATE_MODULE = "gsplat.cuda._torch_impl"
# Each private function threedgen uses: the parameters it passes by position (their names, in
# order, say the meaning is unchanged) and those it passes by keyword.
USED = {
    "_quat_scale_to_covar_preci": (("quats", "scales"), ("compute_covar", "compute_preci")),
    "_fully_fused_projection": (("means", "covars", "viewmats", "Ks", "width", "height"), ("eps2d", "near_plane")),
    "_spherical_harmonics": (("degrees_to_use", "dirs", "coeffs"), ()),
}


def _pinned() -> str:
    match = re.search(r'"gsplat([^"]*)"', (ROOT / "pyproject.toml").read_text())
    assert match, "pyproject.toml no longer lists gsplat"
    return match.group(1)


def _where(name: str) -> str:
    return (f"gsplat {gsplat.__version__} (pyproject.toml pins gsplat{_pinned()}): {PRIVATE_MODULE}.{name}, "
            "used by threedgen/representations/gsplat_reference.py,")


def _private(name: str):
    try:
        module = importlib.import_module(PRIVATE_MODULE)
    except ImportError as exc:
        pytest.fail(f"{_where(name)} cannot be imported: the module is gone ({exc})")
    if not hasattr(module, name):
        pytest.fail(f"{_where(name)} is missing; find where this gsplat version moved it and update the wrapper")
    return getattr(module, name)


def _reference():
    try:
        return importlib.import_module("threedgen.representations.gsplat_reference")
    except ImportError as exc:
        pytest.fail(f"gsplat {gsplat.__version__}: threedgen.representations.gsplat_reference does not import ({exc})")


@pytest.mark.parametrize("name", sorted(USED))
def test_private_function_exists_with_the_parameters_threedgen_passes(name):
    params = inspect.signature(_private(name)).parameters
    positional, keywords = USED[name]
    names = list(params)
    assert names[:len(positional)] == list(positional), (
        f"{_where(name)} changed its leading parameters: {names[:len(positional)]}, expected {list(positional)}")
    for key in keywords:
        assert key in params, f"{_where(name)} no longer takes {key}= (parameters: {names})"


def test_the_wrapper_reexports_them_and_states_the_pin():
    ref = _reference()
    for public, name in (("quat_scale_to_covar_preci", "_quat_scale_to_covar_preci"),
                         ("fully_fused_projection", "_fully_fused_projection"),
                         ("spherical_harmonics", "_spherical_harmonics")):
        assert getattr(ref, public) is _private(name), f"gsplat_reference.{public} is not {PRIVATE_MODULE}.{name}"
    assert ref.GSPLAT_RANGE == _pinned(), "gsplat_reference.GSPLAT_RANGE differs from pyproject.toml's gsplat pin"


def test_covariance_of_an_unrotated_gaussian_is_its_squared_scales():
    fn = _private("_quat_scale_to_covar_preci")
    quats = torch.tensor([[2.0, 0.0, 0.0, 0.0]], dtype=torch.float64)  # identity rotation, any norm
    scales = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    covars, precis = fn(quats, scales, compute_covar=True, compute_preci=True)
    expect = torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64))[None]
    assert covars is not None and torch.allclose(covars, expect), f"{_where('_quat_scale_to_covar_preci')} gave {covars}"
    assert precis is not None and torch.allclose(precis, torch.linalg.inv(expect)), (
        f"{_where('_quat_scale_to_covar_preci')} precision {precis}")
    covars, precis = fn(quats, scales, compute_covar=True, compute_preci=False)
    assert precis is None and torch.allclose(covars, expect), f"{_where('_quat_scale_to_covar_preci')} compute_preci=False"


def test_projection_of_a_gaussian_on_the_optical_axis():
    """Camera at the origin looking down +z (OpenCV), focal 100, principal point (32, 32); an
    isotropic Gaussian (variance 0.01) at depth 2: centre (32, 32), 2D variance (100/2)^2 0.01 = 25
    plus eps2d 0.3, conic 1/25.3 on the diagonal, radius ceil(3.33 sqrt(25.3)) = 17."""
    fn = _private("_fully_fused_projection")
    d = torch.float64
    means = torch.tensor([[0.0, 0.0, 2.0]], dtype=d)
    covars = 0.01 * torch.eye(3, dtype=d)[None]
    Ks = torch.tensor([[[100.0, 0.0, 32.0], [0.0, 100.0, 32.0], [0.0, 0.0, 1.0]]], dtype=d)
    out = fn(means, covars, torch.eye(4, dtype=d)[None], Ks, 64, 64, eps2d=0.3, near_plane=0.01)
    assert isinstance(out, tuple) and len(out) == 5, f"{_where('_fully_fused_projection')} returns {type(out)}"
    radii, means2d, depths, conics, _ = out
    where = _where("_fully_fused_projection")
    assert torch.allclose(means2d, torch.tensor([[[32.0, 32.0]]], dtype=d)), f"{where} means2d {means2d}"
    assert torch.allclose(depths, torch.tensor([[2.0]], dtype=d)), f"{where} depths {depths}"
    assert torch.allclose(conics, torch.tensor([[[1 / 25.3, 0.0, 1 / 25.3]]], dtype=d)), f"{where} conics {conics}"
    assert radii.tolist() == [[[17, 17]]] and math.ceil(3.33 * math.sqrt(25.3)) == 17, f"{where} radii {radii}"
    behind = fn(-means, covars, torch.eye(4, dtype=d)[None], Ks, 64, 64, eps2d=0.3, near_plane=0.01)[0]
    assert behind.tolist() == [[[0, 0]]], f"{where} does not cull a Gaussian behind the camera"


def test_spherical_harmonics_of_degree_zero_and_one():
    fn = _private("_spherical_harmonics")
    where = _where("_spherical_harmonics")
    c0, c1 = 0.28209479177387814, 0.4886025119029199
    coeffs = torch.zeros(1, 4, 3, dtype=torch.float64)
    coeffs[0, 0] = torch.tensor([1.0, 2.0, 3.0])
    coeffs[0, 3] = 1.0  # the x basis, -c1 x in gsplat's order (1, y, z, x)
    dirs = torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.float64)  # normalised inside
    flat = fn(0, dirs, coeffs)
    assert torch.allclose(flat, c0 * torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)), f"{where} degree 0: {flat}"
    view = fn(1, dirs, coeffs)
    assert torch.allclose(view, flat - c1), f"{where} degree 1 along +x: {view}"
