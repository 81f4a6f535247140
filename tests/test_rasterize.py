"""The pure-PyTorch triangle rasteriser (``threedgen.rasterize``) and the textured mesh built on it
(``representations/mesh.py``) against independent references: trimesh's pure-numpy ray caster for
visibility and hit distances, the numpy texture lookup of ``asset_metrics`` (and a hand-written
bilinear filter) for the UV convention, and ``trimesh`` containment for the opacity grid; plus
gradient checks through the differentiable half (barycentrics, interpolation, texture lookup)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh
from trimesh.ray.ray_triangle import RayMeshIntersector

from threedgen import asset_metrics
from threedgen import rasterize as rasterize_module
from threedgen.cameras import Cameras
from threedgen.rasterize import barycentrics, interpolate, rasterize, sample_texture
from threedgen.representations.mesh import MeshStart, TexturedMesh, mesh_opacity_grid
from threedgen.texture import unwrap

F64 = torch.float64


# ---- scenes ----------------------------------------------------------------------------------

def exact_f32(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """The mesh with float32-representable vertices, so the float32 renderer and the float64
    reference see the very same triangles."""
    return trimesh.Trimesh(np.asarray(mesh.vertices, np.float32).astype(np.float64), np.asarray(mesh.faces),
                           process=False)


def occluded_scene() -> trimesh.Trimesh:
    """A squashed icosphere with a box in front of it, overlapping it (occlusion matters)."""
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    sphere.apply_scale([1.0, 0.6, 1.0])
    box = trimesh.creation.box(extents=[0.35, 0.3, 0.3])
    box.apply_transform(trimesh.transformations.rotation_matrix(0.5, [0.3, 1.0, 0.2]))
    box.apply_translation([0.12, 0.05, 0.45])
    return exact_f32(trimesh.util.concatenate([sphere, box]))


def torus() -> trimesh.Trimesh:
    """A closed, non-convex mesh (it hides parts of itself), tilted."""
    mesh = trimesh.creation.torus(major_radius=0.45, minor_radius=0.17, major_sections=24, minor_sections=12)
    mesh.apply_transform(trimesh.transformations.rotation_matrix(0.6, [1.0, 0.0, 0.3]))
    return exact_f32(mesh)


def tensors(mesh: trimesh.Trimesh, dtype=torch.float32):
    return (torch.as_tensor(np.asarray(mesh.vertices), dtype=dtype),
            torch.as_tensor(np.asarray(mesh.faces), dtype=torch.long))


def reference_first_hits(mesh: trimesh.Trimesh, cams: Cameras, height: int, width: int):
    """trimesh's first face ``[B,H,W]`` (-1 for a miss) along the renderer's own rays, and the hit
    distances ``[B,H,W]`` (NaN for a miss)."""
    origins, dirs = cams.rays(height, width)
    o = origins.reshape(-1, 3).double().numpy()
    d = dirs.reshape(-1, 3).double().numpy()
    caster = RayMeshIntersector(mesh)
    face = caster.intersects_first(o, d)
    locations, index_ray, _ = caster.intersects_location(o, d, multiple_hits=False)
    dist = np.full(len(o), np.nan)
    dist[index_ray] = np.linalg.norm(locations - o[index_ray], axis=-1)
    shape = (len(cams), height, width)
    return face.reshape(shape), dist.reshape(shape)


SCENES = {
    # name: (mesh, cameras, height, width)
    "occluded": (occluded_scene, lambda: Cameras.from_angles([10.0, 25.0, -15.0], [20.0, -35.0, 5.0], [2.0, 2.4, 1.9],
                                                    [40.0, 30.0, 50.0]), 40, 48),
    "torus": (torus, lambda: Cameras.from_angles([-90.0, -40.0, 0.0, 35.0, 80.0], [0.0, 70.0, 150.0, 230.0, 300.0],
                                                 2.0, 45.0), 36, 36),
}


@pytest.fixture(scope="module", params=sorted(SCENES))
def scene(request):
    make_mesh, make_cams, height, width = SCENES[request.param]
    mesh, cams = make_mesh(), make_cams()
    verts, faces = tensors(mesh)
    frags = rasterize(verts, faces, cams, height, width)
    ref_face, ref_dist = reference_first_hits(mesh, cams, height, width)
    return dict(name=request.param, mesh=mesh, cams=cams, height=height, width=width, verts=verts, faces=faces,
                frags=frags, ref_face=ref_face, ref_dist=ref_dist)


# ---- 1. visibility against trimesh's ray caster ----------------------------------------------

def test_visibility_matches_trimesh_ray_caster(scene):
    face = scene["frags"].face.numpy()
    ref = scene["ref_face"]
    assert face.shape == ref.shape
    n = face.size
    covered = (face >= 0).sum()
    assert 0.1 * n < covered < 0.9 * n  # the scene is in view, with background around it
    # Ties on shared edges may go either way; nothing else may differ.
    assert (face == ref).mean() >= 0.999, f"{(face != ref).sum()} of {n} pixels differ"
    assert ((face >= 0) != (ref >= 0)).sum() <= 3
    # The occluded scene: the box (faces after the sphere's) hides part of the sphere in every view.
    if scene["name"] == "occluded":
        sphere_faces = len(trimesh.creation.icosphere(subdivisions=2).faces)
        alone = rasterize(scene["verts"], scene["faces"][:sphere_faces], scene["cams"], scene["height"],
                          scene["width"]).face.numpy()
        for view in range(len(scene["cams"])):
            assert ((face[view] >= 0) & (face[view] < sphere_faces)).sum() > 20
            assert ((face[view] >= sphere_faces) & (alone[view] >= 0)).sum() > 20  # box over sphere


def test_hit_distances_match_trimesh(scene):
    frags = scene["frags"]
    verts64 = scene["verts"].double()
    _, t = barycentrics(verts64, scene["faces"], frags)
    face = frags.face.numpy()
    same = (face == scene["ref_face"])[frags.mask.numpy()]  # over the covered pixels, fragments' order
    ref_t = scene["ref_dist"][frags.mask.numpy()]
    assert same.mean() >= 0.999
    assert np.abs(t.detach().numpy()[same] - ref_t[same]).max() < 1e-4
    assert (t > 0).all()  # every hit kept is in front of the camera


# ---- 2. barycentrics are exact -----------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 1e-5)])
def test_barycentrics_reproduce_the_hit(scene, dtype, tol):
    frags = scene["frags"]
    verts = scene["verts"].to(dtype)
    bary, t = barycentrics(verts, scene["faces"], frags)
    assert bary.dtype == dtype and t.dtype == dtype
    corners = verts[scene["faces"][frags.face[frags.mask]]]  # [N,3,3]
    point = (bary[..., None] * corners).sum(1)
    on_ray = frags.origins.to(dtype) + t[:, None] * frags.directions.to(dtype)
    assert (point - on_ray).abs().max() < tol
    assert (bary.sum(-1) - 1).abs().max() < tol
    assert bary.min() >= -1e-5 and bary.max() <= 1 + 1e-5


# ---- 3. gradients ------------------------------------------------------------------------------

def test_gradcheck_barycentrics_and_interpolate():
    verts = torch.tensor([[-0.6, -0.5, 0.0], [0.7, -0.4, 0.1], [0.0, 0.6, -0.2],
                          [0.3, 0.3, 0.4], [0.9, 0.5, 0.3], [0.5, 0.9, 0.5]], dtype=F64)
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    cams = Cameras.from_angles(5.0, 10.0, 2.5, 40.0)
    frags = rasterize(verts, faces, cams, 8, 8)  # once, outside: visibility is not differentiable
    ids = frags.face[frags.mask]
    assert len(ids) >= 6 and set(ids.tolist()) == {0, 1}
    corner_uv = torch.rand(2, 3, 2, dtype=F64, generator=torch.Generator().manual_seed(0))

    def uv_and_depth(v):
        bary, t = barycentrics(v, faces, frags)
        return torch.cat([interpolate(bary, corner_uv, ids).flatten(), t])

    assert torch.autograd.gradcheck(uv_and_depth, (verts.clone().requires_grad_(),), eps=1e-6, atol=1e-6)
    # Attributes too: interpolation is linear in the corner values.
    bary, _ = barycentrics(verts, faces, frags)
    assert torch.autograd.gradcheck(lambda c: interpolate(bary, c, ids), (corner_uv.clone().requires_grad_(),))


def test_gradcheck_sample_texture():
    g = torch.Generator().manual_seed(1)
    texture = torch.rand(3, 5, 7, dtype=F64, generator=g, requires_grad=True)
    uv = torch.rand(20, 2, dtype=F64, generator=g) * 1.2 - 0.1  # some beyond the border (clamped)
    assert torch.autograd.gradcheck(lambda tex: sample_texture(tex, uv), (texture,))
    # And in the UVs, away from the texel-centre kinks and the border.
    uv_in = (torch.rand(12, 2, dtype=F64, generator=g) * 0.6 + 0.2).requires_grad_()
    assert torch.autograd.gradcheck(lambda u: sample_texture(texture.detach(), u), (uv_in,), eps=1e-7, atol=1e-5)


# ---- 4. texture lookup against asset_metrics (and a hand-written bilinear filter) ---------------

def bilinear_reference(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """glTF bilinear lookup written out: texel (i, j)'s centre at UV ((i + .5) / W, 1 - (j + .5) / H),
    coordinates clamped to the border texels' centres."""
    h, w = image.shape[:2]
    img = image.astype(np.float64) / 255.0
    x = np.clip(uv[:, 0] * w - 0.5, 0, w - 1)
    y = np.clip((1 - uv[:, 1]) * h - 0.5, 0, h - 1)
    x0, y0 = np.minimum(np.floor(x).astype(int), w - 2), np.minimum(np.floor(y).astype(int), h - 2)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    return ((1 - fx) * (1 - fy) * img[y0, x0] + fx * (1 - fy) * img[y0, x0 + 1]
            + (1 - fx) * fy * img[y0 + 1, x0] + fx * fy * img[y0 + 1, x0 + 1])


