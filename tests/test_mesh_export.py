"""Mesh export for artists: UV textures baked from the field, OBJ+MTL+PNG, decimation, scale,
orientation, the Khronos glTF validator and a headless Blender import."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from conftest import gltf_validator_available, validate_gltf

from threedgen.cli import main
from threedgen.export import build_asset, export_meshes
from threedgen.guidance.priors.shapes.render import LIGHT_DIR
from threedgen.meshing import Surface

needs_validator = pytest.mark.skipif(not gltf_validator_available(),
                                     reason="glTF validator not installed (npm ci --prefix tests/gltf)")
needs_blender = pytest.mark.skipif(shutil.which("blender") is None,
                                   reason="Blender not installed (Debian: apt-get install blender python3-numpy)")
BLENDER_SCRIPT = Path(__file__).parent / "blender_import.py"


def _position_colour(points: torch.Tensor) -> torch.Tensor:
    """A colour that differs everywhere on the unit sphere, so a misplaced texel shows."""
    return (points * 0.9 + 1) / 2


def _sphere_surface(subdivisions=4):
    return Surface(trimesh.creation.icosphere(subdivisions, radius=0.5), _position_colour)


def _texel_colours(mesh) -> np.ndarray:
    """rgb in [0,1] of the texture at each vertex's UV, read back from a loaded textured mesh."""
    material = mesh.visual.material
    texture = getattr(material, "baseColorTexture", None) or material.image  # PBR (glTF) or simple (OBJ)
    image = np.asarray(texture.convert("RGB"), np.float64) / 255
    size = image.shape[0]
    uv = mesh.visual.uv
    col = np.clip(np.round(uv[:, 0] * size - 0.5), 0, size - 1).astype(int)
    row = np.clip(np.round((1 - uv[:, 1]) * size - 0.5), 0, size - 1).astype(int)
    return image[row, col]


def test_uv_texture_holds_the_field_s_colour_at_every_surface_point(tmp_path):
    asset = build_asset(_sphere_surface(), "uv", texture_size=512, faces=0)
    export_meshes(asset, tmp_path)
    glb = trimesh.load(tmp_path / "mesh.glb", force="mesh")
    assert glb.visual.kind == "texture" and glb.visual.material.baseColorTexture.size == (512, 512)
    expected = _position_colour(torch.as_tensor(glb.vertices, dtype=torch.float32)).numpy()
    err = np.abs(_texel_colours(glb) - expected)
    # Nearest texel to a vertex's UV: off by at most about one texel of a smooth gradient.
    assert err.mean() < 0.01 and err.max() < 0.05, (err.mean(), err.max())
    image = np.asarray(glb.visual.material.baseColorTexture.convert("RGB"))
    assert image.reshape(-1, 3).std(0).min() > 20  # not a constant texture
    # Seam dilation: the whole image holds surface colours, none of the black it started as.
    assert (image.sum(-1) > 0).all()
    # PBR: base colour texture, no metal, matte.
    material = glb.visual.material
    assert material.metallicFactor == 0.0 and 0.5 <= material.roughnessFactor <= 1.0


def test_obj_material_and_texture_references_resolve(tmp_path):
    asset = build_asset(_sphere_surface(3), "uv", texture_size=256, faces=0)
    written = {p.name for p in export_meshes(asset, tmp_path, ("obj",))}
    assert written == {"mesh.obj", "mesh.mtl", "mesh_texture.png"}
    obj_text = (tmp_path / "mesh.obj").read_text()
    mtllib = re.search(r"^mtllib (\S+)$", obj_text, re.M).group(1)
    usemtl = re.search(r"^usemtl (\S+)$", obj_text, re.M).group(1)
    mtl_text = (tmp_path / mtllib).read_text()
    assert f"newmtl {usemtl}" in mtl_text
    texture = re.search(r"^map_Kd (\S+)$", mtl_text, re.M).group(1)
    assert (tmp_path / texture).is_file() and "Kd 1 1 1" in mtl_text  # white Kd: the texture shows as is
    assert len(re.findall(r"^vt ", obj_text, re.M)) >= len(asset.textured.vertices)
    loaded = trimesh.load(tmp_path / "mesh.obj", force="mesh")
    assert loaded.visual.kind == "texture"
    expected = _position_colour(torch.as_tensor(loaded.vertices, dtype=torch.float32)).numpy()
    assert np.abs(_texel_colours(loaded) - expected).mean() < 0.015


