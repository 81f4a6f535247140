"""Outputs of a run: meshes (GLB/OBJ/PLY; a UV texture or vertex colours), turntable video, preview
images."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import trimesh
from PIL import Image
from trimesh.exchange.obj import export_obj

from threedgen.cameras import orbit
from threedgen.errors import UserError
from threedgen.rundir import DISK_ERRORS, atomic_path, atomic_write_text
from threedgen.schema import MESH_FORMATS, TEXTURE_MODES
from threedgen.texture import bake_texture, unwrap
from threedgen.views import render_views, write_image

TEXTURE_NAME = "mesh_texture.png"  # the OBJ's base-colour image (the GLB embeds its own copy)
MTL_NAME = "mesh.mtl"
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


def decimate(mesh, faces: int):
    """Quadric decimation (fast-simplification through trimesh) down to about ``faces`` faces;
    a mesh already that small is returned as is. Pairs of faces on the same three vertices (a
    zero-volume fold that the decimation leaves behind now and then) are removed."""

    if not faces or len(mesh.faces) <= faces:
        return mesh
    out = mesh.simplify_quadric_decimation(face_count=int(faces))
    out = trimesh.Trimesh(out.vertices, out.faces, process=True)
    tri = np.asarray(out.faces)
    _, inverse, counts = np.unique(np.sort(tri, 1), axis=0, return_inverse=True, return_counts=True)
    out.update_faces(counts[inverse.reshape(-1)] == 1)
    out.update_faces(out.nondegenerate_faces())
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
        image = bake_texture(positions, tfaces, uv, texture_size, surface.colors)
        material = trimesh.visual.material.PBRMaterial(
            name=MATERIAL_NAME, baseColorTexture=Image.fromarray(image), baseColorFactor=[255, 255, 255, 255],
            metallicFactor=0.0, roughnessFactor=0.8)
        textured = trimesh.Trimesh(positions * scale, tfaces, process=False,
                                   visual=trimesh.visual.TextureVisuals(uv=uv, material=material))
        textured.vertex_normals = normals[vmapping]  # the welded mesh's: smooth across chart seams
    colored.apply_scale(scale)
    colored.vertex_normals = normals
    return Asset(colored, textured, image, float(scale))


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
        path = Path(run_dir) / f"mesh.{fmt}"
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

    path = Path(run_dir) / "turntable.mp4"
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
        print(f"threedgen: mp4 encoder unavailable ({exc}); writing turntable.gif", file=sys.stderr)
    path = Path(run_dir) / "turntable.gif"
    with atomic_path(path) as tmp:
        imageio.mimsave(tmp, list(frames), format="GIF", duration=1000.0 / fps, loop=0)  # ms per frame
    return path


def export_run_outputs(representation, cfg, run_dir: Path, formats=None, resolution=None, texture=None,
                       faces=None) -> dict:
    """Meshes, a turntable and a 4-view preview for a trained representation (arguments left None
    come from ``cfg.export``)."""
    ec = cfg.export
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
    (Path(run_dir) / "previews").mkdir(exist_ok=True)
    preview = Path(run_dir) / "previews" / "final.png"
    write_image(preview, np.concatenate(list(views), axis=1))
    files.append(preview)
    return {"files": [str(f) for f in files], "faces": int(len(mesh.faces)), "vertices": int(len(mesh.vertices))}
