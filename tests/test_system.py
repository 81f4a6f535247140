"""The Lightning system: non-finite steps never reach the parameters; checkpoints and steps."""

import pytest
import torch
from mock_prior import MockPrior

from threedgen.cameras import CameraSampler
from threedgen.config import build_config, parse_overrides
from threedgen.guidance.config import SDSConfig
from threedgen.guidance.sds import SDS
from threedgen.representations.gaussians import PARAM_NAMES, Gaussians
from threedgen.representations.nerf import NeRF
from threedgen.runner import make_trainer, quiet_libraries
from threedgen.system import CameraDataModule, DivergedError, System


class FlakyPrior(MockPrior):
    """Predicts NaN on the calls listed in ``bad_calls``."""

    def __init__(self, bad_calls):
        super().__init__(resolution=16)
        self.bad_calls = set(bad_calls)

    def predict_noise(self, x_t, t, cond, views=None):
        eps = super().predict_noise(x_t, t, cond, views)
        return eps * float("nan") if self.calls in self.bad_calls else eps


def _system(tmp_path, prior, steps, representation="nerf", extra=(), **over):
    quiet_libraries()
    items = ["render.resolution=16", "prior.shapes=[cube]", *extra,
             f"optimizer.rollback_after={over.get('max_bad', 50)}", f"optimizer.max_rollbacks={over.get('rollbacks', 0)}"]
    if representation == "nerf":
        items.append("representation.num_samples=8")
    cfg = build_config(representation=representation, overrides=parse_overrides(items),
                       flags={"prompt": "a red cube", "steps": steps, "checkpoint_every": 2, "preview_every": 1000})
    rep = NeRF(cfg.representation) if representation == "nerf" else Gaussians(cfg.representation, seed=0)
    system = System(cfg, prior, rep, SDS(SDSConfig(guidance_scale=7.5), prior), prior.encode_prompt("p"))
    trainer = make_trainer(cfg, tmp_path, torch.device("cpu"), progress_bar=False)
    return cfg, system, trainer


def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    prior = FlakyPrior(bad_calls={2, 3})
    cfg, system, trainer = _system(tmp_path, prior, steps=4)
    before = [p.detach().clone() for p in system.parameters()]
    trainer.fit(system, datamodule=CameraDataModule(CameraSampler(cfg.camera, 0)))
    assert trainer.global_step == 4  # optimizer steps actually taken
    assert system.skipped_steps == 2 and prior.calls == 6
    for p, b in zip(system.parameters(), before):
        assert torch.isfinite(p).all()
        assert not torch.equal(p, b)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "checkpoints" / "prev.ckpt").is_file()  # step 2's, kept beside step 4's


def test_many_bad_steps_in_a_row_fail_as_diverged(tmp_path):
    prior = FlakyPrior(bad_calls=set(range(1, 100)))
    cfg, system, trainer = _system(tmp_path, prior, steps=50, max_bad=5)
    with pytest.raises(DivergedError, match="diverged: 5 non-finite steps in a row at step 0, after 0 rollback"):
        trainer.fit(system, datamodule=CameraDataModule(CameraSampler(cfg.camera, 0)))


def test_a_rollback_restores_the_gaussians_and_their_optimizers_by_name(tmp_path):
    """Densification after the last good state (step 6) changes the number of Gaussians; three bad
    steps in a row (batches 8-10) roll back to step 6: every parameter and its own optimizer's
    moments come back by name, at the saved size, with the learning rates halved."""
    prior = FlakyPrior(bad_calls={8, 9, 10})
    cfg, system, trainer = _system(tmp_path, prior, steps=12, representation="gaussians", max_bad=3, rollbacks=1,
                                   extra=["representation.num_points=50", "representation.densify_every=1",
                                          "representation.densify_start=0.0", "representation.densify_stop=1.0",
                                          "representation.densify_grad_threshold=1e-9", "representation.max_gaussians=20000"])
    rep = system.representation
    seen = {}
    remember, roll_back = system.remember_good_state, system.roll_back

    def spy_remember():
        remember()
        seen["good_size"] = len(rep)

    def spy_roll_back(reason):
        seen["size_before"], seen["size_good"] = len(rep), seen["good_size"]
        roll_back(reason)
        good = system._good
        seen["size_after"] = len(rep)
        for name in PARAM_NAMES:
            p, opt = rep.params[name], rep.optimizers[name]
            assert opt.param_groups[0]["params"] == [p] and opt.param_groups[0]["params"][0] is p, name
            assert torch.equal(p.detach().cpu(), good["model"][f"representation.params.{name}"]), name
            saved = good["optimizers"][f"representation.{name}"]
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(opt.state[p][key].cpu(), saved["state"][0][key]), (name, key)
            assert opt.param_groups[0]["lr"] == saved["param_groups"][0]["lr"] * 0.5, name
        seen["lrs"] = {name: opt.param_groups[0]["lr"] for name, opt in rep.optimizers.items()}

    system.remember_good_state, system.roll_back = spy_remember, spy_roll_back
    lrs = {g["name"]: g["lr"] for g in rep.parameter_groups()}
    trainer.fit(system, datamodule=CameraDataModule(CameraSampler(cfg.camera, 0)))
    assert system.rollbacks == 1 and system.skipped_steps == 3 and trainer.global_step == 12
    assert seen["size_before"] != seen["size_good"] == seen["size_after"]  # densification was undone
    assert seen["lrs"] == {name: lr * 0.5 for name, lr in lrs.items()}
    for name in PARAM_NAMES:  # training went on through the same optimizers, densifying again
        p, opt = rep.params[name], rep.optimizers[name]
        assert opt.param_groups[0]["params"][0] is p and opt.state[p]["exp_avg"].shape == p.shape


