"""The baselines CRAFT is compared with (CRAFT sec. 4.1.2-4.1.3): zero-shot, TI, TI+LoRA, DPO.

- zero-shot: the base model unchanged (``zeroshot`` records the base pointer; nothing is trained).
- textual inversion (Gal et al. 2022; De Wilde et al. 2023): one new token per disease, added to the
  tokenizer and the text-encoder embedding table; only those rows are learned, with the plain
  diffusion loss. Every other row is held fixed: its gradient is masked to zero and the original
  rows are restored before each step and at the end (so weight decay cannot move them either).
- TI+LoRA (Wang et al. 2024): the TI tokens, then a LoRA on the UNet cross-attention trained with the
  plain diffusion loss (the paper trains TI first, then LoRA). ``prompts=enriched`` gives the
  TI+LoRA+p variant of Table 2.
- DPO (Diffusion-DPO, Wallace et al. 2024; Wang et al. 2025): offline preference pairs of two
  seed-varied samples per prompt from the starting (TI+LoRA) model, the preferred one chosen by a
  judge (the critic's reward, or any blinded ranking judge such as an MLLM); the LoRA is trained
  with the Diffusion-DPO loss against the frozen starting model as reference.

Every trained baseline writes safetensors (``learned_embeds.safetensors`` and/or the diffusers LoRA
file) that ``craft.train.reward.load_adapters`` puts into the base pipeline.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from craft.config import to_dict
from craft.data.loader import cached_text_states
from craft.io import atomic_dir, atomic_write_json
from craft.models.diffusion import add_noise, alpha_bar, prediction_type, training_target
from craft.models.lean_graph import lean_saves
from craft.train.loop import LoopConfig, train
from craft.train.reward import (
    EMBEDS_FILE,
    LoraSettings,
    RewardFn,
    TrainableOnly,
    add_lora,
    add_tokens,
    continue_adapters,
    decode,
    denoising_loss,
    encode_unique,
    make_scheduler,
    sample_latents,
    save_adapters,
    token_prompts,
)


def _ti_loop() -> LoopConfig:
    return LoopConfig(steps=3000, batch_size=4, lr=5e-3, checkpoint_every=500, max_grad_norm=0.0)  # paper: 3000 steps


def _lora_loop() -> LoopConfig:
    return LoopConfig(steps=1000, batch_size=4, lr=1e-4, checkpoint_every=250)


def _dpo_loop() -> LoopConfig:
    return LoopConfig(steps=500, batch_size=4, lr=1e-5, checkpoint_every=100)


@dataclass
class TIConfig:
    """Stage ``ti``: textual inversion of one token per class (CRAFT sec. 4.1.3: 3,000 steps)."""

    loop: LoopConfig = field(default_factory=_ti_loop)  # optimisation of the new embedding rows
    token: str = "<{label}>"  # the new token per class; {label} = class name
    prompt: str = "{token}"  # training prompt per image; {token}, {phrase} (class phrase) available
    init: Literal["phrase", "random"] = "phrase"  # start each token at the mean embedding of its class phrase
    split: str = "train"  # manifest split used for training
    device: str = "auto"  # auto: cuda when available

    def validate(self) -> None:
        if "{label}" not in self.token:
            raise ValueError(f"token must contain {{label}}, got {self.token!r}")
        if "{token}" not in self.prompt:
            raise ValueError(f"prompt must contain {{token}}, got {self.prompt!r}")


@dataclass
class TILoRAConfig:
    """Stage ``ti_lora``: TI tokens, then LoRA on the UNet cross-attention with the diffusion loss."""

    loop: LoopConfig = field(default_factory=_lora_loop)  # optimisation of the LoRA
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(cross_attention_only=True))  # on attn2
    ti: TIConfig = field(default_factory=TIConfig)  # used when no TI output is given (TI is trained first)
    prompts: Literal["label", "enriched"] = "label"  # label: "{ti.prompt}"; enriched: "{token}, <enriched>"
    split: str = "train"  # manifest split used for training
    device: str = "auto"  # auto: cuda when available

    def validate(self) -> None:
        self.lora.validate()
        self.ti.validate()


@dataclass
class JudgeBackend:
    """The MLLM that chooses one image of each pair (``dpo.judge=mllm``): the annotate stage's backends."""

    # openai-compatible server, a local VLM folder, or offline: the demo measurer (image measurements, no model)
    backend: Literal["openai", "transformers", "offline"] = "openai"
    model: str = ""  # openai: model name; transformers: local model folder; offline: ignored
    base_url: str = "https://api.openai.com/v1"  # OpenAI-compatible server (vLLM: http://host:8000/v1)
    api_key_env: str = "OPENAI_API_KEY"  # NAME of the environment variable holding the key
    timeout_s: float = 60.0  # per HTTP request
    max_retries: int = 4  # transport retries per request
    max_tokens: int = 200  # answer length limit (a {"choice", "reason"} JSON object)
    temperature: float = 0.0  # openai sampling temperature
    image_detail: Literal["low", "high", "auto"] = "low"  # openai image_url detail
    # openai response_format: json_schema (the answer's schema, constrained decoding) | json_object | none
    structured_output: Literal["json_schema", "json_object", "none"] = "json_schema"
    max_attempts: int = 3  # answers per pair before the stage fails naming the pair (bad-answer retries)
    keep_images: bool = True  # keep each pair's two images beside decisions.jsonl (the work dir) for audit
    device: str = "cpu"  # transformers backend device
    dtype: str = "auto"  # transformers backend dtype

    def validate(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1 (got {self.max_attempts})")

    def make(self):
        """The backend object (``craft.annotate.backends``)."""
        from craft.annotate.run import AnnotateConfig, make_backend

        if not self.model and self.backend != "offline":
            raise ValueError("dpo.judge=mllm needs judge_backend.model (a model name or a local model folder)")
        fields = {k: getattr(self, k) for k in ("backend", "model", "base_url", "api_key_env", "timeout_s",
                                                 "max_retries", "max_tokens", "temperature", "image_detail",
                                                 "structured_output", "device", "dtype")}  # fmt: skip
        return make_backend(AnnotateConfig(**fields), setting="dpo.judge_backend.structured_output")


@dataclass
class DPOConfig:
    """Stage ``dpo``: Diffusion-DPO on offline preference pairs (CRAFT sec. 4.1.3, after Wang et al. 2025)."""

    loop: LoopConfig = field(default_factory=_dpo_loop)  # optimisation of the LoRA
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(cross_attention_only=True))  # when no start
    beta: float = 2500.0  # beta of the Diffusion-DPO loss (diffusers' train_diffusion_dpo default)
    n_pairs: int = 1024  # preference pairs (paper: 1,024 per dataset)
    # who prefers: the critic's reward, or an MLLM shown both images of the pair at once (with the prompt, the
    # class and its checklist) that must choose one (CRAFT sec. 4.1.2); decisions in <work>/judge/decisions.jsonl
    judge: Literal["critic", "mllm"] = "critic"
    judge_backend: JudgeBackend = field(default_factory=JudgeBackend)  # the MLLM, when judge=mllm
    reward_weights: dict[str, float] = field(
        default_factory=lambda: {"vdc": 1.0, "ccs": 1.0, "dd": 0.2, "sfs": 1.0}
    )  # critic judge: weights of the CAS-style score
    prompts: Literal["label", "enriched"] = "enriched"  # prompts the pairs are sampled for
    sample_steps: int = 20  # sampler steps for the pair images
    scheduler: Literal["ddim", "ddpm"] = "ddim"  # sampler for the pair images
    guidance: float = 4.0  # classifier-free guidance for the pair images
    seed: int = 0  # seeds of the two samples per prompt derive from it
    split: str = "train"  # manifest split the prompts come from
    device: str = "auto"  # auto: cuda when available
    # DPO's own objective on HELD-OUT pairs (issue 21: does the tuning move it?): pairs judged like the training pairs
    # but drawn with another seed from the same split, scored before/after with fixed noise; 0 = not measured
    heldout_pairs: int = 0
    heldout_draws: int = 4  # (noise, t) draws per held-out pair (the DPO loss is a Monte-Carlo estimate, eq. 14)

    def validate(self) -> None:
        if self.beta <= 0 or self.n_pairs < 1:
            raise ValueError(f"beta must be > 0 and n_pairs >= 1 (got {self.beta}, {self.n_pairs})")
        if self.heldout_pairs < 0 or self.heldout_draws < 1:
            raise ValueError(f"heldout_pairs must be >= 0 and heldout_draws >= 1 (got {self.heldout_pairs}, "
                             f"{self.heldout_draws})")  # fmt: skip
        self.lora.validate()


