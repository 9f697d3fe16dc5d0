"""craft.storage.objectstore against a real SeaweedFS S3 server on 127.0.0.1 (fixture in tests/s3server.py)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from minio.error import S3Error

from craft.io import sha256_file
from craft.storage.objectstore import (
    MANIFEST_NAME,
    CredentialsError,
    InjectedFault,
    IntegrityError,
    NotCommittedError,
    ObjectStore,
    StorageConfig,
    parse_s3_uri,
)

FAST = StorageConfig(retries=2, backoff_s=0.01)


def make_tree(root: Path, seed: int = 0, n: int = 6) -> Path:
    """A small folder with nested dirs and binary content."""
    rng = __import__("random").Random(seed)
    for i in range(n):
        sub = root / ("a" if i % 2 else "b/c") / f"f{i}.bin"
        sub.parent.mkdir(parents=True, exist_ok=True)
        sub.write_bytes(bytes(rng.randrange(256) for _ in range(100 + 37 * i)) + b"\x00\xff" * i)
    (root / "top.json").write_text('{"x": 1}\n')
    return root


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


class CallCounter:
    """Wraps one client method and counts calls (a spy; the real call still happens)."""

    def __init__(self, store: ObjectStore, name: str):
        self.n = 0
        real = getattr(store.client, name)

        def wrapped(*a, **k):
            self.n += 1
            return real(*a, **k)

        setattr(store.client, name, wrapped)


def test_parse_s3_uri():
    assert parse_s3_uri("s3://b/a/b/") == ("b", "a/b")
    assert parse_s3_uri("s3://b") == ("b", "")
    for bad in ("b/a", "http://b/a", "s3:///a", "s3://b/a/../c"):
        with pytest.raises(ValueError, match="s3"):
            parse_s3_uri(bad)


def test_round_trip(s3_env, tmp_path):
    bucket = s3_env.make_bucket()
    src = make_tree(tmp_path / "src")
    store = ObjectStore.from_env(FAST)
    uri = f"s3://{bucket}/runs/r1/model"
    manifest = store.upload_dir(src, uri)
    assert store.is_committed(uri)
    assert manifest["n_files"] == 7 and {f["path"] for f in manifest["files"]} == set(tree_hashes(src))
    assert store.read_manifest(uri)["txn"] == manifest["txn"]
    # nothing left in staging; exactly the files plus the manifest
    listed = store.list(uri)
    assert not any("/.staging/" in u for u in listed)
    assert len(listed) == 8 and f"{uri}/{MANIFEST_NAME}" in listed
    out = store.download_dir(uri, tmp_path / "out")
    assert tree_hashes(out) == tree_hashes(src)


def test_fault_mid_upload_then_resume(s3_env, tmp_path):
    bucket = s3_env.make_bucket()
    src = make_tree(tmp_path / "src")
    # 11 MiB: the SDK sends it as a multipart upload; staged first (sorted), so the resume must find its sha256
    (src / "a" / "big.bin").write_bytes(os.urandom(11 * 1024 * 1024))
    store = ObjectStore.from_env(FAST)
    uri = f"s3://{bucket}/ds"
    puts = CallCounter(store, "fput_object")
    with pytest.raises(InjectedFault):
        store.upload_dir(src, uri, _fault_after=3)
    assert puts.n == 3
    assert not store.is_committed(uri)
    with pytest.raises(NotCommittedError, match="not committed"):
        store.download_dir(uri, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # the rerun resumes: the 3 staged files are not sent again
    store.upload_dir(src, uri)
    assert puts.n == 3 + (8 - 3)
    assert store.is_committed(uri)
    assert tree_hashes(store.download_dir(uri, tmp_path / "out")) == tree_hashes(src)


def test_fault_keeps_old_version_and_reupload_replaces(s3_env, tmp_path):
    bucket = s3_env.make_bucket()
    v1 = make_tree(tmp_path / "v1", seed=1)
    (v1 / "only_in_v1.txt").write_text("old")
    store = ObjectStore.from_env(FAST)
    uri = f"s3://{bucket}/ds"
    store.upload_dir(v1, uri)
    v2 = make_tree(tmp_path / "v2", seed=2)
    # a crash while staging v2 leaves v1 committed and intact
    with pytest.raises(InjectedFault):
        store.upload_dir(v2, uri, _fault_after=2)
    assert tree_hashes(store.download_dir(uri, tmp_path / "got1")) == tree_hashes(v1)
    # the finished v2 replaces v1 entirely: the extra file is gone, staging of both attempts cleaned
    m2 = store.upload_dir(v2, uri)
    got2 = store.download_dir(uri, tmp_path / "got2")
    assert tree_hashes(got2) == tree_hashes(v2)
    assert not store.exists(f"{uri}/only_in_v1.txt")
    assert len(store.list(uri)) == m2["n_files"] + 1


def test_large_objects_use_multipart_copy(s3_env, tmp_path, monkeypatch):
    """Objects over CopyObject's 5 GiB limit go through compose_object; lower the limit to exercise it."""
    from craft.storage import objectstore

    monkeypatch.setattr(objectstore, "COPY_OBJECT_LIMIT", 120)
    bucket = s3_env.make_bucket()
    src = make_tree(tmp_path / "src", n=3)
    store = ObjectStore.from_env(FAST)
    composes = CallCounter(store, "compose_object")
    store.upload_dir(src, f"s3://{bucket}/big")
    assert composes.n == sum(p.stat().st_size > 120 for p in src.rglob("*") if p.is_file()) > 0
    assert tree_hashes(store.download_dir(f"s3://{bucket}/big", tmp_path / "out")) == tree_hashes(src)


