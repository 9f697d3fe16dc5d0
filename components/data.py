"""KFP components for the data stages: prepare (demo / download / import) and validate."""

from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from components.images import cpu_component


@cpu_component()
def prepare_data_op(
    profile: str, overrides: list, dataset_uri: str, dataset: Output[Dataset], metrics: Output[Metrics]
):
    """Materialise the dataset: demo data when dataset_uri is empty, else download or import it."""
    from craft.steps import prepare_dataset

    for key, value in prepare_dataset(dataset.path, profile, overrides, dataset_uri).items():
        metrics.log_metric(key, value)


@cpu_component()
def validate_op(
    profile: str, overrides: list, dataset: Input[Dataset], report: Output[HTML], metrics: Output[Metrics]
):
    """Validate the dataset (schema, files, leakage); the run stops here if it is not valid."""
    from craft.steps import validate_dataset

    for key, value in validate_dataset(dataset.path, report.path, profile, overrides).items():
        metrics.log_metric(key, value)


@cpu_component()
def import_model_op(uri: str, model: Output[Model], metrics: Output[Metrics]):
    """Bring an existing checkpoint (folder or s3:// prefix) into the run as a model artifact."""
    from craft.steps import import_model

    for key, value in import_model(uri, model.path).items():
        metrics.log_metric(key, value)
