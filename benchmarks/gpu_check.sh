#!/usr/bin/env bash
# One command for a GPU machine: install the carried wheels, build gsplat's and nerfacc's CUDA kernels
# (both at once, beside the model step), report them, compare gsplat's image with the CPU rasteriser's,
# run the CUDA-only tests, time SDS on NeRF and Gaussians, make a mesh with each; one markdown table,
# rewritten after every step, and a non-zero exit if any step failed.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--tiny] [--device cpu|cuda] [--out DIR] [--work DIR]
#
#   --out DIR                table.md, results.json, steps.log and the two runs' meshes (nerf.glb,
#                            gaussians.glb) go here, rewritten after every step; default $OUT (what a
#                            device call brings back); one of the two is required
#   --work DIR               the pipeline (2.4 GiB at full size), run folders and step logs (default: a
#                            new temporary folder); a second call with the same --work reuses the
#                            saved pipeline and shows the earlier call's rows for steps it does not run
#   --device cuda (default)  first installs .whl/*.whl (benchmarks/make_wheels.sh makes it; or
#                            $GPU_CHECK_WHEELS/*.whl) with pip --no-index --no-deps --target /tmp/site
#                            ($GPU_CHECK_SITE), and puts that folder on PYTHONPATH
#   --device cpu             uses the current Python as it is ($PYTHON, else .venv/bin/python, else python3)
#   --tiny                   the tests' tiny random pipeline and a few steps instead of a random-weight
#                            Stable Diffusion 2.1 base (fp16 on CUDA) and 200-step runs
#   --dry-run                --tiny --device cpu: every step's plumbing on a CPU in a minute or two
#
# Environment: GPU_CHECK_BUDGET_S (450) is the budget every step shares: a step that finds it spent
# is recorded FAIL, not run. GPU_CHECK_STEPS=a,b,... runs only those steps (names below; `throughput`
# for both throughput rows), e.g. on a still-warm machine after a timeout. GPU_CHECK_TP_STEPS (60)
# and GPU_CHECK_RUN_STEPS (200; --tiny: 4) set the timed throughput steps and the run length.
# MAX_JOBS (the machine's cores) and TORCH_CUDA_ARCH_LIST (the GPUs' compute capability) are fixed
# once here for every step, so that no step sees other build flags and rebuilds the kernels.
#
# Steps, in order, each under `timeout`, timed, recorded PASS/FAIL/SKIP; a failing step does not stop
# the later ones:
#   install               the wheels (SKIP with --device cpu); where the tree's threedgen sources
#                         differ from the threedgen wheel's, the tree's are copied over them
#   kernels               gsplat's and nerfacc's kernels, each built in its own process, both started
#                         before `model` and waited for after it (threedgen.kernels: under a lock, a
#                         failed or killed build is reported, not tried again)
#   model                 the pipeline, saved in the diffusers layout (gpu_throughput.py --save-model);
#                         reused when --work already holds it
#   doctor                threedgen doctor --build --json: what a run will use (built: loads them)
#   image-error           gpu_image_error.py: one scene through rasterize_pytorch and rasterize_gsplat;
#                         PASS on a mean bound and a bounded share of outlier values (n/a without CUDA)
#   pytest-cuda           python -m pytest -q -m cuda tests
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

ALL_STEPS="install kernels model doctor image-error pytest-cuda throughput run-nerf run-gaussians"
TINY=0
DEVICE=cuda
OUT_DIR="${OUT:-}"
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
        -h|--help) sed -n '2,48p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
case "$DEVICE" in
    cpu|cuda|cuda:[0-9]*) ;;
    *) echo "gpu_check.sh: --device must be cpu or cuda, not $DEVICE" >&2; exit 2 ;;
esac
[[ -n $OUT_DIR ]] || { echo "gpu_check.sh: say where the table goes: --out DIR (or set OUT)" >&2; exit 2; }
SELECTED=" $ALL_STEPS "
if [[ -n ${GPU_CHECK_STEPS:-} ]]; then
    SELECTED=" ${GPU_CHECK_STEPS//,/ } "
    for s in $SELECTED; do
        [[ " $ALL_STEPS " == *" $s "* ]] || { echo "gpu_check.sh: GPU_CHECK_STEPS: no step $s (steps: ${ALL_STEPS// /, })" >&2; exit 2; }
    done
