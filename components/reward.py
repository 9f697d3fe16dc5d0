"""KFP components for CRAFT reward finetuning (DRaFT-K) and the baselines TI, TI+LoRA and DPO."""

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
):
    """CRAFT: LoRA reward finetuning with DRaFT-K against the frozen critic and probe (from ``start`` when given)."""
    from craft.train.reward import step

    args = (dataset.path, annotations.path, critic.path, probe.path, base.path, model.path, profile, overrides)
    for key, value in step(*args, start_dir=start.path if start is not None else None).items():
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
):
    """Baseline: textual inversion, one learned token per class."""
    from craft.train.baselines import step

    for key, value in step("ti", dataset.path, base.path, model.path, profile, overrides).items():
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
):
    """Baseline: TI tokens (from the ti step), then LoRA on the UNet cross-attention with the diffusion loss."""
    from craft.train.baselines import step

    res = step("ti_lora", dataset.path, base.path, model.path, profile, overrides, annotations.path,
               start_dir=ti.path)  # fmt: skip
    for key, value in res.items():
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
):
    """Baseline: Diffusion-DPO from the TI+LoRA model on critic-judged pairs of seed-varied samples."""
    from craft.train.baselines import step

    res = step("dpo", dataset.path, base.path, model.path, profile, overrides, annotations.path, critic.path,
               probe.path, start.path)  # fmt: skip
    for key, value in res.items():
        metrics.log_metric(key, value)
