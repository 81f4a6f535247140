"""The GPU machine's package set (benchmarks/gpu_image.txt), for the wheel folder and the
image-emulating dry-run.

    python benchmarks/gpu_image.py carried              # the packages make_wheels.sh carries, one a line
    python benchmarks/gpu_image.py check DIR            # DIR's wheels: CPython 3.12 x86-64, one version each,
                                                        # every Requires-Dist met by the image or DIR
    python benchmarks/gpu_image.py sitecustomize DIR    # write DIR/sitecustomize.py: with DIR on PYTHONPATH,
                                                        # this Python imports only what the image and the
                                                        # carried wheels provide
    python benchmarks/gpu_image.py unpack-kernels KERNELS SITE
                                                        # prebuilt kernels (prebuild_kernels.sh) into the
                                                        # gsplat and nerfacc installed in SITE, if they fit

``check`` compares versions, not only names: a requirement such as ``huggingface-hub>=1.32`` is
evaluated against the version the image has (where gpu_image.txt knows it) or the carried wheel's.

``sitecustomize`` blocks, at import, every top-level module of this Python whose distributions are
neither on the image, nor carried, nor threedgen, nor needed by one of those as installed here (the
standard library is never blocked); an
import of one raises ``ModuleNotFoundError`` naming the emulation. This is how the suite's dry-run
of gpu_check.sh (tests/test_gpu_check.py) sees the GPU machine's package set."""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import sys
import zipfile
from email.parser import Parser
from importlib.metadata import PackageNotFoundError, distribution, distributions, packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

LIST = Path(__file__).with_name("gpu_image.txt")
# The image's Python and platform, for requirement markers.
MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def _entries(path: Path):
    """(section, name as spelled, version or None) for each package line of gpu_image.txt."""
    current = None
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            yield current, None, None
            continue
        if current is None:
            raise SystemExit(f"{path}: {raw!r} comes before any [section]")
        name, _, ver = line.partition("==")
        yield current, name, ver or None


def read_list(path: Path = LIST) -> dict[str, dict[str, str | None]]:
    """``{"image": {name: version or None}, "carry": {...}, "not-needed": {...}}`` (canonical names)."""
    sections: dict[str, dict[str, str | None]] = {}
    for section, name, ver in _entries(path):
        entries = sections.setdefault(section, {})
        if name is not None:
            entries[canonicalize_name(name)] = ver
    missing = {"image", "carry", "not-needed"} - set(sections)
    if missing:
        raise SystemExit(f"{path}: no [{'], ['.join(sorted(missing))}] section")
    return sections


def carried(path: Path = LIST) -> list[str]:
    """The carried packages, as gpu_image.txt spells them (make_wheels.sh downloads these)."""
    return [name for section, name, _ in _entries(path) if section == "carry" and name is not None]


def check(folder: Path, path: Path = LIST) -> list[str]:
    """Problems with the wheel folder (empty when it would install and import on the image)."""
    lists = read_list(path)
    image, not_needed = lists["image"], lists["not-needed"]
    wheels = sorted(folder.glob("*.whl"))
    versions: dict[str, list[str]] = {}
    problems = []
    for w in wheels:
        name, ver, _, tags = parse_wheel_filename(w.name)
        versions.setdefault(name, []).append(str(ver))
        good = any((t.interpreter in ("py3", "cp312") and t.platform == "any")
                   or (t.interpreter == "cp312" and re.fullmatch(r"manylinux(1|2010|2014|_2_\d+)_x86_64", t.platform))
                   for t in tags)
        if not good:
            problems.append(f"{w.name}: not a wheel for CPython 3.12 on x86-64 Linux")
    problems += [f"{n}: {len(v)} versions ({', '.join(v)}); pip --no-index takes one"
                 for n, v in versions.items() if len(v) > 1]
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            meta = next(p for p in z.namelist() if p.endswith(".dist-info/METADATA"))
            msg = Parser().parsestr(z.read(meta).decode())
        for line in msg.get_all("Requires-Dist") or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(MARKERS):
                continue  # an extra, or another Python
            name = canonicalize_name(req.name)
            if name in not_needed:
                continue
            if name in versions:
                have, where = versions[name][0], f"{folder.name}/"
            elif name in image:
                have, where = image[name], "the GPU machine"
            else:
                problems.append(f"{w.name} needs {req}: not on the GPU machine and not in {folder.name}/")
                continue
            if have is not None and req.specifier and not req.specifier.contains(Version(have), prereleases=True):
                problems.append(f"{w.name} needs {req}: {where} has {req.name} {have}")
    return problems


