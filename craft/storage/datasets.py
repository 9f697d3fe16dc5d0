"""Dataset versions: one content id, immutable uploads, a ``latest`` pointer, and validation verdicts.

A **dataset version** is :func:`content_version` of the dataset's files: the first 16 hex digits of the
sha256 over the sorted lines ``<relative path>\\t<sha256 of the file>``. It is the same id whether the
files sit in a local folder, under a committed object-store prefix (its MANIFEST.json already lists
every file's sha256, so nothing is downloaded), or in a DVC-tracked folder (materialised, then hashed):
one function, so the registry's lineage, ``craft retrain-if-new-data`` and the pipeline's data step
compare like with like.

Layout on the object store (``craft store upload DIR s3://B/datasets/NAME``)::

    datasets/NAME/<version>/...          immutable: written once through the commit protocol of
                                         ObjectStore.upload_dir; an upload of identical content is a no-op
    datasets/NAME/latest.json            {name, version, uri, previous, updated}: moved LAST, by a
                                         compare-and-swap on its etag (craft/storage/cas.py)

Validation verdicts are recorded per dataset version beside the model registry
(``<registry root>/validations/NAME/<version>.json``), so a scheduled check never restarts a run on a
version that failed validation.

Dataset URIs the pipeline accepts (:func:`resolve`): ``s3://B/datasets/NAME`` (the ``latest`` pointer),
``s3://B/datasets/NAME/<version>`` (pinned), any other committed ``s3://`` prefix, a local folder, a
``.dvc`` file (the folder it tracks, after ``dvc pull``), or ``dvc://REPO?rev=REV#PATH`` (a DVC-tracked
path of a git repository at a revision, fetched from its DVC remote).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from craft.storage.cas import PreconditionFailed, get_json_etag, put_json_conditional
from craft.storage.objectstore import ObjectStoreError, local_manifest, parse_s3_uri

POINTER = "latest.json"
VERSION_LEN = 16
DATASETS_DIR = "datasets"
# written by the pipeline's data step into the dataset artifact; never part of the content id
REF_FILE = "dataset_ref.json"
EXCLUDED = (REF_FILE, "MANIFEST.json")
DVC_SCHEME = "dvc://"


class DatasetError(ValueError):
    """A dataset URI that cannot be resolved to a version; the message names the URI."""


@dataclass
class DatasetRef:
    """What a run read: the dataset's name, its content version, and where those exact files are."""

    name: str
    version: str
    uri: str  # what the user gave (a pointer, a folder, a .dvc file, ...)
    resolved_uri: str  # where this version's files are (a pinned prefix or a local folder)
    source: str  # "pointer" | "prefix" | "local" | "dvc" | "demo"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def content_version(files: Iterable[dict[str, Any]]) -> str:
    """The dataset version of a file list (``path`` relative with '/' separators, ``sha256``).

    >>> content_version([{"path": "b.png", "sha256": "2" * 64}, {"path": "a.png", "sha256": "1" * 64}])
    '77c03c5c57fca9e9'
    """
    lines = sorted(f"{f['path']}\t{f['sha256']}" for f in files if Path(f["path"]).name not in EXCLUDED)
    if not lines:
        raise DatasetError("a dataset with no files has no version")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:VERSION_LEN]


def local_version(path: str | os.PathLike) -> str:
    """The dataset version of a local folder."""
    p = Path(path)
    if not p.is_dir():
        raise DatasetError(f"{p}: not a folder")
    return content_version(local_manifest(p))


def is_version(text: str) -> bool:
    return len(text) == VERSION_LEN and all(c in "0123456789abcdef" for c in text)


def _split_dataset_prefix(uri: str) -> tuple[str, str | None]:
    """``s3://B/x/datasets/NAME[/VERSION]`` -> (``s3://B/x/datasets/NAME``, VERSION or None)."""
    parts = uri.rstrip("/").split("/")
    if len(parts) >= 6 and parts[-3] == DATASETS_DIR and is_version(parts[-1]):
        return "/".join(parts[:-1]), parts[-1]
    return uri.rstrip("/"), None


def is_dataset_base(uri: str) -> bool:
    """``s3://B[/p]/datasets/NAME``: where `craft store upload` writes versions and a latest pointer."""
    parts = uri.rstrip("/").split("/")
    return uri.startswith("s3://") and len(parts) >= 5 and parts[-2] == DATASETS_DIR and bool(parts[-1])