def test_wrong_credentials_refused(s3_env, tmp_path, monkeypatch):
    bucket = s3_env.make_bucket()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = ObjectStore.from_env(FAST)
    with pytest.raises(CredentialsError, match="refused") as ei:
        store.upload_dir(make_tree(tmp_path / "src"), f"s3://{bucket}/x")
    assert "not-the-secret" not in str(ei.value) and s3_env.secret_key not in str(ei.value)
    assert "not-the-secret" not in repr(store)


def test_missing_credentials(monkeypatch):
    for a in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD",
              "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY", "accesskey", "secretkey"):  # fmt: skip
        monkeypatch.delenv(a, raising=False)
    with pytest.raises(CredentialsError, match="AWS_ACCESS_KEY_ID"):
        ObjectStore.from_env(StorageConfig(endpoint="127.0.0.1:1"))
    monkeypatch.setenv("accesskey", "k")  # Kubeflow's secret naming, half set
    with pytest.raises(CredentialsError, match="both"):
        ObjectStore.from_env(StorageConfig(endpoint="127.0.0.1:1"))


def test_corrupted_object_detected(s3_env, tmp_path):
    bucket = s3_env.make_bucket()
    src = make_tree(tmp_path / "src")
    store = ObjectStore.from_env(FAST)
    uri = f"s3://{bucket}/ds"
    store.upload_dir(src, uri)
    # someone overwrites one committed object behind the manifest's back (same size, other bytes)
    good = (src / "a" / "f1.bin").read_bytes()
    bad = bytes([good[0] ^ 1]) + good[1:]
    s3_env.client().put_object(bucket, "ds/a/f1.bin", io.BytesIO(bad), len(bad))
    with pytest.raises(IntegrityError, match="a/f1.bin"):
        store.download_dir(uri, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_retries_transient_not_client_errors(s3_env, monkeypatch):
    bucket = s3_env.make_bucket()
    store = ObjectStore.from_env(FAST)
    real = store.client.put_object
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise S3Error(None, "SlowDown", "slow down", "/x", "r", "h", bucket_name=bucket)
        return real(*a, **k)

    monkeypatch.setattr(store.client, "put_object", flaky)
    store.put_json(f"s3://{bucket}/meta/x.json", {"a": 1})
    assert calls["n"] == 3
    assert store.get_json(f"s3://{bucket}/meta/x.json") == {"a": 1}

    calls["n"] = 0

    def denied(*a, **k):
        calls["n"] += 1
        raise S3Error(None, "NoSuchUpload", "client error", "/x", "r", "h")

    monkeypatch.setattr(store.client, "put_object", denied)
    with pytest.raises(S3Error):
        store.put_json(f"s3://{bucket}/meta/y.json", {})
    assert calls["n"] == 1


def test_connection_error_retried_then_reported(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    # a port nobody listens on: every attempt fails to connect, all retries are used, the error names the endpoint
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    store = ObjectStore.from_env(StorageConfig(endpoint=f"http://127.0.0.1:{port}", retries=2, backoff_s=0.01))
    with pytest.raises(Exception, match=r"after 3 attempts .*127\.0\.0\.1"):
        store.exists("s3://bkt/x")


def test_small_object_helpers(s3_env, tmp_path):
    bucket = s3_env.make_bucket()
    store = ObjectStore.from_env(FAST)
    f = tmp_path / "w.bin"
    f.write_bytes(os.urandom(3000))
    uri = f"s3://{bucket}/reg/m1/w.bin"
    assert not store.exists(uri)
    store.put_file(f, uri)
    assert store.exists(uri)
    got = store.get_file(uri, tmp_path / "g" / "w.bin")
    assert sha256_file(got) == sha256_file(f)
    store.put_json(f"s3://{bucket}/reg/index.json", {"models": ["m1"]})
    assert store.list(f"s3://{bucket}/reg") == [f"s3://{bucket}/reg/index.json", uri]
    assert store.delete_prefix(f"s3://{bucket}/reg/m1") == 1
    assert store.list(f"s3://{bucket}/reg") == [f"s3://{bucket}/reg/index.json"]
    with pytest.raises(NotCommittedError):
        store.read_manifest(f"s3://{bucket}/reg")
