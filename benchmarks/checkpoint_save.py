"""What a verified checkpoint costs: ``threedgen.checkpoints.save_checkpoint`` (write into the run
folder, fsync, read back with ``weights_only`` and check every tensor, keep the previous one as a
hard link, rename, fsync the folder) against a plain, unverified ``trainer.save_checkpoint`` to a
file (the same Lightning checkpoint, the same writer), in the same process, on the default NeRF
and Gaussians of "a red cube".

    python benchmarks/checkpoint_save.py [--repeats 7] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import report  # noqa: E402


def measure(representation: str, repeats: int) -> dict:
    from threedgen.cameras import CameraSampler
    from threedgen.checkpoints import save_checkpoint
    from threedgen.config import build_config, parse_overrides
    from threedgen.runner import build_components, make_trainer
    from threedgen.system import CameraDataModule

    cfg = build_config("sds", representation, overrides=parse_overrides(["checkpoint_every=1000"]),
                       flags={"prompt": "a red cube", "steps": 5})
    system = build_components(cfg, torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="threedgen-ckpt-") as tmp:
        run_dir = Path(tmp)
        trainer = make_trainer(cfg, run_dir, torch.device("cpu"), progress_bar=False)
        trainer.fit(system, datamodule=CameraDataModule(CameraSampler(cfg.camera, cfg.seed)))
        plain, verified = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            trainer.save_checkpoint(run_dir / "plain.ckpt", weights_only=False)
            plain.append(time.perf_counter() - t)
            t = time.perf_counter()
            save_checkpoint(trainer, run_dir)
            verified.append(time.perf_counter() - t)
        size = (run_dir / "checkpoints" / "last.ckpt").stat().st_size
    return {"representation": representation, "mib": size / 2 ** 20, "plain": statistics.median(plain),
            "verified": statistics.median(verified)}


def main() -> None:
    from threedgen.runner import quiet_libraries

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--write", default=None)
    args = ap.parse_args()
    quiet_libraries()
    rows = [measure(rep, args.repeats) for rep in ("nerf", "gaussians")]
    lines = [f"\n### Checkpoint save cost, {time.strftime('%Y-%m-%d')}\n",
             f"Command: `python benchmarks/checkpoint_save.py --repeats {args.repeats}`; median of {args.repeats} "
             "saves each, alternating, in one process, after 5 training steps; CPU, local disk.\n",
             "| representation | checkpoint MiB | plain save ms | verified save ms | ratio |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['representation']} | {r['mib']:.2f} | {r['plain'] * 1000:.1f} | {r['verified'] * 1000:.1f} | "
                     f"{r['verified'] / r['plain']:.2f} |")
    report("\n".join(lines) + "\n", args.write)


if __name__ == "__main__":
    main()
