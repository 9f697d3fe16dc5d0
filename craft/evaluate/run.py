"""``craft evaluate``: every model variant through the same held-out protocol, scored by the EVALUATOR.

Protocol (CRAFT 4.1.3, "prompt-conditioned re-synthesis"; app. N): each held-out (``split``) image's
enriched prompt drives ``samples_per_prompt`` samples from every variant, so the synthetic set has the
test split's class distribution by construction (``max_prompts`` caps the prompts, stratified by
class, for the demo). The initial noise of sample k of image i is seeded by (seed, image_id, k), so
every variant starts from the same noise. The variant ``"real"`` is the held-out images themselves.
Image pixels are never generator input; they are used only afterwards (SFS, FID, memorization).

Scores (CRAFT 4.1.4): VDC, CCS, SFS are cosines in the evaluator's embedding; DD is 1 when the
evaluator's own linear probe reads the target class; CAS is their mean. The evaluator must not be
the training critic (Table 11): ``main`` refuses an evaluator whose weights hash equals the critic's.
Per variant: the means (Table 1), the low-alignment rate (strictly below the real images' 25th CAS
percentile) and the 10th percentile (Table 14, app. H); optionally CAS again under a second,
out-of-family evaluator (4.2.7). Fidelity (FID / image-image / image-text similarity in the
evaluator's embedding, silhouette, per-prompt diversity), memorization against the training split
(app. M), downstream utility (4.2.5, app. G), preferences ranked by the evaluator's CAS with
Bradley-Terry scores, and for the demo modalities the ground-truth oracle (the referee's independent
reader, seed 002).

Writes ``metrics.json`` (schema of ``craft.promote``: the candidate's flat gate keys at the top level,
plus per-variant blocks), ``per_image.parquet`` (one row per scored image) and ``report.html``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from craft.evaluate.oracle import CalibrationThresholds
from craft.io import atomic_write_bytes

log = logging.getLogger(__name__)

REAL = "real"
CHAMPION = "champion"  # the production model, evaluated beside the candidate
ZERO_SHOT = "zero_shot"  # the untuned base
GATE_KEYS = ("cas", "low_alignment_rate", "oracle_accuracy", "near_duplicates", "downstream_accuracy")
DEMO_MODALITIES = ("histo", "cxr")


# ----------------------------------------------------------------------------------------------
# config


@dataclass
class MemorizationSettings:
    """Memorization search of CRAFT app. M (``craft.evaluate.memorization``)."""

    enabled: bool = True  # run the SSIM / pHash / nearest-neighbour search per generator variant
    ssim_threshold: float = 0.95  # SSIM >= this to a training image counts as a near-duplicate (app. M)
    phash_threshold: int = 8  # pHash Hamming distance <= this counts as a near-duplicate (64-bit hash)
    # exact SSIM only against each generated image's k nearest training images in 16x16 grey-thumbnail NCC
    # (plus its pHash- and embedding-nearest); "all" = exhaustive, every (generated, training) pair: hours at 512 px
    ssim_top_k: int | Literal["all"] = 32
    # embedding for d_train / d_test: an encoder independent of critic and evaluator (CRAFT: DINOv2).
    # auto = the second evaluator when given, else pixels (mean-removed 16x16 grey thumbnails)
    embedding: Literal["auto", "evaluator2", "evaluator", "pixels"] = "auto"

    def validate(self) -> None:
        if self.ssim_top_k != "all" and self.ssim_top_k < 1:
            raise ValueError(f"memorization.ssim_top_k must be >= 1 or 'all', got {self.ssim_top_k}")


@dataclass
class DownstreamSettings:
    """Downstream utility (CRAFT 4.2.5, app. G): a classifier on real vs real + synthetic images."""

    enabled: bool = True  # train the classifiers
    prompts: int = 0  # TRAINING-split prompts sampled once per variant for the synthetic set (0 = all)
    scales: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])  # fractions of the real train split
    synth_fraction: float = 0.2  # synthetic share of every batch (CRAFT: 20%)
    epochs: int = 8  # passes over the real images per classifier
    # classifier (craft.evaluate.downstream.resolve_classifier): small_cnn (the demo's 3-block CNN) or a
    # transformers ResNet built from its config (random init, nothing downloaded); auto = small_cnn up to
    # 64 px, resnet18 above
    arch: Literal["auto", "small_cnn", "resnet18", "resnet34", "resnet50"] = "auto"
    image_size: int = 0  # classifier input, longest side in px; 0 = small_cnn 32, a ResNet min(resolution, 224)
    width: int = 0  # first-stage channels; 0 = the arch's default (small_cnn 8, ResNet 64)
    flip: bool = False  # random flips as augmentation (off: radiographs are not left-right symmetric)

    def validate(self) -> None:
        if not self.scales or any(not 0 < s <= 1 for s in self.scales):
            raise ValueError(f"downstream.scales must be fractions in (0, 1], got {self.scales}")
        if self.prompts < 0 or self.epochs < 1:
            raise ValueError("downstream.prompts must be >= 0 and downstream.epochs >= 1")
        if self.image_size < 0 or self.width < 0:
            raise ValueError("downstream.image_size and downstream.width must be >= 0 (0 = the arch's default)")

    def classifier_kwargs(self) -> dict[str, Any]:
        """The classifier's keyword arguments for ``craft.evaluate.downstream.downstream_utility``."""
        return {"arch": self.arch, "image_size": self.image_size, "width": self.width, "epochs": self.epochs,
                "flip": self.flip}  # fmt: skip


@dataclass
class OracleSettings:
    """Ground-truth oracle for demo datasets (``craft.evaluate.oracle``); ignored for real collections."""

    enabled: bool = True  # use it when the dataset is a demo modality (name demo*, modality histo/cxr)
    n: int = 1200  # images in the oracle's separately seeded training sample
    seed: int = 10_007  # never used by any training stage
    epochs: int = 8  # oracle training passes (8x8-shuffle rejection is learnt late: 6 left histo at 0.41)
    n_check: int = 400  # fresh images (seed + 1) for its calibration table
    min_accuracy: float | None = 0.8  # refuse an oracle that reads fresh real images worse than this
    cache_dir: str = ""  # "" = <model cache>/oracle (craft.data.loader.model_cache_dir) or ~/.cache/craft/oracle
    # what the calibration table must show before the oracle scores (clean / nuisance floors, structure ceiling)
    calibration: CalibrationThresholds = field(default_factory=CalibrationThresholds)


@dataclass
class PreferenceSettings:
    """Preferences: per case, rank the generator variants' images with a judge; Bradley-Terry + bootstrap."""

    enabled: bool = True  # rank variants per case with the evaluator's CAS as judge
    bootstrap: int = 200  # bootstrap resamples of the cases for the confidence intervals
    ci: float = 0.95  # confidence level of the intervals


@dataclass
class CurveSettings:
    """Over-optimisation curves (issue 21, ``craft.evaluate.curves``): the evaluator's CAS and the oracle over
    every snapshot of each reward adapter trained with ``reward.monitor``, beside its training-side readings."""

    enabled: bool = True  # no effect on variants without a monitor log (every non-reward or unmonitored adapter)
    prompts: int = 16  # held-out TEST prompts per snapshot: a class-stratified subset of the stage's prompts
    samples_per_prompt: int = 1  # images per prompt and snapshot (sample k of image i: the stage's seed for it)

    def validate(self) -> None:
        if self.prompts < 1 or self.samples_per_prompt < 1:
            raise ValueError(f"curves.prompts and curves.samples_per_prompt must be >= 1 "
                             f"(got {self.prompts}, {self.samples_per_prompt})")  # fmt: skip


