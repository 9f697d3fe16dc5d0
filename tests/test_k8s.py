"""Offline checks of everything that ships to a cluster: kustomize renders, strict schema validation,
pod security, RBAC scope, Secrets without values, the per-profile retraining CronJob that
`craft pipeline schedule` renders, and hadolint on the Dockerfiles.

No cluster and no Docker engine can run here (ENVIRONMENT.md), so the real tools do the checking:
`kubectl kustomize`, kubernetes-validate (strict: unknown fields are errors) and hadolint.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
BIN = Path(sys.prefix) / "bin"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
# Oldest and newest Kubernetes minors we claim to support (CronJob timeZone is GA since 1.27).
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod"}


def _tool(name: str) -> str:
    path = BIN / name
    if path.is_file():
        return str(path)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found in {BIN} or on PATH (pinned in pyproject.toml [dev])", pytrace=False)
    return found


def render(path: Path) -> list[dict]:
    out = subprocess.run(
        [_tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert docs, f"{path} rendered nothing"
    return docs


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS}


def pod_specs(doc: dict) -> list[dict]:
    kind = doc["kind"]
    if kind == "Pod":
        return [doc["spec"]]
    if kind == "CronJob":
        return [doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    if kind in POD_KINDS:
        return [doc["spec"]["template"]["spec"]]
    return []


# overlay -> (craft's own namespace: the CronJob; the namespace the pipeline pods run in)
NAMESPACES = {
    "standalone": ("craft", "kubeflow"),
    "multi-user": ("craft", "craft-team"),
    "dev": ("craft-dev", "kubeflow"),
}


def test_overlays_exist():
    assert set(NAMESPACES) == set(OVERLAYS)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_overlay_validates_strictly(rendered, version):
    for name, docs in rendered.items():
        for doc in docs:
            if doc["apiVersion"] == "kubeflow.org/v1":
                assert doc["kind"] == "Profile", doc["kind"]  # no schema ships for Kubeflow's CRDs (the CLI warns)
                continue
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"overlay {name}: {doc['kind']}/{doc['metadata']['name']} invalid for {version}: {e}")


def test_cli_validator_strict_on_rendered_files(rendered, tmp_path):
    # The same check as a user would run it: the kubernetes-validate CLI with --strict.
    for name, docs in rendered.items():
        f = tmp_path / f"{name}.yaml"
        f.write_text(yaml.safe_dump_all(docs))
        out = subprocess.run(
            [_tool("kubernetes-validate"), "--strict", "--quiet", str(f)], capture_output=True, text=True, check=False
        )
        assert out.returncode == 0, f"{name}: {out.stdout}{out.stderr}"


def test_strict_validation_catches_an_unknown_field(rendered):
    # Guard against a validator that accepts anything: a typo'd field must fail.
    cron = next(d for d in rendered["standalone"] if d["kind"] == "CronJob")
    bad = yaml.safe_load(yaml.safe_dump(cron))
    bad["spec"]["concurencyPolicy"] = "Forbid"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


def test_expected_objects_per_overlay(rendered):
    """Each overlay creates what the pipeline pods need in the namespace they run in, and the CronJob's in its own."""
    from pipelines.resources import CONFIG_ENV, CONFIG_MAP

    for name, docs in rendered.items():
        own, run = NAMESPACES[name]
        have = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs}
        for want in [
            ("Namespace", None, own),
            ("ServiceAccount", own, "craft-scheduler"),
            ("CronJob", own, "craft-retrain"),
            ("ConfigMap", own, CONFIG_MAP),
            ("ConfigMap", run, CONFIG_MAP),
            ("NetworkPolicy", run, "craft-pipeline-egress"),
            ("Role", run, "craft-scheduler"),
            ("RoleBinding", run, "craft-scheduler"),
        ]:
            assert want in have, f"{name}: no {want}"
        assert ("Namespace", None, run) not in have, (
            f"{name}: {run} is Kubeflow's or the Profile's, not ours to create"
        )
        assert not [h for h in have if h[0] == "PersistentVolumeClaim" and h[2] == "craft-model-cache"], name
        for d in docs:
            if d["kind"] not in ("Namespace", "Profile"):
                assert d["metadata"].get("namespace") in (own, run), f"{name}: {d['kind']}/{d['metadata']['name']}"
        # one set of deployment settings in both namespaces, with every key the tasks map into their env
        cms = {d["metadata"]["namespace"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
        assert set(CONFIG_ENV) <= set(cms[run]), f"{name}: {run}/{CONFIG_MAP} lacks {set(CONFIG_ENV) - set(cms[run])}"
        assert {k: cms[own][k] for k in CONFIG_ENV} == {k: cms[run][k] for k in CONFIG_ENV}, name
        assert cms[run]["CRAFT_S3_SECURE"] in ("true", "false") and cms[run]["CRAFT_S3_ENDPOINT"], name
        assert cms[run]["CRAFT_MLLM_ALLOWED_URLS"].startswith("http"), name
    # dev carries its own MinIO; the others use Kubeflow's store
    assert ("Deployment", "craft-dev", "minio") in {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"])
                                                     for d in rendered["dev"]}  # fmt: skip
    assert not [d for d in rendered["standalone"] + rendered["multi-user"] if d["kind"] == "Deployment"]
    (profile,) = [d for d in rendered["multi-user"] if d["kind"] == "Profile"]
    assert profile["apiVersion"] == "kubeflow.org/v1" and profile["metadata"]["name"] == NAMESPACES["multi-user"][1]
    assert "namespace" not in profile["metadata"]  # cluster-scoped


def test_pod_security_levels(rendered):
    """restricted where only our pods run; the run namespace is not rendered (Kubeflow's / the Profile's)."""
    for name, docs in rendered.items():
        (ns,) = [d for d in docs if d["kind"] == "Namespace"]
        assert ns["metadata"]["name"] == NAMESPACES[name][0]
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted", name
    doc = (ROOT / "docs" / "DEPLOY.md").read_text()
    assert "pod-security.kubernetes.io/enforce=baseline" in doc  # how the run namespace gets baseline


def test_egress_policy_selects_the_pipeline_pods_and_allows_only_named_destinations(rendered):
    from pipelines.resources import POD_LABELS

    for name, docs in rendered.items():
        (pol,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
        assert pol["metadata"]["namespace"] == NAMESPACES[name][1]
        assert pol["spec"]["podSelector"]["matchLabels"].items() <= POD_LABELS.items(), name
        assert pol["spec"]["policyTypes"] == ["Egress"]
        for rule in pol["spec"]["egress"]:
            assert rule.get("to") and rule.get("ports"), f"{name}: a rule without destinations or ports opens all"
            for peer in rule["to"]:
                if "ipBlock" in peer:
                    assert peer["ipBlock"]["cidr"].endswith("/32"), f"{name}: only the API server by address"
                    assert {p["port"] for p in rule["ports"]} <= {443, 6443}
                else:
                    assert peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"], name
        ports = {p["port"] for r in pol["spec"]["egress"] for p in r["ports"]}
        assert {53, 8887, 8888, 9000, 8000} <= ports, name


def check_pods_hardened(doc: dict, where: str) -> int:
    """Assert the restricted pod-security settings and bounded resources on ``doc``'s pods; count containers."""
    seen = 0
    for spec in pod_specs(doc):
        psc = spec.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, where
        assert isinstance(psc.get("runAsUser"), int) and psc["runAsUser"] > 0, where
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert spec.get("automountServiceAccountToken") is False, where
        for c in spec.get("initContainers", []) + spec["containers"]:
            seen += 1
            csc = c.get("securityContext", {})
            assert csc.get("allowPrivilegeEscalation") is False, f"{where} {c['name']}"
            assert csc.get("readOnlyRootFilesystem") is True, f"{where} {c['name']}"
            assert csc.get("capabilities", {}).get("drop") == ["ALL"], f"{where} {c['name']}"
            assert not csc.get("privileged"), f"{where} {c['name']}"
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                for key in ("cpu", "memory"):
                    assert key in res.get(part, {}), f"{where} {c['name']}: no {part}.{key}"
            assert ":" in c["image"] and not c["image"].endswith(":latest"), f"{where}: unpinned image"
    return seen


def test_pods_are_non_root_and_bounded(rendered):
    seen = 0
    for name, docs in rendered.items():
        for doc in docs:
            seen += check_pods_hardened(doc, f"{name}: {doc['kind']}/{doc['metadata']['name']}")
    assert seen >= 4  # CronJob (dev, standalone, multi-user) + MinIO (dev)


def test_rbac_is_namespaced_and_least_privilege(rendered):
    for name, docs in rendered.items():
        kinds = {d["kind"] for d in docs}
        assert not kinds & {"ClusterRole", "ClusterRoleBinding"}, f"{name}: cluster-wide RBAC"
        for role in (d for d in docs if d["kind"] == "Role"):
            for rule in role["rules"]:
                assert "*" not in rule["verbs"] and "*" not in rule["resources"], f"{name}: wildcard {rule}"
                assert "secrets" not in rule["resources"], f"{name}: the scheduler must not read secrets"
                # only the scale-out role may delete, and only the jobs it submits (at their deadline)
                allowed = {"delete"} if role["metadata"]["name"] == "craft-scale-out" else set()
                assert not set(rule["verbs"]) & ({"delete", "deletecollection", "update", "patch", "escalate",
                                                  "bind"} - allowed)  # fmt: skip
        own, run = NAMESPACES[name]
        binding = next(d for d in docs if d["kind"] == "RoleBinding" and d["metadata"]["name"] == "craft-scheduler")
        assert binding["metadata"]["namespace"] == run  # where the runs are created and checked
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "craft-scheduler", "namespace": own}]


def test_pipeline_pods_may_submit_multi_node_jobs_and_nothing_else(rendered):
    """craft.launch's multi-node path creates, watches and deletes TrainJobs / PyTorchJobs in the run namespace,
    as the pipeline pods' ServiceAccount (pipeline-runner standalone, default-editor in a Profile)."""
    sa = {"standalone": "pipeline-runner", "dev": "pipeline-runner", "multi-user": "default-editor"}
    for name, docs in rendered.items():
        _, run = NAMESPACES[name]
        (role,) = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "craft-scale-out"]
        assert role["metadata"]["namespace"] == run
        kinds = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
        assert kinds == {("trainer.kubeflow.org", "trainjobs"), ("kubeflow.org", "pytorchjobs")}, name
        (binding,) = [d for d in docs if d["kind"] == "RoleBinding" and d["metadata"]["name"] == "craft-scale-out"]
        assert binding["metadata"]["namespace"] == run
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa[name], "namespace": run}], name


