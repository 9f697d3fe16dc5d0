"""The bundled real-collection profiles (CheXpert, BreakHis, Fitzpatrick17k, ORIGA) load, keep the critic
and the evaluator apart (CRAFT sec. 4.1.4), never use the demo oracle, and compile into a pipeline."""

import pytest
import yaml

from craft.config import config_dir, load_profile, load_stage_config
from pipelines.craft_pipeline import compile_pipeline

REAL_PROFILES = ("chexpert", "breakhis", "fitzpatrick17k", "origa")
# every stage the pipeline runs for an imported foundation + imported encoders
EXPECTED_SECTIONS = {"pipeline", "import", "validate", "annotate", "encoders", "probe", "reward", "ti", "ti_lora",
                     "dpo", "controlnet", "evaluate", "gates"}  # fmt: skip


def _classes(fmt: str) -> tuple[list[str], str]:
    """The labels the importer writes for ``fmt`` and the dataset modality."""
    from craft.data import importers as im

    labels = {
        "chexpert": list(im.CHEXPERT_CLASSES.values()),
        "breakhis": [c for kind in im.BREAKHIS_CLASSES.values() for c in kind],
        "fitzpatrick17k": [im.slug(c) for c in im.FITZPATRICK_CONDITIONS],
        "origa": list(im.ORIGA_CLASSES),
    }[fmt]
    return labels, im.MODALITY_OF[fmt]


@pytest.mark.parametrize("name", REAL_PROFILES)
def test_profile_loads_every_section_at_paper_settings(name):
    assert (config_dir() / f"{name}.yaml").is_file()
    sections = set(load_profile(name))
    assert EXPECTED_SECTIONS <= sections, EXPECTED_SECTIONS - sections
    cfgs = {stage: load_stage_config(stage, name) for stage in sections}

    plan, enc = cfgs["pipeline"], cfgs["encoders"]
    assert plan.foundation == "import" and plan.encoders == "import"
    assert plan.critic_uri.startswith("s3://") and plan.evaluator_uri.startswith("s3://")
    assert plan.critic_uri != plan.evaluator_uri and enc.critic != enc.evaluator
    assert (enc.critic, enc.evaluator) == (plan.critic_uri, plan.evaluator_uri)

    ev = cfgs["evaluate"]
    assert ev.oracle.enabled is False and ev.max_prompts == 0 and ev.samples_per_prompt >= 2
    assert ev.downstream.enabled and ev.device == "cuda"
    assert cfgs["gates"].oracle_accuracy.enabled is False
    assert cfgs["controlnet"].enabled is False

    assert cfgs["import"].format == name and cfgs["import"].resolution == 512
    ann = cfgs["annotate"]
    assert ann.backend == "openai" and ann.model and ann.base_url.startswith("http")
    reward = cfgs["reward"]
    assert (reward.k, reward.n_repeats, reward.loop.batch_size) == (1, 2, 4)
    assert cfgs["dpo"].n_pairs == 1024
    for stage in ("reward", "ti", "ti_lora", "dpo"):
        assert cfgs[stage].loop.mixed_precision == "bf16" and cfgs[stage].device == "cuda"


@pytest.mark.parametrize("name", REAL_PROFILES)
def test_bundled_checklist_covers_the_importer_classes(name):
    from craft.annotate.checklists import SHIPPED, load_checklist

    ann = load_stage_config("annotate", name)
    classes, modality = _classes(load_stage_config("import", name).format)
    if ann.checklist in SHIPPED:
        assert list(load_checklist(ann.checklist, classes, modality)) == classes
    else:  # origa: the MLLM writes it (the bundled origa.json is keyed by other labels)
        assert ann.checklist == "generate"


@pytest.mark.parametrize("name", REAL_PROFILES)
def test_pipeline_compiles_with_profile(name, tmp_path):
    out = compile_pipeline(tmp_path / f"{name}.yaml", name)
    spec = next(yaml.safe_load_all(out.read_text()))
    tasks = {t["taskInfo"]["name"] for t in spec["root"]["dag"]["tasks"].values()}
    assert {"import-foundation", "import-critic", "import-evaluator", "craft", "ti", "ti-lora", "dpo",
            "evaluate", "gate"} <= tasks  # fmt: skip
    assert not {t for t in tasks if t.startswith(("controlnet", "pretrain", "finetune"))}
    assert {"critic", "evaluator"}.isdisjoint(tasks)  # encoders are imported, never trained here
    plan = load_stage_config("pipeline", name)
    text = out.read_text()
    assert plan.critic_uri in text and plan.evaluator_uri in text