@dataclass
class EvaluateConfig:
    """Stage ``evaluate`` (``craft evaluate``): all variants under one protocol, one evaluator, one report."""

    candidate: str = "craft"  # variant whose numbers fill the gate keys of metrics.json ("" = none)
    split: str = "test"  # held-out split whose enriched prompts drive generation
    max_prompts: int = 0  # cap on held-out prompts, stratified by class (0 = every held-out image)
    samples_per_prompt: int = 1  # generated images per prompt and variant (>= 2 for the diversity metric)
    steps: int = 20  # sampler steps
    guidance: float = 4.0  # classifier-free guidance scale (<= 1: conditional model alone)
    scheduler: Literal["ddim", "ddpm", "dpmpp"] = "ddim"  # sampler (DDIM eta 0 / DPM-Solver++: seed alone fixes it)
    seed: int = 0  # base seed of the per-(image, sample) noise
    batch_size: int = 16  # prompts per pipeline call
    quantile: float = 0.25  # low-alignment threshold: this quantile of the real images' CAS (app. H)
    checklist_mode: Literal["mean_items", "joined"] = "mean_items"  # checklist text embedding (encoders module)
    embed_batch: int = 64  # images per evaluator forward pass
    grid_per_class: int = 4  # images per class and variant in the report's grids
    device: str = "auto"  # torch device: auto (cuda when there is one), cpu, cuda
    threads: int = 2  # torch CPU threads
    memorization: MemorizationSettings = field(default_factory=MemorizationSettings)
    downstream: DownstreamSettings = field(default_factory=DownstreamSettings)
    oracle: OracleSettings = field(default_factory=OracleSettings)
    preferences: PreferenceSettings = field(default_factory=PreferenceSettings)
    curves: CurveSettings = field(default_factory=CurveSettings)

    def validate(self) -> None:
        if self.samples_per_prompt < 1 or self.steps < 1 or self.batch_size < 1 or self.embed_batch < 1:
            raise ValueError("samples_per_prompt, steps, batch_size and embed_batch must be >= 1")
        if self.max_prompts < 0:
            raise ValueError(f"max_prompts must be >= 0, got {self.max_prompts}")
        if not 0 < self.quantile < 1:
            raise ValueError(f"quantile must lie in (0, 1), got {self.quantile}")
        if self.candidate == REAL:
            raise ValueError("candidate cannot be the real images")
        self.downstream.validate()
        self.oracle.calibration.validate()
        self.curves.validate()


# ----------------------------------------------------------------------------------------------
# variants


@dataclass
class VariantSpec:
    """A generator: a diffusers pipeline directory, optionally with a craft adapter (LoRA / TI) on top."""

    model: str
    adapter: str = ""

    def key(self) -> str:
        """Paths plus a fingerprint of the files under them, so a model rewritten in place is sampled again."""
        return f"{self.model}|{self.adapter}|{_fingerprint(self.model)}|{_fingerprint(self.adapter)}"


def _fingerprint(where: str) -> str:
    """sha256 over (relative path, size, mtime) of every file under a local folder; "" for none / s3://."""
    p = Path(where) if where and not where.startswith("s3://") else None
    if p is None or not p.is_dir():
        return ""
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def parse_variant(text: str) -> tuple[str, VariantSpec | str]:
    """``name=MODEL_DIR[:ADAPTER_DIR]`` or ``real`` / ``real=real`` -> (name, spec).

    >>> parse_variant("craft=/m/base:/m/lora")
    ('craft', VariantSpec(model='/m/base', adapter='/m/lora'))
    """
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep:
        if name == REAL:
            return REAL, REAL
        raise ValueError(f"--variant {text!r}: expected name=MODEL_DIR[:ADAPTER_DIR] (or 'real')")
    if not name or not rest:
        raise ValueError(f"--variant {text!r}: empty name or model directory")
    if rest == REAL:
        return name, REAL
    model, _, adapter = rest.partition(":") if not rest.startswith("s3://") else _split_s3(rest)
    return name, VariantSpec(model, adapter)


def _split_s3(rest: str) -> tuple[str, str, str]:
    # s3://a/b:s3://c/d -> split at the ':' that starts the second URI
    i = rest.find(":", len("s3://"))
    return (rest, "", "") if i < 0 else (rest[:i], ":", rest[i + 1 :])


def _as_spec(name: str, spec: Any) -> VariantSpec | str:
    if isinstance(spec, VariantSpec) or spec == REAL:
        return spec
    if isinstance(spec, str | Path):
        return VariantSpec(str(spec))
    if isinstance(spec, dict) and "model" in spec:
        return VariantSpec(str(spec["model"]), str(spec.get("adapter") or ""))
    raise ValueError(f"variant {name!r}: expected 'real', a model directory or {{'model', 'adapter'}}, got {spec!r}")


def load_variant_pipeline(spec: VariantSpec, device: torch.device):
    """The diffusers pipeline of ``spec`` with its adapter loaded; returns (pipe, adapter meta)."""
    from craft.sample import load_generator

    return load_generator(spec.model, spec.adapter or None, device)


def variant_prompt(prompt: str, label: str, adapter_meta: dict[str, Any]) -> str:
    """The prompt a variant samples with: a textual-inversion adapter's class token in front (``class_token_prompt``)."""
    from craft.models.adapters import class_token_prompt

    return class_token_prompt(prompt, label, adapter_meta)


def sample_seed(seed: int, image_id: str, k: int) -> int:
    """Noise seed of sample ``k`` for held-out image ``image_id``: the same for every variant."""
    return int(np.random.SeedSequence([seed, zlib.crc32(str(image_id).encode()), k]).generate_state(1)[0])


def generate(pipe, prompts: list[str], seeds: list[int], cfg: EvaluateConfig) -> list:
    """PIL images, image j from the initial latent seeded by ``seeds[j]`` (``craft.sample.generate_seeded``)."""
    from craft.sample import generate_seeded

    return generate_seeded(pipe, prompts, seeds, cfg.steps, cfg.guidance, cfg.scheduler, cfg.batch_size)


# ----------------------------------------------------------------------------------------------
# data


def held_out_table(dataset_dir, annotations_dir, split: str) -> tuple[Any, pd.DataFrame, dict]:
    """(meta, rows of ``split`` with their ok enriched prompt, checklists); a row without a prompt is an error."""
    from craft.annotate.run import with_enriched_prompts

    meta, rows, ann_path = with_enriched_prompts(dataset_dir, annotations_dir, split)
    lacking = rows["enriched_prompt"].isna()
    if lacking.any():
        raise ValueError(f"{ann_path}: no ok enriched prompt for {split} image_id={rows.loc[lacking, 'image_id'].iloc[0]!r}"
                         f" ({int(lacking.sum())} of {len(rows)}); the protocol needs one per held-out image")  # fmt: skip
    unknown = sorted(set(rows["label"]) - set(meta.classes))
    if unknown:
        raise ValueError(f"{dataset_dir}: label {unknown[0]!r} is not in dataset.yaml classes")
    ck_path = Path(annotations_dir) / "checklists.json"
    if not ck_path.is_file():
        raise FileNotFoundError(f"{ck_path}: missing (run craft annotate first)")
    checklists = json.loads(ck_path.read_text())
    return meta, rows, checklists


