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
import torch

ROOT = Path(__file__).resolve().parent.parent
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"
MAKE_WHEELS = ROOT / "benchmarks" / "make_wheels.sh"
GPU_IMAGE = ROOT / "benchmarks" / "gpu_image.py"
STEPS = ["install", "kernels", "model", "doctor", "image-error", "pytest-cuda", "throughput-nerf",
         "throughput-gaussians", "run-nerf", "run-gaussians"]
COLUMNS = ["step", "result", "seconds", "it/s", "peak VRAM GiB", "step / teacher-only floor", "image error",
           "kernel build s", "detail"]


def emulated_image(folder: Path) -> dict:
    """An environment in which this Python imports only what the GPU machine's image and the carried
    wheels provide (benchmarks/gpu_image.txt), checked to be in force."""
    proc = subprocess.run([sys.executable, str(GPU_IMAGE), "sitecustomize", str(folder)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "gradio" in proc.stdout.split(":", 1)[1].split(), proc.stdout + proc.stderr
    env = {**os.environ, "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}
    env.pop("OUT", None)
    probe = subprocess.run([sys.executable, "-c", "import gradio"], capture_output=True, text=True, env=env, timeout=60)
    assert probe.returncode != 0 and "not on the emulated GPU machine" in probe.stderr
    return env


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The dry-run as the GPU machine would import: with its package set emulated (no gradio, Ray,
    rtree, ...), so that a test module or a step that imports something the image lacks fails here."""
    out = tmp_path_factory.mktemp("gpu-check")
    env = emulated_image(tmp_path_factory.mktemp("image"))
    proc = subprocess.run(["bash", str(GPU_CHECK), "--dry-run", "--out", str(out), "--work", str(out / "work")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=400)
    return proc, out, env


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
    proc, out, _ = dry_run
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
    # every test module imports on the image (else: a collection error), and the CUDA tests skip here
    assert rows["pytest-cuda"]["result"] == "PASS", rows["pytest-cuda"]
    assert "error" not in rows["pytest-cuda"]["detail"] and "skipped" in rows["pytest-cuda"]["detail"]
    assert rows["kernels"]["result"] == "PASS" and "nerfacc unavailable (no CUDA device)" in rows["kernels"]["detail"]
    for name in ("throughput-nerf", "throughput-gaussians"):
        assert float(rows[name]["it/s"]) > 0 and rows[name]["step / teacher-only floor"].endswith("x")
        assert rows[name]["peak VRAM GiB"] == "-"  # no CUDA
    if _doctor_available():
        assert rows["doctor"]["result"] == "PASS", rows["doctor"]
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    else:  # the doctor is not there yet: that step fails and so does the check, nothing else
        assert rows["doctor"]["result"] == "FAIL" and proc.returncode == 1


def test_dry_run_results_are_machine_readable_and_the_runs_made_meshes(dry_run):
    proc, out, _ = dry_run
    results = json.loads((out / "results.json").read_text())
    assert results["device"] == "cpu" and results["tiny"] is True and results["complete"] is True
    # both runs' meshes come back with the table (a device call returns only --out)
    assert results["meshes"] == {rep: str(out / f"{rep}.glb") for rep in ("nerf", "gaussians")}
    for rep in ("nerf", "gaussians"):
        assert (out / f"{rep}.glb").read_bytes() == Path(results["raw"][f"run-{rep}"]["mesh_glb"]).read_bytes()
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
    for name in ("kernels-nerfacc", "kernels-gsplat", "doctor", "pytest-cuda", "model", "throughput", "run-nerf",
                 "run-gaussians"):
        assert f"===== {name} (rc " in log
    if steps["doctor"]["result"] == "PASS":
        doctor = results["raw"]["doctor"]
        assert doctor["cuda_available"] is False and set(doctor["extensions"]) >= {"gsplat", "nerfacc"}
    assert set(steps["kernels"]["kernel_build_seconds"]) == {"gsplat", "nerfacc"}  # built beside the model step
    assert {k: v["status"] for k, v in results["raw"]["kernels"].items()} == {"nerfacc": "unavailable",
                                                                              "gsplat": "unavailable"}


def test_gpu_check_refuses_unknown_arguments_steps_and_no_out(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    for args, extra, message in ((["--device", "tpu"], {}, "--device must be cpu or cuda"),
                                 (["--fast"], {}, "unknown argument --fast"),
                                 (["--dry-run"], {}, "--out DIR (or set OUT)"),
                                 (["--dry-run", "--out", str(tmp_path)], {"GPU_CHECK_STEPS": "doctor,bake"},
                                  "GPU_CHECK_STEPS: no step bake")):
        proc = subprocess.run(["bash", str(GPU_CHECK), *args], capture_output=True, text=True, cwd=ROOT, timeout=30,
                              env={**env, **extra})
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
    assert list(tmp_path.iterdir()) == []  # nothing started


def test_a_warm_rerun_runs_only_the_chosen_steps_and_shows_the_earlier_ones(dry_run, tmp_path):
    """GPU_CHECK_STEPS on the same --work (a still-warm machine): the saved pipeline is reused, the
    other steps' rows are the earlier call's, marked so, and $OUT is where the table goes."""
    _, first, env = dry_run
    proc = subprocess.run(["bash", str(GPU_CHECK), "--dry-run", "--work", str(first / "work")], capture_output=True,
                          text=True, env={**env, "GPU_CHECK_STEPS": "model,doctor", "OUT": str(tmp_path)}, cwd=ROOT,
                          timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    steps = steps_by_name(results)
    assert list(steps) == STEPS
    assert steps["model"]["detail"].startswith("reused ") and not steps["model"]["earlier"]
    assert steps["model"]["seconds"] < 1 and not steps["doctor"]["earlier"]
    for name in set(STEPS) - {"model", "doctor"}:
        assert steps[name]["earlier"] and steps[name]["detail"].startswith("earlier call ("), steps[name]
    assert steps["run-nerf"]["result"] == "PASS"
    assert "earlier call (" in (tmp_path / "table.md").read_text()


def test_the_table_is_written_after_every_step(tmp_path):
    """A call cut short (the device call's time limit) keeps the table of the steps it finished."""
    import signal
    import time

    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.Popen(["bash", str(GPU_CHECK), "--dry-run", "--out", str(tmp_path), "--work",
                             str(tmp_path / "work")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            cwd=ROOT, start_new_session=True)
    try:
        deadline = time.time() + 240
        table = tmp_path / "table.md"
        while time.time() < deadline and not (table.exists() and "| doctor |" in table.read_text(errors="replace")):
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["complete"] is False and "in progress" in (tmp_path / "table.md").read_text()
    names = [s["step"] for s in results["steps"]]
    assert names[:4] == ["install", "kernels", "model", "doctor"] and "run-gaussians" not in names
    assert steps_by_name(results)["model"]["result"] == "PASS"


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
    for name in STEPS[1:]:
        assert steps[name]["result"] == "FAIL" and "budget is spent" in steps[name]["detail"], steps[name]
    assert list(steps) == STEPS
    assert not results["meshes"] and (tmp_path / "table.md").is_file()


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


def test_make_wheels_check_compares_versions_with_the_image(tmp_path):
    """The GPU machine has huggingface-hub 1.33.0 (benchmarks/gpu_image.txt): a carried wheel that
    needs 2.x would install and then fail at import."""
    def check():
        return subprocess.run(["bash", str(MAKE_WHEELS), "--check"], capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHON": sys.executable, "WHEEL_DIR": str(tmp_path)}, timeout=60)

    _fake_wheel(tmp_path, "alpha", "1.0", ["huggingface-hub>=1.32", "transformers>=5,<6", "torch>=2.6,<2.14",
                                           "beta>=2"])
    _fake_wheel(tmp_path, "beta", "2.1")
    proc = check()
    assert proc.returncode == 0 and "at a version it accepts" in proc.stdout, proc.stderr
    _fake_wheel(tmp_path, "gamma", "1.0", ["huggingface-hub>=2.0", "beta>=3", "torch<2.10"])
    proc = check()
    assert proc.returncode != 0
    assert "gamma-1.0-py3-none-any.whl needs huggingface-hub>=2.0: the GPU machine has huggingface-hub 1.33.0" in proc.stderr
    assert "needs beta>=3: .whl" not in proc.stderr and f"needs beta>=3: {tmp_path.name}/ has beta 2.1" in proc.stderr
    assert "needs torch<2.10: the GPU machine has torch 2.11.0" in proc.stderr


def test_the_image_agreement_gate_allows_a_few_fast_math_pixels_not_a_wrong_image():
    from image_agreement import agreement

    a = torch.rand(2, 96, 128, 4, generator=torch.Generator().manual_seed(0))
    b = a + 1e-7
    assert agreement(a, b)["ok"] and agreement(a, b)["outliers"] == 0
    b.view(-1)[[10, 5000]] += 4e-3  # two pixels flipped at the alpha cut
    close = agreement(a, b)
    assert close["ok"] and close["outliers"] == 2 and abs(close["max_abs"] - 4e-3) < 1e-6
    b.view(-1)[:100] += 4e-3  # 100 of 98,304 values: over the 0.05 % allowed
    assert not agreement(a, b)["ok"]
    assert not agreement(a, a + 2e-5)["ok"]  # every value a little off: the mean bound
    c = a.clone()
    c.view(-1)[0] = float("nan")
    close = agreement(a, c)
    assert not close["ok"] and close["outliers"] == 1


def _fake_site(site: Path, versions: dict) -> None:
    for lib, ver in versions.items():
        (site / lib).mkdir(parents=True)
        (site / f"{lib}-{ver}.dist-info").mkdir()
        (site / f"{lib}-{ver}.dist-info" / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {lib}\nVersion: {ver}\n")


def test_prebuilt_kernels_are_unpacked_only_where_they_fit(tmp_path):
    """benchmarks/prebuild_kernels.sh's files go into the installed gsplat and nerfacc only for the torch,
    Python, library versions and GPU architectures they were built for; a damaged file is refused."""
    import hashlib
    import lzma

    kernels, site = tmp_path / "kernels", tmp_path / "site"
    kernels.mkdir()
    _fake_site(site, {"gsplat": "1.5.3", "nerfacc": "0.5.3"})
    files = {}
    for lib, ver in (("gsplat", "1.5.3"), ("nerfacc", "0.5.3")):
        data = f"an ELF file for {lib}".encode()
        (kernels / f"{lib}-csrc.so.xz").write_bytes(lzma.compress(data))
        files[lib] = {"file": f"{lib}-csrc.so.xz", "module": "csrc.cpython-312-x86_64-linux-gnu.so",
                      "library_version": ver, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    manifest = {"torch": torch.__version__, "cuda": "13.0", "python": tag, "arch_list": "8.0;8.9;9.0",
                "built": "2026-12-08", "glibc_min": "2.34", "files": files}

    def unpack(arch="9.0", **changes):
        (kernels / "manifest.json").write_text(json.dumps({**manifest, **changes}))
        return subprocess.run([sys.executable, str(GPU_IMAGE), "unpack-kernels", str(kernels), str(site)],
                              capture_output=True, text=True, env={**os.environ, "TORCH_CUDA_ARCH_LIST": arch},
                              timeout=120)

    proc = unpack(arch="10.0")
    assert proc.returncode == 0 and "not used" in proc.stdout and "GPU architecture 10.0" in proc.stdout
    proc = unpack(torch="2.11.0+cu130")
    assert f"here torch {torch.__version__}" in proc.stdout and not (site / "gsplat" / files["gsplat"]["module"]).exists()
    proc = unpack(files={**files, "nerfacc": {**files["nerfacc"], "library_version": "0.5.2"}})
    assert "nerfacc 0.5.3" in proc.stdout and "not used" in proc.stdout
    proc = unpack()
    assert proc.returncode == 0 and proc.stdout.startswith("prebuilt kernels unpacked: gsplat 1.5.3, nerfacc 0.5.3")
    assert (site / "gsplat" / files["gsplat"]["module"]).read_bytes() == b"an ELF file for gsplat"
    proc = unpack(files={**files, "gsplat": {**files["gsplat"], "sha256": "0" * 64}})
    assert proc.returncode != 0 and "its checksum differs" in proc.stderr
    (kernels / "manifest.json").unlink()
    proc = subprocess.run([sys.executable, str(GPU_IMAGE), "unpack-kernels", str(kernels), str(site)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "no prebuilt kernels carried" in proc.stdout


def test_the_gpu_doc_matches_the_script():
    """docs/gpu.md's step table, budget and device commands are the script's."""
    doc = (ROOT / "docs" / "gpu.md").read_text()
    script = GPU_CHECK.read_text()
    table = doc[doc.index("| step | what |"):doc.index("It prints one markdown table")]
    named = [name.strip() for line in table.splitlines()[2:] if line.startswith("| ")
             for name in line.split("|")[1].split(",")]
    assert named == STEPS
    budget = script.split('BUDGET="${GPU_CHECK_BUDGET_S:-', 1)[1].split("}", 1)[0]
    assert f"(`GPU_CHECK_BUDGET_S`, {budget} s)" in doc
    all_steps = script.split('ALL_STEPS="', 1)[1].split('"', 1)[0].split()
    for command in ("bash benchmarks/gpu_check.sh --work /tmp/gc",
                    "GPU_CHECK_STEPS=throughput,run-nerf,run-gaussians GPU_CHECK_BUDGET_S=300 bash benchmarks/gpu_check.sh"):
        assert command in doc
    assert {"throughput", "run-nerf", "run-gaussians"} <= set(all_steps)
    tp_default = script.split("GPU_CHECK_TP_STEPS:-", 1)[1].split("}", 1)[0]
    assert f"{tp_default} timed steps (`GPU_CHECK_TP_STEPS`)" in doc
    readme = (ROOT / "README.md").read_text()
    assert f"{budget} s at most" in readme and "GPU_CHECK_STEPS=a,b,..." in readme
