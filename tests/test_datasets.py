"""Dataset versions against a real SeaweedFS S3 server: one content id, immutable uploads, the latest pointer."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from craft.storage import datasets
from craft.storage.cas import get_json_etag
from craft.storage.datasets import DatasetError, DatasetRef
from craft.storage.objectstore import ObjectStore, StorageConfig


def make_dataset(root: Path, seed: int = 0, n: int = 4) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / "images" / f"img{i}.png").write_bytes(bytes((seed + i * 31 + k) % 256 for k in range(300)))
    (root / "dataset.yaml").write_text("name: tiny\n")
    return root


@pytest.fixture
def store(s3_env) -> ObjectStore:
    return ObjectStore.from_env(StorageConfig(retries=2, backoff_s=0.01))


@pytest.fixture
def base(s3_env) -> str:
    return f"s3://{s3_env.make_bucket('ds')}/team/datasets/tiny"


def test_content_version_is_path_and_content_only(tmp_path):
    a = make_dataset(tmp_path / "a")
    b = make_dataset(tmp_path / "elsewhere" / "b")
    assert datasets.local_version(a) == datasets.local_version(b)  # where it sits does not matter
    assert datasets.is_version(datasets.local_version(a))
    (a / datasets.REF_FILE).write_text("{}")  # what the data step writes beside the files is not content
    assert datasets.local_version(a) == datasets.local_version(b)
    (b / "images" / "img0.png").rename(b / "images" / "renamed.png")
    assert datasets.local_version(a) != datasets.local_version(b)  # a path is part of the content
    files = [{"path": "b.png", "sha256": "2" * 64}, {"path": "a.png", "sha256": "1" * 64}]
    assert datasets.content_version(files) == datasets.content_version(files[::-1]) == "77c03c5c57fca9e9"
    with pytest.raises(DatasetError, match="no files"):
        datasets.content_version([])
    with pytest.raises(DatasetError, match="not a folder"):
        datasets.local_version(tmp_path / "missing")


def test_same_content_same_version_locally_and_on_the_store(store, base, tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "v1")
    local = datasets.local_version(data)
    ref = datasets.upload(store, data, base, actor="tester")
    assert (ref.name, ref.version, ref.resolved_uri, ref.source) == ("tiny", local, f"{base}/{local}", "pointer")
    pointer = store.get_json(f"{base}/latest.json")
    assert pointer["version"] == local and pointer["previous"] is None and pointer["actor"] == "tester"

    # resolving reads the pointer and the manifest only: no file is downloaded to learn the version
    read = []
    get_object = store.client.get_object
    with monkeypatch.context() as m:
        m.setattr(store.client, "get_object", lambda b, k, *a, **kw: read.append(k) or get_object(b, k, *a, **kw))
        m.setattr(store.client, "fget_object", lambda *a, **kw: pytest.fail("downloaded a file"))
        for uri in (base, f"{base}/", f"{base}/{local}"):
            got = datasets.resolve(uri, store)
            assert got.version == local and got.resolved_uri == f"{base}/{local}" and got.name == "tiny", uri
    assert read and all(k.endswith(("latest.json", "MANIFEST.json")) for k in read), read

    # an identical re-upload (a copy elsewhere on disk) writes nothing and leaves the pointer where it was
    _, etag = get_json_etag(store, f"{base}/latest.json")
    with monkeypatch.context() as m:
        m.setattr(store, "upload_dir", lambda *a, **kw: pytest.fail("re-uploaded identical content"))
        again = datasets.upload(store, make_dataset(tmp_path / "copy"), base)
    assert again.version == local and get_json_etag(store, f"{base}/latest.json")[1] == etag

    # any other committed prefix has a version too, from its manifest; a local folder, from its files
    other = base.replace("/datasets/tiny", "/raw/export-1")
    store.upload_dir(data, other)
    got = datasets.resolve(other, store)
    assert (got.version, got.source, got.resolved_uri, got.name) == (local, "prefix", other, "export-1")
    got = datasets.resolve(str(data))
    assert (got.version, got.source, got.resolved_uri, got.name) == (local, "local", str(data), "tiny")


def test_one_changed_image_is_a_new_version_and_the_old_stays_readable(store, base, tmp_path):
    v1_dir = make_dataset(tmp_path / "v1")
    v1 = datasets.upload(store, v1_dir, base).version
    v2_dir = make_dataset(tmp_path / "v2")
    (v2_dir / "images" / "img2.png").write_bytes(b"re-scanned slide")
    v2 = datasets.upload(store, v2_dir, base).version
    assert v2 != v1
    pointer = store.get_json(f"{base}/latest.json")
    assert (pointer["version"], pointer["previous"], pointer["uri"]) == (v2, v1, f"{base}/{v2}")
    assert datasets.resolve(base, store).version == v2
    assert store.is_committed(f"{base}/{v1}") and store.is_committed(f"{base}/{v2}")  # immutable, side by side

    pinned = datasets.resolve(f"{base}/{v1}", store)  # what an earlier run read, still there
    assert pinned.version == v1 and pinned.resolved_uri == f"{base}/{v1}"
    out = datasets.fetch(pinned, tmp_path / "read-v1", store)
    assert datasets.local_version(out) == v1
    assert (out / "images" / "img2.png").read_bytes() == (v1_dir / "images" / "img2.png").read_bytes()
    latest = datasets.fetch(datasets.resolve(base, store), tmp_path / "read-v2", store)
    assert (latest / "images" / "img2.png").read_bytes() == b"re-scanned slide"
    # a local ref is copied and checked the same way
    assert datasets.local_version(datasets.fetch(datasets.resolve(str(v2_dir)), tmp_path / "copy-v2")) == v2


def test_content_that_is_not_the_named_version_is_refused(store, base, tmp_path):
    v1_dir = make_dataset(tmp_path / "v1")
    v1 = datasets.upload(store, v1_dir, base).version
    other = make_dataset(tmp_path / "other", seed=9)
    store.upload_dir(other, f"{base}/{v1}")  # someone overwrote the immutable prefix by hand
    with pytest.raises(DatasetError, match=f"hash to {datasets.local_version(other)}, not the version {v1}"):
        datasets.resolve(f"{base}/{v1}", store)
    with pytest.raises(DatasetError, match="was the prefix overwritten"):
        datasets.resolve(base, store)  # the pointer names v1, which no longer holds v1
    with pytest.raises(DatasetError, match="versions are immutable"):
        datasets.upload(store, v1_dir, base)

    # files read that are not the resolved version (changed under the run): refused
    ref = DatasetRef("tiny", "0" * 16, str(v1_dir), str(v1_dir), "local")
    with pytest.raises(DatasetError, match="the dataset changed under the run"):
        datasets.fetch(ref, tmp_path / "out")


def test_unresolvable_dataset_uris(store, base, tmp_path):
    with pytest.raises(DatasetError, match="not a dataset on the store"):
        datasets.resolve(base, store)  # nothing uploaded yet
    with pytest.raises(DatasetError, match="an object store is needed"):
        datasets.resolve(base)
    with pytest.raises(DatasetError, match="empty"):
        datasets.resolve("")
    with pytest.raises(DatasetError, match="no such dataset folder"):
        datasets.resolve(str(tmp_path / "missing"))
    with pytest.raises(DatasetError, match="datasets/NAME"):
        datasets.upload(store, make_dataset(tmp_path / "d"), base.replace("/datasets/tiny", "/elsewhere/tiny"))
    store.put_json(f"{base}/latest.json", {"version": "not-a-version"})
    with pytest.raises(DatasetError, match="no valid version in the pointer"):
        datasets.resolve(base, store)
    store.put_json(f"{base}/latest.json", {"version": "0123456789abcdef"})
    with pytest.raises(DatasetError, match="not committed"):
        datasets.resolve(base, store)


def test_validation_verdicts_per_version(store, base):
    root = base.split("/team/")[0]
    assert datasets.validation_of(store, root, "tiny", "0123456789abcdef") is None
    uri = datasets.record_validation(store, root, "tiny", "0123456789abcdef", {"ok": False, "n_failures": 2})
    assert uri == f"{root}/validations/tiny/0123456789abcdef.json"
    assert datasets.validation_of(store, root, "tiny", "0123456789abcdef") == {
        "name": "tiny", "version": "0123456789abcdef", "ok": False, "n_failures": 2}  # fmt: skip
    datasets.record_validation(store, root, "tiny", "0123456789abcdef", {"ok": True})  # a re-validation wins
    assert datasets.validation_of(store, root, "tiny", "0123456789abcdef")["ok"] is True
    assert datasets.validation_of(store, root, "tiny", "fedcba9876543210") is None


from tests.test_dvc import git_repo  # noqa: E402, F401, F811  (one throwaway-git-repo fixture for both files)


def test_a_dvc_file_with_stale_data_is_refused(git_repo):  # noqa: F811
    from craft.storage import dvc

    data = make_dataset(git_repo / "data")
    dvc.init_repo(git_repo)
    dvc_file = dvc.add(git_repo, "data")
    ref = datasets.resolve(str(dvc_file))
    assert (ref.version, ref.source, ref.resolved_uri) == (datasets.local_version(data), "dvc", str(data))
    assert ref.name == "tiny"

    (data / "images" / "img1.png").write_bytes(b"edited after dvc add")  # the checkout no longer matches
    with pytest.raises(DatasetError, match=r"differs from .* recorded in .*data\.dvc"):
        datasets.resolve(str(dvc_file))
    for p in sorted(data.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    data.rmdir()
    with pytest.raises(DatasetError, match="dvc pull"):
        datasets.resolve(str(dvc_file))
    bad = git_repo / "bad.dvc"
    bad.write_text(json.dumps({"outs": []}))
    with pytest.raises(DatasetError, match="no outs"):
        datasets.resolve(str(bad))
    with pytest.raises(DatasetError, match="no such .dvc file"):
        datasets.resolve(str(git_repo / "missing.dvc"))


def test_a_dvc_path_at_a_git_revision_resolves_to_the_same_content_id(s3_env, git_repo, tmp_path, monkeypatch):  # noqa: F811
    """dvc://REPO?rev=REV#PATH: the data as committed at REV, fetched from the DVC remote (SeaweedFS here),
    versioned like any other copy of those files; a later revision with a changed image is a new version."""
    from craft.storage import dvc

    for k, v in {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t",
                 "GIT_COMMITTER_EMAIL": "t@x"}.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)  # a clone has no config.local: craft hands DVC the endpoint
    data = make_dataset(git_repo / "data")
    want = datasets.local_version(data)
    dvc.init_repo(git_repo)
    bucket = s3_env.make_bucket("dvcrev")
    dvc.configure_remote(git_repo, "store", f"s3://{bucket}/dvc", s3_env.endpoint)
    dvc.add(git_repo, "data")
    dvc.push(git_repo)

    def git(*args):
        return subprocess.run(["git", "-C", str(git_repo), *args], check=True, capture_output=True, text=True).stdout

    git("add", "data.dvc", ".gitignore", ".dvc/config", ".dvcignore")
    git("commit", "-qm", "v1")
    rev1 = git("rev-parse", "HEAD").strip()
    (data / "images" / "img1.png").write_bytes((data / "images" / "img0.png").read_bytes())
    dvc.add(git_repo, "data")
    dvc.push(git_repo)
    git("commit", "-qam", "v2")

    ref1 = datasets.resolve(f"dvc://{git_repo}?rev={rev1}#data", work_dir=tmp_path / "w1")
    assert (ref1.version, ref1.source) == (want, "dvc")
    ref2 = datasets.resolve(f"dvc://{git_repo}?rev=HEAD#data", work_dir=tmp_path / "w2")
    assert ref2.version == datasets.local_version(data) != want
    with pytest.raises(DatasetError, match="after '#'"):
        datasets.resolve(f"dvc://{git_repo}?rev=HEAD", work_dir=tmp_path / "w3")