def stratified_cap(rows: pd.DataFrame, cap: int, seed: int) -> pd.DataFrame:
    """At most ``cap`` rows keeping the class proportions (largest remainder, >= 1 per class), seeded.

    >>> df = pd.DataFrame({"image_id": list("abcdefgh"), "label": list("xxxxxxyy")})
    >>> stratified_cap(df, 4, 0)["label"].value_counts().to_dict()
    {'x': 3, 'y': 1}
    """
    if cap <= 0 or cap >= len(rows):
        return rows.reset_index(drop=True)
    counts = rows["label"].value_counts().sort_index()
    if cap < len(counts):
        raise ValueError(f"max_prompts={cap} cannot cover the {len(counts)} classes of the held-out split")
    exact = counts / counts.sum() * cap
    take = np.maximum(np.floor(exact).astype(int), 1)
    rest = cap - int(take.sum())
    for lbl in (exact - np.floor(exact)).sort_values(ascending=False).index:
        if rest <= 0:
            break
        if take[lbl] < counts[lbl]:
            take[lbl] += 1
            rest -= 1
    rng = np.random.default_rng(seed)
    keep = []
    for lbl, k in take.items():
        idx = np.flatnonzero(rows["label"].to_numpy() == lbl)
        keep.extend(sorted(rng.choice(idx, size=int(k), replace=False).tolist()))
    return rows.iloc[sorted(keep)].reset_index(drop=True)


def _size(meta) -> tuple[int, int]:
    r = meta.resolution
    return (int(r), int(r)) if isinstance(r, int) else (int(r[1]), int(r[0]))  # PIL (width, height)


def to_dataset_array(images, meta) -> np.ndarray:
    """PIL images -> uint8 array in the dataset's mode and size: (N, H, W) for L, (N, H, W, 3) for RGB."""
    from PIL import Image

    mode = "L" if meta.mode == "L" else "RGB"
    size = _size(meta)
    out = []
    for im in images:
        im = im.convert(mode)
        if im.size != size:
            im = im.resize(size, Image.Resampling.BICUBIC)
        out.append(np.asarray(im, dtype=np.uint8))
    return np.stack(out)


def read_images(dataset_dir, rows: pd.DataFrame, meta) -> np.ndarray:
    """The rows' real images as a dataset-mode uint8 array; unreadable files are named."""
    from PIL import Image

    ims = []
    for r in rows.itertuples(index=False):
        path = Path(dataset_dir) / r.image_path
        try:
            with Image.open(path) as im:
                im.load()
                ims.append(im.copy())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} (image_id {r.image_id}): cannot read image: {e}") from e
    return to_dataset_array(ims, meta)


def _tensor(images: np.ndarray) -> torch.Tensor:
    from craft.evaluate.metrics import as_image_tensor

    return as_image_tensor(images)


def pixel_embedding(images: np.ndarray, size: int = 16) -> np.ndarray:
    """Mean-removed, unit-norm 16x16 grey thumbnails: a model-free embedding for nearest-neighbour distances."""
    t = _tensor(images).mean(1, keepdim=True)
    t = torch.nn.functional.adaptive_avg_pool2d(t, size).flatten(1).double()
    t = t - t.mean(1, keepdim=True)
    return (t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)).numpy()


# ----------------------------------------------------------------------------------------------
# scoring with one evaluator


class Scorer:
    """One evaluator encoder + its probe + class checklists -> per-image VDC, CCS, DD, SFS and embeddings."""

    def __init__(self, encoder, probe, checklists: dict, checklist_mode: str, embed_batch: int):
        from craft.models.encoders import ClinicalAlignmentModule

        cam = ClinicalAlignmentModule(encoder, probe, checklists, checklist_mode, dd="accuracy")
        self.encoder, self.probe, self.checklist_emb = encoder, probe, cam.checklist_emb
        self.batch = embed_batch

    @torch.no_grad()
    def embed(self, images: np.ndarray) -> torch.Tensor:
        x = _tensor(images)
        return torch.cat([self.encoder.encode_images(x[i : i + self.batch]).float().cpu()
                          for i in range(0, len(x), self.batch)])  # fmt: skip

    @torch.no_grad()
    def score(self, emb: torch.Tensor, labels: list[str], prompts: list[str], ref_emb: torch.Tensor) -> dict:
        """CRAFT 4.1.4 primitives per image: VDC eq. 2, CCS eq. 3, DD = probe correct, SFS eq. 5; plus CAS."""
        dev = self.encoder.device
        y = self.probe.label_indices(labels).cpu()
        text = self.encoder.encode_texts(prompts).float().cpu()
        logits = self.probe(emb.to(dev)).float().cpu()
        out = cas_from_embeddings(emb, text, self.checklist_emb.float().cpu(), logits, y, ref_emb)
        out["pred"] = [self.probe.classes[i] for i in out.pop("pred_index").tolist()]
        return out


def cas_from_embeddings(emb: torch.Tensor, text_emb: torch.Tensor, checklist_emb: torch.Tensor, logits: torch.Tensor,
                        y: torch.Tensor, ref_emb: torch.Tensor) -> dict[str, Any]:  # fmt: skip
    """Per-image VDC, CCS, DD, SFS and CAS for N images at once (CRAFT 4.1.4), from embeddings.

    emb [N, D] images, text_emb [N, D] their prompts, checklist_emb [C, D] per class, logits [N, C] of the
    evaluator's probe, y [N] target class indices, ref_emb [N, D] the paired real images. Whole-batch
    tensor operations: ``bench/bench_cas.py`` times this against a per-image loop.
    """
    from craft.evaluate.metrics import per_image_cas
    from craft.losses import ccs_reward, sfs_reward, vdc_reward

    pred = logits.argmax(1)
    out: dict[str, Any] = {
        "vdc": vdc_reward(emb, text_emb).numpy().astype(np.float64),
        "ccs": ccs_reward(emb, checklist_emb[y]).numpy().astype(np.float64),
        "dd": (pred == y).double().numpy(),
        "sfs": sfs_reward(emb, ref_emb).numpy().astype(np.float64),
    }
    out["cas"] = per_image_cas(out["vdc"], out["ccs"], out["dd"], out["sfs"])
    out["pred_index"] = pred
    return out


def _fit_probe_for(encoder, train_images: np.ndarray, train_labels: list[str], classes: list[str], batch: int):
    """A DD probe for an evaluator given without one (second evaluator): CRAFT A.2 on the real train split."""
    from craft.models.encoders import fit_linear_probe

    x = _tensor(train_images)
    with torch.no_grad():
        emb = torch.cat([encoder.encode_images(x[i : i + batch]).float().cpu() for i in range(0, len(x), batch)])
    return fit_linear_probe(emb, train_labels, classes, identity=encoder.identity)


def check_roles(evaluator, critic_identity: str | None, evaluator_dir, critic_dir=None) -> None:
    """Refuse the training critic as evaluator: by weights hash, and by location when a critic dir is known."""
    if critic_identity and evaluator.identity == critic_identity:
        raise ValueError(
            f"evaluator {evaluator_dir} has the same weights as the training critic (identity "
            f"{critic_identity[:16]}); metrics must come from a separate evaluator (CRAFT sec. 4.1.4, Table 11)"
        )
    if critic_dir and Path(str(critic_dir)).resolve() == Path(str(evaluator_dir)).resolve():
        raise ValueError(f"evaluator {evaluator_dir} is the critic directory; use a separate evaluator (CRAFT 4.1.4)")


# ----------------------------------------------------------------------------------------------
# main


def _device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def _finite(x: Any) -> Any:
    """JSON-safe: NaN / inf -> None, numpy scalars -> Python, recursively."""
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def is_demo(meta) -> bool:
    """Demo datasets have a ground-truth generator, hence an oracle: modality histo/cxr and name demo*."""
    return meta.modality in DEMO_MODALITIES and str(meta.name).startswith("demo")


