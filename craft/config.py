"""Profiles and stage configs: YAML profile + dotted `key=value` overrides -> one dataclass per stage.

A profile (``configs/<name>.yaml``) has one top-level section per stage, named as in ``STAGES``.
Each stage owns a dataclass that lives beside the code that uses it; this module only turns
YAML and command-line overrides into an instance of it, strictly: an unknown key or a value of
the wrong type is refused with the offending key named.

>>> from dataclasses import dataclass
>>> @dataclass
... class Toy:
...     steps: int = 10
...     lr: float = 1e-3
>>> from_dict(Toy, {"steps": 5}, where="toy")
Toy(steps=5, lr=0.001)
"""

from __future__ import annotations

import dataclasses
import importlib
import ipaddress
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union
from urllib.parse import urlsplit

import yaml

# Stage name -> "module:Dataclass". Imported lazily so that reading a profile never pulls torch.
STAGES: dict[str, str] = {
    "pipeline": "craft.plan:PipelinePlan",
    "data": "craft.data.demo:DemoConfig",
    "import": "craft.data.importers:ImportConfig",
    "validate": "craft.data.validate:ValidateConfig",
    "annotate": "craft.annotate.run:AnnotateConfig",
    "storage": "craft.storage.objectstore:StorageConfig",
    "encoders": "craft.models.encoders:EncodersConfig",
    "encoder": "craft.train.encoder:EncoderTrainConfig",
    "probe": "craft.train.probe:ProbeConfig",
    "registry": "craft.storage.registry:RegistryConfig",
    "gates": "craft.promote:GatesConfig",
    "retrain": "craft.retrain:RetrainConfig",
    "controlnet": "craft.train.controlnet:ControlNetConfig",
    "import_paired": "craft.data.paired:PairedImportConfig",
    "evaluate": "craft.evaluate.run:EvaluateConfig",
    "pretrain": "craft.train.crafts:PretrainConfig",
    "finetune": "craft.train.crafts:FinetuneConfig",
    "reward": "craft.train.reward:RewardConfig",
    "ti": "craft.train.baselines:TIConfig",
    "ti_lora": "craft.train.baselines:TILoRAConfig",
    "dpo": "craft.train.baselines:DPOConfig",
    # per-step GPUs, CPU, memory, disk, timeouts and multi-node scale-out; compiled into the pipeline's pods
    "resources": "craft.launch:ResourcesConfig",
}

# Top-level profile keys that are not stages.
PROFILE_META_KEYS = ("description", "extends")

REPO_ROOT = Path(__file__).resolve().parents[1]


# Exit status of a stage or command refused for bad input or config (ConfigError, BadInput): retrying cannot
# help, the message names the fix. Unexpected errors exit 1 with a traceback (craft.cli.main).
EXIT_BAD_INPUT = 2


class BadInput(ValueError):
    """Input or configuration that no retry can fix (a missing caption, a modality without a schema, ...).

    The message names what is missing and the override or import flag that provides it. The CLI exits
    ``EXIT_BAD_INPUT`` on it; the pipeline runs these checks in its validate step, which is never retried
    (craft.plan.check_plan, pipelines/resources.py).
    """


class ConfigError(BadInput):
    """A profile or override that cannot become a valid stage config; the message names the key."""


def config_dir() -> Path:
    """Folder holding the bundled profiles: ``$CRAFT_CONFIG_DIR`` or ``<repo>/configs``."""
    return Path(os.environ.get("CRAFT_CONFIG_DIR", REPO_ROOT / "configs"))


