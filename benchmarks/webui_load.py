"""Web UI under load: does serving many API clients slow the jobs down?

An in-process web UI (``threedgen.webui.app.WebUI``) runs long jobs on two single-core slots, once
with the ``local`` backend (``devices=["cpu", "cpu"]``: two job processes) and once with ``ray``
(a local Ray cluster made as in tests/test_cluster.py: a head without CPUs and two 1-CPU worker
nodes). ``--queued`` long jobs are queued through the API, so two run and the rest wait. Then:

A. no clients (``--baseline`` s): the running jobs' step rate (steps per second, summed over the
   running jobs, from the step counts in the job table at the start and end of the phase);
B. ``--clients`` concurrent API clients (``--duration`` s), each calling ``/status`` (of a random
   queued or running job) and ``/jobs`` once a second: the same step rate, the latency of
   ``/status`` and ``/jobs`` (from the POST to the ``complete`` event), errors (any non-success
   answer, error event, exception or timeout: must be 0), the server's CPU share (its process CPU
   time over wall time, in % of one core) and its largest resident memory. The ratio of the step
   rates B/A is the slowdown the clients cause (goal: a drop of at most 10 %);
C. queue-full flood: ``--flood`` concurrent ``/submit`` calls (single seeds and seed ranges
   ``N-N+3``) with the queue near ``--max-queue``: every answer must be job ids or a "queue is full"
   error, and the job table must then hold exactly the accepted jobs (a request is all or nothing).

    OMP_NUM_THREADS=1 python benchmarks/webui_load.py [--backend local|ray|both] [--duration 300]
        [--baseline 60] [--clients 50] [--queued 20] [--max-queue N] [--flood 30] [--out webui_load.json]

Prints one Markdown table row per backend (and a CPU breakdown and the flood's counts below it)
and writes every number to ``--out`` (JSON). Exits 1 when a request failed or the flood check
failed.

How it works and caveats:

- ``OMP_NUM_THREADS=1`` (and MKL's) is set by this script before anything imports torch, so each job
  (a local job process or a Ray task's worker) uses one core; both backends run two jobs at once.
- The clients run in a separate process (this script with ``--client-mode``; one asyncio loop and a
  minimal HTTP/1.1 keep-alive client on asyncio streams, cheaper per request than httpx) speaking
  Gradio's HTTP API: ``POST /gradio_api/call/<api>`` with ``{"data": [...]}`` answers
  ``{"event_id": ...}``; ``GET /gradio_api/call/<api>/<event_id>`` streams ``event: complete`` /
  ``data: [...]`` (or ``event: error``) and ends.
- On a 2-core machine the clients, the server and Ray's own processes share the cores with the two
  single-core jobs, so the step-rate drop includes the clients' CPU, not only the server's. The CPU
  breakdown (server, jobs, clients, other processes of this run, and the rest of the machine)
  shows where the cores went; "outside" work (anything not started by this run) spoils the
  measurement: run it alone.
- "Server" is this process: the Gradio/uvicorn server, the local backend's worker threads and, with
  Ray, the driver's Ray threads. The jobs (child processes or Ray workers), the Ray dispatcher actor
  and Ray's GCS/raylet processes are other processes and are not counted in it (they are in the
  breakdown).
- Step counts in the table are written by each job every 0.5 s, so a phase's step count is
  uncertain by about 0.5 s of steps per job (under 1 % for a 60 s phase). The steps done per second
  may also drift as training goes on (a NeRF's occupancy grid); the per-phase timelines are in the
  JSON. The jobs get ``--steps`` (default 100000; about 50 steps a second each on one core) so they
  run through every phase.
"""

from __future__ import annotations

import os

# Before anything imports torch: one core per job (inherited by the job processes and Ray's workers).
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the tests' local Ray cluster

