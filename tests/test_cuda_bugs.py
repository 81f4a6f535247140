"""Five CUDA-only faults found by reading the CUDA path (the GPU readiness review), reproduced on
the CPU (the ``meta`` device stands in for a GPU; CUDA's answers are monkeypatched) and checked gone:

1. the amortised generator's renderer left on the CPU (and ``nerf_for`` returning a CPU NeRF);
2. every DDP process building its prior on GPU 0;
3. an empty occupancy grid after its forced update, and a loss without a graph crashing the step;
4. the sampler a run trained with not recorded, so export elsewhere builds another one;
5. a NeRF training render far beyond the GPU's memory, not refused before the run.
"""

from __future__ import annotations

import sys

import nerfacc
import pytest
import torch
from mock_prior import MockPrior
from test_cuda_path import tiny_cfg  # the same tiny run

from threedgen import kernels, memory
from threedgen.cameras import Cameras, CameraSampler, ray_aabb
from threedgen.config import build_config, to_yaml
from threedgen.errors import UserError
from threedgen.representations.base import RenderOutput
from threedgen.representations.config import NeRFConfig, PromptGridsConfig
from threedgen.representations.nerf import NeRF
from threedgen.representations.prompt_grids import PromptGrids
from threedgen.schema import CameraSamplerConfig


def _devices(module: torch.nn.Module) -> dict[str, str]:
    return {name: t.device.type for name, t in [*module.named_parameters(), *module.named_buffers()]}


# ---- 1. the amortised generator's renderer ------------------------------------------------------

def _generator(device="cpu"):
    return PromptGrids(NeRFConfig(density_resolution=8, color_resolution=4), PromptGridsConfig(latent=2, hidden=8),
                       4, device)


def test_generator_builds_its_renderer_on_its_device():
    generator = _generator("meta")
    renderer = _devices(generator._renderer)
    assert "nerf.empty_grid.value" in renderer and "nerf.empty_grid.occupied" in renderer
    assert set(renderer.values()) == {"meta"}, renderer
    assert set(_devices(generator).values()) == {"meta"}


def test_moving_the_generator_moves_its_held_renderer():
    generator = _generator()
    keys = set(generator.state_dict())
    generator.to("meta")
    assert set(_devices(generator._renderer).values()) == {"meta"}
    assert set(generator.state_dict()) == keys and not any(k.startswith("_renderer") for k in keys)  # still held


def test_nerf_for_is_on_the_generators_device():
    generator = _generator("meta")
    nerf = generator.nerf_for(torch.zeros(4, device="meta"), NeRFConfig(density_resolution=8, color_resolution=4))
    assert set(_devices(nerf).values()) == {"meta"} and not nerf.training


def test_empty_space_box_moves_with_the_nerf():
    nerf = NeRF(NeRFConfig(density_resolution=8, color_resolution=4, skip_grid=8))
    nerf.render(Cameras.from_angles([20.0], [0.0], 2.5, 40.0), 4, 4)  # builds the grid and its box
    assert nerf.empty_grid.fresh and nerf.empty_grid.box.abs().sum() > 0
    nerf.to("meta")
    assert nerf.empty_grid.box.device.type == "meta"


# ---- 2. amortised DDP: each process on its own GPU ------------------------------------------------

def test_each_ddp_process_takes_the_gpu_of_its_local_rank():
    from threedgen.amortised import process_device

    cuda = torch.device("cuda")
    assert process_device(cuda, 2, 1, env={"LOCAL_RANK": "1"}) == torch.device("cuda", 1)
    assert process_device(cuda, 1, 2, env={"LOCAL_RANK": "1"}) == torch.device("cuda", 1)  # 2 nodes of one GPU
    assert process_device(cuda, 2, 1, env={}) == torch.device("cuda", 0)  # the launching process
    assert process_device(cuda, 1, 1, env={"LOCAL_RANK": "1"}) == cuda  # one process: as before
    assert process_device(torch.device("cuda", 3), 1, 1, env={}) == torch.device("cuda", 3)
    assert process_device(torch.device("cpu"), 2, 1, env={"LOCAL_RANK": "1"}) == torch.device("cpu")  # gloo


class _Built(Exception):
    pass