def test_sample_texture_matches_numpy_lookup():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, size=(9, 13, 3), dtype=np.uint8)  # not square: rows vs columns matter
    h, w = image.shape[:2]
    uv = np.concatenate([
        rng.uniform(0, 1, (400, 2)),
        rng.uniform(-0.05, 0.05, (50, 2)), rng.uniform(0.95, 1.05, (50, 2)),  # near and past the borders
        np.stack([rng.uniform(0, 1, 50), rng.choice([0.0, 1.0, 0.5 / h, 1 - 0.5 / h], 50)], 1),
        np.stack([rng.choice([0.0, 1.0, 0.5 / w, 1 - 0.5 / w], 50), rng.uniform(0, 1, 50)], 1),
        # texel centres: exactly the texel's value
        np.stack(np.meshgrid((np.arange(w) + 0.5) / w, 1 - (np.arange(h) + 0.5) / h, indexing="xy"), -1).reshape(-1, 2),
    ])
    texture = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    mine = sample_texture(texture, torch.as_tensor(uv, dtype=torch.float32)).numpy()
    assert mine.shape == (len(uv), 3)
    theirs = asset_metrics.sample_texture(image, uv)
    # float32 texture and UVs against float64: well within 1e-6 of a [0, 1] colour
    np.testing.assert_allclose(mine, theirs, atol=1e-6, rtol=0)
    # Float64 throughout: the same numbers to rounding.
    mine64 = sample_texture(torch.from_numpy(image).permute(2, 0, 1).double() / 255.0, torch.as_tensor(uv))
    np.testing.assert_allclose(mine64.numpy(), theirs, atol=1e-12, rtol=0)
    np.testing.assert_allclose(mine64.numpy(), bilinear_reference(image, uv), atol=1e-12, rtol=0)
    centres = mine[-h * w:].reshape(h, w, 3)
    np.testing.assert_allclose(centres, image / 255.0, atol=1e-6)