# The tests' FAST settings (tests/test_webui.py), without their checkpoint and preview every 5 steps:
# the defaults (every 200 and 100 steps) as on a real server.
OVERRIDES = ["prior.shapes=[cube,torus]", "export.resolution=32", "export.video_frames=4",
             "export.video_resolution=32", "export.formats=[glb,obj,ply]", "export.evaluate=false"]
PROMPTS = ["a red cube", "a blue torus"]
MB = 1024 ** 2
ACTIVE = ("queued", "running")


def form(prompt: str, steps: int, seeds: str) -> list:
    """The ``submit`` API's eight inputs."""
    return [prompt, "", "sds", "nerf", "shapes", str(steps), seeds, ""]


# ---- a minimal HTTP/1.1 client and Gradio's call API ------------------------------------------

class CallError(Exception):
    pass


class Http:
    """One keep-alive HTTP/1.1 connection on asyncio streams (JSON bodies; Content-Length or chunked
    answers). A reused connection the server closed meanwhile is opened again once."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None
        self.reconnects = 0

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        for attempt in (0, 1):
            fresh = self.writer is None or self.reader.at_eof()
            if fresh:
                await self.close()
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nAccept: */*\r\n"
            if body is not None:
                head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            try:
                self.writer.write(head.encode() + b"\r\n" + (body or b""))
                line = await self.reader.readline()
                if not line:
                    raise ConnectionResetError("the server closed the connection")
            except (ConnectionError, OSError):
                await self.close()
                if fresh or attempt:
                    raise
                self.reconnects += 1
                continue
            return await self._answer(line)
        raise AssertionError("unreachable")

    async def _answer(self, status_line: bytes) -> tuple[int, bytes]:
        status = int(status_line.split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b"\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip().lower()
        if headers.get("transfer-encoding") == "chunked":
            parts = []
            while (size := int((await self.reader.readline()).split(b";")[0], 16)) > 0:
                parts.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            while (await self.reader.readline()) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            data = b"".join(parts)
        elif "content-length" in headers:
            data = await self.reader.readexactly(int(headers["content-length"]))
        else:
            data = await self.reader.read()
            headers["connection"] = "close"
        if headers.get("connection") == "close":
            await self.close()
        return status, data


def sse_events(body: bytes) -> list[tuple[str, str]]:
    events = []
    for block in body.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            events.append((fields["event"], fields.get("data", "null")))
    return events


API = {"mode": "rest"}  # rest: the plain JSON polling routes; gradio: Gradio's API (event queue)


async def call(conn: Http, api: str, data: list):
    """One API call: ``(seconds from the request to the whole answer, the output as Gradio gives it:
    a list of one value)``; raises CallError on any other answer. ``--api rest`` asks
    ``GET /api/v1/status/<id>`` and ``GET /api/v1/jobs``; ``--api gradio`` Gradio's event queue."""
    start = time.perf_counter()
    if API["mode"] == "rest" and api in ("status", "jobs"):
        status, body = await conn.request("GET", f"/api/v1/status/{data[0]}" if api == "status" else "/api/v1/jobs")
        if status != 200:
            raise CallError(f"GET {status} {body[:200]!r}")
        return time.perf_counter() - start, [json.loads(body)]
    status, body = await conn.request("POST", f"/gradio_api/call/{api}", json.dumps({"data": data}).encode())
    if status != 200:
        raise CallError(f"POST {status} {body[:200]!r}")
    event_id = json.loads(body)["event_id"]
    status, body = await conn.request("GET", f"/gradio_api/call/{api}/{event_id}")
    if status != 200:
        raise CallError(f"GET {status} {body[:200]!r}")
    for event, payload in sse_events(body):
        if event == "complete":
            return time.perf_counter() - start, json.loads(payload)
        if event == "error":
            raise CallError(f"error event: {payload[:300]}")
    raise CallError(f"no complete event in {body[:300]!r}")


