"""benchmarks/gpu_check.sh's table: reads the steps it recorded (``steps.tsv``) and each step's output
in ``--work``, writes ``table.md`` and ``results.json`` into ``--out`` and prints the table.

gpu_check.sh calls it with ``--partial`` after every step (so that a call cut short keeps what it
did) and once without at the end (the exit status is then 1 if a step failed). ``steps.tsv`` keeps
every call's rows: the latest row of each step is shown, marked ``earlier call`` when it comes from
a call before this one (a warm rerun with ``GPU_CHECK_STEPS``)."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

ORDER = ["install", "kernels", "model", "doctor", "image-error", "pytest-cuda", "throughput", "run-nerf",
         "run-gaussians"]
COLUMNS = ["step", "result", "seconds", "it/s", "peak VRAM GiB", "step / teacher-only floor", "image error",
           "kernel build s", "detail"]
EXTENSIONS = ("nerfacc", "gsplat")


def text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def json_or_none(s: str):
    try:
        return json.loads(s)
    except ValueError:
        return None


def latest_rows(steps_tsv: Path, run_id: str) -> list[dict]:
    """The latest recorded row of each step, in the steps' order."""
    latest = {}
    for line in text(steps_tsv).splitlines():
        run, name, result, t0, t1, rc, detail = (line.split("\t") + [""] * 7)[:7]
        if not name:
            continue
        latest[name] = {"step": name, "result": result, "seconds": round(float(t1) - float(t0), 2), "rc": int(rc),
                        "it_s": None, "peak_vram_gib": None, "ratio_to_floor": None, "image_error": None,
                        "kernel_build_seconds": None, "detail": detail, "call": run, "earlier": run != run_id}
    return [latest[n] for n in sorted(latest, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))]


def fill(row: dict, logs: Path, work: Path, device: str, run_steps: str, raw: dict) -> list[dict]:
    """The row with what the step's output says (one row, or two for throughput)."""
    name, result = row["step"], row["result"]
    stdout = text(logs / f"{name}.out")
    ran = row["rc"] != -1 and result != "SKIP"
    if name == "install" and ran:
        row["detail"] = "; ".join(line for line in stdout.splitlines() if line.strip()) or row["detail"]
    elif name == "kernels" and ran:
        statuses = {ext: json_or_none(text(logs / f"kernels-{ext}.out").strip() or "null") for ext in EXTENSIONS}
        raw["kernels"] = statuses
        row["kernel_build_seconds"] = {ext: num((s or {}).get("build_seconds")) for ext, s in statuses.items()}
        parts = [f"{ext} {s['status']} ({s['detail'][:160]})" if isinstance(s, dict) else f"{ext}: no status"
                 for ext, s in statuses.items()]
        row["detail"] = "; ".join(parts) + ("; " + row["detail"] if row["detail"] else "")
        usable = [isinstance(s, dict) and s.get("status") in ("built", "prebuilt") for s in statuses.values()]
        if device != "cpu" and result == "PASS" and not all(usable):
            row["result"] = "FAIL"
    elif name == "doctor" and ran:
        info = json_or_none(stdout)
        if not isinstance(info, dict):
            if result == "PASS":
                row["result"], row["detail"] = "FAIL", "its output is not JSON"
        else:
            raw["doctor"] = info
            ext = info.get("extensions") or {}
            status = {k: (v or {}).get("status") for k, v in ext.items()}
            row["detail"] = (", ".join(f"{k} {s}" for k, s in status.items())
                             + f"; cuda_available={info.get('cuda_available')}; nvcc {info.get('nvcc')}"
                             + ("" if info.get("nvcc_on_path", True) else " (not on PATH)")
                             + ("" if info.get("python_h", True) else "; no Python.h"))
            if device != "cpu" and result == "PASS":
                unbuilt = [k for k, s in status.items() if s not in ("built", "prebuilt")]
                if unbuilt or not info.get("cuda_available"):
                    row["result"] = "FAIL"
                    row["detail"] += "; not built: " + ", ".join(unbuilt) if unbuilt else "; no CUDA"
    elif name == "image-error":
        if result == "SKIP":
            row["image_error"] = "n/a (no CUDA)"
        elif ran:
            lines = stdout.strip().splitlines()
            err = json_or_none(lines[-1]) if lines else None
            if isinstance(err, dict) and "max_abs" in err:
                raw["image_error"] = err
                row["image_error"] = {k: err[k] for k in ("max_abs", "mean_abs", "outliers", "values")}
                row["detail"] = (f"{err['gaussians']} Gaussians, {err['images'][0]} images {err['images'][2]}x"
                                 f"{err['images'][1]}, colour and alpha; PASS: mean under {err['mean_atol']:g} and at "
                                 f"most {err['max_outlier_share']:.2%} of the values over {err['atol']:g}")
    elif name == "model" and ran:
        files = [f for f in (work / "model").rglob("*") if f.is_file()]
        size = sum(f.stat().st_size for f in files)
        row["detail"] = row["detail"] or f"{work / 'model'}: {len(files)} files, {size / 2 ** 20:.1f} MiB"
    elif name == "pytest-cuda" and ran:
        summary = next((line for line in reversed(stdout.splitlines())
                        if re.search(r"\b(passed|failed|skipped|deselected|error)", line)), "")
        row["detail"] = summary.strip("= ").strip() or row["detail"]
        if row["rc"] == 5:  # pytest: no test collected (none is marked cuda)
            row["result"], row["detail"] = "SKIP", "no test is marked cuda: " + row["detail"]
    elif name == "throughput":
        data = (json_or_none(text(work / "throughput.json")) or {}) if ran else {}
        raw["throughput"] = data or None
        by_rep = {r["representation"]: r for r in data.get("rows", [])}
        subs = []
        for rep in ("nerf", "gaussians"):
            sub = dict(row, step=f"throughput-{rep}")
            r = by_rep.get(rep)
            if r is None:
                if sub["result"] == "PASS":
                    sub["result"], sub["detail"] = "FAIL", f"no {rep} row in throughput.json"
            else:
                sub.update(seconds=round(r["seconds"], 2), it_s=num(r["it_s"]), peak_vram_gib=num(r["peak_gib"]),
                           ratio_to_floor=num(r["ratio"]))
                sub["detail"] = (f"{r['field']}{' / ' + r['sampler'] if r['sampler'] else ''}, {r['dtype']}, "
                                 f"{r['steps']} timed steps after {r['warmup']} (process {row['seconds']:.1f} s)")
            subs.append(sub)
        return subs
    elif name.startswith("run-") and ran:
        lines = [line for line in stdout.splitlines() if line.strip()]
        run_dir = Path(lines[-1].strip()) if lines else None
        status = {}
        if run_dir is not None and (run_dir / "status.json").is_file():
            status = json_or_none(text(run_dir / "status.json")) or {}
        mesh = run_dir / "mesh.glb" if run_dir is not None else None
        raw[name] = {"run_dir": str(run_dir) if run_dir else None, "status": status,
                     "mesh_glb": str(mesh) if mesh is not None and mesh.is_file() else None}
        train = num(status.get("train_seconds"))
        if train:
            row["it_s"] = round(status.get("step", 0) / train, 3)
        backends = status.get("backends")
        row["detail"] = (f"{status.get('status', 'no status.json')}, step {status.get('step')}/{run_steps}, "
                         f"train {status.get('train_seconds')} s, export {status.get('export_seconds')} s"
                         + (f", peak {status['peak_memory_mb']} MB" if status.get("peak_memory_mb") else "")
                         + (f", backends {json.dumps(backends, separators=(',', ':'))}" if backends else ""))
        problems = []
        if mesh is None or not mesh.is_file():
            problems.append("no mesh.glb")
        if status.get("status") != "succeeded" or status.get("step") != int(run_steps):
            problems.append("status.json does not say succeeded at the last step")
        if problems and result == "PASS":
            row["result"] = "FAIL"
        if problems:
            row["detail"] = "; ".join(problems) + "; " + row["detail"]
    return [row]


