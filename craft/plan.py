"""Which tasks a compiled pipeline contains: the profile's ``pipeline`` section (stage ``pipeline``).

The DAG is fixed when the pipeline is compiled (``craft pipeline compile --profile P``, or ``craft demo``
for a local run), so the Kubeflow UI shows exactly the tasks that will run; every task still reads its
own stage config from the run's profile and overrides at run time. ControlNet tasks are in the DAG
when the profile's ``controlnet`` section says ``enabled: true`` (they need ``foundation: train``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

BASELINES = ("ti", "ti_lora", "dpo")


@dataclass
class PipelinePlan:
    """Stage ``pipeline``: the optional parts of the DAG (DESIGN.md, "Data flow": brackets are optional)."""

    # train: CRAFTS stage 1 + stage 2 on this dataset (from base_uri, or from scratch when it is empty);
    # import: use the checkpoint at the run's base_uri as the foundation model
    foundation: Literal["train", "import"] = "train"
    # train: small critic/evaluator dual encoders on the training split (demo); import: load the
    # checkpoints named by critic_uri / evaluator_uri (MedSigLIP, SigLIP, ...)
    encoders: Literal["train", "import"] = "train"
    critic_uri: str = ""  # with encoders=import: folder or s3:// prefix of the critic (training reward)
    evaluator_uri: str = ""  # with encoders=import: folder or s3:// prefix of the evaluator (metrics)
    # baselines trained next to CRAFT (zero-shot, the foundation model itself, is always evaluated);
    # ti_lora needs ti and dpo needs ti_lora (each starts from the previous one, as in CRAFT sec. 4.1.2)
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    # where CRAFT's reward finetuning starts (CRAFT sec. 4.1.2 trains TI tokens, then a LoRA, before DRaFT):
    # ti_lora = continue the TI+LoRA baseline's LoRA with its class tokens in the prompts; base = a fresh
    # LoRA on the foundation model
    craft_start: Literal["base", "ti_lora"] = "ti_lora"
    # the reward monitor's referee (issue 21, reward.monitor): none; train = a third small encoder (the encoder
    # stage's referee role, another architecture and seed than the critic) + its probe; import = referee_uri
    referee: Literal["none", "train", "import"] = "none"
    referee_uri: str = ""  # with referee=import: folder or s3:// prefix of the referee encoder (never the evaluator)
    # the reward ensemble's extra critics (issue 21, reward.ensemble): N more encoders trained like the critic (the
    # encoder roles critic-1..critic-N, other seeds) + their probes, read only by the craft step; needs encoders=train
    critic_ensemble: int = 0
    # last stage in the DAG: "validate" or "annotate" build a data-preparation pipeline only
    # (check and annotate a new collection without training); "all" is the whole system
    until: Literal["validate", "annotate", "all"] = "all"

    def validate(self) -> None:
        unknown = sorted(set(self.baselines) - set(BASELINES))
        if unknown:
            raise ValueError(f"baselines: unknown {unknown[0]!r} (known: {', '.join(BASELINES)})")
        if "ti_lora" in self.baselines and "ti" not in self.baselines:
            raise ValueError("baselines: ti_lora starts from the ti tokens; list ti too")
        if "dpo" in self.baselines and "ti_lora" not in self.baselines:
            raise ValueError("baselines: dpo starts from the ti_lora model; list ti_lora too")
        if self.craft_start == "ti_lora" and "ti_lora" not in self.baselines:
            raise ValueError("craft_start: ti_lora continues the ti_lora baseline; list ti and ti_lora in baselines")
        if self.encoders == "import" and not (self.critic_uri and self.evaluator_uri):
            raise ValueError("encoders: import needs critic_uri and evaluator_uri")
        if self.encoders == "import" and self.critic_uri == self.evaluator_uri:
            raise ValueError("critic_uri and evaluator_uri name the same model: the evaluator must be separate")
        if self.referee not in ("none", "train", "import"):
            raise ValueError(f"referee must be none, train or import, got {self.referee!r}")
        if self.referee == "import" and not self.referee_uri:
            raise ValueError("referee: import needs referee_uri")
        if self.referee == "import" and self.referee_uri in (self.critic_uri, self.evaluator_uri):
            raise ValueError("referee_uri names the critic or the evaluator: the referee must be a third model")
        if not 0 <= self.critic_ensemble <= MAX_ENSEMBLE:
            raise ValueError(
                f"critic_ensemble must be in 0..{MAX_ENSEMBLE} (extra critics), got {self.critic_ensemble}"
            )
        if self.critic_ensemble and self.encoders != "train":
            raise ValueError("critic_ensemble: the extra critics are trained like the critic; needs encoders: train")


# ---------------------------------------------------------------- the plan check (issue 19)
# Which stage needs what of a dataset. Checked before anything trains (`craft validate DATASET --config P`
# and the pipeline's validate step, which is never retried): each failure names the missing piece and the
# override or import flag that provides it, in seconds, instead of a stage failing minutes in, retried.
MAX_ENSEMBLE = 2  # extra critics the craft step takes (components/reward.py: critic_1, critic_2)
OFFLINE_MODALITIES = ("histo", "cxr")  # what the offline annotation backend can measure (craft/annotate/backends.py)
MIN_CLASSES = 2  # probes, CAS and the gates classify: one class leaves nothing to tell apart
PROBE_MIN_TRAIN = 2  # train images per class for the linear probes (CRAFT A.2) and the downstream classifier
EVAL_MIN_TEST = 1  # held-out images per class: the evaluation's prompts are stratified by class (CRAFT 4.1.3)
CONDITION_COLUMN = {"mask": "mask_path", "fluorescence": "condition_path"}  # craft/data/conditions.py
MLLM_FIX = ("annotate.backend=openai annotate.model=MODEL annotate.base_url=URL (an OpenAI-compatible MLLM server, "
            "e.g. vLLM) or annotate.backend=transformers annotate.model=DIR")  # fmt: skip


@dataclass
class Missing:
    """One thing the profile's stages need that the dataset or the run does not give, and how to give it."""

    piece: str  # what is missing, with counts
    needed_by: str  # the stage(s) that would fail
    fix: str  # the override or import flag that provides it

    def __str__(self) -> str:
        return f"{self.piece} (needed by {self.needed_by}); fix: {self.fix}"


