"""The Python entry point of a run, shared by the CLI and the web UI.

``run(cfg, out)`` takes a config validated by ``threedgen.config.build_config`` (prompt, values,
the prior's checks of the run), checks that the output folder is writable, then trains with
Lightning, exports the mesh, video and previews, and scores the result when the prior knows the
truth.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from threedgen import refine as refine_stage
from threedgen.callbacks import PreviewCallback, RunFolderCheckpointIO, SafeCheckpoint, StepProgressBar
from threedgen.cameras import CameraSampler
from threedgen.checkpoints import choose_checkpoint, read_checkpoint, save_checkpoint
from threedgen.config import RunConfig, to_yaml
from threedgen.devices import is_out_of_memory, peak_memory_mb, resolve_device
from threedgen.errors import RunFailed, UserError
from threedgen.evaluate import evaluate_run, prior_check_run
from threedgen.export import export_run_outputs
from threedgen.fingerprints import FingerprintCallback
from threedgen.guidance import priors
from threedgen.guidance.config import GUIDANCE
from threedgen.janus_prior import gate_passes
from threedgen.manifest import write_manifest
from threedgen.memory import check_training_memory
from threedgen.representations.config import REPRESENTATIONS
from threedgen.rundir import NO_SPACE, RunFolder, atomic_write_text, check_writable, new_run_dir, write_status
from threedgen.runs import (
    CONFIG_NAME,
    load_representation,
    load_state,
    open_run,
    print_err,
    quiet_libraries,
    read_state,
    run_config,
    sampler_here,
    warn_checkpoint,
)
from threedgen.system import CameraDataModule, DivergedError, System
from threedgen.views import representation_device

__all__ = ["run", "refine", "refine_run", "finish_run", "build_components", "make_trainer", "trainer_devices", "load_trained", "load_representation",
           "quiet_libraries", "open_run", "out_of_memory", "as_run_failure"]


def build_components(cfg: RunConfig, device: torch.device, prior=None):
    """prior, prompt embeddings, representation, guidance and the system for ``cfg``."""
    if prior is None:
        prior = priors.build_prior(cfg.prior, device)
    embeds = prior.encode_prompt(cfg.prompt, cfg.negative_prompt)
    representation = REPRESENTATIONS[cfg.representation.name].cls(cfg.representation, device)
    guidance = GUIDANCE[cfg.guidance.name].cls(cfg.guidance, prior)
    return System(cfg, prior, representation, guidance, embeds).to(device)


def trainer_devices(device: torch.device):
    """Lightning's ``devices`` for one device: its index as a list (``devices=1`` would mean the
    first visible GPU, whatever ``cuda:N`` the run asked for), or 1 on the CPU."""
    if device.type != "cuda":
        return 1
    return [device.index if device.index is not None else torch.cuda.current_device()]


def make_trainer(cfg: RunConfig, run_dir: Path, device: torch.device, progress_bar: bool = True, callbacks=(),
                 label: Optional[str] = None, devices: int = 1, nodes: int = 1, stage: Optional[str] = None):
    """The Lightning trainer of a run: checkpoints, previews, the CSV log and the progress bar
    (``label``: its text, default the prompt). ``devices`` x ``nodes`` above 1 is DDP (gloo on
    CPUs, NCCL on GPUs: the amortised system's multi-process training). ``stage`` (``refine``): a
    later stage, whose checkpoints and log go to its own folder in the run folder."""
    if progress_bar:
        callbacks = [*callbacks, StepProgressBar(label or cfg.prompt)]
    ddp = devices * nodes > 1
    folder = RunFolder(run_dir).refine if stage else run_dir
    return pl.Trainer(
        max_steps=cfg.steps, accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=devices if ddp else trainer_devices(device), num_nodes=nodes, strategy="ddp" if ddp else "auto",
        logger=CSVLogger(folder, name=RunFolder.LOGS, version="", flush_logs_every_n_steps=50), log_every_n_steps=10,
        callbacks=[SafeCheckpoint(folder, cfg.checkpoint_every), PreviewCallback(run_dir, cfg, stage), *callbacks],
        plugins=[RunFolderCheckpointIO()], enable_checkpointing=False, enable_progress_bar=progress_bar,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=run_dir, max_epochs=-1,
        max_time=timedelta(seconds=cfg.max_seconds) if cfg.max_seconds and not stage else None)


def run(cfg: Optional[RunConfig] = None, out: str | Path = "outputs", resume: str | Path | None = None,
        steps: Optional[int] = None, progress_bar: bool = True, callbacks=(), note: Optional[str] = None,
        device: Optional[str] = None) -> Path:
    """Train, export and (where the prior has a truth) evaluate. Returns the run folder.

    ``device`` (``cpu``, ``cuda``, ``cuda:N``) replaces the config's device: a resumed web UI job
    runs on the GPU of the worker that resumes it, not on the one that started it."""
    quiet_libraries()
    ckpt_path = None
    if resume is not None:
        flags = {k: v for k, v in (("steps", steps), ("device", device)) if v is not None}
        cfg, run_dir = run_config(resume, flags or None)
        check_writable(run_dir)
        chosen = choose_checkpoint(run_dir, warn=warn_checkpoint, repair=True)
        ckpt_path = str(chosen) if chosen is not None else None
        if chosen is not None and "generated_by" in read_checkpoint(chosen, run_dir).get("threedgen", {}):
            raise UserError(f"run {str(run_dir)!r} was generated by an amortised model (threedgen generate), not "
                            "optimised: it has no training state to continue; export and eval work on it, and "
                            "threedgen run --prompt ... optimises the prompt from scratch")
    assert cfg is not None
    if device is not None and resume is None:
        cfg.device = device
    device = resolve_device(cfg.device)
    check_training_memory(cfg, device)  # a render that cannot fit the GPU: refused before the prior is built
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    if resume is None:
        check_writable(Path(out))  # before any folder is made or the prior is built
    if note:
        print_err(f"threedgen: {note}")
    try:
        system = build_components(cfg, device)
    except RuntimeError as exc:
        failure = out_of_memory(exc, cfg, None)
        if failure is None:
            raise
        raise failure from exc
    if resume is None:
        run_dir = new_run_dir(Path(out), cfg.prompt)
    started = time.time()
    trainer = None
    try:
        earlier = RunFolder(run_dir).read_status() if resume is not None else {}  # before this run's writes
        atomic_write_text(run_dir / CONFIG_NAME, to_yaml(cfg))
        stage_callbacks = list(callbacks)  # the caller's (a web job's progress): a refinement reports too
        if resume is None:  # a resumed run keeps the manifest and fingerprints of its start
            write_manifest(cfg, run_dir, device, system.prior)
            callbacks = [FingerprintCallback(run_dir, cfg.verify_steps), *callbacks]  # threedgen verify's record
        write_status(run_dir, "running", step=None if resume else 0, max_steps=cfg.steps,
                     backends=system.representation.backends())
        trainer = make_trainer(cfg, run_dir, device, progress_bar, callbacks)
        _fit(trainer, system, cfg, ckpt_path, run_dir)
        refining = cfg.refine.enabled
        coarse = earlier.get("coarse") or {}
        # Stage 1's asset was published and stage 1 did not train further since: the refinement
        # continues (or, finished, there is nothing left to do).
        published = (refining and RunFolder(run_dir).refine_start.is_file()
                     and coarse.get("step") == int(trainer.global_step))
        if published and earlier.get("status") == "succeeded" and "step" in (earlier.get("refine") or {}):
            write_status(run_dir, "succeeded", **{k: v for k, v in earlier.items() if k not in ("status", "time")})
            return run_dir
        if not published:
            coarse = _finish(trainer, system, cfg, run_dir, device, started, final=not refining)
        if refining:
            trainers = [trainer]  # refine() adds its own, for the status of an interrupt or a failure
            if device.type == "cuda":
                system.cpu()  # stage 1's field and guidance leave the GPU to stage 2 (the prior stays)
            try:
                refine(run_dir, cfg, device, system.prior, system.embeds, coarse, fresh=not published,
                       progress_bar=progress_bar, trainers=trainers, callbacks=stage_callbacks)
            finally:
                trainer = trainers[-1]
    except KeyboardInterrupt:
        _try_status(run_dir, "interrupted", max_steps=trainer.max_steps if trainer is not None else cfg.steps,
                    step=int(trainer.global_step) if trainer is not None else None)
        raise
    except BaseException as exc:
        failure = as_run_failure(exc, run_dir, cfg)
        message = str(failure or exc).splitlines()[0] if str(failure or exc) else type(exc).__name__
        _try_status(run_dir, "failed", error=message,
                    step=int(trainer.global_step) if trainer is not None else None)
        if failure is not None:
            raise failure from exc
        raise
    return run_dir


def run_gated(cfg: RunConfig, out: str | Path = "outputs", progress_bar: bool = True, callbacks=(),
              note: Optional[str] = None, report=None) -> Path:
    """``run`` behind the Janus gate (``janus.retries`` > 0): after a run whose prior Janus check
    (``janus_score_prior``) is above ``janus.threshold``, the next seed runs, up to ``retries`` more
    times. Every attempt keeps its run folder; each holds ``janus_gate.json`` (every attempt so far:
    seed, folder, score, passed); the result is the best attempt's folder (the first that passed,
    else the lowest score). ``report(attempt)`` hears of each attempt as it ends."""
    if not cfg.janus.retries:
        return run(cfg, out=out, progress_bar=progress_bar, callbacks=callbacks, note=note)
    attempts: list[dict] = []
    for k in range(cfg.janus.retries + 1):
        attempt = copy.deepcopy(cfg)
        attempt.seed = (cfg.seed + k) % 2 ** 32
        run_dir = run(attempt, out=out, progress_bar=progress_bar, callbacks=callbacks, note=note if k == 0 else None)
        score = (RunFolder(run_dir).read_metrics() or {}).get("janus_score_prior")
        attempts.append({"attempt": k + 1, "seed": attempt.seed, "run_dir": str(run_dir), "janus_score_prior": score,
                         "passed": gate_passes(score, cfg.janus.threshold)})
        for earlier in attempts:
            atomic_write_text(RunFolder(earlier["run_dir"]).janus_gate, json.dumps(
                {"threshold": cfg.janus.threshold, "retries": cfg.janus.retries, "attempts": attempts}, indent=1))
        if report is not None:
            report(attempts[-1])
        if attempts[-1]["passed"]:
            break
    best = min(attempts, key=lambda a: (not a["passed"], a["janus_score_prior"] if a["janus_score_prior"] is not None
                                        else -1.0, a["attempt"]))
    return Path(best["run_dir"])


def _fit(trainer, system: System, cfg: RunConfig, ckpt_path: Optional[str], run_dir: Path,
         resume_hint: Optional[str] = None) -> None:
    """The optimisation; Ctrl-C becomes a KeyboardInterrupt that says how to continue
    (``resume_hint``, default ``threedgen run --resume RUN_DIR``)."""
    try:
        trainer.fit(system, datamodule=CameraDataModule(CameraSampler(cfg.camera, cfg.seed)), ckpt_path=ckpt_path,
                    weights_only=True)
    except SystemExit:
        # Lightning turns Ctrl-C into a graceful stop and sys.exit(1), leaving SIGINT ignored.
        if not trainer.interrupted:
            raise
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt(f"continue with: {resume_hint or f'threedgen run --resume {run_dir}'}") from None


def _finish(trainer, system: System, cfg: RunConfig, run_dir: Path, device, started: float, final: bool = True) -> dict:
    """After training: the last checkpoint, the export, the eval (where the prior has a truth) and
    the status with each phase's seconds (succeeded when ``final``, else running: a refinement
    follows). Returns the status written."""
    _final_checkpoint(trainer, system, device, run_dir, "diverged: the trained parameters are not finite; nothing "
                      "was exported")
    train_seconds = time.time() - started
    system.representation.eval()
    has_truth = system.prior.truth(cfg.prompt) is not None
    return finish_run(system.representation, cfg, run_dir, started, evaluate=has_truth, system=system,
                      state="succeeded" if final else "running", step=int(trainer.global_step),
                      skipped_steps=system.skipped_steps, rollbacks=system.rollbacks,
                      rolled_back_steps=system.rolled_back_steps, train_seconds=round(train_seconds, 2))


def _final_checkpoint(trainer, system: System, device, folder: Path, diverged: str) -> None:
    """After a stage's training: the system back on the run's device (Lightning's teardown moved
    it to the CPU), DivergedError(``diverged``) unless its state is finite, and a checkpoint in
    ``folder`` of the last step when the periodic ones missed it."""
    system.to(device)
    if not system.state_finite():
        raise DivergedError(diverged)
    if next(c for c in trainer.callbacks if isinstance(c, SafeCheckpoint)).saved_step != trainer.global_step:
        save_checkpoint(trainer, folder)


def finish_run(representation, cfg: RunConfig, run_dir: Path, started: float, evaluate: bool = True, system=None,
               state: str = "succeeded", **status) -> dict:
    """What every way of making a representation ends with (an optimised run, an amortised
    generation, a later stage): the export, the eval where ``evaluate`` (and ``cfg.export.evaluate``)
    and the prior knows the truth, and ``status.json`` = ``state`` (succeeded) with each phase's
    seconds and the given ``status`` keys. ``system``: the run's own, so the eval reuses its prior.
    Returns the status written."""
    export_started = time.time()
    summary = export_run_outputs(representation, cfg, run_dir)
    export_seconds = time.time() - export_started
    metrics = None
    if evaluate and cfg.export.evaluate:
        metrics = evaluate_run(run_dir, system=system)
    elif cfg.export.evaluate and cfg.janus.enabled and system is not None:  # no truth: the prior's Janus check alone
        metrics = prior_check_run(run_dir, cfg, representation, system.prior)
    status = {"max_steps": cfg.steps, **status, "export_seconds": round(export_seconds, 2),
              "eval_seconds": round(time.time() - export_started - export_seconds, 2),
              "total_seconds": round(time.time() - started, 2), "mesh_faces": summary["faces"],
              "peak_memory_mb": peak_memory_mb(representation_device(representation)),
              "mask_iou": None if metrics is None else metrics.get("mask_iou")}
    write_status(run_dir, state, **status)
    return status


def refine(run_dir: Path, cfg: RunConfig, device, prior, embeds, coarse: dict, fresh: bool = True,
           progress_bar: bool = True, trainers: Optional[list] = None, callbacks=(), from_start: bool = False,
           resume_hint: Optional[str] = None) -> dict:
    """Stage 2 (``threedgen.refine``) on a run folder whose stage-1 asset is published: from
    ``mesh.glb`` when ``fresh`` (an earlier refinement's folder is replaced), else continuing the
    refinement's last checkpoint. Ends like stage 1: the refined asset exported and scored, and
    ``status.json`` succeeded with both stages' steps and seconds (``coarse``: stage 1's status,
    ``refine``: this stage's). A refinement that fails for good (diverged, or a mesh it cannot
    refine) leaves stage 1's asset published and says so in ``status.json`` (``refine.error``).
    ``trainers``: the stage's trainer is appended (the caller's status on an interrupt);
    ``callbacks``: the caller's Lightning callbacks for this stage's trainer (progress reports);
    ``from_start``: a fresh refinement starts from the earlier refinement's start (stage 1's asset)
    when there is one, not from the published mesh (which may be that refinement's result)."""
    folder = RunFolder(run_dir)
    started = time.time()
    write_status(run_dir, "running", stage=refine_stage.STAGE, step=0, max_steps=cfg.refine.steps, coarse=coarse)
    try:
        if fresh:
            # From stage 1's asset: the one this refinement's folder started from when it has one
            # (refining again), else the published mesh (stage 1's, just exported).
            start = (refine_stage.read_start(run_dir) if from_start and folder.refine_start.is_file()
                     else refine_stage.load_start(run_dir, cfg))
            shutil.rmtree(folder.refine, ignore_errors=True)
            refine_stage.save_start(run_dir, start)
            ckpt_path = None
        else:
            start = refine_stage.read_start(run_dir)
            chosen = choose_checkpoint(folder.refine, warn=warn_checkpoint, repair=True)
            ckpt_path = str(chosen) if chosen is not None else None
        system = refine_stage.build_refine_system(cfg, prior, embeds, start, device)
        trainer = make_trainer(system.cfg, run_dir, device, progress_bar, callbacks, label=f"refine: {cfg.prompt}",
                               stage=refine_stage.STAGE)
        if trainers is not None:
            trainers.append(trainer)
        _fit(trainer, system, system.cfg, ckpt_path, run_dir, resume_hint=resume_hint)
        _final_checkpoint(trainer, system, device, folder.refine, "the refinement diverged: its parameters are not finite")
    except (DivergedError, UserError) as exc:
        return _keep_coarse(run_dir, cfg, coarse, str(exc))
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        rc = cfg.refine
        return _keep_coarse(run_dir, cfg, coarse, f"out of memory at refine.resolution={rc.resolution or cfg.render.resolution}"
                            f" with refine.supersample={rc.supersample}; lower those, then: threedgen refine {run_dir}")
    train_seconds = time.time() - started
    system.representation.eval()
    has_truth = prior.truth(cfg.prompt) is not None
    coarse = {k: v for k, v in coarse.items() if k != "republish"}
    before = float(coarse.get("total_seconds") or 0.0)
    # total_seconds: both stages' (stage 1's as it recorded them, then this one's: training, export, eval)
    return finish_run(system.representation, cfg, run_dir, started - before, evaluate=has_truth, system=system,
                      **refine_stage.stage_keys(coarse), coarse=coarse,
                      refine={"step": int(trainer.global_step), "max_steps": cfg.refine.steps,
                              "skipped_steps": system.skipped_steps, "rollbacks": system.rollbacks,
                              "train_seconds": round(train_seconds, 2)})


def _keep_coarse(run_dir: Path, cfg: RunConfig, coarse: dict, error: str) -> dict:
    """A refinement that failed for good: its folder is set aside, stage 1's asset is the published
    one (exported again from stage 1's checkpoint when the published files came from an earlier
    refinement) and the status says what happened."""
    folder = RunFolder(run_dir)
    message = error.splitlines()[0] if error else "failed"
    if folder.refine.exists():
        shutil.rmtree(folder.failed_refine, ignore_errors=True)
        os.replace(folder.refine, folder.failed_refine)
    if coarse.get("republish"):  # the files on disk are an earlier refinement's: stage 1's again
        _, representation, _ = load_representation(run_dir)
        export_run_outputs(representation, cfg, run_dir)
        if cfg.export.evaluate:
            try:
                evaluate_run(run_dir)
            except UserError:  # a prior without a truth: nothing to score
                pass
    print_err(f"threedgen: the refinement failed ({message}); the stage-1 asset stays the published one")
    status = {**{k: v for k, v in coarse.items() if k != "republish"}, "refine": {"error": message}}
    status["coarse"] = {k: v for k, v in coarse.items() if k != "republish"}
    status.pop("status", None)
    status.pop("time", None)
    write_status(run_dir, "succeeded", **status)
    return status


def refine_run(run_dir: str | Path, flags: Optional[dict] = None, progress_bar: bool = True,
               device: Optional[str] = None) -> Path:
    """``threedgen refine RUN_DIR``: stage 2 on a run folder whose stage 1 finished (its
    ``refine.*`` settings from the folder's config, then ``flags``). A refinement that was
    interrupted (or failed) continues from its last checkpoint when no settings are given;
    otherwise a fresh one starts from stage 1's asset. The config is saved with the refinement on,
    so ``threedgen run --resume`` continues it too."""
    quiet_libraries()
    cfg, run_dir = run_config(run_dir, flags)
    cfg.refine.enabled = True
    cfg.export.texture = "uv"  # the mesh has UVs (load_start refuses one without): the config must say so
    if device is not None:
        cfg.device = device
    cfg.check(whole_run=False)
    folder = RunFolder(run_dir)
    status = folder.read_status()
    stage_one_done = status.get("status") == "succeeded" or isinstance(status.get("coarse"), dict)
    if not stage_one_done:
        raise UserError(f"run {str(run_dir)!r} has not finished (status {status.get('status') or 'unknown'}); "
                        f"finish it first: threedgen run --resume {run_dir}")
    unfinished = status.get("status") != "succeeded" and status.get("stage") == refine_stage.STAGE
    fresh = bool(flags) or not (unfinished and folder.refine_start.is_file())
    if fresh and not folder.refine_start.is_file():
        refine_stage.load_start(run_dir, cfg)  # its one-line errors before the prior is built
    check_writable(run_dir)
    dev = resolve_device(cfg.device)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    try:
        prior = priors.build_prior(cfg.prior, dev)
    except RuntimeError as exc:
        failure = out_of_memory(exc, cfg, None)
        if failure is None:
            raise
        raise failure from exc
    embeds = prior.encode_prompt(cfg.prompt, cfg.negative_prompt)
    keys = ("status", "time", "refine", "stage", "coarse", "error")
    coarse = status.get("coarse") or {k: v for k, v in status.items() if k not in keys}
    # The published files are an earlier refinement's: a failure must export stage 1 again.
    coarse = {**coarse, "republish": "step" in (status.get("refine") or {})} if fresh else coarse
    atomic_write_text(run_dir / CONFIG_NAME, to_yaml(cfg))
    trainers: list = []
    hint = f"threedgen refine {run_dir}"
    try:
        refine(run_dir, cfg, dev, prior, embeds, coarse, fresh=fresh, progress_bar=progress_bar, trainers=trainers,
               from_start=True, resume_hint=hint)
    except KeyboardInterrupt:
        _try_status(run_dir, "interrupted", stage=refine_stage.STAGE, max_steps=cfg.refine.steps, coarse=coarse,
                    step=int(trainers[-1].global_step) if trainers else None)
        raise
    except BaseException as exc:
        failure = as_run_failure(exc, run_dir, cfg)
        if failure is None:
            raise
        _try_status(run_dir, "failed", error=str(failure), stage=refine_stage.STAGE, coarse=coarse)
        raise failure from exc
    return run_dir


def _try_status(run_dir: Path, status: str, **extra) -> None:
    """Record the outcome where the folder still takes it (it may be the thing that failed)."""
    try:
        write_status(run_dir, status, **extra)
    except OSError:
        pass


def out_of_memory(exc: BaseException, cfg: RunConfig, run_dir: Optional[Path]) -> Optional[RunFailed]:
    """A one-line RunFailed with what to lower, for an out-of-memory error; None otherwise."""
    if not is_out_of_memory(exc):
        return None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if run_dir is None:
        return RunFailed(f"out of memory building the prior and the representation on {cfg.device}; free memory "
                         "(other jobs), use a smaller model, or run with --device cpu")
    hint = cfg.representation.memory_hint(resolve_device(cfg.device).type == "cuda")
    return RunFailed(f"out of memory at render.resolution={cfg.render.resolution} with camera.batch_size="
                     f"{cfg.camera.batch_size}; lower those{f' (or {hint})' if hint else ''} in "
                     f"{run_dir / CONFIG_NAME}, then continue with: threedgen run --resume {run_dir}")


def as_run_failure(exc: BaseException, run_dir: Path, cfg: RunConfig) -> Optional[RunFailed]:
    """A one-line RunFailed for faults of the machine (disk full, folder gone or read-only, out of
    memory), saying what to do; None for anything else (raised as it is)."""
    oom = out_of_memory(exc, cfg, run_dir)
    if oom is not None:
        return oom
    if isinstance(exc, OSError):
        where = exc.filename or run_dir
        if exc.errno in NO_SPACE:
            return RunFailed(f"disk full writing {where}; free space, then continue with: threedgen run --resume "
                             f"{run_dir} (the last checkpoint and earlier outputs are intact)")
        if not Path(run_dir).is_dir():
            return RunFailed(f"the run folder {run_dir} was deleted while the run wrote to it")
        return RunFailed(f"cannot write {where} ({exc.strerror or exc}); check the folder's permissions and space, "
                         f"then continue with: threedgen run --resume {run_dir}")
    return None


def load_trained(run_dir: str | Path, device: str | None = None):
    """(cfg, system, run_dir) of a run folder with the weights of its last checkpoint."""
    quiet_libraries()
    cfg, run_dir, ckpt = open_run(run_dir)
    dev = resolve_device(device or cfg.device)
    state = read_state(ckpt, run_dir, dev)
    cfg.representation, state = sampler_here(cfg.representation, state, dev, prefix="representation.")
    system = build_components(cfg, dev)
    load_state(system, ckpt, run_dir, dev, state=state)
    system.eval()
    return cfg, system, run_dir
