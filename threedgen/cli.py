"""The ``threedgen`` command line.

    threedgen run --prompt "a red cube" [--guidance sds] [--representation nerf] [--prior auto]
                  [--steps N] [--seed N] [--out DIR] [key=value ...]
    threedgen run --resume RUN_DIR [--steps N]
    threedgen refine RUN_DIR [--steps N] [refine.key=value ...]
    threedgen export RUN_DIR [--format glb|obj|ply ...] [--texture uv|vertex] [--faces N] [--resolution N]
    threedgen eval RUN_DIR
    threedgen guidance list
    threedgen config show [--guidance G] [--representation R] [--prior P] [key=value ...]
    threedgen config keys [--guidance G] [--representation R] [--prior P]
    threedgen doctor [--build] [--retry] [--json]
    threedgen train-prior [--out DIR] [--steps N] [--batch-size N] [--seed N] [--resume] [--export DIR]
    threedgen verify RUN_DIR [--steps N] [--json]

Bad input prints one line on stderr and exits with code 2. This module imports no torch: help,
listings, config and input errors answer at once; the commands that work import what they need.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Optional

from threedgen.amortised_folder import (
    AMORTISED_STEPS,
    generator_settings,
    launched_rank,
    read_meta,
    read_prompt_file,
)
from threedgen.config import DEFAULT_LAYER, flat, flatten, parse_overrides, resolve_request
from threedgen.devices import cuda_for_auto
from threedgen.errors import RunFailed, UserError
from threedgen.guidance.config import GUIDANCE
from threedgen.guidance.priors import PRIOR_CHOICES, resolve_prior
from threedgen.guidance.priors.config import PRIORS
from threedgen.jobs import BACKENDS
from threedgen.registry import field_docs
from threedgen.representations.config import REPRESENTATIONS
from threedgen.request import DEFAULT_GUIDANCE, DEFAULT_PRIOR, DEFAULT_REPRESENTATION, RunRequest
from threedgen.rundir import RunFolder, check_writable
from threedgen.schema import (
    MAX_JANUS_RETRIES,
    MAX_STEPS,
    MAX_VERIFY_STEPS,
    MESH_FORMATS,
    TEXTURE_MODES,
    RunConfig,
    check_faces,
    is_ascii_integer,
)

EXIT_USAGE = 2
EXIT_FAILED = 1
PARSER_DEFAULTS = {"guidance": DEFAULT_GUIDANCE, "representation": DEFAULT_REPRESENTATION, "prior": DEFAULT_PRIOR}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _int_arg(name: str, lo: int, hi: int):
    def parse(text: str) -> int:
        stripped = text.strip()
        digits = stripped[1:] if stripped[:1] in "+-" else stripped
        if not is_ascii_integer(digits):
            raise UserError(f"{name} must be an integer from {lo} to {hi}; got {text!r}")
        value = int(stripped, 10)
        if not lo <= value <= hi:
            raise UserError(f"{name} must be an integer from {lo} to {hi}; got {value}")
        return value

    return parse


def _component_args(parser: argparse.ArgumentParser, prior_default: str, representation: bool = True) -> None:
    parser.add_argument("--guidance", default=PARSER_DEFAULTS["guidance"],
                        help=f"guidance method: {', '.join(GUIDANCE)} (`threedgen guidance list`)")
    if representation:
        parser.add_argument("--representation", default=PARSER_DEFAULTS["representation"],
                            help=f"3D representation: {', '.join(REPRESENTATIONS)}")
    parser.add_argument("--prior", default=prior_default,
                        help=f"auto (Stable Diffusion 2.1 base on CUDA, shapes on CPU), {', '.join(PRIORS)}, "
                             "a Hugging Face id or a local diffusers folder")


def _run_options(parser: argparse.ArgumentParser) -> None:
    """What `run` and `config show` share: the prompt, the components, steps, seed, device, overrides."""
    parser.add_argument("--prompt", help='what to make, e.g. "a red cube"')
    parser.add_argument("--negative-prompt", default=None, help="what to steer away from")
    _component_args(parser, PARSER_DEFAULTS["prior"])
    parser.add_argument("--steps", type=_int_arg("--steps", 1, MAX_STEPS), help="optimisation steps")
    parser.add_argument("--seed", type=_int_arg("--seed", 0, 2 ** 32 - 1), help="random seed")
    parser.add_argument("--device", default=None, help="auto, cpu or cuda[:N]")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. guidance.guidance_scale=50 representation.num_samples=48")


def _add_webui(sub) -> None:
    w = sub.add_parser("webui", help="the web UI over a durable job queue",
                       description="A Gradio app: submit prompts, watch progress, download results. "
                                   "Jobs are kept in a SQLite table and survive restarts.")
    w.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    w.add_argument("--port", type=_int_arg("--port", 1, 65535), default=7860, help="port (default 7860)")
    w.add_argument("--outputs", default="webui-outputs", help="folder of the files users download (served)")
    w.add_argument("--state", default=None, help="folder of the job database and run checkpoints (never served; "
                   "default: the user data folder)")
    w.add_argument("--workers", type=_int_arg("--workers", 1, 64), default=None, help="jobs at once: one per GPU")
    w.add_argument("--priors", default="auto", help="comma-separated priors offered (default: shapes, shapes-unet-camera "
                   "and shapes-unet; stable-diffusion too on CUDA)")
    w.add_argument("--max-queue", type=_int_arg("--max-queue", 1, 100000), default=100, help="queued jobs at most")
    w.add_argument("--max-steps", type=_int_arg("--max-steps", 1, MAX_STEPS), default=20000, help="steps per job at most")
    w.add_argument("action", nargs="?", choices=["hash-password"], default=None,
                   help="hash-password: read a password (no echo; or one line from a pipe) and print its hash "
                        "for --auth-file")
    w.add_argument("--auth-file", default=None, help="require a login: a file of user:HASH lines "
                   "(`threedgen webui hash-password --user NAME` prints one)")
    w.add_argument("--no-auth", action="store_true", help="serve an address beyond this machine without a login")
    w.add_argument("--user", default=None, help="with hash-password: print user:HASH, a line for --auth-file")
    w.add_argument("--set", action="append", default=[], metavar="key=value",
                   help="a config setting applied to every job, e.g. export.video_frames=12 (repeatable)")
    w.add_argument("--amortised", default=None, metavar="MODEL",
                   help="offer instant generation from this amortised model folder (threedgen train-amortised)")
    _backend_args(w)


def _backend_args(parser: argparse.ArgumentParser) -> None:
    """Where jobs run and where their files live: what `webui` and `batch` share."""
    parser.add_argument("--backend", choices=list(BACKENDS), default=BACKENDS[0],
                        help="local: one job per GPU of this machine (default); ray: one task per job on a Ray "
                             'cluster (pip install "threedgen[cluster]")')
    parser.add_argument("--ray-address", default="auto", metavar="HOST:PORT",
                        help="the Ray head's GCS address (default auto: the cluster this machine joined with "
                             "`ray start`)")
    parser.add_argument("--runs", default=None, metavar="DIR",
                        help="run folders (default <state>/runs); on a cluster, a path every node mounts")
    parser.add_argument("--max-restarts", type=_int_arg("--max-restarts", 0, 100), default=3,
                        help="ray: automatic resumes of a job whose node or worker died (default 3)")


def _add_batch(sub) -> None:
    b = sub.add_parser("batch", help="queue a file of prompts as jobs and follow them",
                       description="One prompt per line, optionally followed by flags (--guidance, "
                                   "--representation, --prior, --steps, --seed, --negative-prompt, --resolution) and "
                                   "key=value settings; # starts a comment. Every line is checked before anything "
                                   "is queued. Exits 0 only when every job succeeded.")
    b.add_argument("prompts", nargs="?", metavar="PROMPTS.txt", help="the batch file")
    b.add_argument("--status", action="store_true", help="show the jobs of the last batch (or --batch ID) and exit")
    b.add_argument("--attach", action="store_true",
                   help="follow the last batch (or --batch ID) again; local: resume its interrupted jobs")
    b.add_argument("--batch", default=None, metavar="ID", help="with --status or --attach: which batch")
    _component_args(b, PARSER_DEFAULTS["prior"])
    b.add_argument("--steps", type=_int_arg("--steps", 1, MAX_STEPS), default=None,
                   help="steps of every job (default: the preset's)")
    b.add_argument("--seed", type=_int_arg("--seed", 0, 2 ** 32 - 1), default=0, help="seed of every job (default 0)")
    b.add_argument("--set", action="append", default=[], metavar="key=value",
                   help="a config setting applied to every job (repeatable)")
    b.add_argument("--janus-retry", type=_int_arg("--janus-retry", 0, MAX_JANUS_RETRIES), default=None, metavar="N",
                   help="every job: up to N more seeds after a failed prior Janus check (janus.retries)")
    b.add_argument("--state", default=None, help="job database folder (default: the web UI's, so it shows the jobs)")
    b.add_argument("--outputs", default="webui-outputs", help="folder of the jobs' public copies (as the web UI's)")
    b.add_argument("--report", default=None, help="where to write the batch's report (default batch.json; "
                   "--attach: where the batch wrote it)")
    b.add_argument("--workers", type=_int_arg("--workers", 1, 64), default=None, help="local: jobs at once (one per GPU)")
    b.add_argument("--max-queue", type=_int_arg("--max-queue", 1, 1_000_000), default=10000,
                   help="jobs a batch may queue at most (default 10000)")
    _backend_args(b)


def _float_arg(name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise UserError(f"{name} must be a number; got {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"{name} must be a number above 0; got {text!r}")
        return value

    return parse


def _add_compare(sub) -> None:
    c = sub.add_parser("compare", help="every guidance method on one prompt, seeds and budget: one sheet",
                       description="One job per method x seed through the job backend (local or Ray), the same "
                                   "prompt, camera sequence and budget for all; writes a comparison folder "
                                   "(compare.json, sheet.png, report.html) and prints its path as the last line. "
                                   "Exits 0 only when every run succeeded.")
    c.add_argument("--prompt", help='what to make, e.g. "a green house"')
    c.add_argument("--negative-prompt", default=None, help="what to steer away from")
    c.add_argument("--methods", default="all", help=f"comma-separated methods, or all (default): {', '.join(GUIDANCE)}")
    c.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    c.add_argument("--representation", default=PARSER_DEFAULTS["representation"],
                   help=f"3D representation: {', '.join(REPRESENTATIONS)}")
    c.add_argument("--prior", default=PARSER_DEFAULTS["prior"], help="as for threedgen run")
    c.add_argument("--budget-steps", type=_int_arg("--budget-steps", 1, MAX_STEPS), default=None,
                   help="steps of every run (default: each method's preset)")
    c.add_argument("--budget-seconds", type=_float_arg("--budget-seconds"), default=None,
                   help="seconds of training of every run instead (each stops at its preset's steps at most)")
    c.add_argument("--out", default=None, help="the comparison folder (default comparisons/<prompt>-<time>)")
    c.add_argument("--attach", default=None, metavar="DIR",
                   help="follow an unfinished comparison again (local: resume its interrupted runs), then write its sheet")
    c.add_argument("--set", action="append", default=[], metavar="key=value",
                   help="a config setting applied to every run (repeatable)")
    c.add_argument("--state", default=None, help="job database folder (default: <comparison folder>/state)")
    c.add_argument("--workers", type=_int_arg("--workers", 1, 64), default=None, help="local: jobs at once (one per GPU)")
    c.add_argument("--max-queue", type=_int_arg("--max-queue", 1, 100000), default=100,
                   help="jobs a comparison may queue at most (default 100)")
    _backend_args(c)


def _add_export(sub) -> None:
    export = sub.add_parser("export", help="re-export meshes of a run from its last checkpoint")
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--format", action="append", choices=list(MESH_FORMATS),
                        help="mesh format (repeat for several; default: all three)")
    export.add_argument("--resolution", type=_int_arg("--resolution", 8, 1024), default=None,
                        help="marching-cubes grid resolution (default from the run's config)")
    export.add_argument("--texture", choices=list(TEXTURE_MODES), default=None,
                        help="uv: xatlas unwrap + baked PNG texture (GLB, OBJ); vertex: vertex colours "
                             "(default from the run's config: uv)")
    export.add_argument("--faces", type=_int_arg("--faces", 0, 10_000_000), default=None,
                        help="decimate to about N faces; 0 keeps every marching-cubes face (default from the "
                             "run's config: 10000)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="threedgen", description="Text-to-3D generation by score distillation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", help="generate a 3D asset from a prompt",
                         description="Optimise a 3D representation against a 2D diffusion prior; "
                                     "writes a run folder and prints its path as the last line.")
    _run_options(run)
    run.add_argument("--out", default="outputs", help="folder for run folders (default: outputs)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    run.add_argument("--janus-retry", type=_int_arg("--janus-retry", 0, MAX_JANUS_RETRIES), default=None, metavar="N",
                     help="after a run the prior's Janus check fails (janus_score_prior above janus.threshold), run the "
                          "next seed, up to N more times; the best attempt's folder is printed (janus.retries)")
    run.add_argument("--refine", action="store_true",
                     help="after training, refine the exported mesh's texture under the same prior (refine.enabled=true)")

    rf = sub.add_parser("refine", help="refine a finished run's exported mesh under its prior (stage 2)",
                        description="Optimise the texture (and with refine.geometry=true the vertices) of a run's "
                                    "exported mesh.glb under the run's prior and guidance, then export and score "
                                    "it again; prints the run folder as the last line.")
    rf.add_argument("run_dir", metavar="RUN_DIR")
    rf.add_argument("--steps", type=_int_arg("--steps", 1, MAX_STEPS), help="refinement steps (refine.steps)")
    rf.add_argument("--device", default=None, help="auto, cpu or cuda[:N]")
    rf.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    rf.add_argument("overrides", nargs="*", metavar="key=value", help="refine.* settings, e.g. refine.loss=guidance")

    _add_export(sub)
    ev = sub.add_parser("eval", help="score a run against the truth (shapes prior)")
    ev.add_argument("run_dir", metavar="RUN_DIR")
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")

    doc = sub.add_parser("doctor", help="what this machine gives a run: GPUs, CUDA kernels, backends",
                         description="Reports the CUDA devices, whether gsplat's and nerfacc's CUDA kernels are "
                                     "built or buildable here, tiny-cuda-nn, and which backends a run would use.")
    doc.add_argument("--build", action="store_true", help="build (once, under a lock) and load the CUDA kernels now")
    doc.add_argument("--retry", action="store_true",
                     help="build again although an earlier build failed or was killed (implies --build)")
    doc.add_argument("--json", action="store_true", help="print the report as JSON")

    g = sub.add_parser("guidance", help="guidance methods")
    g.add_argument("action", choices=["list"])

    c = sub.add_parser("config", help="a run's merged config, or every config key",
                       description="show: the config a run would use (the same options as `threedgen run`), each "
                                   "value with the layer it came from (default, a preset file, key=value, a flag). "
                                   "keys: every key with its default and what it does, for the chosen guidance, "
                                   "representation and prior.")
    c.add_argument("action", choices=["show", "keys"])
    _run_options(c)
    _add_webui(sub)
    _add_batch(sub)
    _add_compare(sub)
    _add_train_prior(sub)
    _add_amortised(sub)
    _add_verify(sub)
    return parser


def _add_amortised(sub) -> None:
    t = sub.add_parser("train-amortised", help="train one generator over a prompt set (instant generation)",
                       description="Trains an amortised generator (docs/amortised.md) by score distillation over every "
                                   "prompt of PROMPTS (a text file, one prompt per line, # for comments) at once; "
                                   "`threedgen generate` then answers any prompt made of the words it was trained on "
                                   "in well under a second. Writes a model folder (--out) and prints its path.")
    t.add_argument("prompts", nargs="?", metavar="PROMPTS", help="text file of prompts, one per line")
    t.add_argument("--out", default=None, help="the model folder (default: models/<PROMPTS file name>)")
    t.add_argument("--resume", metavar="MODEL", help="continue training a model folder from its last checkpoint")
    _component_args(t, PARSER_DEFAULTS["prior"], representation=False)
    t.add_argument("--steps", type=_int_arg("--steps", 1, MAX_STEPS),
                   help=f"optimisation steps (default {AMORTISED_STEPS})")
    t.add_argument("--seed", type=_int_arg("--seed", 0, 2 ** 32 - 1), help="random seed")
    t.add_argument("--device", default=None, help="auto, cpu or cuda[:N]")
    t.add_argument("--devices", type=_int_arg("--devices", 1, 1024), default=1,
                   help="processes per node under DDP (CPU processes or GPUs; default 1)")
    t.add_argument("--nodes", type=_int_arg("--nodes", 1, 100_000), default=1,
                   help="nodes under DDP (start the same command on each, e.g. with torchrun; default 1)")
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    t.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides (as for `threedgen run`) and the generator's amortised.* keys: "
                        "amortised.latent, amortised.hidden, amortised.prompts_per_step, amortised.lr_mapping, "
                        "amortised.lr_basis, amortised.lr_mean")

    g = sub.add_parser("generate", help="a prompt's 3D asset from a trained amortised model, at once",
                       description="Generates the prompt's NeRF with an amortised model (train-amortised) and writes "
                                   "the run folder a per-prompt run writes (meshes, turntable, previews, metrics); "
                                   "prints its path.")
    g.add_argument("model", metavar="MODEL", help="the model folder")
    g.add_argument("--prompt", required=True, help='what to make, e.g. "a red torus"')
    g.add_argument("--out", default="outputs", help="folder for run folders (default: outputs)")
    g.add_argument("--device", default=None, help="auto, cpu or cuda[:N] (default: the model's)")
    g.add_argument("--no-eval", action="store_true", help="skip scoring against the truth")


def _add_verify(sub) -> None:
    v = sub.add_parser(
        "verify", help="replay a run's first steps here and compare them with what the run recorded",
        description="Replays the first steps of a run (verify_steps, default 10) from its config.yaml on this "
                    "machine and compares the parameters after each step with the run's fingerprints.json. "
                    "Prints one line: bit-exact; within tolerance (with the largest parameter difference); or "
                    "diverged at a step, with the likely cause from comparing the run's manifest.json with this "
                    "machine (config, library versions, device, determinism settings). Exit 0, 0, 1.")
    v.add_argument("run_dir", metavar="RUN_DIR")
    v.add_argument("--steps", type=_int_arg("--steps", 1, MAX_VERIFY_STEPS), default=None,
                   help="replay only the first N steps (default: every fingerprinted step)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")


def _add_train_prior(sub) -> None:
    t = sub.add_parser("train-prior", help="train the learned shapes teacher (--prior shapes-unet)",
                       description="Trains a small pixel-space diffusion model (diffusers UNet + CLIP text encoder) "
                                   "on renders of the shapes world, with checkpoints; the default settings are the "
                                   "ones of the shipped weights (about 50 minutes on 2 CPU cores).")
    t.add_argument("--out", default="prior-training", help="training folder: checkpoint, log, pipeline/ (default: prior-training)")
    t.add_argument("--steps", type=_int_arg("--steps", 1, 1_000_000), default=None, help="optimiser steps (default 2000)")
    t.add_argument("--batch-size", type=_int_arg("--batch-size", 1, 4096), default=None, help="images per step (default 64)")
    t.add_argument("--views", type=_int_arg("--views", 1, 100_000), default=None,
                   help="random training cameras per shape (default 640)")
    t.add_argument("--seed", type=_int_arg("--seed", 0, 2 ** 31 - 1), default=None, help="random seed (default 0)")
    t.add_argument("--threads", type=_int_arg("--threads", 1, 1024), default=None, help="CPU threads (default: torch's)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--export", default=None, metavar="DIR", help="where to write the trained pipeline (default OUT/pipeline)")
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _cmd_run(args) -> int:
    if args.resume:
        given = [flag for flag, value in (("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt),
                                          ("--seed", args.seed), ("--device", args.device),
                                          ("key=value overrides", args.overrides or None))
                 if value is not None]
        given += [f"--{k}" for k in ("guidance", "representation", "prior") if getattr(args, k) != PARSER_DEFAULTS[k]]
        given += ["--refine"] if args.refine else []
        given += ["--janus-retry"] if args.janus_retry is not None else []
        if given:
            raise UserError(f"--resume continues a run with its own config (only --steps may change); drop {', '.join(given)}")
        from threedgen.runner import run  # heavy (torch, Lightning): only once the input is good

        run_dir = run(resume=args.resume, steps=args.steps, progress_bar=not args.no_progress)
    else:
        if args.prompt is None:
            raise UserError('--prompt is required, e.g. threedgen run --prompt "a red cube"')
        if args.refine:
            args.overrides = list(args.overrides or []) + ["refine.enabled=true"]
        if args.janus_retry is not None:
            args.overrides = list(args.overrides or []) + [f"janus.retries={args.janus_retry}"]
        merged, note = _request(args).resolve()
        from threedgen.runner import run_gated  # heavy (torch, Lightning): only once the input is good

        run_dir = run_gated(merged.cfg, out=args.out, progress_bar=not args.no_progress, note=note,
                            report=_say_attempt(merged.cfg))
    status, m = RunFolder(run_dir).read_status(), RunFolder(run_dir).read_metrics()
    if m is not None:
        print(f"{_score(m)}({status.get('total_seconds', 0):.0f} s)", file=sys.stderr)
    print(run_dir)
    return 0


def _say_attempt(cfg):
    """The Janus gate's line on stderr after each attempt."""
    def say(attempt: dict) -> None:
        score = attempt["janus_score_prior"]
        verdict = ("passed" if attempt["passed"] else
                   f"above {cfg.janus.threshold}" + ("; trying the next seed" if attempt["attempt"] <= cfg.janus.retries
                                                     else "; no retries left, keeping the best attempt"))
        print(f"threedgen: Janus gate: attempt {attempt['attempt']} (seed {attempt['seed']}) janus_score_prior "
              f"{'n/a' if score is None else f'{score:.2f}'}: {verdict}", file=sys.stderr, flush=True)
    return say


