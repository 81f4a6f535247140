"""The CUDA path, tested on the CPU: each test reproduces, without a GPU, a way the first CUDA run
crashed (the occupancy grid empty at step 0, the module on the CPU after ``fit``, cameras and
representations left on the CPU, every job on GPU 0, kernels that never built, the suite picking
CUDA) and checks it is gone. What only a GPU can show is in the tests marked ``cuda`` and in
``benchmarks/gpu_check.sh``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from threedgen import devices, kernels
from threedgen.cameras import Cameras
from threedgen.errors import UserError
from threedgen.representations.config import GaussiansConfig, NeRFConfig
from threedgen.representations.gaussians import Gaussians
from threedgen.representations.nerf import NeRF, ray_aabb

TINY = ["prior.shapes=[cube,torus]", "prior.resolution=16", "prior.elevations=[10,40]", "prior.azimuth_step=90",
        "render.resolution=16", "camera.batch_size=1", "representation.density_resolution=16",
        "representation.color_resolution=8", "representation.num_samples=8", "export.resolution=24",
        "export.video_frames=4", "export.video_resolution=16", "export.texture=vertex", "export.evaluate=false",
        "preview_every=1000", "checkpoint_every=1000"]


def tiny_cfg(steps=2, extra=(), **flags):
    from threedgen.config import build_config, parse_overrides

    return build_config(overrides=parse_overrides([*TINY, *extra]),
                        flags={"prompt": "a red cube", "steps": steps, **flags})


# kernels' own toolkit lookups (fake_cuda replaces them)
REAL_NVCC, REAL_NVCC_ON_PATH = kernels.nvcc, kernels.nvcc_on_path


def _cams(n=2):
    return Cameras.from_angles([20.0] * n, [0.0, 90.0][:n], 2.5, 40.0, (1.0, 1.0, 1.0))


@pytest.fixture
def fresh_kernels():
    kernels.forget()
    yield
    kernels.forget()


@pytest.fixture
def fake_cuda(monkeypatch, fresh_kernels, tmp_path):
    """A machine that reports a CUDA device (tensors still live on the CPU), with a CUDA toolkit on
    PATH, Python's headers and its own extension folder; ``kernels(ok)`` makes gsplat's and
    nerfacc's kernel modules load (``ok``) or come up empty, as with no nvcc."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(devices, "no_gpu_driver", lambda: False)  # a driver, as on a GPU machine
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(kernels, "nvcc", lambda: "/usr/local/cuda/bin/nvcc")
    monkeypatch.setattr(kernels, "nvcc_on_path", lambda: True)
    header = tmp_path / "include" / "Python.h"
    header.parent.mkdir()
    header.write_text("")
    monkeypatch.setattr(kernels, "python_header", lambda: header)
    imported = []

    def set_kernels(ok: bool, error: Exception | None = None):
        def fake_import(name):
            imported.append(name)
            if error is not None:
                raise error
            return types.SimpleNamespace(_C=object() if ok else None)

        monkeypatch.setattr(kernels, "_import_backend", fake_import)
        return imported

    return set_kernels


# ---- 1. nerfacc's occupancy grid is empty until its first update -------------------------------

def _march_occupied(estimator, bound: float):
    """A CPU twin of ``OccGridEstimator.sampling`` (nerfacc's ``traverse_grids`` is CUDA only):
    uniform steps along each ray inside the box, kept where the grid's cell is occupied."""

    def sampling(o, d, sigma_fn=None, render_step_size=0.01, stratified=False):
        near, far = ray_aabb(o, d, bound)
        n = int(torch.ceil((far - near).max() / render_step_size).clamp_min(1))
        t0 = near[:, None] + render_step_size * torch.arange(n, dtype=o.dtype)[None]
        t1 = t0 + render_step_size
        inside = t1 <= far[:, None] + render_step_size
        mid = o[:, None] + d[:, None] * ((t0 + t1) / 2)[..., None]
        res = estimator.binaries.shape[-1]
        cell = ((mid / bound + 1) / 2 * res).long().clamp(0, res - 1)
        occupied = estimator.binaries[0][cell[..., 0], cell[..., 1], cell[..., 2]] & inside
        rays, steps = torch.nonzero(occupied, as_tuple=True)
        return rays, t0[rays, steps], t1[rays, steps]

    return sampling


