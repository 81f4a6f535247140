#!/usr/bin/env bash
# One command for a GPU machine: install the carried wheels, build and report the CUDA kernels, run
# the CUDA-only tests, time SDS on NeRF and Gaussians, make a mesh with each, compare gsplat's image
# with the CPU rasteriser's; then print one markdown table and exit non-zero if any step failed.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--tiny] [--device cpu|cuda] [--out DIR] [--work DIR]
#
#   --device cuda (default)  first installs .whl/*.whl (benchmarks/make_wheels.sh makes it; or
#                            $GPU_CHECK_WHEELS/*.whl) with pip --no-index --no-deps --target /tmp/site
#                            ($GPU_CHECK_SITE), and puts that folder on PYTHONPATH
#   --device cpu             uses the current Python as it is ($PYTHON, else .venv/bin/python, else python3)
#   --tiny                   the tests' tiny random pipeline and a few steps instead of a random-weight
#                            Stable Diffusion 2.1 base (fp16 on CUDA) and 200-step runs
#   --dry-run                --tiny --device cpu: every step's plumbing on a CPU in a minute or two
#   --out DIR                table.md, results.json (every step, raw) and steps.log (each step's output)
#                            go here (default: a new temporary folder, printed)
#   --work DIR               the pipeline (2.4 GiB at full size), the run folders and each step's own
#                            output (default: a new temporary folder, printed)
#
# Steps, in order, each under `timeout`, timed, recorded PASS/FAIL/SKIP; a failing step does not stop
# the later ones, and all of them share one budget (GPU_CHECK_BUDGET_S, 480 s; a step that finds it
# spent is recorded FAIL, not run). GPU_CHECK_TP_STEPS (100) and GPU_CHECK_RUN_STEPS (200; --tiny: 4)
# set the timed throughput steps and the run length.
#   install               the wheels (skipped with --device cpu); where the tree's threedgen sources
#                         differ from the threedgen wheel's, the tree's are copied over them
#   doctor                threedgen doctor --build --json: builds gsplat's and nerfacc's kernels
#   image-error           one scene through rasterize_pytorch and rasterize_gsplat: max/mean |diff|
#                         of colour and alpha (PASS under 1e-3; n/a without CUDA)
#   pytest-cuda           python -m pytest -q -m cuda tests
#   model                 the pipeline, saved in the diffusers layout (gpu_throughput.py --save-model)
#   throughput            gpu_throughput.py, one process, a row each for nerf and gaussians: it/s,
#                         peak VRAM, step time over the teacher-only floor (the NeRF timed after
#                         nerfacc's 256-step occupancy-grid warm-up)
#   run-nerf              threedgen run --prior <model> ... through export: mesh.glb, status.json
#   run-gaussians
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
[[ -n ${EPOCHREALTIME:-} ]] || { echo "gpu_check.sh: needs bash 5 (EPOCHREALTIME)" >&2; exit 2; }
export LC_NUMERIC=C  # EPOCHREALTIME with a decimal point

TINY=0
DEVICE=cuda
OUT_DIR=""
WORK=""
while (($#)); do
    case "$1" in
        --dry-run) TINY=1; DEVICE=cpu ;;
        --tiny) TINY=1 ;;
        --device) DEVICE="${2:?--device needs cpu or cuda}"; shift ;;
        --device=*) DEVICE="${1#--device=}" ;;
        --out) OUT_DIR="${2:?--out needs a folder}"; shift ;;
        --out=*) OUT_DIR="${1#--out=}" ;;
        --work) WORK="${2:?--work needs a folder}"; shift ;;
        --work=*) WORK="${1#--work=}" ;;
        -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
case "$DEVICE" in
    cpu|cuda|cuda:[0-9]*) ;;
    *) echo "gpu_check.sh: --device must be cpu or cuda, not $DEVICE" >&2; exit 2 ;;
esac

