"""``craft train probe``: the diagnostic-discriminability linear probe of CRAFT (appendix A.2), one per role.

A single ``nn.Linear`` on the frozen, unit-norm image embeddings of REAL training images only, trained
with Adam for 50 epochs at batch 256 (A.2; the learning rate is configurable, the paper's value is
lost in our copy). The critic's probe gives the differentiable DD reward log p(y | x_hat) during
DRaFT; the evaluator's probe gives DD = accuracy on generated images at evaluation.
Writes ``probe.safetensors`` + ``probe.json`` (classes order, encoder identity, accuracies).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from craft.models.encoders import DualEncoder, LinearProbe, fit_linear_probe, load_encoder, load_probe, save_probe
from craft.train.encoder import load_images, split_rows

__all__ = ["ProbeConfig", "embed_split", "fit_probe", "load_probe", "main", "train_probe"]
log = logging.getLogger(__name__)


@dataclass
class ProbeConfig:
    """Stage ``probe``: a linear probe on one frozen encoder's embeddings of the real training images."""

    epochs: int = 50  # CRAFT A.2: 50 epochs
    batch_size: int = 256  # CRAFT A.2: batch 256
    lr: float = 1e-3  # Adam learning rate
    weight_decay: float = 0.0  # Adam L2 penalty
    seed: int = 0  # initialisation and batch order
    embed_batch: int = 64  # images per encoder forward pass when embedding the dataset
    device: str = "cpu"  # torch device for the encoder and the probe: cpu, cuda, or auto (cuda when there is one)
    threads: int = 2  # torch CPU threads

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.embed_batch < 1:
            raise ValueError("epochs, batch_size and embed_batch must be >= 1")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")


@torch.no_grad()
def embed_split(encoder: DualEncoder, dataset_dir: str | Path, split: str, batch: int = 64):
    """(embeddings [N, D], label names) of the real images of ``split``; images at their stored size."""
    meta, rows = split_rows(dataset_dir, split)
    embs = []
    for i in range(0, len(rows), batch):
        embs.append(encoder.encode_images(load_images(dataset_dir, rows.iloc[i : i + batch])).cpu())
    return torch.cat(embs), [str(v) for v in rows["label"]]


def fit_probe(
    emb: torch.Tensor, labels: list[str], classes: list[str], cfg: ProbeConfig, encoder_identity: str = ""
) -> LinearProbe:
    """Adam on cross-entropy, ``cfg.epochs`` passes in seeded shuffled batches (CRAFT A.2): ``fit_linear_probe``."""
    cfg.validate()
    return fit_linear_probe(emb, labels, classes, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                            weight_decay=cfg.weight_decay, seed=cfg.seed, identity=encoder_identity)  # fmt: skip


@torch.no_grad()
def accuracy(probe: LinearProbe, emb: torch.Tensor, labels: list[str]) -> float:
    if len(labels) == 0:
        return float("nan")
    return float((probe(emb.float()).argmax(1) == probe.label_indices(labels)).float().mean())


def train_probe(
    cfg: ProbeConfig, encoder: DualEncoder | str | Path, dataset_dir: str | Path, out_dir: str | Path
) -> dict[str, float]:
    """Embed the real train (and test) images with the frozen ``encoder``, fit the probe, save it; return metrics."""
    cfg.validate()
    torch.set_num_threads(max(1, cfg.threads))
    t0 = time.perf_counter()
    enc = encoder if isinstance(encoder, DualEncoder) else load_encoder(encoder, device=cfg.device)
    meta, _ = split_rows(dataset_dir, "train")
    emb, labels = embed_split(enc, dataset_dir, "train", cfg.embed_batch)
    probe = fit_probe(emb, labels, list(meta.classes), cfg, enc.identity)
    metrics = {"train_acc": accuracy(probe, emb, labels), "n_train": float(len(labels))}
    from craft.data.manifest import read_manifest

    if (read_manifest(dataset_dir)["split"] == "test").any():
        temb, tlabels = embed_split(enc, dataset_dir, "test", cfg.embed_batch)
        metrics.update(test_acc=accuracy(probe, temb, tlabels), n_test=float(len(tlabels)))
    metrics["train_seconds"] = time.perf_counter() - t0
    save_probe(probe, out_dir, {"encoder": str(enc.source), "dataset": str(dataset_dir), "metrics": metrics})
    log.info("probe on %s: %s", enc.source, metrics)
    return metrics


def main(cfg: ProbeConfig, encoder_dir: str | Path, dataset_dir: str | Path, out_dir: str | Path) -> dict[str, float]:
    """Stage entry point: train and save the probe of the encoder at ``encoder_dir``."""
    return train_probe(cfg, encoder_dir, dataset_dir, out_dir)


def probe_step(
    encoder_dir: str | Path, dataset_dir: str | Path, out_dir: str | Path, profile: str, overrides: list[str]
) -> dict[str, float]:
    """Pipeline step: the profile's ``probe`` config + pipeline-wide overrides -> a probe at ``out_dir``."""
    from craft.config import load_stage_config

    return main(load_stage_config("probe", profile, overrides), encoder_dir, dataset_dir, out_dir)
