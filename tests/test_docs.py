"""The docs state what the code does, checked: docs/architecture.md's contract tables list the
base classes' members (no more, no fewer), and docs/guidance.md's default tables give the config
classes' defaults and the preset files that change them."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from pathlib import Path

import pytest
import yaml

from threedgen.config import SECTIONS, flat, resolve_request
from threedgen.schema import RunConfig

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = ROOT / "docs" / "architecture.md"
GUIDANCE_DOC = ROOT / "docs" / "guidance.md"


# ---- markdown -------------------------------------------------------------------------------------

def cells(row: str) -> list[str]:
    """A table row's cells; a `|` inside backticks is text, not a border."""
    out, cell, code = [], "", False
    for ch in row.strip().strip("|"):
        if ch == "`":
            code = not code
        if ch == "|" and not code:
            out.append(cell.strip())
            cell = ""
        else:
            cell += ch
    return out + [cell.strip()]


def tables(text: str) -> list[list[list[str]]]:
    """Every table of a markdown text: its rows (header first, the separator row left out)."""
    found, rows = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if not re.fullmatch(r"\|[\s|:-]+\|?", line.strip()):
                rows.append(cells(line))
        elif rows:
            found.append(rows)
            rows = []
    return found


def section(text: str, heading: str) -> str:
    """The text under ``heading`` (a whole heading line), up to the next heading of any level."""
    lines = text.splitlines()
    assert heading in lines, f"no heading {heading!r}"
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("#")), len(lines))
    return "\n".join(lines[start:end])


def code_names(cell: str) -> list[str]:
    """The identifiers that the backticked spans of a cell start with: `render(cameras, h, w)` -> render."""
    return [m.group(0) for span in re.findall(r"`([^`]+)`", cell) if (m := re.match(r"[A-Za-z_]\w*", span))]


# ---- 1. the contract tables of docs/architecture.md ---------------------------------------------

def _contracts():
    from threedgen.guidance.base import Guidance
    from threedgen.guidance.priors.base import Prior
    from threedgen.representations.base import Representation

    return {"Prior": Prior, "Guidance": Guidance, "Representation": Representation}


def own_members(cls: type) -> set[str]:
    """The public members the class body itself defines: methods, properties, class attributes
    and annotated attributes, without a leading underscore (what ``torch.nn.Module`` brings is
    not the contract)."""
    names = set(vars(cls)) | set(vars(cls).get("__annotations__", {}))
    return {n for n in names if not n.startswith("_")}


def contract_table(name: str) -> tuple[str, set[str]]:
    """The file a contract's heading names and the members its table's first column names."""
    text = ARCHITECTURE.read_text()
    heading = next((line for line in text.splitlines() if line.startswith(f"### {name} (`")), None)
    assert heading is not None, f"docs/architecture.md has no '### {name} (`file`)' heading"
    found = tables(section(text, heading))
    assert found, f"docs/architecture.md, {heading}: no table of members"
    members = {n for row in found[0][1:] for n in code_names(row[0])}
    return re.search(r"`([^`]+)`", heading).group(1), members


@pytest.mark.parametrize("name", ["Prior", "Guidance", "Representation"])
def test_contract_tables_list_the_base_class_members(name):
    cls = _contracts()[name]
    path, documented = contract_table(name)
    assert Path(inspect.getsourcefile(cls)).resolve() == (ROOT / path).resolve(), \
        f"docs/architecture.md says {name} is in {path}; it is in {inspect.getsourcefile(cls)}"
    code = own_members(cls)
    missing, extra = sorted(code - documented), sorted(documented - code)
    assert not missing and not extra, (f"docs/architecture.md's {name} table: missing {missing} "
                                       f"(defined on {cls.__qualname__}), extra {extra} (not defined there)")


def test_the_member_parser_reads_a_row():
    row = cells("| `runtime_state()` / `load_runtime_state(state)` | no | a `|` in `a|b` stays |")
    assert code_names(row[0]) == ["runtime_state", "load_runtime_state"] and len(row) == 3


# ---- 2. the default tables of docs/guidance.md ---------------------------------------------------

CONFIGS = {entry.config.__name__: entry for entry in SECTIONS["guidance"].entries()}
NO_OVERLAY = {"—", "-", ""}


def literal(text: str):
    """The value a cell states first: a `code` span, a "quoted" text, or the leading word
    (`empty` is the empty text); the rest of the cell is explanation."""
    text = text.strip()
    if text.startswith("`"):
        raw = text[1:text.index("`", 1)]
    elif text.startswith('"'):
        return yaml.safe_load(text[:text.index('"', 1) + 1])
    else:
        raw = re.match(r"[^\s(;:]+", text).group(0).rstrip(",")
        if raw == "empty":
            return ""
    value = yaml.safe_load(raw)
    if isinstance(value, str) and re.fullmatch(r"-?\d+(\.\d*)?[eE][-+]?\d+", value):
        value = float(value)  # YAML 1.1 reads 1e-4 as text
    return value


def same(a, b) -> bool:
    """Equal values of the same kind (tuples as lists; true is not 1)."""
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b) \
            and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a is b
    return a == b


