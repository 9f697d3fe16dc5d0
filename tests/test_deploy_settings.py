"""Deployment settings read in code: where the object store is (CRAFT_S3_ENDPOINT / CRAFT_S3_SECURE, no guess),
which MLLM servers a run may name (CRAFT_MLLM_ALLOWED_URLS), which keys an API-key setting may name, and the
code version / image tag (the git sha)."""

from __future__ import annotations

import pytest

from craft.config import ConfigError, check_mllm_url, check_run_overrides, load_stage_config
from craft.storage.objectstore import ObjectStore, ObjectStoreError, StorageConfig, _resolve_endpoint

ENDPOINT_VARS = ("CRAFT_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MINIO_ENDPOINT", "CRAFT_S3_SECURE")


@pytest.fixture
def no_store_env(monkeypatch):
    for name in ENDPOINT_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    ("env", "want"),
    [
        ({"CRAFT_S3_ENDPOINT": "minio-service.kubeflow:9000"}, ("minio-service.kubeflow:9000", False)),
        ({"CRAFT_S3_ENDPOINT": "s3.example.org:443", "CRAFT_S3_SECURE": "true"}, ("s3.example.org:443", True)),
        ({"CRAFT_S3_ENDPOINT": "s3.example.org:9000", "CRAFT_S3_SECURE": "false"}, ("s3.example.org:9000", False)),
        ({"CRAFT_S3_ENDPOINT": "https://s3.example.org"}, ("s3.example.org", True)),
        ({"CRAFT_S3_ENDPOINT": "https://s3.example.org", "CRAFT_S3_SECURE": "TRUE"}, ("s3.example.org", True)),
    ],
)
def test_secure_flag_is_honoured(no_store_env, env, want):
    for k, v in env.items():
        no_store_env.setenv(k, v)
    assert _resolve_endpoint(StorageConfig()) == want


def test_secure_flag_reaches_the_client(no_store_env):
    no_store_env.setenv("AWS_ACCESS_KEY_ID", "k")
    no_store_env.setenv("AWS_SECRET_ACCESS_KEY", "s")
    no_store_env.setenv("CRAFT_S3_ENDPOINT", "s3.example.org:9000")
    no_store_env.setenv("CRAFT_S3_SECURE", "true")
    store = ObjectStore.from_env()
    assert store.cfg.secure is True and store.client._base_url.is_https
    no_store_env.setenv("CRAFT_S3_SECURE", "false")
    assert not ObjectStore.from_env().client._base_url.is_https
    assert (
        StorageConfig(secure=True).secure
        and ObjectStore.from_env(StorageConfig(secure=True)).client._base_url.is_https
    )


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"CRAFT_S3_ENDPOINT": "http://s3.example.org:9000", "CRAFT_S3_SECURE": "true"}, "make them agree"),
        ({"CRAFT_S3_ENDPOINT": "s3.example.org:9000", "CRAFT_S3_SECURE": "maybe"}, "expected true or false"),
    ],
)
def test_secure_flag_contradictions_are_errors(no_store_env, env, match):
    for k, v in env.items():
        no_store_env.setenv(k, v)
    no_store_env.setenv("AWS_ACCESS_KEY_ID", "k")
    no_store_env.setenv("AWS_SECRET_ACCESS_KEY", "s")
    with pytest.raises(ObjectStoreError, match=match):
        ObjectStore.from_env()


def test_no_endpoint_names_the_setting_and_the_configmap(no_store_env):
    # Kubeflow's per-namespace service variables are no longer a way in: they exist only in `kubeflow`.
    no_store_env.setenv("MINIO_SERVICE_SERVICE_HOST", "10.0.0.9")
    no_store_env.setenv("MINIO_SERVICE_SERVICE_PORT", "9000")
    with pytest.raises(ObjectStoreError, match="CRAFT_S3_ENDPOINT") as e:
        _resolve_endpoint(StorageConfig())
    assert "craft-env" in str(e.value)


def test_local_runs_get_their_endpoint_from_the_loopback_store(s3_env):
    # craft demo / the tests: the loopback SeaweedFS hands CRAFT_S3_ENDPOINT to the process (pipelines/local.py)
    store = ObjectStore.from_env()
    assert store.endpoint == s3_env.endpoint and store.cfg.secure is False
    assert store.client.bucket_exists(s3_env.make_bucket()) is True


ALLOWED = "http://vllm.craft.svc:8000/v1, https://api.openai.com/v1"


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("http://vllm.craft.svc:8000/v1", True),
        ("http://VLLM.craft.svc:8000/v1/", True),
        ("https://api.openai.com/v1", True),
        ("https://api.openai.com:443/v1", True),
        ("http://vllm.craft.svc:8000/v1/chat", True),  # below an allowed path
        ("http://vllm.craft.svc:8000/v10", False),  # not a path segment boundary
        ("http://vllm.craft.svc:8001/v1", False),
        ("https://vllm.craft.svc:8000/v1", False),
        ("http://elsewhere.example/v1", False),
        ("http://vllm.craft.svc:8000@elsewhere.example/v1", False),  # user info hiding another host
        ("http://127.0.0.1:8000/v1", False),  # loopback is not special once an allowlist exists
        ("http://vllm.craft.svc:8000/v1/../../x", False),
    ],
)
def test_allowlist_rule(monkeypatch, url, ok):
    monkeypatch.setenv("CRAFT_MLLM_ALLOWED_URLS", ALLOWED)
    if ok:
        check_mllm_url(url, "x", from_override=True)
    else:
        with pytest.raises(ConfigError, match="refused|may not|segment"):
            check_mllm_url(url, "x", from_override=True)


