"""The model cache of s3:// checkpoints (craft.models.diffusion._fetch) against a real S3 server: a committed
version is downloaded once and reused, a new version is a new folder (the old one is never touched under its
readers), and concurrent fetchers of one version download it once and never mix their files."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from craft.models import diffusion as D
from craft.storage.objectstore import ObjectStore


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


@pytest.fixture
def counted(monkeypatch):
    """Counts ObjectStore.download_dir calls (what a cache hit must not make)."""
    calls = []
    real = ObjectStore.download_dir

    def counting(self, uri, local_dir, *a, **kw):
        calls.append(uri)
        return real(self, uri, local_dir, *a, **kw)

    monkeypatch.setattr(ObjectStore, "download_dir", counting)
    return calls


def test_a_complete_version_is_reused_without_downloading(s3_env, tmp_path, counted):
    uri = f"s3://{s3_env.make_bucket()}/models/enc"
    ObjectStore.from_env().upload_dir(
        _folder(tmp_path / "v1", {"config.json": b"{}", "w.safetensors": b"1" * 99}), uri
    )
    first = D.resolve_model_dir(uri, tmp_path / "cache")
    second = D.resolve_model_dir(uri, tmp_path / "cache")
    assert first == second and counted == [uri]
    assert (first / "w.safetensors").read_bytes() == b"1" * 99
    assert first.name == D.manifest_digest(ObjectStore.from_env().read_manifest(uri))[:32]
    # the same files uploaded again (a new manifest time) are the same version: still no download
    ObjectStore.from_env().upload_dir(tmp_path / "v1", uri)
    assert D.resolve_model_dir(uri, tmp_path / "cache") == first and counted == [uri]


def test_a_new_version_is_a_new_folder_and_the_old_one_is_untouched(s3_env, tmp_path, counted):
    uri = f"s3://{s3_env.make_bucket()}/models/enc"
    store = ObjectStore.from_env()
    store.upload_dir(_folder(tmp_path / "v1", {"config.json": b"{}", "w.safetensors": b"1" * 99}), uri)
    old = D.resolve_model_dir(uri, tmp_path / "cache")
    reader = open(old / "w.safetensors", "rb")  # a step still reading the old version
    inode = (old / "w.safetensors").stat().st_ino
    store.upload_dir(_folder(tmp_path / "v2", {"config.json": b"{}", "w.safetensors": b"2" * 50}), uri)
    new = D.resolve_model_dir(uri, tmp_path / "cache")
    assert new != old and new.parent == old.parent and len(counted) == 2
    assert (new / "w.safetensors").read_bytes() == b"2" * 50
    assert (old / "w.safetensors").stat().st_ino == inode and reader.read() == b"1" * 99
    reader.close()
    assert sorted(p.name for p in old.parent.iterdir() if not p.name.startswith(".")) == sorted([old.name, new.name])


def test_an_incomplete_folder_is_set_aside_and_fetched_again(s3_env, tmp_path, counted):
    uri = f"s3://{s3_env.make_bucket()}/models/enc"
    ObjectStore.from_env().upload_dir(_folder(tmp_path / "v1", {"a/w.safetensors": b"1" * 99}), uri)
    got = D.resolve_model_dir(uri, tmp_path / "cache")
    (got / "a" / "w.safetensors").write_bytes(b"1" * 10)  # truncated by hand
    again = D.resolve_model_dir(uri, tmp_path / "cache")
    assert again == got and (again / "a" / "w.safetensors").read_bytes() == b"1" * 99 and len(counted) == 2
    assert [p for p in got.parent.iterdir() if ".broken-" in p.name]


@pytest.mark.parametrize("locks", [True, False], ids=["with-lock", "rename-only"])
def test_concurrent_fetchers_of_one_version(s3_env, tmp_path, counted, monkeypatch, locks):
    """Eight fetchers at once (torchrun ranks, parallel steps on one volume): each gets the complete folder.

    With the file lock one of them downloads; without it (a filesystem whose locks do not hold) every one
    downloads into its own temporary folder and only the first rename wins: still one intact folder.
    """
    import contextlib

    uri = f"s3://{s3_env.make_bucket()}/models/enc"
    files = {f"part{i}.safetensors": bytes([i]) * 5000 for i in range(6)}
    ObjectStore.from_env().upload_dir(_folder(tmp_path / "v1", files), uri)
    if not locks:
        monkeypatch.setattr(D, "_file_lock", lambda path: contextlib.nullcontext())
    start, results, errors = threading.Barrier(8), [], []

    def fetch():
        start.wait()
        try:
            results.append(D.resolve_model_dir(uri, tmp_path / "cache"))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(results) == 8 and len(set(results)) == 1
    (folder,) = set(results)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files
    assert len(counted) == 1 if locks else len(counted) >= 1
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]  # no temporary folder left behind


def test_pickles_are_still_skipped(s3_env, tmp_path, counted):
    uri = f"s3://{s3_env.make_bucket()}/models/sd"
    ObjectStore.from_env().upload_dir(_folder(tmp_path / "m", {"model_index.json": b"{}", "v2-1.ckpt": b"c" * 50,
                                                               "unet/w.safetensors": b"s", "unet/w.bin": b"b"}), uri)  # fmt: skip
    got = D.resolve_model_dir(uri, tmp_path / "cache")
    assert sorted(p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file()) == [
        "model_index.json", "unet/w.safetensors"]  # fmt: skip
    assert D.resolve_model_dir(uri, tmp_path / "cache") == got and counted == [uri]  # skipped files: still complete


def test_temporary_folders_of_dead_fetchers_are_removed_and_live_ones_kept(s3_env, tmp_path):
    import os
    import socket

    uri = f"s3://{s3_env.make_bucket()}/models/enc"
    ObjectStore.from_env().upload_dir(_folder(tmp_path / "v1", {"w.safetensors": b"1" * 9}), uri)
    digest = D.manifest_digest(ObjectStore.from_env().read_manifest(uri))[:32]
    home = D.cache_root(tmp_path / "cache") / D.hashlib.sha256(uri.encode()).hexdigest()[:16]
    host = socket.gethostname()
    dead = home / f".{digest}.tmp-{host}-{2**22 + 12345}-deadbeef"  # above the default pid_max: no such process
    live = home / f".{digest}.tmp-{host}-{os.getpid()}-cafebabe"  # another thread of a live process
    for p in (dead, live):
        (p / "sub").mkdir(parents=True)
    D.resolve_model_dir(uri, tmp_path / "cache")
    assert not dead.exists() and live.exists()
