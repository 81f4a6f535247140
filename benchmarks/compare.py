"""The workbench's harness overhead: `threedgen compare` of N methods x 1 seed against the same runs
as N separate `threedgen run` commands, one after the other, in the same process tree.

    python benchmarks/compare.py [--prompt "a green house"] [--methods all] [--budget-steps 150]
                                 [--repeats 1] [--ray] [--out DIR] [--write BENCHMARKS.md] [-- key=value ...]

Both sides run the same requests (prompt, seed 0, budget, prior shapes, the extra settings) on this
machine's CPU with the local backend (one job at a time); the ratio is the compare command's wall
time over the sum of the single runs' wall times (each a whole `threedgen run` command, start-up,
export and eval included). Order alternates between repeats. ``--ray`` also runs the comparison on
a local Ray cluster of two worker nodes of one CPU each (the tests' ``LocalCluster``; the head runs
no jobs), ``threedgen compare --backend ray``, and gives its ratio to the same single runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-3:]}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", default="a green house")
    ap.add_argument("--methods", default="all")
    ap.add_argument("--budget-steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--write", default=None)
    ap.add_argument("--ray", action="store_true", help="also on a local 2-node Ray cluster")
    ap.add_argument("overrides", nargs="*", help="settings for every run (after --)")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from threedgen.compare import parse_methods

    methods = parse_methods(args.methods)
    out = Path(args.out or tempfile.mkdtemp(prefix="threedgen-compare-bench-"))
    py = [sys.executable, "-m", "threedgen"]
    compare_s, singles_s, ray_s = [], [], []
    cluster = None
    if args.ray:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from local_cluster import LocalCluster  # tests/: the tests' local cluster

        cluster = LocalCluster(workers=2, cpus=1, object_store_mb=100)
    for k in range(args.repeats):
        def compare(backend=()):
            sets = [a for s in args.overrides for a in ("--set", s)]
            return timed([*py, "compare", "--prompt", args.prompt, "--methods", ",".join(methods), "--seeds", "0",
                          "--budget-steps", str(args.budget_steps), "--prior", "shapes", "--out",
                          str(out / f"compare-{'ray-' if backend else ''}{k}"), *backend, *sets])

        def singles():
            return sum(timed([*py, "run", "--prompt", args.prompt, "--guidance", m, "--seed", "0", "--steps",
                              str(args.budget_steps), "--prior", "shapes", "--out", str(out / f"single-{k}"),
                              "--no-progress", *args.overrides]) for m in methods)

        if k % 2 == 0:
            compare_s.append(compare())
            singles_s.append(singles())
        else:
            singles_s.append(singles())
            compare_s.append(compare())
        if cluster is not None:
            ray_s.append(compare(("--backend", "ray", "--ray-address", cluster.address)))
        print(f"repeat {k}: compare {compare_s[-1]:.1f} s, singles {singles_s[-1]:.1f} s, ratio "
              f"{compare_s[-1] / singles_s[-1]:.3f}" + (f"; on 2 Ray nodes {ray_s[-1]:.1f} s, ratio "
                                                        f"{ray_s[-1] / singles_s[-1]:.3f}" if ray_s else ""),
              file=sys.stderr, flush=True)
    if cluster is not None:
        cluster.close()
    c, s = statistics.median(compare_s), statistics.median(singles_s)
    text = (f"Command: `python benchmarks/compare.py --methods {args.methods} --budget-steps {args.budget_steps} "
            f"--repeats {args.repeats}` ({len(methods)} methods x 1 seed, prompt {args.prompt!r}, shapes prior, NeRF), "
            f"{platform.machine()}, {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}.\n\n"
            "| | wall s (median) |\n|---|---|\n"
            f"| `threedgen compare` (one job process per run, views and sheet included) | {c:.1f} |\n"
            f"| the same runs as {len(methods)} `threedgen run` commands | {s:.1f} |\n"
            f"| ratio | {c / s:.3f} |\n"
            + (f"| `threedgen compare --backend ray` on 2 local nodes of 1 CPU | {statistics.median(ray_s):.1f} |\n"
               f"| ratio (Ray) | {statistics.median(ray_s) / s:.3f} |\n" if ray_s else ""))
    print(text)
    (out / "result.json").write_text(json.dumps({"compare_s": compare_s, "singles_s": singles_s, "ray_s": ray_s}))
    if args.write:
        with open(args.write, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