def test_progressive_resolution_renders_coarse_first_and_logs_only_on_logging_steps(tmp_path):
    quiet_libraries()
    items = ["render.resolution=16", "render.coarse_resolution=8", "render.coarse_until=0.5",
             "representation.num_samples=8", "prior.shapes=[cube]"]
    cfg = build_config(overrides=parse_overrides(items), flags={"prompt": "a red cube", "steps": 20,
                                                                "checkpoint_every": 100, "preview_every": 1000})
    prior = MockPrior(resolution=16)
    rep = NeRF(cfg.representation)
    sizes = []
    render = rep.render
    rep.render = lambda cams, h, w: (sizes.append((h, w)), render(cams, h, w))[1]
    system = System(cfg, prior, rep, SDS(SDSConfig(guidance_scale=7.5), prior), prior.encode_prompt("p"))
    logged = []
    log_dict = system.log_dict
    system.log_dict = lambda values, **kw: (logged.append(sorted(values)), log_dict(values, **kw))[1]
    trainer = make_trainer(cfg, tmp_path, torch.device("cpu"), progress_bar=False)
    trainer.fit(system, datamodule=CameraDataModule(CameraSampler(cfg.camera, 0)))
    assert sizes == [(8, 8)] * 10 + [(16, 16)] * 10
    # log_every_n_steps is 10: the logger receives steps 10 and 20, and so does the CSV.
    assert len(logged) == 2 and "loss" in logged[0]
    rows = (tmp_path / "logs" / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[:3] == ["epoch", "grad_norm", "loss"] and len(rows) == 3


def test_render_size_schedule_and_its_errors():
    from threedgen.config import RenderConfig
    from threedgen.errors import UserError

    r = RenderConfig(resolution=64, coarse_resolution=32, coarse_until=0.25)
    assert [r.size_at(s, 100) for s in (0, 24, 25, 99)] == [32, 32, 64, 64]
    assert RenderConfig(resolution=64).size_at(0, 100) == 64
    for item, message in (("render.coarse_resolution=4", "coarse_resolution must be 0"),
                          ("render.coarse_until=1.5", "coarse_until must be a fraction")):
        with pytest.raises(UserError, match=message):
            build_config(overrides=parse_overrides([item]), flags={"prompt": "a red cube"})


def test_a_checkpoint_with_the_old_optimizer_layout_is_a_clear_error(tmp_path):
    """Checkpoints written when one Adam held every parameter (before each part owned its
    optimizers) cannot be resumed with per-parameter optimizers: say so in one line, not Adam's
    size mismatch. A NeRF's layout did not change, so its old checkpoints load."""
    from threedgen.errors import UserError

    _, gaussians, _ = _system(tmp_path / "g", MockPrior(resolution=16), steps=2, representation="gaussians")
    old = {"optimizer_states": [{"state": {}, "param_groups": []}], "threedgen": {"skipped_steps": 0}}
    with pytest.raises(UserError, match="written by an earlier threedgen.*cannot be resumed.*threedgen export"):
        gaussians.on_load_checkpoint(old)
    _, nerf, _ = _system(tmp_path / "n", MockPrior(resolution=16), steps=2)
    nerf.on_load_checkpoint(old)  # one optimizer then and now
    assert nerf.skipped_steps == 0
