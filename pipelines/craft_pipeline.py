"""The craft pipeline: one DAG from dataset to gated model (DESIGN.md, "Data flow").

No `from __future__ import annotations` in this file or components/: KFP reads the real annotations.

    dataset-version -> data -> validate -> annotate -> [pretrain -> finetune] -> encoders (critic, evaluator)
    -> probes -> {CRAFT, TI, TI+LoRA, DPO} -> [ControlNet] -> champion -> evaluate -> gate
    -> (if passed) register as candidate

Every task takes the profile name and the pipeline-wide overrides (``stage.key=value``) so one UI form
drives all of them; overrides naming ``gates.*``, ``registry.*`` or a ``*_env`` field are refused when the
pipeline is compiled and by every step at run time. ``dataset-version`` (never cached) resolves the
dataset URI to its content version and every data-reading task takes that version as an input, so a new
dataset version is a new cache key everywhere (kubeflow/pipelines issue 4857). ``champion`` downloads the
production model so that ``evaluate`` scores it beside the candidate; ``register`` records a candidate
and never moves production (``craft promote``, run by CI, does). Which optional tasks exist is the profile's ``pipeline`` section (craft.plan), read
when the pipeline is built: ``craft pipeline compile --profile P`` or ``craft demo --profile P``.

Pod sizes are the profile's ``resources`` section (craft.launch.ResourcesConfig) over pipelines/resources.py's
defaults, fixed at compile time. Every task that asks for a GPU (or a multi-node job) runs after ``validate``
has passed, whatever its data inputs: with an imported foundation model nothing else would hold TI or the
probes back, and GPU time is not spent on a dataset that fails validation.
"""

from pathlib import Path

from kfp import compiler, dsl

from components.annotate import annotate_op
from components.controlnet import controlnet_eval_op, controlnet_op
from components.crafts import finetune_op, pretrain_op
from components.data import dataset_version_op, import_model_op, prepare_data_op, validate_op
from components.encoders import encoder_op, probe_op
from components.evaluate import evaluate_op
from components.promote import champion_op, gate_op, register_op
from components.reward import dpo_op, reward_op, ti_lora_op, ti_op
from craft.plan import PipelinePlan
from pipelines.resources import apply_resources, profile_settings, settings_for

PIPELINE_NAME = "craft"
DEFAULT_PROFILE = "demo-histo"
# task display name -> its settings in pipelines/resources.py, where the two differ
RESOURCE_STEP: dict[str, str] = {}


def _sized(task, name: str, resources: str | None = None, *, sizes=None, gate=None):
    """Name the task and give it its step's Kubernetes settings (pipelines/resources.py, with the profile's
    ``resources`` section ``sizes``); a task that asks for GPUs runs after ``gate`` (the validate task)."""
    step = resources or name
    task.set_display_name(name)
    if resources and resources != name:
        RESOURCE_STEP[name] = resources
    settings = settings_for(step, profile_settings(sizes, step))
    apply_resources(task, step, settings)
    if gate is not None and uses_gpus(settings):
        task.after(gate)
    return task


def uses_gpus(settings: dict) -> bool:
    """Whether a task with these settings holds GPUs: its own accelerator, or a multi-node job's."""
    return bool(settings.get("accelerator")) or int(settings.get("nodes") or 1) > 1


def pipeline_name(profile: str | None) -> str:
    """The KFP pipeline name of a profile's plan: ``craft-<profile>`` (one pipeline per profile)."""
    return f"{PIPELINE_NAME}-{Path(profile).stem}" if profile else PIPELINE_NAME


