"""Registries of components: guidance methods, representations, priors.

A component registers itself once, on its config dataclass::

    @REPRESENTATIONS.register("nerf", "threedgen.representations.nerf:NeRF",
                              summary="NeRF: hash-grid or dense-grid field, volume rendering")
    @dataclass
    class NeRFConfig(RepresentationConfig):
        name: str = "nerf"
        ...

The entry holds the config class, the implementation (a class, or ``"module:Class"`` imported on
first use, so that listing components and checking a config never imports torch), and the words
that ``threedgen guidance list``, the CLI help, the web UI's menus and the docs show.

This module and the config modules are torch-free; see docs/architecture.md ("Registries").
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import inspect
import textwrap
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Union

from threedgen.errors import unknown_name


@dataclass(frozen=True)
class Entry:
    """One registered component."""

    name: str
    config: type
    target: Union[str, type]
    summary: str = ""
    cost: str = ""

    @property
    def cls(self) -> type:
        """The implementation class (imported now if it was registered by path)."""
        if not isinstance(self.target, str):
            return self.target
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


class Registry:
    """Name -> :class:`Entry`, in registration order."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, target: Union[str, type], summary: str = "",
                 cost: str = "") -> Callable[[type], type]:
        """Class decorator for a config dataclass whose ``name`` field defaults to ``name``."""

        def decorate(config: type) -> type:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            if not dataclasses.is_dataclass(config):
                raise TypeError(f"{self.kind} {name!r}: register a config dataclass, not {config!r}")
            default = config.__dataclass_fields__.get("name")
            if default is None or default.default != name:
                raise ValueError(f"{self.kind} {name!r}: its config's `name` field must default to {name!r}")
            self._entries[name] = Entry(name, config, target, summary, cost)
            return config

        return decorate

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def get(self, name: Any) -> Optional[Entry]:
        return self._entries.get(name) if isinstance(name, str) else None

    def __getitem__(self, name: str) -> Entry:
        """The entry, or the usual one-line error naming the nearest registered names."""
        entry = self.get(name)
        if entry is None:
            raise unknown_name(self.kind, name, self._entries)
        return entry


@functools.lru_cache(maxsize=None)
def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """Each dataclass field's docstring (the string literal under the field), inherited ones too."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs
