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
    lineage = {"dataset_version": "abc.dir", "parent": None}
    v1 = registry.register("histo", model, metrics, lineage)
    assert len(v1) == 12
    assert registry.register("histo", model, metrics, lineage) == v1  # idempotent
    v2 = registry.register("histo", make_model(tmp_path / "m2", 2), metrics, lineage)
    assert v2 != v1
    assert [v["version"] for v in registry.list_versions("histo")] in ([v1, v2], [v2, v1])
    assert {v["version"] for v in registry.list_versions("histo")} == {v1, v2}
    info = registry.get_version("histo", v1)
    assert info["metrics"] == metrics and info["lineage"] == lineage
    weights = registry.download("histo", v1, tmp_path / "dl")
    assert (weights / "unet" / "weights.bin").read_bytes() == (model / "unet" / "weights.bin").read_bytes()
    card = (tmp_path / "dl" / "MODEL_CARD.md").read_text()
    assert v1 in card and "cas | 0.61" in card and "dataset_version: abc.dir" in card
    with pytest.raises(RegistryError, match="no committed version"):
        registry.get_version("histo", "0123456789ab")
    with pytest.raises(RegistryError, match="model name"):
        registry.register("../evil", model, metrics, lineage)


def test_promote_rollback_and_history(registry, tmp_path):
    vs = [registry.register("m", make_model(tmp_path / f"m{i}", i), {"cas": i}, {"i": i}) for i in range(3)]
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
    vs = [registry.register("c", make_model(tmp_path / f"c{i}", i), {"cas": i}, {}) for i in range(5)]
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
    vs = [registry.register("h", make_model(tmp_path / f"h{i}", i), {}, {}) for i in range(2)]
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
    v = reg.register("e", make_model(tmp_path / "e", 5), {}, {})
    assert reg.store.is_committed(f"s3://{bucket}/team/models/e/versions/{v}")


def test_registry_config_root(monkeypatch):
    monkeypatch.delenv("CRAFT_REGISTRY", raising=False)
    monkeypatch.setenv("CRAFT_BUCKET", "models-bkt")
    assert RegistryConfig().resolved_root() == "s3://models-bkt"
    monkeypatch.setenv("CRAFT_REGISTRY", "s3://r/p/")
    assert RegistryConfig().resolved_root() == "s3://r/p"
    with pytest.raises(ValueError):
        RegistryConfig(root="/local/path").validate()
