"""Outputs of a run: meshes (GLB/OBJ/PLY; a UV texture or vertex colours), turntable video, preview
images."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import fast_simplification
import imageio.v2 as imageio
import numpy as np
import trimesh
from PIL import Image
from trimesh.exchange.obj import export_obj

from threedgen.asset_metrics import sample_texture
from threedgen.cameras import orbit
from threedgen.errors import UserError
from threedgen.rundir import DISK_ERRORS, RunFolder, atomic_path, atomic_write_text
from threedgen.schema import MESH_FORMATS, TEXTURE_MODES
from threedgen.texture import bake_texture, unwrap
from threedgen.views import render_views, write_image

TEXTURE_NAME = RunFolder.TEXTURE  # the OBJ's base-colour image (the GLB embeds its own copy)
MTL_NAME = f"{RunFolder.MESH}.mtl"
OBJECT_NAME = "threedgen"
MATERIAL_NAME = "threedgen"  # the PBR material, and the OBJ's usemtl/newmtl


@dataclass
class Asset:
    """An exported object: ``mesh`` with vertex colours and, for ``--texture uv``, ``textured``
    (the same surface cut into xatlas charts, with UVs and a PBR material holding ``image``). Both
    are in the asset frame, ``asset = world * scale`` (see ``build_asset``)."""

    mesh: object
    textured: object | None
    image: np.ndarray | None
    scale: float


def manifold_collapses(faces: np.ndarray, collapses: np.ndarray, n_vertices: int) -> np.ndarray:
    """Which of a decimation's edge collapses keep a closed manifold one: replayed in order, a
    collapse of ``v`` into ``u`` is kept when ``u`` and ``v`` are neighbours, share exactly two
    neighbours (the two corners opposite their edge: the link condition of Dey et al., whose edge
    part fails on a closed manifold only for a lone tetrahedron, which is left alone). Skipping a collapse leaves ``v`` in place, so later collapses are
    checked against the mesh as it now is."""
    nbrs = [set() for _ in range(n_vertices)]
    for a, b in np.unique(np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), 1),
                          axis=0).tolist():
        nbrs[a].add(b)
        nbrs[b].add(a)
    keep = np.zeros(len(collapses), bool)
    for k, (u, v) in enumerate(np.asarray(collapses).tolist()):
        nu, nv = nbrs[u], nbrs[v]
        if v not in nu:
            continue
        common = nu & nv
        if len(common) != 2:
            continue
        if len(nu) == 3 and len(nv) == 3:  # a tetrahedron: the collapse would flatten it
            continue
        for w in nv:
            if w != u:
                nbrs[w].discard(v)
                nbrs[w].add(u)
        nu |= nv
        nu.discard(u)
        nu.discard(v)
        nbrs[v] = set()
        keep[k] = True
    return keep


def decimate(mesh, faces: int, rounds: int = 4):
    """Quadric decimation (fast-simplification) down to about ``faces`` faces, keeping a closed
    mesh closed: the library's collapses, in its order, are replayed without those that would pinch
    the surface (``manifold_collapses``), so no edge ends up on more than two faces; what the skipped
    collapses leave over the budget is decimated again, up to ``rounds`` passes in all. A mesh
    already that small is returned as is."""

    if not faces or len(mesh.faces) <= faces:
        return mesh
    points = np.asarray(mesh.vertices, np.float64)
    tri = np.asarray(mesh.faces, np.int64)
    for k in range(rounds):  # skipped collapses leave faces over: decimate what came out again
        if len(tri) <= faces:
            break
        target = max(4, int(faces) - 8 * k)  # a little under the budget once a pass fell short
        _, _, collapses = fast_simplification.simplify(points, tri, target_count=target, return_collapses=True)
        keep = manifold_collapses(tri, collapses, len(points))
        if not keep.any():
            break
        before = points
        points, tri, mapping = fast_simplification.replay_simplification(points, tri, collapses[keep])
        bad = ~np.isfinite(points).all(1)
        if bad.any():  # a singular quadric now and then: the centroid of the vertices merged there
            ok = mapping >= 0
            sums = np.zeros_like(points)
            np.add.at(sums, mapping[ok], before[ok])
            counts = np.bincount(mapping[ok], minlength=len(points))[:, None]
            points[bad] = sums[bad] / np.maximum(counts[bad], 1)
    # No merging by position and no removal of zero-area faces: either would reopen the surface.
    tri = tri[(tri[:, 0] != tri[:, 1]) & (tri[:, 1] != tri[:, 2]) & (tri[:, 2] != tri[:, 0])]
    out = trimesh.Trimesh(points, tri, process=False)
    out.remove_unreferenced_vertices()
    trimesh.repair.fix_normals(out)
    return out


def build_asset(surface, texture: str = "uv", texture_size: int = 1024, faces: int = 0,
                scale: float = 1.0) -> Asset:
    """The export pipeline after marching cubes (``surface``: ``threedgen.meshing.Surface``):
    decimate to ``faces`` (0: keep all), colour the vertices, and for ``texture="uv"`` unwrap with
    xatlas and bake the colour function into a ``texture_size`` image (``threedgen.texture``).

    Frame: glTF's: +Y up, the object's front (where azimuth-0 cameras look from) towards +Z, the
    origin at the point every training camera orbits (the object's centre by construction; the
    mesh is not moved, so a lopsided result stays as the renders show it), ``scale`` metres per
    world unit (1: the shapes prior's objects are 0.7-0.9 m across)."""

    if texture not in TEXTURE_MODES:
        raise UserError(f"texture mode must be uv or vertex; got {texture!r}")
    mesh = decimate(surface.mesh, faces)
    colored = dataclasses.replace(surface, mesh=mesh).colored_mesh()
    normals = np.asarray(mesh.vertex_normals)
    textured = image = None
    if texture == "uv":
        vmapping, tfaces, uv = unwrap(mesh.vertices, mesh.faces, texture_size)
        positions = np.asarray(mesh.vertices)[vmapping]
        image = bake_texture(positions, tfaces, uv, texture_size, surface.colors, normals[vmapping])
        textured = textured_mesh(positions, tfaces, uv, image, normals[vmapping], scale)
    colored.apply_scale(scale)
    colored.vertex_normals = normals
    return Asset(colored, textured, image, float(scale))


def textured_mesh(positions: np.ndarray, faces: np.ndarray, uv: np.ndarray, image: np.ndarray,
                  normals: np.ndarray, scale: float):
    """The chart mesh the GLB and OBJ hold: ``positions`` (world units) x ``scale``, glTF ``uv``,
    the PBR material with ``image`` as base colour, and the welded surface's vertex ``normals``
    (smooth across chart seams)."""
    material = trimesh.visual.material.PBRMaterial(
        name=MATERIAL_NAME, baseColorTexture=Image.fromarray(image), baseColorFactor=[255, 255, 255, 255],
        metallicFactor=0.0, roughnessFactor=0.8)
    textured = trimesh.Trimesh(np.asarray(positions) * scale, faces, process=False,
                               visual=trimesh.visual.TextureVisuals(uv=uv, material=material))
    textured.vertex_normals = normals
    return textured


def mesh_asset(start, scale: float = 1.0) -> Asset:
    """The asset of a mesh that is exported as it is (a refined mesh, ``MeshStart``-like: surface
    ``positions``/``faces``, charts ``uv``/``tex_faces``/``vmapping``, ``image``): the surface with
    vertex colours (the texture at each vertex's UV in one of its charts) and the textured charts."""
    surface = trimesh.Trimesh(np.asarray(start.positions, np.float64), start.faces, process=False)
    normals = np.asarray(surface.vertex_normals)
    vertex_uv = np.zeros((len(surface.vertices), 2), np.float64)
    vertex_uv[np.asarray(start.vmapping)] = start.uv
    rgb = (sample_texture(start.image, vertex_uv) * 255).round().astype(np.uint8)
    surface.visual = trimesh.visual.ColorVisuals(surface, vertex_colors=np.concatenate(
        [rgb, np.full((len(rgb), 1), 255, np.uint8)], 1))
    surface.apply_scale(scale)
    surface.vertex_normals = normals
    textured = textured_mesh(np.asarray(start.positions)[start.vmapping], start.tex_faces, start.uv, start.image,
                             normals[start.vmapping], scale)
    return Asset(surface, textured, start.image, float(scale))


def _write_obj(asset: Asset, path: Path) -> list[Path]:
    if asset.textured is None:
        # Vertex colours as "v x y z r g b"; no material file is needed.
        with atomic_path(path) as tmp:
            tmp.write_text(asset.mesh.export(file_type="obj", include_color=True, include_texture=False))
        return [path]
    text, _ = export_obj(asset.textured, include_normals=True, include_texture=True, return_texture=True,
                         mtl_name=MTL_NAME)
    # Our own MTL: white Kd (viewers multiply it with map_Kd), no specular, the image by name.
    mtl = (f"# threedgen: base colour texture, no specular\nnewmtl {MATERIAL_NAME}\nKa 1 1 1\nKd 1 1 1\n"
           f"Ks 0 0 0\nNs 0\nd 1\nillum 1\nmap_Kd {TEXTURE_NAME}\n")
    texture, mtl_path = path.with_name(TEXTURE_NAME), path.with_name(MTL_NAME)
    write_image(texture, asset.image)
    atomic_write_text(mtl_path, mtl)
    atomic_write_text(path, text)
    return [path, mtl_path, texture]


def export_meshes(asset: Asset, run_dir: Path, formats=MESH_FORMATS) -> list[Path]:
    """Write ``mesh.<fmt>``: GLB (embedded PNG and PBR material, or vertex colours), OBJ (+ MTL +
    PNG, or vertex colours) and PLY (always vertex colours: PLY has no texture reference)."""
    written = []
    for fmt in formats:
        path = RunFolder(run_dir).mesh(fmt)
        if fmt == "obj":
            written += _write_obj(asset, path)
            continue
        mesh = asset.textured if fmt == "glb" and asset.textured is not None else asset.mesh
        with atomic_path(path) as tmp:
            if fmt == "glb":  # one node, named, so Blender's object is "threedgen"
                scene = trimesh.Scene()
                scene.add_geometry(mesh, geom_name=OBJECT_NAME, node_name=OBJECT_NAME)
                scene.export(tmp, file_type="glb")
            else:
                mesh.export(tmp, file_type=fmt)
        written.append(path)
    return written


def write_turntable(frames: np.ndarray, run_dir: Path, fps: int = 12) -> Path:
    """mp4 through imageio-ffmpeg; a GIF when no encoder is available."""

    path = RunFolder(run_dir).video
    try:
        with atomic_path(path) as tmp:
            with imageio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264", quality=7,
                                    macro_block_size=1, ffmpeg_log_level="error") as writer:
                for frame in frames:
                    writer.append_data(frame)
        return path
    except Exception as exc:  # no ffmpeg: fall back to GIF
        if isinstance(exc, OSError) and exc.errno in DISK_ERRORS:
            raise  # the disk, not the encoder: a GIF would fail the same way
        print(f"threedgen: mp4 encoder unavailable ({exc}); writing {RunFolder.GIF}", file=sys.stderr)
    path = RunFolder(run_dir).gif
    with atomic_path(path) as tmp:
        imageio.mimsave(tmp, list(frames), format="GIF", duration=1000.0 / fps, loop=0)  # ms per frame
    return path