fi
selected() { [[ $SELECTED == *" $1 "* ]]; }

mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
[[ -n $WORK ]] || WORK="$(mktemp -d "${TMPDIR:-/tmp}/threedgen-gpu-check-work-XXXXXX")"
mkdir -p "$WORK/logs" || exit 2
WORK="$(cd "$WORK" && pwd)"
STEPS="$WORK/steps.tsv"  # every call's rows: a call with GPU_CHECK_STEPS shows the earlier rows of the others
[[ -n ${GPU_CHECK_STEPS:-} ]] || : >"$STEPS"
touch "$STEPS" "$OUT_DIR/steps.log"
RUN_ID="$(date +%H:%M:%S)"

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
SITE="${GPU_CHECK_SITE:-/tmp/site}"
WHEELS="${GPU_CHECK_WHEELS:-$ROOT/.whl}"
BUDGET="${GPU_CHECK_BUDGET_S:-450}"
START=$EPOCHREALTIME
DEADLINE=$(( ${START%.*} + BUDGET ))

if [[ -n ${PYTHON:-} ]]; then PY="$PYTHON"
elif [[ $DEVICE == cpu && -x $ROOT/.venv/bin/python ]]; then PY="$ROOT/.venv/bin/python"
else PY=python3
fi
# -P: the tree's threedgen/ folder must not shadow the installed package (it holds no
# threedgen.representations: pyproject maps those folders in).
if "$PY" -P -c "" 2>/dev/null; then PYP=("$PY" -P); else PYP=("$PY"); fi

# The kernels' build flags, once for every step (a step that saw others would rebuild), and nvcc
# where nerfacc looks for it (PATH).
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}"
if [[ $DEVICE != cpu ]]; then
    if ! command -v nvcc >/dev/null; then
        for d in ${CUDA_HOME:-} /usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-12*; do
            [[ -x $d/bin/nvcc ]] && { export PATH="$d/bin:$PATH" CUDA_HOME="$d"; break; }
        done
    fi
    if [[ -z ${TORCH_CUDA_ARCH_LIST:-} ]] && command -v nvidia-smi >/dev/null; then
        TORCH_CUDA_ARCH_LIST="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | sort -u | paste -sd';')"
        [[ -n $TORCH_CUDA_ARCH_LIST ]] && export TORCH_CUDA_ARCH_LIST
    fi
fi
if ((TINY)); then
    TP_ARGS=(--tiny --steps 2 --warmup 1 --repeats 1)
    RUN_STEPS="${GPU_CHECK_RUN_STEPS:-4}"
    RUN_ARGS=(export.resolution=40 export.video_frames=2 export.video_resolution=32 export.texture_size=64
              checkpoint_every=1000 preview_every=1000)
    # small renders and scenes: the code paths, fast on a CPU
    SMALL_nerf=(render.resolution=32 render.coarse_resolution=0 representation.num_samples=16)
    SMALL_gaussians=(render.resolution=32 render.coarse_resolution=0 representation.num_points=200)
    CAP_KERNELS=120 CAP_DOCTOR=60 CAP_TESTS=120 CAP_MODEL=60 CAP_TP=120 CAP_RUN=90 CAP_IMAGE=60
else
    TP_ARGS=(--steps "${GPU_CHECK_TP_STEPS:-60}" --warmup 20 --repeats 1)
    RUN_STEPS="${GPU_CHECK_RUN_STEPS:-200}"
    RUN_ARGS=()
    SMALL_nerf=() SMALL_gaussians=()
    CAP_KERNELS=300 CAP_DOCTOR=60 CAP_TESTS=120 CAP_MODEL=150 CAP_TP=150 CAP_RUN=150 CAP_IMAGE=60
fi
TABLE=(env "${PY}" "$ROOT/benchmarks/gpu_check_table.py" --steps "$STEPS" --work "$WORK" --out "$OUT_DIR"
       --device "$DEVICE" --tiny "$TINY" --budget "$BUDGET" --start "$START" --python "$PY" --run-steps "$RUN_STEPS"
       --run-id "$RUN_ID")

