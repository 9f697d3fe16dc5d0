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