def cell(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


def image_cell(v):
    if isinstance(v, dict):
        return f"max {v['max_abs']:.1e}, mean {v['mean_abs']:.1e}, {v['outliers']} of {v['values']} over tol"
    return v or "-"


def build_cell(v):
    if not v:
        return "-"
    return ", ".join(f"{k} {cell(s, '{:.1f}')}" for k, s in v.items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("steps", "work", "out", "device", "tiny", "budget", "start", "python", "run-steps", "run-id"):
        ap.add_argument(f"--{name}", required=True)
    ap.add_argument("--partial", action="store_true", help="a step is still to come: the title says so")
    args = ap.parse_args(argv)
    work, out_dir = Path(args.work), Path(args.out)
    raw: dict = {}
    rows = []
    for row in latest_rows(Path(args.steps), args.run_id):
        for r in fill(row, work / "logs", work, args.device, args.run_steps, raw):
            if r["earlier"]:
                r["detail"] = f"earlier call ({r['call']}): {r['detail']}"
            rows.append(r)
    table = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [r["step"], r["result"], f"{r['seconds']:.1f}", cell(r["it_s"]), cell(r["peak_vram_gib"]),
                 cell(r["ratio_to_floor"], "{:.2f}x"), image_cell(r["image_error"]),
                 build_cell(r["kernel_build_seconds"]), r["detail"].replace("|", "/")]
        table.append("| " + " | ".join(cells) + " |")
    ok = all(r["result"] != "FAIL" for r in rows)
    total = time.time() - float(args.start)
    gpu = (raw.get("doctor") or {}).get("cuda_devices") or []
    tiny = args.tiny == "1"
    state = ("in progress" if args.partial else
             "all steps passed" if ok else "FAILED: " + ", ".join(r["step"] for r in rows if r["result"] == "FAIL"))
    title = (f"gpu_check: device {args.device}"
             f"{' (tiny pipeline: checks the code paths, measures nothing)' if tiny else ''}"
             f"{', ' + gpu[0]['name'] if gpu else ''}, {time.strftime('%Y-%m-%d %H:%M')}, "
             f"{total:.0f} s of a {args.budget} s budget: {state}")
    md = title + "\n\n" + "\n".join(table) + "\n"
    meshes = {rep: str(out_dir / f"{rep}.glb") for rep in ("nerf", "gaussians") if (out_dir / f"{rep}.glb").is_file()}
    results = {"ok": ok, "complete": not args.partial, "device": args.device, "tiny": tiny, "python": args.python,
               "budget_s": int(args.budget), "total_seconds": round(total, 1), "columns": COLUMNS, "steps": rows,
               "raw": raw, "meshes": meshes, "out": str(out_dir), "work": str(work)}
    for name, content in (("table.md", md), ("results.json", json.dumps(results, indent=1) + "\n")):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(content)
        tmp.replace(out_dir / name)
    print()
    print(md)
    print(f"table, results.json and steps.log: {out_dir}; pipeline, runs and step outputs: {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