def _packed_rendering(t_starts, t_ends, ray_indices, n_rays, rgb_sigma_fn):
    """A CPU twin of ``nerfacc.rendering`` on packed samples sorted by ray (as sampling returns)."""
    rgb, sigma = rgb_sigma_fn(t_starts, t_ends, ray_indices)
    tau = sigma * (t_ends - t_starts)
    total = torch.cumsum(tau, 0)
    first = torch.searchsorted(ray_indices, ray_indices)  # each sample's ray's first sample
    before = total - tau - (total - tau)[first]
    weights = torch.exp(-before) * (1 - torch.exp(-tau))
    color = torch.zeros(n_rays, 3).index_add(0, ray_indices, weights[:, None] * rgb)
    acc = torch.zeros(n_rays, 1).index_add(0, ray_indices, weights[:, None])
    depth = torch.zeros(n_rays, 1).index_add(0, ray_indices, (weights * (t_starts + t_ends) / 2)[:, None])
    return color, acc, depth / acc.clamp_min(1e-10), {}


def _occgrid_nerf(fake_cuda, monkeypatch):
    import nerfacc

    fake_cuda(True)
    nerf = NeRF(NeRFConfig(bound=0.75, field="grid", density_resolution=16, color_resolution=8,
                           occgrid_resolution=32, render_step_size=0.02), "cuda")
    assert nerf.sampler_kind == "occgrid" and nerf.estimator is not None
    monkeypatch.setattr(nerf.estimator, "sampling", _march_occupied(nerf.estimator, 0.75))
    monkeypatch.setattr(nerfacc, "rendering", _packed_rendering)
    return nerf


def test_occgrid_twin_agrees_with_the_dense_sampler(fake_cuda, monkeypatch):
    """The CPU twins above are faithful enough to judge the fix: with every cell occupied they
    render the blob as the dense sampler does."""
    nerf = _occgrid_nerf(fake_cuda, monkeypatch).eval()
    nerf.estimator.binaries.fill_(True)
    dense = NeRF(NeRFConfig(bound=0.75, field="grid", density_resolution=16, color_resolution=8, num_samples=256,
                            skip_empty=False)).eval()
    dense.load_state_dict(nerf.state_dict(), strict=False)
    a, b = nerf.render(_cams(), 12, 12), dense.render(_cams(), 12, 12)
    assert a.alpha.max() > 0.5
    assert (a.alpha - b.alpha).abs().max() < 0.02


def test_occgrid_first_training_render_has_a_graph(fake_cuda, monkeypatch):
    """Step 0 on CUDA: nerfacc's grid starts with every cell empty; the render must update it first,
    or it samples nothing and ``manual_backward`` raises "element 0 of tensors does not require grad"."""
    nerf = _occgrid_nerf(fake_cuda, monkeypatch).train()
    assert not nerf.estimator.binaries.any()  # nerfacc's start
    out = nerf.render(_cams(), 12, 12)
    assert nerf.estimator.binaries.any()
    assert out.alpha.requires_grad and out.alpha.max() > 0.5
    (out.rgb.mean() + out.alpha.mean()).backward()
    assert nerf.field.density.grad.abs().sum() > 0


def test_occgrid_grid_of_a_resumed_run_is_left_as_saved(fake_cuda, monkeypatch):
    nerf = _occgrid_nerf(fake_cuda, monkeypatch).train()
    nerf.estimator.binaries.zero_()
    nerf.estimator.binaries[0, 16, 16, 16] = True  # a loaded, non-empty grid
    saved = nerf.estimator.occs.clone()
    nerf.render(_cams(1), 8, 8)
    assert int(nerf.estimator.binaries.sum()) == 1 and torch.equal(nerf.estimator.occs, saved)


# ---- 2-4. devices after fit, at export, and when exporting a run folder -------------------------