def test_cronjob_runs_retrain_without_overlap(rendered):
    for name, docs in rendered.items():
        cron = next(d for d in docs if d["kind"] == "CronJob")
        assert cron["spec"]["concurrencyPolicy"] == "Forbid", name
        pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == "craft-scheduler"
        c = pod["containers"][0]
        assert c["command"] == ["craft", "retrain-if-new-data"], name
        cm_names = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
        assert c["envFrom"][0]["configMapRef"]["name"] in cm_names, f"{name}: configmap reference not rewritten"
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
        # the scheduler's own scoped identity, never Kubeflow's root key
        assert refs["AWS_ACCESS_KEY_ID"] == {"name": "craft-s3-scheduler", "key": "accesskey"}
        assert refs["AWS_SECRET_ACCESS_KEY"] == {"name": "craft-s3-scheduler", "key": "secretkey"}
        assert "mlpipeline-minio-artifact" not in yaml.safe_dump_all(docs), name


def test_overlays_watch_the_model_their_runs_register(rendered):
    # The CronJob compares the dataset with the lineage of CRAFT_MODEL's production version, so CRAFT_MODEL
    # must be the name its runs register: the profile's name, the pipeline's default model_name.
    from craft.config import load_stage_config
    from pipelines import client as kc

    for name, docs in rendered.items():
        own = NAMESPACES[name][0]
        (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["namespace"] == own]
        env = cm["data"]
        assert cm["metadata"]["name"] == "craft-env", f"{name}: rendered CronJobs refer to craft-env by name"
        assert env["CRAFT_MODEL"] == kc.run_params(env["CRAFT_PROFILE"], [])["model_name"], name
        assert env["CRAFT_DATASET"].startswith("s3://"), name
        assert "KFP_PIPELINE_NAME" not in env, f"{name}: the pipeline follows the profile (craft-<profile>)"
        if load_stage_config("pipeline", env["CRAFT_PROFILE"]).foundation == "import":
            assert env["CRAFT_BASE_URI"], f"{name}: {env['CRAFT_PROFILE']} imports its foundation: set CRAFT_BASE_URI"


