"""Outputs of a run: meshes (GLB/OBJ/PLY with vertex colours), turntable video, preview images."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from threedgen.cameras import Cameras, orbit
from threedgen.rundir import atomic_path

MESH_FORMATS = ("glb", "obj", "ply")


def export_meshes(mesh, run_dir: Path, formats=MESH_FORMATS) -> list[Path]:
    written = []
    for fmt in formats:
        path = Path(run_dir) / f"mesh.{fmt}"
        with atomic_path(path) as tmp:
            if fmt == "obj":
                # Vertex colours as "v x y z r g b"; no material file is needed.
                tmp.write_text(mesh.export(file_type="obj", include_color=True, include_texture=False))
            else:
                mesh.export(tmp, file_type=fmt)
        written.append(path)
    return written


@torch.no_grad()
def render_views(representation, cameras: Cameras, size: int, chunk: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """``rgb [N,H,W,3]`` uint8 and ``alpha [N,H,W]`` float of the representation in eval mode."""
    was_training = representation.training
    representation.eval()
    rgbs, alphas = [], []
    try:
        for i in range(0, len(cameras), chunk):
            out = representation.render(cameras[i:i + chunk], size, size)
            rgbs.append(out.rgb.clamp(0, 1).cpu())
            alphas.append(out.alpha[..., 0].cpu())
    finally:
        representation.train(was_training)
    rgb = (torch.cat(rgbs).numpy() * 255).round().astype(np.uint8)
    return rgb, torch.cat(alphas).numpy()


def write_image(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")


def write_turntable(frames: np.ndarray, run_dir: Path, fps: int = 12) -> Path:
    """mp4 through imageio-ffmpeg; a GIF when no encoder is available."""
    import imageio.v2 as imageio

    path = Path(run_dir) / "turntable.mp4"
    try:
        with atomic_path(path) as tmp:
            with imageio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264", quality=7,
                                    macro_block_size=1, ffmpeg_log_level="error") as writer:
                for frame in frames:
                    writer.append_data(frame)
        return path
    except Exception as exc:  # no ffmpeg: fall back to GIF
        print(f"threedgen: mp4 encoder unavailable ({exc}); writing turntable.gif", file=sys.stderr)
        path = Path(run_dir) / "turntable.gif"
        with atomic_path(path) as tmp:
            imageio.mimsave(tmp, list(frames), format="GIF", duration=1000.0 / fps, loop=0)  # ms per frame
        return path


def export_run_outputs(representation, cfg, run_dir: Path, formats=None, resolution=None) -> dict:
    """Meshes, a turntable and a 4-view preview for a trained representation."""
    ec = cfg.export
    mesh = representation.extract_mesh(resolution or ec.resolution)
    files = export_meshes(mesh, run_dir, formats or ec.formats) + list(representation.export_files(run_dir))
    distance = float(np.mean(cfg.camera.distance_range))
    fovy = float(np.mean(cfg.camera.fovy_range))
    frames, _ = render_views(representation, orbit(ec.video_frames, ec.video_elevation, distance, fovy),
                             ec.video_resolution)
    files.append(write_turntable(frames, run_dir))
    views, _ = render_views(representation, orbit(4, ec.video_elevation, distance, fovy), ec.video_resolution)
    (Path(run_dir) / "previews").mkdir(exist_ok=True)
    preview = Path(run_dir) / "previews" / "final.png"
    write_image(preview, np.concatenate(list(views), axis=1))
    files.append(preview)
    return {"files": [str(f) for f in files], "faces": int(len(mesh.faces)), "vertices": int(len(mesh.vertices))}