def percentiles(values: list[float]) -> dict:
    s = sorted(values)
    if not s:
        return {"n": 0}

    def q(p):
        return s[min(len(s) - 1, max(math.ceil(p * len(s)) - 1, 0))]

    return {"n": len(s), "p50_ms": q(0.5) * 1e3, "p90_ms": q(0.9) * 1e3, "p99_ms": q(0.99) * 1e3,
            "max_ms": s[-1] * 1e3, "mean_ms": sum(s) / len(s) * 1e3}


# ---- the clients (a separate process: --client-mode) ----------------------------------------

async def run_clients(host: str, port: int, clients: int, duration: float, ids: list[str], timeout: float) -> dict:
    lat = {"status": [], "jobs": []}
    errors: dict[str, int] = {}
    pool = list(ids)  # queued or running jobs, refreshed from the /jobs answers
    late = 0
    conns = [Http(host, port) for _ in range(clients)]

    def error(api, exc):
        key = f"{api}: {type(exc).__name__}: {exc}"[:200]
        errors[key] = errors.get(key, 0) + 1

    async def client(conn: Http, end: float):
        nonlocal pool, late
        tick = time.monotonic() + random.random()  # spread over the first second
        while True:
            now = time.monotonic()
            if tick > now:
                await asyncio.sleep(tick - now)
            if time.monotonic() >= end:
                return
            job = random.choice(pool)
            try:
                seconds, out = await asyncio.wait_for(call(conn, "status", [job]), timeout)
                if not (isinstance(out, list) and isinstance(out[0], dict) and out[0].get("id") == job):
                    raise CallError(f"unexpected answer {str(out)[:200]}")
                lat["status"].append(seconds)
            except Exception as exc:  # noqa: BLE001 - every failure counts
                await conn.close()
                error("status", exc)
            try:
                seconds, out = await asyncio.wait_for(call(conn, "jobs", []), timeout)
                jobs = out[0]["jobs"]
                lat["jobs"].append(seconds)
                active = [j["id"] for j in jobs if j["status"] in ACTIVE]
                if active:
                    pool = active
            except Exception as exc:  # noqa: BLE001
                await conn.close()
                error("jobs", exc)
            tick += 1.0
            if tick < time.monotonic():  # a second's calls took over a second: do not pile up
                late += 1
                tick = time.monotonic()

    print("started", flush=True)
    cpu0, t0 = time.process_time(), time.monotonic()
    await asyncio.gather(*(client(c, t0 + duration) for c in conns))
    wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    for c in conns:
        await c.close()
    return {"clients": clients, "wall_s": wall, "cpu_s": cpu, "cpu_pct": 100 * cpu / wall,
            "status": percentiles(lat["status"]), "jobs": percentiles(lat["jobs"]),
            "requests": len(lat["status"]) + len(lat["jobs"]), "errors": sum(errors.values()),
            "error_kinds": errors, "late_ticks": late, "reconnects": sum(c.reconnects for c in conns)}


def client_main(args) -> None:
    API["mode"] = args.api
    host, _, port = args.url.rpartition(":")
    result = asyncio.run(run_clients(host, int(port), args.clients, args.duration, args.ids.split(","),
                                     args.timeout))
    Path(args.client_out).write_text(json.dumps(result))


# ---- the server side ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(proc) -> float:
    t = proc.cpu_times()
    return t.user + t.system


