"""The Lightning system: one score-distillation run.

``training_step`` is the algorithm: sample cameras (the datamodule) -> render -> guidance ->
regularisers -> step. Optimisation is manual so that a non-finite loss or gradient skips the step
instead of reaching the parameters; ``global_step`` therefore counts optimizer steps taken
(skipped steps are counted separately and logged).

Optimizers: the representation owns its own (``Representation.optimizers``, name -> Adam; the
Gaussians' are gsplat's one Adam per parameter, which its densification edits), the system owns the
guidance's (VSD's fake score) and steps them all. Lightning checkpoints them as a list, in the
order of :meth:`System.named_optimizers`.

Divergence: after ``optimizer.rollback_after`` skipped steps in a row the system goes back to its
last good state (the one its last verified checkpoint holds: parameters, optimizer moments,
densification state) and scales every learning rate by ``optimizer.rollback_lr_factor``; a run
that needs more than ``optimizer.max_rollbacks`` rollbacks fails as diverged.
"""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytorch_lightning as pl
import torch

from threedgen.cameras import Cameras, CameraSampler, CameraStream
from threedgen.errors import RunFailed, UserError
from threedgen.modules import hold
from threedgen.views import render_views


class CameraDataModule(pl.LightningDataModule):
    """Random training cameras drawn from ``(seed, batch number)``; the stream restarts at the
    trainer's step, so a resumed run sees the cameras an uninterrupted run would have (exactly so
    when no step was skipped as non-finite). The checkpoint carries the global RNG state, so the
    timestep and noise draws continue as well."""

    def __init__(self, sampler: CameraSampler):
        super().__init__()
        self.sampler = sampler

    def train_dataloader(self):
        start = self.trainer.global_step if self.trainer is not None else 0
        return torch.utils.data.DataLoader(CameraStream(self.sampler, start), batch_size=None, num_workers=0)

    def transfer_batch_to_device(self, batch: Cameras, device, dataloader_idx: int) -> Cameras:
        return batch.to(device)


class DivergedError(RunFailed):
    pass


def _cpu_copy(value):
    """``value`` (nested dicts and lists of tensors) with every tensor copied to the CPU."""
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(v) for v in value)
    return copy.deepcopy(value)