def _cmd_refine(args) -> int:
    overrides = parse_overrides(args.overrides or [])
    other = [k for k in flatten(overrides) if not k.startswith("refine.")]
    if other:
        raise UserError(f"threedgen refine takes refine.* settings only; got {', '.join(other)}")
    if args.steps is not None:
        overrides.setdefault("refine", {})["steps"] = args.steps
    from threedgen.runner import refine_run  # heavy (torch, Lightning): only once the input is good

    run_dir = refine_run(args.run_dir, overrides or None, progress_bar=not args.no_progress, device=args.device)
    status, m = RunFolder(run_dir).read_status(), RunFolder(run_dir).read_metrics()
    if m is not None and "error" not in (status.get("refine") or {}):
        added = float(status.get("total_seconds") or 0) - float((status.get("coarse") or {}).get("total_seconds") or 0)
        print(f"{_score(m)}({added:.0f} s refining)", file=sys.stderr)
    print(run_dir)
    return 0


def _score(m: dict) -> str:
    """An eval's scores as the start of `run`'s and `generate`'s last line on stderr (a prior
    without a truth: its Janus check alone)."""
    prior = m.get("janus_score_prior")
    janus = f"janus_score_prior {prior:.2f}  " if isinstance(prior, (int, float)) else ""
    if "mask_iou" not in m:
        return janus
    return f"mask_iou {m['mask_iou']:.3f}  psnr {m['psnr']:.2f} dB  chamfer {m['chamfer']:.4f}  " + janus


