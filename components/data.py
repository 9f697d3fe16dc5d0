"""KFP components for the data stages: resolve the dataset version, materialise it, validate it."""

from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from components.images import cpu_component


@cpu_component()
def dataset_version_op(profile: str, overrides: list, dataset_uri: str) -> str:
    """Resolve dataset_uri (a latest pointer, a prefix, a folder, DVC) to its content version; never cached."""
    from craft.steps import dataset_version_step

    return dataset_version_step(profile, overrides, dataset_uri)


@cpu_component()
def prepare_data_op(
    profile: str, overrides: list, dataset_uri: str, dataset_version: str, dataset: Output[Dataset],
    metrics: Output[Metrics],
):  # fmt: skip
    """Materialise exactly that dataset version: demo data when dataset_uri is empty, else download or import it."""
    from craft.steps import prepare_dataset

    for key, value in prepare_dataset(dataset.path, profile, overrides, dataset_uri, dataset_version).items():
        metrics.log_metric(key, value)


@cpu_component()
def validate_op(
    profile: str, overrides: list, dataset_version: str, base_uri: str, dataset: Input[Dataset],
    report: Output[HTML], validation: Output[Dataset], metrics: Output[Metrics],
):  # fmt: skip
    """Check the plan (what the profile's stages need), validate the dataset, record its verdict; never retried."""
    from craft.plan import validate_step

    res = validate_step(dataset.path, report.path, profile, overrides, base_uri, verdict_dir=validation.path)
    for key, value in res.items():
        metrics.log_metric(key, value)


@cpu_component()
def import_model_op(uri: str, model: Output[Model], metrics: Output[Metrics]):
    """Bring an existing checkpoint (folder or s3:// prefix) into the run as a model artifact."""
    from craft.steps import import_model

    for key, value in import_model(uri, model.path).items():
        metrics.log_metric(key, value)