def test_export_runs_on_the_runs_device_after_fit(tmp_path, monkeypatch):
    """Lightning's teardown calls ``cpu()`` on the module at the end of ``fit``; the runner must put
    it back on the run's device before exporting (on CUDA, gsplat and nerfacc refuse CPU tensors)."""
    from threedgen import export as export_module
    from threedgen import runner as runner_module
    from threedgen.runner import run
    from threedgen.system import System

    events = []
    original_cpu, original_to = System.cpu, System.to

    def spy_cpu(self):
        events.append(("cpu",))
        return original_cpu(self)

    def spy_to(self, *args, **kwargs):
        events.append(("to", str(args[0]) if args else str(kwargs.get("device"))))
        return original_to(self, *args, **kwargs)

    real_export = export_module.export_run_outputs

    def spy_export(representation, *args, **kwargs):
        events.append(("export",))
        return real_export(representation, *args, **kwargs)

    monkeypatch.setattr(System, "cpu", spy_cpu)
    monkeypatch.setattr(System, "to", spy_to)
    monkeypatch.setattr(export_module, "export_run_outputs", spy_export)
    monkeypatch.setattr(runner_module, "export_run_outputs", spy_export)  # the runner's own name for it
    run_dir = run(tiny_cfg(), out=tmp_path, progress_bar=False)
    assert ("cpu",) in events, "Lightning no longer calls cpu() at teardown; this test needs another spy"
    teardown = max(i for i, e in enumerate(events) if e == ("cpu",))
    export = events.index(("export",))
    assert teardown < export
    assert ("to", "cpu") in events[teardown + 1:export], events
    status = json.loads((run_dir / "status.json").read_text())
    assert status["backends"] == {"field": "grid", "sampler": "dense", "fallbacks": []}


def test_render_views_moves_its_cameras_to_the_representation(monkeypatch):
    from threedgen.cameras import orbit
    from threedgen.views import render_views

    moved = []
    original = Cameras.to

    def spy(self, device):
        moved.append(torch.device(device))
        return original(self, device)

    monkeypatch.setattr(Cameras, "to", spy)
    nerf = NeRF(NeRFConfig(bound=0.75, density_resolution=8, color_resolution=4, num_samples=4))
    rgb, alpha = render_views(nerf, orbit(2, 20.0, 2.5, 40.0), 8)
    assert rgb.shape == (2, 8, 8, 3) and moved == [torch.device("cpu")]


