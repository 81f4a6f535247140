"""Does the prior's own Janus check (threedgen.janus_prior, no truth needed) agree with the truth's
Janus metrics (threedgen.janus)? Run on the folders of a Janus benchmark (benchmarks/janus.py).

    python benchmarks/janus_prior_check.py --out DIR [--judges unbiased run] [--threshold 0.2]
                                           [--write BENCHMARKS.md]

For every run recorded in ``DIR/results.jsonl`` the check is taken under each judge (``unbiased``:
the run's prior without camera input or view bias, strict view tags; ``run``: the run's prior as it
trained, view tags on: for the biased cells, the biased prior) and compared with three verdicts of
the truth: ``janus`` (two or more marker parts: the benchmark's definition), ``second front`` (a
second part at least a quarter of the truth's marker: a real second face, not a fragment) and
``JVR > 0`` (some back view matches a front view of the truth best). Per judge and verdict: the
accuracy of ``janus_score_prior > threshold``, and the ROC AUC of ``janus_score_prior`` and of
``janus_margin_prior`` (the probability that a run the truth calls Janus scores above one it does
not, ties counting half). Results are cached in ``DIR/prior_check.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path


def auc(scores: list[float], labels: list[bool]) -> float | None:
    """ROC AUC by the Mann-Whitney count (ties half); None without both classes."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def verdicts(r: dict) -> dict[str, bool]:
    parts, truth = r.get("front_marker_voxels") or [], (r.get("front_marker_voxels_truth") or [0])[0]
    return {"janus": bool(r["janus"]), "second front": len(parts) >= 2 and truth > 0 and parts[1] >= truth / 4,
            "JVR > 0": (r.get("janus_view_rate") or 0) > 0}


def check(run_dir: str, judge: str) -> dict:
    from threedgen.janus_prior import janus_prior_metrics
    from threedgen.runs import load_representation

    cfg, representation, _ = load_representation(run_dir, device="cpu")
    cfg.janus.judge = judge
    start = time.perf_counter()
    m = janus_prior_metrics(representation, cfg)
    return {"run_dir": run_dir, "judge": judge, "seconds": time.perf_counter() - start,
            **{k: m.get(k) for k in ("janus_score_prior", "janus_margin_prior", "janus_confusion_prior")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the Janus benchmark's folder (results.jsonl)")
    ap.add_argument("--judges", nargs="+", default=["unbiased", "run"], choices=["unbiased", "run"],
                    help="the first must be unbiased (the per-cell table's)")
    ap.add_argument("--threshold", type=float, default=0.2)
    ap.add_argument("--cells", nargs="+", default=None, help="only these cells (default: every recorded run)")
    ap.add_argument("--write", default=None, help="append the tables to this markdown file")
    args = ap.parse_args()
    out = Path(args.out)
    runs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    runs = [r for r in runs if args.cells is None or r["cell"] in args.cells]
    cache_path = out / "prior_check.jsonl"
    cache = {(c["run_dir"], c["judge"]): c for c in (json.loads(line) for line in
                                                    (cache_path.read_text().splitlines() if cache_path.exists() else []))}
    for r in runs:
        for judge in args.judges:
            if (r["run_dir"], judge) not in cache:
                c = check(r["run_dir"], judge)
                cache[(r["run_dir"], judge)] = c
                with cache_path.open("a") as f:
                    f.write(json.dumps(c) + "\n")
                if c["janus_score_prior"] is None:
                    continue
                print(f"{r['cell']:<13} {r['object']:<6} seed {r['seed']} judge {judge:<8} score "
                      f"{c['janus_score_prior']:.2f} margin {c['janus_margin_prior']:+.3f} | truth janus {r['janus']} "
                      f"JVR {r['janus_view_rate']:.2f} ({c['seconds']:.1f} s)", file=sys.stderr, flush=True)
    lines = [f"Command: `python benchmarks/janus_prior_check.py --out DIR --judges {' '.join(args.judges)} --threshold "
             f"{args.threshold}` on {len(runs)} runs of `benchmarks/janus.py` ({', '.join(sorted({r['cell'] for r in runs}))}; "
             f"{', '.join(sorted({r['object'] for r in runs}))}; {runs[0]['steps']} steps), {platform.machine()}, "
             f"{time.strftime('%Y-%m-%d')}; median check time "
             f"{statistics.median(c['seconds'] for c in cache.values()):.1f} s per run.", "",
             "| judge | truth verdict | Janus by truth | accuracy (score > threshold) | AUC of score | AUC of margin |",
             "|---|---|---|---|---|---|"]
    for judge in args.judges:
        # A camera-conditioned run's own prior has no view tags: the "run" judge skips it.
        scored = [(r, cache[(r["run_dir"], judge)]) for r in runs if cache[(r["run_dir"], judge)]["janus_score_prior"]
                  is not None]
        for verdict in ("janus", "second front", "JVR > 0"):
            labels = [verdicts(r)[verdict] for r, _ in scored]
            scores = [c["janus_score_prior"] for _, c in scored]
            margins = [c["janus_margin_prior"] for _, c in scored]
            acc = statistics.fmean((s > args.threshold) == y for s, y in zip(scores, labels))
            a1, a2 = auc(scores, labels), auc(margins, labels)
            lines.append(f"| {judge} | {verdict} | {sum(labels)}/{len(labels)} | {acc:.2f} | "
                         f"{'n/a' if a1 is None else f'{a1:.2f}'} | {'n/a' if a2 is None else f'{a2:.2f}'} |")
    lines += ["", "| cell | object | runs | truth Janus | mean score (unbiased) | share > threshold | mean margin |",
              "|---|---|---|---|---|---|---|"]
    for cell in sorted({r["cell"] for r in runs}):
        for obj in sorted({r["object"] for r in runs if r["cell"] == cell}):
            rs = [r for r in runs if r["cell"] == cell and r["object"] == obj]
            cs = [cache[(r["run_dir"], "unbiased")] for r in rs]
            lines.append(f"| {cell} | {obj} | {len(rs)} | {sum(bool(r['janus']) for r in rs)} | "
                         f"{statistics.fmean(c['janus_score_prior'] for c in cs):.2f} | "
                         f"{statistics.fmean(c['janus_score_prior'] > args.threshold for c in cs):.2f} | "
                         f"{statistics.fmean(c['janus_margin_prior'] for c in cs):+.3f} |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        with open(args.write, "a") as f:
            f.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