def _schedule(*args: str):
    from typer.testing import CliRunner

    from craft.cli import app

    return CliRunner().invoke(app, ["pipeline", "schedule", *args])


def test_schedule_renders_the_base_cronjob_for_a_profile(rendered, tmp_path):
    out = tmp_path / "retrain-chexpert.yaml"
    res = _schedule("--profile", "chexpert", "--cron", "15 4 * * *", "--dataset", "s3://craft/datasets/chexpert",
                    "--base-uri", "s3://craft/models/base/sd21-base", "-o", str(out), "data.n=800")  # fmt: skip
    assert res.exit_code == 0 and f"kubectl apply -f {out}" in res.output, res.output
    (doc,) = [d for d in yaml.safe_load_all(out.read_text()) if d]
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)
    cli = subprocess.run([_tool("kubernetes-validate"), "--strict", "--quiet", str(out)], capture_output=True,
                         text=True, check=False)  # fmt: skip
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert check_pods_hardened(doc, "craft-retrain-chexpert") == 1

    assert doc["metadata"]["name"] == "craft-retrain-chexpert" and doc["metadata"]["namespace"] == "craft"
    assert doc["spec"]["schedule"] == "15 4 * * *" and doc["spec"]["concurrencyPolicy"] == "Forbid"
    (c,) = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["craft", "retrain-if-new-data"]
    assert c["args"] == ["--model=$(CRAFT_MODEL)", "--profile=$(CRAFT_PROFILE)", "--dataset=$(CRAFT_DATASET)",
                         "data.n=800"]  # fmt: skip
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert {k: env[k] for k in ("CRAFT_PROFILE", "CRAFT_MODEL", "CRAFT_DATASET", "CRAFT_BASE_URI")} == {
        "CRAFT_PROFILE": "chexpert", "CRAFT_MODEL": "chexpert", "CRAFT_DATASET": "s3://craft/datasets/chexpert",
        "CRAFT_BASE_URI": "s3://craft/models/base/sd21-base"}  # fmt: skip
    # every $(VAR) in the args is set on the container itself, not left to whatever the ConfigMap says
    import re

    assert set(re.findall(r"\$\((\w+)\)", " ".join(c["args"]))) <= set(env)

    # everything else is the base CronJob as it is in git (one template, no copy in code)
    base = yaml.safe_load((K8S / "base" / "cronjob-retrain.yaml").read_text())
    base_pod = base["spec"]["jobTemplate"]["spec"]["template"]
    pod = doc["spec"]["jobTemplate"]["spec"]["template"]
    (bc,) = base_pod["spec"]["containers"]
    for key in ("securityContext", "resources", "volumeMounts", "envFrom", "command"):
        assert c[key] == bc[key], key
    assert [e for e in c["env"] if "valueFrom" in e or e["name"].startswith("KF")] == bc["env"]
    assert {k: v for k, v in pod["spec"].items() if k != "containers"} == {
        k: v for k, v in base_pod["spec"].items() if k != "containers"}  # fmt: skip
    assert {k: v for k, v in doc["spec"].items() if k not in ("schedule", "jobTemplate")} == {
        k: v for k, v in base["spec"].items() if k not in ("schedule", "jobTemplate")}  # fmt: skip
    # what it refers to exists in every overlay's own namespace: the shared ConfigMap and the scheduler identity
    for name, docs in rendered.items():
        own = NAMESPACES[name][0]
        have = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs}
        assert ("ConfigMap", own, c["envFrom"][0]["configMapRef"]["name"]) in have, name
        assert ("ServiceAccount", own, pod["spec"]["serviceAccountName"]) in have, name


