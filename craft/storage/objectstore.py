"""Directories on any S3 API store (MinIO, SeaweedFS, AWS) through the `minio` SDK, committed atomically.

Commit protocol of :meth:`ObjectStore.upload_dir` for a prefix ``s3://bucket/p``:

1. hash the local folder into a manifest (relative path, size, sha256 per file);
2. upload every file to ``p/.staging/<txn>/<path>`` where ``txn`` is a hash of that manifest, so a rerun
   after a crash finds the same staging prefix and skips files already staged with the same sha256;
3. delete the old ``p/MANIFEST.json`` (from here readers see "not committed");
4. server-side copy each staged object to ``p/<path>`` (no bytes pass through the client);
5. delete objects of the previous version that the new manifest does not list;
6. write ``p/MANIFEST.json`` LAST, then drop the staging prefix.

A failure during steps 1-2 leaves the previous committed version untouched; a failure during 3-5 leaves
the prefix uncommitted (no manifest) and a rerun finishes the job. Readers trust only a prefix with a
manifest and check every file's sha256 against it.

Credentials come only from the environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` and the MinIO
and Kubeflow spellings), never from configs or arguments, and are never logged. Where the store is comes from
the config or ``CRAFT_S3_ENDPOINT`` / ``CRAFT_S3_SECURE``, which every pipeline pod and the retraining CronJob
get from the deployment's ConfigMap ``craft-env`` (k8s/, docs/DEPLOY.md section 2); there is no guess.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from craft.io import atomic_dir, sha256_file

log = logging.getLogger(__name__)

T = TypeVar("T")

MANIFEST_NAME = "MANIFEST.json"
STAGING_DIR = ".staging"
MANIFEST_FORMAT = "craft-objectstore-manifest/1"
SHA_META = "sha256"  # user metadata key on staged objects: x-amz-meta-sha256
# S3 CopyObject accepts sources up to 5 GiB; larger staged objects are copied by multipart
# UploadPartCopy (minio's compose_object), still server-side.
COPY_OBJECT_LIMIT = 5 * 1024**3

# Environment variable pairs accepted for the keys, in order of preference. Kubeflow's secret
# `mlpipeline-minio-artifact` holds `accesskey`/`secretkey`, exposed as env under those names.
CREDENTIAL_ENV_PAIRS = [
    ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
    ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"),
    ("MINIO_ACCESS_KEY", "MINIO_SECRET_KEY"),
    ("accesskey", "secretkey"),
]
# Environment variables that may name the endpoint when the config leaves it empty, in order.
ENDPOINT_ENV = ["CRAFT_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MINIO_ENDPOINT"]
# https or not when neither the config nor an http(s):// prefix on the endpoint says: true/false.
SECURE_ENV = "CRAFT_S3_SECURE"
# The ConfigMap that carries both in a cluster (k8s/base/kustomization.yaml), named in errors.
CONFIG_MAP = "craft-env"
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
# S3 error codes worth retrying: the server is busy or failed, not the request.
TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "OperationAborted"}
# Codes that mean the keys are wrong: say so plainly.
CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken"}


@dataclass
class StorageConfig:
    """Where the S3 API store is and how hard to try; never the keys (those come from the environment)."""

    # host:port of the S3 API (an http:// or https:// prefix is accepted and decides `secure`);
    # "" -> env CRAFT_S3_ENDPOINT, AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or MINIO_ENDPOINT; none -> an error
    endpoint: str = ""
    # use https; null -> env CRAFT_S3_SECURE (true/false), else the endpoint's scheme, else false (plain http)
    secure: bool | None = None
    # bucket region sent in signatures and on bucket creation (MinIO/SeaweedFS accept us-east-1)
    region: str = "us-east-1"
    # attempts after the first on a transient error (connection error, 5xx, SlowDown, InternalError)
    retries: int = 5
    # first backoff in seconds; doubles each attempt, times a random jitter in [0.5, 1.5)
    backoff_s: float = 0.5

    def validate(self) -> None:
        if self.retries < 0:
            raise ValueError(f"storage.retries must be >= 0, got {self.retries}")
        if self.backoff_s < 0:
            raise ValueError(f"storage.backoff_s must be >= 0, got {self.backoff_s}")
        if self.endpoint:
            _split_endpoint(self.endpoint, self.secure)


class ObjectStoreError(RuntimeError):
    """An object-store operation failed; the message names the URI and the cause."""


class CredentialsError(ObjectStoreError):
    """Keys missing from the environment or refused by the server."""


class NotCommittedError(ObjectStoreError):
    """The prefix has no MANIFEST.json: an upload never finished or is in progress."""


class IntegrityError(ObjectStoreError):
    """A downloaded file does not match the sha256/size in the manifest."""


class InjectedFault(RuntimeError):
    """Raised by ``upload_dir(_fault_after=k)`` in tests to simulate a crash mid-upload."""


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/a/b`` into ``("bucket", "a/b")``; the prefix has no leading/trailing slash.

    >>> parse_s3_uri("s3://craft/models/v1/")
    ('craft', 'models/v1')
    """
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r} (expected s3://bucket/prefix)")
    rest = uri[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r} (expected s3://bucket/prefix)")
    prefix = prefix.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise ValueError(f"s3 URI {uri!r} has an empty, '.' or '..' path segment")
    return bucket, prefix


def _env_secure() -> bool | None:
    """``CRAFT_S3_SECURE`` as a bool, None when unset or empty; anything but true/false is an error."""
    raw = os.environ.get(SECURE_ENV, "").strip().lower()
    if not raw:
        return None
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ObjectStoreError(f"{SECURE_ENV}={os.environ[SECURE_ENV]!r}: expected true or false")


def _split_endpoint(endpoint: str, secure: bool | None) -> tuple[str, bool]:
    """(host:port, https?) of ``endpoint``; a scheme that contradicts an explicit ``secure`` is an error.

    >>> _split_endpoint("https://s3.example.org", None)
    ('s3.example.org', True)
    >>> _split_endpoint("minio-service.kubeflow:9000", None)
    ('minio-service.kubeflow:9000', False)
    """
    ep = endpoint.strip()
    scheme = None
    if ep.startswith("https://"):
        ep, scheme = ep[len("https://") :], True
    elif ep.startswith("http://"):
        ep, scheme = ep[len("http://") :], False
    ep = ep.rstrip("/")
    if not ep or "/" in ep:
        raise ValueError(f"storage endpoint must be host:port (optionally with http(s)://), got {endpoint!r}")
    if scheme is not None and secure is not None and scheme != secure:
        raise ValueError(
            f"storage endpoint {endpoint!r} says {'https' if scheme else 'http'} but secure={secure} "
            f"(storage.secure or {SECURE_ENV}): make them agree"
        )
    return ep, scheme if scheme is not None else bool(secure)


def _resolve_endpoint(cfg: StorageConfig) -> tuple[str, bool]:
    """(host:port, https?) from the config, else the environment; no endpoint at all is an error.

    There is deliberately no fallback to Kubeflow's ``MINIO_SERVICE_SERVICE_HOST``: that variable exists only
    in pods of the ``kubeflow`` namespace, so a run would work in one namespace and not in another.
    """
    secure = cfg.secure if cfg.secure is not None else _env_secure()
    if cfg.endpoint:
        return _split_endpoint(cfg.endpoint, secure)
    for name in ENDPOINT_ENV:
        if os.environ.get(name):
            return _split_endpoint(os.environ[name], secure)
    raise ObjectStoreError(
        f"no S3 endpoint: set CRAFT_S3_ENDPOINT (host:port; with {SECURE_ENV}=true for https). In a cluster every "
        f"pipeline pod and the retraining CronJob get it from the ConfigMap {CONFIG_MAP!r} of the deployed overlay "
        f"(k8s/, docs/DEPLOY.md section 2); check that it exists in the namespace the pods run in. Also accepted: "
        f"storage.endpoint, {', '.join(ENDPOINT_ENV[1:])}"
    )


def _credentials_from_env() -> tuple[str, str, str | None]:
    for key_name, secret_name in CREDENTIAL_ENV_PAIRS:
        key, secret = os.environ.get(key_name), os.environ.get(secret_name)
        if key and secret:
            return key, secret, os.environ.get("AWS_SESSION_TOKEN") or None
        if key or secret:
            raise CredentialsError(f"only one of {key_name}/{secret_name} is set in the environment; set both")
    names = ", ".join(f"{a}/{b}" for a, b in CREDENTIAL_ENV_PAIRS)
    raise CredentialsError(f"no object-store credentials in the environment (set one pair of: {names})")


def _is_transient(exc: BaseException) -> bool:
    from minio.error import InvalidResponseError, S3Error, ServerError
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(exc, S3Error):
        return exc.code in TRANSIENT_CODES
    if isinstance(exc, ServerError):
        return exc.status_code >= 500
    if isinstance(exc, InvalidResponseError):
        return True  # a non-XML answer, typically a proxy's 502/503 page
    return isinstance(exc, (Urllib3Error, ConnectionError, TimeoutError))


def _code(exc: BaseException) -> str | None:
    return getattr(exc, "code", None)


def local_manifest(local_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Relative POSIX path, size and sha256 of every regular file under ``local_dir``, sorted by path."""
    root = Path(local_dir)
    if not root.is_dir():
        raise ObjectStoreError(f"{root}: not a directory")
    files = []
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            raise ObjectStoreError(f"{p}: symbolic links are not uploaded; copy the target in instead")
        if not p.is_file():
            continue
        rel = p.relative_to(root).as_posix()
        if rel == MANIFEST_NAME or rel.split("/")[0] == STAGING_DIR:
            raise ObjectStoreError(f"{p}: the names {MANIFEST_NAME} and {STAGING_DIR}/ are reserved at the top level")
        files.append({"path": rel, "size": p.stat().st_size, "sha256": sha256_file(p)})
    return files


def _txn_id(files: list[dict[str, Any]]) -> str:
    """Staging id: a hash of the file list, so a rerun with the same content resumes the same staging."""
    blob = json.dumps(files, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def _safe_relpath(rel: str, uri: str) -> str:
    pp = PurePosixPath(rel)
    if not rel or pp.is_absolute() or any(part in ("", ".", "..") for part in rel.split("/")):
        raise IntegrityError(f"{uri}/{MANIFEST_NAME}: file path {rel!r} escapes the prefix")
    return rel


def _join(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


class ObjectStore:
    """Directory upload/download with a sha256 manifest and atomic commit, plus small object helpers."""

    def __init__(self, client, cfg: StorageConfig, endpoint: str):
        self.client = client  # a minio.Minio; tests may wrap its methods to count calls
        self.cfg = cfg
        self.endpoint = endpoint
        self._known_buckets: set[str] = set()

    def __repr__(self) -> str:  # never shows keys
        return f"ObjectStore(endpoint={self.endpoint!r}, secure={self.cfg.secure})"

    @classmethod
    def from_env(cls, cfg: StorageConfig | None = None) -> ObjectStore:
        """Connect with the endpoint from ``cfg`` (or the environment) and keys from the environment only."""
        from minio import Minio
        from urllib3 import PoolManager, Timeout

        cfg = cfg or StorageConfig()
        cfg.validate()
        try:
            endpoint, secure = _resolve_endpoint(cfg)
        except ValueError as e:
            raise ObjectStoreError(str(e)) from e
        key, secret, token = _credentials_from_env()
        # Our own retry loop decides what is transient; the HTTP pool does not retry underneath it.
        http = PoolManager(timeout=Timeout(connect=10.0, read=120.0), retries=False, maxsize=8)
        client = Minio(
            endpoint, access_key=key, secret_key=secret, session_token=token, secure=secure, region=cfg.region,
            http_client=http,
        )  # fmt: skip
        return cls(client, StorageConfig(endpoint, secure, cfg.region, cfg.retries, cfg.backoff_s), endpoint)

    # ------------------------------------------------------------------ retries and errors
    def _call(self, what: str, fn: Callable[..., T], *args, **kwargs) -> T:
        """Run one SDK call, retrying transient failures with exponential backoff and jitter."""
        attempt = 0
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if _code(exc) in CREDENTIAL_CODES:
                    hint = (
                        "the keys may not do this: each step kind gets a scoped identity (k8s/object-store, "
                        "pipelines/resources.py object_store_secret); check that its policy allows this prefix"
                        if _code(exc) == "AccessDenied"
                        else "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
                    )
                    raise CredentialsError(
                        f"{what}: the S3 endpoint {self.endpoint} refused the request made with the credentials "
                        f"from the environment ({_code(exc)}); {hint}"
                    ) from exc
                if not _is_transient(exc) or attempt >= self.cfg.retries:
                    if _is_transient(exc):
                        raise ObjectStoreError(
                            f"{what}: failed after {attempt + 1} attempts against {self.endpoint}: {exc}"
                        ) from exc
                    raise
                delay = self.cfg.backoff_s * (2**attempt) * random.uniform(0.5, 1.5)
                log.warning("%s: transient error (%s), retry %d/%d in %.2fs", what, type(exc).__name__,
                            attempt + 1, self.cfg.retries, delay)  # fmt: skip
                time.sleep(delay)
                attempt += 1

    def _ensure_bucket(self, bucket: str) -> None:
        """Create ``bucket`` before a first write when it is missing and the keys may create it."""
        if bucket in self._known_buckets:
            return
        try:
            exists = self._call(f"bucket_exists {bucket}", self.client.bucket_exists, bucket)
        except CredentialsError as e:
            if _code(e.__cause__) != "AccessDenied":
                raise  # wrong keys, not a scoped identity
            # A scoped identity (k8s/object-store) may write its prefixes without being allowed to stat the
            # bucket (SeaweedFS ties HeadBucket to bucket-wide read). Such keys could not create the bucket
            # either: the administrator creates it (docs/DEPLOY.md section 4), and the write that follows
            # fails with NoSuchBucket, naming it, when it is missing.
            self._known_buckets.add(bucket)
            return
        if not exists:
            from minio.error import S3Error

            try:
                self._call(f"make_bucket {bucket}", self.client.make_bucket, bucket, self.cfg.region)
            except S3Error as e:  # created by someone else in between
                if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
        self._known_buckets.add(bucket)

    def _stat(self, bucket: str, key: str):
        from minio.error import S3Error

        try:
            return self._call(f"stat s3://{bucket}/{key}", self.client.stat_object, bucket, key)
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchObject", "NoSuchBucket", "NotFound"):
                return None
            raise

    def _list_keys(self, bucket: str, prefix: str) -> Iterator[str]:
        from minio.error import S3Error

        want = f"{prefix}/" if prefix else ""

        def run():
            return [o.object_name for o in self.client.list_objects(bucket, prefix=want, recursive=True)]

        try:
            yield from self._call(f"list s3://{bucket}/{want}", run)
        except S3Error as e:
            if e.code != "NoSuchBucket":
                raise

    def _remove(self, bucket: str, keys: list[str]) -> None:
        from minio.deleteobjects import DeleteObject

        for i in range(0, len(keys), 1000):
            chunk = [DeleteObject(k) for k in keys[i : i + 1000]]

            def run(chunk=chunk):
                return list(self.client.remove_objects(bucket, chunk))

            errors = self._call(f"delete {len(chunk)} objects in s3://{bucket}", run)
            if errors:
                raise ObjectStoreError(f"delete in s3://{bucket} failed for {len(errors)} objects: {errors[0]}")

    # ------------------------------------------------------------------ directories
    def upload_dir(self, local_dir: str | os.PathLike, uri: str, *, _fault_after: int | None = None) -> dict:
        """Upload ``local_dir`` to ``uri`` and commit it atomically; returns the manifest written."""
        from minio.commonconfig import ComposeSource, CopySource

        bucket, prefix = parse_s3_uri(uri)
        files = local_manifest(local_dir)
        txn = _txn_id(files)
        staging = _join(prefix, f"{STAGING_DIR}/{txn}")
        self._ensure_bucket(bucket)

        # Step 2: stage; a file already staged with the same sha256 and size (an earlier, crashed run) is kept.
        for done, entry in enumerate(files):
            if _fault_after is not None and done >= _fault_after:
                raise InjectedFault(f"injected fault after {done} staged files of {len(files)}")
            key = f"{staging}/{entry['path']}"
            st = self._stat(bucket, key)
            if st is not None and st.size == entry["size"] and _meta(st, SHA_META) == entry["sha256"]:
                continue
            self._call(
                f"upload {entry['path']} to s3://{bucket}/{key}", self.client.fput_object, bucket, key,
                str(Path(local_dir) / entry["path"]), metadata={SHA_META: entry["sha256"]},
            )  # fmt: skip

        # Step 3: from here the prefix is uncommitted until the new manifest lands.
        manifest_key = _join(prefix, MANIFEST_NAME)
        self._call(f"delete s3://{bucket}/{manifest_key}", self.client.remove_object, bucket, manifest_key)

        # Step 4: server-side copies, no data through the client.
        for entry in files:
            src, dst = f"{staging}/{entry['path']}", _join(prefix, entry["path"])
            if entry["size"] > COPY_OBJECT_LIMIT:
                copy, source = self.client.compose_object, [ComposeSource(bucket, src)]
            else:
                copy, source = self.client.copy_object, CopySource(bucket, src)
            self._call(f"copy to s3://{bucket}/{dst}", copy, bucket, dst, source)

        # Step 5: objects of the previous version that the new one does not have.
        keep = {_join(prefix, e["path"]) for e in files}
        staging_root = _join(prefix, STAGING_DIR) + "/"
        stale = [k for k in self._list_keys(bucket, prefix) if k not in keep and not k.startswith(staging_root)]
        stale = [k for k in stale if k != manifest_key]
        if stale:
            self._remove(bucket, stale)

        # Step 6: the manifest is the commit point; then the staging objects go.
        manifest = {
            "format": MANIFEST_FORMAT,
            "txn": txn,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "n_files": len(files),
            "total_bytes": sum(e["size"] for e in files),
            "files": files,
        }
        self._put_bytes(bucket, manifest_key, _json_bytes(manifest), "application/json")
        self._remove(bucket, list(self._list_keys(bucket, _join(prefix, STAGING_DIR))))
        log.info("committed %d files (%d bytes) to s3://%s/%s txn %s", len(files), manifest["total_bytes"],
                 bucket, prefix, txn)  # fmt: skip
        return manifest

    def is_committed(self, uri: str) -> bool:
        bucket, prefix = parse_s3_uri(uri)
        return self._stat(bucket, _join(prefix, MANIFEST_NAME)) is not None

    def read_manifest(self, uri: str) -> dict:
        """The committed manifest of ``uri``; :class:`NotCommittedError` when there is none."""
        bucket, prefix = parse_s3_uri(uri)
        data = self._get_bytes(bucket, _join(prefix, MANIFEST_NAME), missing_ok=True)
        if data is None:
            raise NotCommittedError(
                f"{uri} is not committed (no {MANIFEST_NAME}): an upload never finished or is in progress"
            )
        try:
            manifest = json.loads(data)
        except json.JSONDecodeError as e:
            raise IntegrityError(f"{uri}/{MANIFEST_NAME}: not valid JSON ({e})") from e
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), list):
            raise IntegrityError(f"{uri}/{MANIFEST_NAME}: not a {MANIFEST_FORMAT} manifest")
        return manifest

    def download_dir(
        self, uri: str, local_dir: str | os.PathLike, skip: Iterable[str] = (), manifest: dict | None = None
    ) -> Path:
        """Download the committed version of ``uri`` into ``local_dir`` (replaced as a whole) and verify it.

        ``skip``: relative paths listed in the manifest that are not wanted (e.g. the pickle weights of a
        model snapshot that loading never reads); a name the manifest does not list is refused.
        ``manifest``: the one :meth:`read_manifest` returned earlier, so that what lands is exactly the version
        the caller decided on (a file that changed since fails its sha256 check); default: read it now.
        """
        bucket, prefix = parse_s3_uri(uri)
        manifest = manifest if manifest is not None else self.read_manifest(uri)
        skip = set(skip)
        unknown = sorted(skip - {e["path"] for e in manifest["files"]})
        if unknown:
            raise ValueError(f"{uri}: cannot skip {unknown[:3]}: not in {MANIFEST_NAME}")
        with atomic_dir(local_dir) as tmp:
            for entry in manifest["files"]:
                if entry["path"] in skip:
                    continue
                rel = _safe_relpath(entry["path"], uri)
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                key = _join(prefix, rel)
                self._call(f"download s3://{bucket}/{key}", self.client.fget_object, bucket, key, str(dest))
                size, digest = dest.stat().st_size, sha256_file(dest)
                if size != entry["size"] or digest != entry["sha256"]:
                    raise IntegrityError(
                        f"s3://{bucket}/{key}: content does not match {MANIFEST_NAME} "
                        f"(sha256 {digest[:12]}.. size {size}, expected {entry['sha256'][:12]}.. size {entry['size']})"
                    )
            # fget_object leaves no temp files on success, but be sure only manifest files are present.
            listed = {e["path"] for e in manifest["files"]} - skip
            extra = sorted(
                rel for p in tmp.rglob("*") if p.is_file() and (rel := p.relative_to(tmp).as_posix()) not in listed
            )
            if extra:
                raise IntegrityError(f"{uri}: download left unexpected files {extra[:5]}")
        return Path(local_dir)

    # ------------------------------------------------------------------ small objects
    def _put_bytes(self, bucket: str, key: str, data: bytes, content_type: str) -> None:
        self._ensure_bucket(bucket)

        def run():
            return self.client.put_object(bucket, key, io.BytesIO(data), len(data), content_type=content_type)

        self._call(f"put s3://{bucket}/{key}", run)

    def _get_bytes(self, bucket: str, key: str, missing_ok: bool = False) -> bytes | None:
        from minio.error import S3Error

        def run():
            resp = self.client.get_object(bucket, key)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        try:
            return self._call(f"get s3://{bucket}/{key}", run)
        except S3Error as e:
            if missing_ok and e.code in ("NoSuchKey", "NoSuchBucket"):
                return None
            raise

    def put_json(self, uri: str, obj: Any) -> None:
        """Write ``obj`` as JSON to the object ``uri`` (a single PUT: readers see old or new, never half)."""
        bucket, key = parse_s3_uri(uri)
        self._put_bytes(bucket, key, _json_bytes(obj), "application/json")

    def get_json(self, uri: str) -> Any:
        bucket, key = parse_s3_uri(uri)
        data = self._get_bytes(bucket, key, missing_ok=True)
        if data is None:
            raise ObjectStoreError(f"{uri}: no such object")
        try:
            return json.loads(data)
        except json.JSONDecodeError as e:
            raise ObjectStoreError(f"{uri}: not valid JSON ({e})") from e

    def put_file(self, local_path: str | os.PathLike, uri: str) -> None:
        """Upload one file (multipart for large files, by the SDK) with its sha256 as metadata."""
        bucket, key = parse_s3_uri(uri)
        self._ensure_bucket(bucket)
        digest = sha256_file(local_path)
        self._call(f"upload {local_path} to {uri}", self.client.fput_object, bucket, key, str(local_path),
                   metadata={SHA_META: digest})  # fmt: skip

    def get_file(self, uri: str, local_path: str | os.PathLike) -> Path:
        """Download one object to ``local_path`` atomically; checks its sha256 metadata when present."""
        bucket, key = parse_s3_uri(uri)
        st = self._stat(bucket, key)
        if st is None:
            raise ObjectStoreError(f"{uri}: no such object")
        dest = Path(local_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            self._call(f"download {uri}", self.client.fget_object, bucket, key, str(tmp))
            want = _meta(st, SHA_META)
            if want and sha256_file(tmp) != want:
                raise IntegrityError(f"{uri}: content does not match its sha256 metadata")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def exists(self, uri: str) -> bool:
        bucket, key = parse_s3_uri(uri)
        return self._stat(bucket, key) is not None

    def list(self, uri: str) -> list[str]:
        """Full ``s3://`` URIs of every object under the prefix ``uri``, sorted."""
        bucket, prefix = parse_s3_uri(uri)
        return sorted(f"s3://{bucket}/{k}" for k in self._list_keys(bucket, prefix))

    def delete_prefix(self, uri: str) -> int:
        """Delete every object under the prefix ``uri``; returns how many."""
        bucket, prefix = parse_s3_uri(uri)
        if not prefix:
            raise ObjectStoreError(f"{uri}: refusing to delete a whole bucket; give a prefix")
        keys = list(self._list_keys(bucket, prefix))
        if keys:
            self._remove(bucket, keys)
        return len(keys)


def _meta(stat, name: str) -> str | None:
    """User metadata ``name`` from a stat result (header case varies between servers)."""
    want = f"x-amz-meta-{name}".lower()
    for k, v in (stat.metadata or {}).items():
        if k.lower() == want:
            return v
    return None


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()
