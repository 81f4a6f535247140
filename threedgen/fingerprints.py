"""Per-step fingerprints of a run's first optimisation steps, for ``threedgen verify``.

After each of the first ``verify_steps`` optimizer steps of a fresh run, :class:`FingerprintCallback`
records a digest of the system's state (every tensor of ``System.state_dict()``: the
representation's parameters and buffers and the guidance's trained networks, in key order; the
frozen prior is not part of it), the step's loss and the state's L2 norm, in
``<run>/fingerprints.json``; at the last of those steps it also saves the state itself
(``checkpoints/verify-step-NNNNNN.pt``), so that a replay can say how far its parameters are from
the run's and not only that they differ.

The runner adds it to a fresh run only (a resumed one keeps the file of its start), and
``threedgen verify`` to its replay.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Mapping, Optional

import pytorch_lightning as pl
import torch

from threedgen.errors import UserError
from threedgen.rundir import RunFolder, atomic_path, atomic_write_text

FINGERPRINTS_NAME = RunFolder.FINGERPRINTS
FORMAT = 1


def state_path(run_dir: Path, step: int) -> Path:
    """Where the state after ``step`` is saved (in the run's ``checkpoints/``, beside last.ckpt;
    its ``.pt`` suffix keeps it out of the checkpoint rotation, which looks at ``*.ckpt``)."""
    return RunFolder(run_dir).checkpoints / f"verify-step-{step:06d}.pt"


def state_digest(state: Mapping[str, object]) -> str:
    """SHA-256 of a state dict: each entry's key, dtype, shape and raw bytes, in the dict's order.
    Equal digests mean bit-identical states."""
    h = hashlib.sha256()
    for key, value in state.items():
        h.update(key.encode())
        if torch.is_tensor(value):
            t = value.detach().cpu().contiguous()
            h.update(f"|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        else:  # Lightning's extra state or a plain number
            h.update(f"|{value!r}|".encode())
    return h.hexdigest()


def state_norm(state: Mapping[str, object]) -> float:
    """The L2 norm of every floating tensor of a state together (float64)."""
    total = 0.0
    for value in state.values():
        if torch.is_tensor(value) and value.is_floating_point():
            total += float(value.detach().double().square().sum())
    return math.sqrt(total)


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v for k, v in module.state_dict().items()}


def read_fingerprints(run_dir: Path) -> dict:
    """``fingerprints.json`` of a run folder, or a one-line UserError."""
    path = Path(run_dir) / FINGERPRINTS_NAME
    if not path.is_file():
        raise UserError(f"{path.parent} has no {FINGERPRINTS_NAME} (a run with verify_steps=0, or one stopped before "
                        "its first step): there is nothing to compare a replay with")
    try:
        data = json.loads(path.read_text())
        records = data["records"]
        ok = data.get("format") == FORMAT and isinstance(records, list) and all(
            isinstance(r, dict) and isinstance(r.get("step"), int) and isinstance(r.get("digest"), str)
            for r in records)
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise UserError(f"{path} is damaged or of another format; it cannot be verified")
    if not records:
        raise UserError(f"{path} holds no step (the run stopped before its first step)")
    return data


def load_state(path: Path) -> Optional[dict]:
    """The state saved at the last fingerprinted step (``{"step", "digest", "state_dict"}``), or
    None when the file is missing or unreadable."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # damaged or foreign bytes fail in many ways; weights_only ran no code
        return None
    if not isinstance(saved, dict) or not isinstance(saved.get("state_dict"), dict):
        return None
    return saved


class FingerprintCallback(pl.Callback):
    """Fingerprints the first ``steps`` optimizer steps of a fresh run (see the module docstring)."""

    def __init__(self, run_dir: Path, steps: int):
        self.run_dir, self.steps = Path(run_dir), int(steps)
        self.limit = 0
        self.active = False
        self.records: list[dict] = []
        self.state_file: Optional[str] = None

    def on_train_start(self, trainer, module):
        max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else self.steps
        self.limit = min(self.steps, max_steps)
        self.active = self.limit > 0
        self.records, self.state_file = [], None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not self.active or step == (self.records[-1]["step"] if self.records else 0):
            return  # off, or a step skipped as non-finite (no optimizer step was taken)
        state = module.state_dict()
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        loss = float(loss) if loss is not None else None
        self.records.append({"step": step, "digest": state_digest(state), "norm": state_norm(state),
                             "loss": loss if loss is not None and math.isfinite(loss) else None})
        if step >= self.limit:
            self.active = False
            path = state_path(self.run_dir, step)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                torch.save({"step": step, "digest": self.records[-1]["digest"],
                            "state_dict": {k: v.detach().cpu() if torch.is_tensor(v) else v
                                           for k, v in state.items()}}, str(tmp))
            self.state_file = path.relative_to(self.run_dir).as_posix()
        self._write()

    def _write(self) -> None:
        data = {"format": FORMAT, "steps": self.limit, "state": self.state_file, "records": self.records}
        atomic_write_text(self.run_dir / FINGERPRINTS_NAME, json.dumps(data, indent=1))
