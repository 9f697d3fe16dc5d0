"""KFP components for CRAFTS foundation training (stage 1 pretrain, stage 2 finetune) and sampling."""

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
):
    """CRAFTS stage 1: weak-caption pretraining with L_corr (from base_uri, or from scratch when empty)."""
    from craft.train.crafts import step

    for key, value in step("pretrain", dataset.path, model.path, profile, overrides, base_uri).items():
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
):
    """CRAFTS stage 2: labelled fine-tuning with L_corr + L_cate, starting from the stage-1 (or imported) model."""
    from craft.train.crafts import step

    for key, value in step("finetune", dataset.path, model.path, profile, overrides, base.path).items():
        metrics.log_metric(key, value)


@gpu_component()
def sample_op(
    model: Input[Model], prompts: list, n: int, steps: int, guidance: float, seed: int, samples: Output[Artifact]
):
    """Sample n images per prompt (DDIM, classifier-free guidance) into PNGs and a grid."""
    from craft.sample import sample

    sample(model.path, list(prompts), n, samples.path, steps=steps, guidance=guidance, seed=seed)
