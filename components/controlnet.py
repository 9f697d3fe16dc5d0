"""KFP components for ControlNet on the foundation model (CRAFTS, "Structure-controllable image generation")."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from components.images import gpu_component


@gpu_component()
def controlnet_op(
    base: Input[Model], dataset: Input[Dataset], condition: str, profile: str, overrides: list, dataset_version: str,
    controlnet: Output[Model], metrics: Output[Metrics], run_id: str = dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    task_name: str = dsl.PIPELINE_TASK_NAME_PLACEHOLDER,
):  # fmt: skip
    """Train a ControlNet (mask or fluorescence -> H&E) on the frozen base model (through craft.launch)."""
    from craft.launch import Artifact, run_step

    args = dict(dataset_dir=Artifact.read(dataset), base_dir=Artifact.read(base),
                out_dir=Artifact.write(controlnet), condition=condition, profile=profile, overrides=overrides)  # fmt: skip
    for key, value in run_step("craft.train.controlnet:step", args, config="controlnet", run_id=run_id,
                               task=task_name).items():  # fmt: skip
        metrics.log_metric(key, value)


@gpu_component()
def controlnet_eval_op(
    crafts_controlnet: Input[Model], crafts_base: Input[Model], base_controlnet: Input[Model],
    plain_base: Input[Model], dataset: Input[Dataset], profile: str, overrides: list, dataset_version: str, triplets: Output[HTML],
    metrics: Output[Metrics], evaluator: Input[Model] = None,
):  # fmt: skip
    """Compare the CRAFTS ControlNet with the one on the plain base: paired metrics, FID, mask adherence, triplets."""
    from craft.evaluate.controlnet_eval import compare_step

    for key, value in compare_step(
        crafts_controlnet.path, crafts_base.path, base_controlnet.path, plain_base.path, dataset.path,
        triplets.path, profile, overrides, evaluator.path if evaluator is not None else "",
    ).items():  # fmt: skip
        metrics.log_metric(key, value)
