"""Ground-truth oracle for the demo modalities: an independent, CALIBRATED reader of generated images.

The referee report on CRAFT (seed 002) objects that CAS is a proxy scored by a foundation model and
could be gamed; it asks for an independent reader. The demo modalities are drawn procedurally from
their class, so we can build one: a small CNN trained on demo images rendered with a fixed, SEPARATE
seed (default 10_007, far from any training seed) that no training stage ever sees.

Issue 20 showed that a plain classifier is not such a reader: the H&E one named the class of blurred
or patch-shuffled tiles (it read colour statistics), the radiograph one fell to chance under a mild
blur (it read sharpness). So this oracle is trained and checked for the two properties a reader needs:

- invariant to nuisance: every training batch is augmented with what keeps the class (Gaussian blur
  up to sigma 3 and down/up-resampling as generated samples show, Gaussian noise, brightness, contrast,
  gamma and H&E stain jitter in optical density, small shifts; flips and quarter turns for histology);
- sensitive to structure: a share of each batch is replaced by structure-destroyed copies (patch
  shuffles at random patch sizes and grid offsets, flat mean colour) with a UNIFORM target, the
  outlier-exposure loss (Hendrycks et al., ICLR 2019, eq. 1: cross-entropy to the uniform distribution),
  so colour and texture statistics alone cannot name a class;
- whole image: ``OracleNet`` pools its input to 32 px and has four conv blocks whose receptive field
  spans the 32 px input before global pooling;
- per-finding readers: a regression head reads each finding of ``demo.FINDING_ATTRIBUTES`` (nuclear
  density, gland regularity, mucin fraction; cardiothoracic ratio, costophrenic blunting, opacity
  presence), trained on the renderer's ground-truth values, so a report can say which finding a
  generator gets wrong (``attribute_fidelity``).

Every training run ends with a CALIBRATION TABLE on fresh renders (seed + 1, never trained on):
clean accuracy, accuracy under each nuisance (must stay >= ``min_nuisance``), under each
structure-destroying transform (must fall to <= ``max_structure``: 8x8 patch shuffle, 16x16 on
radiographs, the mean colour, and images re-rendered with the SAME seed and stain but another class's
attributes, read against the original class), plus rows shown for information (blur radius 4, which
on radiographs still leaves the heart size; 16x16 shuffles of H&E tiles, whose 16 px patches still
hold whole crypts and nuclear rows, so the class is legitimately legible in them). The table is stored in oracle.json; an oracle whose table fails the
thresholds REFUSES to score (``OracleCalibrationError`` naming the failed rows) instead of printing
numbers. Shuffles (4..16 px patches, random grid offsets) and the mean colour are also the training
negatives' kinds, on other images; the class-swapped row is a kind training never saw, and every row
uses renders (seed + 1) training never saw.

- ``train_oracle(modality, n, seed, out_dir)`` renders, trains, calibrates and caches in
  ``out_dir/<modality>-v2-n<n>-s<seed>-r<res>-e<epochs>-w<width>[-i<read res>]/`` (weights + oracle.json), atomically;
  a second call with the same key loads the cache.
- ``load_oracle(path)`` -> ``Oracle``: ``correct(images, labels)`` and ``read_findings(images)`` refuse
  when uncalibrated; ``predict`` is the raw reader the calibration itself uses.
- ``oracle_accuracy``, ``attribute_fidelity``, ``cas_oracle_rank_correlation``.

Measured tables (and the cost of training one) are in RESULTS.md, section "Oracle calibration".
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import scipy.stats
import torch
from PIL import Image, ImageFilter
from torch import nn

from craft.evaluate.metrics import as_image_tensor
from craft.io import atomic_dir

log = logging.getLogger(__name__)

ORACLE_SEED = 10_007  # never used by any training stage (demo training data use small seeds)
FORMAT = 2  # cache-key version: 2 = augmented, outlier-exposed, calibrated reader with finding heads
INPUT_SIZE = 32  # OracleNet pools its input to this; its receptive field spans it
# The calibration's patch, blur and shift sizes are pixels of a 64 px render (an 8x8 patch is an eighth of the side):
# an oracle for smaller images renders, trains and calibrates at 64 px and reads them at OracleNet's 32 px input,
# with one more calibration row on fresh renders at the size it reads (``train_oracle``'s ``read_resolution``)
DESIGN_RESOLUTION = 64


def render_resolution(read_resolution: int) -> int:
    """The render size of the oracle that reads ``read_resolution`` px images: that size, and at least 64 px."""
    return max(int(read_resolution), DESIGN_RESOLUTION)


class OracleCalibrationError(RuntimeError):
    """The oracle failed its calibration table: it refuses to score."""


@dataclass
class CalibrationThresholds:
    """What an oracle must show on fresh renders before anyone trusts its numbers (issue 20)."""

    min_clean: float = 0.95  # accuracy on clean fresh renders
    min_nuisance: float = 0.9  # accuracy under every nuisance row (blur r=2, noise, colour, shift, resample)
    max_structure: float = 0.35  # accuracy under every structure-destroying row (chance = 0.25 on 4 classes)

    def validate(self) -> None:
        for name in ("min_clean", "min_nuisance", "max_structure"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"calibration.{name}: {v} outside [0, 1]")


# ----------------------------------------------------------------------------------------------
# rendering


def _rng(seed: int, i: int) -> np.random.Generator:
    return np.random.default_rng([seed, 0x0AC1E, i])


def render_sample(
    modality: str, n: int, seed: int, resolution: int = 64, *, class_offset: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n fresh demo images (uint8, N x H x W [x 3]), balanced class indices and their finding values (N x K).

    Image i is drawn from its own generator (``seed``, i), so ``class_offset`` (per image, 1..C-1)
    re-renders the SAME draw (patient stain, pose, exposure come first from that generator) with the
    attributes of class (label + offset) mod C; labels and findings returned are then those of the
    ORIGINAL class and of the rendered one respectively.
    """
    from craft.data.demo import CLASSES, finding_values, render_one

    if modality not in CLASSES:
        raise ValueError(f"modality: {modality!r} is not one of {sorted(CLASSES)}")
    classes = CLASSES[modality]
    labels = np.random.default_rng([seed, 0x1AB]).permutation(np.arange(n) % len(classes)).astype(np.int64)
    drawn = labels if class_offset is None else (labels + np.asarray(class_offset)) % len(classes)
    imgs, finds = [], []
    for i, c in enumerate(drawn):
        image, _, _, attrs = render_one(modality, classes[c], _rng(seed, i), resolution)
        imgs.append(np.asarray(image))
        finds.append(finding_values(modality, attrs))
    return np.stack(imgs), labels, np.asarray(finds, dtype=np.float64)