class PlanError(Exception):
    """The dataset cannot run the profile; the message lists every missing piece and its fix."""

    def __init__(self, where: str, missing: list[Missing]):
        self.missing = missing
        lines = "\n".join(f"  - {m}" for m in missing)
        super().__init__(f"{where}: the profile's stages need what the dataset or run does not give "
                         f"({len(missing)} missing):\n{lines}")  # fmt: skip


def config_errors(profile, overrides=()) -> list[str]:
    """Every stage config of ``profile`` + ``overrides`` that cannot be built (unknown key, wrong type, bad value).

    Each pipeline step builds only its own stage's config, so without this a typo in ``pretrain.loop.stepz=10``
    surfaces when that GPU step starts, and again on its retry. Checked by ``craft pipeline run`` before the host
    is contacted and by the plan check of the validate step (runs started from the Kubeflow UI). [] = all build.
    """
    from craft.config import STAGES, ConfigError, load_stage_config

    errors = []
    for stage in STAGES:
        try:
            load_stage_config(stage, profile, list(overrides))
        except ConfigError as e:
            errors.append(str(e))
    return errors


def check_plan(dataset_dir, profile, overrides=(), base_uri: str = "") -> list[Missing]:
    """What ``profile`` (with ``overrides``) needs of the dataset at ``dataset_dir`` and of the run, and does not get.

    Reads dataset.yaml and the manifest only (no image is decoded): seconds for any collection. Checks, by
    stage in the plan: weak captions for CRAFTS stage 1 (and stage 2 with captions=weak); a square dataset
    resolution equal to the model's when stage 1 trains from scratch; an annotation schema for the modality, a
    backend that can annotate it and a class checklist; mask / condition images for each ControlNet condition;
    enough images per class and split for the probes and the evaluation; the run's base_uri for an imported
    foundation. [] = the plan can run.
    """
    from craft.annotate import checklists as ck
    from craft.annotate.schema import SCHEMAS
    from craft.config import load_profile, load_stage_config
    from craft.data.manifest import MODALITIES, read_manifest, read_meta

    overrides = list(overrides)
    bad = config_errors(profile, overrides)
    if bad:  # the checks below read these configs: report what cannot be built, nothing else
        return [Missing(f"a valid config: {e}", "the step of that stage", "correct or drop that key") for e in bad]
    try:
        meta, df = read_meta(dataset_dir), read_manifest(dataset_dir)
    except (OSError, ValueError) as e:
        return [
            Missing(
                f"a readable dataset: {e}", "every stage", "write it with `craft data import FORMAT SRC --out DIR`"
            )
        ]
    plan = load_stage_config("pipeline", profile, overrides)
    out: list[Missing] = []

    def captioned(split: str) -> tuple[int, int]:
        rows = df[df["split"] == split]
        has = rows["caption"].notna() & (rows["caption"].astype("string").str.strip() != "")
        return int(has.sum()), len(rows)

    if plan.until == "all" and plan.foundation == "train":
        for stage in ("pretrain", "finetune"):
            cfg = load_stage_config(stage, profile, overrides)
            n, total = captioned(cfg.split)
            if cfg.captions == "weak" and n < total:
                out.append(Missing(
                    f"weak captions: {total - n} of {total} {cfg.split} images have none",
                    f"{stage} (CRAFTS stage {1 if stage == 'pretrain' else 2}, captions=weak)",
                    f"re-import with `craft data import ... --captions label` (captions from the class labels), "
                    f"or override {stage}.captions=class (or class+weak)",
                ))  # fmt: skip
        if not base_uri:  # from scratch: the model is built at pretrain.model.resolution
            want = load_stage_config("pretrain", profile, overrides).model.resolution
            res = meta.resolution
            if not isinstance(res, int) or res <= 0:
                out.append(Missing(
                    f"one square image size: dataset.yaml resolution is {res!r} (sizes vary or are not square)",
                    "pretrain (a model trained from scratch has one input size)",
                    f"re-import with `craft data import ... --resolution {want}` (short side resized, centre-cropped)",
                ))  # fmt: skip
            elif res != want:
                out.append(Missing(
                    f"images at the model's resolution: the dataset is {res}x{res}, pretrain.model.resolution {want}",
                    "pretrain (training from scratch at the dataset's resolution)",
                    f"override pretrain.model.resolution={res}, or re-import with --resolution {want}",
                ))  # fmt: skip
    if plan.until == "all" and plan.foundation == "import" and not base_uri:
        out.append(Missing("a foundation checkpoint", "pipeline.foundation=import",
                           "pass the run's base_uri (--base-uri DIR_OR_S3), or set pipeline.foundation=train"))  # fmt: skip

    if plan.until in ("annotate", "all"):
        ann = load_stage_config("annotate", profile, overrides)
        if meta.modality not in SCHEMAS:
            out.append(Missing(
                f"an annotation schema for modality {meta.modality!r}", "annotate",
                f"re-import with `craft data import ... --modality M` (M: {', '.join(m for m in MODALITIES if m in SCHEMAS)};"
                " other = the generic schema)",
            ))  # fmt: skip
        elif ann.backend == "offline" and meta.modality not in OFFLINE_MODALITIES:
            out.append(Missing(
                f"an annotation backend for modality {meta.modality!r} (the offline backend measures "
                f"{', '.join(OFFLINE_MODALITIES)} only)", "annotate", MLLM_FIX,
            ))  # fmt: skip
        src = ann.checklist
        if src == "auto" and meta.name not in ck.SHIPPED:
            out.append(Missing(
                f"class checklists: none bundled for dataset {meta.name!r} (checklist=auto)", "annotate",
                "override annotate.checklist=generate (written by the MLLM backend) or annotate.checklist=PATH.json",
            ))  # fmt: skip
        elif src == "generate" and ann.backend == "offline":
            out.append(Missing("a backend that writes checklists (checklist=generate; offline cannot)", "annotate",
                               MLLM_FIX))  # fmt: skip
        elif src != "generate":  # a bundled name or a file (auto: the bundled one named like the dataset)
            reason = _checklist_problem(meta.name if src == "auto" else src, meta)
            if reason:
                out.append(Missing(f"a checklist that fits the dataset: {reason}", "annotate",
                                   "override annotate.checklist=generate or annotate.checklist=PATH.json"))  # fmt: skip

    if plan.until == "all":
        rcfg = load_stage_config("reward", profile, overrides)
        mon = rcfg.monitor
        if rcfg.ensemble != plan.critic_ensemble:
            out.append(Missing(f"{rcfg.ensemble} extra critics for reward.ensemble={rcfg.ensemble} (this pipeline "
                               f"trains {plan.critic_ensemble})", "craft (reward finetuning)",
                               f"compile with pipeline.critic_ensemble={rcfg.ensemble}, or override "
                               f"reward.ensemble={plan.critic_ensemble}"))  # fmt: skip
        if mon.select == "referee" and plan.referee == "none":
            out.append(Missing("a referee encoder for reward.monitor.select=referee", "craft (reward finetuning)",
                               "override pipeline.referee=train (or import with pipeline.referee_uri=...), or "
                               "select by critic / views"))  # fmt: skip
        if plan.referee != "none" and not mon.enabled:
            out.append(Missing("reward.monitor.every > 0 (a referee is only read by the monitor)", "referee",
                               "override reward.monitor.every=N, or pipeline.referee=none"))  # fmt: skip
        if plan.encoders == "train":
            enc = load_stage_config("encoder", profile, overrides)
            reason = _checklist_problem(enc.checklist, meta) if enc.checklist else None
            if reason:
                out.append(Missing(f"the encoders' checklist: {reason}", "critic / evaluator training",
                                   "override encoder.checklist= (empty: the annotate step's checklists)"))  # fmt: skip
        if "controlnet" in load_profile(profile) or any(o.startswith("controlnet.") for o in overrides):
            cn = load_stage_config("controlnet", profile, overrides)
            if cn.enabled:
                for cond in cn.conditions:
                    col = CONDITION_COLUMN[cond]
                    for split in (cn.split, cn.eval_split):
                        rows = df[df["split"] == split]
                        n = int(rows[col].notna().sum())
                        if n < len(rows) or not len(rows):
                            out.append(Missing(
                                f"{cond} images ({col}) for {len(rows) - n} of {len(rows)} {split} images",
                                f"controlnet-{cond}",
                                "import paired data (`craft data import-paired LAYOUT SRC`), or override "
                                "controlnet.enabled=false",
                            ))  # fmt: skip
        if len(meta.classes) < MIN_CLASSES:
            out.append(
                Missing(
                    f"at least {MIN_CLASSES} classes (the dataset has {len(meta.classes)})",
                    "probes, evaluation and gates",
                    "import a collection with two or more class folders",
                )
            )
        for split, need, who in (("train", PROBE_MIN_TRAIN, "the probes and the downstream classifier"),
                                 ("test", EVAL_MIN_TEST, "the oracle-free evaluation (held-out prompts per class)")):  # fmt: skip
            counts = df[df["split"] == split]["label"].value_counts()
            short = [f"{c} ({int(counts.get(c, 0))})" for c in meta.classes if counts.get(c, 0) < need]
            if short:
                out.append(Missing(
                    f"{need}+ {split} images per class; short: {', '.join(short)}", who,
                    "add images of those classes, or re-import with another split "
                    "(import.test_fraction=F, or SRC/train and SRC/test folders)",
                ))  # fmt: skip
    return out


