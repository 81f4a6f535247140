"""Evaluation: a perfect prediction scores IoU 1, a turned one is found at the right yaw."""

import math

import numpy as np
import pytest
import torch

from threedgen.cameras import Cameras
from threedgen.evaluate import chamfer, evaluate_representation, mask_iou, psnr, rotate_y
from threedgen.guidance.priors.shapes.prior import ShapeTruth
from threedgen.meshing import LEVEL_RESOLUTION, LEVEL_VIEWS, view_level
from threedgen.representations.base import RenderOutput, Representation


class TruthRepresentation(Representation):
    """Renders the true shape, turned by ``yaw`` degrees about +Y."""

    def __init__(self, truth: ShapeTruth, yaw: float = 0.0):
        super().__init__()
        self.truth, self.yaw = truth, yaw

    def render(self, cameras, height, width):
        # The object turned by +yaw, seen from azimuth a, looks like the original from a - yaw.
        turned = Cameras.from_angles(cameras.elevation, cameras.azimuth - self.yaw, cameras.distance,
                                     cameras.fovy, cameras.background)
        rgb, alpha = self.truth.render(turned, height, width)
        return RenderOutput(rgb, alpha[..., None], torch.zeros_like(alpha[..., None]))


def _truth(shape="cube"):
    return ShapeTruth(shape, "red", (0.86, 0.10, 0.10))


def test_perfect_prediction_scores_one():
    truth = _truth("torus")
    m = evaluate_representation(TruthRepresentation(truth), truth, 2.5, 40.0, mesh=truth.mesh(), size=32)
    assert m["mask_iou"] == 1.0 and m["mask_iou_unaligned"] == 1.0
    assert m["psnr"] > 60 and m["best_yaw_degrees"] == 0.0
    assert m["chamfer"] < 0.005  # the sampling floor of 20k points per surface
    assert len(m["views"]) >= 8


def test_turned_prediction_is_aligned_by_the_yaw_search():
    truth = _truth("pyramid")
    turned_mesh = truth.mesh().copy()
    turned_mesh.vertices = rotate_y(np.asarray(turned_mesh.vertices), 30.0)
    m = evaluate_representation(TruthRepresentation(truth, yaw=30.0), truth, 2.5, 40.0, mesh=turned_mesh, size=32)
    assert m["best_yaw_degrees"] in (30.0, -60.0)  # the pyramid is 90-degree symmetric
    assert m["mask_iou"] == pytest.approx(1.0, abs=1e-9)
    assert m["mask_iou_unaligned"] < 0.97
    assert m["chamfer"] < 0.005
    assert chamfer(turned_mesh, truth.mesh(), 0.0) > 2 * m["chamfer"]


def test_metric_helpers():
    a = np.zeros((1, 4, 4)); a[0, :2] = 1
    b = np.zeros((1, 4, 4)); b[0, :, :2] = 1
    assert mask_iou(a, b)[0] == pytest.approx(4 / 12)
    assert psnr(np.zeros((1, 2, 2, 3)), np.full((1, 2, 2, 3), 0.1))[0] == pytest.approx(20.0)
    # rotate_y turns +Z towards +X, like the azimuth.
    np.testing.assert_allclose(rotate_y(np.array([[0.0, 0.0, 1.0]]), 90.0), [[1.0, 0.0, 0.0]], atol=1e-12)


def test_view_level_soft_and_sharp():
    """The automatic level makes the mesh's silhouettes those of the renders: for a sharp ball a
    level between its inside and outside, for a soft one the radius where a ray through it gathers
    alpha 0.5 (optical depth ln 2), found here in closed form."""
    bound, n = 1.0, 64
    lin = np.linspace(-bound, bound, n)
    x, y, z = np.meshgrid(lin, lin, lin, indexing="ij")
    r = np.sqrt(x * x + y * y + z * z)
    voxel = 2 * bound / (n - 1)
    sharp = np.where(r < 0.5, 50.0, 0.0).astype(np.float32)
    level = view_level(sharp, bound)
    assert 0 < level < 50
    # Soft: sigma = A exp(-(r/s)^2); a ray at distance b from the centre gathers A s sqrt(pi) exp(-(b/s)^2).
    a, s = 20.0, 0.3
    soft = (a * np.exp(-(r / s) ** 2)).astype(np.float32)
    lv = view_level(soft, bound)
    rad_render = s * math.sqrt(math.log(a * s * math.sqrt(math.pi) / math.log(2)))
    rad_mesh = s * math.sqrt(math.log(a / lv))  # where the density falls to the level
    assert abs(rad_render - rad_mesh) < voxel
    assert view_level(np.zeros((8, 8, 8), np.float32), bound) == float("inf")
    # Given the renders' opacity instead (every pixel opaque): a lower level, which covers more.
    assert view_level(soft, bound, alpha=np.ones(len(LEVEL_VIEWS) * LEVEL_RESOLUTION ** 2)) < lv


def test_near_ties_take_the_smallest_turn():
    """A yaw that beats no turn by less than YAW_TIE is noise (a torus scores alike at every yaw):
    the search keeps the object as it is, and takes the smallest of near-equal turns."""
    from threedgen.evaluate import YAW_TIE, smallest_turn

    assert smallest_turn({0.0: 0.950, 40.0: 0.955, 90.0: 0.951}) == 0.0
    assert smallest_turn({0.0: 0.90, 40.0: 0.955, 350.0: 0.952}) == 350.0  # -10 degrees: the smaller turn
    assert smallest_turn({0.0: 0.90, 40.0: 0.96, 90.0: 0.93}) == 40.0
    assert smallest_turn({0.0: 0.95 - YAW_TIE * 1.5, 30.0: 0.95}) == 30.0
    truth = _truth("torus")
    m = evaluate_representation(TruthRepresentation(truth, yaw=23.0), truth, 2.5, 40.0, size=32)
    assert m["best_yaw_degrees"] == 0.0 and m["mask_iou"] == m["mask_iou_unaligned"] > 0.99