# ----------------------------------------------------------------------------------------------
# network


class OracleNet(nn.Module):
    """Pool to 32 px, four conv blocks (conv-BN-ReLU, the first three max-pooled), global average pooling;
    a class head and a finding-regression head on the pooled features.

    Receptive field of the last block: 1 + 2 * (1 + 2 + 4 + 8) + 2 * 8 = 47 px > 32: each pooled
    feature sees the whole (pooled) image, so the arrangement of glands or of heart, lungs and
    diaphragm can decide the class, not only local texture.
    """

    def __init__(self, in_channels: int, n_classes: int, n_findings: int, width: int = 16):
        super().__init__()
        layers, c = [], in_channels
        for i, w in enumerate((width, width * 2, width * 4, width * 4)):
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, n_classes)
        self.findings = nn.Linear(c, n_findings)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if max(x.shape[-2:]) != INPUT_SIZE:
            x = nn.functional.interpolate(x, size=INPUT_SIZE, mode="bilinear", antialias=True, align_corners=False)
        f = self.features((x - 0.5) / 0.25).mean(dim=(2, 3))  # images arrive in [0, 1]
        return self.head(f), self.findings(f)


# ----------------------------------------------------------------------------------------------
# training-time augmentation (torch, a batch at a time)


def _gauss_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image (0 = unchanged); reflect padding."""
    b, c, h, w = x.shape
    smax = float(sigma.max())
    if smax <= 0.05:
        return x
    r = int(math.ceil(3 * smax))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    s = sigma.clamp_min(1e-3)[:, None]
    k = torch.exp(-0.5 * (t[None] / s) ** 2)
    k = k / k.sum(1, keepdim=True)
    k = torch.where(sigma[:, None] <= 0.05, (t[None] == 0).to(x.dtype), k)
    k = k.repeat_interleave(c, 0)  # (b * c, 2r + 1)
    y = nn.functional.pad(x.reshape(1, b * c, h, w), (r, r, r, r), mode="reflect")
    y = nn.functional.conv2d(y, k[:, None, :, None], groups=b * c)
    y = nn.functional.conv2d(y, k[:, None, None, :], groups=b * c)
    return y.reshape(b, c, h, w)


def _shuffle_patches(x: torch.Tensor, p: int, g: torch.Generator, offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Cut each image into p x p patches (grid rolled by ``offset``) and shuffle them, one permutation per image."""
    b, c, h, w = x.shape
    x = torch.roll(x, offset, dims=(2, 3))
    gh, gw = h // p, w // p
    t = x[:, :, : gh * p, : gw * p].reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c, p, p)
    perm = torch.argsort(torch.rand(b, gh * gw, generator=g), dim=1)
    t = t[torch.arange(b)[:, None], perm]
    t = t.reshape(b, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, gh * p, gw * p)
    out = x.clone()
    out[:, :, : gh * p, : gw * p] = t
    return torch.roll(out, (-offset[0], -offset[1]), dims=(2, 3))