class System(pl.LightningModule):
    def __init__(self, cfg, prior, representation, guidance, embeds):
        super().__init__()
        self.cfg = cfg
        self.representation = representation
        self.guidance = guidance
        hold(self, "prior", prior)  # the frozen prior is shared and never checkpointed
        self.embeds = embeds
        self.automatic_optimization = False
        self.skipped_steps = 0
        self.rollbacks = 0
        self.lr_scale = 1.0  # product of the rollbacks' learning-rate factors
        self.rolled_back_steps = 0  # optimizer steps undone by rollbacks (they still count toward steps)
        self._bad_in_a_row = 0
        self._good = None
        self._resume_rng = (None, None)  # RNG states of a loaded checkpoint, applied at the first step
        self.guidance_optimizer = None  # Adam over the guidance's trained networks, when it has any

    def configure_optimizers(self):
        """Make every optimizer of the run (the representation keeps its own) and hand them to
        Lightning, which saves and restores their states in this order."""
        opt = self.cfg.optimizer
        betas, eps = tuple(opt.betas), opt.eps
        extra = self.guidance.extra_parameters()
        self.guidance_optimizer = torch.optim.Adam(extra, betas=betas, eps=eps) if extra else None
        self.representation.make_optimizers(betas, eps)
        return list(self.named_optimizers().values())

    def named_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Every optimizer by name, in a fixed order: ``guidance`` (when the guidance trains a
        network), then the representation's as ``representation.<name>``."""
        named = {"guidance": self.guidance_optimizer} if self.guidance_optimizer is not None else {}
        named.update({f"representation.{k}": v for k, v in self.representation.optimizers.items()})
        return named

    def training_step(self, cameras: Cameras, batch_idx: int):
        loss, guided, n = self.step_loss(cameras, self.global_step, self.cfg.steps)
        self.optimise(loss)
        if self._log_now():
            self.log_step(guided, n)
        return loss.detach()

    def step_loss(self, cameras: Cameras, step: int, max_steps: int):
        """(loss, the guidance's output, views) of one step: render -> guidance -> regularisers."""
        size = self.cfg.render.size_at(step, max_steps)
        out = self.representation.render(cameras, size, size)
        guided = self.guide(out.rgb, cameras, step, max_steps)
        return guided.loss + self.regularizers(out), guided, len(cameras)

    def guide(self, rgb: torch.Tensor, cameras: Cameras, step: int, max_steps: int):
        """The guidance's output on this step's renders (a later stage may judge them otherwise)."""
        return self.guidance(rgb, self.embeds, cameras, step, max_steps)

    def optimise(self, loss: torch.Tensor) -> None:
        """Backward, then every optimizer steps when the loss and every gradient are finite; else
        the step is skipped (and after ``optimizer.rollback_after`` in a row, rolled back)."""
        step = self.global_step
        optimizers = self.optimizers()  # Lightning's wrappers, in the order of named_optimizers
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        if not loss.requires_grad:
            loss = self._without_graph(loss)
        if loss.requires_grad:
            self.manual_backward(loss)
        if self._finite(loss):
            # Lightning counts a global step per wrapper step() call: the first optimizer steps
            # through its wrapper (one count per training step), the others directly (the same
            # update: manual optimisation has no closure and no gradient clipping).
            for opt in optimizers[1:]:
                opt.optimizer.step()
            optimizers[0].step()
            self._bad_in_a_row = 0
            self.representation.on_step(self.global_step, self.cfg.steps)
        else:
            self.skipped_steps += 1
            self._bad_in_a_row += 1
            if self._bad_in_a_row >= self.cfg.optimizer.rollback_after:
                self.roll_back(f"{self._bad_in_a_row} non-finite steps in a row at step {step}")

    def _without_graph(self, loss: torch.Tensor) -> torch.Tensor:
        """A loss with no graph (an empty render: nothing sampled, so nothing to differentiate) as
        a skipped step: a graph over every trained parameter whose gradients are NaN, so that the
        step is skipped and counted as a non-finite one is, and under DDP every process's averaged
        gradient is NaN too (all skip together; a process that left out its backward would hang
        the others)."""
        trained = [p.sum().float() for p in self.parameters() if p.requires_grad]
        if not trained:
            return loss.detach() * float("nan")
        return loss.detach() + float("nan") * torch.stack(trained).sum()

    def log_step(self, guided, n: int) -> None:
        """The step's numbers to the logger and the progress bar."""
        self.log_dict({"loss": guided.loss.detach(), "grad_norm": guided.grad_norm,
                       "t": guided.t.float().mean(), "skipped": float(self.skipped_steps),
                       "rollbacks": float(self.rollbacks)},
                      prog_bar=True, on_step=True, batch_size=n)
        extras = {k: float(v) for k, v in guided.extras.items() if isinstance(v, (int, float)) or
                  (isinstance(v, torch.Tensor) and v.numel() == 1)}
        if extras:  # method-specific numbers (VSD's fake-score loss, TSM's inversion calls, ...)
            self.log_dict(extras, on_step=True, batch_size=n)

    @torch.no_grad()
    def preview_image(self, size: int = 128) -> np.ndarray:
        """The training preview: two views (front, right) side by side, ``[size, 2 size, 3]`` uint8."""
        c = self.cfg.camera
        cams = Cameras.from_angles([20.0, 20.0], [0.0, 90.0], float(np.mean(c.distance_range)),
                                   float(np.mean(c.fovy_range))).to(self.device)
        rgb, _ = render_views(self.representation, cams, size)
        return np.concatenate(list(rgb), axis=1)

    def _log_now(self) -> bool:
        """Whether this step's numbers reach the logger: on the batches Lightning writes its logs
        (every ``log_every_n_steps`` batches, skipped steps included, or when the trainer is
        stopping). Lightning's ``log`` costs ~9 ms a call on CPU, more than a 32x32 NeRF step's
        render."""
        trainer = self.trainer
        every = trainer.log_every_n_steps
        batch = trainer.fit_loop.epoch_loop.total_batch_idx  # this batch, counted from 0 across resumes
        return every > 0 and ((batch + 1) % every == 0 or trainer.should_stop)

    def regularizers(self, out) -> torch.Tensor:
        lc = self.cfg.loss
        total = out.rgb.new_zeros(())
        alpha = out.alpha.clamp(1e-5, 1 - 1e-5)
        if lc.lambda_sparsity:
            total = total + lc.lambda_sparsity * alpha.mean()
        if lc.lambda_opaque:
            entropy = -(alpha * alpha.log() + (1 - alpha) * (1 - alpha).log())
            total = total + lc.lambda_opaque * entropy.mean()
        if lc.lambda_smooth:
            smooth = self.representation.smoothness()
            if smooth is not None:
                total = total + lc.lambda_smooth * smooth
        own = self.representation.regularizer(out)
        if own is not None:
            total = total + own
        return total

    def _finite(self, loss: torch.Tensor) -> bool:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        ok = torch.isfinite(loss)
        if grads:
            ok = ok & torch.stack([torch.isfinite(g).all() for g in grads]).all()
        return bool(ok)

    def state_finite(self) -> bool:
        """Every floating tensor a checkpoint would hold (parameters and buffers) is finite."""
        values = [v for v in self.state_dict().values() if torch.is_tensor(v) and v.is_floating_point()]
        return bool(torch.stack([torch.isfinite(v).all() for v in values]).all())

    # ---- divergence: the last good state and rolling back to it ----------------------------
    def remember_good_state(self) -> None:
        """Keep (on the CPU) what the last verified checkpoint holds, for :meth:`roll_back`."""
        self._good = {
            "model": _cpu_copy(self.state_dict()),
            # by optimizer name; loading moves the states back to the parameters' device
            "optimizers": {name: _cpu_copy(opt.state_dict()) for name, opt in self.named_optimizers().items()},
            "runtime": copy.deepcopy(self.representation.runtime_state()),
            "lr_scale": self.lr_scale, "step": self.global_step,
        }

    def roll_back(self, reason: str) -> None:
        opt_cfg = self.cfg.optimizer
        if self.rollbacks >= opt_cfg.max_rollbacks or self._good is None:
            raise DivergedError(f"diverged: {reason}, after {self.rollbacks} rollback(s) to the last good "
                                "checkpoint with lower learning rates; try a lower guidance.guidance_scale or "
                                "learning rate")
        self.rollbacks += 1
        self._bad_in_a_row = 0
        good = self._good
        self.rolled_back_steps += self.global_step - good["step"]
        # Loading may replace parameters (Gaussians change in number); the representation then
        # points their optimizers at the new ones.
        self.load_state_dict({k: v.to(self.device) for k, v in good["model"].items()})
        self.representation.load_runtime_state(copy.deepcopy(good["runtime"]))
        self.lr_scale *= opt_cfg.rollback_lr_factor
        for name, opt in self.named_optimizers().items():
            opt.load_state_dict(copy.deepcopy(good["optimizers"][name]))  # a copy: Adam updates it in place
            for group in opt.param_groups:
                group["lr"] *= self.lr_scale / good["lr_scale"]
        print(f"threedgen: {reason}; rolled back to the last good checkpoint with learning rates x{self.lr_scale:g} "
              f"(rollback {self.rollbacks} of at most {opt_cfg.max_rollbacks}; steps {good['step']}-{self.global_step} "
              "undone)", file=sys.stderr, flush=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["threedgen"] = {"skipped_steps": self.skipped_steps, "rollbacks": self.rollbacks,
                                   "lr_scale": self.lr_scale, "rolled_back_steps": self.rolled_back_steps,
                                   "optimizers": list(self.named_optimizers()),
                                   "runtime": self.representation.runtime_state(),
                                   "rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            checkpoint["threedgen"]["cuda_rng"] = torch.cuda.get_rng_state(self.device)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("threedgen", {})
        saved = len(checkpoint.get("optimizer_states", []))
        if "optimizers" not in state and saved:  # written before each part owned its optimizers
            opt = self.cfg.optimizer
            now = len(self.representation.make_optimizers(tuple(opt.betas), opt.eps))
            now += 1 if self.guidance.extra_parameters() else 0
            if now != saved:
                raise UserError("this run's checkpoint was written by an earlier threedgen, whose optimizer "
                                "layout differs; it cannot be resumed, but `threedgen export` and `threedgen eval` "
                                "still read it")
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.rollbacks = int(state.get("rollbacks", 0))
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.rolled_back_steps = int(state.get("rolled_back_steps", 0))
        if state.get("runtime") is not None:
            self.representation.load_runtime_state(state["runtime"])
        # The timestep and noise draws continue where the saved run was (the cameras restart at
        # the saved step by themselves). Applied at the first step: starting the data loader
        # draws from the global RNG once, which the uninterrupted run did before its first step.
        self._resume_rng = (state.get("rng"), state.get("cuda_rng"))

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        rng, cuda_rng = self._resume_rng
        self._resume_rng = (None, None)
        if isinstance(rng, torch.Tensor):
            torch.set_rng_state(rng.cpu())
        if isinstance(cuda_rng, torch.Tensor) and self.device.type == "cuda":
            torch.cuda.set_rng_state(cuda_rng.cpu(), self.device)
