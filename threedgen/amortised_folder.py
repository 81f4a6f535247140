"""An amortised model's folder and the checks on its input (torch-free: every error is quick).

``threedgen train-amortised PROMPTS.txt --out DIR`` writes DIR: ``config.yaml`` (the run config
every prompt trains with; its ``prompt`` is the file's first), ``amortised.json`` (this file's
``FORMAT``, the threedgen version, the prior, the generator's settings, the prompt vector's size,
the prompts and the words they use), ``status.json``, ``logs/metrics.csv``, ``previews/`` (grids
over the prompts) and ``checkpoints/`` (which ``threedgen generate`` reads).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from threedgen import __version__
from threedgen.errors import UserError
from threedgen.representations.config import PromptGridsConfig
from threedgen.rundir import atomic_write_text
from threedgen.schema import is_ascii_integer

FORMAT = 1
AMORTISED_STEPS = 2000  # train-amortised's default steps (a per-prompt run's are the prior's, e.g. 250)
META_NAME = "amortised.json"
MAX_PROMPTS = 10_000


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of a text file: one per line; blank lines and lines starting with ``#`` are
    skipped, repeats kept once. One-line UserError for a missing, binary or empty file."""
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read the prompt file {str(path)!r} ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"the prompt file {str(path)!r} is not UTF-8 text") from None
    prompts = list(dict.fromkeys(line.strip() for line in text.splitlines()
                                 if line.strip() and not line.strip().startswith("#")))
    if not prompts:
        raise UserError(f"the prompt file {str(path)!r} holds no prompt (one per line; # starts a comment)")
    if len(prompts) > MAX_PROMPTS:
        raise UserError(f"the prompt file {str(path)!r} holds {len(prompts)} prompts; the limit is {MAX_PROMPTS}")
    return prompts


def generator_settings(overrides: dict) -> tuple[PromptGridsConfig, dict]:
    """The generator's settings from the ``amortised.*`` keys of ``key=value`` overrides, and the
    other overrides (the run config's)."""
    cfg = PromptGridsConfig()
    rest = dict(overrides)
    section = rest.pop("amortised", None) or {}
    if not isinstance(section, dict):
        raise UserError("amortised takes keys: " + ", ".join(f.name for f in dataclasses.fields(cfg)))
    names = [f.name for f in dataclasses.fields(cfg)]
    for key, value in section.items():
        if key not in names:
            raise UserError(f"unknown key amortised.{key}; valid: " + ", ".join(f"amortised.{n}" for n in names))
        value = getattr(value, "parsed", value)  # config.parse_overrides keeps the typed text beside it
        default = getattr(cfg, key)
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(default):
            raise UserError(f"amortised.{key} must be {'an integer' if isinstance(default, int) else 'a number'}; "
                            f"got {value!r}")
        setattr(cfg, key, value)
    cfg.check()
    return cfg, rest


def launched_rank() -> int:
    """This process's rank when a launcher (torchrun, Lightning's DDP) started it; 0 alone."""
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK"):
        value = os.environ.get(key, "0")
        if is_ascii_integer(value) and int(value) > 0:
            return int(value)
    return 0


def write_meta(folder: Path, meta: dict) -> None:
    atomic_write_text(Path(folder) / META_NAME, json.dumps(meta, indent=1))


def read_meta(folder: str | Path) -> tuple[Path, dict]:
    """(folder, amortised.json) of a trained model, or a one-line UserError: not a model folder,
    or one written by another threedgen."""
    folder = Path(folder).expanduser().resolve()
    path = folder / META_NAME
    if not path.is_file():
        raise UserError(f"{str(folder)!r} is not an amortised model folder (no {META_NAME}); train one with "
                        "threedgen train-amortised PROMPTS.txt")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{str(path)!r} cannot be read ({exc})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{str(path)!r} is not an amortised model's record")
    if meta.get("format") != FORMAT or meta.get("threedgen") != __version__:
        raise UserError(f"model {str(folder)!r} was written by threedgen {meta.get('threedgen', '?')} (model format "
                        f"{meta.get('format', '?')}); this is threedgen {__version__} (format {FORMAT}): train it again "
                        "with this version's threedgen train-amortised")
    for key in ("prior", "prompts", "words", "embed_dim", "generator"):
        if key not in meta:
            raise UserError(f"{str(path)!r} lacks {key!r}; train the model again")
    return folder, meta


def known_words(prior_cfg, prompts: list[str]) -> dict:
    """``words`` (every word the prompts use, as the prior reads them) and ``word_groups`` (by
    position: the shapes prior's colours, then shapes, with their names), in order of first use."""
    groups: list[list[str]] = []
    for prompt in prompts:
        for i, word in enumerate(prior_cfg.prompt_words(prompt)):
            while len(groups) <= i:
                groups.append([])
            if word not in groups[i]:
                groups[i].append(word)
    kinds = prior_cfg.word_kinds if prior_cfg.word_kinds and len(prior_cfg.word_kinds) == len(groups) else None
    words = list(dict.fromkeys(w for g in groups for w in g))
    return {"words": words, "word_groups": [{"kind": kinds[i] if kinds else "words", "words": g}
                                            for i, g in enumerate(groups)] if kinds else [{"kind": "words", "words": words}]}


def check_prompt_known(prompt: str, meta: dict, words: tuple[str, ...]) -> None:
    """UserError unless every word of ``prompt`` (as the prior reads it: ``words``) was in some
    training prompt; new combinations of known words are what the model is for."""
    unknown = [w for w in words if w not in set(meta["words"])]
    if unknown:
        shown = prompt if len(prompt) <= 80 else prompt[:77] + "..."
        groups = meta.get("word_groups") or [{"kind": "words", "words": meta["words"]}]
        knows = "; ".join(f"{g['kind']}: {', '.join(g['words'])}" for g in groups)
        raise UserError(f"prompt {shown!r} uses {', '.join(repr(w) for w in unknown)}, which this model never saw "
                        f"in training; it knows {knows} (any combination of them)")