# record NAME RESULT START END RC DETAIL: one tab-separated line (the table adds the rest), then
# table.md and results.json rewritten, so that a call cut short keeps what it did.
record() {
    local detail="${6//[$'\t\n\r']/ }"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$RUN_ID" "$1" "$2" "$3" "$4" "$5" "$detail" >>"$STEPS"
    printf '[gpu_check] %-21s %-4s rc=%-3s %s\n' "$1" "$2" "$5" "$detail"
    "${TABLE[@]}" --partial >/dev/null 2>>"$OUT_DIR/steps.log"
}

# log NAME RC CMD: a step's output into steps.log
log() {
    local cmd="${*:3}"
    {
        printf '===== %s (rc %s): %s\n' "$1" "$2" "${cmd:0:400}"
        cat "$WORK/logs/$1.out"
        printf -- '----- stderr\n'
        tail -n 200 "$WORK/logs/$1.err"
    } >>"$OUT_DIR/steps.log"
}

# cap NAME CAP: what the step may take (its cap, or what is left of the budget); 0 when it must not run
cap() {
    local left=$(( DEADLINE - ${EPOCHREALTIME%.*} ))
    if (( left < 5 )); then echo 0; elif (( $2 > left )); then echo "$left"; else echo "$2"; fi
}

# result NAME RC T0 T1 CAP: PASS when it exited 0 (the table looks closer at some steps)
result() {
    local result=PASS detail=""
    if (( $2 == 124 || $2 == 137 )); then result=FAIL; detail="timed out after $5 s"
    elif (( $2 != 0 )); then result=FAIL; detail="$(grep -v '^\s*$' "$WORK/logs/$1.err" | tail -n 1 | cut -c1-200)"
    fi
    record "$1" "$result" "$3" "$4" "$2" "$detail"
}

# step NAME CAP COMMAND...: runs COMMAND under timeout, stdout to logs/NAME.out, stderr to logs/NAME.err
step() {
    local name=$1 limit t0 t1 rc
    shift
    if ! selected "$name"; then return 0; fi
    limit=$(cap "$name" "$1")
    shift
    if (( limit == 0 )); then
        record "$name" FAIL "$EPOCHREALTIME" "$EPOCHREALTIME" -1 "not run: the ${BUDGET} s budget is spent"
        return 1
    fi
    t0=$EPOCHREALTIME
    timeout --kill-after=15 "$limit" "$@" >"$WORK/logs/$name.out" 2>"$WORK/logs/$name.err" </dev/null
    rc=$?
    t1=$EPOCHREALTIME
    log "$name" "$rc" "$@"
    result "$name" "$rc" "$t0" "$t1" "$limit"
}

