"""The code version recorded in every model's lineage: the git commit the code was built from.

In a container image it is baked in at build time (``docker build --build-arg GIT_SHA=$(git rev-parse HEAD)``
sets ``CRAFT_GIT_SHA``, docker/*/Dockerfile); in a checkout it is read from git, with ``-dirty`` when the
working tree has uncommitted changes. The package version (pyproject) says nothing about which code ran.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def code_version() -> str:
    """``CRAFT_GIT_SHA``, else ``git:<sha>[-dirty]`` of this checkout, else ``unknown:<reason>``."""
    baked = os.environ.get("CRAFT_GIT_SHA", "").strip()
    if baked:
        return baked
    if not (REPO_ROOT / ".git").exists():
        return "unknown:no CRAFT_GIT_SHA in the image and not a git checkout"

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, check=True,
                              stdin=subprocess.DEVNULL).stdout.strip()  # fmt: skip

    try:
        sha = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError) as e:
        return f"unknown:git failed ({e})"
    return f"{sha}{'-dirty' if dirty else ''}"