class Phase:
    """Step counts, CPU times and memory over one phase (``start`` ... ``stop``); samples the step
    counts and this process's resident memory every second in a thread."""

    def __init__(self, store, client_pid: int | None = None):
        import psutil

        self.psutil, self.store, self.client_pid = psutil, store, client_pid
        self.me = psutil.Process()
        self.rss_max = 0
        self.timeline: list[tuple[float, int]] = []
        self._stop = threading.Event()

    def _running(self) -> dict:
        return {j.id: (j.step, j.pid) for j in self.store.running()}

    def _tree(self) -> dict:
        out = {}
        for p in self.me.children(recursive=True):
            try:
                out[p.pid] = cpu_seconds(p)
            except self.psutil.Error:
                pass
        return out

    def _sample(self) -> None:
        while not self._stop.wait(1.0):
            self.rss_max = max(self.rss_max, self.me.memory_info().rss)
            now = self._running()
            steps = sum(now[i][0] for i in self.jobs0 if i in now)
            self.timeline.append((round(time.monotonic() - self.t0, 2), steps))

    def start(self) -> "Phase":
        self.jobs0 = self._running()
        self.tree0, self.machine0 = self._tree(), self.psutil.cpu_times()
        self.rss_max = self.me.memory_info().rss
        self.t0, self.cpu0 = time.monotonic(), time.process_time()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> dict:
        wall, cpu = time.monotonic() - self.t0, time.process_time() - self.cpu0
        jobs1, tree1, machine1 = self._running(), self._tree(), self.psutil.cpu_times()
        self._stop.set()
        self.thread.join()
        self.rss_max = max(self.rss_max, self.me.memory_info().rss)
        per_job = {i: (jobs1[i][0] - s0) / wall for i, (s0, _) in self.jobs0.items() if i in jobs1}
        # CPU seconds of the rest of this run's processes: the jobs, the clients, the others.
        job_pids = {pid for _, pid in [*self.jobs0.values(), *jobs1.values()] if pid}
        split = {"jobs": 0.0, "clients": 0.0, "other": 0.0}
        for pid, t1 in tree1.items():
            kind = "jobs" if pid in job_pids else "clients" if pid == self.client_pid else "other"
            split[kind] += t1 - self.tree0.get(pid, 0.0)
        busy = sum(machine1) - machine1.idle - getattr(machine1, "iowait", 0.0) \
            - (sum(self.machine0) - self.machine0.idle - getattr(self.machine0, "iowait", 0.0))
        ours = cpu + sum(split.values())
        return {"wall_s": wall, "step_rate": sum(per_job.values()), "per_job_step_rate": per_job,
                "jobs_through": len(per_job), "jobs_at_start": len(self.jobs0),
                "server_cpu_s": cpu, "server_cpu_pct": 100 * cpu / wall, "server_rss_max_mb": self.rss_max / MB,
                "cpu_pct": {"server": 100 * cpu / wall, **{k: 100 * v / wall for k, v in split.items()},
                            "machine": 100 * busy / wall, "outside": 100 * max(busy - ours, 0.0) / wall},
                "timeline": self.timeline}


async def submit_all(host: str, port: int, forms: list[list], timeout: float) -> list:
    """``forms`` sent at once, one connection each: per request the job ids or the exception."""

    async def one(data):
        conn = Http(host, port)
        try:
            seconds, out = await asyncio.wait_for(call(conn, "submit", data), timeout)
            return seconds, out[0]["jobs"]
        except Exception as exc:  # noqa: BLE001 - the caller sorts the answers
            return None, exc
        finally:
            await conn.close()

    return await asyncio.gather(*(one(f) for f in forms))