def _cmd_export(args) -> int:
    if args.faces is not None:
        check_faces(args.faces, "--faces")
    from threedgen.export import export_run_outputs  # heavy (torch): only once the input is good
    from threedgen.runs import load_representation  # heavy (torch): only once the input is good

    cfg, representation, run_dir = load_representation(args.run_dir)
    summary = export_run_outputs(representation, cfg, run_dir, formats=args.format, resolution=args.resolution,
                                 texture=args.texture, faces=args.faces)
    for f in summary["files"]:
        print(f)
    return 0


def _cmd_eval(args) -> int:
    from threedgen.evaluate import evaluate_run, format_table  # heavy (torch)

    metrics = evaluate_run(args.run_dir)
    print(json.dumps(metrics, indent=1) if args.json else format_table(metrics))
    return 0


def _cmd_doctor(args) -> int:
    from threedgen.doctor import format_report, report  # heavy (torch)

    info = report(build=args.build, retry=args.retry)
    print(json.dumps(info, indent=1) if args.json else format_report(info))
    return 0


def _cmd_train_prior(args) -> int:
    from threedgen.guidance.priors.learned.train import TrainConfig, train  # heavy (torch, diffusers)

    cfg = TrainConfig()
    for key, value in (("steps", args.steps), ("batch_size", args.batch_size), ("views_per_shape", args.views),
                       ("seed", args.seed)):
        if value is not None:
            setattr(cfg, key, value)
    folder = train(Path(args.out), cfg, resume=args.resume, export_to=Path(args.export) if args.export else None,
                   threads=args.threads, quiet=args.no_progress)
    print(folder)
    return 0


