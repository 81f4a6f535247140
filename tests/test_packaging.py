"""Packaging: import names, the console script, the torch range, and a built wheel's contents."""

import importlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["threedgen", "threedgen.guidance", "threedgen.guidance.priors",
                                  "threedgen.representations", "threedgen.webui", "threedgen.jobs"])
def test_import_names(name):
    module = importlib.import_module(name)
    assert module.__name__ == name


def test_root_folders_are_not_top_level_packages(tmp_path):
    # `guidance` and `webui` are names of unrelated PyPI packages: the install must not provide them.
    code = ("import importlib.util, threedgen.guidance, threedgen.webui, threedgen.representations\n"
            "print(threedgen.guidance.__file__)\n"
            "print([n for n in ('guidance', 'representations', 'webui') if importlib.util.find_spec(n)])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    where, found = proc.stdout.splitlines()
    assert Path(where).name == "__init__.py" and Path(where).parent.name == "guidance"
    assert found == "[]"


def test_torch_range_admits_the_cpu_wheel():
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(Requirement(d) for d in deps if d.startswith("torch"))
    assert torch_req.specifier.contains("2.13.0")
    assert not torch_req.specifier.contains("2.14.0"), "a range admitting newer torch pulls a CUDA build"


def test_console_script_declared_and_runs():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["threedgen"] == "threedgen.cli:main"
    proc = subprocess.run([sys.executable, "-m", "threedgen", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "run" in proc.stdout and "eval" in proc.stdout


def test_wheel_contains_the_subpackages_and_configs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("threedgen-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ("threedgen/cli.py", "threedgen/guidance/sds.py", "threedgen/guidance/priors/shapes/prior.py",
                 "threedgen/representations/nerf.py", "threedgen/representations/gaussians.py",
                 "threedgen/webui/__init__.py", "threedgen/webui/app.py", "threedgen/guidance/config.py",
                 "threedgen/configs/guidance/sds-gaussians.yaml", "threedgen/configs/priors/shapes.yaml"):
        assert path in names, path
    # the learned shapes teacher's weights ship inside the package, every file of the folder
    shipped = ROOT / "guidance" / "priors" / "learned" / "weights"
    for f in shipped.rglob("*"):
        if f.is_file():
            assert f"threedgen/guidance/priors/learned/weights/{f.relative_to(shipped).as_posix()}" in names, f
    assert not any(n.startswith(("guidance/", "webui/", "representations/")) for n in names)
    # The installed package (not the source tree) finds its presets.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import threedgen; from threedgen.config import build_config\n"
            "print(threedgen.__file__); print(build_config(flags={'prompt': 'a red cube'}).representation.bound)\n"
            "g = build_config('sds', 'gaussians', flags={'prompt': 'a red cube'})\n"
            "print(g.representation.name, g.representation.num_points)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    where, bound, name, points = proc.stdout.split()
    assert where.startswith(str(site)) and bound == "0.75"
    assert (name, points) == ("gaussians", "1000")  # configs/guidance/sds-gaussians.yaml inside the wheel