def defaults(cls: type) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        out[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return out


def default_tables() -> list[tuple[list[str], list[list[str]]]]:
    """docs/guidance.md's default tables: header `| key | `XConfig` | [`YConfig` |] [overlays |]`."""
    found = []
    for table in tables(GUIDANCE_DOC.read_text()):
        header = table[0]
        if header[0] == "key" and any(re.fullmatch(r"`\w+Config`", c) for c in header[1:]):
            found.append((header, table[1:]))
    return found


@functools.lru_cache(maxsize=None)
def merged(guidance: str, representation: str, prior: str):
    m, _ = resolve_request(guidance, representation, prior, flags={"prompt": "a red cube"}, whole_run=False)
    return flat(m.cfg), m.origin


def combinations(guidance: str):
    return [(guidance, r, p) for r in SECTIONS["representation"] for p in SECTIONS["prior"]]


def dotted(key: str, config: type) -> str:
    """A row's key as a full dotted key: the method's field, else a run setting."""
    if key in {f.name for f in dataclasses.fields(config)}:
        return f"guidance.{key}"
    assert key in {f.name for f in dataclasses.fields(RunConfig)}, \
        f"docs/guidance.md's {config.__name__} table names {key!r}, which is neither its field nor a run setting"
    return key


def overlays(cell: str) -> dict[str, object]:
    """`a.yaml`, `b.yaml`: value; `c.yaml` (note): value -> {file: value}."""
    out: dict[str, object] = {}
    if cell.strip() in NO_OVERLAY:
        return out
    for part in re.split(r";\s*(?=`)", cell):
        files = re.findall(r"`([^`]+\.yaml)`", part)
        assert files, f"docs/guidance.md: overlay {part!r} names no preset file"
        value = literal(part[part.index(":", part.rindex(files[-1]) + len(files[-1])) + 1:])
        out.update({f: value for f in files})
    return out


def check_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """What a default table of docs/guidance.md says that the code does not."""
    wrong: list[str] = []
    classes = [CONFIGS[c.strip("`")] for c in header[1:] if re.fullmatch(r"`\w+Config`", c)]
    has_overlays = header[-1] == "overlays"
    for row in rows:
        keys = code_names(row[0])
        previous = None
        for column, entry in enumerate(classes, start=1):
            config, cell = entry.config, row[column]
            if not keys:  # "all other keys | as `VSDConfig`": every key not in the table
                parent = CONFIGS[re.search(r"as `(\w+Config)`", cell).group(1)].config
                listed = {k for r in rows for k in code_names(r[0])} | {"name"}
                own, theirs = defaults(config), defaults(parent)
                wrong += [f"{config.__name__}.{k} = {own[k]!r}, not as in {parent.__name__} ({theirs.get(k)!r})"
                          for k in own if k not in listed and not same(own[k], theirs.get(k, object()))]
                continue
            if cell == "same":
                values = previous
            else:
                parts = cell.split(" / ") if len(keys) > 1 else [cell]
                if len(parts) != len(keys):
                    wrong.append(f"{config.__name__} row {row[0]}: {len(keys)} keys, {len(parts)} values")
                    continue
                values = [literal(p) for p in parts]
            previous = values
            for key, value in zip(keys, values):
                full = dotted(key, config)
                default = defaults(config)[key] if full.startswith("guidance.") else defaults(RunConfig)[key]
                if not same(value, default):
                    wrong.append(f"{config.__name__}.{key}: the doc says {value!r}, the code {default!r}")
                wrong += check_overlays(entry.name, full, overlays(row[-1]) if has_overlays else {})
    return wrong


def check_overlays(method: str, key: str, stated: dict[str, object]) -> list[str]:
    """The preset files that set ``key`` in runs of ``method`` are the ones the doc names, with
    the values it gives."""
    wrong = []
    actual: dict[str, set] = {}
    for combo in combinations(method):
        values, origin = merged(*combo)
        source = origin.get(key, "")
        if source.startswith("configs/"):
            actual.setdefault(Path(source).name, set()).add(repr(values[key]))
            if Path(source).name in stated and not same(values[key], stated[Path(source).name]):
                wrong.append(f"{method} {key}: the doc says {Path(source).name} sets {stated[Path(source).name]!r}; "
                             f"a run with {combo[1:]} gets {values[key]!r} from it")
    if set(actual) != set(stated):
        wrong.append(f"{method} {key}: the doc names the presets {sorted(stated)}; "
                     f"the runs take it from {sorted(actual) or 'none'}")
    return wrong


def test_guidance_doc_has_a_default_table_for_every_method():
    covered = {c.strip("`") for header, _ in default_tables() for c in header[1:] if c.endswith("Config`")}
    assert covered == set(CONFIGS), f"docs/guidance.md: no default table for {sorted(set(CONFIGS) - covered)}"


@pytest.mark.parametrize("table", default_tables(), ids=lambda t: "-".join(c.strip("`") for c in t[0][1:]))
def test_guidance_doc_default_tables_agree_with_the_code(table):
    header, rows = table
    wrong = check_table(header, rows)
    assert not wrong, "docs/guidance.md disagrees with the code:\n" + "\n".join(wrong)


def test_the_default_table_reader_catches_a_wrong_row():
    header = ["key", "`SDSConfig`", "overlays"]
    assert check_table(header, [["`guidance_scale`", "100.0", "`shapes-world-sds.yaml`: 7.5; "
                                 "`deepfloyd-if-sds.yaml`: 21.0 (threestudio's 20)"]]) == []
    assert check_table(header, [["`weighting`", "`uniform`", "—"]]) != []
    assert check_table(header, [["`guidance_scale`", "100.0", "`shapes-world-sds.yaml`: 7.5"]]) != []  # IF's left out
    assert check_table(header, [["`guidance_scale`", "100.0", "`shapes-world-sds.yaml`: 8.0; "
                                 "`deepfloyd-if-sds.yaml`: 21.0"]]) != []
    assert literal("`[16, 32, 32]`") == [16, 32, 32] and literal("1e-4 (LoRA)") == 1e-4 and literal("empty") == ""
    assert not same(literal("true"), 1) and same(literal("0.02"), 0.02)
