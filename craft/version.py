"""The code version recorded in every model's lineage: the git commit the code was built from.

In a container image it is baked in at build time (``make images`` passes ``--build-arg VCS_REF=$(git rev-parse
HEAD)``, which sets ``CRAFT_GIT_SHA``, docker/*/Dockerfile; the image is tagged with the same sha,
components/images.py); in a checkout it is read from git, with ``-dirty`` when the working tree has uncommitted
changes. The package version (pyproject) says nothing about which code ran, so it is never used here.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
_SHA = re.compile(r"[0-9a-f]{7,64}(-dirty)?")


@functools.cache
def code_version() -> str:
    """``CRAFT_GIT_SHA``, else ``<sha>[-dirty]`` of this checkout, else ``unknown:<reason>``."""
    baked = os.environ.get("CRAFT_GIT_SHA", "").strip()
    if baked:
        if not _SHA.fullmatch(baked):
            return f"unknown:CRAFT_GIT_SHA={baked!r} is not a git commit sha"
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
