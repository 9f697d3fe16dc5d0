"""The KFP pipeline compiles from each profile's plan, its spec has the expected tasks, edges and pod
settings, and the walking skeleton runs locally with kfp.local."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from craft.plan import PipelinePlan
from pipelines.craft_pipeline import build_pipeline, compile_pipeline


def _load(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]  # spec, k8s settings


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled") / "craft_pipeline.yaml"
    compile_pipeline(out, "demo-histo")
    return _load(out) + (out.read_text(),)


def _tasks(spec):
    return {t["taskInfo"]["name"]: t for t in spec["root"]["dag"]["tasks"].values()}


def test_compiles_with_parameters(compiled):
    params = compiled[0]["root"]["inputDefinitions"]["parameters"]
    assert {"profile", "overrides", "dataset_uri", "base_uri", "model_name"} <= set(params)
    assert params["profile"]["defaultValue"] == "demo-histo"


def test_task_graph_follows_the_design(compiled):
    tasks = _tasks(compiled[0])
    by_key = {k: t["taskInfo"]["name"] for k, t in compiled[0]["root"]["dag"]["tasks"].items()}

    def deps(name):
        return {by_key[k] for k in tasks[name].get("dependentTasks", [])}

    expected = {
        "dataset-version", "champion", "data", "validate", "annotate", "pretrain", "finetune", "critic", "evaluator", "critic-probe",
        "evaluator-probe", "craft", "ti", "ti-lora", "dpo", "controlnet-mask", "controlnet-mask-plain-base",
        "controlnet-fluorescence", "controlnet-fluorescence-plain-base", "controlnet-mask-eval",
        "controlnet-fluorescence-eval", "evaluate", "gate", "gates-passed",
    }  # fmt: skip
    assert set(tasks) == expected
    assert deps("data") == {"dataset-version"} and deps("validate") == {"data", "dataset-version"}
    assert deps("champion") == set() and "champion" in deps("evaluate")
    assert {"validate"} <= deps("annotate") and {"validate"} <= deps("pretrain")
    assert "pretrain" in deps("finetune")
    assert {"finetune", "critic", "critic-probe", "annotate"} <= deps("craft")
    assert "ti" in deps("ti-lora") and "ti-lora" in deps("dpo")
    assert "ti-lora" in deps("craft")  # craft_start: ti_lora (the default) continues the TI+LoRA adapter
    assert "start" in tasks["craft"]["inputs"]["artifacts"]
    assert {"craft", "ti", "ti-lora", "dpo", "evaluator", "evaluator-probe", "pretrain"} <= deps("evaluate")
    # the critic's probe reaches evaluate only for the reported training reward (critic_reward), never a metric
    assert "critic-probe" in deps("evaluate")
    assert deps("gate") == {"evaluate"}
    cond = tasks["gates-passed"]
    assert "gate-op-Output" in json.dumps(cond["triggerPolicy"]) and "true" in json.dumps(cond["triggerPolicy"])


def test_pod_settings(compiled):
    spec, k8s, text = compiled
    containers = {k: v["container"] for k, v in spec["deploymentSpec"]["executors"].items()}
    for ex in ("exec-reward-op", "exec-pretrain-op", "exec-finetune-op", "exec-evaluate-op"):
        res = containers[ex]["resources"]
        assert res["accelerator"]["resourceType"] == "nvidia.com/gpu" and res["accelerator"]["resourceCount"] == "1"
        assert "craft-gpu" in containers[ex]["image"]
        # one model cache per pod (emptyDir, fed from the object store); no shared PVC
        mounts = {m["volumeName"]: m for m in k8s[ex]["emptyDirMounts"]}
        assert mounts["model-cache"] == {
            "volumeName": "model-cache",
            "mountPath": "/cache/models",
            "sizeLimit": "50Gi",
        }
        assert "craft-scratch" in mounts  # the step's disk budget (ephemeral_storage), apart from the cache
        assert "pvcMount" not in k8s[ex]
        env = {e["name"]: e["value"] for e in containers[ex]["env"]}
        assert env["CRAFT_MODEL_CACHE"] == "/cache/models"
    assert "accelerator" not in containers["exec-validate-op"].get("resources", {})
    secret = k8s["exec-reward-op"]["secretAsEnv"][0]
    assert secret["secretName"] == "craft-s3-writer"  # training checkpoints go to the object store
    assert {e["envVar"] for e in secret["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert "mlpipeline-minio-artifact" not in text  # Kubeflow's root key is nowhere in the pipeline


def _platform_by_task(spec, k8s):
    tasks = _tasks(spec)
    return {name: k8s.get(t["componentRef"]["name"].replace("comp-", "exec-"), {}) for name, t in tasks.items()
            if "executorLabel" in spec["components"][t["componentRef"]["name"]]}  # fmt: skip


def _secrets(platform):
    return {s["secretName"]: {e["envVar"] for e in s["keyToEnv"]} for s in platform.get("secretAsEnv", [])}


def test_every_task_gets_the_deployment_configmap_labels_and_uid(compiled):
    from pipelines.resources import CONFIG_ENV, CONFIG_MAP, POD_LABELS

    spec, k8s, _ = compiled
    by_task = _platform_by_task(spec, k8s)
    register = spec["components"]["comp-condition-1"]["dag"]["tasks"]["register-op"]  # inside gates-passed
    by_task["register"] = k8s[register["componentRef"]["name"].replace("comp-", "exec-")]
    assert len(by_task) >= 20
    for name, platform in by_task.items():
        (cm,) = platform["configMapAsEnv"]
        assert cm["configMapName"] == CONFIG_MAP and cm["optional"] is False, name
        assert {e["configMapKey"]: e["envVar"] for e in cm["keyToEnv"]} == CONFIG_ENV, name
        assert platform["podMetadata"]["labels"] == POD_LABELS, name  # what the egress NetworkPolicy selects
        assert platform["securityContext"] == {"runAsUser": "10001", "runAsGroup": "10001", "runAsNonRoot": True}


def test_scoped_secrets_per_step_kind(compiled):
    """Reader for steps that only read, writer where a step writes, nothing where none is needed; the MLLM key
    only on annotate and dpo."""
    spec, k8s, _ = compiled
    by_task = _platform_by_task(spec, k8s)
    register = spec["components"]["comp-condition-1"]["dag"]["tasks"]["register-op"]
    by_task["register"] = k8s[register["componentRef"]["name"].replace("comp-", "exec-")]
    store = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    want = {
        "dataset-version": "craft-s3-reader", "data": "craft-s3-reader", "critic-probe": "craft-s3-reader",
        "evaluate": "craft-s3-reader", "champion": "craft-s3-reader", "validate": "craft-s3-writer",
        "register": "craft-s3-writer", "pretrain": "craft-s3-writer", "craft": "craft-s3-writer",
        "ti": "craft-s3-writer", "controlnet-mask": "craft-s3-writer", "annotate": None, "gate": None,
    }  # fmt: skip
    for name, identity in want.items():
        secrets = _secrets(by_task[name])
        holders = {n for n, envs in secrets.items() if envs == store}
        assert holders == ({identity} if identity else set()), f"{name}: {holders}"
    # annotate: the MLLM key and no object-store key (the launcher moves its artifacts)
    assert _secrets(by_task["annotate"]) == {"craft-mllm": {"MLLM_API_KEY"}}
    # the DPO judge (dpo.judge=mllm) needs the key too; the other baselines do not get it
    assert _secrets(by_task["dpo"])["craft-mllm"] == {"MLLM_API_KEY"}
    for name, platform in by_task.items():
        if name not in ("annotate", "dpo"):
            assert "craft-mllm" not in _secrets(platform), name


def test_components_install_nothing(compiled):
    for name, ex in compiled[0]["deploymentSpec"]["executors"].items():
        assert "pip install" not in json.dumps(ex["container"]["command"]), f"{name} installs packages at run time"


def test_plan_drops_optional_tasks(tmp_path):
    from kfp import compiler

    out = tmp_path / "p.yaml"
    plan = PipelinePlan(foundation="import", encoders="import", critic_uri="s3://m/medsiglip",
                        evaluator_uri="s3://m/siglip", baselines=["ti"], craft_start="base")  # fmt: skip
    compiler.Compiler().compile(build_pipeline(plan), str(out))
    tasks = _tasks(_load(out)[0])
    names = set(tasks)
    assert {"import-foundation", "import-critic", "import-evaluator", "ti", "craft", "evaluate"} <= names
    assert not names & {"pretrain", "finetune", "critic", "ti-lora", "dpo", "controlnet-mask"}
    assert "start" not in tasks["craft"]["inputs"]["artifacts"]  # a fresh LoRA on the foundation model


def test_referee_plan_feeds_the_craft_step_a_third_encoder(tmp_path):
    """pipeline.referee=train: the reward monitor's referee (issue 21) is trained beside the critic and the evaluator,
    probed, and connected to the craft step only (the evaluate step never sees it)."""
    from kfp import compiler

    for plan, source in ((PipelinePlan(referee="train"), "referee"),
                         (PipelinePlan(referee="import", referee_uri="s3://m/referee"), "import-referee")):  # fmt: skip
        out = tmp_path / f"{source}.yaml"
        compiler.Compiler().compile(build_pipeline(plan), str(out))
        spec = _load(out)[0]
        tasks = _tasks(spec)
        shown = {key: t["taskInfo"]["name"] for key, t in spec["root"]["dag"]["tasks"].items()}  # id -> display name

        def producer(artifact, shown=shown):  # the display name of the task an input artifact comes from
            return shown[artifact["taskOutputArtifact"]["producerTask"]]

        craft_in = tasks["craft"]["inputs"]["artifacts"]
        assert producer(craft_in["referee"]) == source
        assert producer(craft_in["referee_probe"]) == "referee-probe"
        assert producer(tasks["referee-probe"]["inputs"]["artifacts"]["encoder"]) == source
        evaluate_from = {producer(a) for a in tasks["evaluate"]["inputs"]["artifacts"].values()
                         if "taskOutputArtifact" in a}  # fmt: skip
        assert not evaluate_from & {"referee", "import-referee", "referee-probe"}
    out = tmp_path / "none.yaml"
    compiler.Compiler().compile(build_pipeline(PipelinePlan()), str(out))
    tasks = _tasks(_load(out)[0])
    assert "referee" not in tasks and "referee" not in tasks["craft"]["inputs"]["artifacts"]


def test_demo_cxr_trains_the_referee_its_craft_monitor_reads(tmp_path):
    """demo-cxr's CRAFT is monitored (issue 21: it keeps half the update of the last held-out reading whose critic gain
    holds across views) and its monitor reads the referee beside the critic: the compiled DAG trains the referee and
    its probe and hands them to the craft step."""
    from craft.config import load_stage_config

    assert load_stage_config("reward", "demo-cxr", []).monitor.select == "held"
    assert load_stage_config("pipeline", "demo-cxr", []).referee == "train"
    tasks = _tasks(_load(compile_pipeline(tmp_path / "cxr.yaml", "demo-cxr"))[0])
    assert {"referee", "referee-probe"} <= set(tasks)
    assert {"referee", "referee_probe"} <= set(tasks["craft"]["inputs"]["artifacts"])


def test_critic_ensemble_plan_trains_extra_critics_for_the_craft_step_only(tmp_path):
    """pipeline.critic_ensemble=2 (issue 21, reward.ensemble): two more critics (encoder roles critic-1, critic-2) and
    their probes, connected to the craft step's critic_K inputs and to nothing the evaluate step reads."""
    from kfp import compiler

    out = tmp_path / "ens.yaml"
    compiler.Compiler().compile(build_pipeline(PipelinePlan(critic_ensemble=2)), str(out))
    spec = _load(out)[0]
    tasks = _tasks(spec)
    shown = {key: t["taskInfo"]["name"] for key, t in spec["root"]["dag"]["tasks"].items()}
    craft_in = tasks["craft"]["inputs"]["artifacts"]
    for k in (1, 2):
        assert shown[craft_in[f"critic_{k}"]["taskOutputArtifact"]["producerTask"]] == f"critic-{k}"
        assert shown[craft_in[f"critic_{k}_probe"]["taskOutputArtifact"]["producerTask"]] == f"critic-{k}-probe"
        assert tasks[f"critic-{k}"]["inputs"]["parameters"]["role"]["runtimeValue"]["constant"] == f"critic-{k}"
    evaluate_from = {shown[a["taskOutputArtifact"]["producerTask"]] for a in tasks["evaluate"]["inputs"]["artifacts"]
                     .values() if "taskOutputArtifact" in a}  # fmt: skip
    assert not evaluate_from & {"critic-1", "critic-2", "critic-1-probe", "critic-2-probe"}
    compiler.Compiler().compile(build_pipeline(PipelinePlan()), str(out))
    assert "critic_1" not in _tasks(_load(out)[0])["craft"]["inputs"]["artifacts"]
    with pytest.raises(ValueError, match="critic_ensemble must be in 0..2"):
        build_pipeline(PipelinePlan(critic_ensemble=3))
    with pytest.raises(ValueError, match="needs encoders: train"):
        build_pipeline(PipelinePlan(critic_ensemble=1, encoders="import", critic_uri="s3://m/c",
                                    evaluator_uri="s3://m/e"))  # fmt: skip