def test_vertex_mode_writes_vertex_colours_and_no_texture(tmp_path):
    asset = build_asset(_sphere_surface(3), "vertex", faces=0)
    written = {p.name for p in export_meshes(asset, tmp_path)}
    assert written == {"mesh.glb", "mesh.obj", "mesh.ply"}
    for name in written:
        mesh = trimesh.load(tmp_path / name, force="mesh")
        assert mesh.visual.kind == "vertex", name
        expected = _position_colour(torch.as_tensor(mesh.vertices, dtype=torch.float32)).numpy() * 255
        assert np.abs(mesh.visual.vertex_colors[:, :3] - expected).max() <= 1.0, name


def test_decimation_hits_the_face_budget_and_keeps_shape_and_orientation(tmp_path):
    surface = _sphere_surface(5)  # 20480 faces
    asset = build_asset(surface, "uv", texture_size=256, faces=2000)
    mesh = asset.mesh
    assert 1800 <= len(mesh.faces) <= 2000
    assert mesh.is_watertight and mesh.volume > 0  # closed, normals out
    radii = np.linalg.norm(mesh.vertices, axis=1)
    assert np.abs(radii - 0.5).max() < 0.01
    assert len(asset.textured.faces) == len(mesh.faces)
    # Normals in the GLB point out of the object.
    export_meshes(asset, tmp_path, ("glb",))
    glb = trimesh.load(tmp_path / "mesh.glb", force="mesh")
    assert (np.einsum("ij,ij->i", glb.vertex_normals, glb.vertices) > 0).all()


def test_decimation_keeps_a_closed_mesh_closed():
    """The library's quadric decimation alone pinches a few edges of these (the pyramid's apex, the
    mug's handle with fast-simplification 0.2.0: 1 and 3 edges on four faces); replayed without the collapses that break
    the link condition, the result stays a closed manifold at the budget and the shape."""
    from threedgen.asset_metrics import topology
    from threedgen.evaluate import chamfer
    from threedgen.export import decimate
    from threedgen.guidance.priors.shapes.prior import ShapeTruth

    for shape, faces in (("pyramid", 300), ("mug", 1000), ("torus", 500)):
        mesh = ShapeTruth(shape, "red", (1.0, 0.0, 0.0)).mesh()
        out = decimate(mesh, faces)
        assert topology(out) == {"watertight": True, "open_edges": 0, "pinched_edges": 0}, shape
        assert faces * 0.9 <= len(out.faces) <= faces, (shape, len(out.faces))
        # as close to the shape as the library's own result (measured: within 2 % of it)
        plain = mesh.simplify_quadric_decimation(face_count=faces)
        assert out.volume > 0 and chamfer(out, mesh) < 1.15 * chamfer(plain, mesh), shape


def test_a_vertex_the_replay_leaves_non_finite_goes_to_its_cluster_s_centroid(monkeypatch):
    """fast-simplification's replay now and then puts a vertex at NaN (a singular quadric; seen on
    a trained cylinder): such a vertex takes the centroid of the original vertices merged into it."""
    import fast_simplification

    from threedgen.export import decimate

    real = fast_simplification.replay_simplification

    def flaky(points, triangles, collapses):
        out, tri, mapping = real(points, triangles, collapses)
        out = np.array(out)
        out[0] = np.nan
        return out, tri, mapping

    monkeypatch.setattr(fast_simplification, "replay_simplification", flaky)
    sphere = trimesh.creation.icosphere(4, radius=0.5)
    out = decimate(sphere, 500)
    assert np.isfinite(out.vertices).all() and out.is_watertight
    assert np.abs(np.linalg.norm(out.vertices, axis=1) - 0.5).max() < 0.05