def test_schedule_to_stdout_with_defaults_and_options():
    res = _schedule("--profile", "demo-histo", "--cron", "@daily", "--dataset", "s3://craft/datasets/histo/")
    assert res.exit_code == 0, res.output
    (doc,) = [d for d in yaml.safe_load_all(res.output) if d]
    (c,) = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["CRAFT_MODEL"] == "demo-histo" and env["CRAFT_DATASET"] == "s3://craft/datasets/histo"
    assert env["CRAFT_BASE_URI"] == ""  # explicit: a base from the overlay's ConfigMap must not leak in
    assert doc["metadata"]["name"] == "craft-retrain-demo-histo" and doc["spec"]["schedule"] == "@daily"

    res = _schedule("--profile", "demo-cxr", "--cron", "0 * * * *", "--dataset", "s3://b/datasets/cxr",
                    "--model-name", "cxr-site-a", "--namespace", "craft-dev",
                    "--image", "registry.example.org/craft/craft-cpu:0.1.1")  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = yaml.safe_load(res.output)
    (c,) = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert {e["name"]: e.get("value") for e in c["env"]}["CRAFT_MODEL"] == "cxr-site-a"
    assert doc["metadata"]["namespace"] == "craft-dev" and c["image"] == "registry.example.org/craft/craft-cpu:0.1.1"
    kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cron", "0 0 3 * * *"], "expected 5 fields"),  # KFP's seconds field is not a CronJob schedule
        (["--cron", "every day"], "expected 5 fields"),
        (["--cron", "TZ=Europe/Paris 0 3 * * *"], "no TZ= prefix"),
        (["--dataset", "./data/histo"], "s3://BUCKET/datasets/NAME"),
        (["--dataset", "s3://craft"], "s3://BUCKET/datasets/NAME"),
        (["--profile", "chexpert"], "pass --base-uri"),
        (["--profile", "no-such-profile"], "no-such-profile"),
        (["--image", "ghcr.io/craft-ml/craft-cpu:latest"], "pin a tag or digest"),
        (["--namespace", "Craft_Prod"], "not a valid Kubernetes namespace"),
        (["registry.root=s3://elsewhere"], "refused"),
    ],
)
def test_schedule_refuses_what_would_fail_in_the_cluster(args, message):
    opts = {"--profile": "demo-histo", "--cron": "0 3 * * *", "--dataset": "s3://craft/datasets/histo"}
    extra = []
    for i in range(0, len(args), 2):
        if args[i].startswith("--"):
            opts[args[i]] = args[i + 1]
        else:
            extra = args[i:]
            break
    res = _schedule(*[x for kv in opts.items() for x in kv], *extra)
    assert res.exit_code == 2 and message in res.output, res.output


