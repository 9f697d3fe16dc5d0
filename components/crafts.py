"""KFP components for CRAFTS foundation training (stage 1 pretrain, stage 2 finetune) and sampling.

Training enters through craft.launch (one process, torchrun in the pod, or a multi-node job, as compiled);
``run_id`` and ``task_name`` make the checkpoint prefix a retried attempt resumes from.
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.images import gpu_component


@gpu_component()
def pretrain_op(
    profile: str,
    overrides: list,
    dataset_version: str,
    base_uri: str,
    dataset: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    run_id: str = dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    task_name: str = dsl.PIPELINE_TASK_NAME_PLACEHOLDER,
):
    """CRAFTS stage 1: weak-caption pretraining with L_corr (from base_uri, or from scratch when empty)."""
    from craft.launch import Artifact, run_step

    args = dict(stage="pretrain", dataset_dir=Artifact.read(dataset), model_dir=Artifact.write(model), profile=profile,
                overrides=overrides, base=base_uri)  # fmt: skip
    for key, value in run_step("craft.train.crafts:step", args, config="pretrain", run_id=run_id,
                               task=task_name).items():  # fmt: skip
        metrics.log_metric(key, value)


@gpu_component()
def finetune_op(
    profile: str,
    overrides: list,
    dataset_version: str,
    dataset: Input[Dataset],
    base: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
    run_id: str = dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    task_name: str = dsl.PIPELINE_TASK_NAME_PLACEHOLDER,
):
    """CRAFTS stage 2: labelled fine-tuning with L_corr + L_cate, starting from the stage-1 (or imported) model."""
    from craft.launch import Artifact, run_step

    args = dict(stage="finetune", dataset_dir=Artifact.read(dataset), model_dir=Artifact.write(model),
                profile=profile, overrides=overrides, base=Artifact.read(base))  # fmt: skip
    for key, value in run_step("craft.train.crafts:step", args, config="finetune", run_id=run_id,
                               task=task_name).items():  # fmt: skip
        metrics.log_metric(key, value)


@gpu_component()
def sample_op(
    model: Input[Model], prompts: list, n: int, steps: int, guidance: float, seed: int, samples: Output[Artifact]
):
    """Sample n images per prompt (DDIM, classifier-free guidance) into PNGs and a grid."""
    from craft.sample import sample

    sample(model.path, list(prompts), n, samples.path, steps=steps, guidance=guidance, seed=seed)