def test_train_amortised_builds_rank_ones_prior_on_gpu_one(monkeypatch, tmp_path):
    from threedgen import amortised
    from threedgen.guidance import priors

    calls = []
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(amortised, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", torch.device(device))))

    def build_prior(cfg, device):
        calls.append(("build_prior", torch.device(device)))
        raise _Built

    monkeypatch.setattr(priors, "build_prior", build_prior)
    cfg = tiny_cfg()
    with pytest.raises(_Built):
        amortised.train_amortised(cfg, PromptGridsConfig(latent=2, hidden=8), ["a red cube", "a blue torus"],
                                  tmp_path / "model", devices=2, progress_bar=False)
    assert calls == [("set_device", torch.device("cuda", 1)), ("build_prior", torch.device("cuda", 1))]


def test_train_amortised_on_one_gpu_is_as_before(monkeypatch, tmp_path):
    from threedgen import amortised
    from threedgen.guidance import priors

    calls = []
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(amortised, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))

    def build_prior(cfg, device):
        calls.append(("build_prior", device))
        raise _Built

    monkeypatch.setattr(priors, "build_prior", build_prior)
    with pytest.raises(_Built):
        amortised.train_amortised(tiny_cfg(), PromptGridsConfig(latent=2, hidden=8), ["a red cube"],
                                  tmp_path / "model", progress_bar=False)
    assert calls == [("build_prior", torch.device("cuda"))]


# ---- 3. an empty occupancy grid, an empty render -------------------------------------------------

def _estimator(res=32):
    return nerfacc.OccGridEstimator(roi_aabb=[-1.0] * 3 + [1.0] * 3, resolution=res, levels=1).train()


def _uniform_nerf(raw: float) -> NeRF:
    nerf = NeRF(NeRFConfig(field="grid", sampler="dense", skip_empty=False, density_blob_scale=0.0,
                           density_resolution=8, color_resolution=4)).train()
    with torch.no_grad():
        nerf.field.density.fill_(raw)
    return nerf


def _empty_after_update(raw: float) -> bool:
    """Whether nerfacc's own update leaves the grid empty on a uniform field of ``raw``."""
    nerf, estimator = _uniform_nerf(raw), _estimator()
    estimator.update_every_n_steps(0, occ_eval_fn=lambda x: nerf.density(x) * nerf.cfg.render_step_size,
                                   occ_thre=0.01)
    return not bool(estimator.binaries.any())


def test_a_uniform_field_never_leaves_the_occupancy_grid_empty():
    # nerfacc marks a cell occupied above min(mean, 0.01): on a uniform field the float mean may
    # round above every cell's value (some constants do, on the CPU as on the GPU).
    raw = next((r / 10 for r in range(-30, 6) if _empty_after_update(r / 10)), None)
    assert raw is not None, "no uniform density empties nerfacc's grid any more: pick another case"
    nerf = _uniform_nerf(raw)
    nerf.estimator = _estimator()
    nerf._update_occgrid(0)  # the forced update before the first training render
    assert bool(nerf.estimator.binaries.all())


def test_a_blob_keeps_its_own_occupancy():
    nerf = NeRF(NeRFConfig(field="grid", sampler="dense", density_resolution=8, color_resolution=4)).train()
    nerf.estimator = _estimator()
    nerf._update_occgrid(0)
    occupied = float(nerf.estimator.binaries.float().mean())
    assert 0.01 < occupied < 0.5  # nerfacc's own answer, not filled
    nerf._update_occgrid(5)  # not an update step: nothing changes
    assert float(nerf.estimator.binaries.float().mean()) == occupied


class _EmptyRenders:
    """Turns the NeRF's renders on the listed calls into empty ones: the background, no graph."""

    def __init__(self, nerf: NeRF, empty_calls):
        self.calls, self.empty_calls, render = 0, set(empty_calls), nerf.render

        def patched(cameras, height, width):
            self.calls += 1
            out = render(cameras, height, width)
            if self.calls in self.empty_calls:
                b = len(cameras)
                bg = cameras.background[:, None, None, :].expand(b, height, width, 3).detach().clone()
                return RenderOutput(bg, torch.zeros(b, height, width, 1), torch.zeros(b, height, width, 1))
            return out

        nerf.render = patched


def test_a_loss_without_a_graph_is_a_skipped_step(tmp_path):
    from threedgen.guidance.config import SDSConfig
    from threedgen.guidance.sds import SDS
    from threedgen.runner import make_trainer, quiet_libraries
    from threedgen.system import CameraDataModule, System

    quiet_libraries()
    cfg = tiny_cfg(steps=4, extra=["loss.lambda_smooth=0", "optimizer.rollback_after=50", "checkpoint_every=2"])
    prior = MockPrior(resolution=16)
    nerf = NeRF(cfg.representation)
    counter = _EmptyRenders(nerf, empty_calls={2, 3})
    system = System(cfg, prior, nerf, SDS(SDSConfig(guidance_scale=7.5), prior), prior.encode_prompt("p"))
    trainer = make_trainer(cfg, tmp_path, torch.device("cpu"), progress_bar=False)
    trainer.fit(system, datamodule=CameraDataModule(CameraSampler(cfg.camera, 0)))
    assert counter.calls == 6 and system.skipped_steps == 2 and trainer.global_step == 4
    assert all(torch.isfinite(p).all() for p in system.parameters())


