"""Model registry and conditional writes against a real SeaweedFS S3 server (tests/s3server.py)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from craft.storage.cas import PreconditionFailed, get_json_etag, put_json_conditional
from craft.storage.objectstore import ObjectStore, StorageConfig
from craft.storage.registry import ConcurrentUpdateError, Registry, RegistryConfig, RegistryError

FAST = StorageConfig(retries=2, backoff_s=0.01)


def lineage(dataset_version: str = "0123456789abcdef", **extra) -> dict:
    """The least a version must carry: its dataset version and a passed validation (check_lineage)."""
    return {"dataset": {"name": "d", "version": dataset_version}, "validation": {"ok": True}, **extra}


def make_model(root: Path, seed: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "unet").mkdir(exist_ok=True)
    (root / "unet" / "weights.bin").write_bytes(bytes((seed * 7 + i) % 256 for i in range(4096)))
    (root / "config.json").write_text(json.dumps({"seed": seed}))
    return root


@pytest.fixture
def registry(s3_env) -> Registry:
    bucket = s3_env.make_bucket("reg")
    return Registry(ObjectStore.from_env(FAST), f"s3://{bucket}")


def test_conditional_create_and_swap(registry):
    store = registry.store
    uri = f"{registry.root}/lock.json"
    etag = put_json_conditional(store, uri, {"owner": "a"})
    with pytest.raises(PreconditionFailed):
        put_json_conditional(store, uri, {"owner": "b"})
    doc, got = get_json_etag(store, uri)
    assert doc["owner"] == "a" and got == etag
    new = put_json_conditional(store, uri, {"owner": "c"}, if_match=etag)
    with pytest.raises(PreconditionFailed):  # stale etag
        put_json_conditional(store, uri, {"owner": "d"}, if_match=etag)
    assert get_json_etag(store, uri)[1] == new
    assert get_json_etag(store, f"{registry.root}/absent.json") == (None, None)


def test_only_one_concurrent_creator_wins(registry):
    uri = f"{registry.root}/race.json"
    wins, losses = [], []

    def go(i):
        try:
            put_json_conditional(registry.store, uri, {"owner": i})
            wins.append(i)
        except PreconditionFailed:
            losses.append(i)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(losses) == 7
    assert registry.store.get_json(uri)["owner"] == wins[0]


def test_register_is_content_addressed_and_complete(registry, tmp_path):
    model = make_model(tmp_path / "m1", 1)
    metrics = {"cas": 0.61, "near_duplicates": 0}
    lin = lineage(parent=None)
    v1 = registry.register("histo", model, metrics, lin)
    assert len(v1) == 12
    assert registry.register("histo", model, metrics, lin) == v1  # idempotent
    v2 = registry.register("histo", make_model(tmp_path / "m2", 2), metrics, lin)
    assert v2 != v1
    assert [v["version"] for v in registry.list_versions("histo")] in ([v1, v2], [v2, v1])
    assert {v["version"] for v in registry.list_versions("histo")} == {v1, v2}
    info = registry.get_version("histo", v1)
    assert info["metrics"] == metrics and info["lineage"] == lin
    weights = registry.download("histo", v1, tmp_path / "dl")
    assert (weights / "unet" / "weights.bin").read_bytes() == (model / "unet" / "weights.bin").read_bytes()
    card = (tmp_path / "dl" / "MODEL_CARD.md").read_text()
    assert v1 in card and "cas | 0.61" in card and '"version": "0123456789abcdef"' in card
    with pytest.raises(RegistryError, match="no committed version"):
        registry.get_version("histo", "0123456789ab")
    with pytest.raises(RegistryError, match="model name"):
        registry.register("../evil", model, metrics, lin)


@pytest.mark.parametrize(
    "bad, needle",
    [
        ({"dataset_version": "0123456789abcdef"}, "no dataset version"),  # the old flat key is not enough
        ({"dataset": {"name": "d"}, "validation": {"ok": True}}, "no dataset version"),
        ({"dataset": "0123456789abcdef", "validation": {"ok": True}}, "no dataset version"),
        ({"dataset": {"name": "d", "version": "0123456789abcdef"}}, "passed validation"),
        ({"dataset": {"name": "d", "version": "0123456789abcdef"}, "validation": {"ok": False}}, "passed validation"),
        ({"dataset": {"name": "d", "version": "0123456789abcdef"}, "validation": {"ok": "true"}}, "passed validation"),
    ],
)
def test_register_refuses_unaudited_lineage(registry, tmp_path, bad, needle):
    """No dataset version or no passed validation in the lineage: refused before anything is uploaded."""
    with pytest.raises(RegistryError, match=needle):
        registry.register("audit", make_model(tmp_path / "m", 1), {"cas": 0.6}, bad)
    assert registry.list_versions("audit") == []
    assert registry.store.list(f"{registry.root}/models/audit") == []


def test_candidate_and_production_aliases_are_independent(registry, tmp_path):
    vs = [registry.register("a", make_model(tmp_path / f"a{i}", i), {"cas": i}, lineage()) for i in range(3)]
    assert registry.get_alias("a", "candidate") is None and registry.aliases("a") == {}
    cand = registry.set_alias("a", "candidate", vs[0], expected_current=None, actor="pipeline")
    assert cand["alias"] == "candidate" and cand["action"] == "set" and cand["previous"] is None
    assert registry.get_production("a") is None  # setting the candidate moves nothing else
    registry.promote("a", vs[0], expected_current=None)
    registry.set_alias("a", "candidate", vs[1], expected_current=vs[0])
    registry.set_alias("a", "candidate", vs[2])
    assert registry.get_production("a")["version"] == vs[0]
    assert registry.alias_uri("a", "production") == registry.pointer_uri("a")
    assert registry.pointer_uri("a") == f"{registry.root}/models/a/aliases/production.json"
    assert {k: d["version"] for k, d in registry.aliases("a").items()} == {"candidate": vs[2], "production": vs[0]}
    with pytest.raises(ConcurrentUpdateError, match="candidate is"):
        registry.set_alias("a", "candidate", vs[0], expected_current=vs[1])  # the candidate moved meanwhile
    with pytest.raises(RegistryError, match="alias"):
        registry.set_alias("a", "../production", vs[0])
    with pytest.raises(RegistryError, match="no committed version"):
        registry.set_alias("a", "candidate", "0123456789ab")
    registry.promote("a", vs[1], expected_current=vs[0])
    # every move is in the history with its alias; rollback walks production's moves only
    assert [(h["alias"], h["version"]) for h in registry.history("a")] == [
        ("candidate", vs[0]),
        ("production", vs[0]),
        ("candidate", vs[1]),
        ("candidate", vs[2]),
        ("production", vs[1]),
    ]
    assert registry.rollback("a")["version"] == vs[0]  # not vs[2], the last candidate
    with pytest.raises(RegistryError, match="no earlier production"):
        registry.rollback("a")
    assert registry.get_alias("a", "candidate")["version"] == vs[2]  # a rollback leaves the candidate alone


def test_promote_rollback_and_history(registry, tmp_path):
    vs = [registry.register("m", make_model(tmp_path / f"m{i}", i), {"cas": i}, lineage(i=i)) for i in range(3)]
    assert registry.get_production("m") is None
    with pytest.raises(RegistryError, match="nothing in production"):
        registry.rollback("m")
    registry.promote("m", vs[0], expected_current=None)
    registry.promote("m", vs[1], expected_current=vs[0])
    with pytest.raises(ConcurrentUpdateError, match="expected"):
        registry.promote("m", vs[2], expected_current=vs[0])  # someone evaluated against a stale production
    p = registry.promote("m", vs[2])
    assert p["previous"] == vs[1] and registry.get_production("m")["version"] == vs[2]
    # Rollback walks back the promotion stack: v2 -> v1 -> v0, not a toggle between the last two.
    assert registry.rollback("m")["version"] == vs[1]
    assert registry.rollback("m")["version"] == vs[0]
    with pytest.raises(RegistryError, match="no earlier production"):
        registry.rollback("m")
    assert registry.rollback("m", to=vs[2])["version"] == vs[2]
    hist = registry.history("m")
    assert [(h["action"], h["version"]) for h in hist] == [
        ("promote", vs[0]),
        ("promote", vs[1]),
        ("promote", vs[2]),
        ("rollback", vs[1]),
        ("rollback", vs[0]),
        ("rollback", vs[2]),
    ]
    with pytest.raises(RegistryError, match="no committed version"):
        registry.promote("m", "0123456789ab")


def test_concurrent_promotions_one_winner(registry, tmp_path):
    vs = [registry.register("c", make_model(tmp_path / f"c{i}", i), {"cas": i}, lineage()) for i in range(5)]
    registry.promote("c", vs[0])
    results = {}

    def go(v):
        try:
            registry.promote("c", v, expected_current=vs[0])
            results[v] = "won"
        except ConcurrentUpdateError:
            results[v] = "lost"

    threads = [threading.Thread(target=go, args=(v,)) for v in vs[1:]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [v for v, r in results.items() if r == "won"]
    assert len(winners) == 1, results
    assert registry.get_production("c")["version"] == winners[0]
    assert [h["version"] for h in registry.history("c")] == [vs[0], winners[0]]


def test_history_healed_after_crash_between_pointer_and_entry(registry, tmp_path, monkeypatch):
    vs = [registry.register("h", make_model(tmp_path / f"h{i}", i), {}, lineage()) for i in range(2)]
    monkeypatch.setattr(Registry, "_write_history", lambda self, name, pointer: None)  # "crash" after pointer
    registry.promote("h", vs[0])
    monkeypatch.undo()
    assert registry.history("h") == []
    registry.promote("h", vs[1])
    assert [h["version"] for h in registry.history("h")] == [vs[0], vs[1]]


def test_open_registry_from_environment(s3_env, monkeypatch, tmp_path):
    from craft.storage.registry import open_registry

    bucket = s3_env.make_bucket("env")
    monkeypatch.setenv("CRAFT_REGISTRY", f"s3://{bucket}/team")
    reg = open_registry(storage=FAST)
    assert reg.root == f"s3://{bucket}/team"
    v = reg.register("e", make_model(tmp_path / "e", 5), {}, lineage())
    assert reg.store.is_committed(f"s3://{bucket}/team/models/e/versions/{v}")


def test_registry_config_root(monkeypatch):
    monkeypatch.delenv("CRAFT_REGISTRY", raising=False)
    monkeypatch.setenv("CRAFT_BUCKET", "models-bkt")
    assert RegistryConfig().resolved_root() == "s3://models-bkt"
    monkeypatch.setenv("CRAFT_REGISTRY", "s3://r/p/")
    assert RegistryConfig().resolved_root() == "s3://r/p"
    with pytest.raises(ValueError):
        RegistryConfig(root="/local/path").validate()
