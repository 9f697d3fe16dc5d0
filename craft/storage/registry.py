"""Model registry on the object store: immutable versions, aliases (``candidate``, ``production``), history.

Versions and aliases follow MLflow's model registry (and Kubeflow Model Registry's model versions): a
version is immutable, carries its metrics and lineage, and an alias is a movable name for one version.
The pipeline sets ``candidate``; only ``craft promote`` (what CI runs) moves ``production``; rollback
moves it back. An adapter to either registry maps name -> registered model, version -> model version
(our id as a tag), alias -> alias.

Layout under the registry root (``s3://<bucket>`` by default, see :class:`RegistryConfig`)::

    models/<name>/versions/<id>/            one ObjectStore.upload_dir commit (MANIFEST.json written last)
        weights/...                         the model directory as trained (diffusers layout, LoRA, ...)
        metrics.json                        the evaluation metrics the gates read (craft/promote.py)
        lineage.json                        dataset version, config, code version, parent
        MODEL_CARD.md                       human summary: metrics, lineage, intended use
        version.json                        {name, version, created, content_sha256, n_files}
    models/<name>/aliases/<alias>.json      an alias: {alias, version, previous, action, updated, actor, ...}
    models/<name>/history/<ts>-<id>.json    one entry per alias move, never rewritten

A version is refused without lineage naming its dataset version (``lineage.dataset.version``) and a
passed validation (``lineage.validation.ok``): nothing unaudited can reach an alias.

A version id is the first 12 hex digits of the sha256 of its content (weights manifest, metrics,
lineage), so registering the same model twice is a no-op that returns the same id, and an upload
that crashed half-way is finished by the rerun (ObjectStore resumes its staging).

Pointer moves are compare-and-swap (``If-Match`` on the etag read, or ``If-None-Match: *`` for the
first promotion; craft/storage/cas.py): two concurrent movers cannot both win, and the loser gets
:class:`ConcurrentUpdateError` instead of silently overwriting. ``expected_current`` adds a logical
check on top (the CI gate passes the production version it evaluated against, so a pointer that moved
during evaluation is refused). The history entry is written right after the pointer; a crash in
between leaves the pointer correct and the entry missing, and the next move writes it first
(:meth:`Registry._heal_history`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from craft.storage.cas import PreconditionFailed, get_json_etag, put_json_conditional
from craft.storage.objectstore import ObjectStore, ObjectStoreError, local_manifest, parse_s3_uri

WEIGHTS = "weights"
RESERVED = ("metrics.json", "lineage.json", "MODEL_CARD.md", "version.json")
PRODUCTION = "production"
CANDIDATE = "candidate"


class _Any:
    def __repr__(self) -> str:
        return "ANY"


ANY: Any = _Any()  # promote(expected_current=ANY): no expectation about the current production version


@dataclass
class RegistryConfig:
    """Where the registry lives; the store's endpoint and keys come from the storage config and environment."""

    # s3://bucket[/prefix] holding models/<name>/...; "" -> env CRAFT_REGISTRY, else s3://$CRAFT_BUCKET
    # (default bucket "craft")
    root: str = ""

    def validate(self) -> None:
        if self.root:
            parse_s3_uri(self.root)

    def resolved_root(self) -> str:
        root = self.root or os.environ.get("CRAFT_REGISTRY") or f"s3://{os.environ.get('CRAFT_BUCKET') or 'craft'}"
        parse_s3_uri(root)
        return root.rstrip("/")


def open_registry(registry: RegistryConfig | None = None, storage=None) -> Registry:
    """The registry at ``registry.root`` (or env, see RegistryConfig) on the store from ``storage`` + env keys."""
    registry = registry or RegistryConfig()
    registry.validate()
    return Registry(ObjectStore.from_env(storage), registry.resolved_root())


class RegistryError(ObjectStoreError):
    """A registry operation that cannot proceed; the message names the model and version."""


class ConcurrentUpdateError(RegistryError):
    """The production pointer moved under us (another promotion or rollback won)."""