def export_run_outputs(representation, cfg, run_dir: Path, formats=None, resolution=None, texture=None,
                       faces=None) -> dict:
    """Meshes, a turntable and a 4-view preview (2 x 2) for a trained representation (arguments left None
    come from ``cfg.export``)."""
    ec = cfg.export
    current = getattr(representation, "current", None)
    if current is not None:  # a mesh (the refinement's): exported as it is, with its own texture
        if resolution is not None or faces is not None or texture not in (None, "uv"):
            raise UserError("this run's mesh was refined and is exported as it is, with its UV texture: "
                            "--resolution, --faces and --texture vertex apply to a field's export")
        asset = mesh_asset(current(), ec.scale)
    else:
        surface = representation.extract_surface(resolution or ec.resolution)
        asset = build_asset(surface, texture or ec.texture, ec.texture_size, ec.faces if faces is None else faces,
                            ec.scale)
    mesh = asset.mesh
    files = export_meshes(asset, run_dir, formats or ec.formats) + list(representation.export_files(run_dir))
    distance = float(np.mean(cfg.camera.distance_range))
    fovy = float(np.mean(cfg.camera.fovy_range))
    frames, _ = render_views(representation, orbit(ec.video_frames, ec.video_elevation, distance, fovy),
                             ec.video_resolution)
    files.append(write_turntable(frames, run_dir))
    if len(frames) % 4 == 0:  # the preview's four views are turntable frames
        views = frames[::len(frames) // 4]
    else:
        views, _ = render_views(representation, orbit(4, ec.video_elevation, distance, fovy), ec.video_resolution)
    preview = RunFolder(run_dir).final_preview
    preview.parent.mkdir(exist_ok=True)
    # a 2 x 2 grid (front, right / back, left), square, so a viewer shows it large
    write_image(preview, np.concatenate([np.concatenate(list(views[:2]), axis=1),
                                         np.concatenate(list(views[2:]), axis=1)], axis=0))
    files.append(preview)
    return {"files": [str(f) for f in files], "faces": int(len(mesh.faces)), "vertices": int(len(mesh.vertices))}