def _checklist_problem(source: str, meta) -> str | None:
    """Why checklist ``source`` (bundled name or path) does not fit the dataset's classes, or None."""
    from craft.annotate import checklists as ck

    if source not in ck.SHIPPED and not Path(source).is_file():
        return f"{source!r} is neither a bundled checklist ({', '.join(ck.SHIPPED)}) nor a file"
    try:
        ck.load_checklist(source, list(meta.classes), meta.modality)
    except (ValueError, FileNotFoundError) as e:
        return str(e)
    return None


def validate_step(dataset_dir, html_path, profile: str, overrides: list[str], base_uri: str = "",
                  verdict_dir=None) -> dict:  # fmt: skip
    """Pipeline step ``validate``: the plan check (seconds), then the dataset checks (craft.steps.validate_dataset).

    A plan failure writes report.json / report.html (``ok: false``, one failure per missing piece) where the
    dataset report would go, records that verdict for the dataset version as the dataset checks do (so
    ``craft retrain-if-new-data`` does not start the version again with this profile; ``--force`` does, and a
    later validation overwrites it) and raises ``BadInput``. The step is never retried (pipelines/resources.py;
    its object-store calls retry transient errors themselves, ``storage.retries``), so a bad config fails once
    and no GPU step starts.
    """
    from craft.config import BadInput
    from craft.data.manifest import read_manifest, read_meta
    from craft.steps import validate_dataset

    try:
        read_meta(dataset_dir), read_manifest(dataset_dir)
    except (OSError, ValueError):  # the dataset checks name what is wrong with it, file by file
        return validate_dataset(dataset_dir, html_path, profile, overrides, verdict_dir=verdict_dir, record=True)
    missing = check_plan(dataset_dir, profile, overrides, base_uri=base_uri)
    if missing:
        err = PlanError(f"dataset {_name(dataset_dir)} with profile {profile}", missing)
        _write_plan_report(missing, html_path, verdict_dir, str(err))
        _record_plan_verdict(dataset_dir, profile, overrides, missing)
        raise BadInput(str(err)) from None  # one traceback in the task log: the list of fixes
    return validate_dataset(dataset_dir, html_path, profile, overrides, verdict_dir=verdict_dir, record=True)