def test_marching_cubes_normals_point_out_without_decimation(tmp_path):
    """A mesh exported at full resolution (faces=0) carries outward normals in the GLB (the
    marching-cubes mesh's cached normals were inward once, while its winding was right)."""
    from threedgen.meshing import surface_from_grid

    lin = np.linspace(-0.75, 0.75, 48)
    x, y, z = np.meshgrid(lin, lin, lin, indexing="ij")
    values = np.where(np.sqrt(x * x + y * y + z * z) < 0.5, 10.0, 0.0).astype(np.float32)
    surface = surface_from_grid(values, _position_colour, 0.75, 5.0)
    asset = build_asset(surface, "uv", texture_size=128, faces=0)
    export_meshes(asset, tmp_path, ("glb",))
    glb = trimesh.load(tmp_path / "mesh.glb", force="mesh")
    assert (np.einsum("ij,ij->i", glb.vertex_normals, glb.vertices) > 0).all()
    assert (np.einsum("ij,ij->i", surface.mesh.face_normals, surface.mesh.triangles_center) > 0).all()


def test_colour_is_seen_through_the_shell_not_read_at_the_isosurface():
    """A red ball (radius 0.4, density 50) in a faint green halo out to 0.45 (density 2): the
    isosurface at level 1 lies in the halo, where the colour field is green. Seen along the inward
    normal through a 0.1 shell, as a camera would see it, the surface is red."""
    from threedgen.meshing import surface_from_field

    def density(p):
        r = p.norm(dim=-1)
        return torch.where(r < 0.4, 50.0, torch.where(r < 0.45, 2.0, 0.0))

    def colour(p):
        red = (p.norm(dim=-1, keepdim=True) < 0.4).float()
        return red * torch.tensor([0.9, 0.1, 0.1]) + (1 - red) * torch.tensor([0.1, 0.9, 0.1])

    at_surface = surface_from_field(density, colour, 0.75, 64, threshold=1.0)
    seen = surface_from_field(density, colour, 0.75, 64, threshold=1.0, shell=0.1)
    assert np.abs(np.linalg.norm(at_surface.mesh.vertices, axis=1) - 0.45).max() < 0.03  # in the halo
    plain = at_surface.colored_mesh().visual.vertex_colors[:, :3] / 255.0
    shelled = seen.colored_mesh().visual.vertex_colors[:, :3] / 255.0
    assert plain[:, 1].mean() > 0.8  # green: the halo's colour
    # red, but for the halo's own share: it gathers about 1 - exp(-2 x 0.05) = 10 % before the ball
    assert shelled[:, 0].mean() > 0.7 and shelled[:, 1].mean() < 0.3
    asset = build_asset(seen, "uv", texture_size=128, faces=2000)  # the texture is baked the same way
    assert asset.image.reshape(-1, 3)[:, 0].mean() > 170 and asset.image.reshape(-1, 3)[:, 1].mean() < 80


def test_scale_is_metres_per_world_unit(tmp_path):
    asset = build_asset(_sphere_surface(3), "uv", texture_size=128, faces=0, scale=2.0)
    export_meshes(asset, tmp_path, ("glb", "ply"))
    for name in ("mesh.glb", "mesh.ply"):
        mesh = trimesh.load(tmp_path / name, force="mesh")
        assert np.allclose(mesh.bounds, [[-1, -1, -1], [1, 1, 1]], atol=1e-3), name


@needs_validator
def test_validator_accepts_textured_and_vertex_coloured_glb(tmp_path):
    for mode in ("uv", "vertex"):
        (tmp_path / mode).mkdir()
        export_meshes(build_asset(_sphere_surface(3), mode, texture_size=128, faces=0), tmp_path / mode, ("glb",))
    reports = validate_gltf([tmp_path / "uv" / "mesh.glb", tmp_path / "vertex" / "mesh.glb"])
    assert [r["errors"] for r in reports] == [0, 0], reports
    assert [r["warnings"] for r in reports] == [0, 0], reports