[[ -n $OUT_DIR ]] || OUT_DIR="$(mktemp -d "${TMPDIR:-/tmp}/threedgen-gpu-check-XXXXXX")"
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
[[ -n $WORK ]] || WORK="$(mktemp -d "${TMPDIR:-/tmp}/threedgen-gpu-check-work-XXXXXX")"
mkdir -p "$WORK/logs" || exit 2
WORK="$(cd "$WORK" && pwd)"
: >"$OUT_DIR/steps.log"
STEPS="$WORK/steps.tsv"
: >"$STEPS"

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
SITE="${GPU_CHECK_SITE:-/tmp/site}"
WHEELS="${GPU_CHECK_WHEELS:-$ROOT/.whl}"
BUDGET="${GPU_CHECK_BUDGET_S:-480}"
START=$EPOCHREALTIME
DEADLINE=$(( ${START%.*} + BUDGET ))

if [[ -n ${PYTHON:-} ]]; then PY="$PYTHON"
elif [[ $DEVICE == cpu && -x $ROOT/.venv/bin/python ]]; then PY="$ROOT/.venv/bin/python"
else PY=python3
fi
# -P: the tree's threedgen/ folder must not shadow the installed package (it holds no
# threedgen.representations: pyproject maps those folders in).
if "$PY" -P -c "" 2>/dev/null; then PYP=("$PY" -P); else PYP=("$PY"); fi

if ((TINY)); then
    TP_ARGS=(--tiny --steps 2 --warmup 1 --repeats 1)
    RUN_STEPS="${GPU_CHECK_RUN_STEPS:-4}"
    RUN_ARGS=(export.resolution=40 export.video_frames=2 export.video_resolution=32 export.texture_size=64
              checkpoint_every=1000 preview_every=1000)
    # small renders and scenes: the code paths, fast on a CPU
    SMALL_nerf=(render.resolution=32 render.coarse_resolution=0 representation.num_samples=16)
    SMALL_gaussians=(render.resolution=32 render.coarse_resolution=0 representation.num_points=200)
    CAP_DOCTOR=120 CAP_TESTS=120 CAP_MODEL=60 CAP_TP=120 CAP_RUN=90 CAP_IMAGE=60
else
    TP_ARGS=(--steps "${GPU_CHECK_TP_STEPS:-100}" --warmup 20 --repeats 1)
    RUN_STEPS="${GPU_CHECK_RUN_STEPS:-200}"
    RUN_ARGS=()
    SMALL_nerf=() SMALL_gaussians=()
    CAP_DOCTOR=300 CAP_TESTS=180 CAP_MODEL=180 CAP_TP=300 CAP_RUN=180 CAP_IMAGE=90
fi

# record NAME RESULT START END RC DETAIL  (one tab-separated line; the assembler adds the rest)
record() {
    local detail="${6//[$'\t\n\r']/ }"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$detail" >>"$STEPS"
    printf '[gpu_check] %-21s %-4s rc=%-3s %s\n' "$1" "$2" "$5" "$detail"
}

# step NAME CAP_SECONDS COMMAND...: runs COMMAND under timeout (the cap, or what is left of the
# budget), stdout to logs/NAME.out, stderr to logs/NAME.err; PASS when it exits 0 (the assembler
# looks closer at some steps).
step() {
    local name=$1 cap=$2 t0 t1 rc left
    shift 2
    left=$(( DEADLINE - ${EPOCHREALTIME%.*} ))
    if (( left < 5 )); then
        record "$name" FAIL "$EPOCHREALTIME" "$EPOCHREALTIME" -1 "not run: the ${BUDGET} s budget is spent"
        return 1
    fi
    (( cap > left )) && cap=$left
    t0=$EPOCHREALTIME
    timeout --kill-after=15 "$cap" "$@" >"$WORK/logs/$name.out" 2>"$WORK/logs/$name.err" </dev/null
    rc=$?
    t1=$EPOCHREALTIME
    {
        local cmd="$*"
        printf '===== %s (rc %s): %s\n' "$name" "$rc" "${cmd:0:400}"
        cat "$WORK/logs/$name.out"
        printf -- '----- stderr\n'
        tail -n 200 "$WORK/logs/$name.err"
    } >>"$OUT_DIR/steps.log"
    local result=PASS detail=""
    if (( rc == 124 || rc == 137 )); then result=FAIL; detail="timed out after ${cap} s"
    elif (( rc != 0 )); then result=FAIL; detail="$(grep -v '^\s*$' "$WORK/logs/$name.err" | tail -n 1 | cut -c1-200)"
    fi
    record "$name" "$result" "$t0" "$t1" "$rc" "$detail"
}