def flood(ui, port: int, args) -> dict:
    """Phase C: ``--flood`` concurrent submissions (a single seed, or four) past the queue's limit."""
    store = ui.store
    before = {j.id for j in store.list(limit=10 ** 6)}
    queued_before = store.counts().get("queued", 0)
    forms, seeds = [], []
    for i in range(args.flood):
        base = 100000 + 10 * i  # seeds no other job has: no request is taken for another's double click
        wanted = [base] if i % 2 else list(range(base, base + 4))
        seeds.append(wanted)
        forms.append(form(PROMPTS[i % 2], args.steps, str(base) if i % 2 else f"{base}-{base + 3}"))
    start = time.perf_counter()
    answers = asyncio.run(submit_all("127.0.0.1", port, forms, args.timeout))
    wall = time.perf_counter() - start
    accepted, full, other, latencies = {}, [], [], []
    for i, (seconds, out) in enumerate(answers):
        if isinstance(out, list):
            latencies.append(seconds)
            if len(out) == len(seeds[i]):
                accepted[i] = out
            else:
                other.append(f"request {i}: {len(out)} ids for {len(seeds[i])} seeds")
        elif isinstance(out, CallError) and "queue is full" in str(out):
            full.append(i)
        else:
            other.append(f"request {i}: {type(out).__name__}: {out}"[:300])
    jobs = {j.id: j for j in store.list(limit=10 ** 6)}
    new = set(jobs) - before
    problems = list(other)
    if new != {i for ids in accepted.values() for i in ids}:
        problems.append(f"the table gained {len(new)} jobs; the accepted requests hold "
                        f"{sum(len(v) for v in accepted.values())}")
    for i, ids in accepted.items():  # all of a request's seeds, under the ids it was answered
        if sorted(jobs[j].params.get("seed") for j in ids if j in jobs) != seeds[i]:
            problems.append(f"request {i}: its jobs do not hold its seeds")
    rejected_seeds = {s for i in full for s in seeds[i]}
    half = [j.id for j in jobs.values() if j.id in new and j.params.get("seed") in rejected_seeds]
    if half:
        problems.append(f"{len(half)} jobs of rejected requests are in the table")
    queued_after = store.counts().get("queued", 0)
    if queued_after > args.max_queue:
        problems.append(f"{queued_after} jobs queued, over the limit of {args.max_queue}")
    return {"requests": args.flood, "jobs_asked": sum(map(len, seeds)), "max_queue": args.max_queue,
            "queued_before": queued_before, "queued_after": queued_after, "accepted_requests": len(accepted),
            "accepted_jobs": sum(len(v) for v in accepted.values()), "queue_full": len(full),
            "other_errors": len(other), "wall_s": wall, "ok": not problems, "problems": problems[:20],
            "accepted_latency": percentiles([s for s in latencies if s is not None])}


