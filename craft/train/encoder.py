"""``craft train encoder``: a small dual encoder trained contrastively on the training split (demo stand-in for MedSigLIP / SigLIP).

CRAFT uses a frozen MedSigLIP critic and a separate SigLIP evaluator (sec. 4.1.4). No weights can be
downloaded here, so the demo trains its own pair: a tiny transformers ``SiglipModel`` or ``CLIPModel``
built from a config (random init, seeded) with the offline tokenizer of ``craft.models.diffusion``,
trained on (image, text) pairs of the TRAINING split only and saved with ``save_pretrained``, so that it
loads through exactly the ``load_encoder`` path a real MedSigLIP directory takes.

Texts: the image's enriched prompt from ``annotations.parquet`` (status ``ok``) when given, else
"<class phrase>, <weak caption>". A second term matches every image to the phrases of all classes, so
class names (and the DD probe) have a well-separated embedding. Losses are the CLIP softmax loss or the
SigLIP sigmoid loss, with several positives per row where texts repeat (same string / same class).

Critic and evaluator are trained independently: each role has its own architecture and seed
(``EncoderTrainConfig.critic`` / ``.evaluator``); ``validate()`` refuses equal seeds.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from craft.data.loader import PixelColumn, image_column
from craft.data.manifest import DatasetMeta, read_manifest, read_meta

log = logging.getLogger(__name__)

ROLES = ("critic", "evaluator", "evaluator2", "referee")
SIGLIP_MEAN, SIGLIP_STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


@dataclass
class EncoderSpec:
    """One role's tiny dual encoder: architecture and seed (the roles must differ, CRAFT sec. 4.1.4)."""

    arch: Literal["siglip", "clip"] = "siglip"  # transformers SiglipModel or CLIPModel
    seed: int = 0  # initialisation and batch order
    embed_dim: int = 64  # joint embedding size (SigLIP: both towers' width; CLIP: projection_dim)
    width: int = 64  # hidden size of both towers (SigLIP: must equal embed_dim)
    layers: int = 2  # transformer layers per tower
    heads: int = 4  # attention heads (must divide width)
    patch_size: int = 8  # ViT patch side in pixels (must divide image_size)
    # issue 21: train on a random view of each image (resized crop keeping [view_crop, 1] of each side, horizontal
    # flip, Gaussian pixel noise on the [0, 1] scale) so the encoder reads a finding the same across renderings, and a
    # reward built on it is harder to raise by rendering details. The defaults train on the image as decoded.
    view_crop: float = 1.0
    view_flip: bool = False  # on radiographs a flip also swaps the laterality a report names
    view_noise: float = 0.0

    @property
    def views(self) -> bool:
        return self.view_crop < 1.0 or self.view_flip or self.view_noise > 0

    def validate(self) -> None:
        if not 0.0 < self.view_crop <= 1.0 or self.view_noise < 0:
            raise ValueError(
                f"view_crop must be in (0, 1] and view_noise >= 0, got {self.view_crop}, {self.view_noise}"
            )
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.arch == "siglip" and self.embed_dim != self.width:
            raise ValueError(f"siglip: embed_dim ({self.embed_dim}) must equal width ({self.width})")
        if min(self.embed_dim, self.width, self.layers, self.heads, self.patch_size) < 1:
            raise ValueError("embed_dim, width, layers, heads and patch_size must be >= 1")