def _cmd_train_amortised(args) -> int:
    flags = {k: v for k, v in (("steps", args.steps), ("seed", args.seed), ("device", args.device)) if v is not None}
    if args.resume:
        given = [flag for flag, value in (("PROMPTS", args.prompts), ("--seed", args.seed), ("--device", args.device),
                                          ("key=value overrides", args.overrides or None), ("--out", args.out))
                 if value is not None]
        given += [f"--{k}" for k in ("guidance", "prior") if getattr(args, k) != PARSER_DEFAULTS[k]]
        if given:
            raise UserError(f"--resume continues a model with its own config and prompts (only --steps, --devices and "
                            f"--nodes may change); drop {', '.join(given)}")
        read_meta(args.resume)
        cfg = gen_cfg = prompts = None
        folder = args.resume
    else:
        if args.prompts is None:
            raise UserError("give the prompt file: threedgen train-amortised PROMPTS.txt (one prompt per line)")
        prompts = read_prompt_file(args.prompts)
        gen_cfg, overrides = generator_settings(parse_overrides(args.overrides))
        flags.setdefault("steps", AMORTISED_STEPS)
        merged, _ = resolve_request(args.guidance, "nerf", args.prior, overrides, {**flags, "prompt": prompts[0]})
        cfg = merged.cfg
        for i, prompt in enumerate(prompts):  # every prompt by the prior's rules, before anything starts
            cfg.prompt = prompt
            try:
                cfg.check()
            except UserError as exc:
                raise UserError(f"{args.prompts}, prompt {i + 1}: {exc}") from None
            prompts[i] = cfg.prompt
        cfg.prompt = prompts[0]
        folder = args.out or str(Path("models") / Path(args.prompts).stem)
    from threedgen.amortised import train_amortised  # heavy (torch, Lightning): only once the input is good

    folder = train_amortised(cfg, gen_cfg, prompts, folder, resume=bool(args.resume), steps=args.steps,
                             devices=args.devices, nodes=args.nodes, progress_bar=not args.no_progress)
    if launched_rank() == 0:
        print(folder)
    return 0


