"""Mesh export before and after issue 7, and what Blender makes of it.

For each prompt x representation: one `threedgen run` (defaults, shapes prior), then in this process
- **before**: the issue-6 export, marching cubes at 128^3 with vertex colours and no decimation,
  scored by the same Chamfer distance (at the run's best yaw);
- **after**: the files the run exported (decimated, UV-textured GLB), scored by `threedgen eval`;
- export seconds (median of ``--repeats`` re-exports), faces, watertightness, validator errors;
- Blender (headless) imports the GLB: mesh objects, image texture, bounding box; and renders it
  (Cycles, CPU). The renders are put side by side in ``--montage`` (docs/blender-import.png).

    python benchmarks/mesh_export.py [--prompts "a red cube" "a blue torus"] [--write BENCHMARKS.md]
        [--montage docs/blender-import.png]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import trimesh

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from quality import report, run_once  # noqa: E402


def blender(glb: Path, out: Path, size: int) -> dict | None:
    if shutil.which("blender") is None:
        return None
    report_path, image = out / "blender.json", out / "blender.png"
    subprocess.run(["blender", "-b", "--factory-startup", "--python", str(ROOT / "tests" / "blender_import.py"), "--",
                    str(glb), str(report_path), str(image), str(size)], capture_output=True, check=True, timeout=600)
    data = json.loads(report_path.read_text())
    data["image"] = str(image)
    return data


def validator_errors(glb: Path):
    from conftest import gltf_validator_available, validate_gltf

    return validate_gltf([glb])[0]["errors"] if gltf_validator_available() else None


def measure(prompt: str, representation: str, out: Path, repeats: int, size: int) -> dict:
    from threedgen.evaluate import chamfer
    from threedgen.export import export_run_outputs
    from threedgen.runner import load_trained

    row = run_once(prompt, out, ["--representation", representation])
    run_dir = Path(row.pop("run_dir"))
    cfg, system, _ = load_trained(run_dir)
    rep = system.representation
    metrics = json.loads((run_dir / "metrics.json").read_text())
    truth = system.prior.truth(prompt).mesh()
    before = rep.extract_surface(128).colored_mesh()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        export_run_outputs(rep, cfg, run_dir)
        seconds.append(time.perf_counter() - start)
    glb = trimesh.load(run_dir / "mesh.glb", force="mesh")
    ply = trimesh.load(run_dir / "mesh.ply", force="mesh")
    yaw = metrics["best_yaw_degrees"]
    row.update(representation=representation, chamfer_before=chamfer(before, truth, yaw),
               chamfer_after=chamfer(ply, truth, yaw), faces_before=len(before.faces), faces_after=len(ply.faces),
               watertight_after=bool(ply.is_watertight), export_seconds=statistics.median(seconds),
               textured=glb.visual.kind == "texture", validator_errors=validator_errors(run_dir / "mesh.glb"),
               blender=blender(run_dir / "mesh.glb", run_dir, size))
    return row


def montage(images: list[str], labels: list[str], path: Path, columns: int | None = None) -> None:
    """The images as a grid of ``columns`` (all in one row by default), each labelled above."""
    from PIL import Image, ImageDraw

    tiles = [Image.open(p).convert("RGB") for p in images]
    w, h = tiles[0].size
    columns = columns or len(tiles)
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (w * columns, (h + 22) * rows), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        x, y = (i % columns) * w, (i // columns) * (h + 22)
        sheet.paste(tile, (x, y + 22))
        draw.text((x + 6, y + 5), label, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", nargs="+", default=["a red cube", "a blue torus"])
    ap.add_argument("--representations", nargs="+", default=["nerf", "gaussians"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=320, help="Blender render size in pixels")
    ap.add_argument("--montage", default=None, help="write the Blender renders side by side to this PNG")
    ap.add_argument("--write", default=None, help="append the table to this markdown file")
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="threedgen-mesh-") as tmp:
        for rep in args.representations:
            for prompt in args.prompts:
                rows.append(measure(prompt, rep, Path(tmp), args.repeats, args.size))
                r = rows[-1]
                print(f"{rep} {prompt}: chamfer {r['chamfer_before']:.4f} -> {r['chamfer_after']:.4f}", file=sys.stderr)
        if args.montage and all(r["blender"] for r in rows):
            montage([r["blender"]["image"] for r in rows], [f"{r['prompt']} ({r['representation']})" for r in rows],
                    Path(args.montage))

    lines = [f"\n## Mesh export (issue 7), {datetime.date.today()}\n",
             f"`python benchmarks/mesh_export.py{' --montage ' + args.montage if args.montage else ''}` on "
             f"{platform.machine()} ({platform.processor() or 'cpu'}), 2 CPU cores, torch CPU; one default `threedgen "
             "run` per row (shapes prior, 600 steps). *Before*: marching cubes at 128^3 with vertex colours (the "
             "previous export). *After*: the run's own export (decimated to `export.faces`, xatlas UVs, "
             f"baked texture). Export seconds: median of {args.repeats} re-exports (meshes, texture, video, "
             "preview). Blender 3.4 (headless) imported every GLB.\n",
             "| representation | prompt | Chamfer before | Chamfer after | faces before | faces after | watertight "
             "| export s | validator errors | Blender: meshes, image texture, bbox (m) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["blender"]
        if b:
            [o] = b["mesh_objects"] if len(b["mesh_objects"]) == 1 else [b["mesh_objects"][0]]
            size = np.array(o["bbox_max"]) - np.array(o["bbox_min"])
            img = o["materials"][0]["base_color_image"] if o["materials"] else None
            blend = (f"{len(b['mesh_objects'])}, {'%dx%d' % (img['width'], img['height']) if img else 'none'}, "
                     f"{size[0]:.2f} x {size[1]:.2f} x {size[2]:.2f}")
        else:
            blend = "not installed"
        lines.append(f"| {r['representation']} | {r['prompt']} | {r['chamfer_before']:.4f} | {r['chamfer_after']:.4f} "
                     f"| {r['faces_before']} | {r['faces_after']} | {'yes' if r['watertight_after'] else 'no'} "
                     f"| {r['export_seconds']:.1f} | {r['validator_errors']} | {blend} |")
    before = np.mean([r["chamfer_before"] for r in rows])
    after = np.mean([r["chamfer_after"] for r in rows])
    lines.append(f"\nMean Chamfer: before {before:.4f}, after {after:.4f} (ratio {after / before:.3f}).\n")
    report("\n".join(lines), args.write)


if __name__ == "__main__":
    main()