# ---- 5. a rendered TexturedMesh against rays cast by trimesh ----------------------------------

def textured_start(mesh: trimesh.Trimesh, size: int = 64) -> MeshStart:
    vertices = np.asarray(mesh.vertices, np.float32)
    faces = np.asarray(mesh.faces, np.int64)
    vmapping, tex_faces, uv = unwrap(vertices, faces, size)
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    image = np.stack([xx, yy, 0.5 + 0.4 * np.sin(2 * np.pi * (1.5 * xx + yy))], -1)  # smooth, not symmetric
    image = (image * 255).round().clip(0, 255).astype(np.uint8)
    return MeshStart(positions=vertices, faces=faces, uv=uv, tex_faces=tex_faces, vmapping=vmapping, image=image)


def test_textured_mesh_render_matches_trimesh_and_numpy_texture():
    surface = exact_f32(trimesh.creation.icosphere(subdivisions=2, radius=0.5))
    start = textured_start(surface)
    assert (start.vmapping.max() < len(start.positions)) and (start.positions[start.vmapping][start.tex_faces]
                                                              == start.positions[start.faces]).all()
    cams = Cameras.from_angles([15.0, -50.0, 60.0], [30.0, 180.0, -100.0], 2.0, 40.0,
                               [[0.2, 0.4, 0.9], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    height, width = 30, 34
    out = TexturedMesh(start, supersample=1).render(cams, height, width)
    assert out.rgb.shape == (3, height, width, 3) and out.alpha.shape == (3, height, width, 1)
    rgb, alpha = out.rgb.detach().numpy(), out.alpha.detach().numpy()[..., 0]

    # The reference: trimesh's first hit along the same rays, its barycentrics, the corner UVs.
    origins, dirs = cams.rays(height, width)
    o, d = origins.reshape(-1, 3).double().numpy(), dirs.reshape(-1, 3).double().numpy()
    mesh = start.surface()
    locations, index_ray, index_tri = RayMeshIntersector(mesh).intersects_location(o, d, multiple_hits=False)
    bary = trimesh.triangles.points_to_barycentric(mesh.triangles[index_tri], locations)
    uv = (start.uv[start.tex_faces[index_tri]] * bary[:, :, None]).sum(1)
    expected = cams.background.numpy()[:, None, None, :].repeat(height, 1).repeat(width, 2).reshape(-1, 3).copy()
    expected[index_ray] = asset_metrics.sample_texture(start.image, uv)
    expected = expected.reshape(rgb.shape)
    ref_mask = np.zeros(len(o), bool)
    ref_mask[index_ray] = True
    ref_mask = ref_mask.reshape(alpha.shape)
    ref_face = np.full(len(o), -1)
    ref_face[index_ray] = index_tri
    ref_face = ref_face.reshape(alpha.shape)

    # Alpha is the coverage mask: the renderer's own and, to a handful of pixels, trimesh's.
    frags = rasterize(torch.as_tensor(start.positions), torch.as_tensor(start.faces), cams, height, width)
    np.testing.assert_array_equal(alpha, frags.mask.numpy().astype(np.float32))
    assert set(np.unique(alpha)) == {0.0, 1.0}
    assert (alpha.astype(bool) != ref_mask).sum() <= 3
    # Background pixels are the camera's background, exactly.
    background = ~alpha.astype(bool)
    np.testing.assert_array_equal(rgb[background], expected[background & ~ref_mask])
    # Covered pixels: the texture at the hit's UV (pixels where an edge tie picked the other face,
    # maybe across a chart seam, are left out of the max; there may be no more than a handful).
    both = alpha.astype(bool) & ref_mask
    same = frags.face.numpy() == ref_face
    assert (both & ~same).sum() <= 0.001 * both.sum() + 1
    diff = np.abs(rgb - expected)
    assert diff[both].mean() < 1e-3
    assert diff[both & same].max() < 0.02
    # The texture is really seen: the covered pixels are not one flat colour.
    assert rgb[both].std(0).min() > 0.05


def test_textured_mesh_out_of_view_renders_background():
    start = textured_start(exact_f32(trimesh.creation.box(extents=[0.4, 0.4, 0.4])), size=32)
    start.positions = start.positions + np.float32([20.0, 0.0, 0.0])
    cams = Cameras.from_angles([0.0, 30.0], [0.0, 90.0], 2.0, 40.0, [[0.1, 0.2, 0.3], [1.0, 1.0, 1.0]])
    out = TexturedMesh(start, supersample=2).render(cams, 8, 10)
    assert out.rgb.shape == (2, 8, 10, 3)
    assert (out.alpha == 0).all() and (out.depth == 0).all()
    np.testing.assert_array_equal(out.rgb.detach().numpy(), cams.background.numpy()[:, None, None].repeat(8, 1)
                                  .repeat(10, 2))


# ---- 6. the opacity grid of a closed mesh ------------------------------------------------------

def shifted_box():
    """The box of half-size 0.3, moved off the grid's symmetry: no voxel row runs along the
    diagonal edge of a face."""
    mesh = trimesh.creation.box(extents=[0.6, 0.6, 0.6])
    mesh.apply_translation([0.0, 0.013, 0.0])
    return mesh


# The centred box's -X face is split along y == z, which the symmetric grid's rows (y_j == z_j)
# meet exactly: a crossing through that shared edge must count once, not twice or never.
@pytest.mark.parametrize("make", [pytest.param(lambda: trimesh.creation.box(extents=[0.6, 0.6, 0.6]), id="box"),
                                  pytest.param(shifted_box, id="shifted-box"),
                                  pytest.param(lambda: trimesh.creation.icosphere(subdivisions=3, radius=0.4),
                                               id="sphere")])
def test_mesh_opacity_grid_matches_trimesh_contains(make):
    mesh = make()
    resolution, bound = 24, 0.5
    alpha, colour = mesh_opacity_grid(mesh, np.zeros((len(mesh.faces), 3), np.float32), bound, resolution)
    assert alpha.shape == (resolution,) * 3 and colour.shape == (resolution,) * 3 + (3,)
    assert set(torch.unique(alpha).tolist()) <= {0.0, 1.0}
    lin = np.linspace(-bound, bound, resolution)
    points = np.stack(np.meshgrid(lin, lin, lin, indexing="ij"), -1).reshape(-1, 3)  # [x,y,z] order
    inside = mesh.contains(points).reshape(alpha.shape)
    assert inside.sum() > 100
    assert (alpha.numpy().astype(bool) == inside).mean() >= 0.99


def test_mesh_opacity_grid_axes_and_colours():
    """An off-centre, elongated box: the grid is indexed [x,y,z] and the colour is the nearest face's."""
    mesh = trimesh.creation.box(extents=[0.5, 0.2, 0.3])
    mesh.apply_translation([0.17, -0.11, 0.05])
    colours = np.random.default_rng(3).uniform(0, 1, (len(mesh.faces), 3)).astype(np.float32)
    resolution, bound = 20, 0.5
    alpha, colour = mesh_opacity_grid(mesh, colours, bound, resolution)
    lin = np.linspace(-bound, bound, resolution)
    x, y, z = np.meshgrid(lin, lin, lin, indexing="ij")
    inside = (np.abs(x - 0.17) < 0.25) & (np.abs(y + 0.11) < 0.1) & (np.abs(z - 0.05) < 0.15)
    assert (alpha.numpy().astype(bool) == inside).mean() >= 0.99
    centres = mesh.triangles.mean(1)
    points = np.stack([x, y, z], -1).reshape(-1, 3)
    dist = np.linalg.norm(points[:, None] - centres[None], axis=-1)
    best = dist.min(1)
    got = colour.numpy().reshape(-1, 3)
    # Where the nearest face centre is unambiguous, its colour.
    second = np.partition(dist, 1, axis=1)[:, 1]
    clear = second - best > 1e-6
    np.testing.assert_allclose(got[clear], colours[dist.argmin(1)][clear], atol=0)


def test_visibility_independent_of_chunking_and_face_order(scene, monkeypatch):
    """Candidates tested in many small chunks, faces in reverse order: the same nearest faces."""
    faces = scene["faces"]
    n = len(faces)
    monkeypatch.setattr(rasterize_module, "PAIR_BUDGET", 500)
    small = rasterize(scene["verts"], faces, scene["cams"], scene["height"], scene["width"]).face
    reverse = rasterize(scene["verts"], faces.flip(0), scene["cams"], scene["height"], scene["width"]).face
    reverse = torch.where(reverse >= 0, n - 1 - reverse, reverse)  # back to the original ids
    for other in (small, reverse):
        assert (other == scene["frags"].face).float().mean() >= 0.999
        assert (other.ge(0) != scene["frags"].mask).sum() == 0


# ---- 7. float32 and float64 vertices -----------------------------------------------------------

def test_float32_and_float64_vertices_agree(scene):
    verts64 = scene["verts"].double() + 1e-9  # not the float32 numbers exactly
    frags64 = rasterize(verts64, scene["faces"], scene["cams"], scene["height"], scene["width"])
    f32, f64 = scene["frags"].face, frags64.face
    assert f64.dtype == torch.long
    assert (f32 == f64).float().mean() >= 0.999
    assert (f32.ge(0) != f64.ge(0)).sum() <= 3
    both = (f32 == f64) & f32.ge(0)
    b32, t32 = barycentrics(scene["verts"], scene["faces"], scene["frags"])
    b64, t64 = barycentrics(verts64, scene["faces"], frags64)
    keep32, keep64 = both[scene["frags"].mask], both[frags64.mask]
    assert (b32[keep32].double() - b64[keep64]).abs().max() < 1e-4
    assert (t32[keep32].double() - t64[keep64]).abs().max() < 1e-4


# ---- geometry behind the camera, scenes out of view ------------------------------------------

def test_triangle_crossing_the_camera_plane_is_not_drawn():
    cams = Cameras.from_angles(0.0, 0.0, 2.0, 50.0)  # at (0, 0, 2) looking down -Z
    crossing = [[-1.0, -1.0, 0.0], [1.0, -1.0, 0.0], [0.0, 0.8, 3.0]]  # from z = 0 to behind the camera
    behind = [[-1.0, -1.0, 3.0], [1.0, -1.0, 3.0], [0.0, 1.0, 3.0]]  # wholly behind, facing the view axis
    verts = torch.tensor(crossing + behind)
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    frags = rasterize(verts, faces, cams, 16, 16)
    assert frags.face.shape == (1, 16, 16) and (frags.face == -1).all()
    assert frags.origins.shape == (0, 3) and frags.directions.shape == (0, 3)
    bary, t = barycentrics(verts, faces, frags)
    assert bary.shape == (0, 3) and t.shape == (0,)
    # A triangle in front beside them is still drawn, and only it.
    front = [[-0.3, -0.3, 0.5], [0.3, -0.3, 0.5], [0.0, 0.3, 0.5]]
    verts = torch.tensor(crossing + behind + front)
    faces = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    frags = rasterize(verts, faces, cams, 16, 16)
    drawn = frags.face[frags.mask]
    assert len(drawn) > 5 and (drawn == 2).all()


def test_scene_out_of_view_is_empty():
    cams = Cameras.from_angles([0.0, 20.0], [0.0, 45.0], 2.0, 40.0)
    mesh = trimesh.creation.icosphere(subdivisions=1, radius=0.3)
    verts, faces = tensors(mesh)
    for shift in ([10.0, 0.0, 0.0], [0.0, -10.0, 0.0], [0.0, 0.0, 30.0]):  # beside, below, behind the cameras
        frags = rasterize(verts + torch.tensor(shift), faces, cams, 12, 14)
        assert frags.face.shape == (2, 12, 14)
        assert (frags.face == -1).all() and not frags.mask.any()
        assert frags.origins.shape == (0, 3)
    # No faces at all.
    frags = rasterize(verts, torch.zeros(0, 3, dtype=torch.long), cams, 12, 14)
    assert (frags.face == -1).all()


def test_silhouette_gradient_fits_a_sphere_to_a_target_coverage():
    """The analytic antialiasing gives the silhouette a gradient: fitting a sphere's scale and
    offset to the supersampled coverage of a larger, shifted copy by plain gradient descent lands
    near the copy (within 4 % in scale, 0.01 in offset); binary coverage alone has no gradient."""
    from threedgen.rasterize import antialias, face_neighbours

    mesh = trimesh.creation.icosphere(subdivisions=3, radius=0.4)
    base, faces = tensors(mesh)
    neighbours = face_neighbours(faces)
    assert bool((neighbours >= 0).all())  # a closed mesh: every edge has a face across it
    cams = Cameras.from_angles([10.0, 30.0, -20.0], [0.0, 100.0, 220.0], 2.5, 40.0)
    target_points = base * 1.15 + torch.tensor([0.05, -0.03, 0.0])
    target = torch.nn.functional.avg_pool2d(rasterize(target_points, faces, cams, 256, 256).mask.float()[:, None], 8)[:, 0]

    def coverage(vertices):
        frags = rasterize(vertices, faces, cams, 64, 64)
        _, t = barycentrics(vertices, faces, frags)
        depth = torch.full(frags.face.shape, float("inf")).index_put((frags.mask,), t.detach())
        alpha = antialias(frags.mask.float()[..., None], frags.face, depth, vertices, faces, neighbours, cams)
        return torch.nn.functional.avg_pool2d(alpha[..., 0][:, None], 2)[:, 0]

    scale = torch.ones(1, requires_grad=True)
    shift = torch.zeros(3, requires_grad=True)
    plain = base * scale + shift
    frags = rasterize(plain, faces, cams, 64, 64)
    assert not frags.mask.float().requires_grad  # coverage alone: no gradient to fit with
    opt = torch.optim.Adam([scale, shift], lr=0.01)
    for _ in range(120):
        loss = (coverage(base * scale + shift) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs(float(scale.detach()) - 1.15) < 0.04 * 1.15
    assert torch.allclose(shift.detach()[:2], torch.tensor([0.05, -0.03]), atol=0.01)


@pytest.mark.cuda
def test_the_renderer_and_a_refinement_run_on_cuda_as_on_the_cpu():
    """The same code on CUDA: triangle ids and textured colours match the CPU's, and a few
    refinement steps (with the silhouette term) run there."""
    mesh = torus()
    start = textured_start(mesh)
    cams = Cameras.from_angles([20.0, -30.0, 60.0], [0.0, 120.0, 250.0], 2.5, 40.0)
    cpu = TexturedMesh(start, supersample=1)
    gpu = TexturedMesh(start, supersample=1, device="cuda")
    a = rasterize(cpu.positions, cpu.faces, cams, 48, 48).face
    b = rasterize(gpu.positions, gpu.faces, cams.to("cuda"), 48, 48).face.cpu()
    assert (a == b).float().mean() >= 0.999
    ra, rb = cpu.render(cams, 48, 48).rgb, gpu.render(cams.to("cuda"), 48, 48).rgb.cpu()
    same = (a == b)[..., None].expand_as(ra)
    assert torch.allclose(ra[same], rb[same], atol=1e-4)
    geo = TexturedMesh(start, geometry=True, lambda_laplacian=1.0, lambda_normal=1.0, device="cuda")
    opt = torch.optim.Adam([p for g in geo.parameter_groups() for p in g["params"]], lr=1e-3)
    for _ in range(3):
        out = geo.render(cams.to("cuda"), 32, 32)
        loss = out.rgb.mean() + out.alpha.mean() + geo.regularizer(out)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(geo.offsets.detach().abs().max()) > 0 and torch.isfinite(geo.texture_delta).all()