@dataclass
class EncoderTrainConfig:
    """Stage ``encoder``: train one role's small dual encoder contrastively on the training split."""

    critic: EncoderSpec = field(default_factory=lambda: EncoderSpec(arch="siglip", seed=0))  # training critic
    evaluator: EncoderSpec = field(default_factory=lambda: EncoderSpec(arch="clip", seed=1))  # metrics evaluator
    evaluator2: EncoderSpec = field(default_factory=lambda: EncoderSpec(arch="siglip", seed=2, layers=1))  # optional
    # the reward monitor's referee (issue 21): trained like the critic, another architecture and seed; never the
    # evaluator (the evaluate stage refuses to score with it) and never read by the gate
    referee: EncoderSpec = field(default_factory=lambda: EncoderSpec(arch="clip", seed=3, layers=1))
    # the critic ensemble's extra members (issue 21, reward.ensemble): roles critic-1, critic-2, ... are the critic's
    # spec with these seeds (an ensemble of independently initialised and shuffled critics, the same architecture)
    ensemble_seeds: list[int] = field(default_factory=lambda: [10, 11])
    image_size: int = 32  # side of the square input the vision tower sees (images are resized to it)
    max_length: int = 32  # text token window (tokenizer model_max_length = position embeddings)
    epochs: int = 20  # passes over the training split
    batch_size: int = 64  # images per step
    lr: float = 1e-3  # AdamW learning rate (cosine decay to 10%, 5% warm-up)
    weight_decay: float = 0.05  # AdamW weight decay
    class_weight: float = 1.0  # weight of the image -> class-phrase term relative to the image <-> text term
    class_template: str = "{phrase}"  # class text; {phrase} is the dataset's human class name
    checklist: str = ""  # checklist items as extra class texts: bundled name or checklists.json path; "" = the
    # annotations folder's checklists.json when present, else none (CCS, CRAFT eq. 3, then has a trained meaning)
    min_word_count: int = 2  # words seen this often in the training texts become whole tokens
    threads: int = 2  # torch CPU threads

    def validate(self) -> None:
        for role in ROLES:
            getattr(self, role).validate()
        seeds = [getattr(self, r).seed for r in ROLES] + list(self.ensemble_seeds)
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"critic, evaluator, evaluator2, referee and ensemble seeds must differ (independent "
                             f"training), got {seeds}")  # fmt: skip
        if self.image_size < 8 or any(self.image_size % getattr(self, r).patch_size for r in ROLES):
            raise ValueError(f"image_size {self.image_size} must be >= 8 and divisible by every role's patch_size")
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0 or self.max_length < 4:
            raise ValueError("epochs >= 1, batch_size >= 2, lr > 0 and max_length >= 4 are required")
        if "{phrase}" not in self.class_template:
            raise ValueError(f"class_template {self.class_template!r} must contain {{phrase}}")


# ----------------------------------------------------------------------------------------------
# data


def load_images(dataset_dir: str | Path, df: pd.DataFrame, size: int | None = None) -> torch.Tensor:
    """The images of ``df`` as one float tensor [N, 3, H, W] in [0, 1] (grayscale repeated to 3 channels).

    Eager: for one batch (the probe embeds the dataset batch by batch); training streams ``image_column``.
    """
    if len(df) == 0:
        return torch.zeros(0, 3, size or 1, size or 1)
    return image_column(dataset_dir, df, size, "unit")[list(range(len(df)))]


def split_rows(dataset_dir: str | Path, split: str) -> tuple[DatasetMeta, pd.DataFrame]:
    """The dataset's meta and its manifest rows of ``split`` (error when there are none)."""
    meta = read_meta(dataset_dir)
    df = read_manifest(dataset_dir)
    rows = df[df["split"] == split].reset_index(drop=True)
    if rows.empty:
        raise ValueError(f"{dataset_dir}: no rows with split == {split!r}")
    return meta, rows


def read_prompts(annotations: str | Path | None) -> dict[str, str]:
    """image_id -> enriched prompt from ``annotations.parquet`` (rows with status ``ok`` only)."""
    if not annotations:
        return {}
    path = Path(annotations)
    if path.is_dir():
        path = path / "annotations.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: annotations file not found")
    ann = pd.read_parquet(path)
    missing = [c for c in ("image_id", "enriched_prompt", "status") if c not in ann.columns]
    if missing:
        raise ValueError(f"{path}: missing column {missing[0]!r}")
    ok = ann[ann["status"] == "ok"]
    return {str(i): str(p) for i, p in zip(ok["image_id"], ok["enriched_prompt"]) if isinstance(p, str) and p}


def pair_texts(rows: pd.DataFrame, meta: DatasetMeta, prompts: dict[str, str]) -> list[str]:
    """Each row's training text: its enriched prompt, else "<class phrase>, <weak caption>"."""
    out = []
    for row in rows.itertuples(index=False):
        p = prompts.get(str(row.image_id))
        if p is None:
            cap = row.caption if isinstance(row.caption, str) and row.caption else ""
            p = f"{meta.phrase(row.label)}, {cap}" if cap else meta.phrase(row.label)
        out.append(p)
    return out


def vocabulary(texts: list[str], phrases: list[str], min_count: int) -> list[str]:
    """Words that become whole tokens: the class phrases plus frequent words of the training texts."""
    counts = Counter(w for t in texts for w in t.lower().replace(",", " ").replace(".", " ").split())
    return list(phrases) + sorted(w for w, c in counts.items() if c >= min_count)