def _name(dataset_dir) -> str:
    from craft.data.manifest import read_meta

    try:
        return read_meta(dataset_dir).name
    except (OSError, ValueError):
        return Path(dataset_dir).name


def _record_plan_verdict(dataset_dir, profile: str, overrides: list[str], missing: list[Missing]) -> None:
    from craft.config import load_stage_config
    from craft.steps import _utc_now, dataset_ref
    from craft.storage import datasets
    from craft.storage.registry import open_registry

    ref = dataset_ref(dataset_dir)
    registry = open_registry(load_stage_config("registry", profile, overrides),
                             load_stage_config("storage", profile, overrides))  # fmt: skip
    verdict = {"ok": False, "n_rows": 0, "n_failures": len(missing), "failures": [f"plan: {m}" for m in missing],
               "dataset_uri": ref.uri, "profile": str(profile), "overrides": list(overrides), "kind": "plan",
               "validated": _utc_now()}  # fmt: skip
    uri = datasets.record_validation(registry.store, registry.root, ref.name, ref.version, verdict)
    print(f"plan check of dataset {ref.name} {ref.version} with profile {profile}: FAILED ({uri})")


def _write_plan_report(missing: list[Missing], html_path, verdict_dir, text: str) -> None:
    import html

    from craft.io import atomic_write_json, atomic_write_text

    failures = [{"check": "plan", "message": str(m), "piece": m.piece, "needed_by": m.needed_by, "fix": m.fix}
                for m in missing]  # fmt: skip
    doc = {"ok": False, "plan_ok": False, "n_rows": 0, "failures": failures, "checks": {"plan": len(missing)}}
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>Plan check</title></head><body>"
            "<h1>Plan check: <span style='color:#cf222e'>FAILED</span></h1><pre>" + html.escape(text)
            + "</pre></body></html>\n")  # fmt: skip
    if verdict_dir:
        atomic_write_json(Path(verdict_dir) / "report.json", doc)
        atomic_write_text(Path(verdict_dir) / "report.html", page)
    atomic_write_text(Path(html_path), page)
