"""The asset metrics of `threedgen eval` (threedgen.asset_metrics), each on a constructed case
whose answer is known."""

import numpy as np
import pytest
import torch
import trimesh

from threedgen.asset_metrics import sample_texture, surface_metrics, topology
from threedgen.evaluate import rotate_y
from threedgen.export import build_asset, export_meshes
from threedgen.guidance.priors.shapes.prior import ShapeTruth
from threedgen.meshing import Surface


def _truth(shape="cube"):
    return ShapeTruth(shape, "red", (0.86, 0.10, 0.10))


def _colored(mesh, fn):
    mesh = mesh.copy()
    rgb = fn(torch.as_tensor(np.asarray(mesh.vertices))).numpy()
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=np.concatenate(
        [(np.clip(rgb, 0, 1) * 255).round(), np.full((len(rgb), 1), 255)], 1).astype(np.uint8))
    return mesh


def test_the_truth_scores_zero():
    truth = _truth("cube")
    m = surface_metrics(_colored(truth.mesh(), truth.shaded_color), truth)
    assert m["normal_error_deg"] < 1.5  # marching cubes bevels the cube's edges a little
    assert m["texture_color_error"] < 0.01  # 8-bit colours, interpolated across the bevels
    assert m["watertight"] and m["open_edges"] == 0 and m["pinched_edges"] == 0
    assert abs(m["height_error"]) < 0.005 and m["height"] == pytest.approx(0.8, abs=0.005)


def test_nearest_surface_and_shading_of_the_truth():
    truth = _truth("cube")
    points, normals = truth.nearest_surface(torch.tensor([[0.6, 0.1, 0.0], [0.0, 0.3, 0.0], [0.1, -0.5, 0.2]]))
    np.testing.assert_allclose(points.numpy(), [[0.4, 0.1, 0.0], [0.0, 0.4, 0.0], [0.1, -0.4, 0.2]], atol=1e-6)
    np.testing.assert_allclose(normals.numpy(), [[1, 0, 0], [0, 1, 0], [0, -1, 0]], atol=1e-6)
    # Lit from above: the top face gets ambient + diffuse * cos, the bottom face ambient only.
    light = np.array([0.35, 0.85, 0.40]) / np.linalg.norm([0.35, 0.85, 0.40])
    rgb = truth.shaded_color(torch.tensor([[0.0, 0.5, 0.0], [0.0, -0.5, 0.0]])).numpy()
    np.testing.assert_allclose(rgb[0], np.array(truth.albedo) * (0.3 + 0.7 * light[1]), atol=1e-6)
    np.testing.assert_allclose(rgb[1], np.array(truth.albedo) * 0.3, atol=1e-6)


def test_a_roof_on_the_cube_has_its_slope_as_normal_error():
    """A cube under a 10-degree pyramid roof: every roof point lies straight above the truth's top
    face, so the roof's error is 10 degrees and the mean is 10 x the roof's share of the area."""
    truth = _truth("cube")
    corners = np.array([[x, y, z] for x in (-0.4, 0.4) for y in (-0.4, 0.4) for z in (-0.4, 0.4)])
    apex = [0.0, 0.4 + 0.4 * np.tan(np.radians(10.0)), 0.0]
    mesh = trimesh.convex.convex_hull(np.vstack([corners, apex]))
    roof = mesh.area - 5 * 0.64
    m = surface_metrics(mesh, truth)
    assert m["normal_error_deg"] == pytest.approx(10.0 * roof / mesh.area, rel=0.05)
    assert m["texture_color_error"] is None  # no colours at all
    inverted = truth.mesh().copy()
    inverted.invert()
    assert surface_metrics(inverted, truth)["normal_error_deg"] > 175.0