def test_no_secret_values_in_git_or_renders(rendered):
    for name, docs in rendered.items():
        for d in docs:
            if d["kind"] == "Secret":
                assert not d.get("data") and not d.get("stringData"), (
                    f"{name}: Secret {d['metadata']['name']} has values"
                )
            if d["kind"] == "ConfigMap":
                for key in d.get("data", {}):
                    assert not any(w in key.upper() for w in ("SECRET", "PASSWORD", "TOKEN", "ACCESS_KEY")), key
    in_git = (
        shutil.which("git") is not None
        and subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=ROOT, capture_output=True).returncode
        == 0
    )
    if in_git:
        tracked = subprocess.run(["git", "ls-files", "k8s"], cwd=ROOT, capture_output=True, text=True).stdout.split()
        assert not [f for f in tracked if f.endswith(".env")], "a secret env file is tracked by git"
    for component in ("secrets", "scheduler-secrets"):
        ignore_rules = (K8S / "components" / component / ".gitignore").read_text().splitlines()
        assert "*.env" in ignore_rules
        for example in (K8S / "components" / component).glob("*.env.example"):
            env = example.with_suffix("")  # s3-reader.env.example -> s3-reader.env
            if in_git:
                ignored = subprocess.run(["git", "check-ignore", "-q", str(env)], cwd=ROOT, check=False)
                assert ignored.returncode == 0, f"{env} would not be ignored by git"
            for line in example.read_text().splitlines():
                if line and not line.startswith("#"):
                    key, _, value = line.partition("=")
                    assert value == "", f"{example}: {key} has a value"