def _now() -> datetime:
    return datetime.now(UTC)


def _check_name(name: str) -> str:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise RegistryError(f"model name {name!r}: use letters, digits, '-', '_' or '.'")
    return name


class Registry:
    """Versions, pointer and history of models under ``root`` on ``store``."""

    def __init__(self, store: ObjectStore, root: str):
        parse_s3_uri(root)
        self.store = store
        self.root = root.rstrip("/")

    # ------------------------------------------------------------------ paths
    def _model(self, name: str) -> str:
        return f"{self.root}/models/{_check_name(name)}"

    def version_uri(self, name: str, version: str) -> str:
        if not version or not all(c in "0123456789abcdef" for c in version):
            raise RegistryError(f"{name}: {version!r} is not a version id (12 hex digits)")
        return f"{self._model(name)}/versions/{version}"

    def alias_uri(self, name: str, alias: str) -> str:
        if not alias or not all(c.isalnum() or c in "-_" for c in alias):
            raise RegistryError(f"{name}: alias {alias!r}: use letters, digits, '-' or '_'")
        return f"{self._model(name)}/aliases/{alias}.json"

    def pointer_uri(self, name: str) -> str:
        """The production alias (the pointer the gates protect)."""
        return self.alias_uri(name, PRODUCTION)

    # ------------------------------------------------------------------ versions
    def register(
        self, name: str, model_dir: str | os.PathLike, metrics: dict[str, Any], lineage: dict[str, Any]
    ) -> str:
        """Upload ``model_dir`` with its metrics and lineage as a new immutable version; return its id."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise RegistryError(f"{model_dir}: model directory does not exist")
        if not isinstance(metrics, dict) or not isinstance(lineage, dict):
            raise RegistryError(f"{name}: metrics and lineage must be JSON objects (dicts)")
        check_lineage(name, lineage)
        files = local_manifest(model_dir)
        if not files:
            raise RegistryError(f"{model_dir}: empty model directory")
        content = json.dumps(
            {"files": files, "metrics": metrics, "lineage": lineage}, sort_keys=True, default=str
        ).encode()
        digest = hashlib.sha256(content).hexdigest()
        version = digest[:12]
        uri = self.version_uri(name, version)
        if self.store.is_committed(uri):
            return version  # the same content was registered before
        record = {
            "name": name,
            "version": version,
            "created": _now().isoformat(timespec="seconds"),
            "content_sha256": digest,
            "n_files": len(files),
            "total_bytes": sum(f["size"] for f in files),
        }
        try:  # beside the model, so that hard links work; else the system temp folder (copies)
            tmp_ctx = tempfile.TemporaryDirectory(prefix=".craft-register-", dir=model_dir.parent)
        except OSError:
            tmp_ctx = tempfile.TemporaryDirectory(prefix="craft-register-")
        with tmp_ctx as tmp:
            stage = Path(tmp) / version
            _link_tree(model_dir, stage / WEIGHTS)
            (stage / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str) + "\n")
            (stage / "lineage.json").write_text(json.dumps(lineage, indent=2, sort_keys=True, default=str) + "\n")
            (stage / "version.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            (stage / "MODEL_CARD.md").write_text(model_card(name, version, metrics, lineage, record))
            self.store.upload_dir(stage, uri)
        return version

    def list_versions(self, name: str) -> list[dict[str, Any]]:
        """Every committed version of ``name`` (its version.json), oldest first."""
        base = f"{self._model(name)}/versions/"
        out = []
        for obj in self.store.list(base.rstrip("/")):
            rest = obj[len(base) :]
            if rest.count("/") == 1 and rest.endswith("/MANIFEST.json"):
                version = rest.split("/")[0]
                out.append(self.store.get_json(f"{base}{version}/version.json"))
        return sorted(out, key=lambda v: (v["created"], v["version"]))

    def get_version(self, name: str, version: str) -> dict[str, Any]:
        """``{version.json fields, "metrics": ..., "lineage": ..., "uri": ...}`` of a committed version."""
        uri = self.version_uri(name, version)
        if not self.store.is_committed(uri):
            raise RegistryError(f"{name}: no committed version {version} under {uri}")
        info = dict(self.store.get_json(f"{uri}/version.json"))
        info["metrics"] = self.store.get_json(f"{uri}/metrics.json")
        info["lineage"] = self.store.get_json(f"{uri}/lineage.json")
        info["uri"] = uri
        return info

    def download(self, name: str, version: str, dest: str | os.PathLike) -> Path:
        """Download version ``version`` (weights + metadata, sha256-verified) into ``dest``; return weights dir."""
        self.store.download_dir(self.version_uri(name, version), dest)
        return Path(dest) / WEIGHTS

    # ------------------------------------------------------------------ aliases
    def get_alias(self, name: str, alias: str) -> dict[str, Any] | None:
        """The alias document of ``name`` or None when it was never set."""
        doc, _ = get_json_etag(self.store, self.alias_uri(name, alias))
        return doc

    def get_production(self, name: str) -> dict[str, Any] | None:
        """The production alias of ``name`` or None when nothing was ever promoted."""
        return self.get_alias(name, PRODUCTION)

    def aliases(self, name: str) -> dict[str, dict[str, Any]]:
        """Every alias of ``name``: {alias: document}."""
        base = f"{self._model(name)}/aliases/"
        return {uri[len(base) : -len(".json")]: self.store.get_json(uri)
                for uri in self.store.list(base.rstrip("/")) if uri.endswith(".json")}  # fmt: skip

    def history(self, name: str) -> list[dict[str, Any]]:
        """Every pointer move of ``name``, oldest first."""
        base = f"{self._model(name)}/history"
        return [self.store.get_json(uri) for uri in self.store.list(base) if uri.endswith(".json")]

    def promote(
        self,
        name: str,
        version: str,
        expected_current: str | None = ANY,
        *,
        actor: str = "",
        reason: str = "",
        details: dict[str, Any] | None = None,
        _action: str = "promote",
    ) -> dict[str, Any]:
        """Point the production alias at ``version`` (see :meth:`set_alias`); what ``craft promote`` calls."""
        return self.set_alias(name, PRODUCTION, version, expected_current, actor=actor, reason=reason,
                              details=details, _action=_action)  # fmt: skip

    def set_alias(
        self,
        name: str,
        alias: str,
        version: str,
        expected_current: str | None = ANY,
        *,
        actor: str = "",
        reason: str = "",
        details: dict[str, Any] | None = None,
        _action: str = "set",
    ) -> dict[str, Any]:
        """Point ``alias`` of ``name`` at ``version``; returns the new alias document.

        ``expected_current``: the version the caller decided against (None: "alias not set yet"); a
        different current version raises :class:`ConcurrentUpdateError`. The write itself is a
        compare-and-swap on the alias object's etag, so a move between our read and our write is
        refused the same way. Every move appends one history entry.
        """
        uri = self.version_uri(name, version)
        if not self.store.is_committed(uri):
            raise RegistryError(f"{name}: cannot set {alias} to {version}: no committed version under {uri}")
        current, etag = get_json_etag(self.store, self.alias_uri(name, alias))
        if current is not None:
            self._heal_history(name, current)
        current_version = current["version"] if current else None
        if expected_current is not ANY and expected_current != current_version:
            raise ConcurrentUpdateError(
                f"{name}: {alias} is {current_version or 'empty'}, expected {expected_current or 'empty'}; "
                f"re-run the gate against the current {alias} model"
            )
        when = _now()
        pointer = {
            "model": name,
            "alias": alias,
            "version": version,
            "previous": current_version,
            "action": _action,
            "updated": when.isoformat(timespec="microseconds"),
            "actor": actor or os.environ.get("GITHUB_ACTOR") or os.environ.get("USER") or "unknown",
            "reason": reason,
            "details": details or {},
        }
        pointer["history_key"] = f"{when.strftime('%Y%m%dT%H%M%S%fZ')}-{alias}-{version}.json"
        try:
            put_json_conditional(self.store, self.alias_uri(name, alias), pointer, if_match=etag)
        except PreconditionFailed as e:
            raise ConcurrentUpdateError(f"{name}: {alias} alias moved while setting it to {version}: {e}") from e
        self._write_history(name, pointer)
        return pointer

    def rollback(self, name: str, to: str | None = None, *, actor: str = "", reason: str = "") -> dict[str, Any]:
        """Move production back to ``to``, or (None) to the last production version before the current one
        that was not itself rolled back; history is kept (a rollback is one more entry)."""
        current = self.get_production(name)
        if current is None:
            raise RegistryError(f"{name}: nothing in production, nothing to roll back")
        if to is None:
            to = self._rollback_target(name, current["version"])
        if to == current["version"]:
            raise RegistryError(f"{name}: {to} is already in production")
        return self.promote(
            name, to, expected_current=current["version"], actor=actor, reason=reason or "rollback", _action="rollback"
        )

    def _rollback_target(self, name: str, current: str) -> str:
        entries = [e for e in self.history(name) if e.get("alias", PRODUCTION) == PRODUCTION]
        rolled_back = {e["previous"] for e in entries if e.get("action") == "rollback" and e.get("previous")}
        rolled_back.add(current)
        for e in reversed(entries):
            if e["version"] not in rolled_back:
                return e["version"]
        raise RegistryError(f"{name}: no earlier production version to roll back to (current {current})")

    def _write_history(self, name: str, pointer: dict[str, Any]) -> None:
        entry = {k: v for k, v in pointer.items() if k != "nonce"}
        try:
            put_json_conditional(self.store, f"{self._model(name)}/history/{pointer['history_key']}", entry)
        except PreconditionFailed:
            pass  # written already (by _heal_history of a concurrent reader); entries are immutable

    def _heal_history(self, name: str, pointer: dict[str, Any]) -> None:
        key = pointer.get("history_key")
        if key and not self.store.exists(f"{self._model(name)}/history/{key}"):
            self._write_history(name, pointer)


def check_lineage(name: str, lineage: dict[str, Any]) -> None:
    """Refuse a version whose lineage does not name its dataset version and a passed validation."""
    dataset = lineage.get("dataset")
    if not isinstance(dataset, dict) or not dataset.get("version"):
        raise RegistryError(f"{name}: lineage has no dataset version (lineage.dataset.version); refusing to register")
    validation = lineage.get("validation")
    if not isinstance(validation, dict) or validation.get("ok") is not True:
        raise RegistryError(
            f"{name}: lineage does not record a passed validation of dataset {dataset.get('name')} "
            f"{dataset['version']} (lineage.validation.ok); refusing to register"
        )


def _link_tree(src: Path, dst: Path) -> None:
    """Mirror ``src`` into ``dst`` with hard links (no copy of large weights), copying across filesystems."""
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        target = dst / rel
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(p, target)
        except OSError:
            shutil.copy2(p, target)


def model_card(name: str, version: str, metrics: dict[str, Any], lineage: dict[str, Any], record: dict) -> str:
    """A short Markdown model card: what it is, how it scored, where it came from."""
    lines = [
        f"# {name} {version}",
        "",
        f"Registered {record['created']} ({record['n_files']} files, {record['total_bytes']} bytes).",
        "",
        "Text-to-image generator trained with the craft pipeline (CRAFTS foundation training and/or CRAFT",
        "clinical reward finetuning). Synthetic images are for research and data augmentation; they are not",
        "diagnostic evidence and must not be shown to clinicians as real cases.",
        "",
        "## Metrics",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key in sorted(metrics):
        value = metrics[key]
        if isinstance(value, (int, float, str, bool)) or value is None:
            lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    lines += ["", "## Lineage", ""]
    for key in sorted(lineage):
        value = lineage[key]
        shown = value if isinstance(value, (str, int, float, bool)) or value is None else json.dumps(value)[:200]
        lines.append(f"- {key}: {shown}")
    return "\n".join(lines) + "\n"