def handler_cost(ui, ids: list[str], calls: int = 100) -> dict:
    """CPU milliseconds per call of the two polled endpoints' own functions, called directly (no
    HTTP, no Gradio): the rest of a request's server CPU is the web stack's."""

    def per_call(fn, n):
        start = time.thread_time()
        for i in range(n):
            fn(i)
        return 1e3 * (time.thread_time() - start) / n

    return {"status_ms": per_call(lambda i: ui.status(ids[i % len(ids)]), calls),
            "jobs_ms": per_call(lambda i: {"jobs": ui.jobs()}, max(calls // 4, 1)),
            "jobs_in_table": len(ui.table())}


def run_phase_b(ui, port: int, ids: list[str], args) -> dict:
    out = Path(tempfile.mkstemp(prefix="tgload-clients-", suffix=".json")[1])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--client-mode", "--url", f"127.0.0.1:{port}",
           "--clients", str(args.clients), "--duration", str(args.duration), "--ids", ",".join(ids),
           "--timeout", str(args.timeout), "--client-out", str(out), "--api", args.api]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if line.strip() != "started":
            raise RuntimeError(f"the client process did not start (exit code {proc.wait()})")
        phase = Phase(ui.store, client_pid=proc.pid).start()
        time.sleep(args.duration)
        measured = phase.stop()
        proc.wait(timeout=args.timeout + 60)
        if proc.returncode:
            raise RuntimeError(f"the client process failed (exit code {proc.returncode})")
        measured["clients"] = json.loads(out.read_text())
        return measured
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.unlink(missing_ok=True)


def bench(backend: str, args) -> dict:
    from threedgen.webui.app import Settings, WebUI

    print(f"[{backend}] starting", file=sys.stderr, flush=True)
    root = Path(tempfile.mkdtemp(prefix=f"tgload-{backend}-"))
    cluster = ui = demo = None
    try:
        settings = Settings(outputs=root / "outputs", state=root / "state", overrides=list(OVERRIDES),
                            max_queued=args.max_queue, max_steps=max(args.steps, 20000))
        if backend == "local":
            settings.devices = ["cpu", "cpu"]  # two jobs at once, as on the two Ray nodes
        else:
            from local_cluster import LocalCluster  # tests/: the tests' local cluster

            cluster = LocalCluster(workers=2, cpus=1, object_store_mb=100)
            settings.backend, settings.ray_address, settings.runs = "ray", cluster.address, root / "runs"
        ui = WebUI(settings)
        port = free_port()
        demo = ui.launch(port=port, block=False)
        forms = [form(PROMPTS[i % 2], args.steps, str(i)) for i in range(args.queued)]
        ids = []
        for _, out in asyncio.run(submit_all("127.0.0.1", port, forms, args.timeout)):
            if not isinstance(out, list):
                raise RuntimeError(f"queuing the jobs failed: {out}")
            ids += out
        slots = min(2, args.queued)
        print(f"[{backend}] {len(ids)} jobs queued; waiting for {slots} to run", file=sys.stderr, flush=True)
        t = time.monotonic()
        from threedgen.jobs.store import wait_for

        wait_for(lambda: len(r := ui.store.running()) >= slots and all(j.step >= 1 for j in r), 600)
        first_step_s = time.monotonic() - t
        time.sleep(args.warmup)
        print(f"[{backend}] phase A: no clients, {args.baseline} s", file=sys.stderr, flush=True)
        a = Phase(ui.store).start()
        time.sleep(args.baseline)
        a = a.stop()
        print(f"[{backend}] phase B: {args.clients} clients, {args.duration} s", file=sys.stderr, flush=True)
        b = run_phase_b(ui, port, ids, args)
        handlers = handler_cost(ui, ids)
        print(f"[{backend}] phase C: flood of {args.flood} submissions", file=sys.stderr, flush=True)
        c = flood(ui, port, args)
        warnings = []
        if a["jobs_through"] < slots or b["jobs_through"] < slots:
            warnings.append("a job started or ended during a phase: its steps are not counted")
        if a["cpu_pct"]["outside"] > 10 or b["cpu_pct"]["outside"] > 10:
            warnings.append("other work used the machine's CPU during a phase")
        return {"backend": backend, "first_step_s": first_step_s, "no_clients": a, "clients": b, "handlers": handlers,
                "flood": c,
                "ratio": b["step_rate"] / a["step_rate"] if a["step_rate"] else None, "warnings": warnings}
    finally:
        if ui is not None:
            ui.close(demo)
            if backend == "ray":
                try:
                    ui.pool.shutdown_dispatcher()
                except Exception as exc:  # noqa: BLE001 - the cluster goes next anyway
                    print(f"[ray] stopping the dispatcher: {exc}", file=sys.stderr)
        if cluster is not None:
            cluster.close()
        shutil.rmtree(root, ignore_errors=True)


HEADER = ("| backend | clients | duration s | /status p50 ms | p99 ms | errors | server CPU % | server RSS MB "
          "| steps/s no clients | steps/s with clients | ratio |")


def row(r: dict) -> str:
    b, st = r["clients"], r["clients"]["clients"]["status"]
    return (f"| {r['backend']} | {b['clients']['clients']} | {b['wall_s']:.0f} | {st.get('p50_ms', float('nan')):.1f} "
            f"| {st.get('p99_ms', float('nan')):.1f} | {b['clients']['errors']} | {b['server_cpu_pct']:.1f} "
            f"| {b['server_rss_max_mb']:.0f} | {r['no_clients']['step_rate']:.2f} | {b['step_rate']:.2f} "
            f"| {r['ratio'] or float('nan'):.3f} |")


def details(r: dict) -> list[str]:
    a, b, c = r["no_clients"], r["clients"], r["flood"]
    cl = b["clients"]

    def split(p):
        return ", ".join(f"{k} {v:.0f}" for k, v in p["cpu_pct"].items())

    h, nan = r["handlers"], float("nan")
    # The server's CPU above its own rate without clients, per request served.
    extra = b["server_cpu_s"] - a["server_cpu_s"] / a["wall_s"] * b["wall_s"]
    return [f"- {r['backend']}: CPU % of one core without clients: {split(a)}; with clients: {split(b)}",
            f"- {r['backend']}: {cl['requests']} requests ({cl['requests'] / cl['wall_s']:.0f}/s); /status max "
            f"{cl['status'].get('max_ms', nan):.0f} ms; /jobs p50 {cl['jobs'].get('p50_ms', nan):.1f} ms, "
            f"p99 {cl['jobs'].get('p99_ms', nan):.1f} ms, max {cl['jobs'].get('max_ms', nan):.0f} ms; late ticks "
            f"{cl['late_ticks']}; server CPU above idle {1e3 * extra / max(cl['requests'], 1):.2f} ms per request; "
            f"the handlers alone: status {h['status_ms']:.2f} ms, jobs {h['jobs_ms']:.2f} ms "
            f"({h['jobs_in_table']} jobs)",
            f"- {r['backend']}: flood: {c['requests']} submissions ({c['jobs_asked']} jobs) with {c['queued_before']} "
            f"of {c['max_queue']} queued: {c['accepted_requests']} accepted ({c['accepted_jobs']} jobs), "
            f"{c['queue_full']} 'queue is full', {c['other_errors']} other errors; table "
            f"{'holds exactly the accepted jobs' if c['ok'] else 'WRONG: ' + '; '.join(c['problems'])}",
            f"- {r['backend']}: step rate with clients {100 * ((r['ratio'] or nan) - 1):+.1f} % "
            f"(goal: a drop of at most 10 %: {'met' if (r['ratio'] or 0) >= 0.9 else 'NOT met'})",
            *(f"- {r['backend']}: warning: {w}" for w in r["warnings"])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["local", "ray", "both"], default="both")
    ap.add_argument("--duration", type=float, default=300.0, help="seconds with clients (phase B)")
    ap.add_argument("--baseline", type=float, default=60.0, help="seconds without clients (phase A)")
    ap.add_argument("--warmup", type=float, default=15.0, help="seconds after both jobs' first step")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--queued", type=int, default=20, help="jobs queued (two run, the rest wait)")
    ap.add_argument("--steps", type=int, default=100000, help="steps of each job (long enough to outlast the run)")
    ap.add_argument("--max-queue", type=int, default=None, help="the server's queue limit (default: --queued + 4)")
    ap.add_argument("--flood", type=int, default=30, help="concurrent submissions in phase C")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds before a request counts as failed")
    ap.add_argument("--api", choices=["rest", "gradio"], default="rest",
                    help="rest: the polling routes /api/v1/status/ID and /api/v1/jobs (default); gradio: "
                         "Gradio's API /status and /jobs through its event queue")
    ap.add_argument("--out", default="webui_load.json")
    ap.add_argument("--client-mode", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    ap.add_argument("--client-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client_mode:
        client_main(args)
        return 0
    if args.queued < 1 or args.clients < 1:
        ap.error("--queued and --clients must be at least 1")
    if args.max_queue is None:
        args.max_queue = args.queued + 4
    if args.max_queue < args.queued:
        ap.error("--max-queue must be at least --queued")
    backends = ["local", "ray"] if args.backend == "both" else [args.backend]
    report = {"args": {k: v for k, v in vars(args).items() if k not in ("client_mode", "url", "ids", "client_out")},
              "cpus": os.cpu_count(), "load_before": os.getloadavg(), "overrides": OVERRIDES, "results": {}}
    results = []
    for backend in backends:
        results.append(bench(backend, args))
        report["results"][backend] = results[-1]
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"API: {args.api}")
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    for r in results:
        print(row(r))
    print()
    for r in results:
        print("\n".join(details(r)))
    print(f"\nwritten: {args.out}")
    failed = [r["backend"] for r in results if r["clients"]["clients"]["errors"] or not r["flood"]["ok"]]
    if failed:
        print(f"FAILED: {', '.join(failed)} (request errors or a wrong job table after the flood)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
