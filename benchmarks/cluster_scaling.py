"""Cluster scaling: throughput of N short jobs on a local Ray cluster of 1 node vs 2 nodes (each node
1 CPU, the head 0), Ray's per-job overhead against the local backend, and the head's memory.

    python benchmarks/cluster_scaling.py [--jobs 4] [--steps 40] [--repeats 3] [--out cluster_scaling.json]

Each repeat runs, in this process, one after another: the local backend (one worker process per
job, one job at a time), then a fresh Ray cluster with 1 worker node, then one with 2. Every job
is the same short SDS + NeRF run on the shapes prior (small export, no eval) with OMP_NUM_THREADS=1,
as Ray gives a 1-CPU task, so a job uses one core whichever backend runs it. Per job, from the job
table's history:

- dispatch -> task start: the job claimed by the dispatcher until the task runs on its node;
- dispatch -> first step: until the first optimisation step is done (process start, imports,
  building the prior and the field): the per-job overhead a user waits for;
- throughput: jobs per minute, from the first submit to the last job finished.

Head memory: the resident memory of the head node's Ray processes (GCS, raylet, ...), the
dispatcher actor and this driver process, sampled while the jobs run (maximum). Medians over the
repeats. This machine has 2 cores: 2 nodes of 1 CPU use both, so the 2-node run also shares
memory bandwidth and the caches; nothing else may run while it is measured.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported anywhere (the local job processes inherit it)

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the tests' local Ray cluster

FAST = ["prior.shapes=[cube,torus]", "export.resolution=32", "export.video_frames=4", "export.video_resolution=32",
        "export.formats=[glb]", "export.evaluate=false", "checkpoint_every=20", "preview_every=20"]
PROMPTS = ["a red cube", "a blue torus", "a green cube", "a yellow torus"]
MB = 1024 ** 2


def params(i: int, steps: int) -> dict:
    return {"prompt": PROMPTS[i % len(PROMPTS)], "negative_prompt": "", "guidance": "sds", "representation": "nerf",
            "prior": "shapes", "steps": steps, "seed": i, "resolution": None, "server_overrides": FAST}


def event_time(job, name: str):
    return next((e["time"] for e in job.history if e["event"] == name), None)


def run_jobs(store, n: int, steps: int, sample=None) -> dict:
    """Submit n jobs, wait for them all; throughput and per-job overheads from the job table."""
    start = time.time()
    ids = store.submit_many([(params(i, steps), steps) for i in range(n)])
    peak = 0.0
    while True:
        jobs = store.many(ids)
        if sample is not None:
            peak = max(peak, sample())
        if all(j.status in ("succeeded", "failed", "cancelled", "interrupted") for j in jobs):
            break
        time.sleep(0.2)
    end = max(j.finished for j in jobs)
    bad = [f"{j.id}: {j.status} {j.error}" for j in jobs if j.status != "succeeded"]
    if bad:
        raise SystemExit("jobs did not succeed: " + "; ".join(bad))
    to_task = [event_time(j, "started") - j.started for j in jobs if event_time(j, "started")]
    to_first = [event_time(j, "first step") - j.started for j in jobs]
    return {"jobs": n, "seconds": end - start, "jobs_per_min": 60 * n / (end - start),
            "dispatch_to_task_s": statistics.median(to_task) if to_task else None,
            "dispatch_to_first_step_s": statistics.median(to_first),
            "job_seconds": statistics.median(j.finished - j.started for j in jobs),
            "nodes_used": len({j.node for j in jobs if j.node}), "head_rss_mb": peak / MB if peak else None}


def writer_rate(root: Path, calls: int = 3000) -> dict:
    """The job table's write rate: progress reports (one transaction each, as the dispatcher writes
    them) per second from one thread, against a table of 10,000 jobs."""
    from threedgen.jobs.store import JobStore

    store = JobStore(root / "jobs.sqlite", max_queued=100_000)
    ids = store.submit_many([({**params(i, 600), "line": i}, 600) for i in range(10_000)])
    for job_id in ids[:64]:
        store.claim(worker=-1)
    start = time.perf_counter()
    for k in range(calls):
        store.progress(ids[k % 64], k // 64, 600, 0.1)
    per_s = calls / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(200):
        store.list()
    return {"progress_writes_per_s": per_s, "list_50_per_s": 200 / (time.perf_counter() - start)}


def local_run(root: Path, n: int, steps: int) -> dict:
    from threedgen.jobs.store import JobStore
    from threedgen.jobs.worker import WorkerPool

    store = JobStore(root / "state" / "jobs.sqlite", max_queued=1000)
    import psutil

    pool = WorkerPool(store, root / "runs", root / "outputs", ["cpu"]).start()
    try:
        return run_jobs(store, n, steps, sample=lambda: psutil.Process().memory_info().rss)
    finally:
        pool.stop()


def ray_run(root: Path, n: int, steps: int, nodes: int) -> dict:
    import psutil
    import ray
    from local_cluster import LocalCluster  # tests/: the tests' local cluster

    from threedgen.jobs.cluster import RayBackend
    from threedgen.jobs.store import JobStore

    with LocalCluster(workers=nodes, cpus=1, object_store_mb=100) as cluster:
        store = JobStore(root / "state" / "jobs.sqlite", max_queued=1000)
        backend = RayBackend(store, root / "runs", root / "outputs").start()
        head_pids = [*cluster.head_pids(), ray.get(backend.actor.info.remote())["pid"], os.getpid()]

        def head_rss() -> float:
            total = 0
            for pid in head_pids:
                try:
                    total += psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    pass
            return total

        try:
            return run_jobs(store, n, steps, sample=head_rss)
        finally:
            backend.shutdown_dispatcher()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="cluster_scaling.json")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="threedgen-writer-"))
    writes = writer_rate(root)
    shutil.rmtree(root, ignore_errors=True)
    print(f"job table: {writes['progress_writes_per_s']:.0f} progress writes/s, "
          f"{writes['list_50_per_s']:.0f} job-list reads/s (10,000 jobs)", flush=True)
    results: dict[str, list[dict]] = {"local": [], "ray-1-node": [], "ray-2-nodes": []}
    for r in range(args.repeats):
        for name in results:
            root = Path(tempfile.mkdtemp(prefix=f"threedgen-scaling-{name}-"))
            try:
                if name == "local":
                    res = local_run(root, args.jobs, args.steps)
                else:
                    res = ray_run(root, args.jobs, args.steps, 1 if name == "ray-1-node" else 2)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            results[name].append(res)
            print(f"repeat {r + 1} {name}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                                         for k, v in res.items()), flush=True)

    def med(name, key):
        values = [x[key] for x in results[name] if x[key] is not None]
        return statistics.median(values) if values else None

    rows = []
    print(f"\n{args.jobs} jobs of {args.steps} steps, median of {args.repeats}\n")
    print("| backend | nodes used | jobs/min | batch s | job s | dispatch -> task start s | dispatch -> first step s "
          "| head RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for name in results:
        row = {k: med(name, k) for k in results[name][0]}
        rows.append({"backend": name, **row})
        fmt = [f"{row[k]:.1f}" if row[k] is not None else "–" for k in
               ("jobs_per_min", "seconds", "job_seconds", "dispatch_to_task_s", "dispatch_to_first_step_s", "head_rss_mb")]
        print(f"| {name} | {int(row['nodes_used'])} | " + " | ".join(fmt) + " |")
    speedup = med("ray-2-nodes", "jobs_per_min") / med("ray-1-node", "jobs_per_min")
    overhead = med("ray-1-node", "dispatch_to_first_step_s") - med("local", "dispatch_to_first_step_s")
    print(f"\n2 nodes / 1 node throughput: {speedup:.2f}x; Ray's extra dispatch -> first step over the local "
          f"backend: {overhead:+.2f} s per job")
    Path(args.out).write_text(json.dumps({"args": vars(args), "writer": writes, "runs": results, "median": rows,
                                          "speedup_2_over_1": speedup, "ray_overhead_s": overhead}, indent=1))


if __name__ == "__main__":
    main()
