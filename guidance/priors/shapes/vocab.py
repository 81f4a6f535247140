"""The shapes prior's vocabulary: colour and shape words, synonyms, and prompt parsing.

A prompt names one object: "<colour> <shape>" with optional articles ("a red cube", "the blue
donut"). A negative prompt may name several, comma-separated, each with a colour, a shape, or both
("red", "cube", "a blue torus, green"). The house, the mug and the head have a front, marked in
magenta (a door, a badge, a nose): the colour word colours the body, and magenta is reserved for
the markers, so no prompt may ask for it.
"""

from __future__ import annotations

import re

from threedgen.errors import UserError

SHAPES = ("cube", "sphere", "cylinder", "cone", "torus", "capsule", "pyramid", "house", "mug", "head")
FRONT_MARKERS = {"house": "door", "mug": "badge", "head": "nose"}  # the objects with a front (+Z) and their marker
FRONT_SHAPES = tuple(FRONT_MARKERS)
MARKER_COLOUR = (0.90, 0.05, 0.90)  # magenta: far from every prompt colour (the word is reserved)
SHAPE_SYNONYMS = {"box": "cube", "block": "cube", "ball": "sphere", "orb": "sphere", "donut": "torus",
                  "doughnut": "torus", "ring": "torus", "pill": "capsule", "tube": "cylinder",
                  "hut": "house", "cottage": "house", "cup": "mug"}
MARKER_WORDS = ("magenta", "fuchsia")  # the markers' colour: reserved

# Albedo in [0,1] (linear values used directly as pixel colours).
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.10, 0.10),
    "orange": (0.95, 0.50, 0.08),
    "yellow": (0.95, 0.85, 0.10),
    "green": (0.15, 0.70, 0.20),
    "cyan": (0.10, 0.80, 0.85),
    "blue": (0.12, 0.25, 0.90),
    "purple": (0.55, 0.20, 0.80),
    "pink": (0.98, 0.50, 0.70),
    "white": (0.95, 0.95, 0.95),
    "gray": (0.50, 0.50, 0.50),
    "black": (0.06, 0.06, 0.06),
    "brown": (0.50, 0.30, 0.12),
}
COLOUR_SYNONYMS = {"grey": "gray", "violet": "purple", "turquoise": "cyan", "crimson": "red",
                   "scarlet": "red", "golden": "yellow", "rose": "pink", "silver": "gray"}
FILLER = {"a", "an", "the", "one", "single"}

COLOUR_NAMES = tuple(COLOURS)


def vocabulary_text() -> str:
    return (f'prompts look like "a <colour> <shape>"; colours: {", ".join(COLOURS)}; '
            f'shapes: {", ".join(SHAPES)} (synonyms: '
            + ", ".join(f"{k}={v}" for k, v in {**SHAPE_SYNONYMS, **COLOUR_SYNONYMS}.items()) + ")")


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[^a-z]+", text.lower()) if w and w not in FILLER]


def _out_of_vocabulary(prompt: str, why: str) -> UserError:
    shown = prompt if len(prompt) <= 80 else prompt[:77] + "..."
    return UserError(f"prompt {shown!r} is outside the shapes prior's vocabulary ({why}); "
                     f"{vocabulary_text()}; other prompts need a diffusers prior (--prior MODEL, with a GPU)")


def parse_phrase(phrase: str, *, require_both: bool) -> tuple[str | None, str | None]:
    """(colour, shape) named by one phrase; either may be None unless ``require_both``."""
    if re.search(r"[^A-Za-z\s,.!'-]", phrase):
        bad = re.search(r"[^A-Za-z\s,.!'-]", phrase).group(0)
        raise _out_of_vocabulary(phrase, f"unexpected character {bad!r}")
    colour = shape = None
    for word in _words(phrase):
        if word in COLOURS or word in COLOUR_SYNONYMS:
            name = COLOUR_SYNONYMS.get(word, word)
            if colour and colour != name:
                raise _out_of_vocabulary(phrase, "more than one colour")
            colour = name
        elif word in MARKER_WORDS:
            raise UserError(f"{word!r} is reserved for the front markers (the house's door, the mug's badge, the "
                            f"head's nose), so Janus can be measured; choose another colour: {', '.join(COLOURS)}")
        elif word in SHAPES or word in SHAPE_SYNONYMS:
            name = SHAPE_SYNONYMS.get(word, word)
            if shape and shape != name:
                raise _out_of_vocabulary(phrase, "more than one shape")
            shape = name
        else:
            raise _out_of_vocabulary(phrase, f"unknown word {word!r}")
    if require_both and (colour is None or shape is None):
        raise _out_of_vocabulary(phrase, "it needs one colour and one shape")
    if colour is None and shape is None:
        raise _out_of_vocabulary(phrase, "no colour or shape")
    return colour, shape


def parse_prompt(prompt: str) -> tuple[str, str]:
    """The (colour, shape) of a prompt, or a UserError that lists the vocabulary."""
    colour, shape = parse_phrase(prompt, require_both=True)
    return colour, shape  # type: ignore[return-value]


def parse_negative(prompt: str) -> list[tuple[str | None, str | None]]:
    """The (colour, shape) patterns of a comma-separated negative prompt ([] when empty)."""
    return [parse_phrase(p, require_both=False) for p in prompt.split(",") if p.strip()]