def demo_oracle(dataset_dir, meta, oc: OracleSettings):
    """The calibrated ground-truth oracle for a demo dataset's images (trained once into ``_oracle_cache``).

    Rendered, trained and calibrated at ``oracle.render_resolution`` of the images' size (64 px at least: its
    calibration rows are in 64 px units) and calibrated also on renders at the size it reads."""
    from craft.evaluate import oracle as O

    res = _size(meta)
    if res[0] != res[1]:
        raise ValueError(f"{dataset_dir}: the oracle needs square demo images, got {res}")
    return O.train_oracle(meta.modality, oc.n, oc.seed, _oracle_cache(oc), resolution=O.render_resolution(res[0]),
                          epochs=oc.epochs, n_check=oc.n_check, min_accuracy=oc.min_accuracy,
                          thresholds=oc.calibration, read_resolution=res[0])  # fmt: skip


def _oracle_cache(cfg: OracleSettings) -> Path:
    """``oracle.cache_dir``, else ``<model cache>/oracle`` (a pod's volume or a local run's folder), else ~/.cache."""
    from craft.data.loader import model_cache_dir

    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    root = model_cache_dir()
    return root / "oracle" if root is not None else Path.home() / ".cache" / "craft" / "oracle"


def _work_dir(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".work")


def _cached_samples(work: Path, name: str, key: dict, make) -> np.ndarray:
    """Generated images of one variant, kept in ``work`` under a hash of everything that determines them."""
    h = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = work / f"{name}-{h}.npy"
    if path.is_file():
        return np.load(path)
    arr = make()
    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write_bytes(path, buf.getvalue())
    return arr


def gate_block(name: str, v: dict[str, Any]) -> dict[str, Any]:
    """The gate keys (craft.promote) of one variant's block."""
    return {"name": name, "cas": v["cas"], "low_alignment_rate": v["low_alignment_rate"],
            "oracle_accuracy": v.get("oracle_accuracy"),
            "near_duplicates": v["memorization"]["any_duplicates"] if "memorization" in v else None,
            "downstream_accuracy": v["downstream"]["accuracy"] if "downstream" in v else None}  # fmt: skip


