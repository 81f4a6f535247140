"""The amortised Lightning system: one generator trained by score distillation over a prompt set.

Beside the per-prompt ``System`` and built on it (the same manual optimisation, skipped
non-finite steps, rollbacks, checkpoint hooks and logging); only a step's loss differs. A step
draws ``prompts_per_step`` prompts and ``camera.batch_size`` cameras for each, generates each
prompt's grids, renders them, and averages the guidance's losses (each prompt against its own
text conditioning) and the regularisers.

Under DDP (``Trainer(strategy="ddp", num_nodes=..., devices=...)``) every process draws other
prompts and cameras from the same stream (``PromptStream``: process ``r`` of ``W`` takes slots
``(step * W + r) * P ...``), Lightning averages the gradients, and every process takes the same
step; with ``W`` processes and ``P`` prompts each, a step sees ``W * P`` prompts.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytorch_lightning as pl
import torch

from threedgen.cameras import Cameras, CameraSampler
from threedgen.system import System

PREVIEW_PROMPTS = 8  # prompts in a preview row


class PromptStream(torch.utils.data.IterableDataset):
    """Batches ``(prompt indices [P], slots [P], cameras [P * V])`` from step ``start`` on, for process
    ``rank`` of ``world``. Prompts come from an endless sequence of permutations of all of them
    (seeded per pass), so every prompt is seen equally often; each slot's cameras come from the
    run's camera sampler keyed by the slot. Reproducible from the step: a resumed run draws what
    an uninterrupted one would have."""

    def __init__(self, n_prompts: int, per_step: int, sampler: CameraSampler, seed: int, start: int = 0,
                 rank: int = 0, world: int = 1):
        super().__init__()
        self.n, self.per_step, self.sampler, self.seed = n_prompts, per_step, sampler, seed
        self.start, self.rank, self.world = start, rank, world
        self._order = (-1, None)  # (pass, its permutation of the prompts)

    def prompt_at(self, slot: int) -> int:
        epoch, i = divmod(slot, self.n)
        if self._order[0] != epoch:  # one permutation per pass, drawn when the pass starts
            self._order = (epoch, torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch)))
        return int(self._order[1][i])

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, Cameras]:
        first = (step * self.world + self.rank) * self.per_step
        slots = range(first, first + self.per_step)
        cameras = [self.sampler.sample(slot) for slot in slots]
        views = cameras[0]
        for c in cameras[1:]:
            views = views.cat(c)
        return torch.tensor([self.prompt_at(s) for s in slots]), torch.tensor(list(slots)), views

    def __iter__(self):
        step = self.start
        while True:
            yield self.batch(step)
            step += 1


class PromptDataModule(pl.LightningDataModule):
    def __init__(self, n_prompts: int, per_step: int, sampler: CameraSampler, seed: int):
        super().__init__()
        self.args = (n_prompts, per_step, sampler, seed)

    def train_dataloader(self):
        trainer = self.trainer
        start = trainer.global_step if trainer is not None else 0
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return torch.utils.data.DataLoader(PromptStream(*self.args, start=start, rank=rank, world=world),
                                           batch_size=None, num_workers=0)

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        indices, slots, cameras = batch
        return indices.to(device), slots, cameras.to(device)


class AmortisedSystem(System):
    """``representation`` is the generator (``PromptGrids``); ``vectors [N,D]`` and ``embeds`` (a
    list) are the training prompts' vectors and text conditionings, in the prompt file's order."""

    def __init__(self, cfg, prior, generator, guidance, prompts: list[str], vectors: torch.Tensor, embeds: list):
        super().__init__(cfg, prior, generator, guidance, embeds)
        self.prompts = list(prompts)
        self.register_buffer("vectors", vectors.float(), persistent=False)

    def step_loss(self, batch, step: int, max_steps: int):
        indices, slots, cameras = batch
        gen, size = self.representation, self.cfg.render.size_at(step, max_steps)
        density, color = gen.grids(self.vectors[indices])
        per = len(cameras) // len(indices)
        losses, grad_norms, ts, extras = [], [], [], {}
        total = density.new_zeros(())
        for i, (prompt, slot) in enumerate(zip(indices.tolist(), slots.tolist())):
            views = cameras[i * per:(i + 1) * per]
            # Each slot's random draws (ray jitter, timesteps, noise) from the slot alone: a run
            # is the same whether its slots are spread over one process or several.
            torch.manual_seed(self.cfg.seed * 1_000_003 + slot)
            out = gen.render_grids(density[i], color[i], views, size, size)
            guided = self.guidance(out.rgb, self.embeds[prompt], views, step, max_steps)
            total = total + guided.loss + self.regularizers(out)
            losses.append(guided.loss.detach())
            grad_norms.append(guided.grad_norm)
            ts.append(guided.t)
            for k, v in guided.extras.items():
                extras.setdefault(k, []).append(v)
        loss = total / len(indices)
        if self.cfg.loss.lambda_smooth:
            loss = loss + self.cfg.loss.lambda_smooth * gen.total_variation(density)
        if gen.cfg.color_smooth:
            loss = loss + gen.cfg.color_smooth * gen.total_variation(color)
        # Averages over the prompts, left on the device: ``log_step`` reads them on logging steps only.
        guided = SimpleNamespace(loss=torch.stack(losses).mean(), grad_norm=torch.stack(grad_norms).mean(),
                                 t=torch.cat(ts), extras={k: sum(v) / len(v) for k, v in extras.items()})
        return loss, guided, len(cameras)

    @torch.no_grad()
    def preview_image(self, size: int = 96) -> np.ndarray:
        """The training preview: ``preview_indices`` of the prompts, one view each, in a row."""
        return prompt_grid_image(self.representation, self.vectors[preview_indices(len(self.prompts))], self.cfg, size)


def preview_indices(n: int) -> list[int]:
    """``PREVIEW_PROMPTS`` prompts spread evenly over the file (all of them when fewer)."""
    if n <= PREVIEW_PROMPTS:
        return list(range(n))
    return sorted({round(i * (n - 1) / (PREVIEW_PROMPTS - 1)) for i in range(PREVIEW_PROMPTS)})


def prompt_grid_image(generator, vectors: torch.Tensor, cfg, size: int = 96) -> np.ndarray:
    """Views (elevation 20, azimuth 30) of the prompts' generated NeRFs side by side, uint8."""
    c = cfg.camera
    cams = Cameras.from_angles([20.0], [30.0], float(np.mean(c.distance_range)),
                               float(np.mean(c.fovy_range))).to(vectors.device)
    was = generator.training
    generator.eval()
    density, color = generator.grids(vectors)
    tiles = []
    for d, col in zip(density, color):
        out = generator.render_grids(d, col, cams, size, size)
        tiles.append((out.rgb[0].clamp(0, 1) * 255).round().byte().cpu().numpy())
    generator.train(was)
    return np.concatenate(tiles, axis=1)