def resolve_profile(name_or_path: str | os.PathLike) -> Path:
    """A profile path from a bundled name (``demo-histo``) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    for cand in (config_dir() / f"{name_or_path}.yaml", config_dir() / f"{name_or_path}"):
        if cand.is_file():
            return cand
    known = sorted(x.stem for x in config_dir().glob("*.yaml"))
    raise ConfigError(f"profile {str(name_or_path)!r} not found (bundled profiles: {', '.join(known)})")


def load_profile(name_or_path: str | os.PathLike | None) -> dict[str, Any]:
    """Read a profile into a dict of stage sections, following ``extends:`` and refusing unknown stages."""
    if name_or_path is None or str(name_or_path) == "":
        return {}
    path = resolve_profile(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a profile must be a mapping of stage sections")
    parent = data.pop("extends", None)
    data.pop("description", None)
    for key, section in data.items():
        if key not in STAGES:
            raise ConfigError(f"{path}: unknown stage section {key!r} (known: {', '.join(sorted(STAGES))})")
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: section {key!r} must be a mapping")
    if parent:
        base = load_profile(parent)
        for key, section in data.items():
            base[key] = _deep_merge(base.get(key, {}), section)
        data = base
    return data


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def stage_class(stage: str) -> type:
    """The dataclass registered for ``stage``."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r} (known: {', '.join(sorted(STAGES))})")
    module, _, name = STAGES[stage].partition(":")
    return getattr(importlib.import_module(module), name)


# Run-form overrides may never touch these (DESIGN.md, "The loop users live in"): the promotion gates and
# the registry come from reviewed files (configs/gates.yaml, the profile), and a field naming the
# environment variable a secret is read from (``*_env``) would let a run send a key elsewhere.
PROTECTED_STAGES = ("gates", "registry")
SECRET_ENV_SUFFIX = "_env"


def protected_override(item: str) -> str | None:
    """Why a pipeline-wide override ``item`` is refused, or None when it may be applied.

    >>> protected_override("gates.cas.absolute=0")
    "names the promotion gates ('gates.*'), which come from the reviewed gates file"
    >>> protected_override("reward.loop.steps=10") is None
    True
    """
    key = item.partition("=")[0].strip()
    parts = key.split(".")
    if parts[0] == "gates":
        return "names the promotion gates ('gates.*'), which come from the reviewed gates file"
    if parts[0] == "registry":
        return "names the model registry ('registry.*'), which comes from the profile and the environment"
    if parts[-1].endswith(SECRET_ENV_SUFFIX):
        return f"names the environment variable a secret is read from ({parts[-1]!r})"
    return None


def check_run_overrides(overrides: typing.Iterable[str], where: str = "override") -> list[str]:
    """Refuse pipeline-wide overrides that could weaken the gates or redirect the registry, a secret or the MLLM.

    Called when the pipeline is compiled, when a run or schedule is created, and by every step at run
    time (``load_stage_config``), so a run form cannot switch a gate off. A ``*.base_url`` override (the MLLM
    server of ``annotate`` or of the DPO judge, which receives images and an API key) must name a server of
    the deployment's allowlist, :func:`check_mllm_url`. Returns the overrides as a list.
    """
    items = list(overrides or [])
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"{where} {item!r} is not of the form stage.key=value")
        why = protected_override(item)
        if why:
            raise ConfigError(f"{where} {item!r} refused: it {why}")
        key, _, value = item.partition("=")
        if key.strip().split(".")[-1] == MLLM_URL_FIELD:
            check_mllm_url(value.strip(), f"{where} {item!r}", from_override=True)
    return items


# ---------------------------------------------------------------- MLLM servers and the keys they may see
# The deployment's allowlist of MLLM base URLs (the ConfigMap craft-env sets it in every pipeline pod; k8s/).
MLLM_ALLOWLIST_ENV = "CRAFT_MLLM_ALLOWED_URLS"
MLLM_URL_FIELD = "base_url"
# The MLLM servers a stage talks to when its config uses them: (setting, URL) pairs. Only these leave the
# cluster with images and an API key; a base_url of a backend that is not used is not a destination.
MLLM_URLS: dict[str, typing.Callable[[Any], list[tuple[str, str]]]] = {
    "annotate": lambda c: [("annotate.base_url", c.base_url)] if c.backend == "openai" else [],
    "dpo": lambda c: (
        [("dpo.judge_backend.base_url", c.judge_backend.base_url)]
        if c.judge == "mllm" and c.judge_backend.backend == "openai"
        else []
    ),
}
# Environment variables that hold object-store or KFP credentials: no ``*_env`` setting may name one, from a
# profile or anywhere else (``annotate.api_key_env=AWS_SECRET_ACCESS_KEY`` would send the store's secret key
# to the MLLM server as a bearer token).
STORE_SECRET_ENV = frozenset({
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD",
    "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY", "ACCESSKEY", "SECRETKEY", "KFP_TOKEN",
})  # fmt: skip
STORE_SECRET_PREFIXES = ("AWS_", "MINIO_")