def _checklist(source: str, annotations: str | Path | None, meta: DatasetMeta) -> dict[str, list[dict]]:
    """The class checklists used as extra class texts ({} when none is configured or found)."""
    from craft.annotate.checklists import load_checklist

    if not source and annotations and Path(annotations).is_dir() and (Path(annotations) / "checklists.json").is_file():
        source = str(Path(annotations) / "checklists.json")
    return load_checklist(source, list(meta.classes), meta.modality) if source else {}


# ----------------------------------------------------------------------------------------------
# model


def build_model(spec: EncoderSpec, image_size: int, tokenizer, max_length: int):
    """A random-init (seeded) tiny ``SiglipModel`` / ``CLIPModel`` and its HF preprocessor config."""
    from transformers import CLIPConfig, SiglipConfig, SiglipModel
    from transformers import CLIPModel as _CLIPModel

    from craft.models.encoders import preprocessor_config

    spec.validate()
    torch.manual_seed(spec.seed)
    text = dict(vocab_size=len(tokenizer), hidden_size=spec.width, intermediate_size=2 * spec.width,
                num_hidden_layers=spec.layers, num_attention_heads=spec.heads, max_position_embeddings=max_length,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    vision = dict(hidden_size=spec.width, intermediate_size=2 * spec.width, num_hidden_layers=spec.layers,
                  num_attention_heads=spec.heads, image_size=image_size, patch_size=spec.patch_size,
                  num_channels=3)  # fmt: skip
    if spec.arch == "siglip":
        cfg = SiglipConfig(text_config={**text, "projection_size": spec.embed_dim}, vision_config=vision)
        model, pre = SiglipModel(cfg), preprocessor_config("siglip", image_size, SIGLIP_MEAN, SIGLIP_STD)
        with torch.no_grad():  # SigLIP's init t' = log 10, b = -10 (Zhai et al. 2023); HF's random init is 0, 0
            model.logit_scale.fill_(math.log(10.0))
            model.logit_bias.fill_(-10.0)
    else:
        cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec.embed_dim)
        model, pre = _CLIPModel(cfg), preprocessor_config("clip", image_size, CLIP_MEAN, CLIP_STD)
    return model, pre


