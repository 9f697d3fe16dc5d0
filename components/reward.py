"""KFP components for CRAFT reward finetuning (DRaFT-K) and the baselines TI, TI+LoRA and DPO.

Each enters through craft.launch (the CRAFT stage may run as several processes: DDP over prompts; the
baselines run as one); ``run_id`` and ``task_name`` make the checkpoint prefix a retried attempt resumes from.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import gpu_component


@gpu_component()
def reward_op(
    profile: str,
    overrides: list,
    dataset_version: str,
    base: Input[Model],
    dataset: Input[Dataset],
    annotations: Input[Dataset],
    critic: Input[Model],
    probe: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
    start: Input[Model] = None,
    referee: Input[Model] = None,
    referee_probe: Input[Model] = None,
    critic_1: Input[Model] = None,
    critic_1_probe: Input[Model] = None,
    critic_2: Input[Model] = None,
    critic_2_probe: Input[Model] = None,
    run_id: str = dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    task_name: str = dsl.PIPELINE_TASK_NAME_PLACEHOLDER,
):
    """CRAFT: LoRA reward finetuning with DRaFT-K against the frozen critic and probe (from ``start`` when given);
    ``referee`` + ``referee_probe``: the over-optimisation monitor's second judge (reward.monitor, never the evaluator);
    ``critic_K`` + ``critic_K_probe``: the reward ensemble's extra critics (reward.ensemble, pipeline.critic_ensemble)."""
    from craft.launch import Artifact, run_step

    args = dict(dataset_dir=Artifact.read(dataset), annotations_dir=Artifact.read(annotations),
                critic_dir=Artifact.read(critic), probe_dir=Artifact.read(probe), base=Artifact.read(base),
                model_dir=Artifact.write(model), profile=profile, overrides=overrides,
                start_dir=Artifact.read(start), referee_dir=Artifact.read(referee),
                referee_probe_dir=Artifact.read(referee_probe),
                critic_1_dir=Artifact.read(critic_1), critic_1_probe_dir=Artifact.read(critic_1_probe),
                critic_2_dir=Artifact.read(critic_2), critic_2_probe_dir=Artifact.read(critic_2_probe))  # fmt: skip
    for key, value in run_step("craft.train.reward:step", args, config="reward", run_id=run_id,
                               task=task_name).items():  # fmt: skip
        metrics.log_metric(key, value)


@gpu_component()
def ti_op(
    profile: str,
    overrides: list,
    dataset_version: str,
    base: Input[Model],
    dataset: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    run_id: str = dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    task_name: str = dsl.PIPELINE_TASK_NAME_PLACEHOLDER,
):
    """Baseline: textual inversion, one learned token per class."""
    from craft.launch import Artifact, run_step

    args = dict(stage="ti", dataset_dir=Artifact.read(dataset), base=Artifact.read(base),
                model_dir=Artifact.write(model), profile=profile, overrides=overrides)  # fmt: skip
    for key, value in run_step("craft.train.baselines:step", args, config="ti", run_id=run_id,
                               task=task_name).items():  # fmt: skip
        metrics.log_metric(key, value)


@gpu_component()
def ti_lora_op(
    profile: str,
    overrides: list,
    dataset_version: str,
    base: Input[Model],
    dataset: Input[Dataset],
    annotations: Input[Dataset],
    ti: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
    run_id: str = dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    task_name: str = dsl.PIPELINE_TASK_NAME_PLACEHOLDER,
):
    """Baseline: TI tokens (from the ti step), then LoRA on the UNet cross-attention with the diffusion loss."""
    from craft.launch import Artifact, run_step

    args = dict(stage="ti_lora", dataset_dir=Artifact.read(dataset), base=Artifact.read(base),
                model_dir=Artifact.write(model), profile=profile, overrides=overrides,
                annotations_dir=Artifact.read(annotations), start_dir=Artifact.read(ti))  # fmt: skip
    for key, value in run_step("craft.train.baselines:step", args, config="ti_lora", run_id=run_id,
                               task=task_name).items():  # fmt: skip
        metrics.log_metric(key, value)


@gpu_component()
def dpo_op(
    profile: str,
    overrides: list,
    dataset_version: str,
    base: Input[Model],
    dataset: Input[Dataset],
    annotations: Input[Dataset],
    critic: Input[Model],
    probe: Input[Model],
    start: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
    run_id: str = dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    task_name: str = dsl.PIPELINE_TASK_NAME_PLACEHOLDER,
):
    """Baseline: Diffusion-DPO from the TI+LoRA model on critic-judged pairs of seed-varied samples."""
    from craft.launch import Artifact, run_step

    args = dict(stage="dpo", dataset_dir=Artifact.read(dataset), base=Artifact.read(base),
                model_dir=Artifact.write(model), profile=profile, overrides=overrides,
                annotations_dir=Artifact.read(annotations), critic_dir=Artifact.read(critic),
                probe_dir=Artifact.read(probe), start_dir=Artifact.read(start))  # fmt: skip
    for key, value in run_step("craft.train.baselines:step", args, config="dpo", run_id=run_id,
                               task=task_name).items():  # fmt: skip
        metrics.log_metric(key, value)