def test_a_graphless_loss_gives_every_parameter_a_nan_gradient():
    """Under DDP every process's averaged gradient is then NaN: all skip the step together."""
    from threedgen.guidance.config import SDSConfig
    from threedgen.guidance.sds import SDS
    from threedgen.system import System

    cfg = tiny_cfg()
    prior = MockPrior(resolution=16)
    system = System(cfg, prior, NeRF(cfg.representation), SDS(SDSConfig(), prior), prior.encode_prompt("p"))
    loss = system._without_graph(torch.tensor(0.5))
    loss.backward()
    grads = [p.grad for p in system.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isnan(g).all() for g in grads)
    assert not system._finite(loss)


# ---- 4. the sampler a run trained with -------------------------------------------------------------

def test_a_nerf_records_the_sampler_it_chose(monkeypatch):
    cfg = NeRFConfig(density_resolution=8, color_resolution=4)
    NeRF(cfg)
    assert cfg.sampler == "dense"  # auto on the CPU
    from threedgen.representations import nerf as nerf_module

    monkeypatch.setattr(nerf_module.kernels, "choose", lambda *a: ("occgrid", []))  # CUDA with nerfacc's kernels
    cfg = NeRFConfig(field="grid", density_resolution=8, color_resolution=4)
    built = NeRF(cfg, "cuda")
    assert built.estimator is not None and cfg.sampler == "occgrid"


def test_a_run_records_its_sampler_in_config_yaml(tmp_path):
    from threedgen.runner import run

    run_dir = run(tiny_cfg(steps=1), out=tmp_path, progress_bar=False)
    text = (run_dir / "config.yaml").read_text()
    assert "sampler: dense" in text and "sampler: auto" not in text


def _occgrid_run(tmp_path, recorded: str):
    """A run folder as a GPU run with nerfacc's sampler writes it: config.yaml saying ``recorded``
    (``occgrid``, or ``auto`` as before the sampler was recorded) and a checkpoint holding the
    occupancy grid beside the field."""
    cfg = tiny_cfg()
    cfg.representation.sampler = "dense"
    torch.manual_seed(0)
    nerf = NeRF(cfg.representation)
    with torch.no_grad():
        nerf.field.density.normal_()
    estimator = nerfacc.OccGridEstimator(roi_aabb=[-1.0] * 3 + [1.0] * 3, resolution=cfg.representation.occgrid_resolution,
                                         levels=1)
    state = {**{f"representation.{k}": v for k, v in nerf.state_dict().items()},
             **{f"representation.estimator.{k}": v for k, v in estimator.state_dict().items()}}
    cfg.representation.sampler = recorded
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    torch.save({"state_dict": state, "global_step": 2}, run_dir / "checkpoints" / "last.ckpt")
    return run_dir, nerf.field.density.detach().clone()


@pytest.mark.parametrize("recorded", ["occgrid", "auto"])
def test_an_occgrid_run_loads_with_the_dense_sampler_where_nerfacc_does_not_run(tmp_path, capsys, recorded):
    from threedgen.runs import load_representation

    run_dir, density = _occgrid_run(tmp_path, recorded)
    cfg, representation, _ = load_representation(run_dir)  # the CPU: no nerfacc kernels
    assert representation.sampler_kind == "dense" and representation.estimator is None
    torch.testing.assert_close(representation.field.density, density)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "occupancy-grid sampler" in err[0] and "dense sampler" in err[0]
    assert cfg.representation.sampler == recorded  # the run's own config is left as it recorded it