def build_pipeline(
    plan: PipelinePlan | None = None,
    controlnet_conditions: tuple[str, ...] = (),
    *,
    name: str = PIPELINE_NAME,
    pipeline_version: str = "",
    default_profile: str = DEFAULT_PROFILE,
    resources=None,
):
    """The pipeline function for ``plan`` (which optional tasks exist); compile it or call it under kfp.local.

    ``pipeline_version`` (profile and code version, fixed at compile time) is recorded in the lineage of
    what the run registers. ``default_profile`` is the run form's default for ``profile``: the profile whose
    plan this DAG is, so a run started from the UI with the defaults runs that profile's settings.
    ``resources`` (craft.launch.ResourcesConfig, None = the defaults) sizes the pods.
    """
    from craft.version import code_version

    plan = plan or PipelinePlan()
    resources_cfg = resources
    pipeline_version = pipeline_version or f"{name}@{code_version()}"
    plan.validate()
    if controlnet_conditions and plan.foundation != "train":
        raise ValueError("controlnet: the comparison with the plain base needs the stage-1 model (foundation: train)")

    @dsl.pipeline(
        name=name,
        description="CRAFTS foundation training + CRAFT clinical reward finetuning, evaluation and gated promotion.",
    )
    def craft_pipeline(
        profile: str = default_profile,
        overrides: list = [],  # noqa: B006  (KFP parameter default)
        dataset_uri: str = "",
        base_uri: str = "",
        model_name: str = "",
    ):
        """Run every stage of the plan.

        Args:
            profile: bundled profile name (demo-histo, demo-cxr, chexpert, ...) or a YAML path in the image.
            overrides: pipeline-wide config overrides, each "stage.key=value" (e.g. "data.n=800").
            dataset_uri: empty for the profile's demo data; s3://bucket/prefix of a committed dataset;
                or a local folder (kfp.local) holding a dataset or a collection to import.
            base_uri: foundation checkpoint (folder or s3:// prefix): the start of stage 1, or with
                pipeline.foundation=import the foundation model itself; empty = train from scratch.
            model_name: registry name gated and promoted by this run; empty = the profile's name.
        """
        validated = None  # the validate task, once it exists: every GPU task runs after it

        def _step(task, name: str, resources: str | None = None):
            return _sized(task, name, resources, sizes=resources_cfg, gate=validated)

        common = {"profile": profile, "overrides": overrides}
        version = _step(dataset_version_op(dataset_uri=dataset_uri, **common), "dataset-version")
        common_data = {**common, "dataset_version": version.output}  # tasks that read the data
        data = _step(prepare_data_op(dataset_uri=dataset_uri, **common_data), "data")
        dataset = data.outputs["dataset"]
        # the plan check runs here, before any GPU or MLLM step, in a step that is never retried: a dataset or
        # profile that lacks something fails once, in seconds, naming the fix (craft.plan.check_plan)
        validate = _step(validate_op(dataset=dataset, base_uri=base_uri, **common_data), "validate")
        validated = validate
        if plan.until == "validate":
            return
        annotate = _step(annotate_op(dataset=dataset, **common_data), "annotate")
        annotate.after(validate)  # never spend MLLM requests on a dataset that failed validation
        annotations = annotate.outputs["annotations"]
        if plan.until == "annotate":
            return

        stage1 = None
        if plan.foundation == "train":
            pretrain = _step(pretrain_op(base_uri=base_uri, dataset=dataset, **common_data), "pretrain")
            stage1 = pretrain.outputs["model"]
            finetune = _step(finetune_op(dataset=dataset, base=stage1, **common_data), "finetune")
            base = finetune.outputs["model"]
        else:
            base = _step(import_model_op(uri=base_uri), "import-foundation", "data").outputs["model"]

        if plan.encoders == "train":
            roles = {
                role: _step(
                    encoder_op(dataset=dataset, role=role, annotations=annotations, **common_data), role, "encoders"
                )
                for role in ("critic", "evaluator")
            }
            critic, evaluator = (roles[r].outputs["encoder"] for r in ("critic", "evaluator"))
        else:
            critic = _step(import_model_op(uri=plan.critic_uri), "import-critic", "data").outputs["model"]
            evaluator = _step(import_model_op(uri=plan.evaluator_uri), "import-evaluator", "data").outputs["model"]
        critic_probe = _step(probe_op(encoder=critic, dataset=dataset, **common_data), "critic-probe", "probe")
        eval_probe = _step(probe_op(encoder=evaluator, dataset=dataset, **common_data), "evaluator-probe", "probe")

        variants = {}
        if "ti" in plan.baselines:
            ti = _step(ti_op(base=base, dataset=dataset, **common_data), "ti", "baselines")
            variants["ti"] = ti.outputs["model"]
        if "ti_lora" in plan.baselines:
            ti_lora = _step(
                ti_lora_op(base=base, dataset=dataset, annotations=annotations, ti=variants["ti"], **common_data),
                "ti-lora",
                "baselines",
            )
            variants["ti_lora"] = ti_lora.outputs["model"]
        if "dpo" in plan.baselines:
            dpo = _step(
                dpo_op(base=base, dataset=dataset, annotations=annotations, critic=critic,
                       probe=critic_probe.outputs["probe"], start=variants["ti_lora"], **common_data),
                "dpo",
            )  # fmt: skip
            variants["dpo"] = dpo.outputs["model"]
        start = {"start": variants["ti_lora"]} if plan.craft_start == "ti_lora" else {}
        if plan.referee != "none":  # the reward monitor's referee: a third encoder, never the evaluator (issue 21)
            if plan.referee == "train":
                referee = _step(encoder_op(dataset=dataset, role="referee", annotations=annotations, **common_data),
                                "referee", "encoders").outputs["encoder"]  # fmt: skip
            else:
                referee = _step(import_model_op(uri=plan.referee_uri), "import-referee", "data").outputs["model"]
            referee_probe = _step(probe_op(encoder=referee, dataset=dataset, **common_data), "referee-probe", "probe")
            start.update(referee=referee, referee_probe=referee_probe.outputs["probe"])
        for k in range(1, plan.critic_ensemble + 1):  # the reward ensemble's extra critics: the craft step only
            member = _step(encoder_op(dataset=dataset, role=f"critic-{k}", annotations=annotations, **common_data),
                           f"critic-{k}", "encoders").outputs["encoder"]  # fmt: skip
            member_probe = _step(
                probe_op(encoder=member, dataset=dataset, **common_data), f"critic-{k}-probe", "probe"
            )
            start.update({f"critic_{k}": member, f"critic_{k}_probe": member_probe.outputs["probe"]})
        craft = _step(
            reward_op(base=base, dataset=dataset, annotations=annotations, critic=critic,
                      probe=critic_probe.outputs["probe"], **start, **common_data),
            "craft",
        )  # fmt: skip

        if stage1 is not None:
            variants["stage1"] = stage1  # CRAFTS stage 1 alone, evaluated beside stage 2 (the zero-shot base)
        for condition in controlnet_conditions:
            on_crafts = _step(controlnet_op(base=base, dataset=dataset, condition=condition, **common_data),
                              f"controlnet-{condition}", "controlnet")  # fmt: skip
            on_plain = _step(controlnet_op(base=stage1, dataset=dataset, condition=condition, **common_data),
                             f"controlnet-{condition}-plain-base", "controlnet")  # fmt: skip
            _step(
                controlnet_eval_op(crafts_controlnet=on_crafts.outputs["controlnet"], crafts_base=base,
                                   base_controlnet=on_plain.outputs["controlnet"], plain_base=stage1,
                                   dataset=dataset, evaluator=evaluator, **common_data),
                f"controlnet-{condition}-eval",
                "evaluate",
            )  # fmt: skip

        champion = _step(champion_op(model_name=model_name, **common), "champion")
        evaluate = _step(
            evaluate_op(dataset=dataset, annotations=annotations, evaluator=evaluator,
                        evaluator_probe=eval_probe.outputs["probe"], critic=critic,
                        critic_probe=critic_probe.outputs["probe"], base=base, craft=craft.outputs["model"],
                        champion=champion.outputs["champion"], **variants, **common_data),
            "evaluate",
        )  # fmt: skip
        gate = _step(gate_op(results=evaluate.outputs["results"], model_name=model_name, **common), "gate")
        with dsl.If(gate.outputs["Output"] == True, name="gates-passed"):  # noqa: E712  (KFP condition)
            _step(
                register_op(base=base, adapter=craft.outputs["model"], results=evaluate.outputs["results"],
                            dataset=dataset, validation=validate.outputs["validation"], model_name=model_name,
                            pipeline_version=pipeline_version, **common),
                "register",
            )  # fmt: skip

    return craft_pipeline