def _features(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def contrastive_loss(
    img: torch.Tensor, txt: torch.Tensor, positives: torch.Tensor, arch: str, scale: torch.Tensor,
    bias: torch.Tensor | None = None, symmetric: bool = True,
) -> torch.Tensor:  # fmt: skip
    """CLIP (softmax) or SigLIP (sigmoid) loss of unit-norm ``img`` [B, D] vs ``txt`` [T, D].

    ``positives`` [B, T] marks matching pairs; a row may have several (repeated texts, one class text
    per class), so CLIP's targets are the positives spread uniformly over the row. SigLIP: every pair
    is a binary problem with label +1/-1, summed and divided by B (Zhai et al. 2023).

    >>> e = torch.eye(2)
    >>> round(contrastive_loss(e, e, torch.eye(2, dtype=torch.bool), "clip", torch.tensor(0.0)).item(), 4)
    0.6931
    """
    logits = scale.exp() * img @ txt.T
    pos = positives.float()
    if arch == "siglip":
        z = logits + (bias if bias is not None else 0.0)
        return -F.logsigmoid((2 * pos - 1) * z).sum() / img.shape[0]
    loss = -(pos / pos.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    if symmetric:
        has = pos.sum(0) > 0
        lt = F.log_softmax(logits.T[has], dim=1)
        pt = pos.T[has]
        loss = 0.5 * (loss - (pt / pt.sum(1, keepdim=True) * lt).sum(1).mean())
    return loss


class _Batcher:
    """Images + texts + class indices; the loss of one batch for a tiny dual encoder under training."""

    def __init__(
        self, model, tokenizer, arch: str, pre: dict, max_length: int, class_texts: list[str],
        class_of_text: list[int],
    ):  # fmt: skip
        self.model, self.tok, self.arch, self.max_length = model, tokenizer, arch, max_length
        self.mean = torch.tensor(pre["image_mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(pre["image_std"]).view(1, 3, 1, 1)
        self.class_ids = self.ids(class_texts)  # class phrases first (one per class), then checklist items
        self.class_of_text = torch.tensor(class_of_text)
        self.n_classes = int(self.class_of_text.max()) + 1

    def ids(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tok(list(texts), padding="max_length", max_length=self.max_length, truncation=True,
                       return_tensors="pt")  # fmt: skip
        out = {"input_ids": enc["input_ids"]}
        if self.arch == "clip":  # same feeding as DualEncoder.tokenize
            out["attention_mask"] = enc["attention_mask"]
        return out

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(_features(self.model.get_image_features(pixel_values=(x - self.mean) / self.std)), dim=-1)

    def embed_texts(self, ids: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.normalize(_features(self.model.get_text_features(**ids)), dim=-1)

    def loss(self, x: torch.Tensor, texts: list[str], y: torch.Tensor, class_weight: float) -> torch.Tensor:
        img = self.embed_images(x)
        uniq = list(dict.fromkeys(texts))
        pos = torch.tensor([[t == u for u in uniq] for t in texts])
        txt = self.embed_texts(self.ids(uniq))
        bias = getattr(self.model, "logit_bias", None)
        scale = self.model.logit_scale
        loss = contrastive_loss(img, txt, pos, self.arch, scale, bias)
        if class_weight > 0:
            cls = self.embed_texts(self.class_ids)
            cpos = y[:, None] == self.class_of_text[None, :]
            loss = loss + class_weight * contrastive_loss(img, cls, cpos, self.arch, scale, bias, symmetric=False)
        return loss


@torch.no_grad()
def zero_shot_accuracy(batcher: _Batcher, images: torch.Tensor | PixelColumn, y: torch.Tensor) -> float:
    """Share of images (a tensor, or a column read 256 at a time) whose nearest class-phrase embedding is their own class."""
    if len(y) == 0:
        return float("nan")
    cls = batcher.embed_texts({k: v[: batcher.n_classes] for k, v in batcher.class_ids.items()})
    pred = torch.cat([(batcher.embed_images(images[i : i + 256]) @ cls.T).argmax(1) for i in range(0, len(y), 256)])
    return float((pred == y).float().mean())


def role_spec(cfg: EncoderTrainConfig, role: str) -> EncoderSpec:
    """The spec ``role`` trains: one of ``ROLES``, or ``critic-K`` = the critic's spec with ``ensemble_seeds[K-1]``."""
    if role in ROLES:
        return getattr(cfg, role)
    head, _, k = role.partition("-")
    if head == "critic" and k.isdigit() and 1 <= int(k) <= len(cfg.ensemble_seeds):
        return replace(cfg.critic, seed=cfg.ensemble_seeds[int(k) - 1])
    members = f"critic-1..critic-{len(cfg.ensemble_seeds)}" if cfg.ensemble_seeds else "none (ensemble_seeds is empty)"
    raise ValueError(f"role must be one of {', '.join(ROLES)} or an ensemble member ({members}), got {role!r}")


def train_encoder(
    cfg: EncoderTrainConfig,
    role: str,
    dataset_dir: str | Path,
    out_dir: str | Path,
    annotations: str | Path | None = None,
    max_steps: int | None = None,
) -> dict[str, float]:
    """Train ``role``'s encoder on the training split and save it at ``out_dir``; return metrics.

    ``max_steps`` stops early (tests). The saved directory loads with ``craft.models.encoders.load_encoder``.
    """
    from craft.annotate.checklists import checklist_text
    from craft.models.diffusion import build_tokenizer
    from craft.models.encoders import save_encoder

    cfg.validate()
    spec = role_spec(cfg, role)
    torch.set_num_threads(max(1, cfg.threads))
    t0 = time.perf_counter()
    meta, rows = split_rows(dataset_dir, "train")
    prompts = read_prompts(annotations)
    texts = pair_texts(rows, meta, prompts)
    classes = list(meta.classes)
    unknown = sorted(set(rows["label"]) - set(classes))
    if unknown:
        raise ValueError(f"{dataset_dir}: label {unknown[0]!r} is not in dataset.yaml classes")
    y = torch.tensor([classes.index(lbl) for lbl in rows["label"]])
    images = image_column(dataset_dir, rows, cfg.image_size, "unit")  # decoded from disk per batch
    class_texts = [cfg.class_template.format(phrase=meta.phrase(c)) for c in classes]
    class_of_text = list(range(len(classes)))
    checklist = _checklist(cfg.checklist, annotations, meta)
    for c, items in checklist.items():
        for item in items:
            class_texts.append(checklist_text([item]))  # one item per text, as the CAM embeds them
            class_of_text.append(classes.index(c))
    tok = build_tokenizer(vocabulary(texts + class_texts, [meta.phrase(c) for c in classes], cfg.min_word_count),
                          cfg.max_length)  # fmt: skip
    model, pre = build_model(spec, cfg.image_size, tok, cfg.max_length)
    model.train()
    batcher = _Batcher(model, tok, spec.arch, pre, cfg.max_length, class_texts, class_of_text)
    n = len(rows)
    bs = min(cfg.batch_size, n)
    steps_per_epoch = max(1, n // bs)
    total = cfg.epochs * steps_per_epoch if max_steps is None else min(max_steps, cfg.epochs * steps_per_epoch)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    )
    gen = torch.Generator().manual_seed(spec.seed)
    view = None
    if spec.views:  # the views' own stream, so a run without them draws the same batches as before
        from craft.train.reward import RewardAugment, augmented_view

        aug, vgen = RewardAugment(views=1, crop_scale=spec.view_crop, flip=spec.view_flip, noise_std=spec.view_noise), \
            torch.Generator().manual_seed(spec.seed + 7919)  # fmt: skip
        view = lambda x: augmented_view(x, aug, vgen)  # noqa: E731
    losses: list[float] = []
    step = 0
    while step < total:
        perm = torch.randperm(n, generator=gen)
        for b in range(steps_per_epoch):
            if step >= total:
                break
            idx = perm[b * bs : (b + 1) * bs]
            x = images[idx] if view is None else view(images[idx])
            loss = batcher.loss(x, [texts[i] for i in idx.tolist()], y[idx], cfg.class_weight)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"encoder {role}: non-finite contrastive loss at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
    model.eval()
    train_acc = zero_shot_accuracy(batcher, images, y)
    test_acc = float("nan")
    df = read_manifest(dataset_dir)
    test_rows = df[df["split"] == "test"].reset_index(drop=True)
    if len(test_rows):
        ty = torch.tensor([classes.index(lbl) for lbl in test_rows["label"]])
        test_acc = zero_shot_accuracy(batcher, image_column(dataset_dir, test_rows, cfg.image_size, "unit"), ty)
    k = max(1, min(5, len(losses) // 4))
    metrics = {
        "steps": float(step),
        "loss_first": float(np.mean(losses[:k])),
        "loss_last": float(np.mean(losses[-k:])),
        "zero_shot_train_acc": train_acc,
        "zero_shot_test_acc": test_acc,
        "n_train": float(n),
        "n_enriched_prompts": float(sum(str(i) in prompts for i in rows["image_id"])),
        "n_checklist_texts": float(len(class_texts) - len(classes)),
        "train_seconds": time.perf_counter() - t0,
    }
    from craft.config import to_dict

    lineage = {"stage": "encoder", "role": role, "dataset": str(dataset_dir), "dataset_source": meta.source,
               "annotations": str(annotations or ""), "config": to_dict(cfg), "metrics": metrics}  # fmt: skip
    save_encoder(model, tok, out_dir, pre, lineage)
    log.info("encoder %s (%s, seed %d): %s", role, spec.arch, spec.seed, metrics)
    return metrics


def main(
    cfg: EncoderTrainConfig, role: str, dataset_dir: str | Path, out_dir: str | Path,
    annotations: str | Path | None = None,
) -> dict[str, float]:  # fmt: skip
    """Stage entry point: train and save ``role``'s encoder."""
    return train_encoder(cfg, role, dataset_dir, out_dir, annotations)


def encoder_step(
    dataset_dir: str | Path, annotations_dir: str | Path | None, role: str, out_dir: str | Path, profile: str,
    overrides: list[str],
) -> dict[str, float]:  # fmt: skip
    """Pipeline step: the profile's ``encoder`` config + pipeline-wide overrides -> one role's encoder at ``out_dir``."""
    from craft.config import load_stage_config

    cfg = load_stage_config("encoder", profile, overrides)
    ann = annotations_dir if annotations_dir and Path(annotations_dir).exists() else None
    return main(cfg, role, dataset_dir, out_dir, ann)