def test_validator_reports_errors_in_a_broken_file(tmp_path):
    """The validator check can fail: a GLB with a corrupted JSON chunk is reported."""
    if not gltf_validator_available():
        pytest.skip("glTF validator not installed (npm ci --prefix tests/gltf)")
    export_meshes(build_asset(_sphere_surface(2), "uv", texture_size=64, faces=0), tmp_path, ("glb",))
    data = bytearray((tmp_path / "mesh.glb").read_bytes())
    i = data.index(b'"accessors"')
    data[i:i + 11] = b'"accessorz"'
    (tmp_path / "broken.glb").write_bytes(bytes(data))
    [report] = validate_gltf([tmp_path / "broken.glb"])
    assert report["errors"] > 0
    (tmp_path / "broken.glb").unlink()  # keep it away from the suite-wide check


# ---- trained assets: orientation, the CLI, Blender ---------------------------------------------

SMALL = ["prior.shapes=[cone,cube]", "export.resolution=64", "export.video_frames=2", "export.video_resolution=32",
         "export.texture_size=512", "checkpoint_every=1000", "preview_every=1000"]
CONE_TRUTH = np.array([[-0.42, -0.42, -0.42], [0.42, 0.42, 0.42]])  # glTF frame (sdf.cone's defaults)


@pytest.fixture(scope="module", params=["nerf", "gaussians"])
def red_cone(request, tmp_path_factory):
    """A red cone trained on the camera-conditioned shapes prior: its truth is lit from the front
    right and above (LIGHT_DIR), so the baked colours fix which way the asset faces."""
    from threedgen.config import build_config, parse_overrides
    from threedgen.runner import run

    out = tmp_path_factory.mktemp(f"cone-{request.param}")
    steps = 150 if request.param == "nerf" else 200
    # Full-resolution renders from the first step (no progressive phase), as these checks were set up.
    cfg = build_config(representation=request.param, overrides=parse_overrides([*SMALL, "render.coarse_resolution=0"]),
                       flags={"prompt": "a red cone", "steps": steps})
    return run(cfg, out=out, progress_bar=False)


# Heights below the apex at which the cone's shape is read: the flank every camera sees, above the
# base's rim (0.84 m below the apex). The underside is never seen (all elevations are above it): how
# far it sags is not trained, differs between CPUs in the last bits amplified by training, and
# nothing below depends on it (nor on vertex counts, which UV seams duplicate unevenly).
FLANK_DEPTHS = np.arange(1, 7) / 10  # 0.1 ... 0.6 m
LIGHT_AZIMUTH = np.degrees(np.arctan2(LIGHT_DIR[0], LIGHT_DIR[2]))  # from +Z (front) towards +X (right): 41 degrees


def _cross_sections(mesh, depths):
    """Centre and (x, z) extent of the mesh's horizontal cross-sections ``depths`` below its top:
    at each height, the middle and width of its silhouette seen from the front and from the side."""
    top = mesh.bounds[1, 1]
    centres, widths = [], []
    for depth in depths:
        section = mesh.section(plane_normal=[0, 1, 0], plane_origin=[0, top - depth, 0])
        assert section is not None, f"no surface {depth} m below the top"
        lo, hi = section.bounds
        centres.append((lo + hi)[[0, 2]] / 2)
        widths.append((hi - lo)[[0, 2]])
    return np.array(centres), np.array(widths)


def _flank_shading(mesh):
    """The baked red on the flank fitted to a + b cos(phi) + c sin(phi), phi the normal's azimuth
    (0 at +Z, 90 at +X), as the truth's diffuse shading is: returns the lit side's azimuth in
    degrees (the fit's phase), the shading's amplitude, and the flank's mean colour."""
    n = np.asarray(mesh.vertex_normals)
    rgb = _texel_colours(mesh)
    flank = np.abs(n[:, 1]) < 0.8  # not the (unseen) base
    phi = np.arctan2(n[flank, 0], n[flank, 2])
    basis = np.stack([np.ones_like(phi), np.cos(phi), np.sin(phi)], 1)
    _, b, c = np.linalg.lstsq(basis, rgb[flank, 0], rcond=None)[0]
    return float(np.degrees(np.arctan2(c, b))), float(np.hypot(b, c)), rgb[flank].mean(0)


