"""KFP components for the last steps: the promotion gate and registration (craft/promote.py)."""

from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from components.images import cpu_component


@cpu_component()
def gate_op(
    results: Input[Dataset], profile: str, overrides: list, model_name: str, decision: Output[HTML],
    metrics: Output[Metrics],
) -> bool:  # fmt: skip
    """Compare the candidate's evaluation with the production model's under the profile's gates; True = passed."""
    from craft.promote import gate_step

    passed, ui = gate_step(results.path, decision.path, profile, overrides, model_name)
    for key, value in ui.items():
        metrics.log_metric(key, value)
    # a plain return value, not a NamedTuple: kfp.local (2.17) cannot resolve a NamedTuple field in a
    # dsl.If condition ("Could not resolve parent input") and silently skipped the register branch
    return passed


@cpu_component()
def register_op(
    base: Input[Model], adapter: Input[Model], results: Input[Dataset], profile: str, overrides: list,
    model_name: str, metrics: Output[Metrics],
):  # fmt: skip
    """Register the gated candidate (base with its adapter merged) and move the production pointer."""
    from craft.promote import register_step

    for key, value in register_step(base.path, adapter.path, results.path, profile, overrides, model_name).items():
        metrics.log_metric(key, value)