# ---- install --------------------------------------------------------------------------------
if [[ $DEVICE == cpu ]]; then
    record install SKIP "$EPOCHREALTIME" "$EPOCHREALTIME" 0 "--device cpu: the current Python ($PY) as it is"
elif ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    record install FAIL "$EPOCHREALTIME" "$EPOCHREALTIME" 1 "no $WHEELS/*.whl: run bash benchmarks/make_wheels.sh where PyPI is reachable"
else
    # Is the installed threedgen wheel this tree? If not (the tree changed since make_wheels.sh),
    # copy the tree's sources over it: a pure-Python package, laid out as pyproject's package-dir says.
    SYNC_PY='
import shutil
import sys
from pathlib import Path

root, site = Path(sys.argv[1]), Path(sys.argv[2])
folders = {"threedgen": "threedgen", "representations": "threedgen/representations",
           "guidance": "threedgen/guidance", "webui": "threedgen/webui", "configs": "threedgen/configs"}
changed, removed = [], []
for src, dst in folders.items():
    for f in sorted((root / src).rglob("*")):
        if f.suffix not in (".py", ".yaml") or "__pycache__" in f.parts:
            continue
        installed = site / dst / f.relative_to(root / src)
        if not installed.is_file() or installed.read_bytes() != f.read_bytes():
            installed.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, installed)
            changed.append(str(f.relative_to(root)))
    for f in sorted((site / dst).rglob("*")):
        rel = f.relative_to(site / dst)
        if (f.suffix in (".py", ".yaml") and "__pycache__" not in f.parts and not (root / src / rel).exists()
                and not (src == "threedgen" and rel.parts[0] in folders)):
            f.unlink()
            removed.append(str(Path(src) / rel))
if changed or removed:
    shown = ", ".join((changed + removed)[:4])
    print(f"the threedgen wheel was older than the tree: {len(changed)} files copied from it, {len(removed)} removed ({shown})")
else:
    print("the threedgen wheel matches the tree")