def test_trained_asset_is_up_front_and_textured(red_cone):
    glb = trimesh.load(red_cone / "mesh.glb", force="mesh")
    assert glb.visual.kind == "texture"
    centres, widths = _cross_sections(glb, FLANK_DEPTHS)
    # +Y up at the truth's shape: the diameter grows by 1 m per metre below the apex (radius 0.42
    # over height 0.84). Measured within 0.06 (a slightly blunt apex); upside down the section
    # 0.1 m below the top is the base's (0.84 wide), lying on its side the profile is a triangle's.
    assert np.abs(widths - FLANK_DEPTHS[:, None]).max() < 0.1, widths
    # Centred on the orbit's centre at every height (measured within 0.007 m); the mesh is not
    # moved at export, so an offset world-to-grid mapping or a lopsided field shows here.
    assert np.abs(centres).max() < 0.03, centres
    # At the truth's size (metres, scale 1).
    assert np.abs(glb.bounds[:, [0, 2]] - CONE_TRUTH[:, [0, 2]]).max() < 0.08
    # Front (+Z, where azimuth-0 cameras stand) and right (+X) face the light, as in the truth's
    # renders (diffuse n.l about 0.74 in front, 0.02 behind): the baked shading peaks towards the
    # light's azimuth (measured within 6 degrees). Turned 90 or 180 degrees about +Y, or mirrored
    # in X or Z, the peak is 80 or more degrees off; a colour without shading has no peak.
    lit_azimuth, amplitude, rgb = _flank_shading(glb)
    off = (lit_azimuth - LIGHT_AZIMUTH + 180) % 360 - 180
    # Amplitude: truth ~0.29, measured 0.12-0.30, the untrained field 0.01-0.03.
    assert abs(off) < 30 and amplitude > 0.06, (lit_azimuth, amplitude)
    # Red: truth's flank ~(0.49, 0.06, 0.06), measured (0.51-0.55, <0.04, <0.04); untrained: grey.
    assert rgb[0] > 0.4 and rgb[1] < 0.15 and rgb[2] < 0.15, rgb
    metrics = json.loads((red_cone / "metrics.json").read_text())
    assert metrics["chamfer"] < 0.05
    # Decimated to export.faces and still closed: no edge on more than two faces.
    assert metrics["watertight"] and metrics["pinched_edges"] == 0 and metrics["open_edges"] == 0