def test_secrets_components_render_from_local_env_files(tmp_path):
    # What a user does: copy the examples to the gitignored names, fill them, add the components.
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("*.env"))
    filled = {"accesskey": "AKIAEXAMPLEONLY", "secretkey": "not-a-real-secret", "api-key": "k", "token": "t"}
    for component in ("secrets", "scheduler-secrets"):
        for example in (tree / "components" / component).glob("*.env.example"):
            lines = []
            for line in example.read_text().splitlines():
                key = line.partition("=")[0]
                lines.append(f"{key}={filled[key]}" if line and not line.startswith("#") else line)
            example.with_suffix("").write_text("\n".join(lines) + "\n")
    for part, component in (("run", "secrets"), ("scheduler", "scheduler-secrets")):
        k = tree / "overlays" / "standalone" / part / "kustomization.yaml"
        doc = yaml.safe_load(k.read_text())
        doc["components"] = [*doc.get("components", []), f"../../../components/{component}"]
        k.write_text(yaml.safe_dump(doc))
    docs = render(tree / "overlays" / "standalone")
    got = {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in docs if d["kind"] == "Secret"}
    own, run = NAMESPACES["standalone"]
    assert set(got) == {(run, "craft-s3-reader"), (run, "craft-s3-writer"), (run, "craft-mllm"),
                        (own, "craft-s3-scheduler"), (own, "craft-kfp")}  # fmt: skip
    art = got[(run, "craft-s3-reader")]["data"]
    assert base64.b64decode(art["accesskey"]).decode() == "AKIAEXAMPLEONLY"
    assert set(got[(run, "craft-mllm")]["data"]) == {"api-key"} and set(got[(own, "craft-kfp")]["data"]) == {"token"}
    # every Secret a compiled task names exists where the tasks run
    from pipelines.resources import DEFAULT_RESOURCES

    named = {r[k] for r in DEFAULT_RESOURCES.values() for k in ("object_store_secret", "mllm_secret") if r.get(k)}
    assert named == {n for ns, n in got if ns == run}
    for d in docs:
        if d["kind"] != "Profile":
            kubernetes_validate.validate(d, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("image", ["cpu", "gpu"])
def test_dockerfile_lints_clean(image):
    dockerfile = ROOT / "docker" / image / "Dockerfile"
    out = subprocess.run(
        [_tool("hadolint"), "--no-color", str(dockerfile)], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, f"hadolint {dockerfile}:\n{out.stdout}{out.stderr}"


def test_hadolint_is_not_a_no_op(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\n")
    out = subprocess.run([_tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True, check=False)
    assert out.returncode != 0 and "DL3007" in out.stdout


@pytest.mark.parametrize("image", ["cpu", "gpu"])
def test_dockerfile_contract(image):
    text = (ROOT / "docker" / image / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "last USER must be non-root"
    assert "org.opencontainers.image.version" in text and "org.opencontainers.image.source" in text
    assert "CRAFT_CONFIG_DIR=/opt/craft/configs" in text and "COPY --chown=root:root configs" in text
    assert "pip install ." in text and "torch==${TORCH_VERSION}" in text
    assert ":latest" not in text
    for ln in lines:
        if ln.startswith(("ENV", "ARG")):
            upper = ln.upper()
            assert not any(w in upper for w in ("SECRET", "PASSWORD", "ACCESS_KEY", "API_KEY", "TOKEN=")), ln


def test_image_names_agree_with_components(monkeypatch):
    import importlib

    for var in ("CRAFT_IMAGE_CPU", "CRAFT_IMAGE_GPU", "CRAFT_IMAGE_REGISTRY", "CRAFT_IMAGE_TAG"):
        monkeypatch.delenv(var, raising=False)
    images = importlib.reload(importlib.import_module("components.images"))
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    (entry,) = base["images"]
    assert images.CPU_IMAGE.rsplit(":", 1)[0] == entry["name"]
    from craft.version import code_version

    assert images.TAG == code_version()  # the git sha, not the package version
    makefile = (ROOT / "Makefile").read_text()
    assert "craft-cpu:$(GIT_SHA)" in makefile and "craft-gpu:$(GIT_SHA)" in makefile
    assert "VCS_REF=$(GIT_SHA)" in makefile and "git diff --quiet HEAD" in makefile
