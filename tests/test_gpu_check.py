"""benchmarks/gpu_check.sh, the one command for a GPU machine, run here as ``--dry-run`` (the tests'
tiny pipeline on the CPU: every step's plumbing, no measurement), and benchmarks/make_wheels.sh's
offline modes (the package list, the wheel folder check)."""

import json
import os
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"
MAKE_WHEELS = ROOT / "benchmarks" / "make_wheels.sh"
STEPS = ["install", "doctor", "image-error", "pytest-cuda", "model", "throughput-nerf", "throughput-gaussians",
         "run-nerf", "run-gaussians"]
COLUMNS = ["step", "result", "seconds", "it/s", "peak VRAM GiB", "step / teacher-only floor", "image error",
           "kernel build s", "detail"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(GPU_CHECK), "--dry-run", "--out", str(out), "--work", str(out / "work")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    return proc, out


def steps_by_name(results: dict) -> dict:
    return {s["step"]: s for s in results["steps"]}


def _table_rows(text: str) -> dict:
    lines = [l for l in text.splitlines() if l.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1].replace("|", "").replace("-", "")) <= {""}
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(header), line
        rows[cells[0]] = dict(zip(header, cells))
    return header, rows


def _doctor_available() -> bool:
    proc = subprocess.run([sys.executable, "-m", "threedgen.cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    return "doctor" in proc.stdout


def test_dry_run_prints_one_table_with_every_step_and_column(dry_run):
    proc, out = dry_run
    assert "Traceback" not in proc.stdout
    header, rows = _table_rows(proc.stdout)
    assert header == COLUMNS
    assert list(rows) == STEPS
    assert (out / "table.md").read_text().strip() in proc.stdout
    assert f"table, results.json and steps.log: {out}" in proc.stdout
    for name, row in rows.items():
        assert row["result"] in ("PASS", "FAIL", "SKIP"), row
        assert float(row["seconds"]) >= 0
    # on the CPU: nothing to install, no CUDA to compare gsplat against
    assert rows["install"]["result"] == "SKIP"
    assert rows["image-error"]["result"] == "SKIP" and rows["image-error"]["image error"] == "n/a (no CUDA)"
    for name in ("model", "throughput-nerf", "throughput-gaussians", "run-nerf", "run-gaussians"):
        assert rows[name]["result"] == "PASS", (rows[name], proc.stdout[-3000:], proc.stderr[-3000:])
    assert rows["pytest-cuda"]["result"] in ("PASS", "SKIP"), rows["pytest-cuda"]  # SKIP: no test marked cuda
    for name in ("throughput-nerf", "throughput-gaussians"):
        assert float(rows[name]["it/s"]) > 0 and rows[name]["step / teacher-only floor"].endswith("x")
        assert rows[name]["peak VRAM GiB"] == "-"  # no CUDA
    if _doctor_available():
        assert rows["doctor"]["result"] == "PASS", rows["doctor"]
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    else:  # the doctor is not there yet: that step fails and so does the check, nothing else
        assert rows["doctor"]["result"] == "FAIL" and proc.returncode == 1


def test_dry_run_results_are_machine_readable_and_the_runs_made_meshes(dry_run):
    proc, out = dry_run
    results = json.loads((out / "results.json").read_text())
    assert results["device"] == "cpu" and results["tiny"] is True
    assert results["columns"] == COLUMNS
    assert [s["step"] for s in results["steps"]] == STEPS
    assert results["ok"] == (proc.returncode == 0) == all(s["result"] != "FAIL" for s in results["steps"])
    assert results["total_seconds"] < results["budget_s"]
    assert results["work"] == str(out / "work")
    assert "files" in steps_by_name(results)["model"]["detail"]
    steps = {s["step"]: s for s in results["steps"]}
    for rep in ("nerf", "gaussians"):
        run = results["raw"][f"run-{rep}"]
        assert run["mesh_glb"] and Path(run["mesh_glb"]).is_file() and Path(run["mesh_glb"]).stat().st_size > 1000
        assert run["status"]["status"] == "succeeded"
        assert steps[f"run-{rep}"]["it_s"] > 0
        tp = steps[f"throughput-{rep}"]
        assert tp["it_s"] > 0 and tp["ratio_to_floor"] > 0 and tp["peak_vram_gib"] is None
    rows = {r["representation"]: r for r in results["raw"]["throughput"]["rows"]}
    assert rows["nerf"]["sampler"] == "dense" and rows["gaussians"]["field"] == "pytorch"
    assert steps["image-error"]["image_error"] == "n/a (no CUDA)"
    log = (out / "steps.log").read_text()
    for name in ("doctor", "pytest-cuda", "model", "throughput", "run-nerf", "run-gaussians"):
        assert f"===== {name} (rc " in log
    if steps["doctor"]["result"] == "PASS":
        doctor = results["raw"]["doctor"]
        assert doctor["cuda_available"] is False and set(doctor["extensions"]) >= {"gsplat", "nerfacc"}
        assert set(steps["doctor"]["kernel_build_seconds"]) >= {"gsplat", "nerfacc"}


def test_gpu_check_refuses_unknown_arguments():
    for args in (["--device", "tpu"], ["--fast"]):
        proc = subprocess.run(["bash", str(GPU_CHECK), *args], capture_output=True, text=True, cwd=ROOT, timeout=30)
        assert proc.returncode == 2 and "gpu_check.sh:" in proc.stderr


def test_gpu_check_without_wheels_fails_the_install_step_and_goes_on(tmp_path):
    """--device cuda without wheels: the install step fails at once; a zero budget then
    stops every later step (recorded as not run), and the table still comes out."""
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_BUDGET_S": "0", "GPU_CHECK_WHEELS": str(tmp_path / "none")}
    proc = subprocess.run(["bash", str(GPU_CHECK), "--device", "cuda", "--out", str(tmp_path), "--work",
                           str(tmp_path / "work")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert proc.returncode == 1
    results = json.loads((tmp_path / "results.json").read_text())
    steps = {s["step"]: s for s in results["steps"]}
    assert steps["install"]["result"] == "FAIL" and "make_wheels.sh" in steps["install"]["detail"]
    assert steps["doctor"]["result"] == "FAIL" and "budget is spent" in steps["doctor"]["detail"]
    assert list(steps) == STEPS


def test_make_wheels_lists_the_installed_version_of_each_missing_package():
    proc = subprocess.run(["bash", str(MAKE_WHEELS), "--list"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    specs = dict(line.split("==") for line in lines if "==" in line)
    assert set(specs) == {"diffusers", "gsplat", "nerfacc", "trimesh", "xatlas", "PyMCubes", "omegaconf",
                          "fast-simplification", "platformdirs"}
    for name, ver in specs.items():
        assert ver == version(name)
    assert lines[-1].startswith("threedgen")


def _fake_wheel(folder: Path, name: str, ver: str, requires=(), tag="py3-none-any"):
    path = folder / f"{name}-{ver}-{tag}.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{ver}.dist-info/METADATA", meta)
    return path


def test_make_wheels_check_finds_missing_needs_two_versions_and_wrong_platforms(tmp_path):
    def check():
        return subprocess.run(["bash", str(MAKE_WHEELS), "--check"], capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHON": sys.executable, "WHEEL_DIR": str(tmp_path)}, timeout=60)

    _fake_wheel(tmp_path, "alpha", "1.0", ["numpy>=1.2", "beta", "gamma; python_version < '3.8'",
                                           "delta; extra == 'dev'", "importlib_metadata"])
    _fake_wheel(tmp_path, "beta", "2.0", ["torch", "rich>=12"], tag="cp312-cp312-manylinux_2_17_x86_64")
    proc = check()
    assert proc.returncode == 0 and "2 wheels" in proc.stdout, proc.stderr
    _fake_wheel(tmp_path, "alpha", "1.1")
    _fake_wheel(tmp_path, "epsilon", "1.0", ["zeta>=1"])
    proc = check()
    assert proc.returncode != 0
    assert "alpha: 2 versions" in proc.stderr and "needs zeta>=1" in proc.stderr
    for p in tmp_path.glob("*.whl"):
        p.unlink()
    _fake_wheel(tmp_path, "eta", "1.0", tag="cp311-cp311-manylinux_2_17_x86_64")
    proc = check()
    assert proc.returncode != 0 and "not a wheel for CPython 3.12" in proc.stderr