_NEG_PATCHES = (4, 8, 12, 16)  # patch sizes (px at the render resolution) of the training negatives
_NEG_MIX = (0.1, 0.25, 0.2, 0.3, 0.15)  # their shares, then the flat mean colour's


def _negatives(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Structure-destroyed copies: patch shuffles (4..16 px, random grid offset) or the flat mean colour."""
    out = torch.empty_like(x)
    # coarse shuffles are the hard negatives (more structure survives in each patch): drawn most often
    kind = torch.multinomial(torch.tensor(_NEG_MIX), len(x), replacement=True, generator=g)
    for k, p in enumerate(_NEG_PATCHES):
        m = kind == k
        if m.any():
            off = tuple(int(v) for v in torch.randint(0, p, (2,), generator=g))
            out[m] = _shuffle_patches(x[m], p, g, off)
    m = kind == len(_NEG_PATCHES)
    out[m] = x[m].mean(dim=(2, 3), keepdim=True).expand_as(x[m])
    return out


def _nuisance(x: torch.Tensor, g: torch.Generator, rgb: bool) -> torch.Tensor:
    """Class-preserving nuisance, each with probability about 1/2 per image (see the module docstring)."""
    b = len(x)

    def u(lo: float, hi: float, shape=(b,)) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    def coin(p: float = 0.5) -> torch.Tensor:
        return torch.rand(b, generator=g) < p

    if rgb:  # tissue has no orientation: flips and quarter turns
        k = int(torch.randint(0, 4, (1,), generator=g))
        x = torch.rot90(x, k, dims=(2, 3))
        x = torch.where(coin()[:, None, None, None], x.flip(3), x)
    # small shifts (edge pixels replicated), one per image
    pad = 4
    xp = nn.functional.pad(x, (pad,) * 4, mode="replicate")
    sh = torch.randint(0, 2 * pad + 1, (b, 2), generator=g)
    sh[~coin()] = pad
    h, w = x.shape[-2:]
    x = torch.stack([xp[i, :, sh[i, 0] : sh[i, 0] + h, sh[i, 1] : sh[i, 1] + w] for i in range(b)])
    # colour: H&E stain jitter in optical density (Beer-Lambert, as demo.py mixes stains) / exposure
    if rgb:
        od = -torch.log(x.clamp_min(1 / 255))
        gain = torch.where(coin()[:, None], u(0.7, 1.35, (b, 3)), torch.ones(b, 3))
        od = od * gain[:, :, None, None] + torch.where(coin(), u(-0.08, 0.08), torch.zeros(b))[:, None, None, None]
        x = torch.exp(-od.clamp_min(0))
    else:
        gamma = torch.where(coin(), torch.exp(u(-0.45, 0.45)), torch.ones(b))
        x = x.clamp(0, 1) ** gamma[:, None, None, None]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    con = torch.where(coin(), u(0.7, 1.3), torch.ones(b))[:, None, None, None]
    bri = torch.where(coin(), u(-0.12, 0.12), torch.zeros(b))[:, None, None, None]
    x = (x - mean) * con + mean + bri
    # softness: Gaussian blur up to sigma 3, or a down/up resampling (what generated samples show)
    x = _gauss_blur(x, torch.where(coin(0.6), u(0.0, 3.0), torch.zeros(b)))
    if bool(coin(0.3)[0]):
        f = float(u(1.5, 3.0, (1,))[0])
        m = coin()
        small = nn.functional.interpolate(x[m], scale_factor=1 / f, mode="bilinear", antialias=True)
        x[m] = nn.functional.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    # pixel noise
    sd = torch.where(coin(), u(0.0, 50 / 255), torch.zeros(b))[:, None, None, None]
    x = x + sd * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1)


def _fit(
    x: torch.Tensor,
    y: torch.Tensor,
    f: torch.Tensor,
    n_classes: int,
    *,
    epochs: int,
    width: int,
    seed: int,
    batch_size: int = 48,
    lr: float = 4e-3,
    neg_share: float = 0.5,
    finding_weight: float = 0.5,
) -> OracleNet:
    """Adam + one-cycle: class cross-entropy, outlier exposure on negatives, MSE of standardised findings."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    rgb = x.shape[1] == 3
    model = OracleNet(x.shape[1], n_classes, f.shape[1], width)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), batch_size):
            idx = perm[s : s + batch_size]
            xb, yb, fb = x[idx], y[idx], f[idx]
            n_neg = max(1, round(neg_share * len(idx)))
            neg = _negatives(x[torch.randint(0, len(x), (n_neg,), generator=g)], g)
            inp = _nuisance(torch.cat([xb, neg]), g, rgb)
            logits, finds = model(inp)
            pos, negl = logits[: len(idx)], logits[len(idx) :]
            loss = nn.functional.cross_entropy(pos, yb)
            loss = loss - nn.functional.log_softmax(negl, dim=1).mean()  # CE to the uniform target
            loss = loss + finding_weight * nn.functional.mse_loss(finds[: len(idx)], fb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------
# the oracle


@dataclass
class Oracle:
    """A trained oracle: network, class names (index order), finding names, calibration and provenance."""

    model: OracleNet
    classes: tuple[str, ...]
    meta: dict
    thresholds: CalibrationThresholds = field(default_factory=CalibrationThresholds)

    @torch.no_grad()
    def _forward(self, images, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        self.model.eval()
        x = images if isinstance(images, torch.Tensor) else as_image_tensor(np.asarray(images))
        outs = [self.model(x[s : s + batch_size]) for s in range(0, len(x), batch_size)]
        logits = torch.cat([o[0] for o in outs]).numpy()
        finds = torch.cat([o[1] for o in outs]).numpy().astype(np.float64)
        return logits, finds * np.asarray(self.meta["finding_sd"]) + np.asarray(self.meta["finding_mean"])

    def logits(self, images) -> np.ndarray:
        """Raw class logits (N, C), no calibration check."""
        return self._forward(images)[0]

    def predict(self, images) -> np.ndarray:
        """Raw class indices (no calibration check: the calibration itself uses it)."""
        return self.logits(images).argmax(1)

    def failures(self) -> list[dict]:
        """Calibration rows that fail ``thresholds`` (re-judged now, so a stricter config applies to a cached oracle)."""
        return [r for r in judge(self.meta["calibration"], self.thresholds) if r["passed"] is False]

    def require_calibrated(self) -> None:
        bad = self.failures()
        if bad:
            rows = "; ".join(f"{r['row']} = {r['accuracy']:.3f} (must be {r['rule']})" for r in bad)
            raise OracleCalibrationError(
                f"oracle {self.meta.get('key', '?')}: calibration failed, it refuses to score: {rows}"
            )

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
        """1.0 where the oracle reads the target class in the image, else 0.0 (labels: names or indices).

        Raises ``OracleCalibrationError`` when the calibration table fails its thresholds.
        """
        self.require_calibrated()
        y = self._indices(labels)
        if len(y) != len(images):
            raise ValueError(f"labels: {len(y)} labels for {len(images)} images")
        return (self.predict(images) == y).astype(np.float64)

    def read_findings(self, images) -> np.ndarray:
        """(N, K) readings of ``meta['findings']`` per image, in the renderer's units; refuses when uncalibrated."""
        self.require_calibrated()
        return self._forward(images)[1]


def judge(rows: list[dict], t: CalibrationThresholds) -> list[dict]:
    """Calibration rows with ``rule`` and ``passed`` set by the thresholds (info rows: passed = None)."""
    out = []
    for r in rows:
        kind, acc = r["kind"], r["accuracy"]
        if kind == "clean":
            rule, ok = f">= {t.min_clean}", acc >= t.min_clean
        elif kind == "nuisance":
            rule, ok = f">= {t.min_nuisance}", acc >= t.min_nuisance
        elif kind == "structure":
            rule, ok = f"<= {t.max_structure}", acc <= t.max_structure
        else:
            rule, ok = "shown", None
        out.append({**r, "rule": rule, "passed": ok})
    return out


# ----------------------------------------------------------------------------------------------
# calibration transforms (numpy / PIL on uint8 images, seeded)


def _pil_map(images: np.ndarray, fn) -> np.ndarray:
    return np.stack([np.asarray(fn(Image.fromarray(im))) for im in images])


def _blur(images: np.ndarray, radius: float) -> np.ndarray:
    return _pil_map(images, lambda im: im.filter(ImageFilter.GaussianBlur(radius)))


def _noise(images: np.ndarray, sd: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.rint(images + rng.normal(0, sd, images.shape)), 0, 255).astype(np.uint8)


def _colour_jitter(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """histo: per-image stain gains in optical density (0.8..1.25 per channel) and brightness 0.9..1.1;
    cxr: gamma 0.75..1.33, contrast 0.8..1.2, brightness -0.08..0.08."""
    x = images.astype(np.float64) / 255
    n = len(x)
    if x.ndim == 4:
        od = -np.log(np.clip(x, 1 / 255, 1))
        x = np.exp(-od * rng.uniform(0.8, 1.25, (n, 1, 1, 3))) * rng.uniform(0.9, 1.1, (n, 1, 1, 1))
    else:
        x = x ** np.exp(rng.uniform(-0.29, 0.29, (n, 1, 1)))
        m = x.mean(axis=(1, 2), keepdims=True)
        x = (x - m) * rng.uniform(0.8, 1.2, (n, 1, 1)) + m + rng.uniform(-0.08, 0.08, (n, 1, 1))
    return np.clip(np.rint(255 * x), 0, 255).astype(np.uint8)


def _shift(images: np.ndarray, rng: np.random.Generator, max_px: int = 3) -> np.ndarray:
    out = np.empty_like(images)
    pad = [(max_px, max_px), (max_px, max_px)] + [(0, 0)] * (images.ndim - 3)
    h, w = images.shape[1:3]
    for i, im in enumerate(images):
        dy, dx = rng.integers(0, 2 * max_px + 1, 2)
        out[i] = np.pad(im, pad, mode="edge")[dy : dy + h, dx : dx + w]
    return out


def _resample(images: np.ndarray, factor: int = 2) -> np.ndarray:
    def fn(im: Image.Image) -> Image.Image:
        w, h = im.size
        return im.resize((w // factor, h // factor), Image.BILINEAR).resize((w, h), Image.BILINEAR)

    return _pil_map(images, fn)


def _shuffle_np(images: np.ndarray, p: int, rng: np.random.Generator) -> np.ndarray:
    out = images.copy()
    h, w = images.shape[1:3]
    cells = [(r, c) for r in range(0, h - p + 1, p) for c in range(0, w - p + 1, p)]
    for i, im in enumerate(images):
        perm = rng.permutation(len(cells))
        for (r, c), k in zip(cells, perm):
            rr, cc = cells[k]
            out[i, r : r + p, c : c + p] = im[rr : rr + p, cc : cc + p]
    return out


def _mean_colour(images: np.ndarray) -> np.ndarray:
    m = images.reshape(len(images), -1, *images.shape[3:]).mean(axis=1)
    return np.broadcast_to(np.rint(m)[:, None, None], images.shape).astype(np.uint8).copy()


def calibrate(
    oracle: Oracle, modality: str, n: int, seed: int, resolution: int, read_resolution: int | None = None
) -> dict:
    """The calibration table on ``n`` fresh renders from ``seed`` (see the module docstring) and the
    finding readers' R^2 and per-class reference readings (clean and blurred, same renders).

    ``read_resolution`` (other than ``resolution``): the size of the images the oracle will read; the same renders
    drawn at that size are one more nuisance row, so an oracle that cannot read them refuses to score them."""
    x, y, f = render_sample(modality, n, seed, resolution)
    rng = np.random.default_rng([seed, 0xCA1])
    n_cls = len(oracle.classes)
    swap_offset = rng.integers(1, n_cls, n)
    xs, ys, _ = render_sample(modality, n, seed, resolution, class_offset=swap_offset)
    assert (ys == y).all()
    rows = [
        ("clean", "clean", x),
        ("blur radius 2", "nuisance", _blur(x, 2)),
        ("Gaussian noise sd 40", "nuisance", _noise(x, 40, rng)),
        ("colour / exposure jitter", "nuisance", _colour_jitter(x, rng)),
        ("shift up to 3 px", "nuisance", _shift(x, rng)),
        ("down/up-resampled x2", "nuisance", _resample(x, 2)),
        ("8x8 patches shuffled", "structure", _shuffle_np(x, 8, rng)),
        # a 16 px patch is a quarter of a 64 px tile's side: it holds whole crypts and rows of nuclei, so the
        # tissue class stays legible in it (shown); a radiograph's findings span more than a patch (judged)
        ("16x16 patches shuffled", "structure" if modality == "cxr" else "info", _shuffle_np(x, 16, rng)),
        ("mean colour / grey level", "structure", _mean_colour(x)),
        ("class-swapped attributes (same seed, stain, pose)", "structure", xs),
        ("blur radius 4", "info", _blur(x, 4)),
    ]
    if read_resolution and read_resolution != resolution:
        xr, yr, _ = render_sample(modality, n, seed, read_resolution)
        if not (yr == y).all():  # the renderer draws each image's class before its size; a change would show here
            raise RuntimeError(f"renders at {read_resolution} px drew other classes than at {resolution} px")
        rows.insert(6, (f"rendered at {read_resolution} px (the size it reads)", "nuisance", xr))
    table = [
        {"row": name, "kind": kind, "accuracy": float((oracle.predict(im) == y).mean())} for name, kind, im in rows
    ]
    _, read = oracle._forward(x)
    _, read_blur = oracle._forward(rows[1][2])

    def r2(pred: np.ndarray, k: int) -> float:
        ss = float(((f[:, k] - f[:, k].mean()) ** 2).sum())
        return float(1 - ((pred[:, k] - f[:, k]) ** 2).sum() / ss) if ss > 0 else float("nan")

    names = oracle.meta["findings"]
    readers = [
        {"finding": nm, "r2_clean": r2(read, k), "r2_blur_r2": r2(read_blur, k),
         "mae_clean": float(np.abs(read[:, k] - f[:, k]).mean())}
        for k, nm in enumerate(names)
    ]  # fmt: skip
    reference = {
        c: {nm: {"mean": float(read[y == i, k].mean()), "sd": float(read[y == i, k].std()),
                 "truth_mean": float(f[y == i, k].mean())} for k, nm in enumerate(names)}
        for i, c in enumerate(oracle.classes)
    }  # fmt: skip
    return {"seed": seed, "n": n, "chance": 1 / n_cls, "rows": table, "readers": readers, "reference": reference}


# ----------------------------------------------------------------------------------------------
# train / load


def _key(modality: str, n: int, seed: int, resolution: int, epochs: int, width: int, read: int | None = None) -> str:
    reads = f"-i{read}" if read and read != resolution else ""
    return f"{modality}-v{FORMAT}-n{n}-s{seed}-r{resolution}-e{epochs}-w{width}{reads}"


def train_oracle(
    modality: str,
    n: int = 1200,
    seed: int = ORACLE_SEED,
    out_dir: str | Path = "runs/oracle",
    *,
    resolution: int = 64,
    epochs: int = 8,
    width: int = 16,
    n_check: int = 400,
    min_accuracy: float | None = None,
    thresholds: CalibrationThresholds | None = None,
    read_resolution: int | None = None,
) -> Oracle:
    """Train, calibrate and cache (or load from the cache folder) the oracle for ``modality``.

    ``read_resolution``: the size of the images it will read when that is not ``resolution`` (see
    ``render_resolution``); the calibration then has a row on renders at that size.

    ``min_accuracy``: raise at once if clean accuracy on the ``n_check`` fresh calibration renders
    (seed + 1) is below it. ``thresholds`` judge the calibration table (stored in oracle.json either
    way); a failing oracle is still written, so its table can be shown, but refuses to score.
    """
    import time

    from craft.data.demo import CLASSES, FINDING_ATTRIBUTES

    thresholds = thresholds or CalibrationThresholds()
    thresholds.validate()
    key = _key(modality, n, seed, resolution, epochs, width, read_resolution)
    path = Path(out_dir) / key
    if (path / "oracle.json").exists():
        return _check_clean(load_oracle(path, thresholds), min_accuracy)
    t0 = time.perf_counter()
    x, y, f = render_sample(modality, n, seed, resolution)
    t_render = time.perf_counter() - t0
    fm, fs = f.mean(0), f.std(0) + 1e-6
    model = _fit(as_image_tensor(x), torch.from_numpy(y), torch.from_numpy(((f - fm) / fs).astype(np.float32)),
                 len(CLASSES[modality]), epochs=epochs, width=width, seed=seed)  # fmt: skip
    t_train = time.perf_counter() - t0 - t_render
    meta = {
        "key": key,
        "format": FORMAT,
        "modality": modality,
        "classes": list(CLASSES[modality]),
        "findings": list(FINDING_ATTRIBUTES[modality]),
        "finding_mean": fm.tolist(),
        "finding_sd": fs.tolist(),
        "n": n,
        "seed": seed,
        "resolution": resolution,
        "read_resolution": read_resolution or resolution,
        "epochs": epochs,
        "in_channels": int(x.shape[-1]) if x.ndim == 4 else 1,
        "width": width,
        "input_size": INPUT_SIZE,
    }
    oracle = Oracle(model, tuple(meta["classes"]), meta, thresholds)
    cal = calibrate(oracle, modality, n_check, seed + 1, resolution, read_resolution)
    meta.update(calibration=cal["rows"], readers=cal["readers"], reference=cal["reference"],
                check_seed=seed + 1, check_n=n_check, check_accuracy=cal["rows"][0]["accuracy"],
                thresholds_at_training=asdict(thresholds), torch_threads=torch.get_num_threads(),
                seconds={"render": round(t_render, 1), "train": round(t_train, 1),
                         "calibrate": round(time.perf_counter() - t0 - t_render - t_train, 1)})  # fmt: skip
    log.info("oracle %s: clean %.3f on %d fresh images; %s", key, meta["check_accuracy"], n_check,
             ", ".join(f"{r['row']} {r['accuracy']:.2f}" for r in cal["rows"][1:]))  # fmt: skip
    with atomic_dir(path) as tmp:
        torch.save(model.state_dict(), tmp / "oracle.pt")
        (tmp / "oracle.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return _check_clean(oracle, min_accuracy)


def _check_clean(oracle: Oracle, min_accuracy: float | None) -> Oracle:
    """Raise when the clean calibration accuracy is below ``min_accuracy`` (a trained or a cached oracle alike)."""
    acc = oracle.meta["check_accuracy"]
    if min_accuracy is not None and acc < min_accuracy:
        raise RuntimeError(f"oracle {oracle.meta['key']}: held-out accuracy {acc:.3f} < {min_accuracy}")
    return oracle


def load_oracle(path: str | Path, thresholds: CalibrationThresholds | None = None) -> Oracle:
    """Load an oracle folder written by ``train_oracle`` (judged by ``thresholds``, default ones if None)."""
    path = Path(path)
    meta_file = path / "oracle.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{meta_file}: no oracle here (train_oracle writes it)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT or "calibration" not in meta:
        raise ValueError(f"{meta_file}: format {meta.get('format')} is not {FORMAT} (an uncalibrated oracle); retrain")
    model = OracleNet(meta["in_channels"], len(meta["classes"]), len(meta["findings"]), meta["width"])
    model.load_state_dict(torch.load(path / "oracle.pt", map_location="cpu", weights_only=True))
    model.eval()
    return Oracle(model, tuple(meta["classes"]), meta, thresholds or CalibrationThresholds())


# ----------------------------------------------------------------------------------------------
# scores


def oracle_accuracy(oracle: Oracle, images, labels) -> float:
    """Share of images in which the oracle reads their target class (refuses when uncalibrated)."""
    return float(oracle.correct(images, labels).mean())


def calibration_table(oracle: Oracle) -> list[dict]:
    """The stored calibration rows judged by the oracle's thresholds (row, kind, accuracy, rule, passed)."""
    return judge(oracle.meta["calibration"], oracle.thresholds)


def attribute_fidelity(oracle: Oracle, images, labels) -> dict:
    """Per target class and finding: the generated images' mean reading against the reference reading of
    fresh real renders of that class (calibration sample), z = (generated - reference) / reference sd.

    Returns {"per_class": {class: {finding: {generated, reference, z, n}}}, "mean_abs_z": {finding: x},
    "worst": {class, finding, z, generated, reference}}: the finding a generator gets most wrong.
    Refuses when uncalibrated.
    """
    read = oracle.read_findings(images)
    y = oracle._indices(labels)
    names, ref = oracle.meta["findings"], oracle.meta["reference"]
    per_class: dict[str, dict] = {}
    worst = None
    for i, c in enumerate(oracle.classes):
        m = y == i
        if not m.any():
            continue
        per_class[c] = {}
        for k, nm in enumerate(names):
            g, r = float(read[m, k].mean()), ref[c][nm]
            z = (g - r["mean"]) / max(r["sd"], 0.05 * max(abs(r["mean"]), 1e-3), 1e-3)
            per_class[c][nm] = {"generated": g, "reference": r["mean"], "z": z, "n": int(m.sum())}
            if worst is None or abs(z) > abs(worst["z"]):
                worst = {"class": c, "finding": nm, "z": z, "generated": g, "reference": r["mean"]}
    mean_abs = {nm: float(np.mean([abs(d[nm]["z"]) for d in per_class.values()])) for nm in names}
    return {"per_class": per_class, "mean_abs_z": mean_abs, "worst": worst}


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
