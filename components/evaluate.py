"""KFP component for the evaluate stage: every variant under one protocol, scored by the evaluator (CRAFT sec. 4).

KFP needs a fixed signature, so each generator variant is its own optional ``Input[Model]``: a
diffusers pipeline folder (``base``, ``stage1``) or a craft adapter folder (``craft``, ``ti``,
``ti_lora``, ``dpo``) applied on ``base``; ``champion`` is the production model (craft.promote.champion_step),
scored beside the candidate so the gates compare two numbers from one evaluation. ``base`` (reported as the zero-shot variant) and ``craft``
(the candidate) are required; optional variants left unconnected (None) are not evaluated. The real
held-out images always are. ``critic`` is only read for its weights hash: an evaluator with the same
weights is refused; with ``critic_probe`` connected, the critic's training reward is reported per variant
beside the evaluator's metrics.
"""

from kfp.dsl import HTML, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components.images import gpu_component


@gpu_component()
def evaluate_op(
    dataset: Input[Dataset],
    annotations: Input[Dataset],
    evaluator: Input[Model],
    evaluator_probe: Input[Model],
    critic: Input[Model],
    base: Input[Model],
    craft: Input[Model],
    profile: str,
    overrides: list,
    dataset_version: str,
    metrics: Output[Metrics],
    report: Output[HTML],
    probe_confusion: Output[ClassificationMetrics],
    results: Output[Dataset],
    ti: Input[Model] = None,
    ti_lora: Input[Model] = None,
    dpo: Input[Model] = None,
    stage1: Input[Model] = None,
    critic_probe: Input[Model] = None,
    champion: Input[Model] = None,
):
    """Write metrics.json, per_image.parquet and report.html for every connected variant; log the gate metrics."""
    from craft.evaluate.run import evaluate_step, flat_metrics
    from craft.promote import champion_of

    champion_version = champion_of(champion.path) if champion is not None else None
    given = {"zero_shot": base, "craft": craft, "ti": ti, "ti_lora": ti_lora, "dpo": dpo, "stage1": stage1,
             "champion": champion if champion_version else None}  # fmt: skip
    out, cm = evaluate_step(dataset.path, annotations.path, evaluator.path, evaluator_probe.path, critic.path,
                            {k: v.path if v is not None else None for k, v in given.items()}, results.path, profile,
                            overrides, report_file=report.path,
                            critic_probe_dir=critic_probe.path if critic_probe is not None else None,
                            champion_version=champion_version)  # fmt: skip
    for key, value in flat_metrics(out).items():
        metrics.log_metric(key, value)
    probe_confusion.log_confusion_matrix(cm["categories"], cm["matrix"])
