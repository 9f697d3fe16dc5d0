"""The scoped object-store identities of k8s/object-store do what docs/DEPLOY.md says, on a real store.

One access table (identity, operation, key, allowed) is checked twice: against SeaweedFS (Kubeflow's store
since KFP 2.16) started with k8s/object-store/seaweedfs/identities.json, where every request is made with that
identity's keys and the server decides; and against the MinIO policy documents of k8s/object-store/minio by
evaluating their statements (no MinIO server can run here). The craft code paths the identities exist for
(a registry version + candidate alias, a validation record, a retrain claim, a promotion) run under them too.
"""

from __future__ import annotations

import fnmatch
import io
import json
import secrets
import subprocess
from pathlib import Path

import pytest

from craft.storage import seaweed

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ROOT / "k8s" / "object-store"
IDENTITIES = ("craft-s3-reader", "craft-s3-writer", "craft-s3-scheduler", "craft-s3-promoter")

# (identity, operation, key in bucket craft, allowed)
TABLE = [
    ("craft-s3-reader", "get", "datasets/histo/abc/manifest.parquet", True),
    ("craft-s3-reader", "get", "models/m/versions/v1/MANIFEST.json", True),
    ("craft-s3-reader", "get", "validations/histo/abc.json", True),
    ("craft-s3-reader", "put", "datasets/histo/abc/x.png", False),
    ("craft-s3-reader", "put", "validations/histo/abc.json", False),
    ("craft-s3-reader", "put", "models/m/aliases/candidate.json", False),
    ("craft-s3-reader", "get", "checkpoints/run/task/step-1/w.safetensors", False),
    ("craft-s3-writer", "put", "validations/histo/abc.json", True),
    ("craft-s3-writer", "put", "checkpoints/run/task/step-1/w.safetensors", True),
    ("craft-s3-writer", "get", "checkpoints/run/task/step-1/w.safetensors", True),
    ("craft-s3-writer", "put", "models/m/versions/v1/unet/w.safetensors", True),
    ("craft-s3-writer", "delete", "models/m/versions/v1/unet/w.safetensors", True),
    ("craft-s3-writer", "put", "models/m/aliases/candidate.json", True),
    ("craft-s3-writer", "put", "models/m/history/20261202T030000000000Z-candidate-v1.json", True),
    ("craft-s3-writer", "put", "models/m/aliases/production.json", False),
    ("craft-s3-writer", "put", "models/m/history/20261202T030000000000Z-production-v1.json", False),
    ("craft-s3-writer", "put", "models/m/retrain/abc.json", False),
    ("craft-s3-writer", "put", "datasets/histo/abc/x.png", False),
    ("craft-s3-scheduler", "put", "models/m/retrain/abc.json", True),
    ("craft-s3-scheduler", "get", "validations/histo/abc.json", True),
    ("craft-s3-scheduler", "put", "models/m/aliases/candidate.json", False),
    ("craft-s3-scheduler", "put", "validations/histo/abc.json", False),
    ("craft-s3-promoter", "put", "models/m/aliases/production.json", True),
    ("craft-s3-promoter", "put", "models/m/history/20261202T030000000000Z-production-v1.json", True),
    ("craft-s3-promoter", "put", "models/m/versions/v2/unet/w.safetensors", False),
    ("craft-s3-promoter", "put", "datasets/histo/abc/x.png", False),
]
ACTIONS = {"get": "s3:GetObject", "put": "s3:PutObject", "delete": "s3:DeleteObject"}


def _minio_allows(policy: dict, action: str, resource: str) -> bool:
    """IAM evaluation for Allow-only policies: some statement names the action and a matching resource."""
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow", "the shipped policies only allow"
        acts = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        res = [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]
        if action in acts and any(fnmatch.fnmatchcase(resource, r) for r in res):
            return True
    return False


def test_minio_policies_follow_the_table():
    for ident in IDENTITIES:
        policy = json.loads((POLICIES / "minio" / f"{ident}.json").read_text())
        assert policy["Version"] == "2012-10-17"
        assert _minio_allows(policy, "s3:ListBucket", "arn:aws:s3:::craft"), ident  # HeadBucket, list prefixes
        for st in policy["Statement"]:
            for r in [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]:
                assert r == "arn:aws:s3:::craft" or r.startswith("arn:aws:s3:::craft/"), f"{ident}: {r}"
    for ident, op, key, allowed in TABLE:
        policy = json.loads((POLICIES / "minio" / f"{ident}.json").read_text())
        got = _minio_allows(policy, ACTIONS[op], f"arn:aws:s3:::craft/{key}")
        assert got is allowed, f"{ident} {op} {key}: allowed={got}, want {allowed}"


def test_seaweedfs_identities_match_the_minio_policies():
    """One rule set in two grammars: every identity has the same read and write resources in both files."""
    sw = {i["name"]: i for i in json.loads((POLICIES / "seaweedfs" / "identities.json").read_text())["identities"]}
    assert set(sw) == set(IDENTITIES)
    for ident in IDENTITIES:
        assert sw[ident]["credentials"] == [], f"{ident}: keys never live in git"
        policy = json.loads((POLICIES / "minio" / f"{ident}.json").read_text())
        want = {"List:craft"}
        for st in policy["Statement"]:
            kind = {"s3:GetObject": "Read", "s3:PutObject": "Write"}
            for action, prefix in kind.items():
                if action in st["Action"]:
                    want |= {f"{prefix}:{r.removeprefix('arn:aws:s3:::')}" for r in st["Resource"]}
        assert set(sw[ident]["actions"]) == want, ident