def _cmd_generate(args) -> int:
    read_meta(args.model)
    from threedgen.amortised import AmortisedModel  # heavy (torch): only once the input is good

    model = AmortisedModel(args.model, device=args.device)
    run_dir = model.generate(args.prompt, out=args.out, evaluate=not args.no_eval)
    status, m = RunFolder(run_dir).read_status(), RunFolder(run_dir).read_metrics()
    score = _score(m) if m is not None else ""
    print(f"{score}generated in {status['generate_seconds'] * 1000:.0f} ms (model loaded in {model.load_seconds:.1f} s, "
          f"export {status['export_seconds']:.1f} s)", file=sys.stderr)
    print(run_dir)
    return 0


def _cmd_verify(args) -> int:
    from threedgen.verify import cmd_verify  # heavy (torch, Lightning): only once the input is good

    return cmd_verify(args)


def _cmd_guidance(args) -> int:
    print(f"{'method':<8} {'paper':<42} teacher passes per step")
    for entry in GUIDANCE.entries():
        print(f"{entry.name:<8} {entry.summary:<42} {entry.cost}")
    return 0


def _request(args) -> RunRequest:
    """The run request of `threedgen run` / `config show`'s flags and ``key=value`` settings."""
    return RunRequest(prompt=args.prompt, negative_prompt=args.negative_prompt, guidance=args.guidance,
                      representation=args.representation, prior=args.prior, steps=args.steps, seed=args.seed,
                      overrides=tuple(args.overrides or ()), device=args.device)


