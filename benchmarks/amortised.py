"""Amortised text-to-3D over the shapes world: trained vs held-out prompts, against per-prompt runs.

The grid is every shape x every colour (10 x 12 = 120 prompts). Its diagonal (shape i with colour
i: a red cube, an orange sphere, ..., a pink head) is held out: every shape and every colour is
trained, but never those ten pairs. One model is trained on the other 110 prompts with
``threedgen train-amortised``; then ``threedgen generate``'s code scores

- the ten held-out prompts, and
- ten trained prompts (shape i with colour i + 1: every shape once),

and per-prompt ``threedgen run`` (SDS, the default settings) scores the same twenty prompts. Cost:
the amortised training's seconds against the per-prompt runs' mean training seconds times the 120
prompts of the grid. ``--ddp`` also trains the model on two gloo processes with half the prompts per
step each (the same total batch) via torchrun and scores it on the same prompts.

    python benchmarks/amortised.py --out /tmp/amortised [--steps 2000] [--seeds 0] [--ddp]

Run it on an idle machine (it times training). Prints a Markdown table; writes results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from threedgen.guidance.priors.shapes.vocab import COLOUR_NAMES, SHAPES  # noqa: E402

THREEDGEN = [sys.executable, "-m", "threedgen"]


def prompt(colour: str, shape: str) -> str:
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"


def grid() -> tuple[list[str], list[str], list[str]]:
    """(training prompts, held-out prompts, trained prompts scored)."""
    held = [(c, s) for s, c in zip(SHAPES, COLOUR_NAMES)]
    train = [(c, s) for s in SHAPES for c in COLOUR_NAMES if (c, s) not in held]
    scored = [(COLOUR_NAMES[(i + 1) % len(COLOUR_NAMES)], s) for i, s in enumerate(SHAPES)]
    assert all(p in train for p in scored)
    return [prompt(*p) for p in train], [prompt(*p) for p in held], [prompt(*p) for p in scored]


def train(out: Path, steps: int, seed: int, extra: list[str], processes: int = 1) -> dict:
    prompts = out.parent / "train.txt"
    started = time.time()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if processes > 1:
        per = [e for e in extra if e.startswith("amortised.prompts_per_step=")]
        total = int(per[0].split("=")[1]) if per else 4
        extra = [e for e in extra if not e.startswith("amortised.prompts_per_step=")]
        extra.append(f"amortised.prompts_per_step={total // processes}")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "threedgen", "train-amortised", str(prompts), "--devices", str(processes)]
        env["OMP_NUM_THREADS"] = "1"
    else:
        cmd = [*THREEDGEN, "train-amortised", str(prompts)]
    cmd += ["--out", str(out), "--steps", str(steps), "--seed", str(seed), "--no-progress", *extra]
    subprocess.run(cmd, check=True, env=env)
    status = json.loads((out / "status.json").read_text())
    return {"train_seconds": status["train_seconds"], "wall_seconds": round(time.time() - started, 1)}


def score_amortised(model_dir: Path, prompts: list[str], out: Path) -> list[dict]:
    from threedgen.amortised import AmortisedModel

    model = AmortisedModel(model_dir)
    rows = []
    for p in prompts:
        run_dir = model.generate(p, out=out)
        m = json.loads((run_dir / "metrics.json").read_text())
        s = json.loads((run_dir / "status.json").read_text())
        rows.append({"prompt": p, "mask_iou": m["mask_iou"], "psnr": m["psnr"], "chamfer": m["chamfer"],
                     "generate_seconds": s["generate_seconds"]})
    return rows


def score_per_prompt(prompts: list[str], out: Path, seed: int) -> list[dict]:
    rows = []
    for p in prompts:
        result = subprocess.run([*THREEDGEN, "run", "--prompt", p, "--out", str(out), "--seed", str(seed),
                                 "--no-progress"], check=True, capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        run_dir = Path(result.stdout.strip().splitlines()[-1])
        m = json.loads((run_dir / "metrics.json").read_text())
        s = json.loads((run_dir / "status.json").read_text())
        rows.append({"prompt": p, "mask_iou": m["mask_iou"], "psnr": m["psnr"], "chamfer": m["chamfer"],
                     "train_seconds": s["train_seconds"]})
    return rows


def summary(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows]
    fmt = "{:.4f}" if key == "chamfer" else ("{:.2f}" if key == "psnr" else "{:.3f}")
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(spread)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds")
    ap.add_argument("--ddp", action="store_true", help="also train on two gloo processes (same total batch)")
    ap.add_argument("--no-per-prompt", action="store_true", help="skip the per-prompt runs")
    ap.add_argument("extra", nargs="*", help="key=value settings for train-amortised")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    train_prompts, held, scored = grid()
    (out / "train.txt").write_text("".join(p + "\n" for p in train_prompts))
    results = {"steps": args.steps, "extra": args.extra, "models": {}, "per_prompt": {}}
    for seed in [int(s) for s in args.seeds.split(",")]:
        runs = [("1 process", 1)] + ([("2 processes", 2)] if args.ddp else [])
        for name, processes in runs:
            model_dir = out / f"model-seed{seed}-{processes}p"
            cost = train(model_dir, args.steps, seed, list(args.extra), processes)
            results["models"][f"{name}, seed {seed}"] = {
                **cost, "held_out": score_amortised(model_dir, held, out / "generated"),
                "trained": score_amortised(model_dir, scored, out / "generated")}
        if not args.no_per_prompt:
            results["per_prompt"][f"seed {seed}"] = {
                "held_out": score_per_prompt(held, out / "per-prompt", seed),
                "trained": score_per_prompt(scored, out / "per-prompt", seed)}
        (out / "results.json").write_text(json.dumps(results, indent=1))
    print("| | prompts | mask IoU | PSNR (dB) | Chamfer |")
    print("|---|---|---|---|---|")
    for name, r in results["models"].items():
        for part in ("trained", "held_out"):
            rows = r[part]
            print(f"| amortised, {name} | {part.replace('_', '-')} ({len(rows)}) | {summary(rows, 'mask_iou')} | "
                  f"{summary(rows, 'psnr')} | {summary(rows, 'chamfer')} |")
    for name, r in results["per_prompt"].items():
        for part in ("trained", "held_out"):
            rows = r[part]
            print(f"| per-prompt SDS, {name} | {part.replace('_', '-')} ({len(rows)}) | {summary(rows, 'mask_iou')} | "
                  f"{summary(rows, 'psnr')} | {summary(rows, 'chamfer')} |")
    print()
    grid_size = len(train_prompts) + len(held)
    for name, r in results["models"].items():
        gen = [row["generate_seconds"] for part in ("trained", "held_out") for row in r[part]]
        print(f"amortised {name}: training {r['train_seconds']:.0f} s (wall {r['wall_seconds']:.0f} s); "
              f"generation median {statistics.median(gen) * 1000:.1f} ms, max {max(gen) * 1000:.1f} ms")
    for name, r in results["per_prompt"].items():
        per = statistics.mean(row["train_seconds"] for part in ("trained", "held_out") for row in r[part])
        print(f"per-prompt {name}: mean training {per:.1f} s per prompt; the whole grid ({grid_size} prompts) "
              f"{per * grid_size:.0f} s")


if __name__ == "__main__":
    main()
