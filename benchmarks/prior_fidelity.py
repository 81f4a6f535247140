"""Fidelity of the learned shapes teacher: its DDIM samples against the truth renders.

    python benchmarks/prior_fidelity.py [--model FOLDER] [--shapes cube house ...] [--steps 50]
                                        [--scale 3] [--grid docs/shapes-unet-samples.png]
                                        [--json out.json] [--write BENCHMARKS.md]

For every prompt of the world ("a <colour> <shape>", 10 shapes x 12 colours) and 8 cameras that
are not training cameras (azimuths 22.5 + 45k degrees, elevations 0-40), one DDIM-50 sample per
mode of the model:

- ``camera`` (``--prior shapes-unet-camera``): the camera is the UNet's input; scored against the
  truth render from that camera: mask IoU (the sample's mask: pixels farther than 0.12 from its
  background colour, the median of its border) and colour error (mean RGB distance over the pixels
  both masks cover).
- ``tags`` (``--prior shapes-unet``): the prompt carries the camera's view tag ("..., side view");
  the sample is matched against the truth at 24 azimuths (every 15 degrees) at the camera's
  elevation, composited over the sample's background: the best match's mask IoU and colour error,
  and **sector accuracy**, the share of samples whose best-matching azimuth lies in the tagged
  sector (front |az| < 45, back |az| > 135, side otherwise). Only the objects with a front (house,
  mug, head) have a sector to find: the other shapes look alike from several sectors (a cube from
  the front and the side), so their sector accuracy is not counted. The camera mode's samples of
  the objects with a front are matched the same way, for the same accuracy against the camera's
  own sector. A sample matched to a uniformly random azimuth would land in the right sector 40 %
  of the time over these 8 cameras (the side sector is twice as wide as the front and the back).

It also measures how smooth each teacher is off the image manifold, what DDIM inversion relies
on: the RMS of the predicted eps for "a red cube" on the renders of a freshly initialised NeRF
(4 views, 64x64, noised at t), for the exact prior and both modes of the learned one. Unit noise
has RMS 1.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from threedgen.cameras import Cameras
from threedgen.guidance.priors import PRIORS, build_prior
from threedgen.guidance.priors.shapes.prior import ShapeTruth
from threedgen.guidance.priors.shapes.vocab import COLOURS, FRONT_SHAPES, SHAPES

AZIMUTHS = [22.5 + 45.0 * k for k in range(8)]
ELEVATIONS = [0.0, 30.0, 15.0, 40.0, 5.0, 25.0, 10.0, 35.0]
MATCH_AZIMUTHS = [15.0 * k for k in range(24)]
MASK_THRESHOLD = 0.12
GRID_PROMPTS = ["a red cube", "a blue torus", "a green cone", "an orange house", "a cyan mug", "a yellow head"]


def sector(azimuth: float) -> str:
    az = (azimuth + 180.0) % 360.0 - 180.0
    return "front" if abs(az) < 45 else "back" if abs(az) > 135 else "side"


def sample_mask(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [H,W], background colour [3]) of a sample ``[3,H,W]``."""
    border = torch.cat([img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]], 1)
    bg = border.median(dim=1).values
    return (img - bg[:, None, None]).abs().amax(0) > MASK_THRESHOLD, bg


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum().item()
    return (a & b).sum().item() / union if union else 1.0


def colour_error(img: torch.Tensor, truth_rgb: torch.Tensor, mask: torch.Tensor) -> float:
    if not mask.any():
        return float("nan")
    return (img - truth_rgb).norm(dim=0)[mask].mean().item()