'
    install_wheels() {
        "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$SITE" "$WHEELS"/*.whl || return 1
        echo "$(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE"
        "$PY" -c "$SYNC_PY" "$ROOT" "$SITE"
    }
    export -f install_wheels
    export PY SITE ROOT WHEELS SYNC_PY
    step install 240 bash -c install_wheels
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

# ---- doctor ---------------------------------------------------------------------------------
step doctor "$CAP_DOCTOR" "${PYP[@]}" -m threedgen.cli doctor --build --json

# ---- image error: rasterize_pytorch against rasterize_gsplat --------------------------------
IMAGE_PY='
import json, sys
import torch
from threedgen.cameras import Cameras
from threedgen.representations import splatting

device = sys.argv[1]
if not torch.cuda.is_available():
    sys.exit("CUDA is not available")
g = torch.Generator().manual_seed(0)
n, H, W = 1000, 96, 128
means = (torch.rand(n, 3, generator=g) - 0.5) * 0.8
quats = torch.randn(n, 4, generator=g)
scales = 0.01 + 0.08 * torch.rand(n, 3, generator=g)
opacities = 0.02 + 0.97 * torch.rand(n, generator=g)
colors = torch.rand(n, 3, generator=g)
scene = [t.to(device) for t in (means, quats, scales, opacities, colors)]
cams = Cameras.from_angles([15.0, -5.0], [30.0, 200.0], 2.5, 40.0, [[0.2, 0.5, 0.9], [1.0, 1.0, 1.0]]).to(device)
viewmats, Ks = splatting.camera_matrices(cams.c2w, cams.fovy, H, W)
args = (*scene, viewmats, Ks, W, H)
with torch.no_grad():
    mine = splatting.rasterize_pytorch(*args, backgrounds=cams.background)
    theirs = splatting.rasterize_gsplat(*args, backgrounds=cams.background)
diff = torch.cat([(mine[0] - theirs[0]).abs().flatten(), (mine[1] - theirs[1]).abs().flatten()]).double()
out = {"gaussians": n, "images": [len(cams), H, W], "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
       "coverage": float(mine[1].mean())}
print(json.dumps(out))
sys.exit(0 if out["max_abs"] < 1e-3 else 1)
'
if [[ $DEVICE == cpu ]]; then
    record image-error SKIP "$EPOCHREALTIME" "$EPOCHREALTIME" 0 "n/a (no CUDA)"
else
    step image-error "$CAP_IMAGE" "${PYP[@]}" -c "$IMAGE_PY" "$DEVICE"
fi

# ---- the CUDA-only tests --------------------------------------------------------------------
step pytest-cuda "$CAP_TESTS" "${PYP[@]}" -m pytest -q -m cuda -p no:cacheprovider --continue-on-collection-errors tests

# ---- the pipeline, then throughput and one run on each representation ----------------------
TINY_FLAG=()
((TINY)) && TINY_FLAG=(--tiny)
step model "$CAP_MODEL" "${PYP[@]}" benchmarks/gpu_throughput.py "${TINY_FLAG[@]}" --save-model "$WORK/model"
# one process for both (one pipeline load); a row each, with its own seconds
step throughput "$CAP_TP" "${PYP[@]}" benchmarks/gpu_throughput.py "${TP_ARGS[@]}" --model "$WORK/model" \
    --device "$DEVICE" --representations nerf gaussians --json "$WORK/throughput.json" \
    "${SMALL_nerf[@]/#/nerf:}" "${SMALL_gaussians[@]/#/gaussians:}"
for rep in nerf gaussians; do
    declare -n small="SMALL_$rep"
    step "run-$rep" "$CAP_RUN" "${PYP[@]}" -m threedgen.cli run --prior "$WORK/model" --guidance sds \
        --representation "$rep" --steps "$RUN_STEPS" --seed 0 --prompt "a hamburger" --out "$WORK/runs-$rep" \
        --device "$DEVICE" --no-progress "${RUN_ARGS[@]}" "${small[@]}"
    unset -n small
done

# ---- one table and the raw JSON -------------------------------------------------------------
"$PY" - "$STEPS" "$WORK" "$OUT_DIR" "$DEVICE" "$TINY" "$BUDGET" "$START" "$PY" "$RUN_STEPS" <<'EOF'
import json
import math
import re
import sys
import time
from pathlib import Path

steps_tsv, work, out_dir, device, tiny, budget, start, python, run_steps = sys.argv[1:]
work, out_dir = Path(work), Path(out_dir)
logs = work / "logs"


def text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


rows, raw = [], {}
for line in Path(steps_tsv).read_text().splitlines():
    name, result, t0, t1, rc, detail = (line.split("\t") + [""] * 6)[:6]
    row = {"step": name, "result": result, "seconds": round(float(t1) - float(t0), 2), "rc": int(rc),
           "it_s": None, "peak_vram_gib": None, "ratio_to_floor": None, "image_error": None,
           "kernel_build_seconds": None, "detail": detail}
    stdout = text(logs / f"{name}.out")
    ran = row["rc"] != -1 and result != "SKIP"
    if name == "install" and ran:
        row["detail"] = "; ".join(l for l in stdout.splitlines() if l.strip()) or row["detail"]
    elif name == "doctor" and ran:
        try:
            info = json.loads(stdout)
        except ValueError:
            info = None
            if result == "PASS":
                row["result"], row["detail"] = "FAIL", "its output is not JSON"
        if isinstance(info, dict):
            raw["doctor"] = info
            ext = info.get("extensions") or {}
            row["kernel_build_seconds"] = {k: num((v or {}).get("build_seconds")) for k, v in ext.items()}
            status = {k: (v or {}).get("status") for k, v in ext.items()}
            row["detail"] = ", ".join(f"{k} {s}" for k, s in status.items()) + f"; cuda_available={info.get('cuda_available')}"
            if device != "cpu" and result == "PASS":
                unbuilt = [k for k, s in status.items() if s not in ("built", "prebuilt")]
                if unbuilt or not info.get("cuda_available"):
                    row["result"] = "FAIL"
                    row["detail"] += "; not built: " + ", ".join(unbuilt) if unbuilt else "; no CUDA"
    elif name == "image-error":
        if result == "SKIP":
            row["image_error"] = "n/a (no CUDA)"
        elif ran:
            try:
                err = json.loads(stdout.strip().splitlines()[-1])
                raw["image_error"] = err
                row["image_error"] = {"max_abs": err["max_abs"], "mean_abs": err["mean_abs"]}
                row["detail"] = (f"{err['gaussians']} Gaussians, {err['images'][0]} images {err['images'][2]}x"
                                 f"{err['images'][1]}, colour and alpha; PASS under 1e-3")
            except (ValueError, IndexError, KeyError):
                pass
    elif name == "model" and ran:
        files = [f for f in (work / "model").rglob("*") if f.is_file()]
        size = sum(f.stat().st_size for f in files)
        row["detail"] = row["detail"] or f"{work / 'model'}: {len(files)} files, {size / 2 ** 20:.1f} MiB"
    elif name == "pytest-cuda" and ran:
        summary = next((l for l in reversed(stdout.splitlines()) if re.search(r"\b(passed|failed|skipped|deselected|error)", l)), "")
        row["detail"] = summary.strip("= ").strip() or row["detail"]
        if row["rc"] == 5:  # pytest: no test collected (none is marked cuda)
            row["result"], row["detail"] = "SKIP", "no test is marked cuda: " + row["detail"]
    elif name == "throughput":
        try:
            data = json.loads(text(work / "throughput.json")) if ran else {}
        except ValueError:
            data = {}
        raw["throughput"] = data or None
        by_rep = {r["representation"]: r for r in data.get("rows", [])}
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
            rows.append(sub)
        continue
    elif name.startswith("run-") and ran:
        lines = [l for l in stdout.splitlines() if l.strip()]
        run_dir = Path(lines[-1].strip()) if lines else None
        status = {}
        if run_dir is not None and (run_dir / "status.json").is_file():
            status = json.loads(text(run_dir / "status.json"))
        mesh = run_dir / "mesh.glb" if run_dir is not None else None
        raw[name] = {"run_dir": str(run_dir) if run_dir else None, "status": status,
                     "mesh_glb": str(mesh) if mesh is not None and mesh.is_file() else None}
        train = num(status.get("train_seconds"))
        if train:
            row["it_s"] = round(status.get("step", 0) / train, 3)
        backends = status.get("backends")
        row["detail"] = (f"{status.get('status', 'no status.json')}, step {status.get('step')}/{run_steps}, "
                         f"train {status.get('train_seconds')} s, export {status.get('export_seconds')} s"
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
    rows.append(row)


def cell(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


def image_cell(v):
    if isinstance(v, dict):
        return f"max {v['max_abs']:.1e}, mean {v['mean_abs']:.1e}"
    return v or "-"


def build_cell(v):
    if not v:
        return "-"
    return ", ".join(f"{k} {cell(s, '{:.1f}')}" for k, s in v.items())


header = ["step", "result", "seconds", "it/s", "peak VRAM GiB", "step / teacher-only floor", "image error",
          "kernel build s", "detail"]
table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
for r in rows:
    cells = [r["step"], r["result"], f"{r['seconds']:.1f}", cell(r["it_s"]), cell(r["peak_vram_gib"]),
             cell(r["ratio_to_floor"], "{:.2f}x"), image_cell(r["image_error"]), build_cell(r["kernel_build_seconds"]),
             r["detail"].replace("|", "/")]
    table.append("| " + " | ".join(cells) + " |")
ok = all(r["result"] != "FAIL" for r in rows)
total = time.time() - float(start)
gpu = (raw.get("doctor") or {}).get("cuda_devices") or []
title = (f"gpu_check: device {device}{' (tiny pipeline: checks the code paths, measures nothing)' if tiny == '1' else ''}"
         f"{', ' + gpu[0]['name'] if gpu else ''}, {time.strftime('%Y-%m-%d %H:%M')}, {total:.0f} s of a {budget} s budget: "
         f"{'all steps passed' if ok else 'FAILED: ' + ', '.join(r['step'] for r in rows if r['result'] == 'FAIL')}")
md = title + "\n\n" + "\n".join(table) + "\n"
results = {"ok": ok, "device": device, "tiny": tiny == "1", "python": python, "budget_s": int(budget),
           "total_seconds": round(total, 1), "columns": header, "steps": rows, "raw": raw,
           "out": str(out_dir), "work": str(work)}
(out_dir / "table.md").write_text(md)
(out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
print()
print(md)
print(f"table, results.json and steps.log: {out_dir}; pipeline, runs and step outputs: {work}")
sys.exit(0 if ok else 1)
EOF