def upload(store, local_dir: str | os.PathLike, base_uri: str, *, actor: str = "") -> DatasetRef:
    """Upload ``local_dir`` as an immutable version under ``base_uri`` and move ``latest`` to it (last).

    Re-uploading identical content writes nothing new and leaves the pointer on that version.
    """
    if not is_dataset_base(base_uri):
        raise DatasetError(f"{base_uri}: a dataset upload goes to s3://BUCKET[/PREFIX]/datasets/NAME")
    base = base_uri.rstrip("/")
    name = base.split("/")[-1]
    version = local_version(local_dir)
    target = f"{base}/{version}"
    if store.is_committed(target):
        have = content_version(store.read_manifest(target)["files"])
        if have != version:
            raise DatasetError(f"{target}: holds version {have}, not {version}; versions are immutable")
    else:
        store.upload_dir(local_dir, target)
    for _ in range(5):  # compare-and-swap; a concurrent uploader's move makes us re-read and retry
        current, etag = get_json_etag(store, f"{base}/{POINTER}")
        pointer = {
            "name": name,
            "version": version,
            "uri": target,
            "previous": (current or {}).get("version"),
            "updated": datetime.now(UTC).isoformat(timespec="seconds"),
            "actor": actor or os.environ.get("USER") or "unknown",
        }
        if current and current.get("version") == version:
            break
        try:
            put_json_conditional(store, f"{base}/{POINTER}", pointer, if_match=etag)
            break
        except PreconditionFailed:
            continue
    else:
        raise DatasetError(f"{base}/{POINTER}: could not move the pointer (5 concurrent updates in a row)")
    return DatasetRef(name, version, base_uri, target, "pointer")


def resolve(uri: str, store=None, *, work_dir: str | os.PathLike | None = None) -> DatasetRef:
    """The version of dataset ``uri`` (module docstring lists the forms) without copying it anywhere
    when the store already knows every file's sha256; DVC inputs are materialised under ``work_dir``."""
    if not uri:
        raise DatasetError("empty dataset URI")
    if uri.startswith("s3://"):
        if store is None:
            raise DatasetError(f"{uri}: an object store is needed to resolve it")
        return _resolve_s3(uri, store)
    if uri.startswith(DVC_SCHEME) or uri.endswith(".dvc"):
        local = materialise_dvc(uri, work_dir)
        return DatasetRef(_name_of(local), local_version(local), uri, str(local), "dvc")
    p = Path(uri)
    if not p.is_dir():
        raise DatasetError(f"{uri}: no such dataset folder")
    return DatasetRef(_name_of(p), local_version(p), uri, str(p), "local")


def _resolve_s3(uri: str, store) -> DatasetRef:
    parse_s3_uri(uri)
    base, pinned = _split_dataset_prefix(uri)
    if pinned is None:
        pointer, _ = get_json_etag(store, f"{base}/{POINTER}")
        if pointer is not None:
            version = pointer.get("version", "")
            if not is_version(version):
                raise DatasetError(f"{base}/{POINTER}: no valid version in the pointer ({version!r})")
            target = f"{base}/{version}"
            _check_committed(store, target, version)
            return DatasetRef(base.split("/")[-1], version, uri, target, "pointer")
    if not store.is_committed(uri):
        raise DatasetError(
            f"{uri}: not a dataset on the store (no {POINTER} pointer and no committed MANIFEST.json); "
            "upload one with `craft store upload DIR s3://BUCKET/datasets/NAME`"
        )
    version = content_version(store.read_manifest(uri)["files"])
    if pinned is not None:
        if version != pinned:
            raise DatasetError(f"{uri}: its files hash to {version}, not the version {pinned} its path names")
        return DatasetRef(base.split("/")[-1], version, uri, uri.rstrip("/"), "pointer")
    return DatasetRef(uri.rstrip("/").split("/")[-1], version, uri, uri.rstrip("/"), "prefix")


def _check_committed(store, target: str, version: str) -> None:
    try:
        have = content_version(store.read_manifest(target)["files"])
    except ObjectStoreError as e:
        raise DatasetError(f"{target}: the latest pointer names version {version}, which is not committed: {e}") from e
    if have != version:
        raise DatasetError(f"{target}: holds version {have}, not {version}; was the prefix overwritten?")


def _name_of(path: Path) -> str:
    """A dataset's name: ``name`` in dataset.yaml, else the folder name."""
    import yaml

    meta = Path(path) / "dataset.yaml"
    if meta.is_file():
        try:
            doc = yaml.safe_load(meta.read_text()) or {}
        except yaml.YAMLError:
            doc = {}
        if isinstance(doc, dict) and isinstance(doc.get("name"), str) and doc["name"]:
            return doc["name"]
    return Path(path).resolve().name


