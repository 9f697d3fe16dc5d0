"""DVC with the SeaweedFS S3 server as remote: push, wipe cache and data, pull, identical files."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from craft.io import sha256_file
from craft.storage import dvc

REPO_ROOT = Path(__file__).resolve().parents[1]


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def git_repo(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {"GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path / "home")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "config", "user.email", "t@example.com"], check=True)
    subprocess.run(["git", "-C", str(repo), "config", "user.name", "t"], check=True)
    return repo


def test_push_wipe_pull_round_trip(s3_env, git_repo):
    repo = git_repo
    data = repo / "data"
    for i in range(5):
        sub = data / ("imgs" if i % 2 else "") / f"x{i}.bin"
        sub.parent.mkdir(parents=True, exist_ok=True)
        sub.write_bytes(os.urandom(200 + i) + bytes([i]) * 50)
    (data / "dataset.yaml").write_text("name: tiny\n")
    want = tree_hashes(data)

    dvc.init_repo(repo)
    bucket = s3_env.make_bucket("dvc")
    dvc.configure_remote(repo, "store", f"s3://{bucket}/dvc", s3_env.endpoint)
    # keys and endpoint stay out of the committed config
    committed = (repo / ".dvc" / "config").read_text()
    assert "endpointurl" not in committed and s3_env.secret_key not in committed
    assert s3_env.secret_key not in (repo / ".dvc" / "config.local").read_text()

    dvc_file = dvc.add(repo, "data")
    version = dvc.dataset_version(dvc_file)
    assert version.endswith(".dir")
    assert dvc.dataset_version(data) == version  # read through data.dvc
    assert dvc.dir_md5(data) == version  # our computation agrees with DVC's
    dvc.push(repo)
    assert any(o.object_name.startswith("dvc/") for o in s3_env.client().list_objects(bucket, recursive=True))

    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(data)
    dvc.pull(repo)
    assert tree_hashes(data) == want

    # a change of content is a new version; pushing it with a wrong key fails with dvc's own message
    (data / "x0.bin").write_bytes(b"changed")
    assert dvc.dir_md5(data) != version
    assert dvc.dataset_version(dvc.add(repo, "data")) == dvc.dir_md5(data)
    env = {"AWS_SECRET_ACCESS_KEY": "wrong-secret", "AWS_MAX_ATTEMPTS": "1"}  # botocore: fail fast
    with pytest.raises(dvc.DvcError, match=r"`dvc push` in .* failed with exit code"):
        dvc.push(repo, env=env)
    with pytest.raises(dvc.DvcError, match="no such .dvc file"):
        dvc.dataset_version(repo / "missing.dvc")


def test_repo_dvc_files_parse():
    """The committed dvc.yaml / data.dvc / .dvc/config are valid and carry no endpoint or keys."""
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    for name in ("validate_histo", "validate_cxr"):
        st = stages[name]
        assert {"cmd", "deps", "params", "outs"} <= set(st), name
    cfg = (REPO_ROOT / ".dvc" / "config").read_text()
    assert "s3://craft/dvc" in cfg
    for line in cfg.splitlines():
        assert not line.strip().startswith(("access_key_id", "secret_access_key", "endpointurl")), line
    assert dvc.dataset_version(REPO_ROOT / "data.dvc").endswith(".dir")