def truth_views(prompt: str, cams: Cameras, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truth ``rgb [B,3,H,W]`` over white and ``alpha [B,H,W]``."""
    rgb, alpha = ShapeTruth(*_split(prompt)).render(cams.with_background(torch.ones(3)), size, size, 2)
    return rgb.permute(0, 3, 1, 2), alpha


def _split(prompt: str):
    from threedgen.guidance.priors.shapes.vocab import parse_prompt

    colour, shape = parse_prompt(prompt)
    return shape, colour, COLOURS[colour]


def evaluate(mode: str, model: str | None, prompts: list[str], steps: int, scale: float, seed: int) -> dict:
    name = "shapes-unet-camera" if mode == "camera" else "shapes-unet"
    cfg = PRIORS[name].config(**({"model": model} if model else {}))
    prior = build_prior(cfg, torch.device("cpu"))
    cams = Cameras.from_angles(ELEVATIONS, AZIMUTHS, 2.5, 40.0)
    views = Cameras.from_angles([e for _ in prompts for e in ELEVATIONS], [a for _ in prompts for a in AZIMUTHS],
                                2.5, 40.0)
    items = [p for p in prompts for _ in AZIMUTHS]
    t0 = time.perf_counter()
    samples = prior.sample(items, views, guidance_scale=scale, steps=steps, seed=seed)
    seconds = time.perf_counter() - t0
    size = prior.resolution
    rows = []
    for pi, prompt in enumerate(prompts):
        shape = _split(prompt)[0]
        if mode == "camera":
            truth_rgb, truth_alpha = truth_views(prompt, cams, size)
        for ci in range(len(AZIMUTHS)):
            img = samples[pi * len(AZIMUTHS) + ci]
            mask, bg = sample_mask(img)
            best = None
            if mode == "tags" or shape in FRONT_SHAPES:  # the best-matching azimuth (only told apart with a front)
                match = Cameras.from_angles([ELEVATIONS[ci]] * len(MATCH_AZIMUTHS), MATCH_AZIMUTHS, 2.5, 40.0)
                m_rgb, m_alpha = truth_views(prompt, match, size)
                over_bg = m_rgb + (bg[None, :, None, None] - 1.0) * (1 - m_alpha[:, None])  # the truth over its bg
                best = int(((over_bg - img[None]) ** 2).mean((1, 2, 3)).argmin())
            if mode == "camera":
                t_mask = truth_alpha[ci] > 0.5
                rgb = truth_rgb[ci]
                rows.append({"prompt": prompt, "shape": shape, "azimuth": AZIMUTHS[ci], "iou": iou(mask, t_mask),
                             "colour_error": colour_error(img, rgb, mask & t_mask)})
                if best is not None:
                    rows[-1].update(best_azimuth=MATCH_AZIMUTHS[best],
                                    sector_ok=sector(MATCH_AZIMUTHS[best]) == sector(AZIMUTHS[ci]))
                continue
            t_mask = m_alpha[best] > 0.5
            rows.append({"prompt": prompt, "shape": shape, "azimuth": AZIMUTHS[ci], "iou": iou(mask, t_mask),
                         "colour_error": colour_error(img, m_rgb[best], mask & t_mask),
                         "best_azimuth": MATCH_AZIMUTHS[best],
                         "sector_ok": sector(MATCH_AZIMUTHS[best]) == sector(AZIMUTHS[ci])})
    return {"mode": mode, "prior": name, "rows": rows, "sample_seconds": seconds, "samples": samples,
            "prompts": prompts}


SMOOTHNESS_T = (0, 20, 100, 200, 500)


@torch.no_grad()
def eps_rms(model: str | None) -> dict:
    """RMS of the predicted eps on noised initial NeRF renders, per prior and t."""
    from threedgen.cameras import CameraSampler
    from threedgen.config import build_config
    from threedgen.runner import build_components

    out = {}
    for name in ("shapes", "shapes-unet-camera", "shapes-unet"):
        overrides = {"prior": {"model": model}} if model and name != "shapes" else {}
        cfg = build_config("sds", "nerf", name, overrides=overrides, flags={"prompt": "a red cube", "seed": 0})
        torch.manual_seed(0)
        system = build_components(cfg, torch.device("cpu"))
        sampler = CameraSampler(cfg.camera, 0)
        cams = sampler.sample(0)
        for step in (1, 2, 3):
            cams = cams.cat(sampler.sample(step))
        rgb = system.representation.render(cams, 64, 64).rgb
        x = system.prior.encode_images(rgb.permute(0, 3, 1, 2))
        g = torch.Generator().manual_seed(0)
        row = {}
        for t in SMOOTHNESS_T:
            tt = torch.full((x.shape[0],), t)
            x_t = system.prior.noise.add_noise(x, tt, torch.randn(x.shape, generator=g))
            eps = system.prior.predict_noise(x_t, tt, system.embeds.cond_for(cams), cams)
            row[t] = float(eps.pow(2).mean().sqrt())
        out[name] = row
    return out


def summary(result: dict) -> dict:
    rows = result["rows"]
    ious = [r["iou"] for r in rows]
    errs = [r["colour_error"] for r in rows if r["colour_error"] == r["colour_error"]]
    out = {"mode": result["mode"], "prior": result["prior"], "n": len(rows), "mean_iou": statistics.mean(ious),
           "sd_iou": statistics.pstdev(ious), "min_iou": min(ious), "colour_error": statistics.mean(errs),
           "sample_seconds": result["sample_seconds"],
           "per_shape": {s: statistics.mean(r["iou"] for r in rows if r["shape"] == s)
                         for s in dict.fromkeys(r["shape"] for r in rows)}}
    front = [r for r in rows if r.get("sector_ok") is not None and r["shape"] in FRONT_SHAPES]
    if front:
        out["sector_accuracy"] = sum(r["sector_ok"] for r in front) / len(front)
        out["sector_n"] = len(front)
    return out


def grid_png(results: list[dict], path: Path, scale: int = 2) -> None:
    """Rows: for each grid prompt, each mode's samples then the truth; columns: the 8 cameras."""
    from PIL import Image

    cams = Cameras.from_angles(ELEVATIONS, AZIMUTHS, 2.5, 40.0)
    tiles = []
    for prompt in GRID_PROMPTS:
        for res in results:
            if prompt in res["prompts"]:
                i = res["prompts"].index(prompt) * len(AZIMUTHS)
                tiles.append(res["samples"][i:i + len(AZIMUTHS)])
        size = results[0]["samples"].shape[-1]
        tiles.append(truth_views(prompt, cams, size)[0])
    rows = [torch.cat(list(t), dim=2) for t in tiles]  # each [3,H,8W]
    img = torch.cat(rows, dim=1)
    arr = (img.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype("uint8")
    pil = Image.fromarray(arr)
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil.save(path)


def markdown(summaries: list[dict], args) -> str:
    opts = "".join(f" --{k} {' '.join(v)}" for k, v in (("shapes", args.shapes), ("colours", args.colours)) if v)
    lines = [f"\n### Learned teacher fidelity ({time.strftime('%Y-%m-%d')})\n",
             f"Command: `python benchmarks/prior_fidelity.py{opts} --steps {args.steps} --scale {args.scale}`; machine: "
             f"{platform.machine()}, {torch.get_num_threads()} threads; DDIM {args.steps} steps, CFG {args.scale}, "
             f"8 cameras x {summaries[0]['n'] // 8} prompts.\n",
             "| prior | samples | mean mask IoU (sd) | min IoU | colour error | sector accuracy (front objects; chance 0.40) | sampling s |",
             "|---|---|---|---|---|---|---|"]
    for s in summaries:
        sec = f"{s['sector_accuracy']:.2f} (n={s['sector_n']})" if "sector_accuracy" in s else "-"
        lines.append(f"| {s['prior']} | {s['n']} | {s['mean_iou']:.3f} ({s['sd_iou']:.3f}) | {s['min_iou']:.3f} | "
                     f"{s['colour_error']:.3f} | {sec} | {s['sample_seconds']:.0f} |")
    if getattr(args, "rms", None):
        lines += ["", "RMS of the predicted eps on noised initial NeRF renders of \"a red cube\" (unit noise: 1.00):", "",
                  "| prior | " + " | ".join(f"t = {t}" for t in SMOOTHNESS_T) + " |", "|---" * (len(SMOOTHNESS_T) + 1) + "|"]
        for name, row in args.rms.items():
            lines.append(f"| {name} | " + " | ".join(f"{row[t]:.2f}" for t in SMOOTHNESS_T) + " |")
    shapes = list(summaries[0]["per_shape"])
    lines += ["", "| mean mask IoU by shape | " + " | ".join(shapes) + " |", "|---" * (len(shapes) + 1) + "|"]
    for s in summaries:
        lines.append(f"| {s['prior']} | " + " | ".join(f"{s['per_shape'][k]:.2f}" for k in shapes) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a learned-teacher folder (default: the shipped weights)")
    ap.add_argument("--shapes", nargs="+", default=None, help="only these shapes (default: all)")
    ap.add_argument("--colours", nargs="+", default=None, help="only these colours (default: all)")
    ap.add_argument("--modes", nargs="+", default=["camera", "tags"], choices=["camera", "tags"])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--scale", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid", default=None, help="write a sample grid PNG here")
    ap.add_argument("--no-rms", action="store_true", help="skip the eps-smoothness measurement")
    ap.add_argument("--json", default=None, help="write the per-sample rows and summaries here")
    ap.add_argument("--write", default=None, help="append the tables to this markdown file")
    args = ap.parse_args()
    shapes = args.shapes or list(SHAPES)
    colours = args.colours or list(COLOURS)
    prompts = [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s}" for s in shapes for c in colours]
    if args.grid:
        prompts += [p for p in GRID_PROMPTS if p not in prompts]
    results = [evaluate(m, args.model, prompts, args.steps, args.scale, args.seed) for m in args.modes]
    scored = [dict(r, rows=[row for row in r["rows"] if row["shape"] in shapes
                            and row["prompt"].split()[-2] in colours]) for r in results]
    summaries = [summary(r) for r in scored]
    args.rms = None if args.no_rms else eps_rms(args.model)
    for s in summaries:
        print(json.dumps({k: v for k, v in s.items() if k != "per_shape"}), file=sys.stderr)
    text = markdown(summaries, args)
    print(text)
    if args.grid:
        grid_png(results, Path(args.grid))
    if args.json:
        Path(args.json).write_text(json.dumps({"summaries": summaries, "rows": {r["mode"]: r["rows"] for r in scored}},
                                              indent=1))
    if args.write:
        with open(args.write, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