def materialise_dvc(uri: str, work_dir: str | os.PathLike | None = None) -> Path:
    """The local folder of a DVC-tracked dataset.

    - ``path/to/data.dvc``: the folder it tracks (``outs[0].path`` beside it), which must be present
      (``dvc pull``); its content must match the md5 the ``.dvc`` file records, so a stale checkout is
      refused rather than trained on.
    - ``dvc://REPO?rev=REV#PATH``: PATH of the git repository REPO (a local path or a git URL) at REV,
      fetched with DVC from the repository's remote into ``work_dir``.
    """
    from craft.storage import dvc

    if uri.startswith(DVC_SCHEME):
        parts = urlsplit(uri)
        repo = (parts.netloc + parts.path) or "."
        rev = (parse_qs(parts.query).get("rev") or [None])[0]
        path = parts.fragment
        if not path:
            raise DatasetError(f"{uri}: name the tracked path after '#': dvc://REPO?rev=REV#PATH")
        if work_dir is None:
            raise DatasetError(f"{uri}: a work folder is needed to fetch it")
        dest = Path(work_dir) / "dvc-dataset"
        if dest.exists():
            shutil.rmtree(dest)
        dvc.get(repo, path, dest, rev=rev, env=_dvc_endpoint_env())
        return dest
    dvc_file = Path(uri)
    if not dvc_file.is_file():
        raise DatasetError(f"{uri}: no such .dvc file")
    import yaml

    doc = yaml.safe_load(dvc_file.read_text()) or {}
    outs = doc.get("outs") if isinstance(doc, dict) else None
    if not outs or not isinstance(outs[0], dict) or not outs[0].get("path"):
        raise DatasetError(f"{uri}: no outs[0].path recorded (is it a `dvc add` file?)")
    folder = dvc_file.parent / outs[0]["path"]
    if not folder.is_dir():
        raise DatasetError(f"{uri}: the tracked folder {folder} is not here; run `dvc pull`")
    recorded, actual = dvc.dataset_version(dvc_file), dvc.dir_md5(folder)
    if recorded != actual:
        raise DatasetError(f"{folder}: content md5 {actual} differs from {recorded} recorded in {uri}; `dvc pull`?")
    return folder


def _dvc_endpoint_env() -> dict[str, str]:
    """A clone made by `dvc get` has no `.dvc/config.local`, where craft keeps the remote's endpoint: hand
    DVC the object store's endpoint through AWS_ENDPOINT_URL unless the environment already names one."""
    if os.environ.get("AWS_ENDPOINT_URL"):
        return {}
    from craft.storage.objectstore import ObjectStoreError, StorageConfig, _resolve_endpoint

    try:
        host, secure = _resolve_endpoint(StorageConfig())
    except ObjectStoreError:
        return {}  # no store configured: the repository's own remote settings must do
    return {"AWS_ENDPOINT_URL": f"{'https' if secure else 'http'}://{host}"}


def fetch(ref: DatasetRef, out_dir: str | os.PathLike, store=None) -> Path:
    """Copy the files of ``ref`` into ``out_dir`` and check that they are that version."""
    from craft.io import copy_tree

    out_dir = Path(out_dir)
    if ref.resolved_uri.startswith("s3://"):
        store.download_dir(ref.resolved_uri, out_dir)
    else:
        copy_tree(ref.resolved_uri, out_dir)
    got = local_version(out_dir)
    if got != ref.version:
        raise DatasetError(f"{ref.uri}: the files read hash to {got}, not the resolved version {ref.version}; "
                           "the dataset changed under the run: start a new run")  # fmt: skip
    return out_dir


# ------------------------------------------------------------------------------------------ verdicts


def validation_uri(root: str, name: str, version: str) -> str:
    return f"{root.rstrip('/')}/validations/{name}/{version}.json"


def record_validation(store, root: str, name: str, version: str, verdict: dict[str, Any]) -> str:
    """Record the validation verdict of dataset version ``name``/``version`` (overwrites: a re-validation
    with other settings is the newer word); returns its URI."""
    uri = validation_uri(root, name, version)
    store.put_json(uri, {"name": name, "version": version, **verdict})
    return uri


def validation_of(store, root: str, name: str, version: str) -> dict[str, Any] | None:
    """The recorded verdict of a dataset version, or None when it was never validated by a run."""
    uri = validation_uri(root, name, version)
    return store.get_json(uri) if store.exists(uri) else None


def demo_version(make) -> DatasetRef:
    """The version of generated demo data: ``make(folder)`` writes it into a temporary folder, hashed."""
    with tempfile.TemporaryDirectory(prefix="craft-demo-version-") as tmp:
        out = Path(tmp) / "data"
        make(out)
        return DatasetRef(_name_of(out), local_version(out), "", "", "demo")
