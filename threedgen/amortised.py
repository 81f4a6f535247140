"""Amortised text-to-3D: train one generator over a prompt set, then generate any prompt of its
vocabulary in milliseconds (``threedgen train-amortised``, ``threedgen generate``, the web UI's
instant tab).

Training is a Lightning run of ``AmortisedSystem`` with the per-prompt run's guidance methods,
config layers, checkpoints, rollbacks, progress bar and CSV log; it runs on one process or, with
``devices``/``nodes`` above 1, under Lightning's DDP (gloo on CPUs, NCCL on GPUs), launched by
Lightning itself or by ``torchrun`` (docs/amortised.md). Generation writes the same
run folder a per-prompt run writes (``config.yaml``, ``checkpoints/last.ckpt`` holding the
generated NeRF, meshes, turntable, previews, ``metrics.json``), so ``threedgen export`` and
``threedgen eval`` work on it.
"""

from __future__ import annotations

import copy
import hashlib
import os
import time
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
import torch

from threedgen import __version__
from threedgen.amortised_folder import (
    FORMAT,
    check_prompt_known,
    known_words,
    launched_rank,
    read_meta,
    write_meta,
)
from threedgen.amortised_system import AmortisedSystem, PromptDataModule
from threedgen.callbacks import SafeCheckpoint
from threedgen.cameras import CameraSampler
from threedgen.checkpoints import choose_checkpoint, read_checkpoint, save_checkpoint
from threedgen.config import RunConfig, load_run_config, to_yaml
from threedgen.devices import resolve_device
from threedgen.errors import UserError
from threedgen.guidance import priors
from threedgen.guidance.config import GUIDANCE
from threedgen.guidance.priors.config import PRIORS
from threedgen.representations.config import PromptGridsConfig
from threedgen.representations.prompt_grids import PromptGrids, grid_nerf_config
from threedgen.rundir import RunFolder, atomic_path, atomic_write_text, check_writable, new_run_dir, write_status
from threedgen.runner import finish_run, make_trainer
from threedgen.runs import CONFIG_NAME, print_err, quiet_libraries, warn_checkpoint
from threedgen.schema import clean_prompt, is_ascii_integer
from threedgen.views import write_image


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of a module's state, in key order: equal on every DDP process."""
    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def process_device(device: torch.device, devices: int = 1, nodes: int = 1, env=None) -> torch.device:
    """This process's device for training on ``devices`` x ``nodes``: ``device`` itself, except
    under DDP on GPUs (more than one process), where each process takes the GPU of its local rank
    (``LOCAL_RANK``, set by Lightning's launcher and by torchrun; 0 in the process that launches
    the others), as Lightning places each rank's module: the prior and the generator are built
    there, not on GPU 0. ``env``: the environment (default ``os.environ``)."""
    if device.type != "cuda" or devices * nodes <= 1:
        return device
    value = (os.environ if env is None else env).get("LOCAL_RANK", "0")
    return torch.device("cuda", int(value) if is_ascii_integer(value) else 0)