def test_export_of_a_run_folder_places_the_representation_on_the_device(tmp_path, monkeypatch):
    from threedgen.representations.base import Representation
    from threedgen.runner import load_representation, run

    run_dir = run(tiny_cfg(extra=["checkpoint_every=1"]), out=tmp_path, progress_bar=False)
    placed = []
    original = Representation.to

    def spy(self, *args, **kwargs):
        placed.append(str(args[0]) if args else str(kwargs.get("device")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Representation, "to", spy)
    _, rep, _ = load_representation(run_dir, device="cpu")
    assert placed == ["cpu"] and next(rep.parameters()).device.type == "cpu"


# ---- 5. every GPU, not only GPU 0 ---------------------------------------------------------------

def test_trainer_uses_the_runs_gpu_index(monkeypatch):
    import pytorch_lightning as pl

    from threedgen.runner import make_trainer, trainer_devices

    assert trainer_devices(torch.device("cuda:3")) == [3] and trainer_devices(torch.device("cpu")) == 1
    seen = {}

    class FakeTrainer:
        def __init__(self, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(pl, "Trainer", FakeTrainer)
    make_trainer(tiny_cfg(), Path("."), torch.device("cuda:2"), progress_bar=False)
    assert seen["accelerator"] == "gpu" and seen["devices"] == [2]


@pytest.mark.parametrize("resume", [False, True])
def test_a_job_process_is_pinned_to_its_workers_gpu(tmp_path, monkeypatch, resume):
    """A web UI worker for cuda:N runs its jobs with only GPU N visible, as cuda:0, also when it
    resumes a job another worker started."""
    from threedgen import runner
    from threedgen.jobs.store import JobStore
    from threedgen.jobs.worker import run_job

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")  # the server's own restriction
    store = JobStore(tmp_path / "jobs.sqlite")
    params = {"prompt": "a red cube", "guidance": "sds", "representation": "nerf", "prior": "shapes", "steps": 2,
              "seed": 0, "server_overrides": TINY}
    job_id = store.submit(params, 2)
    store.claim(0)
    if resume:  # started by another worker, interrupted, queued again and claimed by this one
        store.progress(job_id, 1, 2, run_dir=str(tmp_path / "old-run"))
        store.finish(job_id, "interrupted")
        store.resume(job_id)
        store.claim(1)
    calls = []

    def fake_run(cfg=None, **kwargs):
        calls.append({"visible": os.environ["CUDA_VISIBLE_DEVICES"], "cfg_device": cfg.device if cfg else None,
                      **kwargs})
        raise UserError("stop here")

    monkeypatch.setattr(runner, "run", fake_run)
    run_job(str(tmp_path / "jobs.sqlite"), job_id, str(tmp_path / "runs"), str(tmp_path / "out"), "cuda:2", os.getpid())
    (call,) = calls
    assert call["visible"] == "6"
    if resume:
        assert call["resume"] == str(tmp_path / "old-run") and call["device"] == "cuda:0"
    else:
        assert call["cfg_device"] == "cuda:0"


def test_resuming_on_another_device_uses_that_device(tmp_path):
    from threedgen.config import load_run_config
    from threedgen.runner import run

    run_dir = run(tiny_cfg(device="cpu"), out=tmp_path, progress_bar=False)
    text = (run_dir / "config.yaml").read_text().replace("device: cpu", "device: cuda:7")
    (run_dir / "config.yaml").write_text(text)
    assert load_run_config(run_dir / "config.yaml").device == "cuda:7"
    run(resume=run_dir, steps=3, progress_bar=False, device="cpu")  # would fail on cuda:7 here
    assert load_run_config(run_dir / "config.yaml").device == "cpu"


# ---- 6. no compiler, no kernels: the PyTorch paths, said once, recorded -------------------------

def test_without_kernels_auto_falls_back_to_the_pytorch_paths(fake_cuda, capsys):
    fake_cuda(False)  # what gsplat and nerfacc leave when there is no nvcc: _C = None
    nerf = NeRF(NeRFConfig(bound=0.75, field="grid", density_resolution=8, color_resolution=4), "cuda")
    splats = Gaussians(GaussiansConfig(num_points=50, max_gaussians=100), "cuda")
    NeRF(NeRFConfig(bound=0.75, field="grid", density_resolution=8, color_resolution=4), "cuda")
    assert nerf.sampler_kind == "dense" and nerf.estimator is None and splats.backend == "pytorch"
    err = capsys.readouterr().err
    assert err.count("nerfacc's CUDA kernels are unavailable") == 1  # once per process
    assert err.count("gsplat's CUDA kernels are unavailable") == 1
    assert "no CUDA toolkit (nvcc)" in err
    assert nerf.backends()["fallbacks"] and "dense sampler" in nerf.backends()["fallbacks"][0]
    assert splats.backends()["rasteriser"] == "pytorch" and "PyTorch rasteriser" in splats.backends()["fallbacks"][0]
    # The fallback renders (plain PyTorch, so it runs wherever the tensors are).
    assert nerf.render(_cams(1), 8, 8).alpha.max() > 0.3


def test_a_failed_build_falls_back_and_an_explicit_request_is_refused(fake_cuda, capsys):
    fake_cuda(False, error=RuntimeError("Error building extension 'gsplat_cuda'\nnvcc fatal: ..."))
    splats = Gaussians(GaussiansConfig(num_points=50, max_gaussians=100), "cuda")
    assert splats.backend == "pytorch"
    assert "build failed: RuntimeError: Error building extension 'gsplat_cuda'" in capsys.readouterr().err
    with pytest.raises(UserError, match="backend=gsplat: gsplat's CUDA kernels are unavailable .*build failed"):
        Gaussians(GaussiansConfig(num_points=50, max_gaussians=100, backend="gsplat"), "cuda")
    with pytest.raises(UserError, match="sampler=occgrid: nerfacc's CUDA kernels are unavailable"):
        NeRF(NeRFConfig(sampler="occgrid"), "cuda")
    with pytest.raises(UserError, match="densify=mcmc: gsplat's CUDA kernels are unavailable"):
        Gaussians(GaussiansConfig(num_points=50, max_gaussians=100, densify="mcmc"), "cuda")


def test_kernels_load_once_under_a_lock(fake_cuda, tmp_path, monkeypatch):
    """The build holds an exclusive lock beside torch's extension folder (two web UI jobs building
    at once delete each other's build folder), and a process loads each extension once."""
    import fcntl

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    held = []

    def fake_import(name):
        with open(tmp_path / f"threedgen-{name.split('.')[0]}.lock", "a+") as other:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(False)
                fcntl.flock(other, fcntl.LOCK_UN)
            except BlockingIOError:
                held.append(True)
        return types.SimpleNamespace(_C=object())

    monkeypatch.setattr(kernels, "_import_backend", fake_import)
    statuses = kernels.prepare()
    assert held == [True, True]
    assert all(s.usable and s.build_seconds is not None for s in statuses.values())
    kernels.prepare()
    assert len(held) == 2  # loaded once per process


@pytest.fixture
def build_here(fake_cuda, monkeypatch):
    """``fake_cuda``'s machine: ``build_here(effect)`` makes every kernel import call ``effect(name)``
    (raise to fail) and returns the list of imports made."""
    imported = []

    def set_effect(effect=None):
        def fake_import(module):
            imported.append(module)
            if effect is not None:
                effect(module)
            return types.SimpleNamespace(_C=object())

        monkeypatch.setattr(kernels, "_import_backend", fake_import)
        return imported

    return set_effect


def test_a_stale_torch_lock_is_removed_before_a_build(build_here):
    """A build killed mid-way leaves torch's FileBaton ``lock`` in the build folder; nerfacc would
    wait on it for ever. Under threedgen's own lock nobody builds, so it is removed first."""
    lock = kernels.build_folder("nerfacc") / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text("")
    seen = []
    build_here(lambda module: seen.append(lock.exists()))
    assert kernels.load("nerfacc").status == "built"
    assert seen == [False] and not kernels.record_path("nerfacc").exists()  # built: no record left
    # a module already built: torch still checks the build on load, and would wait on the lock too
    kernels.forget()
    kernels.compiled_module("nerfacc").write_bytes(b"")
    lock.write_text("")
    assert kernels.load("nerfacc").detail == "loaded" and seen == [False, False]


def test_a_failed_build_is_not_tried_again_until_asked(build_here):
    def fail(module):
        if module.startswith("gsplat"):
            raise RuntimeError("Error building extension 'gsplat_cuda'\nnvcc fatal: unsupported gpu architecture")

    imported = build_here(fail)
    first = kernels.load("gsplat")
    assert first.status == "unavailable" and "build failed: RuntimeError: Error building extension" in first.detail
    kernels.forget()  # another process: the next step of gpu_check.sh, a web UI job...
    again = kernels.load("gsplat")
    assert imported == ["gsplat.cuda._backend"]  # not compiled for minutes again
    assert again.status == "unavailable" and again.build_seconds is None
    assert again.detail.startswith("build failed at ") and "Error building extension 'gsplat_cuda'" in again.detail
    assert "threedgen doctor --build --retry" in again.detail
    assert kernels.probe("gsplat").detail == again.detail
    assert kernels.load("nerfacc").usable  # the other extension is not affected
    kernels.forget()
    build_here()  # the compiler is fixed; --retry builds again, and success clears the record
    assert kernels.load("gsplat", retry=True).status == "built"
    assert not kernels.record_path("gsplat").exists()


def test_prebuilt_kernels_load_with_no_compiler_and_no_build(build_here, monkeypatch):
    """benchmarks/prebuild_kernels.sh's modules (gsplat.csrc, nerfacc.csrc): the doctor says
    prebuilt, and they load without nvcc, Python.h or a build record."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name in ("gsplat.csrc", "nerfacc.csrc") else real(name, *a))
    monkeypatch.setattr(kernels, "nvcc", lambda: None)
    imported = build_here()
    assert kernels.probe("gsplat").status == "prebuilt"
    status = kernels.load("gsplat")
    assert status.status == "prebuilt" and status.usable and imported == ["gsplat.cuda._backend"]
    assert not kernels.record_path("gsplat").exists()


def test_a_changed_toolchain_builds_again_after_a_failure(build_here, monkeypatch):
    imported = build_here(lambda module: (_ for _ in ()).throw(RuntimeError("nvcc fatal")))
    assert not kernels.load("gsplat").usable
    kernels.forget()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")  # another build: the record is not its own
    build_here()
    assert kernels.load("gsplat").usable and len(imported) == 2  # built again


KILLED_BUILD = """
import sys, time
import torch
from threedgen import kernels
torch.cuda.is_available = lambda: True
kernels.nvcc = lambda: "/usr/local/cuda/bin/nvcc"
kernels.nvcc_on_path = lambda: True
kernels.python_header = lambda: kernels.Path(sys.argv[1])
def build_for_ever(module):
    folder = kernels.build_folder("nerfacc")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lock").write_text("")  # torch's FileBaton, as a real build holds it
    print("building", file=sys.__stdout__, flush=True)  # threedgen sends a build's stdout to stderr
    time.sleep(120)
kernels._import_backend = build_for_ever
kernels.load("nerfacc")
"""


def test_a_build_killed_by_a_timeout_leaves_no_hang_and_no_rebuild(build_here):
    """gpu_check.sh runs each step under ``timeout``: a doctor killed while it compiles must not make
    the next step wait on torch's lock for ever, nor compile again from scratch."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(kernels.python_header())],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        assert proc.stdout.readline().strip() == "building", proc.stderr.read()[-2000:]
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert (kernels.build_folder("nerfacc") / "lock").exists()
    imported = build_here()
    status = kernels.load("nerfacc")
    assert imported == [] and status.status == "unavailable"
    assert f"by process {proc.pid}" in status.detail and "never finished (killed or timed out)" in status.detail
    kernels.forget()
    seen = []
    build_here(lambda module: seen.append((kernels.build_folder("nerfacc") / "lock").exists()))
    assert kernels.load("nerfacc", retry=True).usable and seen == [False]


def test_nvcc_only_under_cuda_home_is_put_on_path_for_nerfacc(fake_cuda, tmp_path, monkeypatch):
    """nerfacc looks for ``nvcc`` on PATH only; torch (and threedgen's doctor) also take CUDA_HOME."""
    from threedgen import doctor

    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (home / "bin" / "nvcc").chmod(0o755)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr("torch.utils.cpp_extension.CUDA_HOME", str(home))
    monkeypatch.setattr(kernels, "nvcc", REAL_NVCC)  # the real ones, not fake_cuda's
    monkeypatch.setattr(kernels, "nvcc_on_path", REAL_NVCC_ON_PATH)
    monkeypatch.delenv("THREEDGEN_DEVICE")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    info = doctor.report()
    assert info["nvcc"] == str(home / "bin" / "nvcc") and info["nvcc_on_path"] is False
    assert "not on PATH, where nerfacc looks for it" in doctor.format_report(info)
    assert "not on PATH" in info["extensions"]["nerfacc"]["detail"]
    seen = []
    fake_cuda(True)
    monkeypatch.setattr(kernels, "_import_backend", lambda module: seen.append(shutil.which("nvcc")) or
                        types.SimpleNamespace(_C=object()))
    assert kernels.load("nerfacc").usable
    assert seen == [str(home / "bin" / "nvcc")]


def test_no_python_headers_is_reported_not_built(build_here, monkeypatch, tmp_path, capsys):
    from threedgen import doctor

    imported = build_here()
    monkeypatch.setattr(kernels, "python_header", lambda: tmp_path / "none" / "Python.h")
    status = kernels.load("gsplat")
    assert imported == [] and status.status == "unavailable"
    assert status.detail.startswith(f"no Python.h at {tmp_path / 'none' / 'Python.h'}")
    monkeypatch.delenv("THREEDGEN_DEVICE")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    info = doctor.report()
    assert info["python_h"] is None and "Python.h       missing" in doctor.format_report(info)


def test_kernels_are_never_built_without_cuda(fresh_kernels, monkeypatch):
    monkeypatch.setattr(kernels, "_import_backend", lambda name: pytest.fail(f"imported {name}"))
    status = kernels.load("gsplat")
    assert status.status == "unavailable" and status.detail == "no CUDA device"


def test_the_web_ui_builds_kernels_before_its_workers_start(tmp_path, monkeypatch):
    from threedgen.jobs.store import JobStore
    from threedgen.jobs.worker import WorkerPool

    order = []
    monkeypatch.setattr(kernels, "prepare", lambda log=None: order.append("prepare") or {})
    monkeypatch.setattr(WorkerPool, "_loop", lambda self, i, device: order.append(f"worker {device}"))
    pool = WorkerPool(JobStore(tmp_path / "jobs.sqlite"), tmp_path / "runs", tmp_path / "out", ["cuda:0", "cuda:1"])
    pool.start()
    pool.stop()
    assert order[0] == "prepare" and sorted(order[1:]) == ["worker cuda:0", "worker cuda:1"]
    order.clear()
    WorkerPool(JobStore(tmp_path / "jobs2.sqlite"), tmp_path / "runs", tmp_path / "out", ["cpu"]).start().stop()
    assert order == ["worker cpu"]


def test_doctor_reports_this_machine(capsys):
    from threedgen.cli import main

    assert main(["doctor", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["extensions"]) == {"gsplat", "nerfacc"}
    assert info["backends"]["nerf"]["sampler"] == "dense" and info["backends"]["gaussians"]["rasteriser"] == "pytorch"
    assert info["auto_device"] == "cpu"
    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert "a NeRF run     field grid, sampler dense" in text and "gsplat" in text


def test_doctor_on_a_cuda_machine_without_a_compiler(fake_cuda, monkeypatch):
    from threedgen import doctor

    monkeypatch.delenv("THREEDGEN_DEVICE")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(kernels, "nvcc", lambda: None)
    monkeypatch.setattr(kernels, "build_folder", lambda name: Path("/nonexistent"))
    info = doctor.report(build=False)
    assert info["extensions"]["gsplat"]["status"] == "unavailable"
    assert info["backends"]["gaussians"]["rasteriser"].startswith("pytorch (fallback: no CUDA toolkit")
    assert info["backends"]["nerf"] == {"field": "hash (torch)", "sampler": "dense (fallback: no CUDA toolkit (nvcc) "
                                        "to build them)"}


# ---- 7. the suite stays on the CPU on a GPU machine ---------------------------------------------

def test_the_suite_is_pinned_to_the_cpu(monkeypatch):
    from threedgen.devices import resolve_device
    from threedgen.jobs.backends import default_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(devices, "no_gpu_driver", lambda: False)
    assert os.environ["THREEDGEN_DEVICE"] == "cpu"
    assert resolve_device("auto") == torch.device("cpu") and default_devices(None) == ["cpu"]
    monkeypatch.delenv("THREEDGEN_DEVICE")  # a user's machine: auto is CUDA
    assert resolve_device("auto") == torch.device("cuda") and default_devices(None) == ["cuda:0", "cuda:1"]


def test_the_pin_reaches_processes_the_suite_starts():
    code = ("import torch; torch.cuda.is_available = lambda: True; from threedgen import devices; "
            "devices.no_gpu_driver = lambda: False; print(devices.resolve_device('auto'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "cpu"


def test_auto_prior_follows_the_pinned_device(monkeypatch):
    from threedgen import runner
    from threedgen.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(devices, "no_gpu_driver", lambda: False)
    seen = {}

    def fake_run(cfg, **kwargs):
        seen["cfg"] = cfg
        raise UserError("stop here")

    monkeypatch.setattr(runner, "run", fake_run)
    assert main(["run", "--prompt", "a red cube", "--no-progress", "prior.shapes=[cube,torus]"]) == 2
    assert seen["cfg"].prior.name == "shapes"


# ---- 8. the smaller findings ----------------------------------------------------------------------

def test_hash_grid_takes_its_own_learning_rates_and_records_its_backend(fake_cuda, capsys):
    cfg = NeRFConfig(field="hash", hash_levels=1, hash_log2_table=10)
    nerf = NeRF(cfg, "cuda")  # no tiny-cuda-nn here: the PyTorch hash grid, said on stderr
    assert nerf.field.backend == "torch" and cfg.hash_backend == "torch"
    assert "tiny-cuda-nn is unavailable" in capsys.readouterr().err
    lrs = {g["name"]: g["lr"] for g in nerf.parameter_groups()}
    assert lrs == {"encoding": 0.01, "mlp": 0.001}
    assert nerf.backends()["field"] == "hash (torch)"
    assert any("tiny-cuda-nn is unavailable" in note for note in nerf.backends()["fallbacks"])
    with pytest.raises(UserError, match="hash_backend=tcnn: tiny-cuda-nn is unavailable"):
        NeRF(NeRFConfig(field="hash", hash_backend="tcnn"), "cuda")


def test_mcmc_relocates_inside_the_runs_window(fake_cuda):
    fake_cuda(True)
    splats = Gaussians(GaussiansConfig(num_points=50, max_gaussians=100, densify="mcmc"), "cuda")
    calls = []
    splats.strategy.step_post_backward = lambda params, opts, state, step, info, lr: calls.append(
        (step, splats.strategy.refine_start_iter, splats.strategy.refine_stop_iter))
    splats.make_optimizers((0.9, 0.999), 1e-8)
    for step in (0, 30, 500):
        means2d = torch.zeros(1, 50, 2, requires_grad=True)
        means2d.sum().backward()
        splats._info = {"means2d": means2d}
        splats.on_step(step, 600)
    # Every step reaches the strategy (its noise), and relocation runs in [60, 360) of 600 steps.
    assert calls == [(0, 60, 360), (30, 60, 360), (500, 60, 360)]


def test_densification_state_follows_the_parameters_on_resume():
    """A checkpoint keeps the device that saved it (another GPU, or the CPU after teardown); the
    statistics must land beside the parameters or the next densification's index_add_ fails."""
    splats = Gaussians(GaussiansConfig(num_points=50, max_gaussians=100))
    state = dict(splats.runtime_state())
    state["grad2d"], state["count"] = torch.zeros(50), torch.zeros(50)  # saved on the CPU
    splats.to("meta")  # the parameters elsewhere (meta stands in for a GPU here)
    splats.load_runtime_state(state)
    tensors = [v for v in splats.runtime_state().values() if torch.is_tensor(v)]
    assert len(tensors) >= 2 and all(v.device.type == "meta" for v in tensors)


def test_out_of_memory_hint_names_the_occgrid_step_size(monkeypatch):
    from threedgen.runner import out_of_memory

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    cfg = tiny_cfg(extra=["representation.sampler=occgrid"])
    failure = out_of_memory(torch.OutOfMemoryError("CUDA out of memory"), cfg, Path("/runs/x"))
    assert "raise representation.render_step_size" in str(failure)
    dense = out_of_memory(torch.OutOfMemoryError("CUDA out of memory"), tiny_cfg(), Path("/runs/x"))
    assert "representation.num_samples" in str(dense)


def test_dense_depth_is_the_expected_depth():
    nerf = NeRF(NeRFConfig(bound=0.5, density_blob_scale=0.0, num_samples=64, skip_empty=False)).eval()
    with torch.no_grad():
        nerf.field.density.fill_(-2.0)  # faint: opacity well below 1
    cams = Cameras.from_angles([0.0], [0.0], 2.0, 10.0, (0.0, 0.0, 0.0))
    out = nerf.render(cams, 1, 1)  # through the box from t=1.5 to 2.5
    assert out.alpha.item() < 0.5 and 1.9 < out.depth.item() < 2.1


def test_status_json_keeps_the_runs_backends_through_later_writes(tmp_path):
    """Previews, failures and interruptions rewrite status.json; the backends (and any fallback
    from a CUDA kernel) stay in it for the whole run."""
    from threedgen.rundir import write_status

    backends = {"rasteriser": "pytorch", "fallbacks": ["gsplat's CUDA kernels are unavailable (...)"]}
    write_status(tmp_path, "running", step=0, max_steps=10, backends=backends)
    write_status(tmp_path, "running", step=5, max_steps=10)  # what the preview callback writes
    assert json.loads((tmp_path / "status.json").read_text())["backends"] == backends
    write_status(tmp_path, "failed", error="out of memory")
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "failed" and status["backends"] == backends and "step" not in status
    (tmp_path / "status.json").write_text("{not json")
    write_status(tmp_path, "interrupted")  # a damaged file is replaced, not fatal
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "interrupted"


def test_torch_build_folder_helper_is_where_we_expect(tmp_path, monkeypatch):
    """kernels.build_folder relies on torch's private ``_get_build_directory`` (no public API):
    fail loudly, naming the torch version, if a torch release moves or changes it."""
    import inspect

    import torch.utils.cpp_extension as ext

    helper = getattr(ext, "_get_build_directory", None)
    assert helper is not None, f"torch {torch.__version__} no longer has cpp_extension._get_build_directory"
    assert list(inspect.signature(helper).parameters)[:2] == ["name", "verbose"], (
        f"torch {torch.__version__} changed _get_build_directory{inspect.signature(helper)}")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = kernels.build_folder("gsplat")
    assert folder.is_relative_to(tmp_path) and folder.name == kernels.EXTENSIONS["gsplat"][1]