def test_pits_on_flat_faces_raise_the_normal_error():
    truth = _truth("cube")
    mesh = trimesh.creation.box(extents=(0.8, 0.8, 0.8)).subdivide().subdivide().subdivide()
    flat = surface_metrics(mesh, truth)["normal_error_deg"]
    rng = np.random.default_rng(0)
    v = np.array(mesh.vertices)
    # push random vertices inwards by up to 2 cm, along the face they sit on
    inward = -np.sign(v) * (np.abs(v) > 0.399)
    v += inward * rng.uniform(0, 0.02, (len(v), 1)) * (rng.random((len(v), 1)) < 0.5)
    pitted = surface_metrics(trimesh.Trimesh(v, mesh.faces), truth)["normal_error_deg"]
    assert flat < 0.5 and pitted > 5.0


def test_the_yaw_turns_the_mesh_back_onto_the_truth():
    truth = _truth("pyramid")
    turned = truth.mesh().copy()
    turned.vertices = rotate_y(np.asarray(turned.vertices), 30.0)
    assert surface_metrics(turned, truth, yaw=30.0)["normal_error_deg"] < 2.0
    assert surface_metrics(turned, truth, yaw=0.0)["normal_error_deg"] > 10.0


def test_baked_texture_colour_error_through_a_glb(tmp_path):
    """The texture is baked from a colour function, written as a GLB and read back: the truth's
    colours score ~0 (so UVs and the image are read the right way up), colours 0.1 off in red score
    0.1, and the texture's seams do not count as holes."""
    truth = _truth("cube")
    glbs = {}
    for name, shift in (("exact", 0.0), ("off", 0.1)):
        def color_fn(points, shift=shift):
            rgb = truth.shaded_color(points.double()).float()
            return rgb + torch.tensor([shift, 0.0, 0.0])
        asset = build_asset(Surface(truth.mesh(), color_fn), "uv", 256, faces=3000)
        run = tmp_path / name
        run.mkdir()
        export_meshes(asset, run, ("glb",))
        glbs[name] = trimesh.load(run / "mesh.glb", force="mesh")
    assert glbs["exact"].visual.kind == "texture"
    exact = surface_metrics(glbs["exact"], truth)
    off = surface_metrics(glbs["off"], truth)
    assert exact["texture_color_error"] < 0.01
    assert off["texture_color_error"] == pytest.approx(0.1, abs=0.01)
    assert exact["watertight"] and exact["open_edges"] == 0


def test_sample_texture_is_bilinear_with_v_up():
    image = np.zeros((2, 2, 3), np.uint8)
    image[0, 0] = 255  # top-left texel: u small, v large
    top_left = sample_texture(image, np.array([[0.25, 0.75], [0.25, 0.25], [0.5, 0.5]]))
    np.testing.assert_allclose(top_left[:, 0], [1.0, 0.0, 0.25])


def test_open_and_pinched_edges_are_counted():
    box = trimesh.creation.box()
    assert topology(box) == {"watertight": True, "open_edges": 0, "pinched_edges": 0}
    holed = trimesh.Trimesh(box.vertices, box.faces[1:], process=False)
    assert topology(holed) == {"watertight": False, "open_edges": 3, "pinched_edges": 0}
    # a third triangle on one of the box's edges: that edge has three faces
    a, b = box.faces[0][:2]
    fin = trimesh.Trimesh(np.vstack([box.vertices, [[3.0, 3.0, 3.0]]]),
                          np.vstack([box.faces, [[a, b, len(box.vertices)]]]), process=False)
    t = topology(fin)
    assert not t["watertight"] and t["pinched_edges"] == 1 and t["open_edges"] == 2


def test_height_error_is_signed_metres_at_the_export_scale():
    truth = _truth("cube")
    mesh = trimesh.creation.box(extents=(0.8, 0.8, 0.8))
    v = np.array(mesh.vertices)
    v[v[:, 1] < 0, 1] -= 0.1  # a sagging underside
    sagged = trimesh.Trimesh(v, mesh.faces)
    assert surface_metrics(sagged, truth)["height_error"] == pytest.approx(0.1, abs=0.005)
    m = surface_metrics(sagged, truth, scale=2.0)
    assert m["height_error"] == pytest.approx(0.2, abs=0.01) and m["height"] == pytest.approx(1.8, abs=1e-6)