def train_amortised(cfg: RunConfig, gen_cfg: PromptGridsConfig, prompts: list[str], folder: str | Path,
                    resume: bool = False, steps: Optional[int] = None, devices: int = 1, nodes: int = 1,
                    progress_bar: bool = True) -> Path:
    """Train (or with ``resume`` continue) an amortised model in ``folder``; returns the folder.

    ``cfg`` and ``prompts`` are checked (every prompt by the prior's rules) and ignored on resume,
    where the folder's own config and prompts are used (only ``steps`` may change)."""
    quiet_libraries()
    rank = launched_rank()
    folder = Path(folder).expanduser()
    ckpt_path = None
    if resume:
        folder, meta = read_meta(folder)
        cfg = load_run_config(folder / CONFIG_NAME, flags={"steps": steps} if steps else None)
        prompts, gen_cfg = list(meta["prompts"]), PromptGridsConfig(**meta["generator"])
        chosen = choose_checkpoint(folder, warn=warn_checkpoint, repair=rank == 0)
        ckpt_path = str(chosen) if chosen is not None else None
    else:
        if rank == 0 and (folder / CONFIG_NAME).exists():
            raise UserError(f"{str(folder)!r} already holds a model; continue it with --resume, or choose another --out")
        folder = check_writable(folder)
    if hasattr(cfg.prior, "keep_text_encoder"):
        cfg.prior.keep_text_encoder = True  # every prompt is encoded, not one
    device = process_device(resolve_device(cfg.device), devices, nodes)
    if device.type == "cuda" and devices * nodes > 1:
        torch.cuda.set_device(device)  # this process's GPU before anything (the prior, NCCL) lands on GPU 0
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    started = time.time()
    prior = priors.build_prior(cfg.prior, device)
    embeds = [prior.encode_prompt(p, cfg.negative_prompt) for p in prompts]
    vectors = torch.stack([prior.prompt_vector(e) for e in embeds])
    generator = PromptGrids(cfg.representation, gen_cfg, vectors.shape[1], device)
    guidance = GUIDANCE[cfg.guidance.name].cls(cfg.guidance, prior)
    system = AmortisedSystem(cfg, prior, generator, guidance, prompts, vectors, embeds).to(device)
    meta = {"format": FORMAT, "threedgen": __version__, "prior": cfg.prior.name,
            "prior_model": getattr(cfg.prior, "model", None), "guidance": cfg.guidance.name,
            "generator": vars(gen_cfg).copy(), "embed_dim": int(vectors.shape[1]), "prompts": prompts,
            **known_words(cfg.prior, prompts),
            "devices": devices, "nodes": nodes}
    if rank == 0:
        write_meta(folder, meta)
        if not resume:
            atomic_write_text(folder / CONFIG_NAME, to_yaml(cfg))
        write_status(folder, "running", step=None if resume else 0, max_steps=cfg.steps, prompts=len(prompts),
                     backends=generator.backends())
    trainer = make_trainer(cfg, folder, device, progress_bar, label=f"{len(prompts)} prompts", devices=devices,
                           nodes=nodes)
    data = PromptDataModule(len(prompts), gen_cfg.prompts_per_step, CameraSampler(cfg.camera, cfg.seed), cfg.seed)
    trainer.fit(system, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    system.to(device)
    if next(c for c in trainer.callbacks if isinstance(c, SafeCheckpoint)).saved_step != trainer.global_step:
        save_checkpoint(trainer, folder)  # every process takes part; the first writes
    print_err(f"threedgen: process {trainer.global_rank} of {trainer.world_size}: generator weights "
              f"{weights_digest(generator)} after step {trainer.global_step}")
    if trainer.is_global_zero:
        generator.eval()
        RunFolder(folder).previews.mkdir(exist_ok=True)
        write_image(RunFolder(folder).final_preview, system.preview_image())
        write_status(folder, "succeeded", step=int(trainer.global_step), max_steps=cfg.steps, prompts=len(prompts),
                     processes=trainer.world_size, skipped_steps=system.skipped_steps, rollbacks=system.rollbacks,
                     train_seconds=round(time.time() - started, 2))
    return folder


class AmortisedModel:
    """A trained model in memory: its config, record, prior and generator; ``generate`` answers a
    prompt (the web UI keeps one loaded)."""

    def __init__(self, folder: str | Path, device: Optional[str] = None):
        quiet_libraries()
        started = time.time()
        self.folder, self.meta = read_meta(folder)
        self.cfg = load_run_config(self.folder / CONFIG_NAME)
        if self.cfg.prior.name != self.meta["prior"]:
            raise UserError(f"model {str(self.folder)!r}: its config and record name different priors "
                            f"({self.cfg.prior.name!r}, {self.meta['prior']!r}); train it again")
        ckpt = choose_checkpoint(self.folder, warn=warn_checkpoint)
        if ckpt is None:
            raise UserError(f"model {str(self.folder)!r} has no checkpoint yet (checkpoints/last.ckpt)")
        self.device = resolve_device(device or self.cfg.device)
        self.prior = priors.build_prior(self.cfg.prior, self.device)
        self.generator = PromptGrids(self.cfg.representation, PromptGridsConfig(**self.meta["generator"]),
                                     int(self.meta["embed_dim"]), self.device)
        state = read_checkpoint(ckpt, self.folder, map_location=self.device)
        self.step = int(state["global_step"])
        weights = {k[len("representation."):]: v for k, v in state["state_dict"].items()
                   if k.startswith("representation.")}
        try:
            self.generator.load_state_dict(weights)
        except RuntimeError as exc:
            raise UserError(f"model {str(self.folder)!r} does not fit this threedgen's generator "
                            f"({str(exc).splitlines()[0][:160]}); train it again") from None
        self.generator.eval()
        self.load_seconds = time.time() - started

    def check_prompt(self, prompt: str) -> RunConfig:
        """The run config for ``prompt`` (checked by the prior's rules), or a UserError: invalid, or
        using a word no training prompt used."""
        cfg = copy.deepcopy(self.cfg)
        cfg.prompt = clean_prompt(prompt)
        check_prompt_known(cfg.prompt, self.meta, cfg.prior.prompt_words(cfg.prompt))  # an unknown word first
        cfg.check()
        cfg.representation = grid_nerf_config(cfg.representation)
        cfg.steps = max(self.step, 1)
        return cfg

    @torch.no_grad()
    def nerf(self, cfg: RunConfig):
        """The prompt's NeRF: its text embedding through the generator."""
        embeds = self.prior.encode_prompt(cfg.prompt, cfg.negative_prompt)
        vector = self.prior.prompt_vector(embeds).to(self.device)
        if vector.numel() != int(self.meta["embed_dim"]):
            raise UserError(f"the prior gives {vector.numel()}-number prompt vectors, the model was trained on "
                            f"{self.meta['embed_dim']}: it belongs to another prior or world; train it again")
        return self.generator.nerf_for(vector, cfg.representation)

    def generate(self, prompt: str, out: str | Path = "outputs", evaluate: bool = True) -> Path:
        """A run folder for ``prompt``, as a per-prompt run writes it; returns its path."""
        cfg = self.check_prompt(prompt)
        check_writable(Path(out))
        started = time.time()
        nerf = self.nerf(cfg)
        generate_seconds = time.time() - started
        run_dir = new_run_dir(Path(out), cfg.prompt)
        atomic_write_text(run_dir / CONFIG_NAME, to_yaml(cfg))
        write_status(run_dir, "running", step=cfg.steps, max_steps=cfg.steps, backends=nerf.backends(),
                     amortised_model=str(self.folder))
        _write_generated_checkpoint(nerf, run_dir, cfg.steps, self.folder)
        finish_run(nerf, cfg, run_dir, started,
                   evaluate=evaluate and PRIORS[cfg.prior.name].config.has_truth, step=cfg.steps, skipped_steps=0,
                   rollbacks=0, rolled_back_steps=0, train_seconds=0.0, generate_seconds=round(generate_seconds, 4),
                   amortised_model=str(self.folder))
        return run_dir


def _write_generated_checkpoint(nerf, run_dir: Path, step: int, model: Path) -> Path:
    """``checkpoints/last.ckpt`` holding the generated NeRF as a trained run's would, so that
    ``threedgen export`` and ``threedgen eval`` read it."""
    path = RunFolder(run_dir).last_checkpoint
    path.parent.mkdir(exist_ok=True)
    state = {"state_dict": {f"representation.{k}": v.cpu() for k, v in nerf.state_dict().items()},
             "global_step": int(step), "threedgen": {"generated_by": str(model)}}
    with atomic_path(path) as tmp:
        torch.save(state, str(tmp))
    return path
