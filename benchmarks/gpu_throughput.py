"""GPU throughput of SDS with a full-size Stable Diffusion 2.1 base (UNet + VAE built from their
configs with random weights: speed does not depend on the weights), fp16, at threestudio's
DreamFusion settings (64x64 render, resized to 512x512 for the VAE, batch 1), for the NeRF and the
Gaussians: iterations per second, peak VRAM, and the step time over the teacher-only floor (the
same VAE encode + backward and CFG UNet call alone, timed in the same process).

    python benchmarks/gpu_throughput.py [--representations nerf gaussians] [--steps 200]
        [--repeats 3] [--write BENCHMARKS.md] [--json rows.json] [--tiny] [--device cuda]
        [--model FOLDER | --save-model FOLDER] [key=value ...]

The pipeline is saved to a temporary folder and loaded through the same ``from_pretrained`` path as
a downloaded model (``--prior FOLDER``). ``--tiny`` builds the tests' tiny pipeline instead, so the
script can be checked on a CPU (``--device cpu``); those numbers mean nothing. ``--save-model
FOLDER`` only writes the pipeline (for ``threedgen run --prior FOLDER``); ``--model FOLDER`` times
one saved earlier instead of building one.

A NeRF on nerfacc's occupancy grid refreshes every grid cell every 16 steps during its first 256
steps (the estimator's warm-up) and a sample of cells afterwards, so its timed window starts after
that warm-up: such a NeRF runs at least 256 warm-up steps whatever ``--warmup`` says. ``key=value``
overrides deep-merge into the config (``prior.x=1`` keeps the rest of ``prior``); ``nerf:key=value``
(or ``gaussians:``) applies to one representation only.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from quality import report  # noqa: E402

from threedgen.config import deep_merge  # noqa: E402

# Stable Diffusion 2.1 base (stabilityai/stable-diffusion-2-1-base, 512x512, epsilon prediction).
SD21_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                 flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32, act_fn="silu")
SD21_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=512, scaling_factor=0.18215)
SD21_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 max_position_embeddings=77, hidden_act="gelu", projection_dim=512)


REPS = ("nerf", "gaussians")


def build_sd21_base(folder: Path, dtype: torch.dtype = torch.float16) -> Path:
    """SD 2.1 base's architecture with random weights, saved in the diffusers layout."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from tiny_diffusers import _scheduler_kwargs, clip_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id, **SD21_TEXT))
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD21_VAE), text_encoder=text_encoder, tokenizer=tokenizer,
        unet=UNet2DConditionModel(**SD21_UNET), scheduler=DDPMScheduler(**_scheduler_kwargs("epsilon")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False).to(dtype=dtype)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def occgrid_warmup_steps(estimator) -> int:
    """Steps of nerfacc's occupancy-grid warm-up (every cell refreshed): the default of
    ``OccGridEstimator.update_every_n_steps(warmup_steps=...)``, which the NeRF leaves as it is."""
    try:
        default = inspect.signature(type(estimator).update_every_n_steps).parameters["warmup_steps"].default
        return int(default)
    except (KeyError, TypeError, ValueError):
        return 256


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of ``fn(i)``: ``steps`` calls after ``warmup``, one sync at each end."""
    for i in range(warmup):
        fn(i)
    _sync(device)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        fn(i)
    _sync(device)
    return (time.perf_counter() - start) / steps


def measure(model: str, representation: str, device: torch.device, steps: int, warmup: int,
            overrides: dict) -> dict:
    from threedgen.cameras import CameraSampler
    from threedgen.config import build_config
    from threedgen.runner import build_components

    over = deep_merge({"prior": {"model": model, "local_files_only": True}}, overrides)
    cfg = build_config("sds", representation, "stable-diffusion", overrides=over,
                       flags={"prompt": "a hamburger", "device": str(device)})
    torch.manual_seed(0)
    system = build_components(cfg, device)
    system.train()
    prior, guidance, rep = system.prior, system.guidance, system.representation
    optimizers = system.configure_optimizers()
    sampler = CameraSampler(cfg.camera, 0)
    size = cfg.render.resolution
    floor_warmup = warmup
    estimator = getattr(rep, "estimator", None)
    if estimator is not None:  # time past the occupancy grid's warm-up, not inside it
        warmup = max(warmup, occgrid_warmup_steps(estimator))
    cams = [sampler.sample(i).to(device) for i in range(warmup + steps)]

    def step(i: int) -> None:
        out = rep.render(cams[i], size, size)
        loss = guidance(out.rgb, system.embeds, cams[i], i, cfg.steps).loss + system.regularizers(out)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()
        rep.on_step(i, cfg.steps)

    # The teacher-only floor: the same prior calls on a fixed image, nothing else.
    image = torch.rand(1, 3, size, size, device=device, requires_grad=True)
    cond, uncond = system.embeds.cond, system.embeds.uncond
    t = torch.full((2,), 500, device=device, dtype=torch.long)

    def teacher(i: int) -> None:
        x = prior.encode_images(image)
        with torch.no_grad():
            x_t = torch.cat([x, x]).detach()
            eps = prior.predict_noise(x_t, t, [cond, uncond])
        image.grad = None
        (x * eps[:1]).sum().backward()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s = timed_steps(step, steps, warmup, device)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    floor_s = timed_steps(teacher, steps, floor_warmup, device)
    return {"representation": representation, "it_s": 1.0 / step_s, "step_ms": step_s * 1000,
            "floor_ms": floor_s * 1000, "ratio": step_s / floor_s, "peak_gib": peak,
            "field": getattr(rep, "field_kind", getattr(rep, "backend", "")),
            "sampler": getattr(rep, "sampler_kind", ""), "dtype": str(prior.dtype).replace("torch.", ""),
            "warmup": warmup, "steps": steps}


def write_json(path: str, rows: list[dict], meta: dict) -> None:
    """The rows as JSON (NaN, e.g. the peak VRAM on a CPU, as null)."""
    clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()} for r in rows]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({**meta, "rows": clean}, indent=1) + "\n")


def build_model(folder: Path, tiny: bool) -> Path:
    if tiny:
        from tiny_diffusers import build_tiny_sd

        return build_tiny_sd(folder)
    return build_sd21_base(folder)


def main(argv=None) -> str:
    from threedgen.config import parse_overrides
    from threedgen.runner import quiet_libraries

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--representations", nargs="+", default=list(REPS), choices=REPS)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny pipeline (to check the script on a CPU)")
    ap.add_argument("--write", default=None, help="append the table to this markdown file")
    ap.add_argument("--json", default=None, metavar="FILE", help="write the rows (and the settings) as JSON")
    ap.add_argument("--model", default=None, metavar="FOLDER", help="time this saved pipeline instead of building one")
    ap.add_argument("--save-model", default=None, metavar="FOLDER",
                    help="only build the pipeline (SD 2.1 base sized, or --tiny) into FOLDER, then exit")
    ap.add_argument("overrides", nargs="*",
                    help="config overrides (key=value; nerf:key=value or gaussians:key=value for one of them)")
    args = ap.parse_args(argv)
    if args.save_model:
        quiet_libraries()
        folder = build_model(Path(args.save_model), args.tiny)
        print(folder, flush=True)
        return str(folder)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: this benchmark needs a GPU (or --tiny --device cpu to check it)")
    quiet_libraries()
    # "nerf:key=value" applies to that representation only
    overrides = {"*": parse_overrides([o for o in args.overrides if not o.startswith(tuple(f"{r}:" for r in REPS))])}
    for rep in args.representations:
        overrides[rep] = deep_merge(overrides["*"], parse_overrides(
            [o.split(":", 1)[1] for o in args.overrides if o.startswith(f"{rep}:")]))
    rows = []
    with tempfile.TemporaryDirectory(prefix="threedgen-sd21-") as tmp:
        model = args.model or str(build_model(Path(tmp) / "model", args.tiny))
        for rep in args.representations:
            start = time.perf_counter()
            runs = [measure(model, rep, device, args.steps, args.warmup, overrides.get(rep, overrides["*"]))
                    for _ in range(args.repeats)]
            med = {k: statistics.median(r[k] for r in runs) for k in ("it_s", "step_ms", "floor_ms", "ratio", "peak_gib")}
            rows.append({**runs[0], **med, "seconds": time.perf_counter() - start})
            print(rows[-1], flush=True)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    lines = [f"\n### GPU throughput, SDS at DreamFusion settings, {time.strftime('%Y-%m-%d')}\n",
             f"Command: `python benchmarks/gpu_throughput.py{' --tiny' if args.tiny else ''} --device {args.device} "
             f"--steps {args.steps} --repeats {args.repeats}{' ' + ' '.join(args.overrides) if args.overrides else ''}`; "
             f"{gpu}, torch {torch.__version__}. "
             + ("Tiny random pipeline: a check that the script runs, not a measurement. " if args.tiny else
                "SD 2.1 base UNet + VAE from their configs, random weights. ")
             + f"Median of {args.repeats} runs of {args.steps} steps after the warm-up steps in the table "
               f"({args.warmup}, or nerfacc's occupancy-grid warm-up if longer; the floor after {args.warmup}); "
               "the floor is the VAE encode (64 -> 512) + its backward and the CFG UNet call (batch 2) alone.\n",
             "| representation | field / sampler | dtype | it/s | step ms | floor ms | step / floor | peak VRAM GiB | warm-up steps |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['representation']} | {r['field']}{' / ' + r['sampler'] if r['sampler'] else ''} | {r['dtype']} | "
                     f"{r['it_s']:.1f} | {r['step_ms']:.1f} | {r['floor_ms']:.1f} | {r['ratio']:.2f}x | "
                     f"{r['peak_gib']:.2f} | {r['warmup']} |")
    text = "\n".join(lines) + "\n"
    report(text, args.write)
    if args.json:
        write_json(args.json, rows, {"device": args.device, "gpu": gpu, "torch": torch.__version__, "tiny": args.tiny,
                                     "steps": args.steps, "repeats": args.repeats, "overrides": args.overrides,
                                     "model": args.model or ("tiny" if args.tiny else "sd21-base")})
    return text


if __name__ == "__main__":
    main()
