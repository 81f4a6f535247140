"""Training the learned shapes teacher (``threedgen train-prior``).

Data: every shape of the world seen from ``views_per_shape`` random cameras over the training
cameras' range (elevation -15..70 degrees, any azimuth, distance 2.5, fovy 40), rendered once as
the exact prior's separable maps (body shade, marker shade, coverage; cached on disk). Each sample
picks a shape, a view and a colour, and composites over the background a run's camera stream uses:
white half of the time, a random colour otherwise. So every (object, colour) is seen from everywhere.

Conditioning, one model for both priors (dropout decides per sample):
- with probability 1/2 the camera is given: text "a red cube" (10 % empty: the unconditional
  branch keeps the camera, as MVDream's);
- otherwise no camera (zero input): "a red cube, side view" (75 %), the plain prompt (15 %) or
  the empty prompt (10 %). Synonyms ("box", "grey", ...) replace the words 20 % of the time.

Loss: epsilon MSE with min-SNR-5 weighting; AdamW, linear warm-up then cosine decay; an EMA of the
weights is what is saved. Every random draw comes from one generator seeded by ``--seed``; a
checkpoint holds the weights, optimiser, EMA and generator state, so ``--resume`` continues the
same sequence of batches an uninterrupted run would see.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from threedgen.cameras import Cameras, view_tag
from threedgen.errors import UserError
from threedgen.guidance.priors.learned import model as arch
from threedgen.guidance.priors.learned.folder import sha256
from threedgen.guidance.priors.shapes import render as shapes_render
from threedgen.guidance.priors.shapes.vocab import COLOUR_SYNONYMS, COLOURS, MARKER_COLOUR, SHAPE_SYNONYMS, SHAPES
from threedgen.noise import NoiseSchedule

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.jsonl"
WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors")


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 6e-4
    warmup: int = 100
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    views_per_shape: int = 640
    elevation_range: tuple[float, float] = (-15.0, 70.0)
    camera_prob: float = 0.5
    seed: int = 0
    checkpoint_every: int = 200

    def check(self) -> None:
        for name, lo in (("steps", 1), ("batch_size", 1), ("views_per_shape", 1), ("checkpoint_every", 1)):
            if int(getattr(self, name)) < lo:
                raise UserError(f"--{name.replace('_', '-')} must be at least {lo}")


def training_views(n: int, seed: int, elevation_range=(-15.0, 70.0)) -> Cameras:
    g = torch.Generator().manual_seed(10_007 + seed)
    lo, hi = elevation_range
    el = lo + (hi - lo) * torch.rand(n, generator=g)
    az = -180.0 + 360.0 * torch.rand(n, generator=g)
    return Cameras.from_angles(el, az, 2.5, 40.0)


def world_maps(n_views: int, seed: int, elevation_range, progress=None) -> tuple[torch.Tensor, Cameras]:
    """``[S,V,3,R,R]`` maps of every shape at ``n_views`` random cameras, cached on disk."""
    cams = training_views(n_views, seed, elevation_range)
    out = []
    for shape in SHAPES:
        params = {"version": shapes_render.RENDER_VERSION, "shape": shape, "views": n_views, "seed": seed,
                  "elevation": list(elevation_range), "resolution": arch.RESOLUTION, "supersample": 2,
                  "light": shapes_render.LIGHT_DIR}

        def render(shape=shape):
            maps = shapes_render.sphere_trace(shape, cams, arch.RESOLUTION, arch.RESOLUTION, 2)
            return {k: v.numpy() for k, v in maps._asdict().items()}

        maps = shapes_render.disk_cached("learned", f"{shape}-{arch.RESOLUTION}", params, render)
        out.append(torch.stack([torch.from_numpy(maps[k]) for k in shapes_render.Maps._fields], 1))
        if progress is not None:
            progress(shape)
    return torch.stack(out), cams


class Batches:
    """The random training batches: images, texts, camera inputs."""

    def __init__(self, maps: torch.Tensor, cams: Cameras, cfg: TrainConfig):
        self.maps, self.cfg = maps, cfg
        self.c2w = cams.c2w.reshape(len(cams), 16).float()
        self.tags = [view_tag(float(e), float(a)) for e, a in zip(cams.elevation, cams.azimuth)]
        self.albedo = torch.tensor([COLOURS[c] for c in COLOURS])
        self.colours = list(COLOURS)
        self.shape_words = {s: [s] + [k for k, v in SHAPE_SYNONYMS.items() if v == s] for s in SHAPES}
        self.colour_words = {c: [c] + [k for k, v in COLOUR_SYNONYMS.items() if v == c] for c in COLOURS}

    def _word(self, words: list[str], g: torch.Generator) -> str:
        if len(words) > 1 and float(torch.rand(1, generator=g)) < 0.2:
            return words[1 + int(torch.randint(len(words) - 1, (1,), generator=g))]
        return words[0]

    def sample(self, g: torch.Generator):
        b, cfg = self.cfg.batch_size, self.cfg
        S, V = self.maps.shape[:2]
        s = torch.randint(S, (b,), generator=g)
        v = torch.randint(V, (b,), generator=g)
        c = torch.randint(len(self.colours), (b,), generator=g)
        white = torch.rand(b, generator=g) < 0.5
        bg = torch.where(white[:, None], torch.ones(b, 3), torch.rand(b, 3, generator=g))
        m = self.maps[s, v]  # [b,3,R,R]
        shade, marker, alpha = m[:, 0:1], m[:, 1:2], m[:, 2:3]
        rgb = (self.albedo[c][:, :, None, None] * shade + torch.tensor(MARKER_COLOUR)[None, :, None, None] * marker
               + bg[:, :, None, None] * (1 - alpha))
        keep = torch.rand(b, generator=g) < cfg.camera_prob
        u = torch.rand(b, generator=g)
        texts = []
        for i in range(b):
            shape, colour = SHAPES[int(s[i])], self.colours[int(c[i])]
            prompt = f"a {self._word(self.colour_words[colour], g)} {self._word(self.shape_words[shape], g)}"
            if keep[i]:
                texts.append("" if u[i] < 0.1 else prompt)
            else:
                texts.append("" if u[i] < 0.1 else prompt if u[i] < 0.25 else f"{prompt}, {self.tags[int(v[i])]} view")
        return rgb * 2 - 1, texts, self.c2w[v] * keep[:, None]


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_pipeline(folder: Path, tokenizer, text_encoder, unet, scheduler, record: dict) -> Path:
    """The diffusers layout (safetensors only) plus ``threedgen.json`` (camera convention, training
    record, weight hashes), written to a temporary folder and moved into place."""
    import diffusers  # heavy: only when a pipeline is saved
    import transformers  # heavy: only when a pipeline is saved

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "tokenizer")
    scheduler.save_pretrained(tmp / "scheduler")
    index = {"_class_name": arch.PIPELINE_CLASS, "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"]}
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    meta = {"format": 1, "transformers_version": transformers.__version__,
            "camera": dict(arch.CAMERA) if arch.unet_has_camera(unet) else None,
            "resolution": arch.RESOLUTION, "training": record,
            "sha256": {name: sha256(tmp / name) for name in WEIGHT_FILES}}
    (tmp / "threedgen.json").write_text(json.dumps(meta, indent=2) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def train(out: Path, cfg: TrainConfig, resume: bool = False, export_to: Optional[Path] = None,
          threads: Optional[int] = None, quiet: bool = False, stop_after: Optional[int] = None) -> Optional[Path]:
    """Train (or continue) in ``out``; export the EMA pipeline to ``export_to`` (default
    ``out/pipeline``) and return its folder. ``stop_after``: leave after that many steps of this
    call, with a checkpoint and no export, as an interruption would (None when stopped early)."""
    from tqdm import tqdm  # only while training

    cfg.check()
    out = Path(out)
    ckpt_path = out / CHECKPOINT
    if resume and not ckpt_path.exists():
        raise UserError(f"--resume: no {CHECKPOINT} in {out}; start without --resume")
    if not resume and ckpt_path.exists():
        raise UserError(f"{out} already holds a training run; pass --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    t_start = time.time()
    tokenizer, text_encoder, unet, scheduler = arch.build_components(cfg.seed)
    ema = {k: v.detach().clone() for k, v in _trainable(unet, text_encoder).items()}
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(cfg.seed)
    step, elapsed_before = 0, 0.0
    if resume:
        state = torch.load(ckpt_path, weights_only=True)
        if {k: v for k, v in state["config"].items() if k != "steps"} != {
                k: v for k, v in _jsonable(asdict(cfg)).items() if k != "steps"}:
            raise UserError(f"--resume: {out} was trained with other settings ({state['config']}); "
                            "resume with the same ones")
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["optimizer"])
        ema = state["ema"]
        g.set_state(state["generator"])
        step, elapsed_before = int(state["step"]), float(state["elapsed_s"])
    bar = tqdm(total=cfg.steps + len(SHAPES), initial=0, desc="rendering the world", disable=quiet,
               dynamic_ncols=True, unit="it")
    maps, cams = world_maps(cfg.views_per_shape, cfg.seed, cfg.elevation_range, progress=lambda s: bar.update(1))
    bar.set_description("training")
    bar.update(step)
    batches = Batches(maps, cams, cfg)
    live = _trainable(unet, text_encoder)  # state-dict tensors share the weights' storage: the EMA reads them
    noise = NoiseSchedule(scheduler.alphas_cumprod.float())
    abar = noise.alphas_cumprod
    snr = abar / (1 - abar)
    weight = torch.clamp(snr, max=cfg.min_snr_gamma) / snr  # min-SNR-gamma for epsilon prediction
    unet.train()
    text_encoder.train()
    log = open(out / LOG, "a")
    t0 = time.time()
    try:
        stop_at = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
        while step < stop_at:
            x0, texts, camera = batches.sample(g)
            t = torch.randint(len(abar), (x0.shape[0],), generator=g)
            eps = torch.randn(x0.shape, generator=g)
            x_t = noise.add_noise(x0, t, eps)
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * (0.55 + 0.45 * math.cos(math.pi * step / cfg.steps))
            for group in opt.param_groups:
                group["lr"] = lr
            context = arch.encode_texts(tokenizer, text_encoder, texts)
            pred = unet(x_t, t, encoder_hidden_states=context, class_labels=camera).sample
            per_item = (pred - eps).pow(2).mean((1, 2, 3))
            loss = (weight[t] * per_item).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for k, v in live.items():
                    ema[k].mul_(decay).add_(v, alpha=1 - decay)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if step % 20 == 0 or step == stop_at:
                log.write(json.dumps({"step": step, "loss": round(loss.item(), 5), "lr": lr,
                                      "elapsed_s": round(elapsed_before + time.time() - t0, 1)}) + "\n")
                log.flush()
            if step % cfg.checkpoint_every == 0 or step == stop_at:
                _atomic_torch_save({"step": step, "unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                                    "optimizer": opt.state_dict(), "ema": ema, "generator": g.get_state(),
                                    "config": _jsonable(asdict(cfg)),
                                    "elapsed_s": elapsed_before + time.time() - t0}, ckpt_path)
    finally:
        log.close()
        bar.close()
    if step < cfg.steps:
        return None
    # export the EMA weights
    _load_trainable(unet, text_encoder, ema)
    unet.eval()
    text_encoder.eval()
    record = {"config": _jsonable(asdict(cfg)), "steps": step,
              "train_seconds": round(elapsed_before + time.time() - t0, 1),
              "total_seconds_this_process": round(time.time() - t_start, 1), "threads": torch.get_num_threads(),
              "torch": torch.__version__}
    return save_pipeline(export_to or out / "pipeline", tokenizer, text_encoder, unet, scheduler, record)


def _trainable(unet, text_encoder) -> dict[str, torch.Tensor]:
    out = {f"unet.{k}": v for k, v in unet.state_dict().items() if v.is_floating_point()}
    out.update({f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items() if v.is_floating_point()})
    return out


def _load_trainable(unet, text_encoder, values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in _trainable(unet, text_encoder).items():
            v.copy_(values[k])


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d))
