"""Downstream utility: does synthetic data help a classifier trained on real data? (CRAFT 4.2.5, app. G)

A classifier is trained on (a) real training images only and (b) real + synthetic images with a
fixed share of synthetic images in EVERY batch (20% in CRAFT, following Wang et al. 2025), at
several data scales (fractions of the real training split, stratified by class). Accuracy and
macro-F1 (scikit-learn) are measured on the real test split. Everything is seeded: the same inputs
and seed give the same numbers (bit-identical on CPU).

The classifier (``arch``): ``small_cnn``, a 3-block CNN on inputs average-pooled to 32 px (the demo's,
seconds on a CPU), or ``resnet18`` / ``resnet34`` / ``resnet50``, the ResNet of ``transformers``
built from its config (``ResNetConfig``, random init: nothing is downloaded) with the images resized
to ``image_size`` px on the longest side (default the dataset resolution, capped at 224). ``auto``
picks ``small_cnn`` up to 64 px (the embedded demo data) and ``resnet18`` above (real collections);
``resolve_classifier`` says what a setting means for a resolution. A library backbone trains on CUDA
when there is one; ``small_cnn`` always on the CPU, so demo numbers do not depend on the machine.

How the wiring calls this: with the real train/test images of the dataset (uint8 arrays, labels as
class indices) and, per variant, the images it generated for the training prompts:
``downstream_utility(real_train, real_test, {variant: (images, labels), ...}, classes)`` -> a long
DataFrame (variant, scale, accuracy, macro_f1, classifier) for metrics.json and the report.
``SmallCNN`` is also the ground-truth oracle's network (``craft.evaluate.oracle``).
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


ARCHS = ("auto", "small_cnn", "resnet18", "resnet34", "resnet50")
# transformers ResNetConfig (depths, layer_type) of the torchvision / microsoft resnet-N models
_RESNETS = {"resnet18": ((2, 2, 2, 2), "basic"), "resnet34": ((3, 4, 6, 3), "basic"),
            "resnet50": ((3, 4, 6, 3), "bottleneck")}  # fmt: skip
AUTO_SMALL_CNN_MAX_PX = 64  # arch=auto: small_cnn up to this resolution (the embedded demo data), resnet18 above
SMALL_CNN_SIZE = 32  # small_cnn pools its input to at most this (its size since the demo's first run)
BACKBONE_MAX_SIZE = 224  # image_size=0 caps a backbone's input here: the ImageNet-native ResNet resolution


def resolve_classifier(arch: str, image_size: int, width: int, resolution: int) -> tuple[str, int, int]:
    """(arch, image_size, width) that a setting means for images of ``resolution`` px (longest side).

    ``arch="auto"``: small_cnn up to 64 px, resnet18 above; ``image_size=0``: small_cnn 32, a backbone
    the resolution capped at 224; ``width=0``: small_cnn 8, ResNet 64 (the first stage's channels).

    >>> resolve_classifier("auto", 0, 0, 64), resolve_classifier("auto", 0, 0, 512)
    (('small_cnn', 32, 8), ('resnet18', 224, 64))
    """
    if arch not in ARCHS:
        raise ValueError(f"arch: {arch!r} is not one of {', '.join(ARCHS)}")
    if image_size < 0 or width < 0:
        raise ValueError(f"image_size ({image_size}) and width ({width}) must be >= 0 (0 = the default)")
    if arch == "auto":
        arch = "small_cnn" if resolution <= AUTO_SMALL_CNN_MAX_PX else "resnet18"
    small = arch == "small_cnn"
    size = image_size or (SMALL_CNN_SIZE if small else min(int(resolution), BACKBONE_MAX_SIZE))
    return arch, int(size), int(width or (8 if small else 64))


def fit_longest_side(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (N, C, H, W) so that its longest side is ``size`` px (bilinear, antialiased; aspect kept)."""
    h, w = x.shape[-2:]
    if max(h, w) == size:
        return x
    f = size / max(h, w)
    hw = (max(1, round(h * f)), max(1, round(w * f)))
    return nn.functional.interpolate(x, size=hw, mode="bilinear", antialias=True, align_corners=False)


class BackboneClassifier(nn.Module):
    """A ``transformers`` ResNet built from its config (random init, no download), input resized to ``image_size``.

    ``width`` is the first stage's channel count (64 in the standard ResNets; stages double it).
    """

    def __init__(self, in_channels: int, n_classes: int, arch: str = "resnet18", width: int = 64,
                 image_size: int = BACKBONE_MAX_SIZE):  # fmt: skip
        super().__init__()
        from transformers import ResNetConfig, ResNetForImageClassification

        if arch not in _RESNETS:
            raise ValueError(f"arch: {arch!r} is not a library backbone ({', '.join(_RESNETS)})")
        depths, kind = _RESNETS[arch]
        mult = 4 if kind == "bottleneck" else 1
        self.config = ResNetConfig(num_channels=in_channels, embedding_size=width, depths=list(depths),
                                   hidden_sizes=[width * mult * 2**i for i in range(4)], layer_type=kind,
                                   num_labels=n_classes)  # fmt: skip
        self.net = ResNetForImageClassification(self.config)
        self.arch, self.image_size = arch, image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = fit_longest_side(x, self.image_size)
        return self.net(pixel_values=(x - 0.5) / 0.25).logits  # images arrive in [0, 1]


def build_classifier(arch: str, in_channels: int, n_classes: int, width: int, image_size: int) -> nn.Module:
    """``SmallCNN`` or a ``BackboneClassifier`` for a resolved (arch, image_size, width)."""
    if arch == "small_cnn":
        return SmallCNN(in_channels, n_classes, width, image_size)
    return BackboneClassifier(in_channels, n_classes, arch, width, image_size)


def _as_array(images):
    if isinstance(images, torch.Tensor):
        return images
    if isinstance(images, list | tuple):
        return np.stack([np.asarray(im) for im in images])
    return np.asarray(images)


def _longest_side(images) -> int:
    a = _as_array(images)
    return int(max(a.shape[-2:]) if isinstance(a, torch.Tensor) else max(a.shape[1:3]))


def _rows(images, s: int, e: int) -> torch.Tensor:
    """Float (n, C, H, W) of rows s..e: a tensor is taken as is, arrays are converted a slice at a time."""
    return images[s:e] if isinstance(images, torch.Tensor) else as_image_tensor(images[s:e])


def load_images(images, arch: str, image_size: int, chunk: int = 256) -> torch.Tensor:
    """Images as the classifier's float input. small_cnn: as they are (it pools inside); a backbone: resized to
    ``image_size`` one chunk at a time, so no float copy at the dataset's resolution is ever held whole."""
    a = _as_array(images)
    if arch == "small_cnn":
        return a if isinstance(a, torch.Tensor) else as_image_tensor(a)
    return torch.cat([fit_longest_side(_rows(a, s, s + chunk), image_size) for s in range(0, len(a), chunk)])


def _train_device(device: str, arch: str) -> torch.device:
    if device == "auto":  # small_cnn on the CPU: demo numbers then never depend on the machine
        return torch.device("cuda" if arch != "small_cnn" and torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
    arch: str = "small_cnn",
    width: int = 0,
    image_size: int = 0,
    seed: int = 0,
    flip: bool = False,
    device: str = "auto",
) -> nn.Module:
    """Train the ``arch`` classifier with Adam; with synthetic images, each batch holds round(synth_fraction * B) of them.

    An epoch is one pass over the REAL images (their batch share is B - round(synth_fraction * B));
    synthetic images are drawn from a seeded shuffled stream, so the real-data schedule is the same
    with and without synthetic data. ``flip``: random flips (off by default: chest radiographs are
    not left-right symmetric). ``arch`` / ``image_size`` / ``width``: see ``resolve_classifier``;
    ``device="auto"``: CUDA for a library backbone when there is one, else the CPU. A backbone skips
    a batch of one image (BatchNorm cannot train on it).
    """
    if not 0.0 <= synth_fraction < 1.0:
        raise ValueError(f"synth_fraction: {synth_fraction} outside [0, 1)")
    arch, image_size, width = resolve_classifier(arch, image_size, width, _longest_side(images))
    dev = _train_device(device, arch)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = load_images(images, arch, image_size)
    y = _labels(labels, len(x), "labels", n_classes)
    use_synth = synth_images is not None and len(synth_images) > 0 and synth_fraction > 0
    if use_synth:
        xs = load_images(synth_images, arch, image_size)
        ys = _labels(synth_labels, len(xs), "synth_labels", n_classes)
        if xs.shape[1:] != x.shape[1:]:
            raise ValueError(f"synth_images: shape {tuple(xs.shape[1:])} differs from real {tuple(x.shape[1:])}")
        n_syn = synthetic_per_batch(batch_size, synth_fraction)
    else:
        n_syn = 0
    n_real = batch_size - n_syn
    model = build_classifier(arch, x.shape[1], n_classes, width, image_size).to(dev)
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
            if arch != "small_cnn" and len(xb) < 2:
                continue
            loss = nn.functional.cross_entropy(model(xb.to(dev)), yb.to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


@torch.no_grad()
def predict(model: nn.Module, images, batch_size: int = 256) -> np.ndarray:
    """Class indices predicted by ``model`` for ``images`` (a float tensor or any format ``as_image_tensor`` accepts).

    Converted a batch at a time, on the model's device.
    """
    model.eval()
    x = _as_array(images)
    dev = next(model.parameters()).device
    out = [model(_rows(x, s, s + batch_size).to(dev)).argmax(1).cpu() for s in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()


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
    arch: str = "auto",
    image_size: int = 0,
    width: int = 0,
    **train_kwargs,
) -> pd.DataFrame:
    """Rows (variant, scale, n_real, n_synthetic, accuracy, macro_f1, classifier); "real_only" is the baseline.

    ``real_train`` / ``real_test``: (images, labels); ``synthetic``: {variant: (images, labels)}. At
    each scale the same stratified real subset (seeded by ``seed`` and the scale) and the same
    training seed are used for every variant, so differences come from the synthetic data only.
    ``arch`` / ``image_size`` / ``width`` (``resolve_classifier``; auto by the training images'
    resolution) pick the classifier; ``classifier`` names it, e.g. "resnet18@224px".
    """
    xtr, ytr = real_train
    xte, yte = real_test
    ytr = np.asarray(ytr)
    arch, image_size, width = resolve_classifier(arch, image_size, width, _longest_side(xtr))
    if arch == "small_cnn":
        xtr = np.asarray(xtr)
    else:  # resized once here, not per classifier: float copies only at image_size
        xtr, xte = load_images(xtr, arch, image_size), load_images(xte, arch, image_size)
        synthetic = {v: (load_images(sx, arch, image_size), sy) for v, (sx, sy) in synthetic.items()}
    name = f"{arch}@{image_size}px"
    rows = []
    for scale in scales:
        keep = stratified_subset(ytr, scale, seed + int(round(scale * 1000)))
        sub_x, sub_y = xtr[torch.from_numpy(keep) if isinstance(xtr, torch.Tensor) else keep], ytr[keep]
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
                arch=arch,
                image_size=image_size,
                width=width,
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
                    "classifier": name,
                }
            )
    return pd.DataFrame(rows)
