"""Downstream utility: does synthetic data help a classifier trained on real data? (CRAFT 4.2.5, app. G)

A small CNN is trained on (a) real training images only and (b) real + synthetic images with a
fixed share of synthetic images in EVERY batch (20% in CRAFT, following Wang et al. 2025), at
several data scales (fractions of the real training split, stratified by class). Accuracy and
macro-F1 (scikit-learn) are measured on the real test split. Everything is seeded: the same inputs
and seed give the same numbers.

How the wiring calls this: with the real train/test images of the dataset (uint8 arrays, labels as
class indices) and, per variant, the images it generated for the training prompts:
``downstream_utility(real_train, real_test, {variant: (images, labels), ...}, classes)`` -> a long
DataFrame (variant, scale, accuracy, macro_f1) for metrics.json and the report. ``SmallCNN`` is
also the ground-truth oracle's network (``craft.evaluate.oracle``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, f1_score
from torch import nn

from craft.evaluate.metrics import as_image_tensor


class SmallCNN(nn.Module):
    """Input average-pooled to at most ``input_size`` px, three conv blocks (conv-BN-ReLU-maxpool), GAP, linear.

    Small on purpose: trains in seconds on 64x64 demo images on a CPU (about 2 MFLOP per image at width 8).
    """

    def __init__(self, in_channels: int, n_classes: int, width: int = 8, input_size: int = 32):
        super().__init__()
        self.input_size = input_size
        layers, c = [], in_channels
        for w in (width, width * 2, width * 4):
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool2d(2))
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if max(x.shape[-2:]) > self.input_size:
            x = nn.functional.adaptive_avg_pool2d(x, self.input_size)
        x = (x - 0.5) / 0.25  # images arrive in [0, 1]
        return self.head(self.features(x).mean(dim=(2, 3)))


def _labels(labels, n: int, name: str, n_classes: int) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if y.shape != (n,):
        raise ValueError(f"{name}: expected {n} integer labels, got shape {tuple(y.shape)}")
    if n and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"{name}: labels must lie in 0..{n_classes - 1}")
    return y


def synthetic_per_batch(batch_size: int, fraction: float) -> int:
    """Synthetic images in each batch: round(fraction * B), at least 1 (CRAFT 4.2.5: 20% per batch).

    >>> synthetic_per_batch(32, 0.2)
    6
    """
    if batch_size < 2:
        raise ValueError(f"batch_size: {batch_size} leaves no room for real and synthetic images")
    return min(batch_size - 1, max(1, round(fraction * batch_size)))


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal / vertical flips per image (label-preserving for both demo modalities' classes)."""
    fh = torch.rand(len(x), generator=g) < 0.5
    fv = torch.rand(len(x), generator=g) < 0.5
    x = torch.where(fh[:, None, None, None], x.flip(3), x)
    return torch.where(fv[:, None, None, None], x.flip(2), x)


