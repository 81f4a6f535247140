"""Time to quality on CPU: training wall seconds until the held-out mask IoU reaches a target
(default 0.9), per representation x guidance method x prompt, on the embedded shapes prior.

    python benchmarks/time_to_quality.py [--representations nerf gaussians] [--methods sds]
        [--prompts "a red cube" ...] [--every 25] [--repeats 3] [--target 0.9]
        [--write BENCHMARKS.md] [key=value ...]

Each run is the real training loop (``runner.make_trainer``: Lightning, checkpoints, previews) at
the preset's settings; a probe callback scores the representation every ``--every`` steps with
``threedgen eval``'s mask IoU (best yaw, no mesh) with the clock stopped, and stops the run at the
first probe at or above the target. Seconds count from ``trainer.fit`` (trainer set-up included);
the prior and the model are built before the clock starts (``setup s``, reported apart). Seeds are
0..repeats-1; the table gives medians over them.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from quality import report  # noqa: E402

from threedgen.cameras import CameraSampler
from threedgen.config import build_config, parse_overrides
from threedgen.evaluate import evaluate_representation
from threedgen.runner import build_components, make_trainer, quiet_libraries
from threedgen.system import CameraDataModule


class QualityProbe(pl.Callback):
    """Every ``every`` steps: mask IoU against the truth, with the probe's own time excluded."""

    def __init__(self, truth, distance: float, fovy: float, every: int, target: float):
        self.truth, self.distance, self.fovy = truth, distance, fovy
        self.every, self.target = every, target
        self.start = None
        self.paused = 0.0
        self.trace: list[tuple[int, float, float]] = []  # (step, seconds, IoU)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every and step != trainer.max_steps:
            return
        seconds = self.elapsed()
        t0 = time.perf_counter()
        iou = evaluate_representation(module.representation, self.truth, self.distance, self.fovy)["mask_iou"]
        module.representation.train()
        self.trace.append((step, seconds, iou))
        if iou >= self.target:
            trainer.should_stop = True
        self.paused += time.perf_counter() - t0


def time_to_quality(representation: str, method: str, prompt: str, seed: int, every: int, target: float,
                    overrides: dict) -> dict:
    cfg = build_config(method, representation, overrides=overrides, flags={"prompt": prompt, "seed": seed})
    pl.seed_everything(seed, verbose=False)
    t0 = time.perf_counter()
    system = build_components(cfg, torch.device("cpu"))
    setup = time.perf_counter() - t0
    c = cfg.camera
    probe = QualityProbe(system.prior.truth(prompt), sum(c.distance_range) / 2, sum(c.fovy_range) / 2, every, target)
    with tempfile.TemporaryDirectory(prefix="threedgen-ttq-") as tmp:
        trainer = make_trainer(cfg, Path(tmp), torch.device("cpu"), progress_bar=False, callbacks=[probe])
        probe.start = time.perf_counter()
        trainer.fit(system, datamodule=CameraDataModule(CameraSampler(cfg.camera, seed)))
    reached = [(s, sec, iou) for s, sec, iou in probe.trace if iou >= target]
    best = max(probe.trace, key=lambda r: r[2])
    return {"setup": setup, "reached": bool(reached), "steps": reached[0][0] if reached else None,
            "seconds": reached[0][1] if reached else None, "iou": reached[0][2] if reached else best[2],
            "best_step": best[0], "max_steps": cfg.steps, "seconds_per_step": probe.trace[-1][1] / max(probe.trace[-1][0], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--representations", nargs="+", default=["nerf", "gaussians"])
    ap.add_argument("--methods", nargs="+", default=["sds"])
    ap.add_argument("--prompts", nargs="+", default=["a red cube", "a blue torus", "a green sphere"])
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--write", default=None, help="append the table to this markdown file")
    ap.add_argument("overrides", nargs="*", help="config overrides for every run (key=value)")
    args = ap.parse_args()
    quiet_libraries()
    overrides = parse_overrides(args.overrides)
    rows = []
    for rep in args.representations:
        for method in args.methods:
            for prompt in args.prompts:
                runs = [time_to_quality(rep, method, prompt, seed, args.every, args.target, overrides)
                        for seed in range(args.repeats)]
                hit = [r for r in runs if r["reached"]]
                row = {"rep": rep, "method": method, "prompt": prompt, "reached": len(hit), "n": len(runs),
                       "seconds": statistics.median(r["seconds"] for r in hit) if hit else None,
                       "steps": statistics.median(r["steps"] for r in hit) if hit else None,
                       "iou": statistics.median(r["iou"] for r in runs),
                       "setup": statistics.median(r["setup"] for r in runs),
                       "ms_step": statistics.median(r["seconds_per_step"] for r in runs) * 1000,
                       "max_steps": runs[0]["max_steps"]}
                rows.append(row)
                print(row, flush=True)
    lines = [f"\n### Time to quality (mask IoU >= {args.target}), {time.strftime('%Y-%m-%d')}\n",
             f"Command: `python benchmarks/time_to_quality.py --representations {' '.join(args.representations)} "
             f"--methods {' '.join(args.methods)} --every {args.every} --repeats {args.repeats}"
             f"{' ' + ' '.join(args.overrides) if args.overrides else ''}`; {platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}. Seconds: training wall time "
             f"(Lightning loop, checkpoints and previews included, IoU probes every {args.every} steps "
             f"excluded) until the first probe at or above the target; medians over seeds 0..{args.repeats - 1}.\n",
             "| representation | method | prompt | reached | seconds | steps | IoU at stop | ms/step | setup s | run length |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sec = f"{r['seconds']:.1f}" if r["seconds"] is not None else "—"
        steps = f"{r['steps']:.0f}" if r["steps"] is not None else "—"
        lines.append(f"| {r['rep']} | {r['method']} | {r['prompt']} | {r['reached']}/{r['n']} | {sec} | {steps} | "
                     f"{r['iou']:.3f} | {r['ms_step']:.0f} | {r['setup']:.1f} | {r['max_steps']} |")
    report("\n".join(lines) + "\n", args.write)


if __name__ == "__main__":
    main()