def test_export_of_an_occgrid_run_on_the_cpu(tmp_path, capsys):
    from threedgen.cli import main

    run_dir, _ = _occgrid_run(tmp_path, "occgrid")
    code = main(["export", str(run_dir), "--format", "ply"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (run_dir / "mesh.ply").is_file()


def test_sampler_here_on_a_gpu(monkeypatch, capsys):
    from threedgen.runs import sampler_here

    grid = {"field.density": 0, "estimator.binaries": 1, "estimator.occs": 2}
    plain = {"field.density": 0}
    monkeypatch.setattr(kernels, "usable", lambda name: True)
    # auto (recorded before the sampler was): the checkpoint says which
    assert sampler_here(NeRFConfig(), plain, "cuda")[0].sampler == "dense"  # a CPU run exported on a GPU
    cfg, state = sampler_here(NeRFConfig(), grid, "cuda")
    assert cfg.sampler == "occgrid" and state == grid
    cfg, state = sampler_here(NeRFConfig(sampler="occgrid"), grid, "cuda")
    assert cfg.sampler == "occgrid" and state == grid and capsys.readouterr().err == ""
    # a GPU without nerfacc's kernels: the dense sampler, the grid left out, one line
    monkeypatch.setattr(kernels, "usable", lambda name: False)
    monkeypatch.setattr(kernels, "load", lambda name: kernels.KernelStatus(name, "unavailable", "no nvcc"))
    cfg, state = sampler_here(NeRFConfig(sampler="occgrid"), grid, "cuda")
    assert cfg.sampler == "dense" and state == plain
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no nvcc" in err[0]


# ---- 5. the training render's memory -------------------------------------------------------------

def _saved_bytes(nerf: NeRF, cams: Cameras, size: int) -> tuple[int, int]:
    """(bytes the render keeps for backward, parameters left out; points the field evaluates)."""
    params = {p.untyped_storage().data_ptr() for p in nerf.parameters()}
    kept, evaluated = {}, [0]
    field = nerf.density_and_color

    def counted(points):
        evaluated[0] += len(points)
        return field(points)

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    nerf.density_and_color = counted
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nerf.render(cams, size, size)
    return sum(kept.values()), evaluated[0]


@pytest.mark.parametrize("field,skip,distance", [("hash", False, 2.5), ("hash", True, 2.5), ("hash", True, 1.8),
                                                 ("grid", True, 2.5)])
def test_the_estimate_matches_a_count_of_what_a_render_keeps(field, skip, distance):
    torch.manual_seed(0)
    cfg = NeRFConfig(field=field, hash_levels=4, hash_log2_table=12, num_samples=32, skip_empty=skip)
    camera = CameraSamplerConfig(elevation_range=(20.0, 20.0), distance_range=(distance, distance))
    nerf = NeRF(cfg).train()
    size = 24
    measured, evaluated = _saved_bytes(nerf, Cameras.from_angles([20.0], [0.0], distance, 40.0), size)
    marched, estimated = memory.samples_per_view(cfg, "dense", camera, size)
    assert 0.7 < estimated / evaluated < 1.4
    kept, transient = memory.field_bytes(field, "torch", cfg.hash_levels)
    assert 0.7 < (marched * memory.MARCH_BYTES + estimated * kept) / measured < 1.4
    assert 0.7 * measured < memory.render_bytes(cfg, field, "torch", "dense", camera, size) < 2.5 * measured


@pytest.mark.parametrize("blob,step", [(10.0, 0.005), (4.0, 0.005), (10.0, 0.02)])
def test_the_occgrid_estimate_matches_nerfaccs_own_grid(blob, step):
    """Samples a view marches through the cells nerfacc's first update marks occupied (its march is
    CUDA only: a CPU twin steps through them), against the estimate's."""
    cfg = NeRFConfig(field="grid", density_blob_scale=blob, render_step_size=step)
    nerf = NeRF(cfg).train()
    estimator = _estimator(cfg.occgrid_resolution)
    estimator.update_every_n_steps(0, occ_eval_fn=lambda x: nerf.density(x) * step, occ_thre=0.01)
    o, d = Cameras.from_angles([20.0], [0.0], 2.5, 40.0).rays(48, 48)
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    near, far = ray_aabb(o, d, cfg.bound)
    t = near[:, None] + step * (torch.arange(int((far - near).max() / step) + 1)[None] + 0.5)
    res = cfg.occgrid_resolution
    cell = ((o[:, None] + d[:, None] * t[..., None]) / cfg.bound + 1).mul(res / 2).long().clamp(0, res - 1)
    counted = int((estimator.binaries[0][cell[..., 0], cell[..., 1], cell[..., 2]] & (t < far[:, None])).sum())
    camera = CameraSamplerConfig(elevation_range=(20.0, 20.0))
    estimated = memory.samples_per_view(cfg, "occgrid", camera, 48)[1]
    assert 0.7 < estimated / counted < 1.4


def _big_render_cfg(resolution=512, extra=()):
    return tiny_cfg(extra=[f"render.resolution={resolution}", "representation.num_samples=32",
                           "representation.density_resolution=64", "representation.color_resolution=32", *extra])


def _fake_gpu(monkeypatch, gigabytes: float, sampler="occgrid"):
    """A CUDA device of ``gigabytes`` without tiny-cuda-nn, where nerfacc's sampler is ``sampler``."""
    monkeypatch.setattr(memory, "device_memory", lambda device: int(gigabytes * 1e9))
    monkeypatch.setattr(kernels, "choose", lambda *a: (sampler, []))
    monkeypatch.setitem(sys.modules, "tinycudann", None)  # import fails: the PyTorch hash grid


def test_a_render_beyond_the_gpus_memory_is_refused_in_one_line(monkeypatch):
    _fake_gpu(monkeypatch, 8)
    cfg = _big_render_cfg()
    with pytest.raises(UserError) as info:
        memory.check_training_memory(cfg, torch.device("cuda"))
    message = str(info.value)
    assert len(message.splitlines()) == 1
    need = memory.render_bytes(cfg.representation, "hash", "torch", "occgrid", cfg.camera, 512)
    assert need > 8e9 and f"about {need / 1e9:.0f} GB" in message and "has 8.0 GB" in message
    assert "512x512" in message and "PyTorch hash grid" in message and "occgrid" in message
    assert "render.resolution" in message and "render_step_size" in message and "tiny-cuda-nn" in message
    fits = int(message.split("about ")[2].split(" fits")[0])
    assert memory.render_bytes(cfg.representation, "hash", "torch", "occgrid", cfg.camera, fits) <= 8e9
    # the dense sampler's knob is its samples per ray
    _fake_gpu(monkeypatch, 1, sampler="dense")
    with pytest.raises(UserError, match="lower representation.num_samples"):
        memory.check_training_memory(cfg, torch.device("cuda"))


def test_a_render_that_fits_and_the_cpu_are_never_refused(monkeypatch):
    _fake_gpu(monkeypatch, 80)
    need = memory.check_training_memory(_big_render_cfg(64), torch.device("cuda"))
    assert need is not None and 1e7 < need < 80e9
    assert memory.check_training_memory(_big_render_cfg(1024), torch.device("cpu"), memory=1) is None
    gaussians = build_config(representation="gaussians", flags={"prompt": "a red cube"})
    assert memory.check_training_memory(gaussians, torch.device("cuda"), memory=1) is None


def test_estimate_grows_with_what_the_user_can_turn():
    cfg, camera = NeRFConfig(), CameraSamplerConfig()
    base = memory.render_bytes(cfg, "hash", "torch", "occgrid", camera, 256)
    assert memory.render_bytes(cfg, "hash", "torch", "occgrid", camera, 512) == pytest.approx(4 * base, rel=0.01)
    assert memory.render_bytes(cfg, "hash", "torch", "occgrid", camera, 256, views=2) == pytest.approx(2 * base, rel=0.01)
    assert memory.render_bytes(cfg, "hash", "tcnn", "occgrid", camera, 256) < base / 3
    coarse = NeRFConfig(render_step_size=0.01)
    assert memory.render_bytes(coarse, "hash", "torch", "occgrid", camera, 256) < 0.6 * base


def test_the_run_is_refused_before_the_prior_is_built(monkeypatch, tmp_path):
    from threedgen import runner

    _fake_gpu(monkeypatch, 4)
    monkeypatch.setattr(runner, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(runner, "build_components", lambda *a, **k: pytest.fail("the prior was built"))
    with pytest.raises(UserError, match=r"training render needs about .* but cuda has 4\.0 GB"):
        runner.run(_big_render_cfg(), out=tmp_path / "out", progress_bar=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_web_ui_refuses_at_submit_on_a_small_gpu(monkeypatch, tmp_path):
    from threedgen.webui.service import Settings, validate

    _fake_gpu(monkeypatch, 4)
    settings = Settings(outputs=tmp_path / "out", state=tmp_path / "state", devices=["cuda:0", "cuda:1"])
    args = ("a red cube", "", "sds", "nerf", "shapes", 1, "0")
    with pytest.raises(UserError, match="training render needs about") as info:
        validate(settings, *args, 512)
    assert len(str(info.value).splitlines()) == 1
    assert len(validate(settings, *args, 64)) == 1  # a render that fits
    cpu = Settings(outputs=tmp_path / "out", state=tmp_path / "state", devices=["cpu"])
    assert len(validate(cpu, *args, 512)) == 1  # the CPU: never refused
    ray = Settings(outputs=tmp_path / "out", state=tmp_path / "state", devices=["cuda:0"], backend="ray")
    assert len(validate(ray, *args, 512)) == 1  # its GPUs are elsewhere: the job says it
    gr = pytest.importorskip("gradio")
    from threedgen.webui.app import guard

    with pytest.raises(gr.Error, match="training render needs about"):
        guard(validate)(settings, *args, 512)