def main(
    cfg: EvaluateConfig,
    dataset_dir,
    annotations_dir,
    variants: dict[str, Any],
    evaluator_dir,
    evaluator_probe_dir,
    out_dir,
    critic_identity: str | None = None,
    second_evaluator_dir=None,
    *,
    second_evaluator_probe_dir=None,
    critic_dir=None,
    critic_probe_dir=None,
    critic_weights: dict[str, float] | None = None,
    audit_judge=None,
    champion_version: str | None = None,
    gates=None,
) -> dict[str, Any]:
    """Evaluate ``variants`` ({name: "real" | model dir | VariantSpec | {"model", "adapter"}}); returns metrics.json's dict.

    ``critic_identity``: the training critic's weights hash (``DualEncoder.identity``); an evaluator
    with the same hash is refused. ``audit_judge(image, target, checklist) -> {attribute: passed}``
    (an MLLM judge, CRAFT 4.2.7) adds the checklist audit pass rate per variant; without one the audit
    is reported as skipped. ``critic_dir`` + ``critic_probe_dir`` add, per variant, the TRAINING
    reward (the critic's weighted VDC + CCS + DD log-likelihood + SFS, ``critic_weights``) on the same
    held-out images: what reward finetuning optimised, reported beside (never instead of) the
    evaluator's numbers. Writes metrics.json, per_image.parquet and report.html to ``out_dir``.
    """
    from craft.evaluate import metrics as M
    from craft.models.encoders import load_encoder, load_probe

    cfg.validate()
    t0 = time.time()
    torch.set_num_threads(max(1, cfg.threads))
    dev = _device(cfg.device)
    out_dir = Path(out_dir)
    if not variants:
        raise ValueError("variants: give at least one model variant")
    specs = {str(n): _as_spec(str(n), s) for n, s in variants.items()}
    if specs.get(REAL, REAL) != REAL:
        raise ValueError(f"variant name {REAL!r} is reserved for the held-out images themselves")
    specs.setdefault(REAL, REAL)  # the real images always anchor the tail threshold and the Real row
    gen_names = [n for n, s in specs.items() if s != REAL]
    if cfg.candidate and cfg.candidate not in specs:
        raise ValueError(f"candidate {cfg.candidate!r} is not among the variants ({', '.join(specs)}); "
                         "set evaluate.candidate")  # fmt: skip

    # -- evaluator (never the critic) ------------------------------------------------------
    evaluator = load_encoder(evaluator_dir, device=str(dev))
    check_roles(evaluator, critic_identity, evaluator_dir, critic_dir)
    probe = load_probe(evaluator_probe_dir, evaluator)
    meta, test_all, checklists = held_out_table(dataset_dir, annotations_dir, cfg.split)
    classes = list(meta.classes)
    if list(probe.classes) != classes:
        raise ValueError(f"{evaluator_probe_dir}: probe classes {probe.classes} differ from dataset.yaml {classes}")
    scorer = Scorer(evaluator, probe, checklists, cfg.checklist_mode, cfg.embed_batch)
    scorer2 = None
    if second_evaluator_dir:
        ev2 = load_encoder(second_evaluator_dir, device=str(dev))
        check_roles(ev2, critic_identity, second_evaluator_dir, critic_dir)
        if ev2.identity == evaluator.identity:
            raise ValueError(f"second evaluator {second_evaluator_dir} is the same model as the evaluator")

    from craft.data.manifest import read_manifest

    manifest = read_manifest(dataset_dir)
    train_rows = manifest[manifest["split"] == "train"].reset_index(drop=True)
    if train_rows.empty:
        raise ValueError(f"{dataset_dir}: no train split (memorization and downstream need it)")
    train_imgs = read_images(dataset_dir, train_rows, meta)
    test_imgs_all = read_images(dataset_dir, test_all, meta)
    if second_evaluator_dir:
        probe2 = (load_probe(second_evaluator_probe_dir, ev2) if second_evaluator_probe_dir else
                  _fit_probe_for(ev2, train_imgs, train_rows["label"].astype(str).tolist(), classes, cfg.embed_batch))  # fmt: skip
        scorer2 = Scorer(ev2, probe2, checklists, cfg.checklist_mode, cfg.embed_batch)

    # -- the protocol: held-out prompts, fixed seeds ---------------------------------------
    cases = stratified_cap(test_all, cfg.max_prompts, cfg.seed)
    pos = {iid: i for i, iid in enumerate(test_all["image_id"])}
    real_imgs = test_imgs_all[[pos[i] for i in cases["image_id"]]]
    labels = cases["label"].astype(str).tolist()
    prompts = cases["enriched_prompt"].astype(str).tolist()
    ids = cases["image_id"].astype(str).tolist()
    S = cfg.samples_per_prompt
    gen_ids = [i for i in ids for _ in range(S)]
    gen_k = [k for _ in ids for k in range(S)]
    gen_labels = [lbl for lbl in labels for _ in range(S)]
    gen_prompts = [p for p in prompts for _ in range(S)]
    gen_seeds = [sample_seed(cfg.seed, i, k) for i, k in zip(gen_ids, gen_k)]
    real_emb = scorer.embed(real_imgs)
    real_emb2 = scorer2.embed(real_imgs) if scorer2 else None

    # downstream synthetic set: TRAINING prompts (no held-out text reaches a classifier's training data)
    ds_cases = None
    if cfg.downstream.enabled and gen_names:
        ann = pd.read_parquet(Path(annotations_dir) / "annotations.parquet")
        ok = ann[(ann["status"] == "ok") & ann["enriched_prompt"].notna()][["image_id", "enriched_prompt"]]
        tr = train_rows.merge(ok.drop_duplicates("image_id"), on="image_id", how="inner")
        if tr.empty:
            raise ValueError(f"{annotations_dir}: no training image has an ok enriched prompt (downstream set)")
        ds_cases = stratified_cap(tr, cfg.downstream.prompts, cfg.seed + 1)
        dp, dl = ds_cases["enriched_prompt"].astype(str).tolist(), ds_cases["label"].astype(str).tolist()
        dseeds = [sample_seed(cfg.seed + 1, i, 0) for i in ds_cases["image_id"].astype(str)]

    work = _work_dir(out_dir)
    images: dict[str, np.ndarray] = {REAL: real_imgs}
    ds_images: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    sample_cfg = {k: getattr(cfg, k) for k in ("steps", "guidance", "scheduler", "seed")}
    for name in gen_names:
        spec = specs[name]
        t1 = time.time()
        state: dict[str, Any] = {}

        def pipe_and_meta(spec=spec, state=state):
            if "pipe" not in state:
                state["pipe"], state["meta"] = load_variant_pipeline(spec, dev)
            return state["pipe"], state["meta"]

        def make(prompt_list, label_list, seeds, pm=pipe_and_meta):
            pipe, ameta = pm()
            ps = [variant_prompt(p, lbl, ameta) for p, lbl in zip(prompt_list, label_list)]
            return to_dataset_array(generate(pipe, ps, seeds, cfg), meta)

        key = {"spec": spec.key(), "prompts": gen_prompts, "seeds": gen_seeds, **sample_cfg}
        images[name] = _cached_samples(work, name, key, lambda m=make: m(gen_prompts, gen_labels, gen_seeds))
        if ds_cases is not None:
            dkey = {"spec": spec.key(), "prompts": dp, "seeds": dseeds, **sample_cfg}
            arr = _cached_samples(work, f"{name}-downstream", dkey, lambda m=make: m(dp, dl, dseeds))
            ds_images[name] = (arr, np.array([classes.index(x) for x in dl]))
        state.clear()
        log.info("evaluate: sampled %s in %.1f s", name, time.time() - t1)

    # -- per image: the four primitives and CAS -------------------------------------------
    rows, embs = [], {}
    for name in [REAL, *gen_names]:
        real = name == REAL
        emb = real_emb if real else scorer.embed(images[name])
        ref = real_emb if real else real_emb.repeat_interleave(S, 0)
        lab, pr = (labels, prompts) if real else (gen_labels, gen_prompts)
        sc = scorer.score(emb, lab, pr, ref)
        embs[name] = emb
        df = pd.DataFrame({
            "variant": name, "image_id": ids if real else gen_ids, "sample": 0 if real else gen_k,
            "label": lab, "prompt": pr, "seed": -1 if real else gen_seeds,
            **{k: sc[k] for k in ("vdc", "ccs", "dd", "sfs", "cas")}, "probe_pred": sc["pred"],
        })  # fmt: skip
        if scorer2 is not None:
            e2 = real_emb2 if real else scorer2.embed(images[name])
            sc2 = scorer2.score(e2, lab, pr, real_emb2 if real else real_emb2.repeat_interleave(S, 0))
            for k in ("vdc", "ccs", "dd", "sfs", "cas"):
                df[f"{k}_2"] = sc2[k]
        rows.append(df)
    per_image = pd.concat(rows, ignore_index=True)
    table = M.variant_table(per_image[["variant", "vdc", "ccs", "dd", "sfs", "cas"]], REAL, cfg.quantile)
    real_cas = per_image.loc[per_image["variant"] == REAL, "cas"].to_numpy()
    tau = M.low_alignment_threshold(real_cas, cfg.quantile)
    out_variants: dict[str, dict[str, Any]] = {}
    for r in table.to_dict("records"):
        v = r.pop("variant")
        out_variants[v] = {"n": int(r["n"]), **{k: r[k] for k in ("vdc", "ccs", "dd", "sfs", "cas")},
                           "low_alignment_rate": r["low_cas_rate"], "cas_p10": r["cas_p10"]}  # fmt: skip
    if scorer2 is not None:
        t2 = M.variant_table(per_image[["variant"]].assign(**{k: per_image[f"{k}_2"] for k in M.PRIMITIVES}),
                             REAL, cfg.quantile)  # fmt: skip
        for r in t2.to_dict("records"):
            out_variants[r["variant"]]["evaluator2"] = {"cas": r["cas"], "low_alignment_rate": r["low_cas_rate"],
                                                        **{k: r[k] for k in M.PRIMITIVES}}  # fmt: skip

    # -- the training objective on held-out prompts (the critic, not a metric) ----------------
    critic_block = None
    if critic_probe_dir:
        if not critic_dir:
            raise ValueError("critic_probe_dir needs critic_dir (the critic encoder it was trained on)")
        crit = critic_rewards(critic_dir, critic_probe_dir, checklists, cfg, dev, images, real_imgs,
                              labels, prompts, S, critic_weights)  # fmt: skip
        for v, d in crit.items():
            out_variants[v]["critic_reward"] = d
        critic_block = {"source": str(critic_dir), "weights": crit[REAL]["weights"]}

    # -- fidelity in the evaluator's embedding --------------------------------------------
    notes: list[str] = []
    for name in [REAL, *gen_names]:
        e = embs[name].double().numpy()
        d = per_image[per_image["variant"] == name]
        fid: dict[str, Any] = {}
        if name != REAL:
            fid["fid"] = M.fid_from_embeddings(real_emb.double().numpy(), e) if len(e) >= 2 else None
            fid["image_image"] = float(d["sfs"].mean())  # PLIP-I style (CRAFTS eq. 17)
            fid["image_text"] = float(d["vdc"].mean())  # PLIP-T style (eq. 18)
            fid["diversity"] = M.prompt_diversity(e, d["image_id"].to_numpy()) if S >= 2 else None
        n_cls = d["label"].nunique()
        fid["silhouette"] = M.silhouette(e, d["label"].to_numpy()) if 2 <= n_cls <= len(d) - 1 else None
        out_variants[name]["fidelity"] = fid
    if S < 2:
        notes.append("per-prompt diversity needs samples_per_prompt >= 2; not measured")
    notes.append("diversity: 1 - cosine between samples of one prompt in the evaluator embedding "
                 "(LPIPS substitute: no perceptual network weights offline)")  # fmt: skip

    # -- memorization (app. M) ----------------------------------------------------------------
    if cfg.memorization.enabled and gen_names:
        from craft.evaluate.memorization import memorization_per_image, memorization_summary

        how = cfg.memorization.embedding
        if how == "auto":
            how = "evaluator2" if scorer2 is not None else "pixels"
        if how == "evaluator2" and scorer2 is None:
            raise ValueError("memorization.embedding=evaluator2 needs a second evaluator")
        emb_fn = {"pixels": pixel_embedding, "evaluator": lambda a: scorer.embed(a).double().numpy(),
                  "evaluator2": lambda a: scorer2.embed(a).double().numpy()}[how]  # fmt: skip
        tr_e, te_e = emb_fn(train_imgs), emb_fn(test_imgs_all)
        mkw = dict(ssim_threshold=cfg.memorization.ssim_threshold, phash_threshold=cfg.memorization.phash_threshold,
                   ssim_top_k=cfg.memorization.ssim_top_k)  # fmt: skip
        mem_cols = []
        for name in gen_names:
            g = images[name]
            ge = emb_fn(g)
            # one search per variant: the summary is read off the per-image frame (the report used to search twice)
            pim = memorization_per_image(g, train_imgs, test_imgs_all, ge, tr_e, te_e, **mkw)
            rep = memorization_summary(pim)
            rep["embedding"] = how
            out_variants[name]["memorization"] = rep
            pim.index = per_image.index[per_image["variant"] == name]
            mem_cols.append(pim[["max_ssim_train", "min_phash_train", "ssim_duplicate", "phash_duplicate",
                                 "d_train", "d_test", "nn_gap"]])  # fmt: skip
        per_image = per_image.join(pd.concat(mem_cols))

    # -- downstream utility (4.2.5) --------------------------------------------------------------
    downstream = None
    if ds_images:
        from craft.evaluate.downstream import downstream_utility

        ds = cfg.downstream
        ytr = np.array([classes.index(x) for x in train_rows["label"].astype(str)])
        yte = np.array([classes.index(x) for x in test_all["label"].astype(str)])
        dtab = downstream_utility((train_imgs, ytr), (test_imgs_all, yte), ds_images, len(classes),
                                  scales=ds.scales, synth_fraction=ds.synth_fraction, seed=cfg.seed,
                                  **ds.classifier_kwargs())  # fmt: skip
        downstream = dtab.to_dict("records")
        full = dtab[dtab["scale"] == max(ds.scales)]
        base_acc = float(full.loc[full["variant"] == "real_only", "accuracy"].iloc[0])
        for name in gen_names:
            f = full[full["variant"] == name].iloc[0]
            out_variants[name]["downstream"] = {"accuracy": float(f["accuracy"]), "macro_f1": float(f["macro_f1"]),
                                                "real_only_accuracy": base_acc,
                                                "gain": float(f["accuracy"]) - base_acc}  # fmt: skip

    # -- ground-truth oracle (demo modalities) --------------------------------------------
    oracle_block, scored_oracle = None, None
    if cfg.oracle.enabled and is_demo(meta):
        from craft.evaluate import oracle as O

        oc = cfg.oracle
        oracle = demo_oracle(dataset_dir, meta, oc)
        if list(oracle.classes) != classes:
            raise ValueError(f"oracle classes {list(oracle.classes)} differ from dataset.yaml {classes}")
        rows = O.calibration_table(oracle)
        calib = {"rows": rows, "readers": oracle.meta["readers"], "chance": 1 / len(classes),
                 "thresholds": asdict(oc.calibration), "passed": all(r["passed"] is not False for r in rows)}  # fmt: skip
        about = {k: v for k, v in oracle.meta.items() if k not in ("calibration", "readers", "reference")}
        try:  # an oracle that fails its calibration refuses to score: its table and the reason go to the report
            oracle.require_calibrated()
        except O.OracleCalibrationError as e:
            log.error("%s", e)
            notes.append(f"ground-truth oracle REFUSED to score (no oracle numbers in this report): {e}")
            oracle_block = {"status": "refused", "error": str(e), "meta": about, "calibration": calib}
        else:
            correct = np.zeros(len(per_image))
            readings = np.zeros((len(per_image), len(oracle.meta["findings"])))
            for name in [REAL, *gen_names]:
                m = (per_image["variant"] == name).to_numpy()
                lab = per_image.loc[m, "label"].tolist()
                c = oracle.correct(images[name], lab)
                correct[m] = c
                readings[m] = oracle.read_findings(images[name])
                out_variants[name]["oracle_accuracy"] = float(c.mean())
                out_variants[name]["oracle_findings"] = O.attribute_fidelity(oracle, images[name], lab)
            per_image["oracle_correct"] = correct
            for k, nm in enumerate(oracle.meta["findings"]):
                per_image[f"oracle_{nm}"] = readings[:, k]
            g = per_image["variant"] != REAL
            corr = O.cas_oracle_rank_correlation(per_image.loc[g, "cas"].to_numpy(), correct[g.to_numpy()])
            oracle_block = {"status": "scored", "meta": about, "calibration": calib, "cas_vs_oracle": corr}
            scored_oracle = oracle
    else:
        notes.append("no ground-truth oracle: " + ("disabled" if not cfg.oracle.enabled else
                     f"{meta.name} ({meta.modality}) is not a demo dataset"))  # fmt: skip

    # -- over-optimisation curves (issue 21): the evaluator and the oracle at every monitored snapshot -----
    curves: dict[str, list[dict[str, Any]]] = {}
    curves_meta: dict[str, dict[str, Any]] = {}
    if cfg.curves.enabled:
        from craft.evaluate import curves as C

        logs = C.monitored(specs)
        sub = C.curve_cases(cases, cfg.curves.prompts, cfg.seed) if logs else None
        at = {iid: i for i, iid in enumerate(ids)}
        for name, readings in logs.items():
            sub_emb = real_emb[[at[i] for i in sub["image_id"].astype(str)]]
            curves[name], more = C.trace(name, specs[name], readings, cases=sub, real_emb=sub_emb, scorer=scorer,
                                         oracle=scored_oracle, settings=cfg.curves, cfg=cfg, meta=meta, dev=dev,
                                         work=work, tau=tau)  # fmt: skip
            notes += more
            oracle_state = (oracle_block or {}).get("status") or ("disabled" if not cfg.oracle.enabled else "none")
            curves_meta[name] = {"adapter": specs[name].adapter, **C.selection(specs[name].adapter),
                                 "prompts": len(sub), "samples_per_prompt": cfg.curves.samples_per_prompt,
                                 "oracle": oracle_state}  # fmt: skip

    # -- preferences: the evaluator's CAS as judge, Bradley-Terry ----------------------------------
    prefs = None
    if cfg.preferences.enabled and len(gen_names) >= 2:
        prefs = preference_block(per_image[per_image["variant"] != REAL], cfg.preferences, cfg.seed)
    if audit_judge is not None:
        from craft.evaluate.preferences import checklist_audit

        lab_of = {v: per_image.loc[per_image["variant"] == v, "label"].tolist() for v in images}
        items = [(v, images[v][i], lab_of[v][i]) for v in images for i in range(len(images[v]))]
        audit = {"status": "done", "judge": getattr(audit_judge, "__name__", type(audit_judge).__name__),
                 "variants": {r["variant"]: {k: r[k] for k in ("n_images", "pass_rate", "all_pass_rate")}
                              for r in checklist_audit(items, checklists, audit_judge).to_dict("records")}}  # fmt: skip
        for v, d in audit["variants"].items():
            out_variants[v]["checklist_pass_rate"] = d["pass_rate"]
    else:
        audit = {"status": "skipped", "note": "no MLLM judge backend configured: checklist audit pass rate not "
                 "measured (CRAFT 4.2.7 uses an external medical MLLM)"}  # fmt: skip

    # -- the probe's confusion matrix on real held-out images -----------------------------------
    from sklearn.metrics import confusion_matrix

    rm = per_image[per_image["variant"] == REAL]
    confusion = {"categories": classes,
                 "matrix": confusion_matrix(rm["label"], rm["probe_pred"], labels=classes).tolist()}  # fmt: skip

    # -- metrics.json ---------------------------------------------------------------------------
    label_dist = {c: {"train": int((train_rows["label"] == c).sum()), "test": int((test_all["label"] == c).sum()),
                      "prompts": int((cases["label"] == c).sum()), "synthetic": int(gen_labels.count(c))}
                  for c in classes}  # fmt: skip
    metrics: dict[str, Any] = {
        "variants": out_variants,
        "real_p25" if cfg.quantile == 0.25 else f"real_q{cfg.quantile:g}": tau,
        "protocol": {"split": cfg.split, "n_prompts": len(cases), "samples_per_prompt": S, "steps": cfg.steps,
                     "guidance": cfg.guidance, "scheduler": cfg.scheduler, "seed": cfg.seed,
                     "quantile": cfg.quantile},
        "label_distribution": label_dist,
        "evaluator": {"source": str(evaluator_dir), "identity": evaluator.identity},
        "evaluator2": {"source": str(second_evaluator_dir), "identity": scorer2.encoder.identity} if scorer2 else None,
        "critic_identity": critic_identity,
        "critic_reward": critic_block,
        "oracle": oracle_block,
        "downstream": downstream,
        "preferences": prefs,
        "curves": curves,
        "curves_meta": curves_meta,
        "checklist_audit": audit,
        "probe_confusion": confusion,
        "implementations": M.implementations(),  # which library (and version) computed each metric (issue 22)
        "notes": notes,
    }  # fmt: skip
    cand = None
    if cfg.candidate:
        cand = gate_block(cfg.candidate, out_variants[cfg.candidate])
        metrics.update({k: cand[k] for k in GATE_KEYS})  # the candidate's gate keys, flat at the top level
    metrics["candidate"] = cand
    # champion vs challenger (craft.promote): the production model, scored here with the same evaluator,
    # prompts, seeds and split as the candidate; and the untuned base the gates' vs_zero_shot compares with
    metrics["champion"] = None
    if CHAMPION in out_variants:
        metrics["champion"] = {**gate_block(CHAMPION, out_variants[CHAMPION]), "version": champion_version}
    metrics["zero_shot"] = gate_block(ZERO_SHOT, out_variants[ZERO_SHOT]) if ZERO_SHOT in out_variants else None
    if gates is not None and cand is not None:  # the verdict report.html opens with (craft.promote.decide)
        from craft.promote import decide, gate_view

        d = decide(gate_view(metrics), gates)
        metrics["gate_verdict"] = {"passed": d.passed, "failures": d.failure_text(), "results": d.to_dict()["results"]}
    metrics["seconds"] = time.time() - t0
    metrics = _finite(metrics)

    from craft.evaluate.report import write_metrics, write_per_image

    out_dir.mkdir(parents=True, exist_ok=True)
    write_per_image(out_dir, per_image)
    write_report(out_dir, metrics, per_image, images, embs, classes, cfg.grid_per_class)
    write_metrics(out_dir, metrics)  # last: its presence marks a complete evaluation
    log.info("evaluate: %d variants, %d prompts in %.1f s", len(specs), len(cases), metrics["seconds"])
    return metrics


