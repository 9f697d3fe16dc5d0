"""The craft pipeline: one DAG from dataset to gated model (DESIGN.md, "Data flow").

No `from __future__ import annotations` in this file or components/: KFP reads the real annotations.

validate -> annotate -> [pretrain -> finetune] -> encoders -> probe -> {baselines, CRAFT}
-> [ControlNet] -> evaluate -> gate -> register. Each stage adds its task here; every task takes
the profile name and the pipeline-wide overrides (``stage.key=value``) so one UI form drives all.
"""

from pathlib import Path

from kfp import compiler, dsl

from components.annotate import annotate_op
from components.data import prepare_data_op, validate_op
from pipelines.resources import apply_resources, settings_for

PIPELINE_NAME = "craft"


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="CRAFTS foundation training + CRAFT clinical reward finetuning, evaluation and gated promotion.",
)
def craft_pipeline(profile: str = "demo-histo", overrides: list = [], dataset_uri: str = ""):  # noqa: B006
    """Run every stage the profile enables.

    Args:
        profile: bundled profile name (demo-histo, demo-cxr, chexpert, ...) or a YAML path in the image.
        overrides: pipeline-wide config overrides, each "stage.key=value" (e.g. "data.n=800").
        dataset_uri: empty for the profile's demo data; s3://bucket/prefix of a committed dataset;
            or a local folder (kfp.local) holding a dataset or a collection to import.
    """

    def step(task, name: str):
        """Name the task and give it its step's Kubernetes settings (pipelines/resources.py)."""
        task.set_display_name(name)
        apply_resources(task, name, settings_for(name))
        return task

    data = step(prepare_data_op(profile=profile, overrides=overrides, dataset_uri=dataset_uri), "data")
    validate = step(validate_op(profile=profile, overrides=overrides, dataset=data.outputs["dataset"]), "validate")
    annotate = step(annotate_op(profile=profile, overrides=overrides, dataset=data.outputs["dataset"]), "annotate")
    annotate.after(validate)  # never spend MLLM requests on a dataset that failed validation


def compile_pipeline(output: str | Path) -> Path:
    """Compile the pipeline to a YAML file for upload to Kubeflow Pipelines."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(craft_pipeline, str(output))
    return output
