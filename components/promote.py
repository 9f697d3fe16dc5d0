"""KFP components for the champion, the promotion gate and candidate registration (craft/promote.py)."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from components.images import cpu_component


@cpu_component()
def champion_op(profile: str, overrides: list, model_name: str, champion: Output[Model]) -> str:
    """Download the model in production (the champion the candidate is scored beside); '' when none."""
    from craft.promote import champion_step

    return champion_step(champion.path, profile, overrides, model_name)


@cpu_component()
def gate_op(
    results: Input[Dataset], profile: str, overrides: list, model_name: str, decision: Output[HTML],
    verdict: Output[Dataset], metrics: Output[Metrics],
) -> bool:  # fmt: skip
    """Candidate versus champion from the same evaluation under the profile's gates; True = passed."""
    from craft.promote import gate_step

    passed, ui = gate_step(results.path, decision.path, profile, overrides, model_name, decision_dir=verdict.path)
    for key, value in ui.items():
        metrics.log_metric(key, value)
    # a plain return value, not a NamedTuple: kfp.local (2.17) cannot resolve a NamedTuple field in a
    # dsl.If condition ("Could not resolve parent input") and silently skipped the register branch
    return passed


@cpu_component()
def register_op(
    base: Input[Model], adapter: Input[Model], results: Input[Dataset], dataset: Input[Dataset],
    validation: Input[Dataset], profile: str, overrides: list, model_name: str, pipeline_version: str,
    registered: Output[Dataset], metrics: Output[Metrics],
    run_id: str = dsl.PIPELINE_JOB_ID_PLACEHOLDER, run_name: str = dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
):  # fmt: skip
    """Register the gated candidate (base with its adapter merged) with its lineage; production never moves."""
    from craft.promote import build_lineage, register_step

    lineage = build_lineage(
        dataset_dir=dataset.path, validation_dir=validation.path, validation_uri=validation.uri,
        results_dir=results.path, evaluation_uri=results.uri, profile=profile, overrides=overrides,
        run_id=run_id, run_name=run_name, pipeline_version=pipeline_version,
        parents={"base": base.uri, "adapter": adapter.uri},
    )  # fmt: skip
    res = register_step(base.path, adapter.path, results.path, profile, overrides, model_name, lineage,
                        out_dir=registered.path)  # fmt: skip
    for key, value in res.items():
        metrics.log_metric(key, value)
