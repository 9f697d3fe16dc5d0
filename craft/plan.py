"""Which tasks a compiled pipeline contains: the profile's ``pipeline`` section (stage ``pipeline``).

The DAG is fixed when the pipeline is compiled (``craft pipeline compile --profile P``, or ``craft demo``
for a local run), so the Kubeflow UI shows exactly the tasks that will run; every task still reads its
own stage config from the run's profile and overrides at run time. ControlNet tasks are in the DAG
when the profile's ``controlnet`` section says ``enabled: true`` (they need ``foundation: train``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