def _cmd_config(args) -> int:
    if args.action == "keys":
        if args.overrides:
            raise UserError("`threedgen config keys` takes no key=value; use `threedgen config show` for a run's values")
        prior = resolve_prior(args.prior, cuda_for_auto()).name if args.prior in PRIOR_CHOICES else args.prior
        print(format_keys(args.guidance, args.representation, prior))
        return 0
    has_prompt = args.prompt is not None or "prompt" in parse_overrides(args.overrides)
    merged, note = _request(args).resolve(whole_run=has_prompt)
    if note:
        print(f"# {note}")
    values = flat(merged.cfg)
    width = max(len(k) for k in values)
    for key, value in values.items():
        origin = merged.origin.get(key, DEFAULT_LAYER)
        if key == "prompt" and not has_prompt:
            origin = "none given: --prompt TEXT checks it against the prior too"
        print(f"{key:<{width}} = {json.dumps(value)}  # {origin}")
    return 0


def config_keys(guidance: str = "sds", representation: str = "nerf", prior: str = "shapes") -> list[tuple[str, object, str]]:
    """(dotted key, default, docstring) of every key of a run with these components."""
    sections = {"guidance": GUIDANCE[guidance].config, "representation": REPRESENTATIONS[representation].config,
                "prior": PRIORS[prior].config}
    rows = []

    def walk(cls, prefix):
        docs, obj = field_docs(cls), cls()
        for f in dataclasses.fields(cls):
            default = getattr(obj, f.name)
            section = sections.get(f.name) if cls is RunConfig else None
            if section is not None:
                walk(section, f"{f.name}.")
            elif dataclasses.is_dataclass(default):
                walk(type(default), f"{prefix}{f.name}.")
            else:
                rows.append((prefix + f.name, default, docs.get(f.name, "")))

    walk(RunConfig, "")
    return rows


def format_keys(guidance: str, representation: str, prior: str) -> str:
    lines = [f"# every key of a run with --guidance {guidance} --representation {representation} --prior {prior};",
             "# the defaults here; presets (configs/) change some: `threedgen config show` gives a run's values"]
    for key, default, doc in config_keys(guidance, representation, prior):
        value = list(default) if isinstance(default, tuple) else default
        lines.append(f"{key} = {json.dumps(value)}" + (f"\n    {doc}" if doc else ""))
    return "\n".join(lines)


