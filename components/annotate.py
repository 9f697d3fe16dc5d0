"""KFP component for the annotate stage: enriched prompts and class checklists (CRAFT section 3.1)."""

from kfp.dsl import Dataset, Input, Metrics, Output

from components.images import cpu_component


@cpu_component()
def annotate_op(
    dataset: Input[Dataset],
    profile: str,
    overrides: list,
    dataset_version: str,
    annotations: Output[Dataset],
    metrics: Output[Metrics],
):
    """Write annotations.parquet and checklists.json for the dataset with the profile's annotate backend."""
    from craft.annotate.run import annotate_step

    for key, value in annotate_step(dataset.path, annotations.path, profile, overrides).items():
        metrics.log_metric(key, value)