def test_cli_export_options(red_cone, capsys):
    assert main(["export", str(red_cone), "--format", "glb", "--format", "ply", "--texture", "vertex",
                 "--faces", "3000"]) == 0
    out = capsys.readouterr().out
    assert "mesh.glb" in out and "mesh.ply" in out and "mesh_texture.png" not in out
    glb = trimesh.load(red_cone / "mesh.glb", force="mesh")
    assert glb.visual.kind == "vertex" and len(glb.faces) <= 3000
    assert main(["export", str(red_cone), "--faces", "50"]) == 2
    err = capsys.readouterr().err
    assert "--faces must be 0 (no decimation) or at least 100" in err and "Traceback" not in err
    assert main(["export", str(red_cone), "--texture", "pbr"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    # Nothing already produced was lost by the refused exports; the default export restores uv.
    assert (red_cone / "mesh.glb").is_file()
    assert main(["export", str(red_cone), "--format", "glb"]) == 0
    assert trimesh.load(red_cone / "mesh.glb", force="mesh").visual.kind == "texture"


def _blender_report(glb: Path, tmp_path: Path) -> dict:
    report = tmp_path / "blender.json"
    proc = subprocess.run(["blender", "-b", "--factory-startup", "--python", str(BLENDER_SCRIPT), "--",
                           str(glb), str(report)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and report.is_file(), proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(report.read_text())


@needs_blender
def test_blender_imports_one_textured_mesh_at_the_truth_s_size(red_cone, tmp_path):
    report = _blender_report(red_cone / "mesh.glb", tmp_path)
    [obj] = report["mesh_objects"]
    assert obj["name"] == "threedgen" and obj["faces"] > 1000
    [material] = obj["materials"]
    image = material["base_color_image"]
    assert image is not None and image["width"] == image["height"] == 512
    assert max(image["std"]) > 0.02 and image["mean"][0] > 2 * image["mean"][1]  # a red, non-constant image
    assert material["metallic"] == 0.0
    # Blender is +Z up; glTF's +Y becomes +Z and glTF's front (+Z) becomes -Y. Blender holds the
    # GLB's surface turned into its frame: the same box, the same top and bottom bands (computed
    # as tests/blender_import.py does). Training-independent, so compared to float precision.
    lo, hi = np.array(obj["bbox_min"]), np.array(obj["bbox_max"])
    v = np.asarray(trimesh.load(red_cone / "mesh.glb", force="mesh").vertices)
    v = np.stack([v[:, 0], -v[:, 2], v[:, 1]], 1)
    np.testing.assert_allclose(lo, v.min(0), atol=1e-4)
    np.testing.assert_allclose(hi, v.max(0), atol=1e-4)
    z_lo, z_hi = v[:, 2].min(), v[:, 2].max()
    top = v[v[:, 2] > z_hi - 0.1 * (z_hi - z_lo)]
    bottom = v[v[:, 2] < z_lo + 0.1 * (z_hi - z_lo)]
    assert obj["top_width"] == pytest.approx(np.ptp(top[:, :2], 0).max(), abs=1e-4)
    assert obj["bottom_width"] == pytest.approx(np.ptp(bottom[:, :2], 0).max(), abs=1e-4)
    # Where the truth is, on the parts the cameras see: the sides and the apex (measured within
    # 0.05), the apex up and narrow (measured 0.11-0.15 wide), the base below. How far the unseen
    # underside sags below the rim (z -0.42) is not trained and is not checked.
    truth_lo, truth_hi = CONE_TRUTH[0], CONE_TRUTH[1]
    assert np.abs(lo[:2] - truth_lo[:2]).max() < 0.08 and np.abs(hi - truth_hi).max() < 0.08, (lo, hi)
    assert lo[2] < -0.34 and obj["top_width"] < 0.25


@pytest.fixture(scope="module")
def red_cube_nerf(tmp_path_factory):
    """A red cube, NeRF, the shapes preset's steps and exports (the default run, smaller video)."""
    from threedgen.config import build_config, parse_overrides
    from threedgen.runner import run

    out = tmp_path_factory.mktemp("cube-nerf")
    cfg = build_config(representation="nerf", overrides=parse_overrides(
        ["prior.shapes=[cone,cube]", "export.video_frames=4", "export.video_resolution=32"]),
        flags={"prompt": "a red cube"})
    return run(cfg, out=out, progress_bar=False)


@needs_blender
def test_blender_sees_a_cube_with_flat_faces(red_cube_nerf, tmp_path):
    """The cube Blender imports has flat faces: the area-weighted angle between its faces' normals
    and the nearest axis (the camera-conditioned prior pins the cube's orientation) is small.
    Measured on the default red-cube run of benchmarks/asset_quality.py: 16.0 degrees (rounded
    edges and corners count too); 26.7 degrees before the density's total variation, the export
    blur and the level from renders, with pits a viewer could see (eval normal error 31.6)."""
    [obj] = _blender_report(red_cube_nerf / "mesh.glb", tmp_path)["mesh_objects"]
    assert obj["axis_normal_error_deg"] < 22.0, obj["axis_normal_error_deg"]
    metrics = json.loads((red_cube_nerf / "metrics.json").read_text())
    # the eval's normal error (against the truth's normals) sees the same faces
    assert metrics["normal_error_deg"] < 24.0 and metrics["watertight"], metrics

