"""CRAFTS two-stage foundation training (seed 004, Methods): stage 1 ``pretrain``, stage 2 ``finetune``.

- Stage 1 (pretrain): denoising on weakly paired image-caption data (the manifest's ``caption``)
  plus the semantic consistency loss L_corr (eqs. 8-10).
- Stage 2 (finetune): clean labelled captions ``"<class phrase>, <caption details>"`` plus
  L_corr and the category guidance loss L_cate (eqs. 11-13), with mu, sigma of eq. 12 computed
  once over the whole fine-tuning set before training.

Both are latent diffusion (eqs. 1-6): a frozen first-stage AutoencoderKL maps images to latents,
a UNet with cross-attention at several resolutions (eq. 7) predicts the noise (eq. 5), or v when the
base is a v-prediction model such as SD 2.1 768 px (Salimans & Ho 2022; ``training_target``). Without a base
checkpoint, stage 1 first trains the autoencoder on the training images (``autoencoder`` section;
the demo's documented choice: no pretrained VAE can be downloaded here).

Which latent the CRAFTS losses see: the model's own estimate of the clean latent,
x0_hat = (z_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t) for an epsilon model, sqrt(abar_t) z_t -
sqrt(1 - abar_t) v_hat for a v-prediction one (``craft.models.diffusion.predicted_x0``), flattened per sample. The paper asks for
"latent variables in the image generation process"; the data latent z0 has no trainable parameters
(its loss gradient would be zero), while x0_hat is a function of the UNet output, so the relational
constraint reaches the denoiser and shapes what it generates. Cosine similarity is scale-free, so
the 1/sqrt(abar_t) blow-up at high noise does not inflate these losses. The text features t are the
text encoder's pooled output for the caption, c the pooled output for the class-phrase prompt; both
are detached: they are the target structure, the image side is what these losses move.

The typicality s_k = cos(c_k, t_k) of eq. 11 is computed once per sample before training, with the
text encoder that also gives mu and sigma (eq. 12), and held fixed: the text encoder trains with the
UNet, and on demo-histo its s_k drifted from 0.99 +- 0.004 (where mu, sigma were measured) to
0.64 +- 0.30, so recomputing s_k each step put (s_i + s_j - mu) / sigma near -100 and every W_ij near
0: L_cate switched itself off (5e-8 at the end of stage 2).

Which samples of a batch enter them (``aux_min_abar``, our choice; the paper does not say): only those
drawn at a noise level with abar_t >= 0.5 (t below ~T/4 for the linear schedule). At higher noise
x0_hat is the model's guess of an average image, not "the latent of a generated image"; asking those
guesses to reproduce the text's relational structure (same-class caption cosines ~0.9, latents ~0.4)
pulled every sample of a class to one point: measured on demo-histo (bench/bench_crafts_losses.py,
weight 0.1, all noise levels, 480 stage-2 steps) oracle accuracy of the samples fell from 0.38 without
the losses to 0.25 (every sample read as one class); gated at 0.5 it is 0.39 (weight 0.1) and 0.37
(weight 0.03). At 1500 stage-2 steps (the demo profiles' setting then; same stage 1, seed 0, 100 class-phrase
samples, guidance 4) the samples are class-distinguishable either way: 0.69 off, 0.72 on (before the
fixed-typicality change below, so with L_cate mostly inactive); the per-seed comparison is in RESULTS.md.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import record_function

from craft.config import to_dict
from craft.data.loader import LatentColumn, cached_latents, encode_dtype, image_column
from craft.data.manifest import DatasetMeta, read_manifest, read_meta
from craft.losses import category_guidance_loss, semantic_consistency_loss, typicality_stats
from craft.models.diffusion import (
    Components,
    ModelConfig,
    add_noise,
    build_components,
    load_pipeline,
    model_resolution,
    predicted_x0,
    prediction_type,
    save_pipeline,
    training_target,
)
from craft.train.loop import LoopConfig, train

log = logging.getLogger(__name__)


@dataclass
class AutoencoderConfig:
    """First-stage AutoencoderKL trained on the training images when no base checkpoint is given."""

    steps: int = 400  # optimizer steps (0 = keep the random-init VAE: only for tests)
    batch_size: int = 32  # images per step
    lr: float = 2e-3  # AdamW learning rate
    kl_weight: float = 1e-6  # weight of the KL term (small: we want a near-deterministic code)
    # train on a random crop x crop patch of each image (0 = whole images). The autoencoder is convolutional: it
    # learns the same local code from patches at a fraction of the pixels, as first-stage models are trained on crops
    # smaller than the images they encode (LDM's autoencoders: 256 px crops). A multiple of the VAE's downsampling
    # factor, at most the resolution; the reconstruction metric is still read on whole images
    crop: int = 0


@dataclass
class CraftsConfig:
    """Settings shared by both CRAFTS stages; the stages differ in defaults only."""

    model: ModelConfig = field(default_factory=ModelConfig)  # architecture when no base checkpoint
    loop: LoopConfig = field(default_factory=LoopConfig)  # optimisation, checkpoints, EMA, precision
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)  # first stage (no base only)
    captions: Literal["weak", "class", "class+weak"] = "weak"  # text per image: manifest caption, class
    # phrase, or "<class phrase>, <caption>"
    class_prompt: str = "{phrase}"  # category text c_k of L_cate (eq. 11); {phrase} = class phrase
    corr_weight: float = 0.1  # weight of L_corr (eqs. 8-10); 0 switches it off
    cate_weight: float = 0.0  # weight of L_cate (eqs. 11-13); 0 switches it off
    # L_corr / L_cate only on samples whose noise level leaves abar_t >= this (0 = every sample; see module doc)
    aux_min_abar: float = 0.5
    train_text_encoder: bool = True  # train the text encoder with the UNet (tiny presets start random)
    cond_dropout: float = 0.1  # share of captions replaced by "" (classifier-free guidance training)
    split: str = "train"  # manifest split used for training
    sample_per_class: int = 4  # validation samples per class (0 = none)
    sample_steps: int = 20  # DDIM steps for validation samples
    sample_guidance: float = 4.0  # classifier-free guidance scale for validation samples

    def validate(self) -> None:
        if self.corr_weight < 0 or self.cate_weight < 0:
            raise ValueError("corr_weight and cate_weight must be >= 0")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if not 0.0 <= self.aux_min_abar < 1.0:
            raise ValueError(f"aux_min_abar must be in [0, 1), got {self.aux_min_abar}")
        if "{phrase}" not in self.class_prompt:
            raise ValueError(f"class_prompt must contain {{phrase}}, got {self.class_prompt!r}")
        if self.autoencoder.crop < 0:
            raise ValueError(f"autoencoder.crop must be >= 0 (0 = whole images), got {self.autoencoder.crop}")


@dataclass
class PretrainConfig(CraftsConfig):
    """Stage 1 of CRAFTS: weak captions, L_corr on, L_cate off (no reliable labels in weak data)."""

    captions: Literal["weak", "class", "class+weak"] = "weak"  # stage 1 learns from weak captions
    cate_weight: float = 0.0  # L_cate belongs to stage 2 (the paper applies it during fine-tuning)


@dataclass
class FinetuneConfig(CraftsConfig):
    """Stage 2 of CRAFTS: clean labelled captions "<class phrase>, <caption>", L_corr + L_cate on."""

    captions: Literal["weak", "class", "class+weak"] = "class+weak"  # labelled captions
    cate_weight: float = 0.1  # L_cate (eqs. 11-13) on in stage 2


# ---------------------------------------------------------------- data


def caption_for(row: Any, meta: DatasetMeta, mode: str) -> str:
    """The training text of one manifest row for caption mode ``weak`` / ``class`` / ``class+weak``."""
    phrase = meta.phrase(str(row["label"]))
    cap = row["caption"]
    has_cap = cap is not None and not (isinstance(cap, float) and np.isnan(cap)) and str(cap).strip() != ""
    if mode == "class":
        return phrase
    if mode == "weak":
        if not has_cap:
            raise ValueError(f"manifest row image_id={row['image_id']}: no caption (stage 1 needs weak captions; "
                             f"set captions=class or class+weak to use labels)")  # fmt: skip
        return str(cap)
    return f"{phrase}, {cap}" if has_cap else phrase


def load_images(dataset_dir: str | os.PathLike, df, resolution: int) -> torch.Tensor:
    """Images of ``df`` as one float tensor [N, 3, R, R] in [-1, 1] (grey images repeated to RGB).

    Eager: for a handful of images (tests, the eager reference in bench/bench_memory.py). Training stages
    stream ``craft.data.loader.image_column`` and read cached latents instead.
    """
    return image_column(dataset_dir, df, resolution, "signed")[list(range(len(df)))]


def training_table(dataset_dir, cfg: CraftsConfig):
    meta = read_meta(dataset_dir)
    df = read_manifest(dataset_dir)
    df = df[df["split"] == cfg.split].reset_index(drop=True)
    if len(df) == 0:
        raise ValueError(f"{dataset_dir}/manifest.parquet: no rows with split={cfg.split!r}")
    unknown = sorted(set(df["label"]) - set(meta.classes))
    if unknown:
        raise ValueError(f"{dataset_dir}/manifest.parquet: label {unknown[0]!r} is not in dataset.yaml classes")
    return meta, df


# ---------------------------------------------------------------- models trained by the loop


class AutoencoderObjective(torch.nn.Module):
    """L1 reconstruction + small KL: the first-stage model of the latent diffusion backbone (CRAFTS eqs. 1-6)."""

    def __init__(self, vae, kl_weight: float, crop: int = 0):
        super().__init__()
        self.vae = vae
        self.kl_weight = kl_weight
        self.crop = crop  # a random crop x crop patch of each image (0 = the whole image)

    def forward(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        x = batch["pixels"]
        if 0 < self.crop < min(x.shape[-2:]):
            h, w = x.shape[-2] - self.crop + 1, x.shape[-1] - self.crop + 1
            rows = torch.randint(0, h, (len(x),), generator=generator).tolist()
            cols = torch.randint(0, w, (len(x),), generator=generator).tolist()
            x = torch.stack([im[:, r : r + self.crop, c : c + self.crop] for im, r, c in zip(x, rows, cols)])
        post = self.vae.encode(x).latent_dist
        eps = torch.randn(post.mean.shape, generator=generator).to(x.device, post.mean.dtype)
        z = post.mean + post.std * eps
        rec = self.vae.decode(z).sample
        l1 = (rec.float() - x.float()).abs().mean()
        kl = post.kl().mean() / z[0].numel()
        return {"loss": l1 + self.kl_weight * kl, "l1": l1.detach(), "kl": kl.detach()}

    def enable_gradient_checkpointing(self) -> None:
        self.vae.enable_gradient_checkpointing()


class DenoiserObjective(torch.nn.Module):
    """L_diff (eq. 5) + corr_weight * L_corr (eq. 10) + cate_weight * L_cate (eq. 13) on one batch."""

    def __init__(
        self, unet, text_encoder, tokenizer, scheduler, cfg: CraftsConfig, mu: float = 0.0, sigma: float = 1.0
    ):
        super().__init__()
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.mu, self.sigma = mu, sigma
        unet.set_attn_processor(AttnProcessor2_0())  # SDPA attention (torch scaled_dot_product_attention)
        unet.requires_grad_(True)
        text_encoder.requires_grad_(cfg.train_text_encoder)
        self.num_t = scheduler.config.num_train_timesteps
        self.kind = prediction_type(scheduler)  # what the UNet outputs: eps (eq. 5) or v (SD 2.1 768 px)
        # abar_t of eq. 3 for the scheduler's beta schedule (linear, eq. 2, for the tiny preset)
        self.register_buffer("abar", scheduler.alphas_cumprod.clone().float(), persistent=False)

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()
        if self.cfg.train_text_encoder:
            self.text_encoder.gradient_checkpointing_enable()

    def _ids(self, prompts: list[str], device) -> torch.Tensor:
        return self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)  # fmt: skip

    def _encode(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """(token states, pooled) of ``prompts``, each distinct prompt through the text encoder once.

        Rows of one prompt are the same function of the encoder weights, so gathering them from one pass gives
        the same values and, through the gather's backward, the same summed gradient as one pass per row.
        """
        te = self.text_encoder
        random = te.training and any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in te.modules())
        uniq = prompts if random else list(dict.fromkeys(prompts))  # dropout: every row needs its own draw
        out = te(self._ids(uniq, device))
        if len(uniq) == len(prompts):
            return out.last_hidden_state, out.pooler_output
        pos = {p: i for i, p in enumerate(uniq)}
        idx = torch.tensor([pos[p] for p in prompts], device=device)
        return out.last_hidden_state[idx], out.pooler_output[idx]

    def forward(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        z0 = batch["latents"]
        b, dev = z0.shape[0], z0.device
        captions = list(batch["caption"])
        keep = torch.rand(b, generator=generator) >= self.cfg.cond_dropout  # CFG: drop the condition
        prompts = [c if k else "" for c, k in zip(captions, keep.tolist())]
        with record_function("crafts/text"):
            states, pooled = self._encode(prompts, dev)
        noise = torch.randn(z0.shape, generator=generator).to(dev, z0.dtype)
        t = torch.randint(0, self.num_t, (b,), generator=generator).to(dev)
        abar = self.abar.to(dev)[t].view(b, 1, 1, 1)
        zt = add_noise(z0, noise, abar)  # eq. 3-4 (the paper's eq. 4 drops the sqrt; eq. 3 has it)
        with record_function("crafts/unet"):
            pred = self.unet(zt, t, encoder_hidden_states=states).sample
        # eq. 5; its target is the noise for an epsilon base, v for a v-prediction one (Salimans & Ho 2022)
        l_diff = F.mse_loss(pred.float(), training_target(self.kind, z0.float(), noise.float(), abar))
        res = {"l_diff": l_diff.detach()}
        loss = l_diff
        keep = keep.to(dev)
        keep = keep & (abar.view(b) >= self.cfg.aux_min_abar)  # low-noise samples only (module docstring)
        use_aux = (self.cfg.corr_weight > 0 or self.cfg.cate_weight > 0) and int(keep.sum()) >= 2
        if use_aux:
            # x0_hat: the model's clean-latent estimate, the z_i of eqs. 9-13 (module docstring: why this latent)
            x0_hat = predicted_x0(self.kind, zt.float(), pred.float(), abar)
            z = x0_hat.flatten(1)[keep]
            tfeat = pooled.detach().float()[keep]
            if self.cfg.corr_weight > 0:
                l_corr = semantic_consistency_loss(z, tfeat)
                loss = loss + self.cfg.corr_weight * l_corr
                res["l_corr"] = l_corr.detach()
            if self.cfg.cate_weight > 0:
                with torch.no_grad(), record_function("crafts/class_text"):
                    phrases = [p for p, k in zip(batch["class_prompt"], keep.tolist()) if k]
                    cfeat = self._encode(phrases, dev)[1].float()  # a handful of distinct class phrases
                s_k = batch["typicality"].to(dev)[keep] if "typicality" in batch else None
                l_cate = category_guidance_loss(z, tfeat, cfeat, self.mu, self.sigma, s=s_k)
                loss = loss + self.cfg.cate_weight * l_cate
                res["l_cate"] = l_cate.detach()
        res["loss"] = loss
        return res


# ---------------------------------------------------------------- stages


def _threads(cfg: CraftsConfig) -> None:
    if cfg.loop.threads > 0:
        torch.set_num_threads(cfg.loop.threads)


def stage_latents(vae, dataset_dir, df, resolution: int, loop: LoopConfig) -> LatentColumn:
    """Latents of the manifest rows ``df`` (in its order) through the frozen ``vae``, from the latent cache.

    The cache entry covers every row of the split(s) ``df`` comes from, so stages that train on different
    subsets of a split (all rows, rows with an enriched prompt) share one entry, encoded once.
    """
    full = read_manifest(dataset_dir)
    full = full[full["split"].isin(set(df["split"]))].reset_index(drop=True)
    dtype = encode_dtype(next(vae.parameters()).device, loop.encode_dtype)
    col = cached_latents(vae, dataset_dir, full, resolution, batch_size=loop.encode_batch, dtype=dtype)
    return col.select_ids([str(i) for i in df["image_id"]])


def train_autoencoder(vae, dataset_dir, df, resolution: int, cfg: CraftsConfig, work_dir: Path) -> dict[str, float]:
    """Train the first-stage VAE on the images of ``df`` (streamed from disk) with the shared loop; set its latent
    scaling factor from the trained VAE's latents, which go to the latent cache where the stage reads them next."""
    pixels = image_column(dataset_dir, df, resolution, "signed")
    ae = cfg.autoencoder
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if ae.crop and (ae.crop > resolution or ae.crop % factor):
        raise ValueError(f"autoencoder.crop={ae.crop}: must be a multiple of the VAE's downsampling factor {factor} "
                         f"and at most the resolution {resolution} (0 = whole images)")  # fmt: skip
    if ae.steps > 0:
        loop = LoopConfig(
            steps=ae.steps, batch_size=min(ae.batch_size, len(pixels)), lr=ae.lr, seed=cfg.loop.seed,
            checkpoint_every=cfg.loop.checkpoint_every, threads=cfg.loop.threads, progress=cfg.loop.progress,
            mixed_precision=cfg.loop.mixed_precision, upload_uri=cfg.loop.upload_uri and cfg.loop.upload_uri + "/ae",
            warmup_steps=min(20, ae.steps // 10), lr_schedule="cosine", data_workers=cfg.loop.data_workers,
        )  # fmt: skip
        vae.requires_grad_(True)
        res = train(
            AutoencoderObjective(vae, ae.kl_weight, ae.crop), {"pixels": pixels}, loop, work_dir / "autoencoder"
        )
        logs = {f"ae_{k}": v for k, v in res.logs.items() if k in ("l1", "kl")}
    else:
        logs = {}
    vae.requires_grad_(False)
    vae.eval()
    vae.register_to_config(scaling_factor=1.0)
    lat = stage_latents(vae, dataset_dir, df, resolution, cfg.loop)  # unscaled posterior means (factor 1)
    # Like SD's 0.18215: scale latents to unit variance so the noise schedule fits them.
    vae.register_to_config(scaling_factor=float(1.0 / max(lat.std(), 1e-6)))
    head = list(range(min(64, len(pixels))))
    with torch.no_grad():
        x = pixels[head]
        rec = vae.decode(lat[head].to(x.dtype)).sample
        logs["ae_recon_mse"] = float(F.mse_loss(rec, x) / 4.0)  # MSE in [0, 1] units
    return logs


def _components(cfg: CraftsConfig, meta: DatasetMeta, base: str | None) -> Components:
    if base:
        return Components.from_pipeline(load_pipeline(base))
    return build_components(cfg.model, [meta.phrase(c) for c in meta.classes], seed=cfg.loop.seed)


def _per_class_validation(comp: Components, meta: DatasetMeta, cfg: CraftsConfig):
    """Callback for the loop: a grid of samples per class prompt into WORK/samples/step-N/ and TensorBoard."""

    def run(model: DenoiserObjective, step: int, out: Path, writer) -> None:
        if cfg.sample_per_class <= 0:
            return
        from craft.sample import generate, save_grid

        pipe = Components(model.unet, comp.vae, model.text_encoder, comp.tokenizer, comp.scheduler).pipeline()
        folder = out / "samples" / f"step-{step:07d}"
        for label in meta.classes:
            prompt = cfg.class_prompt.format(phrase=meta.phrase(label))
            imgs = generate(pipe, [prompt] * cfg.sample_per_class, steps=cfg.sample_steps,
                            guidance=cfg.sample_guidance, seed=cfg.loop.seed)  # fmt: skip
            grid = save_grid(imgs, folder / f"{label}.png")
            if writer is not None:
                writer.add_image(f"samples/{label}", np.asarray(grid).transpose(2, 0, 1), step)

    return run


def run_stage(
    stage: str, cfg: CraftsConfig, dataset_dir, out_dir, base: str | None = None, work_dir=None
) -> dict[str, float]:
    """Train one CRAFTS stage on ``dataset_dir`` and write the pipeline to ``out_dir``; returns metrics."""
    import time

    t0 = time.time()
    _threads(cfg)
    out_dir = Path(out_dir)
    work = Path(work_dir) if work_dir else out_dir.with_name(out_dir.name + ".work")
    meta, df = training_table(dataset_dir, cfg)
    comp = _components(cfg, meta, base)
    res_px = model_resolution(comp.unet, comp.vae)  # = cfg.model.resolution without a base
    metrics: dict[str, float] = {}
    if base is None:  # the autoencoder sees pixels (streamed from disk per batch), nothing else does
        metrics.update(train_autoencoder(comp.vae, dataset_dir, df, res_px, cfg, work))
    comp.vae.requires_grad_(False)
    comp.vae.eval()
    latents = stage_latents(comp.vae, dataset_dir, df, res_px, cfg.loop)  # cached: encoded once per dataset+VAE
    captions = [caption_for(r, meta, cfg.captions) for _, r in df.iterrows()]
    class_prompts = [cfg.class_prompt.format(phrase=meta.phrase(str(lab))) for lab in df["label"]]
    mu, sigma = 0.0, 1.0
    data = {"latents": latents, "caption": captions, "class_prompt": class_prompts}
    if cfg.cate_weight > 0:
        s_k = _typicality(comp, captions, class_prompts)  # once, over the whole set (eqs. 11-12)
        mu, sigma = typicality_stats(s_k)
        data["typicality"] = s_k  # held fixed during training (module docstring)
        metrics.update({"typicality_mu": mu, "typicality_sigma": sigma})
    model = DenoiserObjective(comp.unet, comp.text_encoder, comp.tokenizer, comp.scheduler, cfg, mu, sigma)
    result = train(model, data, cfg.loop, work / "denoiser", validate=_per_class_validation(comp, meta, cfg))
    metrics.update({k: v for k, v in result.logs.items() if k != "lr"})
    metrics["steps"] = float(result.step)
    metrics["train_seconds"] = time.time() - t0
    if _is_main():
        lineage = {
            "stage": stage, "dataset": _dataset_version(dataset_dir), "config": to_dict(cfg),
            "parent": str(base) if base else None, "metrics": metrics, "classes": meta.classes,
            "class_phrases": {c: meta.phrase(c) for c in meta.classes}, "modality": meta.modality,
        }  # fmt: skip
        comp.unet.eval()
        comp.text_encoder.eval()
        save_pipeline(comp.pipeline(), out_dir, lineage)
    return metrics


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@torch.no_grad()
def _typicality(comp: Components, captions: list[str], class_prompts: list[str]) -> torch.Tensor:
    """s_k = cos(c_k, t_k) (eq. 11) of every sample of the fine-tuning set, before training: [N]."""
    from craft.models.diffusion import encode_text

    comp.text_encoder.eval()
    ss = []
    for i in range(0, len(captions), 128):
        _, t = encode_text(comp.tokenizer, comp.text_encoder, captions[i : i + 128])
        _, c = encode_text(comp.tokenizer, comp.text_encoder, class_prompts[i : i + 128])
        ss.append(F.cosine_similarity(c.float(), t.float(), dim=1))
    return torch.cat(ss).cpu()


def _dataset_version(dataset_dir) -> dict[str, Any]:
    from craft.io import sha256_file

    meta = read_meta(dataset_dir)
    return {
        "path": str(dataset_dir),
        "name": meta.name,
        "manifest_sha256": sha256_file(Path(dataset_dir) / "manifest.parquet"),
    }


def pretrain(cfg: PretrainConfig, dataset_dir, out_dir, base: str | None = None, work_dir=None) -> dict[str, float]:
    """CRAFTS stage 1: weak-caption pretraining (from ``base`` or from scratch incl. the autoencoder)."""
    return run_stage("pretrain", cfg, dataset_dir, out_dir, base, work_dir)


def finetune(cfg: FinetuneConfig, dataset_dir, out_dir, base: str | None = None, work_dir=None) -> dict[str, float]:
    """CRAFTS stage 2: labelled fine-tuning with L_corr + L_cate, usually from the stage-1 model."""
    return run_stage("finetune", cfg, dataset_dir, out_dir, base, work_dir)


def main(cfg: CraftsConfig, dataset_dir, out_dir, base: str | None = None, work_dir=None) -> dict[str, float]:
    """Run the stage that ``cfg``'s type names (PretrainConfig -> stage 1, FinetuneConfig -> stage 2)."""
    stage = "finetune" if isinstance(cfg, FinetuneConfig) else "pretrain"
    return run_stage(stage, cfg, dataset_dir, out_dir, base, work_dir)


def step(stage: str, dataset_dir, model_dir, profile: str, overrides: list[str], base: str = "") -> dict[str, float]:
    """Pipeline step: load ``stage``'s config from the profile + overrides and train (KFP components call this)."""
    from craft.config import load_stage_config

    cfg = load_stage_config(stage, profile, overrides)
    return run_stage(stage, cfg, dataset_dir, model_dir, base or None)
