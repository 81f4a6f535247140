"""One small type for values annealed over a run (timestep bounds, clipping, weights).

A schedule is written in YAML as either
- a number: constant, e.g. ``0.98``;
- ``[v0, v1]``: linear from v0 at step 0 to v1 at the last step;
- ``[start_step, v0, v1, end_step]``: v0 until ``start_step``, linear to v1 at ``end_step``, then v1
  (threestudio's convention). When ``end_step <= 1`` the two steps are fractions of the run
  (``[0, 0.98, 0.5, 0.3]``: from 0.98 to 0.5 over the first 30% of the steps), so one preset
  suits a 600-step run on the shapes prior and a 10,000-step run on Stable Diffusion.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

from threedgen.errors import UserError

ScheduleSpec = Union[float, int, Sequence[float]]


def schedule_value(spec: ScheduleSpec | None, step: int, max_steps: int) -> float | None:
    if spec is None:
        return None
    if isinstance(spec, (int, float)):
        return float(spec)
    values = [float(v) for v in spec]
    if len(values) == 2:
        start, v0, v1, end = 0.0, values[0], values[1], float(max(max_steps, 1))
    elif len(values) == 4:
        start, v0, v1, end = values
        if end <= 1.0:
            start, end = start * max_steps, end * max_steps
    else:
        raise UserError(f"a schedule is a number, [v0, v1] or [start_step, v0, v1, end_step]; got {list(spec)}")
    if step <= start or end <= start:
        return v0 if step <= start else v1
    if step >= end:
        return v1
    return v0 + (v1 - v0) * (step - start) / (end - start)


def check_schedule(name: str, spec: ScheduleSpec | None, low: float, high: float) -> None:
    """Reject a schedule whose values leave [low, high] (or are not finite)."""
    if spec is None:
        return
    if isinstance(spec, (str, bool)):
        raise UserError(f"{name}: a schedule is a number, [v0, v1] or [start_step, v0, v1, end_step]; got {spec!r}")
    try:
        vals = [float(spec)] if isinstance(spec, (int, float)) else [float(v) for v in spec]
    except (TypeError, ValueError):
        raise UserError(f"{name}: a schedule is a number, [v0, v1] or [start_step, v0, v1, end_step]; got {spec!r}") from None
    if not isinstance(spec, (int, float)):
        if len(vals) == 4:
            start, end = vals[0], vals[3]
            if not (math.isfinite(start) and math.isfinite(end) and 0 <= start) or (end <= 1 and start > end):
                raise UserError(f"{name}: in [start, v0, v1, end] the steps need 0 <= start and, as fractions of "
                                f"the run (end <= 1), start <= end; got {list(spec)}")
            vals = vals[1:3]
        elif len(vals) != 2:
            raise UserError(f"{name}: a schedule is a number, [v0, v1] or [start_step, v0, v1, end_step]; got {list(spec)}")
    for v in vals:
        if not (low <= v <= high):
            raise UserError(f"{name} must lie in [{low}, {high}]; got {v}")