def _cmd_webui(args) -> int:  # pragma: no cover - exercised through a subprocess in the tests
    from threedgen.webui import auth as logins  # standard library only: hash-password answers at once

    if args.action == "hash-password":
        user = logins.check_username(args.user) if args.user is not None else None
        hashed = logins.hash_password(logins.read_new_password())
        print(hashed if user is None else f"{user}:{hashed}")
        return 0
    if args.user is not None:
        raise UserError("--user goes with `threedgen webui hash-password`")
    # Before anything starts: a bind beyond loopback needs a login (or --no-auth), and the file must read.
    warning = logins.check_exposure(args.host, args.auth_file is not None, args.no_auth)
    auth = logins.read_auth(args.auth_file)

    from threedgen.jobs.backends import default_devices  # the job machinery: only for this command
    from threedgen.webui.app import Settings, WebUI, wait_forever  # heavy (Gradio)

    devices = default_devices(args.workers)
    if args.priors == "auto":
        priors = ["shapes", "shapes-unet-camera", "shapes-unet"]
        priors += ["stable-diffusion"] if devices[0].startswith("cuda") else []
    else:
        priors = [p.strip() for p in args.priors.split(",") if p.strip()]
        unknown = [p for p in priors if p not in PRIORS]
        if unknown or not priors:
            raise UserError(f"--priors: unknown prior(s) {', '.join(unknown) or '(none)'}; valid: {', '.join(PRIORS)}")
    parse_overrides(list(args.set))  # a malformed --set fails here, before the server starts
    amortised = read_meta(args.amortised)[0] if args.amortised else None  # a bad model folder fails here too
    ui = WebUI(Settings(outputs=Path(args.outputs), state=_default_state(args.state), priors=priors, max_steps=args.max_steps,
                        max_queued=args.max_queue, devices=devices, overrides=list(args.set), backend=args.backend,
                        ray_address=args.ray_address, runs=Path(args.runs) if args.runs else None,
                        max_restarts=args.max_restarts, amortised=amortised))
    if ui.recovered:
        print(f"threedgen: {len(ui.recovered)} job(s) left running by a stopped server are now interrupted; "
              "resume them from the page", file=sys.stderr)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    demo = ui.launch(args.host, args.port, auth=auth, block=False,
                     login_limiter=logins.LoginLimiter(max_failures=19, window_s=60.0) if auth else None)
    print(f"threedgen web UI: http://{args.host}:{args.port}  (outputs {ui.settings.outputs}, state {ui.settings.state})",
          file=sys.stderr, flush=True)
    wait_forever(ui, demo)
    return 0


def _default_state(state: Optional[str]) -> Path:
    if state is not None:
        return Path(state).expanduser().resolve()
    import platformdirs  # only where --state is not given

    return platformdirs.user_data_path("threedgen") / "webui"


def _cmd_batch(args) -> int:
    from threedgen.jobs import batch as b  # the job table and batches: only for this command
    from threedgen.jobs.backends import make_backend  # the job table and batches: only for this command
    from threedgen.jobs.store import JobStore  # the job table and batches: only for this command

    state = _default_state(args.state)
    if args.status or args.attach:
        if args.prompts:
            raise UserError("--status and --attach take no batch file (they follow a batch already queued)")
        store = JobStore(state / "jobs.sqlite", max_queued=args.max_queue)
        record = b.load_batch(state, args.batch)
        if args.status:
            print(b.format_status(store, record))
            return 0
    else:
        if not args.prompts:
            raise UserError("give a batch file (one prompt per line), or --status / --attach")
        if args.batch:
            raise UserError("--batch goes with --status or --attach")
        if args.janus_retry is not None:
            args.set = list(args.set) + [f"janus.retries={args.janus_retry}"]
        parse_overrides(list(args.set))  # a malformed --set: one line, before the file is read
        defaults = {"guidance": args.guidance, "representation": args.representation, "prior": args.prior,
                    "steps": args.steps, "seed": args.seed}
        jobs = b.read_batch(args.prompts, defaults, list(args.set), args.max_queue)
        store = JobStore(state / "jobs.sqlite", max_queued=args.max_queue)
        record = {"batch": b.new_batch_id(), "file": str(Path(args.prompts).resolve()), "backend": args.backend,
                  "state": str(state), "report": str(Path(args.report or "batch.json").resolve()), "lines": [n for n, _ in jobs]}
        queued = [({**request.to_dict(), "batch": {"id": record["batch"], "line": n}}, request.steps)
                  for n, request in jobs]
    runs = Path(args.runs).expanduser().resolve() if args.runs else state / "runs"
    backend = make_backend(args.backend, store, runs, Path(args.outputs).expanduser().resolve(),
                           ray_address=args.ray_address, max_restarts=args.max_restarts, workers=args.workers)
    if backend.recover():
        print("threedgen batch: jobs left running by a stopped process are now interrupted", file=sys.stderr)
    backend.start()  # a cluster is joined before anything is queued: an unreachable address queues nothing
    if args.attach:
        backend.reattach(record["ids"])
    else:
        record["ids"] = backend.submit(queued)
        b.save_batch(state, record)
        print(f"threedgen batch: queued {len(record['ids'])} job(s) as batch {record['batch']} "
              f"(backend {args.backend}, state {state})", file=sys.stderr, flush=True)
    report = Path(args.report or record["report"])
    try:
        jobs_done = b.watch(store, record["ids"])
    except KeyboardInterrupt:
        backend.stop()
        b.write_report(store, record, report)
        print(f"\nthreedgen batch: stopped watching batch {record['batch']}; {backend.detached_hint(state)}",
              file=sys.stderr)
        return 130
    backend.stop()
    result = b.write_report(store, record, report)
    ok = all(j.status == "succeeded" for j in jobs_done)
    print(f"threedgen batch: {', '.join(f'{n} {s}' for s, n in sorted(result['counts'].items()))}; report {report}",
          file=sys.stderr)
    return 0 if ok else 1