def mllm_allowlist() -> list[str] | None:
    """The base URLs of ``CRAFT_MLLM_ALLOWED_URLS`` (comma or space separated); None when it is unset or empty."""
    raw = os.environ.get(MLLM_ALLOWLIST_ENV, "").strip()
    if not raw:
        return None
    entries = [e for e in re.split(r"[,\s]+", raw) if e]
    for e in entries:
        _url_parts(e, f"{MLLM_ALLOWLIST_ENV} entry {e!r}")
    return entries


def _url_parts(url: str, where: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path without trailing slash) of an http(s) base URL; anything unusual is refused.

    >>> _url_parts("http://VLLM.craft.svc:8000/v1/", "x")
    ('http', 'vllm.craft.svc', 8000, '/v1')
    """
    if not isinstance(url, str) or not url or any(ch.isspace() or ch == "\\" for ch in url):
        raise ConfigError(f"{where}: {url!r} is not a URL")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"{where}: {url!r} is not a valid URL ({e})") from e
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: {url!r} must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        raise ConfigError(f"{where}: {url!r} may not carry user info, a query or a fragment")
    path = parts.path.rstrip("/")
    if any(seg in ("", ".", "..") for seg in path.split("/")[1:]):
        raise ConfigError(f"{where}: {url!r} has an empty, '.' or '..' path segment")
    return parts.scheme, parts.hostname.lower(), port or (443 if parts.scheme == "https" else 80), path


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_mllm_url(url: str, where: str, *, from_override: bool = False) -> None:
    """Refuse an MLLM base URL the deployment does not allow (the rule of docs/DEPLOY.md, "MLLM servers").

    With ``CRAFT_MLLM_ALLOWED_URLS`` set (every pipeline pod and the CronJob get it from the ConfigMap
    craft-env): the URL must have an entry's scheme, host and port, and its path must be the entry's path or
    below it. Without an allowlist (a workstation, ``craft demo``, the tests): a run override may only name a
    loopback server (a local vLLM or a test double), while a profile's own URL is the reviewed file's choice.

    >>> check_mllm_url("http://127.0.0.1:8000/v1", "override", from_override=True)  # no allowlist: loopback ok
    """
    scheme, host, port, path = _url_parts(url, where)
    allowed = mllm_allowlist()
    if allowed is None:
        if from_override and not _is_loopback(host):
            raise ConfigError(
                f"{where} refused: MLLM base URLs come from the deployment's allowlist ({MLLM_ALLOWLIST_ENV}), "
                "and none is configured here, so a run override may only name a loopback server"
            )
        return
    for entry in allowed:
        e_scheme, e_host, e_port, e_path = _url_parts(entry, MLLM_ALLOWLIST_ENV)
        if (scheme, host, port) == (e_scheme, e_host, e_port) and (path == e_path or path.startswith(e_path + "/")):
            return
    raise ConfigError(
        f"{where} refused: {url!r} is not in the deployment's MLLM allowlist {MLLM_ALLOWLIST_ENV}="
        f"{' '.join(allowed)!r} (set it in the overlay's ConfigMap craft-env, not in a run)"
    )


def check_secret_env_names(cfg: Any, where: str) -> None:
    """Refuse any ``*_env`` field of ``cfg`` (nested configs included) that names an object-store or KFP key."""
    if not dataclasses.is_dataclass(cfg):
        return
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        here = _join(where, f.name)
        if f.name.endswith(SECRET_ENV_SUFFIX) and isinstance(value, str):
            name = value.strip().upper()
            if name in STORE_SECRET_ENV or name.startswith(STORE_SECRET_PREFIXES):
                raise ConfigError(
                    f"{here}: {value!r} names an object-store or Kubeflow credential; an API key setting must name "
                    "its own variable (MLLM_API_KEY in the cluster), or that key would be sent to another server"
                )
        elif dataclasses.is_dataclass(value):
            check_secret_env_names(value, here)


def load_stage_config(stage: str, profile: str | os.PathLike | None = None, overrides: typing.Iterable[str] = ()):
    """Build ``stage``'s dataclass from a profile section and ``key=value`` overrides.

    Overrides are relative to the stage (``n=200``, ``optim.lr=1e-4``); a qualified override
    for another stage (``train.lr=...`` while loading ``data``) is skipped, and one qualified with
    this stage's own name (``data.n=200``) applies. This lets one pipeline-wide override list feed
    every stage. An override qualified with ``gates.`` or ``registry.``, or setting a ``*_env`` field, is
    refused (:func:`check_run_overrides`): those come from reviewed files, never from a run form.
    """
    cls = stage_class(stage)
    section = dict(load_profile(profile).get(stage, {}))
    field_names = {f.name for f in dataclasses.fields(cls)}
    # mapping fields (e.g. reward.reward_weights): a dotted override changes ONE entry of the default
    # mapping (``reward_weights.vdc=0`` keeps ccs/dd/sfs); a mapping written in the profile replaces it whole
    dict_defaults = {f.name: d for f in dataclasses.fields(cls) if f.default_factory is not dataclasses.MISSING
                     and isinstance(d := f.default_factory(), dict)}  # fmt: skip
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        first = key.split(".", 1)[0]
        if first in PROTECTED_STAGES or key.split(".")[-1].endswith(SECRET_ENV_SUFFIX):
            # qualified gates.* / registry.* / *_env: refused wherever they appear, whichever stage loads
            check_run_overrides([item])
        if first == stage and first not in field_names:
            key = key.split(".", 1)[1]
        elif first in STAGES and first not in field_names:
            continue  # belongs to another stage
        parts = key.split(".")
        if len(parts) > 1 and parts[0] in dict_defaults and parts[0] not in section:
            section[parts[0]] = dict(dict_defaults[parts[0]])
        _set_dotted(section, parts, _RawValue(raw))
    cfg = from_dict(cls, section, where=stage)
    check_secret_env_names(cfg, stage)
    if stage in MLLM_URLS and mllm_allowlist() is not None:
        # in a deployment every MLLM server a step talks to is an allowed one, whoever named it
        for setting, url in MLLM_URLS[stage](cfg):
            check_mllm_url(url, setting)
    return cfg


class _RawValue(str):
    """An override's text, parsed against the target field's type in ``_coerce``."""


def _set_dotted(d: dict, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override key {'.'.join(keys)!r}: {k!r} is not a section")
    d[keys[-1]] = value


def from_dict(cls: type, data: dict[str, Any] | None, where: str = "") -> Any:
    """Strictly build dataclass ``cls`` from ``data``: unknown keys and wrong types raise ConfigError."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{_join(where, unknown[0])}: unknown key (valid keys for {where or cls.__name__}: {', '.join(sorted(fields))})"
        )
    kwargs = {name: _coerce(hints[name], value, _join(where, name)) for name, value in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from e
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            check()
        except ValueError as e:
            raise ConfigError(f"{where or cls.__name__}: {e}") from e
    return obj


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _parse_raw(value: Any) -> Any:
    if isinstance(value, _RawValue):
        try:
            return yaml.safe_load(str(value)) if str(value) != "" else ""
        except yaml.YAMLError:
            return str(value)
    return value


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return _parse_raw(value)
    if origin in (Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        parsed = _parse_raw(value)
        if parsed is None or (isinstance(value, _RawValue) and str(value).lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: may not be null")
        errors = []
        for a in non_none:
            try:
                return _coerce(a, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is Literal:
        parsed = str(value) if isinstance(value, _RawValue) else value
        if parsed not in args:
            raise ConfigError(f"{key}: {parsed!r} is not one of {', '.join(map(repr, args))}")
        return parsed
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {_parse_raw(value)!r}")
        return from_dict(tp, value, where=key)
    if tp is str:
        if isinstance(value, _RawValue):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{key}: expected a path, got {value!r}")
        return Path(str(value))
    value = _parse_raw(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string; a number field takes it
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if origin in (list, tuple):
        if isinstance(value, str):  # "a,b,c" from the command line: each item parsed against the item type
            value = [_RawValue(v.strip()) for v in value.split(",") if v.strip() != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(kt, k, key): _coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain YAML-safe data (for lineage files and logs)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return conv(cfg)