@torch.no_grad()
def critic_rewards(critic_dir, critic_probe_dir, checklists: dict, cfg: EvaluateConfig, dev: torch.device,
                   images: dict[str, np.ndarray], real_imgs: np.ndarray, labels: list[str], prompts: list[str],
                   samples_per_prompt: int, weights: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Per variant, the mean of each critic reward and of their weighted sum (CRAFT eqs. 1-6, DD as log p).

    The same module the DRaFT step differentiates (``ClinicalAlignmentModule``, ``dd="loglik"``) scores
    the evaluation's images: generated image k of case i against case i's enriched prompt, class
    checklist and real held-out image (SFS reference); the real images against themselves.
    """
    from craft.losses import DEFAULT_REWARD_WEIGHTS, clinical_reward
    from craft.models.encoders import ClinicalAlignmentModule, load_encoder, load_probe

    w = dict(DEFAULT_REWARD_WEIGHTS if weights is None else weights)
    critic = load_encoder(critic_dir, device=str(dev)).eval().requires_grad_(False)
    cam = ClinicalAlignmentModule(critic, load_probe(critic_probe_dir, critic), checklists, cfg.checklist_mode,
                                  dd="loglik")  # fmt: skip
    real_emb = torch.cat([cam.reference_embeddings(_tensor(real_imgs[i : i + cfg.embed_batch]).to(dev))
                          for i in range(0, len(real_imgs), cfg.embed_batch)])  # fmt: skip
    out: dict[str, dict[str, Any]] = {}
    for name, arr in images.items():
        rep = 1 if name == REAL else samples_per_prompt
        lab = [x for x in labels for _ in range(rep)]
        pr = [x for x in prompts for _ in range(rep)]
        ref = real_emb.repeat_interleave(rep, 0)
        parts: dict[str, list[torch.Tensor]] = {}
        for i in range(0, len(arr), cfg.embed_batch):
            sl = slice(i, i + cfg.embed_batch)
            comp = cam(_tensor(arr[sl]).to(dev), lab[sl], pr[sl], reference_emb=ref[sl])
            comp = {k: v for k, v in comp.items() if k in w}
            comp["total"] = clinical_reward(comp, w)
            for k, v in comp.items():
                parts.setdefault(k, []).append(v.float().cpu())
        out[name] = {k: float(torch.cat(v).mean()) for k, v in parts.items()}
        out[name]["weights"] = w
    return out


def preference_block(gen: pd.DataFrame, cfg: PreferenceSettings, seed: int) -> dict[str, Any]:
    """Per case (held-out image, sample index) the variants ranked by evaluator CAS -> Bradley-Terry with CIs."""
    from craft.evaluate.preferences import bradley_terry_bootstrap, rankings_from_scores

    order = list(dict.fromkeys(gen["variant"]))
    wide = gen.pivot_table(index=["image_id", "sample"], columns="variant", values="cas")[order]
    block = bradley_terry_bootstrap(rankings_from_scores(wide), order, n_boot=cfg.bootstrap, ci=cfg.ci, seed=seed)
    block["judge"] = "evaluator CAS (per case, higher ranks first)"
    return block


# ----------------------------------------------------------------------------------------------
# report


def _frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows).replace({None: np.nan})


def write_report(out_dir: Path, metrics: dict, per_image: pd.DataFrame, images: dict[str, np.ndarray],
                 embs: dict[str, torch.Tensor], classes: list[str], per_class: int) -> Path:  # fmt: skip
    """report.html: Table 1 / Table 14 shapes, fidelity, memorization, utility, oracle, preferences, figures."""
    from craft.evaluate import report as R

    V = metrics["variants"]
    tau = metrics.get("real_p25", next((v for k, v in metrics.items() if k.startswith("real_q")), None))
    t1 = _frame([{"method": v, "n": d["n"], "VDC": d["vdc"], "CCS": d["ccs"], "DD": d["dd"], "SFS": d["sfs"],
                  "CAS": d["cas"], **({"CAS (evaluator 2)": d["evaluator2"]["cas"]} if "evaluator2" in d else {})}
                 for v, d in V.items()])  # fmt: skip
    t14 = _frame([{"method": v, "real P25": tau, "n": d["n"], "mean CAS": d["cas"],
                   "low-CAS rate": d["low_alignment_rate"], "10th pct CAS": d["cas_p10"]}
                  for v, d in V.items() if v != REAL])  # fmt: skip
    fid = _frame([{"method": v, "FID (evaluator emb.)": d["fidelity"].get("fid"),
                   "image-image cos": d["fidelity"].get("image_image"), "image-text cos": d["fidelity"].get("image_text"),
                   "silhouette": d["fidelity"].get("silhouette"), "diversity": d["fidelity"].get("diversity")}
                  for v, d in V.items()])  # fmt: skip
    tables: dict[str, Any] = {}
    verdict = metrics.get("gate_verdict")
    if verdict:  # first: the decision and the champion-vs-challenger numbers it rests on
        champ = (metrics.get("champion") or {}).get("version") or "none in production"
        word = (
            "PASSED: the run registers it as a candidate" if verdict["passed"] else f"REFUSED: {verdict['failures']}"
        )
        tables[f"Verdict of the gates: {word} (champion: {champ})"] = _frame(
            [{"gate": r["name"], "result": "skip" if r["skipped"] else "PASS" if r["passed"] else "FAIL",
              "candidate": r["candidate"], "champion": r["production"],
              "zero-shot": (metrics.get("zero_shot") or {}).get(r["name"]), "threshold": r["threshold"],
              "note": r["message"]} for r in verdict["results"]]
        )  # fmt: skip
    tables |= {
        "Clinical alignment under the evaluator (CRAFT Table 1 shape)": t1,
        "Low-alignment tail (CRAFT Table 14 shape; rate = share strictly below the real P25)": t14,
        "Fidelity in the evaluator's embedding (CRAFTS eqs. 16-21)": fid,
    }
    mem = [{"method": v, **{k: d["memorization"][k] for k in ("ssim_duplicates", "phash_duplicates", "any_duplicates",
            "max_ssim", "min_phash_distance", "d_train", "d_test", "gap", "embedding")}}
           for v, d in V.items() if "memorization" in d]  # fmt: skip
    if mem:
        tables["Memorization against the training split (CRAFT Tables 17-18)"] = _frame(mem)
    if metrics.get("critic_reward"):
        tables["Training reward on held-out prompts: the CRITIC (what reward finetuning optimised; not a metric)"] = (
            _frame(
                [
                    {"method": v, **{k: x for k, x in d["critic_reward"].items() if k != "weights"}}
                    for v, d in V.items()
                    if "critic_reward" in d
                ]
            )  # fmt: skip
        )
    if metrics.get("downstream"):
        tables["Downstream utility: real vs real + 20% synthetic per batch (CRAFT 4.2.5)"] = _frame(
            metrics["downstream"]
        )
    if metrics.get("oracle"):
        o = metrics["oracle"]
        if o["status"] == "scored":
            rows = [{"method": v, "oracle accuracy": d.get("oracle_accuracy")} for v, d in V.items()]
            tables["Ground-truth oracle (independent reader)"] = _frame(rows)
            c = o["cas_vs_oracle"]
            tables["Does CAS track ground truth? (generated images)"] = _frame(
                [{"Spearman rho": c["spearman"], "p": c["spearman_p"], "point-biserial r": c["pointbiserial"],
                  "n": c["n"], "oracle held-out accuracy": o["meta"].get("check_accuracy")}])  # fmt: skip
        tables |= R.oracle_calibration_tables(o, V)
    curve_figs = {}
    for v, rows in (metrics.get("curves") or {}).items():  # issue 21: the over-optimisation curve per adapter
        info = (metrics.get("curves_meta") or {}).get(v, {})
        sel = info.get("selected_step")
        how = f"(select={info['select']})" if info.get("select") else ""
        about = (f"{v}: {info.get('prompts')} held-out test prompts x {info.get('samples_per_prompt')} per snapshot, "
                 f"oracle {info.get('oracle')}")  # fmt: skip
        tables[f"Over-optimisation curve, {about}"] = R.overoptimisation_table(rows, sel)
        curve_figs[f"Over-optimisation curve: {v} (change since step 0; top: training side, bottom: evaluator and "
                   f"oracle; dashed: selected step {sel} {how})"] = R.overoptimisation_png(rows, sel, how)  # fmt: skip
    if metrics.get("preferences"):
        p = metrics["preferences"]
        tables[f"Preferences: Bradley-Terry over {p['n_cases']} cases, judge = {p['judge']}"] = _frame(
            [{"method": v, **d} for v, d in p["variants"].items()]
        )
    if metrics["checklist_audit"]["status"] == "done":
        tables[f"Checklist audit by {metrics['checklist_audit']['judge']} (CRAFT 4.2.7)"] = _frame(
            [{"method": v, **d} for v, d in metrics["checklist_audit"]["variants"].items()]
        )
    tables["Label distribution (CRAFT app. N)"] = _frame(
        [{"class": c, **d} for c, d in metrics["label_distribution"].items()]
    )
    cm = metrics["probe_confusion"]
    tables["Evaluator probe on real held-out images (rows: true, columns: predicted)"] = R.confusion_table_html(
        np.asarray(cm["matrix"]), cm["categories"]
    )
    figures = dict(curve_figs)
    cas = {v: per_image.loc[per_image["variant"] == v, "cas"].to_numpy() for v in V}
    if tau is not None:
        figures["Per-image CAS, cumulative distribution (dashed: real P25)"] = R.tail_cdf_png(cas, tau)
    names = list(embs)
    emb = torch.cat([embs[v] for v in names]).double().numpy()
    lab = np.concatenate([per_image.loc[per_image["variant"] == v, "label"].to_numpy() for v in names])
    real = np.concatenate([np.full(len(embs[v]), v == REAL) for v in names])
    figures["Evaluator embedding, PCA (hollow: real held-out images)"] = R.embedding_map_png(emb, lab, markers=real)
    grids = {}
    for v, arr in images.items():
        lbl = per_image.loc[per_image["variant"] == v, "label"].to_numpy()
        by_class = {c: [arr[i] for i in np.flatnonzero(lbl == c)[:per_class]] for c in classes}
        grids[f"Images per class: {v}"] = R.image_grid_png(by_class, per_class=per_class, scale=2)
    notes = [f"candidate: {metrics['candidate']['name']}" if metrics.get("candidate") else "no candidate variant",
             f"evaluator: {metrics['evaluator']['source']} (identity {metrics['evaluator']['identity'][:12]}), "
             "never the training critic", *metrics["notes"],
             f"checklist audit: {metrics['checklist_audit'].get('note', 'done')}"]  # fmt: skip
    return R.build_report(out_dir, tables, figures, grids, notes, implementations=metrics.get("implementations"))


# ----------------------------------------------------------------------------------------------
# pipeline step


def evaluate_step(dataset_dir, annotations_dir, evaluator_dir, evaluator_probe_dir, critic_dir,
                  variant_dirs: dict[str, str | None], out_dir, profile: str, overrides: list[str],
                  report_file: str | None = None, base_variant: str = "zero_shot",
                  critic_probe_dir=None, champion_version: str | None = None) -> tuple[dict, dict]:  # fmt: skip
    """Pipeline step: profile + overrides -> ``main`` over the given variant dirs; returns (metrics, confusion).

    A variant dir holding ``model_index.json`` is a full pipeline; one holding ``adapter.json`` is an adapter
    on the ``base_variant`` model. Missing (None) variants are left out; ``real`` is always evaluated.
    With ``critic_probe_dir`` the critic's training reward is reported per variant too.
    """
    import shutil

    from craft.config import load_stage_config
    from craft.models.encoders import load_encoder

    cfg = load_stage_config("evaluate", profile, overrides)
    base = variant_dirs.get(base_variant)
    specs: dict[str, Any] = {REAL: REAL}
    for name, d in variant_dirs.items():
        if not d:
            continue
        p = Path(d)
        if (p / "model_index.json").is_file():
            specs[name] = VariantSpec(str(p))
        elif (p / "adapter.json").is_file():
            if not base:
                raise ValueError(f"variant {name}: {p} is an adapter but no {base_variant} base model was given")
            specs[name] = VariantSpec(str(base), str(p))
        else:
            raise FileNotFoundError(f"variant {name}: {p} holds neither model_index.json nor adapter.json")
    critic_identity = load_encoder(critic_dir).identity if critic_dir else None
    metrics = main(cfg, dataset_dir, annotations_dir, specs, evaluator_dir, evaluator_probe_dir, out_dir,
                   critic_identity=critic_identity, critic_dir=critic_dir, critic_probe_dir=critic_probe_dir,
                   champion_version=champion_version, gates=load_stage_config("gates", profile, []))  # fmt: skip
    if report_file:
        Path(report_file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(out_dir) / "report.html", report_file)
    return metrics, metrics["probe_confusion"]


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Scalar metrics for the KFP Metrics artifact: the gate keys and each variant's main numbers."""
    out = {k: float(metrics[k]) for k in GATE_KEYS if isinstance(metrics.get(k), int | float)}
    for v, d in metrics["variants"].items():
        for k in ("cas", "vdc", "ccs", "dd", "sfs", "low_alignment_rate", "cas_p10", "oracle_accuracy"):
            if isinstance(d.get(k), int | float):
                out[f"{v}_{k}"] = float(d[k])
    return out
