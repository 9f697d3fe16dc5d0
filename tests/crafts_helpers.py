"""Tiny seeded datasets and models shared by the CRAFTS / training-loop tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from craft.data.manifest import DatasetMeta, write_manifest, write_meta
from craft.models.diffusion import ModelConfig

CLASSES = ["normal", "adenocarcinoma"]


def tiny_model_config() -> ModelConfig:
    return ModelConfig(
        preset="tiny", resolution=32, unet_channels=[8, 16], vae_channels=[8, 16], text_hidden=16, text_layers=1,
        max_length=16,
    )  # fmt: skip


def make_dataset(root: Path, n: int = 16, res: int = 32, seed: int = 0) -> Path:
    """Two classes of solid-ish colour tiles with weak captions, written through the manifest helpers."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = CLASSES[i % 2]
        base = np.array([220, 120, 200] if label == "normal" else [120, 40, 140], dtype=float)
        img = np.clip(base + rng.normal(0, 20, (res, res, 3)), 0, 255).astype(np.uint8)
        rel = f"images/{i:03d}.png"
        Image.fromarray(img).save(root / rel)
        rows.append(
            dict(image_id=f"img{i:03d}", image_path=rel, label=label, split="train" if i < n - 2 else "test",
                 patient_id=f"p{i // 2}", caption=f"h&e tile, {'pale' if label == 'normal' else 'dark'} glands")
        )  # fmt: skip
    write_manifest(root, pd.DataFrame(rows))
    write_meta(root, DatasetMeta(name="tiny", modality="histo", classes=CLASSES, resolution=res))
    return root


def reward_world(tmp: Path, evaluator: bool = False, referee: bool = False, ensemble: int = 0) -> dict[str, Path]:
    """What the reward-side stage mains read, at test size: demo histo data (n=16, 32 px) with enriched prompts and
    the demo checklists, a critic encoder + linear probe (and, if asked, an evaluator beside them, or the reward
    monitor's referee encoder + probe, and ``ensemble`` extra critics critic-K + critic-K_probe), a tiny base."""
    import shutil

    from craft.config import load_stage_config
    from craft.data.demo import DemoConfig, generate
    from craft.data.manifest import read_manifest
    from craft.models.diffusion import build_components, save_pipeline
    from craft.train import encoder, probe

    data = tmp / "data"
    generate(DemoConfig(modality="histo", n=16, seed=0, resolution=32, images_per_patient=2), data)
    df = read_manifest(data)
    ann = tmp / "ann"
    ann.mkdir()
    pd.DataFrame({"image_id": df["image_id"], "enriched_prompt": [f"{lab} tissue with glands" for lab in df["label"]],
                  "status": "ok"}).to_parquet(ann / "annotations.parquet")  # fmt: skip
    shutil.copy(Path(__file__).resolve().parents[1] / "craft" / "annotate" / "checklists" / "demo-histo.json",
                ann / "checklists.json")  # fmt: skip
    ecfg = load_stage_config("encoder", None, ["epochs=1", "batch_size=8"])
    encoder.main(ecfg, "critic", data, tmp / "critic", ann)
    if evaluator:
        encoder.main(ecfg, "evaluator", data, tmp / "evaluator", ann)
    probe.main(load_stage_config("probe", None, ["epochs=2"]), tmp / "critic", data, tmp / "probe")
    if referee:
        encoder.main(ecfg, "referee", data, tmp / "referee", ann)
        probe.main(load_stage_config("probe", None, ["epochs=2"]), tmp / "referee", data, tmp / "referee_probe")
    for k in range(1, ensemble + 1):
        encoder.main(ecfg, f"critic-{k}", data, tmp / f"critic-{k}", ann)
        probe.main(
            load_stage_config("probe", None, ["epochs=2"]), tmp / f"critic-{k}", data, tmp / f"critic-{k}_probe"
        )
    mc = ModelConfig(preset="tiny", resolution=32, unet_channels=[8, 16], vae_channels=[8, 8], text_hidden=16,
                     text_layers=1)  # fmt: skip
    comp = build_components(mc, ["adenocarcinoma", "adenoma", "normal", "mucinous carcinoma"])
    save_pipeline(comp.pipeline(), tmp / "base", {"stage": "test"})
    return dict(data=data, ann=ann, critic=tmp / "critic", probe=tmp / "probe", base=tmp / "base",
                referee=tmp / "referee", referee_probe=tmp / "referee_probe")  # fmt: skip
