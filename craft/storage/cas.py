"""Conditional writes on an S3 API store: create-if-absent and compare-and-swap on small JSON objects.

S3 (since 2024), MinIO and SeaweedFS honour ``If-None-Match: *`` (create only when the key is absent)
and ``If-Match: <etag>`` (replace only the version we read) on PutObject, answering ``412
PreconditionFailed`` otherwise. That turns one object into a lock or a pointer that concurrent
writers cannot silently overwrite. ``ObjectStore.put_json`` is an unconditional PUT, so these helpers
send the headers through the minio client's PutObject call directly (the public ``put_object`` would
turn them into ``x-amz-meta-*`` user metadata).

A retried request can be ambiguous: the first attempt may have landed and only its answer was lost,
so the retry is refused with 412 although we won. Every document written here therefore carries a
random ``nonce``; after a 412 we read the object back and count the write as ours when the nonce is.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from craft.storage.objectstore import ObjectStore, ObjectStoreError, parse_s3_uri

NONCE = "nonce"


class PreconditionFailed(ObjectStoreError):
    """A conditional write lost: the object exists (create) or changed since it was read (swap)."""


def get_json_etag(store: ObjectStore, uri: str) -> tuple[Any, str | None]:
    """``(document, etag)`` of the JSON object at ``uri``; ``(None, None)`` when it does not exist."""
    from minio.error import S3Error

    bucket, key = parse_s3_uri(uri)

    def run():
        resp = store.client.get_object(bucket, key)
        try:
            return resp.read(), resp.headers.get("ETag", "")
        finally:
            resp.close()
            resp.release_conn()

    try:
        data, etag = store._call(f"get {uri}", run)
    except S3Error as e:
        if e.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject"):
            return None, None
        raise
    try:
        return json.loads(data), etag.strip('"')
    except json.JSONDecodeError as e:
        raise ObjectStoreError(f"{uri}: not valid JSON ({e})") from e


def put_json_conditional(store: ObjectStore, uri: str, doc: dict[str, Any], *, if_match: str | None = None) -> str:
    """Write ``doc`` to ``uri`` only if absent (``if_match=None``) or still at etag ``if_match``.

    Returns the new etag. Raises :class:`PreconditionFailed` when another writer got there first.
    ``doc`` gets a fresh ``nonce`` field (see the module docstring).
    """
    from minio.error import S3Error

    bucket, key = parse_s3_uri(uri)
    doc = dict(doc)
    doc[NONCE] = secrets.token_hex(12)
    body = (json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n").encode()
    headers = {"Content-Type": "application/json"}
    headers.update({"If-Match": f'"{if_match}"'} if if_match else {"If-None-Match": "*"})
    store._ensure_bucket(bucket)
    try:
        result = store._call(f"conditional put {uri}", store.client._put_object, bucket, key, body, headers)
        return result.etag
    except S3Error as e:
        if e.code not in ("PreconditionFailed", "ConditionalRequestConflict"):
            raise
    current, etag = get_json_etag(store, uri)
    if isinstance(current, dict) and current.get(NONCE) == doc[NONCE]:
        return etag or ""  # an earlier attempt of this very call landed; its answer was lost
    what = "exists already" if if_match is None else f"changed since it was read (expected etag {if_match})"
    raise PreconditionFailed(f"{uri}: {what}")