def _cmd_compare(args) -> int:
    from threedgen import compare as cmp  # the job table and the workbench: only for this command
    from threedgen.jobs import batch as b  # the job table and batches: only for this command
    from threedgen.jobs.backends import make_backend  # the job table and batches: only for this command
    from threedgen.jobs.store import JobStore  # the job table and batches: only for this command

    if args.attach:
        given = [f for f, v in (("--prompt", args.prompt), ("--out", args.out), ("--budget-steps", args.budget_steps),
                                ("--budget-seconds", args.budget_seconds), ("--set", args.set or None)) if v]
        if given:
            raise UserError(f"--attach follows a comparison as it was planned; drop {', '.join(given)}")
        folder = Path(args.attach).expanduser().resolve()
        record = cmp.load(folder)
        state = Path(record["state_folder"])
        store = JobStore(state / "jobs.sqlite", max_queued=args.max_queue)
    else:
        if args.prompt is None:
            raise UserError('--prompt is required, e.g. threedgen compare --prompt "a green house" --methods sds,vsd')
        methods, seeds = cmp.parse_methods(args.methods), cmp.parse_seeds(args.seeds)
        parse_overrides(list(args.set))  # a malformed --set: one line, before anything is planned
        if args.budget_steps is not None and args.budget_seconds is not None:
            raise UserError("give one budget: --budget-steps N or --budget-seconds S, not both")
        planned = cmp.plan(args.prompt, methods, seeds, args.representation, args.prior, args.budget_steps,
                           args.budget_seconds, args.negative_prompt or "", tuple(args.set), args.max_queue)
        folder = Path(args.out or cmp.default_folder(planned[0][2].prompt)).expanduser().resolve()
        if (folder / cmp.RECORD).exists():
            raise UserError(f"{folder} already holds a comparison; give another --out, or --attach {folder}")
        state = Path(args.state).expanduser().resolve() if args.state else folder / "state"
        folder.mkdir(parents=True, exist_ok=True)
        check_writable(folder)
        store = JobStore(state / "jobs.sqlite", max_queued=args.max_queue)
        record = cmp.new_record(planned[0][2].prompt, planned[0][2].negative_prompt or "", methods, seeds,
                                args.representation, planned[0][2].prior, args.budget_steps, args.budget_seconds, args.backend,
                                state, planned)
    runs = Path(args.runs).expanduser().resolve() if args.runs else folder / "runs"
    backend = make_backend(args.backend, store, runs, folder / "outputs", ray_address=args.ray_address,
                           max_restarts=args.max_restarts, workers=args.workers)
    if backend.recover():
        print("threedgen compare: jobs left running by a stopped process are now interrupted", file=sys.stderr)
    backend.start()
    ids = [r["job"] for r in record["runs"] if r.get("job")]
    if args.attach:
        backend.reattach(ids)
    else:
        ids = backend.submit([(cmp.job_params(record, m, seed, request), request.steps) for m, seed, request in planned])
        for run, job_id in zip(record["runs"], ids):
            run["job"] = job_id
        cmp.save(folder, record)
        n_methods, n_seeds = len(record["methods"]), len(record["seeds"])
        print(f"threedgen compare: queued {len(ids)} run(s) ({n_methods} method{'s' * (n_methods != 1)} x {n_seeds} "
              f"seed{'s' * (n_seeds != 1)}, backend {record['backend']}) in {folder}", file=sys.stderr, flush=True)
    try:
        b.watch(store, ids)
    except KeyboardInterrupt:
        backend.stop()
        cmp.collect(record, {j.id: j for j in store.many(ids)}, folder)
        cmp.write_outputs(record, folder)
        print(f"\nthreedgen compare: stopped; {backend.detached_hint(state)}; the sheet so far is in {folder}; "
              f"continue with: threedgen compare --attach {folder}", file=sys.stderr)
        return 130
    backend.stop()
    print("threedgen compare: rendering the views and writing the sheet", file=sys.stderr, flush=True)
    cmp.collect(record, {j.id: j for j in store.many(ids)}, folder)
    written = cmp.write_outputs(record, folder)
    print(f"threedgen compare: {cmp.progress_line(record)}; sheet {written['sheet']}, report {written['report']}",
          file=sys.stderr)
    print(folder)
    return 0 if all(r["status"] == "succeeded" for r in record["runs"]) else 1


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    try:
        # key=value overrides may come anywhere after `run`, between the flags too
        args, extra = parser.parse_known_args(argv)
        if args.command in ("run", "config", "train-amortised", "refine"):
            args.overrides = list(args.overrides or []) + [e for e in extra if "=" in e and not e.startswith("-")]
            extra = [e for e in extra if "=" not in e or e.startswith("-")]
        if extra:
            raise UserError(f"unrecognized arguments: {' '.join(extra)} (see `{parser.prog} --help`)")
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        commands = {"run": _cmd_run, "export": _cmd_export, "eval": _cmd_eval, "guidance": _cmd_guidance,
                    "config": _cmd_config, "doctor": _cmd_doctor, "webui": _cmd_webui, "batch": _cmd_batch,
                    "train-prior": _cmd_train_prior, "train-amortised": _cmd_train_amortised,
                    "generate": _cmd_generate, "verify": _cmd_verify, "refine": _cmd_refine,
                    "compare": _cmd_compare}
        return commands[args.command](args)
    except UserError as exc:
        print(f"threedgen: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RunFailed as exc:
        print(f"threedgen: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:  # disk full, a folder deleted or read-only while writing (export, eval)
        where = f" {exc.filename}" if exc.filename else ""
        print(f"threedgen: error: cannot write{where}: {exc.strerror or exc}; earlier files are intact",
              file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as exc:
        print(f"threedgen: interrupted{'; ' + str(exc) if str(exc) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
