#!/usr/bin/env bash
# Prebuild gsplat's and nerfacc's CUDA kernels for the GPU machine's exact torch, so that its run needs
# no compiler (and skips a 2-4 minute JIT build): .whl/kernels/<lib>-csrc.cpython-312-x86_64-linux-gnu.so.xz
# and .whl/kernels/manifest.json, carried with the wheels and unpacked by gpu_check.sh's install step
# into the installed packages (gsplat and nerfacc import a module named csrc before they try a JIT build).
#
#   bash benchmarks/prebuild_kernels.sh [build|package|all]      (default: all)
#
# Needs: a CPython 3.12 ($PYTHON312, default the newest pyenv 3.12), nvcc ($CUDA_HOME, default
# /usr/local/cuda-13.0) and PyPI (torch 2.11.0 with its CUDA 13 libraries, about 3 GB, into a venv in
# $PREBUILD_WORK, default /tmp/prebuild). ARCHS (default "8.0;8.9;9.0": A100, L4/L40, H100/H200) and
# MAX_JOBS (default 2). About 35 CPU-minutes per architecture set at -O3 (gsplat 29 sources, nerfacc 5).
#
# The products match only torch 2.11.0+cu130 on CPython 3.12 and glibc >= 2.34; gpu_check.sh checks
# the torch version against manifest.json before it unpacks them, and otherwise builds as before.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${PREBUILD_WORK:-/tmp/prebuild}"
DEST="${KERNEL_DIR:-$ROOT/.whl/kernels}"
TORCH_SPEC="torch==2.11.0"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda-13.0}"
export TORCH_CUDA_ARCH_LIST="${ARCHS:-8.0;8.9;9.0}" MAX_JOBS="${MAX_JOBS:-2}"
PY312="${PYTHON312:-$(ls -d /root/.pyenv/versions/3.12.*/bin/python3.12 2>/dev/null | sort -V | tail -n 1)}"
# the library versions threedgen carries (the venv's, as make_wheels.sh downloads them)
PY="${PYTHON:-$ROOT/.venv/bin/python}"
GSPLAT="$("$PY" -c 'from importlib.metadata import version; print(version("gsplat"))')"
NERFACC="$("$PY" -c 'from importlib.metadata import version; print(version("nerfacc"))')"
VENV="$WORK/venv312"
what="${1:-all}"
case "$what" in build|package|all) ;; *) echo "prebuild_kernels.sh: build, package or all, not $what" >&2; exit 2 ;; esac

build() {
    [[ -x $PY312 ]] || { echo "prebuild_kernels.sh: no CPython 3.12 (set PYTHON312)" >&2; exit 2; }
    [[ -x $CUDA_HOME/bin/nvcc ]] || { echo "prebuild_kernels.sh: no nvcc under $CUDA_HOME (set CUDA_HOME)" >&2; exit 2; }
    mkdir -p "$WORK/src" "$WORK/out" "$WORK/include"
    if [[ ! -x $VENV/bin/python ]]; then
        "$PY312" -m venv "$VENV"
        "$VENV/bin/pip" install -q "$TORCH_SPEC" ninja numpy rich jaxtyping packaging setuptools wheel
    fi
    # the libraries' CUDA sources, from their wheels
    for spec in "gsplat==$GSPLAT" "nerfacc==$NERFACC"; do
        name="${spec%%==*}"
        if [[ ! -d $WORK/src/$name/$name ]]; then
            "$VENV/bin/pip" download -q --no-deps --only-binary=:all: -d "$WORK/src" "$spec"
            "$VENV/bin/python" -m zipfile -e "$WORK/src/$name-${spec##*==}-py3-none-any.whl" "$WORK/src/$name"
        fi
    done
    # ATen includes cuBLAS/cuSPARSE/cuSOLVER/cuRAND headers that a bare toolkit may lack: take the
    # ones it lacks from the nvidia-*-cu13 wheels torch brought.
    local wheels_inc
    wheels_inc="$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "include"))')"
    for f in "$wheels_inc"/*; do
        [[ -e $CUDA_HOME/include/$(basename "$f") ]] || ln -sfn "$(realpath "$f")" "$WORK/include/$(basename "$f")"
    done
    export PATH="$CUDA_HOME/bin:$VENV/bin:$PATH"
    (cd "$WORK" && nice -n 19 "$VENV/bin/python" - "$WORK" <<'EOF'
import glob
import os
import sys
import time
from os.path import join

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

work = sys.argv[1]
extra = join(work, "include")
# gsplat: its own setup.py's extension (gsplat.csrc), fast math as its JIT build uses it
gs = join(work, "src", "gsplat", "gsplat", "cuda")
gsplat = CUDAExtension(
    "gsplat.csrc", sorted(glob.glob(join(gs, "csrc", "*.cu")) + glob.glob(join(gs, "csrc", "*.cpp"))) + [join(gs, "ext.cpp")],
    include_dirs=[join(gs, "csrc", "third_party", "glm"), join(gs, "include"), extra],
    extra_compile_args={"cxx": ["-O3", "-Wno-sign-compare", "-DAT_PARALLEL_OPENMP", "-fopenmp"],
                        "nvcc": ["-O3", "--use_fast_math", "-std=c++17", "--expt-relaxed-constexpr",
                                 "-diag-suppress", "20012,186"]},
    extra_link_args=["-s"])
# nerfacc: its JIT build's sources and flags (its setup.py leaves the bindings out)
nf = join(work, "src", "nerfacc", "nerfacc", "cuda", "csrc")
nerfacc = CUDAExtension("nerfacc.csrc", sorted(glob.glob(join(nf, "*.cu")) + glob.glob(join(nf, "*.cpp"))),
                        include_dirs=[join(nf, "include"), extra],
                        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]}, extra_link_args=["-s"])
for ext in (nerfacc, gsplat):
    lib = ext.name.split(".")[0]
    started = time.time()
    sys.argv = ["setup.py", "-q", "build_ext", "--build-lib", join(work, "out", lib), "--build-temp",
                join(work, "build", f"tmp_{lib}")]
    setup(name=f"{lib}_prebuild", ext_modules=[ext], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
    print(f"{lib}: {time.time() - started:.0f} s", flush=True)
EOF
    )
}

package() {
    mkdir -p "$DEST"
    rm -f "$DEST"/*.so.xz "$DEST/manifest.json"
    "$VENV/bin/python" - "$WORK/out" "$DEST" "$GSPLAT" "$NERFACC" <<'EOF'
import glob
import hashlib
import json
import lzma
import os
import sys
import time
from pathlib import Path

import torch

out, dest, gsplat, nerfacc = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
files = {}
for lib, ver in (("gsplat", gsplat), ("nerfacc", nerfacc)):
    (so,) = glob.glob(str(out / lib / lib / "csrc.*.so"))
    data = Path(so).read_bytes()
    name = f"{lib}-{Path(so).name}.xz"
    (dest / name).write_bytes(lzma.compress(data, preset=9))
    files[lib] = {"file": name, "module": Path(so).name, "library_version": ver, "bytes": len(data),
                  "sha256": hashlib.sha256(data).hexdigest()}
manifest = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": "cp312",
            "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"), "built": time.strftime("%Y-%m-%d"),
            "glibc_min": "2.34", "files": files}
(dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
print(json.dumps(manifest, indent=1))
EOF
    ls -l "$DEST"
}

case "$what" in
    build) build ;;
    package) package ;;
    all) build; package ;;
esac
