"""``threedgen verify RUN_DIR``: replay a run's first steps on this machine and compare.

The run's ``manifest.json`` must come from this threedgen (version and format); its
``fingerprints.json`` holds a digest, the loss and the parameter norm after each of the first
``verify_steps`` steps, and ``checkpoints/verify-step-N.pt`` the parameters after the last of them.
The replay trains those steps again from the run's ``config.yaml`` in a temporary folder, the way
``threedgen.runner.run`` starts a run (seed, components, trainer, camera stream; the schedules
still see the run's full ``steps``), recording its own manifest and fingerprints, then:

- ``bit-exact``: every step's digest equals the run's, and so does the saved state;
- ``within tolerance``: the digests differ, but every step's loss and parameter norm agree within
  a relative ``LOSS_RTOL`` / ``NORM_RTOL`` and, at the last step, no parameter is farther than
  ``PARAM_ATOL`` from the saved state (the largest difference is reported);
- ``diverged``: the first step where one of those does not hold, with the likely causes from
  comparing the run's manifest with this machine's (config, code, libraries, device, determinism
  settings, prior weights, a changed saved state).
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
import torch
import yaml

from threedgen.cameras import CameraSampler
from threedgen.config import to_yaml
from threedgen.devices import resolve_device
from threedgen.errors import UserError
from threedgen.fingerprints import (
    FingerprintCallback,
    cpu_state,
    load_state,
    read_fingerprints,
    state_digest,
)
from threedgen.manifest import config_changes, manifest_short_hash, read_manifest, write_manifest
from threedgen.rundir import atomic_write_text
from threedgen.runner import build_components, make_trainer
from threedgen.runs import CONFIG_NAME, quiet_libraries, run_config
from threedgen.system import CameraDataModule

LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-8
NORM_RTOL = 1e-5
PARAM_ATOL = 1e-4
STATUSES = ("bit-exact", "within tolerance", "diverged")
DIRTY = "threedgen's checkout has uncommitted changes (its revision alone does not pin the code)"
CUDA_EXTENSIONS = ("on CUDA, gsplat's, nerfacc's and tiny-cuda-nn's kernels sum with atomicAdd whatever torch's "
                   "determinism flags say (and with warn_only, so do grid_sample's and interpolate's backward)")


def replay(cfg, steps: int, folder: Path) -> tuple[list[dict], dict, dict]:
    """Train the first ``steps`` steps of ``cfg`` in ``folder`` as ``runner.run`` would: (the
    fingerprints of each step, the state after the last, the replay's manifest)."""
    quiet_libraries()
    device = resolve_device(cfg.device)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    system = build_components(cfg, device)
    atomic_write_text(folder / CONFIG_NAME, to_yaml(cfg))
    manifest = write_manifest(cfg, folder, device, system.prior)
    recorder = FingerprintCallback(folder, steps)
    trainer = make_trainer(cfg, folder, device, progress_bar=False, callbacks=[recorder])
    trainer.fit_loop.epoch_loop.max_steps = steps  # stop early; the system's schedules keep cfg.steps
    trainer.fit(system, datamodule=CameraDataModule(CameraSampler(cfg.camera, cfg.seed)), weights_only=True)
    return recorder.records, cpu_state(system), manifest


def _close(a: Optional[float], b: Optional[float], rtol: float, atol: float) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= atol + rtol * max(abs(a), abs(b))


def max_abs_difference(a: dict, b: dict) -> float:
    """The largest absolute difference between two state dicts' values; inf where their keys,
    shapes or non-tensor values differ, or a value is not finite."""
    if list(a) != list(b):
        return math.inf
    worst = 0.0
    for key, x in a.items():
        y = b[key]
        if torch.is_tensor(x) and torch.is_tensor(y):
            if x.shape != y.shape:
                return math.inf
            if x.numel():
                worst = max(worst, float((x.detach().double() - y.detach().double()).abs().max()))
        elif x != y:
            return math.inf
    return worst if math.isfinite(worst) else math.inf


def likely_causes(run: dict, here: dict, changed: list[str]) -> list[str]:
    """What differs between the run's manifest and the replay's (this machine), most likely first."""
    causes = []
    if changed:
        more = f" (and {len(changed) - 4} more)" if len(changed) > 4 else ""
        causes.append(f"config.yaml no longer matches the manifest's config: {'; '.join(changed[:4])}{more}")
    a, b = run.get("threedgen", {}), here.get("threedgen", {})
    if a.get("git_revision") != b.get("git_revision"):
        causes.append(f"threedgen's code differs: revision {str(a.get('git_revision'))[:12]} -> "
                      f"{str(b.get('git_revision'))[:12]}")
    libs = [f"{k} {run['libraries'].get(k)} -> {v}" for k, v in here.get("libraries", {}).items()
            if run.get("libraries", {}).get(k) != v]
    if libs:
        causes.append(f"different library versions: {', '.join(libs)}")
    da, db = run.get("device", {}), here.get("device", {})
    if (da.get("type"), da.get("name")) != (db.get("type"), db.get("name")):
        causes.append(f"a different device: {da.get('type')} ({da.get('name')}) -> {db.get('type')} ({db.get('name')})")
    pa, pb = run.get("prior", {}), here.get("prior", {})
    for key in ("config_sha256", "cache_key", "sha256", "commit"):
        if pa.get(key) != pb.get(key):
            causes.append(f"the prior differs ({key} {str(pa.get(key))[:12]} -> {str(pb.get(key))[:12]})")
            break
    sa, sb = run.get("determinism", {}), here.get("determinism", {})
    settings = [f"{k} {sa.get(k)} -> {v}" for k, v in sb.items() if sa.get(k) != v]
    if settings:
        causes.append(f"different determinism settings: {', '.join(settings)}")
    cuda = [m for m in (run, here) if m.get("device", {}).get("type") == "cuda"
            and not m.get("determinism", {}).get("deterministic_algorithms")]
    if cuda:
        causes.append("CUDA without torch.use_deterministic_algorithms(True): atomicAdd in the renderers' "
                      "backward passes and autotuned kernels may sum in a different order at every run")
    elif any(m.get("device", {}).get("type") == "cuda" for m in (run, here)):
        causes.append(CUDA_EXTENSIONS)
    if a.get("git_revision") == b.get("git_revision") and (a.get("git_dirty") or b.get("git_dirty")):
        causes.append(DIRTY)
    return causes


def verify_run(run_dir: str | Path, steps: Optional[int] = None, workdir: str | Path | None = None) -> dict:
    """Replay the first ``steps`` (default: all fingerprinted) steps of a run here and compare (see
    the module docstring). Returns ``status``, ``step`` (the step that diverged, or the first that
    differs), ``max_param_diff`` (at the last replayed step, None where it was not measured),
    ``max_loss_diff``, ``causes`` and ``text`` (one line). ``workdir`` keeps the replay's folder."""
    run_dir = Path(run_dir).expanduser().resolve()
    manifest = read_manifest(run_dir)
    prints = read_fingerprints(run_dir)
    recorded = prints["records"]
    if steps is None:
        steps = len(recorded)
    if not 1 <= steps <= len(recorded):
        raise UserError(f"--steps {steps}: the run fingerprinted {len(recorded)} step(s); give 1 to {len(recorded)}")
    cfg, _ = run_config(run_dir)
    current = yaml.safe_load((run_dir / CONFIG_NAME).read_text())
    changed = config_changes(manifest["config"], current)
    if workdir is not None:
        folder = Path(workdir).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        replayed, state, here = replay(cfg, steps, folder)
    else:
        with tempfile.TemporaryDirectory(prefix="threedgen-verify-") as tmp:
            replayed, state, here = replay(cfg, steps, Path(tmp))
    return compare(run_dir, manifest, prints, steps, replayed, state, here, changed)


def compare(run_dir: Path, manifest: dict, prints: dict, steps: int, replayed: list[dict], state: dict, here: dict,
            changed: list[str]) -> dict:
    """The verdict of a replay (see :func:`verify_run`)."""
    original = prints["records"][:steps]
    pairs = list(zip(original, replayed))
    first_diff = next((r["step"] for r, q in pairs if r["digest"] != q["digest"]), None)
    loss_step = next((r["step"] for r, q in pairs if not _close(r.get("loss"), q.get("loss"), LOSS_RTOL, LOSS_ATOL)),
                     None)
    norm_step = next((r["step"] for r, q in pairs if not _close(r.get("norm"), q.get("norm"), NORM_RTOL, 0.0)), None)
    losses = [abs(r["loss"] - q["loss"]) for r, q in pairs if r.get("loss") is not None and q.get("loss") is not None]
    max_loss_diff = max(losses) if losses else None
    short = len(replayed) < len(original)  # the replay took fewer steps (it failed or stopped early)
    last = original[-1]["step"]
    notes: list[str] = []  # about the run's own record, before what differs between the machines
    tampered = False
    max_param_diff: Optional[float] = 0.0 if first_diff is None and not short else None  # equal digests: equal bits
    state_file = prints.get("state")
    if state_file and not short and steps == len(prints["records"]):
        inside = (run_dir / state_file).resolve().is_relative_to(run_dir)
        saved = load_state(run_dir / state_file) if inside else None
        if saved is None or saved.get("step") != last:
            notes.append(f"{state_file} is missing or unreadable: the parameters were compared by digest and norm only")
        else:
            tampered = state_digest(saved["state_dict"]) != original[-1]["digest"]
            if tampered:
                notes.append(f"{state_file} does not match the run's fingerprint of step {last}: the saved "
                             "parameters were changed after the run")
            max_param_diff = max_abs_difference(saved["state_dict"], state)
    param_step = last if max_param_diff is not None and max_param_diff > PARAM_ATOL else None
    bad = [s for s in (loss_step, norm_step, param_step) if s is not None]
    if short:
        bad.append(replayed[-1]["step"] + 1 if replayed else 1)
    if first_diff is None and not bad and not tampered:
        status, step = "bit-exact", None
    elif bad:
        status, step = "diverged", min(bad)
    else:
        status, step = "within tolerance", first_diff if first_diff is not None else last
    found = likely_causes(manifest, here, changed)
    if status == "bit-exact":
        causes = notes + [c for c in found if c not in (DIRTY, CUDA_EXTENSIONS)]  # differ, yet changed nothing here
    else:
        causes = notes + (found or ["nothing the manifest records differs: a nondeterministic kernel, or a change "
                                    "it does not see (the environment, files the run read)"])
    result = {"status": status, "step": step, "steps": steps, "first_difference": first_diff,
              "max_param_diff": max_param_diff, "max_loss_diff": max_loss_diff, "causes": causes,
              "config_hash": manifest_short_hash(manifest), "device": here["device"]}
    result["text"] = _text(result, loss_step, norm_step, param_step, original, replayed, short)
    return result


def _num(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _text(r: dict, loss_step, norm_step, param_step, original, replayed, short: bool) -> str:
    where = f"{r['device']['type']} ({r['device']['name']})"
    causes = "; ".join(r["causes"])
    if r["status"] == "bit-exact":
        note = f" (note: {causes})" if causes else ""
        return (f"bit-exact: {r['steps']} step(s) replayed on {where}, every parameter identical to the run's "
                f"[config {r['config_hash']}]{note}")
    if r["status"] == "within tolerance":
        first = r["first_difference"]
        differ = f"the parameters differ from step {first} on" if first is not None else "the saved parameters differ"
        by = (f"by at most {_num(r['max_param_diff'])} at step {original[-1]['step']}" if r["max_param_diff"] is not None
              else f"(the parameters after step {original[-1]['step']} were not saved: losses and norms compared)")
        return f"within tolerance: {differ}, {by}, the loss by at most {_num(r['max_loss_diff'])}, on {where}; " \
               f"likely: {causes}"
    step = r["step"]
    if short and step == (replayed[-1]["step"] + 1 if replayed else 1):
        what = "the replay took no step here (skipped as non-finite, or it stopped)"
    elif step in (loss_step, norm_step):
        i = next(i for i, rec in enumerate(original) if rec["step"] == step)
        a, b = original[i], replayed[i]
        what = (f"the loss differs ({_num(a.get('loss'))} in the run, {_num(b.get('loss'))} here)" if step == loss_step
                else f"the parameters differ (norm {_num(a.get('norm'))} in the run, {_num(b.get('norm'))} here)")
    else:
        what = f"the parameters differ from the saved step-{step} state by up to {_num(r['max_param_diff'])}"
    first = r["first_difference"]
    bits = f" (the bits differ from step {first})" if first is not None and first < step else ""
    return f"diverged at step {step}: {what}{bits}; likely: {causes}"


def _finite(value):
    """``value`` with every non-finite float as a string ("inf"): JSON has no infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def cmd_verify(args) -> int:
    """``threedgen verify``: the one-line report (or ``--json``); exit 0 for bit-exact and within
    tolerance, 1 for diverged. A UserError (no manifest, another version) goes to the CLI."""
    print(f"threedgen: replaying the first {args.steps or 'fingerprinted'} step(s) of {args.run_dir}",
          file=sys.stderr, flush=True)
    result = verify_run(args.run_dir, args.steps)
    print(json.dumps(_finite(result), indent=1) if args.json else result["text"])
    return 1 if result["status"] == "diverged" else 0
