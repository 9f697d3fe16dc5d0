"""KFP components for the frozen encoders (critic / evaluator) and their DD linear probes (CRAFT sec. 4.1.4, A.2)."""

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.images import gpu_component


@gpu_component()
def encoder_op(
    dataset: Input[Dataset],
    role: str,
    profile: str,
    overrides: list,
    dataset_version: str,
    encoder: Output[Model],
    metrics: Output[Metrics],
    annotations: Input[Dataset] = None,
):
    """Train one role's small dual encoder contrastively on the training split (enriched prompts when given)."""
    from craft.train.encoder import encoder_step

    ann = annotations.path if annotations is not None else None
    for key, value in encoder_step(dataset.path, ann, role, encoder.path, profile, overrides).items():
        metrics.log_metric(key, value)


@gpu_component()
def probe_op(
    encoder: Input[Model], dataset: Input[Dataset], profile: str, overrides: list, dataset_version: str, probe: Output[Model],
    metrics: Output[Metrics],
):  # fmt: skip
    """Train the DD linear probe on the frozen encoder's embeddings of the real training images."""
    from craft.train.probe import probe_step

    for key, value in probe_step(encoder.path, dataset.path, probe.path, profile, overrides).items():
        metrics.log_metric(key, value)