@pytest.mark.parametrize("key", ["annotate.base_url", "dpo.judge_backend.base_url"])
def test_run_override_outside_the_allowlist_is_refused(monkeypatch, key):
    from pipelines.craft_pipeline import pipeline_for_profile

    monkeypatch.setenv("CRAFT_MLLM_ALLOWED_URLS", ALLOWED)
    bad = f"{key}=http://elsewhere.example/v1"
    with pytest.raises(ConfigError, match="not in the deployment's MLLM allowlist"):  # at compile / run creation
        pipeline_for_profile("demo-histo", [bad])
    with pytest.raises(ConfigError, match="not in the deployment's MLLM allowlist"):  # in the pod, at load
        load_stage_config(key.split(".")[0], "demo-histo", [bad, "annotate.backend=openai", "annotate.model=m",
                                                               "dpo.judge=mllm", "dpo.judge_backend.model=m"])  # fmt: skip
    assert check_run_overrides([f"{key}=http://vllm.craft.svc:8000/v1"])  # an allowed server may be chosen


def test_without_allowlist_overrides_may_name_only_loopback(monkeypatch):
    monkeypatch.delenv("CRAFT_MLLM_ALLOWED_URLS", raising=False)
    assert check_run_overrides(
        ["annotate.base_url=http://127.0.0.1:8000/v1", "dpo.judge_backend.base_url=http://localhost:9/v1"]
    )
    with pytest.raises(ConfigError, match="only name a loopback server"):
        check_run_overrides(["annotate.base_url=https://api.openai.com/v1"])
    # a profile's own URL is the reviewed file's choice where no allowlist exists (a workstation)
    assert load_stage_config("annotate", "breakhis").base_url == "http://vllm.craft.svc:8000/v1"


def test_with_allowlist_the_profiles_own_url_is_checked_when_used(monkeypatch):
    monkeypatch.setenv("CRAFT_MLLM_ALLOWED_URLS", "http://vllm.other.svc:8000/v1")
    with pytest.raises(ConfigError, match="annotate.base_url"):
        load_stage_config("annotate", "breakhis")
    # a backend that sends nothing anywhere is not checked: the offline demo keeps working in a cluster
    assert load_stage_config("annotate", "demo-histo").backend == "offline"
    assert load_stage_config("dpo", "demo-histo").judge == "critic"


def test_an_invalid_allowlist_entry_is_an_error(monkeypatch):
    monkeypatch.setenv("CRAFT_MLLM_ALLOWED_URLS", "vllm.craft.svc:8000")
    with pytest.raises(ConfigError, match="CRAFT_MLLM_ALLOWED_URLS entry"):
        check_mllm_url("http://vllm.craft.svc:8000/v1", "x")


@pytest.mark.parametrize("name", ["AWS_SECRET_ACCESS_KEY", "aws_access_key_id", "MINIO_ROOT_PASSWORD", "secretkey",
                                  "KFP_TOKEN", "AWS_SESSION_TOKEN"])  # fmt: skip
def test_api_key_env_may_not_name_a_store_key_even_in_a_profile(tmp_path, name):
    profile = tmp_path / "p.yaml"
    profile.write_text(f"annotate:\n  api_key_env: {name}\ndpo:\n  judge_backend:\n    api_key_env: MLLM_API_KEY\n")
    with pytest.raises(ConfigError, match="names an object-store or Kubeflow credential"):
        load_stage_config("annotate", str(profile))
    profile.write_text(f"dpo:\n  judge_backend:\n    api_key_env: {name}\n")
    with pytest.raises(ConfigError, match="dpo.judge_backend.api_key_env"):
        load_stage_config("dpo", str(profile))
    assert load_stage_config("annotate", "breakhis").api_key_env == "MLLM_API_KEY"


def test_code_version_is_the_baked_git_sha(monkeypatch):
    from craft import version
    from craft.models import diffusion

    sha = "3f2a9c0d1e4b5a6978877665544332211ffeeddc"
    monkeypatch.setenv("CRAFT_GIT_SHA", sha)
    version.code_version.cache_clear()
    try:
        assert version.code_version() == sha == diffusion.code_version()  # what save_pipeline records
        monkeypatch.setenv("CRAFT_GIT_SHA", "unknown")  # an image built without VCS_REF
        version.code_version.cache_clear()
        assert version.code_version().startswith("unknown:")
    finally:
        version.code_version.cache_clear()


def test_images_are_tagged_by_the_code_sha(monkeypatch):
    import importlib

    from craft import version

    for var in ("CRAFT_IMAGE_CPU", "CRAFT_IMAGE_GPU", "CRAFT_IMAGE_REGISTRY", "CRAFT_IMAGE_TAG"):
        monkeypatch.delenv(var, raising=False)
    sha = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("CRAFT_GIT_SHA", sha)
    version.code_version.cache_clear()
    try:
        images = importlib.reload(importlib.import_module("components.images"))
        assert images.CPU_IMAGE == f"ghcr.io/craft-ml/craft-cpu:{sha}" and images.GPU_IMAGE.endswith(f":{sha}")
        monkeypatch.setenv("CRAFT_GIT_SHA", "not-a-sha")
        version.code_version.cache_clear()
        with pytest.raises(RuntimeError, match="CRAFT_IMAGE_TAG"):
            importlib.reload(images)
        monkeypatch.setenv("CRAFT_IMAGE_TAG", "v1-pinned")
        assert importlib.reload(images).CPU_IMAGE.endswith(":v1-pinned")
    finally:
        version.code_version.cache_clear()
        monkeypatch.delenv("CRAFT_GIT_SHA")
        monkeypatch.delenv("CRAFT_IMAGE_TAG")
        importlib.reload(importlib.import_module("components.images"))
