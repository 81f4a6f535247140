"""A run request: what a user asks for, before it becomes a config.

The CLI (`threedgen run`, `threedgen config show`), the web form, a line of a batch file and the
job table all speak ``RunRequest``; ``RunRequest.resolve`` is the one place a request turns into a
validated ``RunConfig`` (through ``threedgen.config.resolve_request``: presets, ``key=value``
settings, flags, every check of the run). Torch-free, like the config modules.

In the job table a request is stored as ``RunRequest.to_dict()``; rows written by an older
threedgen (``server_overrides`` for ``overrides``) still read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from threedgen.config import Merged, parse_overrides, resolve_request
from threedgen.errors import UserError
from threedgen.schema import RunConfig

# The components a request names when it names none: the CLI's and the web form's defaults.
DEFAULT_GUIDANCE, DEFAULT_REPRESENTATION, DEFAULT_PRIOR = "sds", "nerf", "auto"


@dataclass(frozen=True)
class RunRequest:
    """One run as asked for. ``steps``/``seed``/``negative_prompt`` None: the preset's (or the
    config's default); ``resolution``: ``render.resolution``; ``overrides``: ``key=value`` settings,
    the server's first, then the request's own (later ones win)."""

    prompt: Optional[str] = None
    negative_prompt: Optional[str] = None
    guidance: str = DEFAULT_GUIDANCE
    representation: str = DEFAULT_REPRESENTATION
    prior: str = DEFAULT_PRIOR
    steps: Optional[int] = None
    seed: Optional[int] = None
    resolution: Optional[int] = None
    overrides: tuple[str, ...] = field(default_factory=tuple)
    device: Optional[str] = None

    def __post_init__(self):
        object.__setattr__(self, "overrides", tuple(self.overrides or ()))

    def replace(self, **changes) -> "RunRequest":
        return dataclasses.replace(self, **changes)

    def flags(self) -> dict[str, Any]:
        """The request's values that are flags of `threedgen run` (layer 4 of the config)."""
        flags: dict[str, Any] = {}
        for key in ("prompt", "negative_prompt", "steps", "seed", "device"):
            value = getattr(self, key)
            if value is not None:
                flags[key] = int(value) if key in ("steps", "seed") else value
        return flags

    def settings(self) -> list[str]:
        """The ``key=value`` items of the request, the resolution's included."""
        items = list(self.overrides)
        if self.resolution is not None:
            items.append(f"render.resolution={int(self.resolution)}")
        return items

    def resolve(self, device: Optional[str] = None, whole_run: bool = True) -> tuple[Merged, Optional[str]]:
        """The merged, validated config (each value with its layer) and the note on what
        ``--prior auto`` chose. ``device`` replaces the request's own (a worker's GPU)."""
        request = self if device is None else self.replace(device=device)
        return resolve_request(self.guidance, self.representation, self.prior, parse_overrides(self.settings()),
                               request.flags(), whole_run=whole_run)

    def to_config(self, device: Optional[str] = None) -> RunConfig:
        return self.resolve(device)[0].cfg

    def checked(self, device: str = "cpu") -> tuple["RunRequest", RunConfig]:
        """Every check of `threedgen run`, once: the request with its prompts as the run will use
        them (cleaned), and the config."""
        cfg = self.to_config(device)
        return self.replace(prompt=cfg.prompt, negative_prompt=cfg.negative_prompt), cfg

    # ---- the job table's form ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["overrides"] = list(self.overrides)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "RunRequest":
        """A stored request; keys a request does not have (a batch's record) are ignored, and the
        rows of older versions read (``server_overrides``)."""
        if not isinstance(data, dict):
            raise UserError("a stored job request must be a mapping")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "overrides" not in values and "server_overrides" in data:
            values["overrides"] = data["server_overrides"]
        return cls(**values)


__all__ = ["RunRequest", "DEFAULT_GUIDANCE", "DEFAULT_REPRESENTATION", "DEFAULT_PRIOR"]