def test_plan_refuses_inconsistent_choices():
    with pytest.raises(ValueError, match="dpo starts from the ti_lora"):
        build_pipeline(PipelinePlan(baselines=["ti", "dpo"]))
    with pytest.raises(ValueError, match="craft_start: ti_lora continues"):
        build_pipeline(PipelinePlan(baselines=["ti"]))
    with pytest.raises(ValueError, match="same model"):
        build_pipeline(PipelinePlan(encoders="import", critic_uri="s3://m/x", evaluator_uri="s3://m/x"))
    with pytest.raises(ValueError, match="referee: import needs referee_uri"):
        build_pipeline(PipelinePlan(referee="import"))
    with pytest.raises(ValueError, match="a third model"):
        build_pipeline(PipelinePlan(encoders="import", critic_uri="s3://m/c", evaluator_uri="s3://m/e",
                                    referee="import", referee_uri="s3://m/e"))  # fmt: skip


def test_cli_compile(tmp_path):
    out = tmp_path / "p.yaml"
    r = subprocess.run(
        [sys.executable, "-m", "craft.cli", "pipeline", "compile", "--output", str(out), "--profile", "demo-cxr"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    spec, _ = _load(out)
    assert spec["pipelineInfo"]["name"] == "craft-demo-cxr"  # one pipeline per profile
    # the UI's run form defaults to the profile whose plan this is (not demo-histo's settings on its DAG)
    assert spec["root"]["inputDefinitions"]["parameters"]["profile"]["defaultValue"] == "demo-cxr"
    assert "controlnet-mask" not in _tasks(spec)  # demo-cxr has no ControlNet (no nuclei masks)


SMALL = ["data.n=48", "validate.min_per_class=2"]


def test_local_run_data_stages(tmp_path):
    """The walking skeleton under kfp.local: data, validate and annotate on a small demo dataset."""
    from pipelines.local import run_local

    summary = run_local("demo-histo", ["pipeline.until=annotate", *SMALL], tmp_path / "runs")
    assert summary["ok"]
    tasks = {t["task"]: t for t in summary["tasks"]}
    assert set(tasks) == {"dataset-version-op", "prepare-data-op", "validate-op", "annotate-op"}
    assert tasks["prepare-data-op"]["metrics"]["n_images"] == 48
    assert tasks["validate-op"]["metrics"]["n_failures"] == 0
    assert tasks["annotate-op"]["metrics"]["failed"] == 0 and tasks["annotate-op"]["metrics"]["done"] == 48


def test_local_run_stops_on_invalid_dataset(tmp_path):
    """An invalid dataset fails the validate task, so nothing downstream runs."""
    from pipelines.local import run_local

    with pytest.raises(RuntimeError):
        run_local(
            "demo-histo", ["pipeline.until=annotate", "data.n=48", "validate.min_per_class=1000"], tmp_path / "r"
        )
    run_dir = next(p for p in (tmp_path / "r").iterdir() if p.name.startswith("craft-"))
    assert not (run_dir / "annotate-op").exists()


def test_dataset_version_feeds_every_data_reading_task(compiled):
    """A new dataset version is a new cache key for every task that reads the data (issue 4857)."""
    spec = compiled[0]
    tasks = _tasks(spec)
    readers = [n for n, t in tasks.items() if "dataset" in t.get("inputs", {}).get("artifacts", {})]
    assert {"validate", "annotate", "pretrain", "finetune", "craft", "ti", "evaluate"} <= set(readers)
    for name in [*readers, "data"]:
        if name == "register":
            continue  # reads only the data step's dataset_ref.json (name + version) for the lineage
        src = tasks[name]["inputs"]["parameters"]["dataset_version"]["taskOutputParameter"]
        assert src["producerTask"] == "dataset-version-op", name
    # the resolving task and the champion are never served from the cache; the data download may be
    assert tasks["dataset-version"].get("cachingOptions", {}).get("enableCache") is not True
    assert tasks["champion"].get("cachingOptions", {}).get("enableCache") is not True
    assert tasks["data"]["cachingOptions"]["enableCache"] is True


def test_register_records_a_candidate_and_cannot_move_production(compiled):
    spec = compiled[0]
    register = spec["components"]["comp-register-op"]["inputDefinitions"]
    assert {"dataset", "validation", "results"} <= set(register["artifacts"])
    assert {"pipeline_version", "run_id", "model_name"} <= set(register["parameters"])
    source = json.dumps(spec["deploymentSpec"]["executors"]["exec-register-op"]["container"])
    assert "register_step" in source and ".promote(" not in source and "set_alias" not in source


@pytest.mark.parametrize("bad", ["gates.cas.enabled=false", "gates.near_duplicates.enabled=false",
                                 "registry.root=s3://other", "annotate.api_key_env=AWS_SECRET_ACCESS_KEY"])  # fmt: skip
def test_overrides_that_weaken_the_gates_are_refused(bad):
    from craft.config import ConfigError
    from craft.steps import dataset_version_step
    from pipelines.craft_pipeline import pipeline_for_profile

    with pytest.raises(ConfigError, match="refused"):  # at compile time
        pipeline_for_profile("demo-histo", [bad])
    with pytest.raises(ConfigError, match="refused"):  # at run time, in the first task of every run
        dataset_version_step("demo-histo", [bad], "")


# ---------------------------------------------------------------- sizes, scale-out and order (issue 17)

PROFILES = sorted(
    p.stem for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml") if p.stem != "gates"
)


@pytest.fixture(scope="module")
def every_profile(tmp_path_factory):
    """Every bundled profile's pipeline, compiled: {profile: (spec, k8s executor settings)}."""
    out = tmp_path_factory.mktemp("profiles")
    return {p: _load(compile_pipeline(out / f"{p}.yaml", p)) for p in PROFILES}


def _compile(tmp_path, profile, overrides):
    from kfp import compiler

    from pipelines.craft_pipeline import pipeline_for_profile

    out = tmp_path / "p.yaml"
    compiler.Compiler().compile(pipeline_for_profile(profile, overrides), str(out))
    return _load(out)


def _executor(spec, task):
    return spec["root"]["dag"]["tasks"][task]["componentRef"]["name"].replace("comp-", "exec-")


def _container(spec, task):
    """The task's container; {} for a sub-DAG (the gates-passed condition), which runs nothing itself."""
    return spec["deploymentSpec"]["executors"].get(_executor(spec, task), {}).get("container", {})


def _env(spec, task):
    return {e["name"]: e["value"] for e in _container(spec, task).get("env", [])}


def _holds_gpus(spec, task):
    c = _container(spec, task)
    return "accelerator" in c.get("resources", {}) or "CRAFT_SCALE_OUT" in _env(spec, task)


def _upstream(spec, task):
    tasks = spec["root"]["dag"]["tasks"]
    seen, todo = set(), list(tasks[task].get("dependentTasks", []))
    while todo:
        t = todo.pop()
        if t not in seen:
            seen.add(t)
            todo += tasks[t].get("dependentTasks", [])
    return seen


def test_every_gpu_task_of_every_profile_waits_for_validation(every_profile):
    """With an imported foundation model (chexpert, ...) TI and the probes read only data the validate step
    has not passed yet: the explicit edge makes every GPU task wait for it."""
    assert {"chexpert", "breakhis", "demo-histo", "smoke-chexpert"} <= set(every_profile)
    for profile, (spec, _) in every_profile.items():
        gpu = [t for t in spec["root"]["dag"]["tasks"] if _holds_gpus(spec, t)]
        assert len(gpu) >= 5, profile
        for t in gpu:
            assert "validate-op" in _upstream(spec, t), f"{profile}: {t} may start before validation passed"


def test_import_plans_make_ti_and_the_probes_depend_on_validate_directly(every_profile):
    spec, _ = every_profile["chexpert"]
    tasks = spec["root"]["dag"]["tasks"]
    assert "import-model-op" in tasks  # the plan imports its foundation model
    for t in ("ti-op", "probe-op", "probe-op-2"):
        assert "validate-op" in tasks[t]["dependentTasks"], t


def test_every_step_has_a_timeout_and_a_disk_budget(every_profile):
    for profile, (spec, k8s) in every_profile.items():
        for name in spec["deploymentSpec"]["executors"]:
            assert int(k8s[name]["activeDeadlineSeconds"]) >= 1800, f"{profile}: {name} has no timeout"
            [scratch] = [v for v in k8s[name]["emptyDirMounts"] if v["volumeName"] == "craft-scratch"]
            assert scratch["mountPath"] == "/minio" and scratch["sizeLimit"].endswith("Gi"), (profile, name)


def test_register_is_sized_for_merging_sd21_on_the_cpu(every_profile):
    spec, k8s = every_profile["chexpert"]
    res = spec["deploymentSpec"]["executors"]["exec-register-op"]["container"]["resources"]
    assert res["resourceMemoryRequest"] == res["resourceMemoryLimit"] == "24Gi" and "accelerator" not in res


def test_training_steps_resume_from_per_run_checkpoints(every_profile):
    spec, _ = every_profile["demo-histo"]
    for task in ("pretrain-op", "finetune-op", "reward-op", "ti-op", "ti-lora-op", "dpo-op", "controlnet-op"):
        assert _env(spec, task)["CRAFT_CHECKPOINT_ROOT"] == "s3://craft/checkpoints", task
        params = spec["components"][spec["root"]["dag"]["tasks"][task]["componentRef"]["name"]]["inputDefinitions"]
        assert params["parameters"]["run_id"]["defaultValue"] == "{{$.pipeline_job_uuid}}"
        assert params["parameters"]["task_name"]["defaultValue"] == "{{$.pipeline_task_name}}"
    for task in ("evaluate-op", "probe-op", "validate-op"):
        assert "CRAFT_CHECKPOINT_ROOT" not in _env(spec, task)


def test_four_gpus_on_one_node_launch_torchrun(tmp_path):
    spec, k8s = _compile(
        tmp_path,
        "chexpert",
        ["resources.steps.craft.gpus=4", "resources.steps.craft.gpu_product=NVIDIA-H100-80GB-HBM3"],
    )
    c = _container(spec, "reward-op")
    assert c["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert c["resources"]["accelerator"]["resourceCount"] == "4"
    assert _env(spec, "reward-op")["CRAFT_NPROC_PER_NODE"] == "4"  # craft.launch: torchrun --nproc_per_node 4
    assert "run_step" in json.dumps(c["command"]) and "craft.train.reward:step" in json.dumps(c["command"])
    ex = k8s[_executor(spec, "reward-op")]
    assert {"mountPath": "/dev/shm", "medium": "Memory", "sizeLimit": "8Gi", "volumeName": "dshm"} in ex[
        "emptyDirMounts"
    ]
    assert ex["nodeSelector"]["labels"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert "CRAFT_NPROC_PER_NODE" not in _env(spec, "ti-op")  # the other GPU steps keep one GPU
    assert _container(spec, "ti-op")["resources"]["accelerator"]["resourceCount"] == "1"


def test_two_nodes_compile_to_a_small_pod_that_submits_a_trainjob(tmp_path):
    from kubeflow_trainer_api import models as m

    from craft.trainjob import ScaleOut, manifest

    spec, k8s = _compile(tmp_path, "demo-histo", ["resources.steps.pretrain.gpus=4", "resources.steps.pretrain.nodes=2",
                                                  "resources.steps.pretrain.memory=256Gi", "resources.steps.pretrain.timeout=2d"])  # fmt: skip
    c = _container(spec, "pretrain-op")
    assert "accelerator" not in c["resources"]  # the pod orchestrates; the GPUs are the job's
    assert c["resources"]["resourceCpuLimit"] == "1" and c["resources"]["resourceMemoryLimit"] == "4Gi"
    ex = k8s[_executor(spec, "pretrain-op")]
    assert "tolerations" not in ex and "pvcMount" not in ex
    assert int(ex["activeDeadlineSeconds"]) == 2 * 86400 + 3600  # the job's deadline + staging
    scale = ScaleOut.from_json(_env(spec, "pretrain-op")["CRAFT_SCALE_OUT"])
    assert (scale.engine, scale.nodes, scale.gpus_per_node, scale.memory, scale.timeout_s) == (
        "trainjob",
        2,
        4,
        "256Gi",
        2 * 86400,
    )
    assert scale.image == c["image"] and scale.secrets[0]["name"] == "craft-s3-writer"
    body = manifest(scale, "craft-pretrain-op-00000000", ["python", "-m", "craft.launch", "node", "s3://b/s"], {})
    assert m.TrainerV1alpha1TrainJob.from_dict(body).to_dict() == body
    assert "validate-op" in _upstream(spec, "pretrain-op")  # still a GPU step for the order
    spec2, _ = _compile(tmp_path, "demo-histo", ["resources.steps.pretrain.gpus=4", "resources.steps.pretrain.nodes=2",
                                                 "resources.scale_out=pytorchjob"])  # fmt: skip
    assert ScaleOut.from_json(_env(spec2, "pretrain-op")["CRAFT_SCALE_OUT"]).engine == "pytorchjob"


def test_profile_resources_reach_the_compiled_pods(every_profile):
    def deadline(profile, task):
        spec, k8s = every_profile[profile]
        return int(k8s[_executor(spec, task)]["activeDeadlineSeconds"])

    assert deadline("chexpert", "reward-op") == 12 * 3600  # configs/chexpert.yaml resources.steps.craft
    assert deadline("fitzpatrick17k", "evaluate-op") == 72 * 3600
    assert deadline("smoke-chexpert", "probe-op") == deadline("smoke-chexpert", "ti-op") == 2 * 3600  # extends
    assert deadline("demo-histo", "reward-op") == 24 * 3600  # no resources section: pipelines/resources.py's