def pipeline_for_profile(profile: str | None, overrides: list[str] = ()):
    """Build the pipeline from ``profile``'s plan (the ``pipeline`` and ``controlnet`` sections + overrides)."""
    from craft.config import check_run_overrides, load_profile, load_stage_config

    overrides = check_run_overrides(overrides)
    if not profile:
        return build_pipeline()
    plan = load_stage_config("pipeline", profile, overrides)
    resources = load_stage_config("resources", profile, overrides)
    conditions: tuple[str, ...] = ()
    if "controlnet" in load_profile(profile) and plan.until == "all":
        cn = load_stage_config("controlnet", profile, overrides)
        conditions = tuple(cn.conditions) if cn.enabled else ()
    return build_pipeline(plan, conditions, name=pipeline_name(profile), default_profile=str(profile),
                          resources=resources)  # fmt: skip


def compile_pipeline(output: str | Path, profile: str | None = DEFAULT_PROFILE) -> Path:
    """Compile the pipeline built from ``profile``'s plan to a YAML file for upload to Kubeflow Pipelines."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_for_profile(profile), str(output))
    return output


# The default pipeline (the demo-histo plan: every stage, both ControlNets), for `kfp` tooling that
# imports a module-level pipeline function.
craft_pipeline = pipeline_for_profile(DEFAULT_PROFILE)
