"""Memory soak: resident memory (and VRAM on CUDA) sampled over a long run of the real training loop
(Lightning, checkpoints, previews), to show it does not grow.

    python benchmarks/soak.py [--representations nerf gaussians] [--steps 2000] [--every 50]
        [--write BENCHMARKS.md] [key=value ...]

Growth is measured from the end of warm-up (10 % of the run) for the NeRF, and from the end of
densification (``representation.densify_stop``, when the number of Gaussians stops changing) for
the Gaussians, to the last step; "per 1000 steps" is the least-squares slope over that window.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import report  # noqa: E402


def rss_mib() -> float:
    """Current resident set size of this process in MiB (Linux ``/proc``; peak RSS elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def malloc_trim() -> None:
    """Hand the C allocator's free pages back to the OS (glibc), so that RSS counts live memory
    rather than what the allocator keeps cached; a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryProbe(pl.Callback):
    def __init__(self, every: int, trim: bool = False):
        self.every, self.trim = every, trim
        self.samples: list[tuple[int, float, float, float]] = []  # (step, seconds, RSS MiB, VRAM MiB)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            if self.trim:
                malloc_trim()
            vram = torch.cuda.memory_allocated() / 2 ** 20 if torch.cuda.is_available() else 0.0
            self.samples.append((step, time.perf_counter() - self.start, rss_mib(), vram))


def soak(representation: str, steps: int, every: int, overrides: dict, trim: bool = False) -> dict:
    from threedgen.cameras import CameraSampler
    from threedgen.config import build_config
    from threedgen.devices import resolve_device
    from threedgen.runner import build_components, make_trainer
    from threedgen.system import CameraDataModule

    cfg = build_config("sds", representation, overrides=overrides, flags={"prompt": "a red cube", "steps": steps})
    device = resolve_device(cfg.device)
    pl.seed_everything(cfg.seed, verbose=False)
    system = build_components(cfg, device)
    probe = MemoryProbe(every, trim)
    with tempfile.TemporaryDirectory(prefix="threedgen-soak-") as tmp:
        trainer = make_trainer(cfg, Path(tmp), device, progress_bar=False, callbacks=[probe])
        trainer.fit(system, datamodule=CameraDataModule(CameraSampler(cfg.camera, cfg.seed)))
    s = np.array(probe.samples)
    start = steps * (cfg.representation.densify_stop if representation == "gaussians" else 0.1)
    window = s[s[:, 0] >= start]
    slope = np.polyfit(window[:, 0], window[:, 2], 1)[0] * 1000 if len(window) > 2 else float("nan")
    fifth = max(1, len(window) // 5)  # medians of the window's first and last fifths: steadier than two samples
    first, last = float(np.median(window[:fifth, 2])), float(np.median(window[-fifth:, 2]))
    half = len(window) // 2  # the envelope: the highest RSS of each half of the window
    max_first, max_second = float(window[:half, 2].max()), float(window[half:, 2].max())
    return {"representation": representation, "steps": steps, "seconds": float(s[-1, 1]),
            "rss_start": float(window[0, 2]), "rss_end": float(s[-1, 2]), "rss_max": float(s[:, 2].max()),
            "growth": float(window[-1, 2] - window[0, 2]), "slope": float(slope), "from_step": int(window[0, 0]),
            "first_fifth": first, "last_fifth": last, "max_first_half": max_first, "max_second_half": max_second,
            "samples": [(int(a), round(float(c), 1)) for a, _, c, _ in s],
            "vram_end": float(s[-1, 3]), "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trace": [(int(a), round(float(c), 1)) for a, _, c, _ in s[:: max(1, len(s) // 8)]]}


def main() -> None:
    from threedgen.config import parse_overrides
    from threedgen.runner import quiet_libraries

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--representations", nargs="+", default=["nerf", "gaussians"])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--write", default=None, help="append the table to this markdown file")
    ap.add_argument("--trim", action="store_true", help="malloc_trim before each sample (RSS of live memory)")
    ap.add_argument("--samples", default=None, help="write every (step, RSS MiB) sample to this JSON file")
    ap.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    args = ap.parse_args()
    quiet_libraries()
    rows = []
    for rep in args.representations:
        rows.append(soak(rep, args.steps, args.every, parse_overrides(args.overrides), args.trim))
        print({k: v for k, v in rows[-1].items() if k != "samples"}, flush=True)
    if args.samples:
        Path(args.samples).write_text(json.dumps({r["representation"]: r["samples"] for r in rows}))
    lines = [f"\n### Memory soak, {time.strftime('%Y-%m-%d')}\n",
             f"Command: `python benchmarks/soak.py --steps {args.steps} --every {args.every}"
             f"{' --trim' if args.trim else ''}"
             f"{' ' + ' '.join(args.overrides) if args.overrides else ''}`; {platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}; the representations run one after "
             "the other in one process (the second starts on the first's heap). RSS sampled every "
             f"{args.every} steps by a Lightning callback (SDS, shapes prior, \"a red cube\")"
             f"{', after malloc_trim (live memory, not what the allocator caches)' if args.trim else ''}.\n",
             "| representation | steps | train s | RSS at window start MiB (step) | RSS at end MiB | max MiB | "
             "growth over window MiB | median first → last fifth MiB | max first → second half MiB | "
             "slope MiB / 1000 steps | RSS trace (step, MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        trace = ", ".join(f"{a}: {b:.0f}" for a, b in r["trace"])
        lines.append(f"| {r['representation']} | {r['steps']} | {r['seconds']:.0f} | {r['rss_start']:.0f} ({r['from_step']}) | "
                     f"{r['rss_end']:.0f} | {r['rss_max']:.0f} | {r['growth']:+.1f} | {r['first_fifth']:.0f} → "
                     f"{r['last_fifth']:.0f} ({r['last_fifth'] - r['first_fifth']:+.1f}) | {r['max_first_half']:.0f} → "
                     f"{r['max_second_half']:.0f} ({r['max_second_half'] - r['max_first_half']:+.1f}) | {r['slope']:+.2f} | "
                     f"{trace} |")
    report("\n".join(lines) + "\n", args.write)


if __name__ == "__main__":
    main()
