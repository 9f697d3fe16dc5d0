"""Thin helpers around the `dvc` command line: data versions live in DVC, bytes on the S3 object store.

Keys never enter `.dvc/config`: DVC's S3 remote reads ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` from
the environment (or from ``dvc remote modify --local``, which writes the git-ignored
`.dvc/config.local`). The endpoint is machine-specific too, so it goes to the local config as well.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml


class DvcError(RuntimeError):
    """A `dvc` command failed; the message carries the command and dvc's stderr."""


def dvc_bin() -> str:
    """The `dvc` executable of this venv (beside the Python running us), else the one on PATH."""
    cand = Path(sys.executable).parent / "dvc"
    if cand.is_file():
        return str(cand)
    found = shutil.which("dvc")
    if not found:
        raise DvcError("the `dvc` command is not installed (pip install 'dvc[s3]', pinned in pyproject.toml)")
    return found


def run_dvc(repo: str | os.PathLike, *args: str, env: dict[str, str] | None = None) -> str:
    """Run ``dvc ARGS`` in ``repo``; returns stdout; raises :class:`DvcError` with stderr on failure."""
    full_env = dict(os.environ)
    full_env.setdefault("DVC_NO_ANALYTICS", "1")
    if env:
        full_env.update(env)
    cmd = [dvc_bin(), *args]
    proc = subprocess.run(cmd, cwd=repo, env=full_env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip())[-4000:]
        raise DvcError(f"`dvc {' '.join(args)}` in {repo} failed with exit code {proc.returncode}:\n{detail}")
    return proc.stdout


def init_repo(path: str | os.PathLike, *, no_scm: bool = False) -> Path:
    """``dvc init`` in ``path`` (a git repository unless ``no_scm``); a repo already initialised is kept.

    The site cache (``core.site_cache_dir``) is pointed inside the repo's ``.dvc/tmp`` through the local
    config, so that DVC leaves nothing in shared system or home folders.
    """
    path = Path(path)
    if not (path / ".dvc").is_dir():
        run_dvc(path, "init", "--quiet", *(["--no-scm"] if no_scm else []))
    site = path / ".dvc" / "tmp" / "site"
    run_dvc(path, "config", "--local", "core.site_cache_dir", str(site.resolve()))
    return path


def configure_remote(
    repo: str | os.PathLike, name: str, url: str, endpoint_url: str | None = None, *, default: bool = True
) -> None:
    """Add (or replace) remote ``name`` at ``url``; the endpoint goes to the git-ignored local config."""
    run_dvc(repo, "remote", "add", "--force", *(["--default"] if default else []), name, url)
    if endpoint_url:
        if "://" not in endpoint_url:
            endpoint_url = f"http://{endpoint_url}"
        run_dvc(repo, "remote", "modify", "--local", name, "endpointurl", endpoint_url)


def add(repo: str | os.PathLike, target: str) -> Path:
    """``dvc add TARGET``; returns the path of the ``.dvc`` file written."""
    run_dvc(repo, "add", "--quiet", target)
    dvc_file = Path(repo) / f"{target.rstrip('/')}.dvc"
    if not dvc_file.is_file():
        raise DvcError(f"`dvc add {target}` succeeded but {dvc_file} was not written")
    return dvc_file


def push(repo: str | os.PathLike, remote: str | None = None, env: dict[str, str] | None = None) -> str:
    return run_dvc(repo, "push", *(["--remote", remote] if remote else []), env=env)


def pull(repo: str | os.PathLike, remote: str | None = None, env: dict[str, str] | None = None) -> str:
    return run_dvc(repo, "pull", *(["--remote", remote] if remote else []), env=env)


def _md5_file(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def dir_md5(path: str | os.PathLike) -> str:
    """DVC 3's hash of a directory: md5 of the sorted JSON list of ``{"md5", "relpath"}``, plus ``.dir``.

    Mirrors ``dvc_data.hashfile.tree.Tree.digest`` (DVC 3 hashes raw bytes, no dos2unix); `.dvcignore`
    rules are not applied here, so compare against a `.dvc` file only for folders without ignored files.
    """
    root = Path(path)
    entries = [
        {"md5": _md5_file(p), "relpath": p.relative_to(root).as_posix()}
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink()
    ]
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def dataset_version(path: str | os.PathLike) -> str:
    """The version of a DVC-tracked dataset: the md5 its ``.dvc`` file records.

    ``path`` may be the ``.dvc`` file, or the data folder/file (then ``<path>.dvc`` is read when it exists,
    else the hash is computed the way DVC would). The model registry and "retrain on new data" compare it.
    """
    p = Path(path)
    dvc_file = p if p.suffix == ".dvc" else p.with_name(p.name + ".dvc")
    if dvc_file.is_file():
        try:
            doc = yaml.safe_load(dvc_file.read_text())
        except yaml.YAMLError as e:
            raise DvcError(f"{dvc_file}: not valid YAML ({e})") from e
        outs = (doc or {}).get("outs") if isinstance(doc, dict) else None
        if not outs or not isinstance(outs, list) or not isinstance(outs[0], dict) or not outs[0].get("md5"):
            raise DvcError(f"{dvc_file}: no outs[0].md5 recorded (is it a `dvc add` file?)")
        if len(outs) != 1:
            raise DvcError(f"{dvc_file}: {len(outs)} outs; expected exactly one tracked path")
        return str(outs[0]["md5"])
    if p.suffix == ".dvc":
        raise DvcError(f"{p}: no such .dvc file")
    if p.is_dir():
        return dir_md5(p)
    if p.is_file():
        return _md5_file(p)
    raise DvcError(f"{p}: neither a .dvc file nor an existing file or folder")


def get(
    repo: str, path: str, dest: str | os.PathLike, rev: str | None = None, env: dict[str, str] | None = None
) -> Path:
    """``dvc get REPO PATH --rev REV -o DEST``: a DVC-tracked path of a git repository at a revision, fetched
    from that repository's DVC remote (keys from the environment, as for push and pull)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    args = ["get", str(repo), path, "-o", str(dest.resolve())] + (["--rev", rev] if rev else [])
    run_dvc(dest.parent, *args, env=env)
    return dest
