"""Ground-truth oracle for the demo modalities: an independent reader of generated images.

The referee report on CRAFT (seed 002) objects that CAS is a proxy scored by a foundation model and
could be gamed; it asks for an independent reader. The demo modalities are drawn procedurally from
their class, so we can build one: a small CNN (``downstream.SmallCNN``) trained on a LARGE demo
sample rendered with a fixed, SEPARATE seed (default 10_007, far from any training seed) that no
training stage ever sees, judging whether a generated image shows its target class.

- ``train_oracle(modality, n, seed, out_dir)`` renders n images in memory with
  ``craft.data.demo.render_one`` (classes balanced, one fresh patient stain per image), trains,
  checks accuracy on a fresh held-out sample rendered with seed + 1, and caches the result in
  ``out_dir/<modality>-n<n>-s<seed>-r<res>/`` (weights + oracle.json), atomically. A second call
  with the same key loads the cache instead of training again.
- ``load_oracle(path)`` -> ``Oracle`` with ``predict(images)`` (class indices).
- ``oracle_accuracy(oracle, images, labels)``; ``cas_oracle_rank_correlation(cas, correct)``.

How the wiring calls this: once per pipeline run ``oracle = train_oracle(modality, 2000, 10_007, cache)``;
per variant ``oracle.correct(images, target_labels)`` gives a per-image column for per_image.parquet,
its mean is the variant's oracle accuracy, and ``cas_oracle_rank_correlation`` over all generated
images says whether CAS tracks ground truth.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.stats
import torch

from craft.evaluate.downstream import SmallCNN, classification_scores, predict, train_classifier
from craft.io import atomic_dir

log = logging.getLogger(__name__)

ORACLE_SEED = 10_007  # never used by any training stage (demo training data use small seeds)


def render_sample(modality: str, n: int, seed: int, resolution: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """n fresh demo images (uint8, N x H x W [x 3]) with balanced class indices, from ``seed``."""
    from craft.data.demo import CLASSES, render_one

    if modality not in CLASSES:
        raise ValueError(f"modality: {modality!r} is not one of {sorted(CLASSES)}")
    classes = CLASSES[modality]
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(classes))
    imgs = [np.asarray(render_one(modality, classes[c], rng, resolution)[0]) for c in labels]
    return np.stack(imgs), labels.astype(np.int64)


@dataclass
class Oracle:
    """A trained oracle: the network, its class names (index order) and where it came from."""

    model: SmallCNN
    classes: tuple[str, ...]
    meta: dict

    def predict(self, images) -> np.ndarray:
        return predict(self.model, images)

    def _indices(self, labels) -> np.ndarray:
        lab = np.asarray(labels)
        if lab.dtype.kind in "iu":
            return lab.astype(np.int64)
        lookup = {c: i for i, c in enumerate(self.classes)}
        bad = [x for x in lab if x not in lookup]
        if bad:
            raise ValueError(f"labels: {bad[0]!r} is not one of the oracle's classes {list(self.classes)}")
        return np.array([lookup[x] for x in lab], dtype=np.int64)

    def correct(self, images, labels) -> np.ndarray:
        """1.0 where the oracle reads the target class in the image, else 0.0 (labels: names or indices)."""
        y = self._indices(labels)
        if len(y) != len(images):
            raise ValueError(f"labels: {len(y)} labels for {len(images)} images")
        return (self.predict(images) == y).astype(np.float64)


def _key(modality: str, n: int, seed: int, resolution: int) -> str:
    return f"{modality}-n{n}-s{seed}-r{resolution}"


def train_oracle(
    modality: str,
    n: int = 2000,
    seed: int = ORACLE_SEED,
    out_dir: str | Path = "runs/oracle",
    *,
    resolution: int = 64,
    epochs: int = 8,
    width: int = 16,
    n_check: int = 400,
    min_accuracy: float | None = None,
) -> Oracle:
    """Train (or load from the cache folder) the oracle for ``modality``; see the module docstring.

    ``min_accuracy``: raise if the held-out check (n_check fresh images, seed + 1) scores below it.
    """
    from craft.data.demo import CLASSES

    path = Path(out_dir) / _key(modality, n, seed, resolution)
    if (path / "oracle.json").exists():
        return load_oracle(path)
    x, y = render_sample(modality, n, seed, resolution)
    model = train_classifier(
        x, y, len(CLASSES[modality]), epochs=epochs, batch_size=32, lr=3e-3, width=width, seed=seed
    )
    xc, yc = render_sample(modality, n_check, seed + 1, resolution)
    check = classification_scores(yc, predict(model, xc), len(CLASSES[modality]))
    log.info("oracle %s: held-out accuracy %.4f on %d fresh images", path.name, check["accuracy"], n_check)
    if min_accuracy is not None and check["accuracy"] < min_accuracy:
        raise RuntimeError(f"oracle {path.name}: held-out accuracy {check['accuracy']:.3f} < {min_accuracy}")
    meta = {
        "modality": modality,
        "classes": list(CLASSES[modality]),
        "n": n,
        "seed": seed,
        "resolution": resolution,
        "epochs": epochs,
        "in_channels": int(x.shape[-1]) if x.ndim == 4 else 1,
        "width": width,
        "input_size": model.input_size,
        "check_seed": seed + 1,
        "check_n": n_check,
        **{f"check_{k}": v for k, v in check.items()},
    }
    with atomic_dir(path) as tmp:
        torch.save(model.state_dict(), tmp / "oracle.pt")
        (tmp / "oracle.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return Oracle(model, tuple(meta["classes"]), meta)


def load_oracle(path: str | Path) -> Oracle:
    """Load an oracle folder written by ``train_oracle``."""
    path = Path(path)
    meta_file = path / "oracle.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{meta_file}: no oracle here (train_oracle writes it)")
    meta = json.loads(meta_file.read_text())
    model = SmallCNN(meta["in_channels"], len(meta["classes"]), meta["width"], meta["input_size"])
    model.load_state_dict(torch.load(path / "oracle.pt", map_location="cpu", weights_only=True))
    model.eval()
    return Oracle(model, tuple(meta["classes"]), meta)


def oracle_accuracy(oracle: Oracle, images, labels) -> float:
    """Share of images in which the oracle reads their target class."""
    return float(oracle.correct(images, labels).mean())


def cas_oracle_rank_correlation(per_image_cas, oracle_correct) -> dict[str, float]:
    """Does CAS track ground truth? Spearman rho and point-biserial r of per-image CAS vs oracle correctness.

    NaN (with p = NaN) when either side is constant (e.g. the oracle judges every image correct).
    """
    c = np.asarray(per_image_cas, dtype=np.float64)
    o = np.asarray(oracle_correct, dtype=np.float64)
    if c.shape != o.shape or c.ndim != 1:
        raise ValueError(f"oracle_correct: shape {o.shape} differs from per_image_cas {c.shape}")
    if len(c) < 3 or np.all(c == c[0]) or np.all(o == o[0]):
        nan = float("nan")
        return {"spearman": nan, "spearman_p": nan, "pointbiserial": nan, "pointbiserial_p": nan, "n": len(c)}
    sp = scipy.stats.spearmanr(c, o)
    pb = scipy.stats.pointbiserialr(o, c)
    return {
        "spearman": float(sp.statistic),
        "spearman_p": float(sp.pvalue),
        "pointbiserial": float(pb.statistic),
        "pointbiserial_p": float(pb.pvalue),
        "n": len(c),
    }