# ---- install --------------------------------------------------------------------------------
if [[ $DEVICE != cpu && -d $SITE ]]; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"  # also when install is not selected (a warm rerun)
fi
if ! selected install; then :
elif [[ $DEVICE == cpu ]]; then
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
    # Prebuilt kernels (benchmarks/prebuild_kernels.sh): unpacked into the installed gsplat and nerfacc
    # when they were built for this torch, this Python, these libraries and this GPU's architecture.
    install_wheels() {
        "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$SITE" "$WHEELS"/*.whl || return 1
        echo "$(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE"
        "$PY" -c "$SYNC_PY" "$ROOT" "$SITE" || return 1
        # prebuilt kernels (benchmarks/prebuild_kernels.sh), where they fit this machine
        PYTHONPATH="$SITE" "$PY" "$ROOT/benchmarks/gpu_image.py" unpack-kernels "$WHEELS/kernels" "$SITE"
    }
    export -f install_wheels
    export PY SITE ROOT WHEELS SYNC_PY
    step install 120 bash -c install_wheels
    [[ :${PYTHONPATH:-}: == *:$SITE:* ]] || export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

# ---- kernels: both builds start now, each in its own process, and run beside the model step ---
KERNEL_PY='
import json, sys
from threedgen import kernels
print(json.dumps(kernels.load(sys.argv[1]).as_dict()))
'
declare -A KPID=()
if selected kernels; then
    KLIMIT=$(cap kernels "$CAP_KERNELS")
    KT0=$EPOCHREALTIME
    if (( KLIMIT == 0 )); then
        record kernels FAIL "$KT0" "$KT0" -1 "not run: the ${BUDGET} s budget is spent"
    else
        for ext in nerfacc gsplat; do
            timeout --kill-after=15 "$KLIMIT" "${PYP[@]}" -c "$KERNEL_PY" "$ext" \
                >"$WORK/logs/kernels-$ext.out" 2>"$WORK/logs/kernels-$ext.err" </dev/null &
            KPID[$ext]=$!
        done
    fi
fi

# ---- the pipeline ---------------------------------------------------------------------------
TINY_FLAG=()
((TINY)) && TINY_FLAG=(--tiny)
if selected model && [[ -f $WORK/model/model_index.json ]]; then
    : >"$WORK/logs/model.err"
    echo "reused: $WORK/model (an earlier call saved it)" >"$WORK/logs/model.out"
    record model PASS "$EPOCHREALTIME" "$EPOCHREALTIME" 0 "reused $WORK/model"
else
    step model "$CAP_MODEL" "${PYP[@]}" benchmarks/gpu_throughput.py "${TINY_FLAG[@]}" --save-model "$WORK/model"
fi

if ((${#KPID[@]})); then
    krc=0
    for ext in nerfacc gsplat; do
        wait "${KPID[$ext]}"
        rc=$?
        (( rc != 0 )) && krc=$rc
        log "kernels-$ext" "$rc" "${PYP[@]}" -c "kernels.load('$ext')"
    done
    KT1=$EPOCHREALTIME
    cp "$WORK/logs/kernels-gsplat.err" "$WORK/logs/kernels.err"
    cat "$WORK/logs/kernels-nerfacc.out" "$WORK/logs/kernels-gsplat.out" >"$WORK/logs/kernels.out"
    result kernels "$krc" "$KT0" "$KT1" "$KLIMIT"
fi

# ---- doctor: what a run gets ----------------------------------------------------------------
step doctor "$CAP_DOCTOR" "${PYP[@]}" -m threedgen.cli doctor --build --json

# ---- image error: rasterize_pytorch against rasterize_gsplat --------------------------------
if [[ $DEVICE == cpu ]]; then
    selected image-error && record image-error SKIP "$EPOCHREALTIME" "$EPOCHREALTIME" 0 "n/a (no CUDA)"
else
    step image-error "$CAP_IMAGE" "${PYP[@]}" benchmarks/gpu_image_error.py --device "$DEVICE"
fi

# ---- the CUDA-only tests --------------------------------------------------------------------
step pytest-cuda "$CAP_TESTS" "${PYP[@]}" -m pytest -q -m cuda -p no:cacheprovider tests

# ---- throughput and one run on each representation -----------------------------------------
# one process for both (one pipeline load); a row each, with its own seconds
step throughput "$CAP_TP" "${PYP[@]}" benchmarks/gpu_throughput.py "${TP_ARGS[@]}" --model "$WORK/model" \
    --device "$DEVICE" --representations nerf gaussians --json "$WORK/throughput.json" \
    "${SMALL_nerf[@]/#/nerf:}" "${SMALL_gaussians[@]/#/gaussians:}"
for rep in nerf gaussians; do
    selected "run-$rep" || continue
    declare -n small="SMALL_$rep"
    rm -rf "$WORK/runs-$rep"
    step "run-$rep" "$CAP_RUN" "${PYP[@]}" -m threedgen.cli run --prior "$WORK/model" --guidance sds \
        --representation "$rep" --steps "$RUN_STEPS" --seed 0 --prompt "a hamburger" --out "$WORK/runs-$rep" \
        --device "$DEVICE" --no-progress "${RUN_ARGS[@]}" "${small[@]}"
    unset -n small
    mesh=$(ls "$WORK/runs-$rep"/*/mesh.glb 2>/dev/null | head -n 1)
    [[ -n $mesh ]] && cp "$mesh" "$OUT_DIR/$rep.glb"
done

# ---- the table, once more, complete ---------------------------------------------------------
"${TABLE[@]}"