BLOCKER = '''"""Written by benchmarks/gpu_image.py: this Python imports only what the GPU machine's image
and the carried wheels provide."""
import sys

BLOCKED = frozenset({blocked!r})


class _GpuImage:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on the emulated GPU machine: "
                                      "benchmarks/gpu_image.txt)", name=name)
        return None


sys.meta_path.insert(0, _GpuImage())
'''


def closure(names: set[str], skip: set[str]) -> set[str]:
    """``names`` and, transitively, what their versions installed in this Python require (markers
    for this Python, no extras), but never the ``skip`` names. The image's own package at its own
    version brings its own needs, so a package here at another version may need things under
    other names (huggingface-hub 2.x needs httpx2, 1.33 on the image does not)."""
    seen, todo = set(), sorted(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            dep = canonicalize_name(req.name)
            if dep not in seen and dep not in skip:
                todo.append(dep)
    return seen


def blocked_modules(path: Path = LIST) -> list[str]:
    """Top-level modules of this Python that only distributions off the image provide."""
    lists = read_list(path)
    allowed = closure(set(lists["image"]) | set(lists["carry"]), set(lists["not-needed"])) | {"threedgen"}
    stdlib = set(sys.stdlib_module_names)
    blocked = []
    for module, dists in packages_distributions().items():
        if module in stdlib or module.startswith("_") and module[1:] in stdlib:
            continue
        if not any(canonicalize_name(d) in allowed for d in dists):
            blocked.append(module)
    return sorted(blocked)


def unpack_kernels(kernels: Path, site: Path) -> str:
    """Unpack prebuilt kernels (benchmarks/prebuild_kernels.sh's ``manifest.json`` and ``.so.xz``
    files) into the gsplat and nerfacc installed in ``site``, when they were made for this torch,
    this Python, the installed libraries' versions and every architecture in
    ``TORCH_CUDA_ARCH_LIST``; returns what was done (or why not: then the kernels are built)."""
    if not (kernels / "manifest.json").is_file():
        return "no prebuilt kernels carried (the kernels step builds them)"
    import torch  # slow: only when kernels are carried

    m = json.loads((kernels / "manifest.json").read_text())
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    here = set(filter(None, os.environ.get("TORCH_CUDA_ARCH_LIST", "").split(";")))
    missing = sorted(here - set(m["arch_list"].split(";")))
    found = {lib: version_in(site, lib) for lib in m["files"]}
    wrong = ([f"torch {torch.__version__}"] if torch.__version__ != m["torch"] else []) + \
            ([f"Python {tag}"] if tag != m["python"] else []) + \
            ([f"GPU architecture {';'.join(missing)}"] if missing else []) + \
            [f"{lib} {v}" for lib, v in found.items() if v != m["files"][lib]["library_version"]]
    if wrong:
        return (f"prebuilt kernels not used: made for torch {m['torch']}, {m['python']}, architectures "
                f"{m['arch_list']}; here {', '.join(wrong)} (the kernels step builds them)")
    for lib, f in m["files"].items():
        data = lzma.decompress((kernels / f["file"]).read_bytes())
        if hashlib.sha256(data).hexdigest() != f["sha256"]:
            raise SystemExit(f"{kernels / f['file']}: not the file manifest.json describes (its checksum differs)")
        (site / lib / f["module"]).write_bytes(data)
    return (f"prebuilt kernels unpacked: {', '.join(f'{lib} {v}' for lib, v in found.items())} for torch "
            f"{m['torch']}, architectures {m['arch_list']} (built {m['built']})")


def version_in(site: Path, name: str) -> str | None:
    """The version of ``name`` installed in ``site`` (None if it is not there)."""
    return next((d.version for d in distributions(path=[str(site)]) if canonicalize_name(d.name) == name), None)


def main(argv: list[str]) -> int:
    if argv[:1] == ["carried"] and len(argv) == 1:
        print("\n".join(carried()))
        return 0
    if argv[:1] == ["check"] and len(argv) == 2:
        folder = Path(argv[1])
        problems = check(folder)
        if problems:
            print("\n".join(problems), file=sys.stderr)
            return 1
        print(f"check: {len(list(folder.glob('*.whl')))} wheels, one version each, every need present or carried "
              "at a version it accepts")
        return 0
    if argv[:1] == ["sitecustomize"] and len(argv) == 2:
        folder = Path(argv[1])
        folder.mkdir(parents=True, exist_ok=True)
        blocked = blocked_modules()
        (folder / "sitecustomize.py").write_text(BLOCKER.format(blocked=sorted(blocked)))
        print(f"{len(blocked)} modules blocked: {' '.join(blocked)}")
        return 0
    if argv[:1] == ["unpack-kernels"] and len(argv) == 3:
        print(unpack_kernels(Path(argv[1]), Path(argv[2])))
        return 0
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