def train_classifier(
    images,
    labels,
    n_classes: int,
    *,
    synth_images=None,
    synth_labels=None,
    synth_fraction: float = 0.2,
    epochs: int = 8,
    batch_size: int = 32,
    lr: float = 3e-3,
    width: int = 8,
    input_size: int = 32,
    seed: int = 0,
    flip: bool = False,
) -> SmallCNN:
    """Train ``SmallCNN`` with Adam; with synthetic images, each batch holds round(synth_fraction * B) of them.

    An epoch is one pass over the REAL images (their batch share is B - round(synth_fraction * B));
    synthetic images are drawn from a seeded shuffled stream, so the real-data schedule is the same
    with and without synthetic data. ``flip``: random flips (off by default: chest radiographs are
    not left-right symmetric).
    """
    if not 0.0 <= synth_fraction < 1.0:
        raise ValueError(f"synth_fraction: {synth_fraction} outside [0, 1)")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = as_image_tensor(images)
    y = _labels(labels, len(x), "labels", n_classes)
    use_synth = synth_images is not None and len(synth_images) > 0 and synth_fraction > 0
    if use_synth:
        xs = as_image_tensor(synth_images)
        ys = _labels(synth_labels, len(xs), "synth_labels", n_classes)
        if xs.shape[1:] != x.shape[1:]:
            raise ValueError(f"synth_images: shape {tuple(xs.shape[1:])} differs from real {tuple(x.shape[1:])}")
        n_syn = synthetic_per_batch(batch_size, synth_fraction)
    else:
        n_syn = 0
    n_real = batch_size - n_syn
    model = SmallCNN(x.shape[1], n_classes, width, input_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * max(1, -(-len(x) // n_real))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    syn_order, syn_pos = torch.empty(0, dtype=torch.long), 0
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), n_real):
            idx = perm[s : s + n_real]
            xb, yb = x[idx], y[idx]
            if n_syn:
                if syn_pos + n_syn > len(syn_order):
                    syn_order, syn_pos = torch.randperm(len(xs), generator=g), 0
                    syn_order = syn_order.repeat(-(-n_syn // len(xs)))
                j = syn_order[syn_pos : syn_pos + n_syn]
                syn_pos += n_syn
                xb, yb = torch.cat([xb, xs[j]]), torch.cat([yb, ys[j]])
            if flip:
                xb = _augment(xb, g)
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


@torch.no_grad()
def predict(model: nn.Module, images, batch_size: int = 256) -> np.ndarray:
    """Class indices predicted by ``model`` for ``images`` (any format ``as_image_tensor`` accepts)."""
    model.eval()
    x = as_image_tensor(images)
    return torch.cat([model(x[s : s + batch_size]).argmax(1) for s in range(0, len(x), batch_size)]).numpy()


def classification_scores(y_true, y_pred, n_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 over all ``n_classes`` labels (scikit-learn; an absent class scores F1 = 0)."""
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=list(range(n_classes)), average="macro", zero_division=0)),
    }


def stratified_subset(labels, fraction: float, seed: int) -> np.ndarray:
    """Indices of a seeded, class-stratified ``fraction`` of the rows (at least one per present class)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction: {fraction} outside (0, 1]")
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        k = max(1, round(fraction * len(rows)))
        keep.append(rng.choice(rows, size=k, replace=False))
    return np.sort(np.concatenate(keep))


def downstream_utility(
    real_train: tuple,
    real_test: tuple,
    synthetic: dict[str, tuple],
    n_classes: int,
    *,
    scales: Sequence[float] = (0.25, 0.5, 1.0),
    synth_fraction: float = 0.2,
    seed: int = 0,
    **train_kwargs,
) -> pd.DataFrame:
    """Rows (variant, scale, n_real, n_synthetic, accuracy, macro_f1); variant "real_only" is the baseline.

    ``real_train`` / ``real_test``: (images, labels); ``synthetic``: {variant: (images, labels)}. At
    each scale the same stratified real subset (seeded by ``seed`` and the scale) and the same
    training seed are used for every variant, so differences come from the synthetic data only.
    """
    xtr, ytr = real_train
    xte, yte = real_test
    ytr = np.asarray(ytr)
    rows = []
    for scale in scales:
        keep = stratified_subset(ytr, scale, seed + int(round(scale * 1000)))
        sub_x, sub_y = np.asarray(xtr)[keep], ytr[keep]
        runs = {"real_only": (None, None), **synthetic}
        for variant, (sx, sy) in runs.items():
            model = train_classifier(
                sub_x,
                sub_y,
                n_classes,
                synth_images=sx,
                synth_labels=sy,
                synth_fraction=synth_fraction,
                seed=seed,
                **train_kwargs,
            )
            scores = classification_scores(yte, predict(model, xte), n_classes)
            rows.append(
                {
                    "variant": variant,
                    "scale": float(scale),
                    "n_real": len(keep),
                    "n_synthetic": 0 if sx is None else len(sx),
                    **scores,
                }
            )
    return pd.DataFrame(rows)