@pytest.fixture(scope="module")
def scoped_store(tmp_path_factory):
    """SeaweedFS with the shipped identities (fresh keys each) plus an admin; yields (endpoint, {name: keys})."""
    try:
        weed = seaweed.find_weed()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    root = tmp_path_factory.mktemp("scoped-s3")
    config = json.loads((POLICIES / "seaweedfs" / "identities.json").read_text())
    keys = {"admin": ("admin" + secrets.token_hex(6), secrets.token_hex(20))}
    for ident in config["identities"]:
        keys[ident["name"]] = (ident["name"].replace("-", "")[:12] + secrets.token_hex(4), secrets.token_hex(20))
        ident["credentials"] = [{"accessKey": keys[ident["name"]][0], "secretKey": keys[ident["name"]][1]}]
    config["identities"].append({"name": "admin", "credentials": [
        {"accessKey": keys["admin"][0], "secretKey": keys["admin"][1]}], "actions": ["Admin", "Read", "Write", "List"]})  # fmt: skip
    (root / "s3.json").write_text(json.dumps(config))
    ports = seaweed._free_ports()
    args = [weed, "mini", f"-dir={root / 'data'}", *seaweed.ALWAYS_FLAGS, *seaweed.OFF_FLAGS,
            *(f"-{k}={v}" for k, v in ports.items()), f"-s3.config={root / 's3.json'}"]  # fmt: skip
    (root / "data").mkdir()
    env = {"PATH": "/usr/bin:/bin", "AWS_ACCESS_KEY_ID": keys["admin"][0], "AWS_SECRET_ACCESS_KEY": keys["admin"][1]}
    with open(root / "weed.log", "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    server = seaweed.S3Server(f"127.0.0.1:{ports['s3.port']}", *keys["admin"], proc, root, root / "weed.log", ports)
    try:
        import time

        deadline = time.monotonic() + seaweed.START_TIMEOUT_S
        while not seaweed._ready(server):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"weed with the shipped identities did not start:\n{server.log_tail()}", pytrace=False)
            time.sleep(0.2)
        server.client().make_bucket("craft")  # the administrator creates the bucket (docs/DEPLOY.md section 4)
        yield server.endpoint, keys
    finally:
        server.stop()


def _client(endpoint, keys):
    from minio import Minio

    return Minio(endpoint, *keys, secure=False, region="us-east-1")


def test_seaweedfs_enforces_the_table(scoped_store):
    from minio.error import S3Error

    endpoint, keys = scoped_store
    admin = _client(endpoint, keys["admin"])
    for _, op, key, _ in TABLE:
        if op in ("get", "delete"):
            admin.put_object("craft", key, io.BytesIO(b"x"), 1)
    for ident, op, key, allowed in TABLE:
        c = _client(endpoint, keys[ident])
        try:
            if op == "get":
                c.get_object("craft", key).read()
            elif op == "put":
                c.put_object("craft", key, io.BytesIO(b"y"), 1)
            else:
                c.remove_object("craft", key)
            got = True
        except S3Error as e:
            assert e.code == "AccessDenied", f"{ident} {op} {key}: {e.code}"
            got = False
        assert got is allowed, f"{ident} {op} {key}: allowed={got}, want {allowed}"


def test_craft_code_paths_run_under_their_identities(scoped_store, monkeypatch, tmp_path):
    """What each identity is for works through craft's own code, and the next step up is refused."""
    from craft.storage import datasets
    from craft.storage.objectstore import CredentialsError, ObjectStore, StorageConfig
    from craft.storage.registry import Registry

    endpoint, keys = scoped_store

    def store(ident):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", keys[ident][0])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", keys[ident][1])
        return ObjectStore.from_env(StorageConfig(endpoint=endpoint, retries=0))

    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "w.safetensors").write_bytes(b"w" * 64)
    (model / "lineage.json").write_text("{}")
    writer = Registry(store("craft-s3-writer"), "s3://craft")
    uri = datasets.record_validation(writer.store, writer.root, "histo", "abc123", {"passed": True})
    assert uri.startswith("s3://craft/validations/")
    lineage = {"dataset": {"name": "histo", "version": "abc123"}, "validation": {"ok": True, "uri": uri}}
    version = writer.register("cxr", model, metrics={}, lineage=lineage)
    writer.set_alias("cxr", "candidate", version, actor="register", reason="gates passed")
    assert writer.get_alias("cxr", "candidate")["version"] == version
    with pytest.raises(CredentialsError, match="AccessDenied"):
        writer.promote("cxr", version, actor="ci", reason="not the writer's to do")

    reader = Registry(store("craft-s3-reader"), "s3://craft")
    assert reader.get_alias("cxr", "candidate")["version"] == version
    reader.download("cxr", version, tmp_path / "dl")
    with pytest.raises(CredentialsError, match="scoped identity"):
        reader.register("cxr", model, metrics={"other": 1}, lineage=lineage)

    promoter = Registry(store("craft-s3-promoter"), "s3://craft")
    promoter.promote("cxr", version, actor="ci", reason="gates passed")
    assert reader.get_production("cxr")["version"] == version
