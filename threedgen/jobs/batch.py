"""`threedgen batch PROMPTS.txt`: many prompts as jobs of the durable job table, on either backend.

A batch file holds one job per line: the prompt, then optional flags and ``key=value`` settings::

    # comments and blank lines are skipped
    a red cube
    a blue torus --guidance vsd --seed 3
    "a green house" --representation gaussians guidance.guidance_scale=50

The prompt is the text before the first `` --`` (or a quoted first word); a ``key=value`` setting
comes after a flag. Every line is checked as `threedgen run` checks its input before anything is
queued, and the jobs are queued in one transaction: all of them or none.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Optional

from threedgen.errors import UserError
from threedgen.jobs.store import Job, JobStore
from threedgen.request import RunRequest
from threedgen.rundir import RunFolder, atomic_write_text

MAX_FILE_BYTES = 10 * 1024 * 1024
MAX_PROMPT_CHARS = 1000
FINAL = ("succeeded", "failed", "cancelled", "interrupted")
_OPTION = re.compile(r"(?:^|\s)--?[A-Za-z]")


class _LineParser(argparse.ArgumentParser):
    def error(self, message):  # a one-line UserError, not argparse's usage text and exit
        raise UserError(message)


def _line_parser() -> _LineParser:
    p = _LineParser(add_help=False, allow_abbrev=False, prog="line")
    p.add_argument("--guidance")
    p.add_argument("--representation")
    p.add_argument("--prior")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--resolution", type=int)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def split_line(line: str) -> tuple[str, list[str]]:
    """``(prompt, the rest as argv)`` of one batch line."""
    if line[:1] in ("'", '"'):
        tokens = shlex.split(line)
        return tokens[0], tokens[1:]
    match = _OPTION.search(line)
    if match is None:
        return line.strip(), []
    return line[:match.start()].strip(), shlex.split(line[match.start():])


def read_batch(path: str | Path, defaults: dict, set_overrides: list[str], max_jobs: int) -> list[tuple[int, RunRequest]]:
    """Every job of a batch file as ``(line number, run request)``, each checked as `threedgen run`
    checks it; the first bad line is a one-line UserError naming it."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise UserError(f"{path} is over {MAX_FILE_BYTES // 1024 // 1024} MB; a batch file holds one prompt per line")
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read the batch file {path} ({exc.strerror or exc})") from None
    if b"\0" in data:
        raise UserError(f"{path} is not a text file (it holds NUL bytes); a batch file holds one prompt per line")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte {exc.start}); a batch file holds one prompt per line") from None
    parser, configs = _line_parser(), {}
    jobs: list[tuple[int, dict]] = []
    lines = [(n, raw.strip()) for n, raw in enumerate(text.splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if not lines:
        raise UserError(f"{path} holds no prompts (one prompt per line; # starts a comment)")
    if len(lines) > max_jobs:
        raise UserError(f"{path} holds {len(lines)} prompts; a batch queues at most {max_jobs} (--max-queue); "
                        "split the file, or raise --max-queue")
    for n, line in lines:
        try:
            prompt, argv = split_line(line)
            if not prompt:
                raise UserError("the line has no prompt before its options")
            if len(prompt) > MAX_PROMPT_CHARS:
                raise UserError(f"the prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
            args = parser.parse_args(argv)
            bad = [o for o in args.overrides if "=" not in o]
            if bad:
                raise UserError(f"{bad[0]!r} is neither a flag nor a key=value setting")
            request = RunRequest(
                prompt=prompt,
                negative_prompt=args.negative_prompt if args.negative_prompt is not None
                else defaults.get("negative_prompt") or "",
                guidance=args.guidance or defaults["guidance"],
                representation=args.representation or defaults["representation"],
                prior=args.prior or defaults["prior"],
                steps=args.steps if args.steps is not None else defaults.get("steps"),
                seed=args.seed if args.seed is not None else defaults.get("seed", 0),
                resolution=args.resolution,
                overrides=(*set_overrides, *args.overrides),
            )
            cfg = _checked_config(request, configs)  # every check of `threedgen run`
        except UserError as exc:
            raise UserError(f"{path}, line {n}: {exc}") from None
        except ValueError as exc:
            raise UserError(f"{path}, line {n}: {exc}") from None
        jobs.append((n, request.replace(prompt=cfg.prompt, negative_prompt=cfg.negative_prompt, steps=cfg.steps)))
    return jobs


def _checked_config(request: RunRequest, cache: dict):
    """``request.to_config()``: merged once per distinct set of settings (the slow part, ~18 ms);
    a line that differs only in its prompt, negative prompt or seed reruns the config's checks
    (``check``: the prompt and the prior's checks of the run) on a copy, so 10,000 lines check in
    seconds."""
    key = json.dumps({k: v for k, v in request.to_dict().items() if k not in ("prompt", "negative_prompt", "seed")},
                     sort_keys=True)
    if key not in cache:
        cache[key] = request.to_config("cpu")
        return copy.deepcopy(cache[key])
    cfg = copy.deepcopy(cache[key])
    cfg.prompt, cfg.negative_prompt, cfg.seed = request.prompt, request.negative_prompt, int(request.seed)
    cfg.check(True)
    return cfg


# ---- the record of a batch ------------------------------------------------------------------------

def batches_dir(state: Path) -> Path:
    return Path(state) / "batches"


def save_batch(state: Path, record: dict) -> None:
    folder = batches_dir(state)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / f"{record['batch']}.json", json.dumps(record, indent=1))
    atomic_write_text(folder / "last", record["batch"])


def load_batch(state: Path, batch_id: Optional[str] = None) -> dict:
    folder = batches_dir(state)
    try:
        batch_id = batch_id or (folder / "last").read_text().strip()
        if not re.fullmatch(r"[0-9a-f]{8}", batch_id):
            raise UserError(f"unknown batch id {batch_id[:20]!r} (8 hexadecimal characters)")
        return json.loads((folder / f"{batch_id}.json").read_text())
    except OSError:
        raise UserError(f"no batch recorded in {Path(state)} (give the same --state as when it was queued)") from None


def job_entry(job: Job, line: int) -> dict:
    metrics = None
    if job.status == "succeeded" and job.run_dir:
        metrics = RunFolder(job.run_dir).read_metrics()
    p = job.params
    return {"id": job.id, "line": line, "prompt": p.get("prompt"), "guidance": p.get("guidance"),
            "representation": p.get("representation"), "prior": p.get("prior"), "seed": p.get("seed"),
            "status": job.status, "step": job.step, "max_steps": job.max_steps, "error": job.error,
            "run_dir": job.run_dir, "node": job.node, "restarts": job.restarts, "metrics": metrics}


def write_report(store: JobStore, record: dict, path: Path) -> dict:
    jobs = {j.id: j for j in store.many(record["ids"])}
    entries = [job_entry(jobs[i], line) for i, line in zip(record["ids"], record["lines"]) if i in jobs]
    counts = dict(Counter(e["status"] for e in entries))
    report = {"batch": record["batch"], "file": record["file"], "backend": record["backend"],
              "state": record["state"], "written": time.strftime("%Y-%m-%dT%H:%M:%S"), "counts": counts, "jobs": entries}
    atomic_write_text(Path(path), json.dumps(report, indent=1))
    return report


# ---- watching -------------------------------------------------------------------------------------

class Watcher:
    """One progress bar over the batch's jobs and a live line per running job (plain event lines
    when stderr is not a terminal)."""

    def __init__(self, store: JobStore, ids: list[str], stream=None):
        from tqdm import tqdm  # only while watching

        self.tqdm, self.store, self.ids = tqdm, store, ids
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.bar = tqdm(total=len(ids), unit="job", desc="batch", file=self.stream, disable=not self.live,
                        dynamic_ncols=True)
        self.lines: dict[str, object] = {}
        self.seen: dict[str, str] = {}

    def update(self) -> list[Job]:
        jobs = self.store.many(self.ids)
        done = sum(j.status in FINAL for j in jobs)
        if self.live:
            self.bar.n = done
            self.bar.set_postfix_str(f"{sum(j.status == 'running' for j in jobs)} running")
            for job in jobs:
                line = self.lines.get(job.id)
                if job.status == "running" and line is None:
                    line = self.lines[job.id] = self.tqdm(total=job.max_steps or 1, unit="step", leave=False,
                                                          file=self.stream, dynamic_ncols=True)
                if line is not None:
                    if job.status != "running":
                        line.close()
                        del self.lines[job.id]
                        continue
                    line.total = job.max_steps or 1
                    line.n = job.step
                    line.set_description_str(f"{job.id} {job.params.get('prompt', '')[:28]}"
                                             + (f" @ {job.node.split()[0]}" if job.node else ""))
                    line.refresh()
            self.bar.refresh()
        for job in jobs:
            if self.seen.get(job.id) != job.status:
                self.seen[job.id] = job.status
                if job.status in FINAL or (job.status == "running" and not self.live):
                    self._say(f"{job.id} {job.params.get('prompt')!r} seed {job.params.get('seed')}: {job.status}"
                              + (f" ({job.error})" if job.error else "") + f" [{done}/{len(jobs)} done]")
        return jobs

    def _say(self, text: str) -> None:
        if self.live:
            self.bar.write(text, file=self.stream)
        else:
            print(f"threedgen batch: {text}", file=self.stream, flush=True)

    def close(self) -> None:
        for line in self.lines.values():
            line.close()
        self.bar.close()


def watch(store: JobStore, ids: list[str], poll_s: float = 0.5, stream=None) -> list[Job]:
    """Until every job of ``ids`` has a final status (an interrupted job the cluster queues again
    is not final); KeyboardInterrupt passes through."""
    watcher = Watcher(store, ids, stream)
    try:
        while True:
            jobs = watcher.update()
            if all(j.status in FINAL for j in jobs):
                return jobs
            time.sleep(poll_s)
    finally:
        watcher.close()


def new_batch_id() -> str:
    return uuid.uuid4().hex[:8]


def format_status(store: JobStore, record: dict) -> str:
    jobs = {j.id: j for j in store.many(record["ids"])}
    rows = [f"batch {record['batch']} ({record['file']}, backend {record['backend']}): "
            + ", ".join(f"{n} {s}" for s, n in sorted(Counter(j.status for j in jobs.values()).items()))]
    for job_id, line in zip(record["ids"], record["lines"]):
        job = jobs.get(job_id)
        if job is None:
            continue
        where = f" on {job.node}" if job.node else ""
        rows.append(f"  line {line:>4}  {job.id}  {job.status:<11} {job.step:>6}/{job.max_steps:<6}{where}  "
                    f"{job.params.get('prompt')!r} seed {job.params.get('seed')}"
                    + (f"  ({job.error})" if job.error else ""))
    return "\n".join(rows)

