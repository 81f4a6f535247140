#!/usr/bin/env bash
# Make .whl/: the wheels a GPU machine without network needs to run threedgen, so that
# benchmarks/gpu_check.sh can install them there with
#   python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
#
#   bash benchmarks/make_wheels.sh          # download into .whl/ (needs PyPI), build threedgen's wheel
#   bash benchmarks/make_wheels.sh --list   # print NAME==VERSION of what it would download, and exit
#   bash benchmarks/make_wheels.sh --check  # check .whl/: each wheel's needs are there or in .whl/
#
# The GPU machine's package list (benchmarks/gpu_image.txt: on the image, carried, not needed) is read
# by benchmarks/gpu_image.py. Each carried package is downloaded at the version installed in this
# project's .venv (one version each), for CPython 3.12 on manylinux x86-64 (a pure-Python package
# comes as py3-none-any), without its dependencies: --check then reads every wheel's Requires-Dist
# (markers evaluated for Python 3.12 on Linux) and fails if a need is neither on the image nor in
# .whl/ nor not-needed, or if the version there (the image's, where gpu_image.txt knows it, or the
# carried wheel's) is outside the requirement's range. Prebuilt kernels (benchmarks/prebuild_kernels.sh)
# go in .whl/kernels/ and are left alone here.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
DEST="${WHEEL_DIR:-$ROOT/.whl}"
LIMIT_MIB=64

GPU_IMAGE=("$PY" "$ROOT/benchmarks/gpu_image.py")

mode=download
case "${1:-}" in
    "") ;;
    --list) mode=list ;;
    --check) mode=check ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "make_wheels.sh: unknown argument $1 (use --list, --check or nothing)" >&2; exit 2 ;;
esac

# NAME==VERSION for each carried package, at the version installed in the venv.
specs() {
    "$PY" - $("${GPU_IMAGE[@]}" carried) <<'EOF'
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
    "${GPU_IMAGE[@]}" check "$DEST"
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
# (setuptools copies what an earlier build left in build/lib into the wheel: files since removed
# from the tree would come back, so the build folder goes first)
rm -rf "$ROOT/build"
(cd "$ROOT" && "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$DEST" .)
check
# what a device call carries: the wheels and any prebuilt kernels
total=$(du -cb "$DEST"/*.whl $(compgen -G "$DEST/kernels/*") | tail -1 | cut -f1)
[[ -f $DEST/kernels/manifest.json ]] && echo "prebuilt kernels: $(ls "$DEST"/kernels | tr '\n' ' ')"
echo "wheels in $DEST:"
(cd "$DEST" && ls -l *.whl | awk '{printf "  %8.1f KiB  %s\n", $5 / 1024, $9}')
awk -v t="$total" -v l="$LIMIT_MIB" 'BEGIN { printf "total: %.1f MiB (%d bytes), limit %d MiB\n", t / 1048576, t, l }'
if (( total > LIMIT_MIB * 1048576 )); then
    echo "make_wheels.sh: over the ${LIMIT_MIB} MiB a device call can carry" >&2
    exit 1
fi