# ---------------------------------------------------------------- textual inversion


class TIObjective(TrainableOnly):
    """Diffusion loss with only the new token rows of the embedding table trainable."""

    def __init__(self, unet, text_encoder, tokenizer, scheduler, new_ids: list[int]):
        super().__init__()
        self.unet, self.text_encoder, self.tokenizer, self.train_sched = unet, text_encoder, tokenizer, scheduler
        unet.requires_grad_(False)
        text_encoder.requires_grad_(False)
        table = text_encoder.get_input_embeddings().weight
        table.requires_grad_(True)
        mask = torch.zeros(table.shape[0], 1, dtype=table.dtype, device=table.device)
        mask[new_ids] = 1.0
        self.register_buffer("row_mask", mask, persistent=False)
        self.register_buffer("orig_rows", table.detach().clone(), persistent=False)
        self.new_ids = list(new_ids)
        table.register_hook(lambda g: g * self.row_mask.to(g.dtype))  # gradient only on the new rows

    @torch.no_grad()
    def restore(self) -> None:
        """Put every row except the new tokens back to its original value."""
        table = self.text_encoder.get_input_embeddings().weight
        keep = self.row_mask.bool().squeeze(1)
        table[~keep] = self.orig_rows[~keep].to(table.dtype)

    def train(self, mode: bool = True):
        super().train(mode)
        self.unet.eval()
        self.text_encoder.eval()
        return self

    def forward(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        self.restore()
        ids = self.tokenizer(
            list(batch["prompt"]), padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(batch["latents"].device)  # fmt: skip
        cond = self.text_encoder(ids).last_hidden_state
        with lean_saves(self.unet):  # the frozen UNet keeps only what the token rows' gradient needs
            loss = denoising_loss(self.unet, self.train_sched, batch["latents"], cond, generator)
        return {"loss": loss, "l_diff": loss.detach()}

    def embeddings(self, tokens: Sequence[str]) -> dict[str, torch.Tensor]:
        table = self.text_encoder.get_input_embeddings().weight
        return {t: table[i].detach().float().cpu().clone() for t, i in zip(tokens, self.new_ids)}


def add_class_tokens(tokenizer, text_encoder, tokens: dict[str, str], init: str = "phrase") -> list[int]:
    """Add one token per class ({token: class phrase}), initialised at the mean embedding of the phrase's pieces."""
    table = text_encoder.get_input_embeddings().weight
    inits = {}
    for tok, phrase in tokens.items():
        if init == "phrase":
            ids = tokenizer(phrase, add_special_tokens=False).input_ids
            inits[tok] = table[ids].detach().mean(0) if ids else table.detach().mean(0)
        else:
            inits[tok] = torch.randn(table.shape[1]) * table.detach().std()
    return add_tokens(tokenizer, text_encoder, inits)


def train_ti(cfg: TIConfig, comp, meta, df, latents, work: Path) -> dict[str, torch.Tensor]:
    """Learn one token per class on (latent, "{token}" prompt) pairs; returns {token: vector}."""
    tokens = {cfg.token.format(label=c): meta.phrase(c) for c in meta.classes}
    new_ids = add_class_tokens(comp.tokenizer, comp.text_encoder, tokens, cfg.init)
    by_label = {c: cfg.token.format(label=c) for c in meta.classes}
    prompts = [cfg.prompt.format(token=by_label[str(lab)], phrase=meta.phrase(str(lab))) for lab in df["label"]]
    model = TIObjective(comp.unet, comp.text_encoder, comp.tokenizer, comp.scheduler, new_ids)
    res = train(model, {"latents": latents, "prompt": prompts}, cfg.loop, work / "ti")
    model.restore()
    comp.text_encoder.requires_grad_(False)
    return model.embeddings(sorted(tokens)), res


# ---------------------------------------------------------------- LoRA with the plain diffusion loss


class LoRADiffusionObjective(TrainableOnly):
    """Plain diffusion loss (CRAFTS eq. 5) with a LoRA on the UNet; text encoder (incl. TI tokens) frozen."""

    def __init__(self, unet, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.unet, self.text_encoder, self.tokenizer, self.train_sched = unet, text_encoder, tokenizer, scheduler
        text_encoder.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.text_encoder.eval()
        return self

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()

    def forward(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        cond = _text_states(self, batch)
        # only the LoRA trains: frozen convolutions keep no input (craft.models.lean_graph)
        with lean_saves(self.unet):
            loss = denoising_loss(self.unet, self.train_sched, batch["latents"], cond, generator)
        return {"loss": loss, "l_diff": loss.detach()}


def _text_states(model, batch: dict[str, Any]) -> torch.Tensor:
    """The batch's prompt states: precomputed (``states``, the stage's cached column) or through the frozen encoder."""
    if "states" in batch:
        return batch["states"]
    return encode_unique(model.tokenizer, model.text_encoder, list(batch["prompt"]))


# ---------------------------------------------------------------- Diffusion-DPO


def diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Diffusion-DPO (Wallace et al. 2024, eq. 14 as in diffusers' train_diffusion_dpo): per-pair errors -> loss.

    Each argument is the per-sample denoising error ||target - f(x_t)||^2 (mean over latent dims) of the
    trained / reference model on the preferred (w) or rejected (l) image at the same t and noise; the
    target is the model's (noise for epsilon models, v for SD 2.1 768 px: ``training_target``).
    Returns (mean loss, share of pairs where the implicit reward ranks w above l).

    >>> loss, acc = diffusion_dpo_loss(torch.tensor([0.5]), torch.tensor([0.7]), torch.tensor([0.6]),
    ...                                torch.tensor([0.6]), beta=10.0)
    >>> round(float(loss), 4), float(acc)  # inside = -0.5 * 10 * ((0.5 - 0.7) - 0) = 1; -log sigmoid(1)
    (0.3133, 1.0)
    """
    inside = -0.5 * beta * ((model_w - model_l) - (ref_w - ref_l))
    return -F.logsigmoid(inside).mean(), (inside > 0).float().mean()


class DPOObjective(TrainableOnly):
    """Diffusion-DPO on (preferred, rejected) latents; the reference is a frozen copy of the starting UNet."""

    def __init__(self, unet, ref_unet, text_encoder, tokenizer, scheduler, beta: float):
        super().__init__()
        self.unet, self.text_encoder, self.tokenizer, self.train_sched = unet, text_encoder, tokenizer, scheduler
        self.__dict__["ref_unet"] = ref_unet.requires_grad_(False).eval()  # not a submodule: never trained/saved
        text_encoder.requires_grad_(False)
        self.beta = beta
        self.kind = prediction_type(scheduler)

    def train(self, mode: bool = True):
        super().train(mode)
        self.text_encoder.eval()
        return self

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()

    def forward(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        zw, zl = batch["z_w"].float(), batch["z_l"].float()
        b, dev = zw.shape[0], zw.device
        cond = _text_states(self, batch)
        noise = torch.randn(zw.shape, generator=generator).to(dev)
        t = torch.randint(0, self.train_sched.config.num_train_timesteps, (b,), generator=generator).to(dev)
        # w and l share t and noise (Wallace et al. 2024, eq. 14); the forward process is CRAFTS eq. 3
        z0, tt, cc, nn_ = torch.cat([zw, zl]), torch.cat([t, t]), torch.cat([cond, cond]), torch.cat([noise, noise])
        abar = alpha_bar(self.train_sched, tt, z0.ndim)
        zt = add_noise(z0, nn_, abar)
        # one target for model and reference: the noise, or v = alpha_t eps - sigma_t x_0 per image (w and l
        # differ) for a v-prediction base (Salimans & Ho 2022, app. D)
        target = training_target(self.kind, z0, nn_, abar)
        dtype = next(self.unet.parameters()).dtype
        # only the LoRA trains: frozen convolutions keep no input (craft.models.lean_graph)
        with lean_saves(self.unet):
            pred = self.unet(zt.to(dtype), tt, encoder_hidden_states=cc.to(dtype)).sample.float()
        with torch.no_grad():
            ref = self.ref_unet(zt.to(dtype), tt, encoder_hidden_states=cc.to(dtype)).sample.float()
        err = (pred - target).pow(2).mean(dim=(1, 2, 3))
        ref_err = (ref - target).pow(2).mean(dim=(1, 2, 3))
        loss, acc = diffusion_dpo_loss(err[:b], err[b:], ref_err[:b], ref_err[b:], self.beta)
        return {"loss": loss, "implicit_acc": acc, "err_w": err[:b].detach(), "err_l": err[b:].detach()}


@torch.no_grad()
def dpo_objective(model: DPOObjective, pairs: dict[str, Any], draws: int, seed: int, batch: int = 16):
    """The Diffusion-DPO loss and implicit accuracy of ``model`` against its reference on ``pairs`` (mean over
    ``draws`` seeded (noise, t) draws per pair). Before any update the model is its reference: log 2 and 0."""
    was = model.training
    model.eval()
    losses, accs, n = 0.0, 0.0, len(pairs["prompt"])
    dev = next(model.unet.parameters()).device
    for d in range(draws):
        g = torch.Generator().manual_seed(seed * 1_000_003 + d)
        for i in range(0, n, batch):
            sl = slice(i, min(i + batch, n))
            b = {"z_w": pairs["z_w"][sl], "z_l": pairs["z_l"][sl], "prompt": pairs["prompt"][sl]}
            if "states" in pairs:
                b["states"] = pairs["states"][list(range(sl.start, sl.stop))]
            b = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
            out = model(b, g)
            k = sl.stop - sl.start
            losses += float(out["loss"]) * k
            accs += float(out["implicit_acc"]) * k
    model.train(was)
    return losses / (n * draws), accs / (n * draws)


PairJudge = Callable[[Any], Sequence[str]]  # craft.evaluate.preferences judge: Case -> letters best first


@torch.no_grad()
def make_pairs(unet, vae, text_encoder, tokenizer, scheduler, prompts: list[str], meta: dict[str, list],
               seed: int, steps: int = 20, kind: str = "ddim", guidance: float = 4.0, batch: int = 8,
               score: RewardFn | None = None, judge: PairJudge | None = None) -> dict[str, Any]:  # fmt: skip
    """Two seed-varied samples per prompt and which one is preferred -> {"z_w", "z_l", "prompt", "margin"}.

    ``score(images, meta)["total"]`` (the critic's CAS-style reward) or a blinded ``judge`` (an MLLM
    ranking a ``craft.evaluate.preferences.Case`` of two candidates) decides. ``prompts`` condition the
    generator; ``meta["prompt"]``, when given, is the text the judge reads instead (the enriched prompt
    without TI class tokens, as evaluation scores it). Latents are the final sampled latents, so DPO
    trains on exactly the images the judge saw.
    """
    import numpy as np

    from craft.evaluate.preferences import blind

    if (score is None) == (judge is None):
        raise ValueError("make_pairs: give exactly one of score= or judge=")
    sched = make_scheduler(scheduler, kind, steps)
    dev = next(unet.parameters()).device
    uncond = encode_unique(tokenizer, text_encoder, [""])
    zw, zl, margins = [], [], []
    rng = np.random.default_rng(seed)
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        b = len(chunk)
        cond = encode_unique(tokenizer, text_encoder, chunk)
        za = sample_latents(unet, sched, cond, uncond, torch.Generator().manual_seed(seed * 100_003 + 2 * i), guidance)
        zb = sample_latents(unet, sched, cond, uncond, torch.Generator().manual_seed(seed * 100_003 + 2 * i + 1),
                            guidance)  # fmt: skip
        imgs = decode(vae, torch.cat([za, zb]).to(dev))
        sub = {"prompt": list(chunk)} | {k: list(v[i : i + b]) for k, v in meta.items()}
        if score is not None:
            tot = score(imgs, {k: v * 2 for k, v in sub.items()})["total"].float().cpu()
            a_wins = tot[:b] >= tot[b:]
            margin = (tot[:b] - tot[b:]).abs()
        else:
            from PIL import Image

            pil = [Image.fromarray((x.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")) for x in imgs]
            wins = []
            for j in range(b):
                bc = blind(f"pair-{i + j}", str(sub.get("label", [""] * b)[j]), sub["prompt"][j],
                           {"a": pil[j], "b": pil[b + j]}, rng)  # fmt: skip
                ranking = [str(x).strip().upper() for x in judge(bc.case)]
                if sorted(ranking) != sorted(bc.key):
                    raise ValueError(f"pair {i + j}: judge returned {ranking}, expected a ranking of {sorted(bc.key)}")
                wins.append(bc.key[ranking[0]] == "a")
            a_wins = torch.tensor(wins)
            margin = torch.full((b,), float("nan"))
        sel = a_wins.view(b, 1, 1, 1).to(za.device)
        zw.append(torch.where(sel, za, zb).cpu())
        zl.append(torch.where(sel, zb, za).cpu())
        margins.append(margin)
    return {"z_w": torch.cat(zw), "z_l": torch.cat(zl), "prompt": list(prompts), "margin": torch.cat(margins)}


# ---------------------------------------------------------------- stages


def _device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def _load(base, dev, split: str, dataset_dir, loop: LoopConfig):
    """(meta, rows of ``split``, the base's components on ``dev``, their latents from the latent cache)."""
    from craft.data.manifest import read_manifest, read_meta
    from craft.models.diffusion import Components, load_pipeline, model_resolution
    from craft.train.crafts import stage_latents

    meta = read_meta(dataset_dir)
    df = read_manifest(dataset_dir)
    df = df[df["split"] == split].reset_index(drop=True)
    if len(df) == 0:
        raise ValueError(f"{dataset_dir}/manifest.parquet: no rows with split={split!r}")
    pipe = load_pipeline(base)
    comp = Components.from_pipeline(pipe)
    for m in (comp.unet, comp.vae, comp.text_encoder):
        m.to(dev)
    comp.vae.requires_grad_(False)
    res = model_resolution(comp.unet, comp.vae)  # UNet-implied, as DRaFT / DPO / evaluation sample
    latents = stage_latents(comp.vae, dataset_dir, df, res, loop)  # frozen VAE: encoded once, then cached
    return meta, df, comp, latents


def _lineage(stage: str, cfg, base, dataset_dir, metrics, **extra) -> dict[str, Any]:
    from craft.models.diffusion import read_lineage

    return {"stage": stage, "base": str(base), "base_lineage": read_lineage(base), "config": to_dict(cfg),
            "dataset": str(dataset_dir), "metrics": metrics, **extra}  # fmt: skip


def _metrics(res, t0: float) -> dict[str, float]:
    out = {k: v for k, v in res.logs.items() if k != "lr"}
    out.update(steps=float(res.step), train_seconds=time.time() - t0)
    return out


def zeroshot(base, out_dir) -> dict[str, Any]:
    """Zero-shot baseline: the base model unchanged; writes ``zeroshot.json`` pointing at it."""
    from craft.models.diffusion import read_lineage, resolve_model_dir

    resolve_model_dir(base)  # refuses a path that is not a pipeline
    rec = {"stage": "zeroshot", "kind": "base", "base": str(base), "base_lineage": read_lineage(base)}
    with atomic_dir(out_dir) as tmp:
        atomic_write_json(Path(tmp) / "zeroshot.json", rec)
    return rec


def ti_main(cfg: TIConfig, dataset_dir, base, out_dir, work_dir=None) -> dict[str, float]:
    """Textual inversion: learn one token per class on ``base``; writes learned_embeds.safetensors."""
    cfg.validate()
    t0 = time.time()
    out_dir = Path(out_dir)
    work = Path(work_dir) if work_dir else out_dir.with_name(out_dir.name + ".work")
    meta, df, comp, latents = _load(base, _device(cfg.device), cfg.split, dataset_dir, cfg.loop)
    embeds, res = train_ti(cfg, comp, meta, df, latents, work)
    metrics = _metrics(res, t0)
    tokens = {c: cfg.token.format(label=c) for c in meta.classes}
    save_adapters(out_dir, embeddings=embeds, info=_lineage("ti", cfg, base, dataset_dir, metrics, kind="ti",
                                                            class_tokens=tokens))  # fmt: skip
    return metrics


def _class_tokens(ti_dir) -> dict[str, str]:
    meta = json.loads((Path(ti_dir) / "adapter.json").read_text())
    if "class_tokens" not in meta:
        raise ValueError(f"{ti_dir}/adapter.json: no class_tokens (not a TI output)")
    return meta["class_tokens"]


def ti_lora_main(cfg: TILoRAConfig, dataset_dir, base, out_dir, ti_dir=None, annotations_dir=None,
                 work_dir=None) -> dict[str, float]:  # fmt: skip
    """TI+LoRA: TI tokens (from ``ti_dir`` or trained here first), then LoRA on the UNet cross-attention."""
    from safetensors.torch import load_file

    cfg.validate()
    t0 = time.time()
    out_dir = Path(out_dir)
    work = Path(work_dir) if work_dir else out_dir.with_name(out_dir.name + ".work")
    meta, df, comp, latents = _load(base, _device(cfg.device), cfg.split, dataset_dir, cfg.loop)
    if ti_dir:
        embeds = load_file(str(Path(ti_dir) / EMBEDS_FILE))
        add_tokens(comp.tokenizer, comp.text_encoder, embeds)
        tokens = _class_tokens(ti_dir)
    else:
        embeds, _ = train_ti(cfg.ti, comp, meta, df, latents, work)
        tokens = {c: cfg.ti.token.format(label=c) for c in meta.classes}
    labels = df["label"].astype(str).tolist()
    if cfg.prompts == "enriched":
        from craft.train.reward import paired_table

        if not annotations_dir:
            raise ValueError("ti_lora.prompts=enriched needs the annotations directory")
        _, df, _ = paired_table(dataset_dir, annotations_dir, cfg.split, "skip")
        latents = latents.select_ids([str(i) for i in df["image_id"]])
        labels = df["label"].astype(str).tolist()
        prompts = [f"{tokens[lab]}, {p}" for lab, p in zip(labels, df["enriched_prompt"].astype(str))]
    else:
        prompts = [cfg.ti.prompt.format(token=tokens[lab], phrase=meta.phrase(lab)) for lab in labels]
    add_lora(comp.unet, cfg.lora, seed=cfg.loop.seed)
    model = LoRADiffusionObjective(comp.unet, comp.text_encoder, comp.tokenizer, comp.scheduler)
    # the text encoder (TI rows included) is frozen from here: each distinct prompt is encoded once, cached
    states = cached_text_states(comp.tokenizer, comp.text_encoder, prompts)
    res = train(model, {"latents": latents, "prompt": prompts, "states": states}, cfg.loop, work / "lora")
    metrics = _metrics(res, t0)
    info = _lineage("ti_lora", cfg, base, dataset_dir, metrics, kind="ti+lora", class_tokens=tokens,
                    ti=str(ti_dir) if ti_dir else None)  # fmt: skip
    save_adapters(out_dir, unet=comp.unet, lora=cfg.lora, embeddings=embeds, info=info)
    return metrics


def dpo_main(cfg: DPOConfig, dataset_dir, annotations_dir, critic_dir, probe_dir, base, out_dir, start_dir=None,
             work_dir=None) -> dict[str, float]:  # fmt: skip
    """Diffusion-DPO from the TI+LoRA model (``start_dir``) or a fresh LoRA on ``base``; critic-judged pairs."""
    from craft.models.diffusion import load_pipeline
    from craft.models.encoders import ClinicalAlignmentModule, load_encoder, load_probe
    from craft.train.reward import critic_reward, paired_table

    cfg.validate()
    t0 = time.time()
    dev = _device(cfg.device)
    out_dir = Path(out_dir)
    work = Path(work_dir) if work_dir else out_dir.with_name(out_dir.name + ".work")
    _, df, _ = paired_table(dataset_dir, annotations_dir, cfg.split, "skip")
    pipe = load_pipeline(base)
    embeds, tokens, lora = None, {}, cfg.lora
    if start_dir:
        embeds, tokens, lora = continue_adapters(pipe, start_dir)  # TI tokens + the TI+LoRA LoRA: DPO continues it
    else:
        add_lora(pipe.unet, cfg.lora, seed=cfg.loop.seed)
    unet, vae, te, tok = pipe.unet.to(dev), pipe.vae.to(dev), pipe.text_encoder.to(dev), pipe.tokenizer
    vae.requires_grad_(False)
    te.requires_grad_(False)

    def pair_prompts(n: int, seed: int) -> tuple[list[str], list[str], list[str]]:
        """n sampled rows -> (labels, the text the judge reads, the generator's prompts with class tokens)."""
        rows = df.sample(n=n, replace=len(df) < n, random_state=seed).reset_index(drop=True)
        labels = rows["label"].astype(str).tolist()
        if cfg.prompts == "enriched":
            judged = rows["enriched_prompt"].astype(str).tolist()
            return labels, judged, token_prompts(judged, labels, tokens)
        from craft.data.manifest import read_meta

        meta = read_meta(dataset_dir)
        return labels, [meta.phrase(lab) for lab in labels], [tokens.get(lab, meta.phrase(lab)) for lab in labels]

    labels, judged, prompts = pair_prompts(cfg.n_pairs, cfg.seed)
    # the judge (critic or MLLM) reads the text without class tokens, as evaluation scores it
    checklists = json.loads((Path(annotations_dir) / "checklists.json").read_text())
    backend = None
    if cfg.judge == "mllm":  # CRAFT sec. 4.1.2: the MLLM chooses one of the pair's two images; no critic involved
        from craft.data.manifest import read_meta
        from craft.evaluate.preferences import mllm_pair_judge

        jb, meta = cfg.judge_backend, read_meta(dataset_dir)
        backend = jb.make()
        judge = mllm_pair_judge(backend, checklists, meta.modality, work / "judge", phrases=meta.class_names,
                                max_attempts=jb.max_attempts, keep_images=jb.keep_images)  # fmt: skip
        judge_kw: dict[str, Any] = {"judge": judge}
    else:
        critic = load_encoder(critic_dir, device=str(dev)).eval().requires_grad_(False)
        cam = ClinicalAlignmentModule(critic, load_probe(probe_dir, critic), checklists)
        weights = {k: v for k, v in cfg.reward_weights.items() if k != "sfs"}  # no paired real image for a sample
        judge_kw = {"score": critic_reward(cam, weights)}
    held = None
    try:
        pairs = make_pairs(unet, vae, te, tok, pipe.scheduler, prompts, {"label": labels, "prompt": judged},
                           cfg.seed, cfg.sample_steps, cfg.scheduler, cfg.guidance, **judge_kw)  # fmt: skip
        if cfg.heldout_pairs:  # other rows, other noise, the same judge and starting model as the training pairs
            hl, hj, hp = pair_prompts(cfg.heldout_pairs, cfg.seed + 7_919)
            held = make_pairs(unet, vae, te, tok, pipe.scheduler, hp, {"label": hl, "prompt": hj}, cfg.seed + 7_919,
                              cfg.sample_steps, cfg.scheduler, cfg.guidance, **judge_kw)  # fmt: skip
    finally:
        if backend is not None:
            backend.close()
    ref = copy.deepcopy(unet)
    model = DPOObjective(unet, ref, te, tok, pipe.scheduler, cfg.beta)
    states = cached_text_states(tok, te, pairs["prompt"])  # frozen text encoder: each distinct prompt once
    data = {"z_w": pairs["z_w"], "z_l": pairs["z_l"], "prompt": pairs["prompt"], "states": states}
    res = train(model, data, cfg.loop, work / "dpo")
    metrics = _metrics(res, t0)
    if held is not None:
        hs = cached_text_states(tok, te, held["prompt"])
        for name, d in (("heldout", {**held, "states": hs}), ("train_pairs", data)):
            loss, acc = dpo_objective(model, d, cfg.heldout_draws, cfg.seed)
            metrics[f"{name}_dpo_loss"], metrics[f"{name}_implicit_acc"] = loss, acc
    if cfg.judge == "critic":  # an MLLM judge ranks; it gives no margin
        metrics["pair_margin_mean"] = float(pairs["margin"].nanmean())
    else:  # near 0 or 1 flags a judge that picks by position, not by image (decisions.jsonl has each choice)
        chose_first = [d["choice"] == d["letters"][0] for d in judge.decisions]
        metrics["judge_chose_first_share"] = sum(chose_first) / len(chose_first)
    info = _lineage("dpo", cfg, base, dataset_dir, metrics, kind="dpo", class_tokens=tokens,
                    start=str(start_dir) if start_dir else None, critic=str(critic_dir), judge=cfg.judge)  # fmt: skip
    save_adapters(out_dir, unet=unet, lora=lora, embeddings=embeds, info=info)
    return metrics


def step(stage: str, dataset_dir, base, model_dir, profile: str, overrides: list[str], annotations_dir=None,
         critic_dir=None, probe_dir=None, start_dir=None) -> dict[str, float]:  # fmt: skip
    """Pipeline step for ``ti`` / ``ti_lora`` / ``dpo`` (the KFP components call this)."""
    from craft.config import load_stage_config

    cfg = load_stage_config(stage, profile, overrides)
    if stage == "ti":
        return ti_main(cfg, dataset_dir, base, model_dir)
    if stage == "ti_lora":
        return ti_lora_main(cfg, dataset_dir, base, model_dir, ti_dir=start_dir, annotations_dir=annotations_dir)
    if stage == "dpo":
        return dpo_main(cfg, dataset_dir, annotations_dir, critic_dir, probe_dir, base, model_dir, start_dir)
    raise ValueError(f"unknown baseline stage {stage!r} (ti, ti_lora, dpo)")


def main(cfg, dataset_dir, base, out_dir, **kw) -> dict[str, float]:
    """Run the baseline that ``cfg``'s type names."""
    if isinstance(cfg, TIConfig):
        return ti_main(cfg, dataset_dir, base, out_dir, **kw)
    if isinstance(cfg, TILoRAConfig):
        return ti_lora_main(cfg, dataset_dir, base, out_dir, **kw)
    if isinstance(cfg, DPOConfig):
        ann, critic, probe = kw.pop("annotations_dir"), kw.pop("critic_dir"), kw.pop("probe_dir")
        return dpo_main(cfg, dataset_dir, ann, critic, probe, base, out_dir, **kw)
    raise TypeError(f"not a baseline config: {type(cfg).__name__}")
