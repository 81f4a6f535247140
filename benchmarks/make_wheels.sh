#!/usr/bin/env bash
# Make .whl/: the wheels a GPU machine without network needs to run threedgen, so that
# benchmarks/gpu_check.sh can install them there with
#   python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
#
#   bash benchmarks/make_wheels.sh          # download into .whl/ (needs PyPI), build threedgen's wheel
#   bash benchmarks/make_wheels.sh --list   # print NAME==VERSION of what it would download, and exit
#   bash benchmarks/make_wheels.sh --check  # check .whl/: each wheel's needs are there or in .whl/
#
# The GPU machine (x86-64, Python 3.12, torch 2.11 + CUDA 13, no network) has numpy, scipy, torch,
# transformers, huggingface_hub, safetensors, tokenizers, peft, pillow, imageio, PyYAML, rich,
# jaxtyping, ninja, requests, regex, filelock, pytest, ... (PRESENT below) but not the packages in
# MISSING. Each is downloaded at the version installed in this project's .venv (one version each),
# for CPython 3.12 on manylinux x86-64 (a pure-Python package comes as py3-none-any), without its
# dependencies: --check then reads every wheel's Requires-Dist (markers evaluated for Python 3.12 on
# Linux) and fails if a need is neither PRESENT nor in .whl/ nor NOT_NEEDED.
#
# Not carried: importlib-metadata (diffusers asks for it but imports the standard library's
# importlib.metadata on Python >= 3.8), imageio-ffmpeg (a 30 MB ffmpeg binary; without it the
# turntable video is written as a GIF), gradio (the web UI only), antlr4-python3-runtime (omegaconf
# 2.4 vendors it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
DEST="${WHEEL_DIR:-$ROOT/.whl}"
LIMIT_MIB=64

MISSING="diffusers gsplat nerfacc trimesh xatlas PyMCubes omegaconf fast-simplification platformdirs"
# threedgen asks for these, but a run, its tests and the benchmarks do not import them.
NOT_NEEDED="importlib-metadata imageio-ffmpeg gradio gradio-client"
# The GPU image's Python packages (its package list, read 2026-11-17).
PRESENT="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet
filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"

mode=download
case "${1:-}" in
    "") ;;
    --list) mode=list ;;
    --check) mode=check ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "make_wheels.sh: unknown argument $1 (use --list, --check or nothing)" >&2; exit 2 ;;
esac

# NAME==VERSION for each missing package, at the version installed in the venv.
specs() {
    "$PY" - $MISSING <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

bad = []
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        bad.append(name)
if bad:
    sys.exit(f"not installed in this Python, so no version to carry: {', '.join(bad)}")
EOF
}

check() {
    "$PY" - "$DEST" "$PRESENT" "$NOT_NEEDED" <<'EOF'
import re
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

dest, present, not_needed = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3].split()
ok = {canonicalize_name(n) for n in present + not_needed}
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
wheels = sorted(dest.glob("*.whl"))
names = {}
for w in wheels:
    name, ver, _, tags = parse_wheel_filename(w.name)
    names.setdefault(name, []).append(str(ver))
    good = any(t.interpreter in ("py3", "cp312") and t.platform in ("any",) or
               (t.interpreter == "cp312" and re.fullmatch(r"manylinux(1|2010|2014|_2_\d+)_x86_64", t.platform))
               for t in tags)
    if not good:
        sys.exit(f"{w.name}: not a wheel for CPython 3.12 on x86-64 Linux")
problems = [f"{n}: {len(v)} versions ({', '.join(v)}); pip --no-index takes one" for n, v in names.items() if len(v) > 1]
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = next(p for p in z.namelist() if p.endswith(".dist-info/METADATA"))
        msg = Parser().parsestr(z.read(meta).decode())
    for line in msg.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(env):
            continue  # an extra, or another Python
        if canonicalize_name(req.name) not in ok and canonicalize_name(req.name) not in names:
            problems.append(f"{w.name} needs {req} : not on the GPU machine and not in {dest.name}/")
if problems:
    sys.exit("\n".join(problems))
print(f"check: {len(wheels)} wheels, one version each, every need present or carried")
EOF
}

if [[ $mode == list ]]; then
    specs
    echo "threedgen (wheel built from this tree)"
    exit 0
fi
if [[ $mode == check ]]; then
    check
    exit 0
fi

mapfile -t SPECS < <(specs)
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DEST" "${SPECS[@]}"
# threedgen itself, so that the GPU machine installs rather than builds it.
(cd "$ROOT" && "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$DEST" .)
check
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "wheels in $DEST:"
(cd "$DEST" && ls -l *.whl | awk '{printf "  %8.1f KiB  %s\n", $5 / 1024, $9}')
awk -v t="$total" -v l="$LIMIT_MIB" 'BEGIN { printf "total: %.1f MiB (%d bytes), limit %d MiB\n", t / 1048576, t, l }'
if (( total > LIMIT_MIB * 1048576 )); then
    echo "make_wheels.sh: over the ${LIMIT_MIB} MiB a device call can carry" >&2
    exit 1
fi
