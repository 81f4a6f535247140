"""One source of truth per fact: every default lives in a dataclass with a docstring per field;
`threedgen config keys` prints them, `threedgen config show` tells where each value of a run came
from, and the README's key table agrees with both."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from threedgen.cli import config_keys, main
from threedgen.config import SECTIONS, flatten, merge, preset_files, prior_preset_names
from threedgen.registry import field_docs
from threedgen.schema import RunConfig

ROOT = Path(__file__).resolve().parent.parent


def every_config_class():
    seen = [RunConfig]
    for f in dataclasses.fields(RunConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            seen.append(type(default))
    for registry in SECTIONS.values():
        seen.extend(e.config for e in registry.entries())
    return seen


@pytest.mark.parametrize("cls", every_config_class(), ids=lambda c: c.__name__)
def test_every_field_says_what_it_is(cls):
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert missing == [], f"{cls.__name__}: fields without a docstring: {missing}"


def test_keys_lists_every_key_with_default_and_doc(capsys):
    assert main(["config", "keys", "--guidance", "tsm", "--representation", "gaussians", "--prior", "shapes"]) == 0
    out = capsys.readouterr().out
    assert "\nguidance.gamma = 0.3\n    Weight of the predicted clean image" in out
    assert "\nrepresentation.max_gaussians = 5000\n" in out and "\nprior.camera_kappa = 1000.0\n" in out
    assert "\nexport.faces = 10000\n" in out and "representation.num_samples" not in out  # a NeRF key
    keys = {k for k, _, _ in config_keys("tsm", "gaussians", "shapes")}
    assert len(keys) == sum(1 for line in out.splitlines() if " = " in line and not line.startswith(" "))


def test_keys_answers_an_unknown_component_in_one_line(capsys):
    assert main(["config", "keys", "--guidance", "sdss"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("threedgen: error: unknown guidance 'sdss'; valid: sds") and err.count("\n") == 1


def test_show_names_each_values_layer(capsys):
    assert main(["config", "show", "--prompt", "a red cube", "--representation", "gaussians", "--steps", "40",
                 "guidance.guidance_scale=9", "--prior", "shapes"]) == 0
    lines = {line.split(" = ")[0].strip(): line for line in capsys.readouterr().out.splitlines() if " = " in line}
    assert lines["steps"].endswith("= 40  # --steps")
    assert lines["guidance.guidance_scale"].endswith("= 9.0  # key=value")
    assert lines["representation.num_points"].endswith("= 1000  # configs/guidance/sds-gaussians.yaml")
    assert lines["representation.bound"].endswith("= 0.75  # configs/priors/shapes-world.yaml")
    assert lines["camera.elevation_range"].endswith("= [-45.0, 65.0]  # configs/priors/shapes.yaml")
    assert lines["render.coarse_until"].endswith("= 0.5  # configs/priors/shapes-world-sds.yaml")
    assert lines["representation.lr_means"].endswith("= 0.001  # default")
    assert lines["prompt"].endswith('= "a red cube"  # --prompt')


def test_show_checks_what_run_checks(capsys):
    assert main(["config", "show", "--prompt", "a red dragon"]) == 2
    assert "outside the shapes prior's vocabulary" in capsys.readouterr().err
    assert main(["config", "show", "representation.num_sample=3"]) == 2
    assert "nearest valid keys: representation.num_samples" in capsys.readouterr().err


def _combinations():
    return [(g, r, p) for g in SECTIONS["guidance"] for r in SECTIONS["representation"] for p in SECTIONS["prior"]]


def _preset_paths() -> list[str]:
    return sorted(path.relative_to(ROOT / "configs").as_posix() for path in (ROOT / "configs").rglob("*.yaml"))


def _reader_of(relative: str) -> tuple[str, str, str]:
    """A combination whose run reads the preset file ``relative``."""
    readers = [c for c in _combinations() if relative in preset_files(*c)]
    assert readers, f"configs/{relative} is read by no combination of guidance, representation and prior"
    return readers[0]


def test_presets_state_only_what_differs():
    """A preset value equal to the default below it would hide a change of that default."""
    for relative in _preset_paths():
        path = ROOT / "configs" / relative
        g, r, p = _reader_of(relative)
        defaults = merge(g, r, p, whole_run=False, base={}).cfg
        data = yaml.safe_load(path.read_text()) or {}

        def walk(node, obj, prefix):
            for key, value in node.items():
                if isinstance(value, dict):
                    walk(value, getattr(obj, key), f"{prefix}{key}.")
                else:
                    default = getattr(obj, key)
                    default = list(default) if isinstance(default, tuple) else default
                    assert value != default, f"configs/{relative}: {prefix}{key} = {value!r} is the default"

        walk(data, defaults, "")


def test_preset_files_follow_the_layers():
    assert preset_files("sds", "gaussians", "shapes") == ["guidance/sds-gaussians.yaml", "priors/shapes-world.yaml",
                                                          "priors/shapes.yaml", "priors/shapes-world-sds.yaml"]
    assert preset_files("vsd", "nerf", "stable-diffusion") == ["representations/nerf.yaml",
                                                               "priors/text-to-image.yaml"]
    assert preset_files("sds", "nerf", "shapes") == ["representations/nerf.yaml", "priors/shapes-world.yaml",
                                                     "priors/shapes.yaml", "priors/shapes-world-sds.yaml"]
    assert preset_files("sds", "nerf", "deepfloyd-if") == ["representations/nerf.yaml", "priors/text-to-image.yaml",
                                                           "priors/deepfloyd-if-sds.yaml"]
    assert preset_files("bsd", "surfels", "stable-diffusion") == ["priors/text-to-image.yaml",
                                                                  "priors/text-to-image-bsd.yaml"]
    # A guidance method's file for a representation reaches the ones built on it, and only those.
    assert preset_files("sds", "surfels", "shapes")[0] == "guidance/sds-gaussians.yaml"
    assert preset_files("sds", "nerf-sdf", "shapes") == ["priors/shapes-world.yaml", "priors/shapes.yaml",
                                                         "priors/shapes-world-sds.yaml"]


def test_prior_presets_follow_the_config_class_hierarchy():
    """A prior reads its family's presets, then each registered ancestor's, then its own."""
    assert prior_preset_names("shapes") == ["shapes-world", "shapes"]
    assert prior_preset_names("shapes-unet") == ["shapes-world", "shapes-unet"]
    assert prior_preset_names("shapes-unet-camera") == ["shapes-world", "shapes-unet", "shapes-unet-camera"]
    assert prior_preset_names("stable-diffusion") == ["text-to-image", "stable-diffusion"]
    assert prior_preset_names("deepfloyd-if") == ["text-to-image", "deepfloyd-if"]
    for prior in SECTIONS["prior"]:  # the learned teacher with a camera takes the learned teacher's settings
        names = prior_preset_names(prior)
        assert names[-1] == prior and len(set(names)) == len(names), names


def test_preset_names_cannot_be_read_two_ways():
    """A family is no prior's name, and no file name means two things (``<a>-<b>.yaml`` is read as
    one preset name and guidance, or as another preset name, never both)."""
    names = {n for p in SECTIONS["prior"] for n in prior_preset_names(p)}
    families = {vars(k).get("family") for e in SECTIONS["prior"].entries() for k in e.config.__mro__} - {None}
    assert families and not families & set(SECTIONS["prior"]), families
    meanings: dict[str, set] = {}
    for name in names:
        meanings.setdefault(f"{name}.yaml", set()).add((name, None))
        for g in SECTIONS["guidance"]:
            meanings.setdefault(f"{name}-{g}.yaml", set()).add((name, g))
    assert {f: m for f, m in meanings.items() if len(m) > 1} == {}


def test_every_preset_file_is_read_and_states_each_setting_once():
    """No preset file is orphaned, and none restates a value that a file read before it in the
    same run already sets (a child prior repeating its parent's or its family's setting)."""
    restated = set()
    for combo in _combinations():
        seen: dict[str, tuple[str, object]] = {}
        for relative in preset_files(*combo):
            data = yaml.safe_load((ROOT / "configs" / relative).read_text()) or {}
            for key, value in flatten(data).items():
                if key in seen and seen[key][1] == value:
                    restated.add(f"configs/{relative}: {key} = {value!r}, as configs/{seen[key][0]} already sets")
                seen[key] = (relative, value)
    assert not restated, "\n".join(sorted(restated))
    for relative in _preset_paths():
        _reader_of(relative)
        assert yaml.safe_load((ROOT / "configs" / relative).read_text()), f"configs/{relative} states nothing"


# No copies left: a guidance method's file for a representation reaches the representations built
# on it (sds-gaussians.yaml the surfels).
KNOWN_COPIES: set = set()


def test_no_two_preset_files_state_the_same_settings():
    """Priors that take the same settings share them through their class hierarchy or a family
    (``PriorConfig.family``), not through copies of a file."""
    by_content: dict[str, list[str]] = {}
    for relative in _preset_paths():
        data = yaml.safe_load((ROOT / "configs" / relative).read_text()) or {}
        by_content.setdefault(repr(sorted(flatten(data).items())), []).append(relative)
    copies = {frozenset(group) for group in by_content.values() if len(group) > 1}
    assert copies == KNOWN_COPIES, f"preset files with the same settings (comments aside): {copies - KNOWN_COPIES}"


def _readme_rows():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| key | default | meaning |"):]
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        yield cells[0], cells[1]


def _all_keys() -> dict[str, object]:
    keys: dict[str, object] = {}
    for g in SECTIONS["guidance"]:
        for r in SECTIONS["representation"]:
            for p in SECTIONS["prior"]:
                for key, default, _ in config_keys(g, r, p):
                    keys.setdefault(key, default)
    return keys


def test_readme_key_table_agrees_with_config_keys():
    keys = _all_keys()
    sds_defaults = {k: d for k, d, _ in config_keys("sds", "nerf", "shapes")}
    checked = 0
    for key_cell, default_cell in _readme_rows():
        names = re.findall(r"`([^`]+)`", key_cell)
        section = names[0].rpartition(".")[0]
        full = [names[0]] + [f"{section}.{n}" if section else n for n in names[1:]]
        for name in full:
            assert name in keys, f"README's key table names {name!r}, which `threedgen config keys` does not list"
        literal = default_cell.split(" (")[0].strip()
        values = [v.strip().strip("`") for v in literal.split(",")]
        if len(values) == len(full) and all(re.fullmatch(r"-?[\d.]+|true|false|null|[a-z_]+", v) for v in values):
            for name, value in zip(full, values):
                default = sds_defaults.get(name, keys[name])
                assert yaml.safe_load(value) == default, f"README says {name} defaults to {value}; the code: {default!r}"
                checked += 1
    assert checked >= 25


def test_the_docs_name_every_registered_component():
    guidance_doc = (ROOT / "docs" / "guidance.md").read_text()
    readme = (ROOT / "README.md").read_text()
    for entry in SECTIONS["guidance"].entries():
        assert f"| `{entry.name}`" in guidance_doc or f", `{entry.name}` |" in guidance_doc, entry.name
        assert re.search(rf"(?<![\w-]){entry.name}(?![\w-])", readme), entry.name
    for registry in (SECTIONS["representation"], SECTIONS["prior"]):
        for name in registry:
            assert re.search(rf"(?<![\w-]){name}(?![\w-])", readme), f"README.md does not mention {name}"
