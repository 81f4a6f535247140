"""The repository stands alone: nothing it tracks points at notes outside it (a user who clones
the project has only the project)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Spelled in parts, so that this file does not name what it looks for.
OUTSIDE = tuple("/".join(parts) for parts in (("..", "shared"), ("shared", "design"), ("shared", "reviews")))


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (the test reads git's list of tracked files)")
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_no_tracked_file_points_outside_the_repository():
    offenders = []
    for path in _tracked_files():
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # images, lock files in other encodings
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if any(marker in line for marker in OUTSIDE):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not offenders, "files point outside the repository:\n" + "\n".join(offenders)


def test_the_documents_the_code_points_at_exist():
    for name in ("architecture.md", "guidance.md", "shapes-prior.md", "reliability.md", "gpu.md"):
        assert (ROOT / "docs" / name).is_file(), name
