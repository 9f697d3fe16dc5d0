"""Stable-Diffusion-style components: size presets built in code, or real checkpoints loaded offline.

- ``build_components(ModelConfig(preset=...), class_phrases)``: UNet2DConditionModel, AutoencoderKL,
  CLIPTextModel, an offline CLIPTokenizer and a DDPM noise scheduler with random weights.
  ``tiny`` is for tests and the CPU demo; ``sd15`` / ``sd21`` have the architecture sizes of
  Stable Diffusion 1.5 / 2.1 (for benchmarks; weights are random, nothing is downloaded).
- ``load_pipeline(dir_or_s3_uri)``: a diffusers ``StableDiffusionPipeline`` directory (safetensors
  only, ``local_files_only``; pickle files beside them are ignored, never loaded), from disk or from an
  ``s3://`` prefix. The same loader reads real snapshots (stabilityai/stable-diffusion-2-1 as
  downloaded) and the ones this package saves.
- ``prediction_type`` / ``training_target`` / ``predicted_x0``: what the UNet output means (epsilon or
  v, SD 2.1 768 px is v) and the regression target and clean-latent estimate every trainer uses;
  ``model_resolution``: the image size every stage trains and samples at.
- ``save_pipeline(pipe, dir, lineage)``: the same layout plus ``lineage.json``, written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import string
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from craft.io import atomic_dir, atomic_write_json

log = logging.getLogger(__name__)

LINEAGE = "lineage.json"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Words the offline tokenizer has BPE merges for (they tokenize into a few pieces; unknown words into
# characters). Covers the
# demo captions and common pathology / radiology report vocabulary; class phrases are added per model.
WORDS = """
a an the of and or with without in on at to from by for is are no not as this that these there
image tile patch slide photo picture view scan x-ray xray radiograph chest frontal lateral pa ap
h&e he stained stain staining hematoxylin eosin histology histopathology pathology tissue sample
microscopy magnification high low medium mild moderate severe marked minimal focal diffuse
normal abnormal benign malignant tumor tumour cancer carcinoma adenoma adenocarcinoma mucinous
colon colorectal colonic mucosa glands gland glandular crypts crypt epithelium epithelial stroma
stromal lumen luminal mucin pools pool nuclei nucleus nuclear cells cell cellular cytoplasm
pink purple blue dark light pale bright dense sparse large small round oval irregular regular
crowded crowding elongated stratified atypia atypical pleomorphic pleomorphism mitoses mitotic
architecture structure pattern texture complex cribriform villous tubular invasion invasive
inflammatory inflammation lymphocytes necrosis fibrosis fat vessels vessel blood
lung lungs heart cardiac cardiomegaly enlarged enlargement silhouette pleural effusion fluid
pneumonia consolidation opacity opacities airspace lobe lobes upper lower left right bilateral
unilateral base bases costophrenic angle angles blunting blunted clear clearly finding findings
acute chronic disease evidence suggestive consistent likely possible shows showing seen visible
rib ribs clavicle spine diaphragm mediastinum hilar hila field fields margin margins border
grade well poorly differentiated moderately shape size color colour intensity contrast noise
""".split()


@dataclass
class ModelConfig:
    """Which diffusion model to build when no base checkpoint is given."""

    preset: Literal["tiny", "sd15", "sd21"] = "tiny"  # architecture size; weights are random
    resolution: int = 64  # image side in pixels (the UNet works at resolution / VAE factor)
    unet_channels: list[int] | None = None  # override the preset's UNet block_out_channels
    layers_per_block: int | None = None  # override the preset's UNet layers per block
    vae_channels: list[int] | None = None  # override the preset's AutoencoderKL block_out_channels
    text_hidden: int | None = None  # override the text encoder width (= UNet cross-attention dim)
    text_layers: int | None = None  # override the number of text-encoder layers
    max_length: int | None = None  # tokenizer model_max_length (preset: 32 tiny, 77 sd*)
    beta_schedule: Literal["linear", "scaled_linear"] | None = None  # None: preset (tiny: linear, eq. 2)

    def validate(self) -> None:
        if self.resolution < 8:
            raise ValueError(f"resolution must be >= 8, got {self.resolution}")
        for name in ("unet_channels", "vae_channels"):
            v = getattr(self, name)
            if v is not None and (len(v) < 2 or any(c <= 0 for c in v)):
                raise ValueError(f"{name} must list >= 2 positive channel counts, got {v}")


# preset -> sizes. sd15/sd21 follow the published model configs (UNet 860M / 865M parameters).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        unet_channels=[32, 64, 128], layers_per_block=1, heads=4, linear_proj=False,
        vae_channels=[16, 32, 64], text_hidden=64, text_layers=2, text_heads=4, text_ff=128,
        max_length=32, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, act="quick_gelu",
        norm_groups=8, scaling_factor=1.0,
    ),
    "sd15": dict(
        unet_channels=[320, 640, 1280, 1280], layers_per_block=2, heads=8, linear_proj=False,
        vae_channels=[128, 256, 512, 512], text_hidden=768, text_layers=12, text_heads=12, text_ff=3072,
        max_length=77, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, act="quick_gelu",
        norm_groups=32, scaling_factor=0.18215,
    ),
    "sd21": dict(
        unet_channels=[320, 640, 1280, 1280], layers_per_block=2, heads=[5, 10, 20, 20], linear_proj=True,
        vae_channels=[128, 256, 512, 512], text_hidden=1024, text_layers=23, text_heads=16, text_ff=4096,
        max_length=77, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, act="gelu",
        norm_groups=32, scaling_factor=0.18215,
    ),
}  # fmt: skip


def build_tokenizer(extra_words: list[str] = (), max_length: int = 32):
    """An offline CLIPTokenizer: BPE merges learned from ``WORDS`` + ``extra_words``, characters otherwise.

    CLIP's BPE marks word ends with ``</w>``; each known word adds a left-to-right chain of merges
    whose every result is in the vocabulary, so any text tokenizes. Merges of different words
    compete by rank, so a known word may come out as a few pieces rather than one token; the
    text encoder is trained from scratch on these ids, so only determinism matters. ``model_max_length`` is always set: its default (about 1e30) would make
    the pipeline pad to it.
    """
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits + ".,;:-'()/%&+<>=")
    vocab: dict[str, int] = {}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    for ch in chars:
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    words: list[str] = []
    for phrase in list(WORDS) + list(extra_words):
        for w in phrase.lower().replace("_", " ").split():
            w = "".join(ch for ch in w if ch in chars)
            if len(w) >= 2 and w not in words:
                words.append(w)
    for w in words:
        cur = w[0]
        for i, ch in enumerate(w[1:], 1):
            nxt = ch + ("</w>" if i == len(w) - 1 else "")
            pair = (cur, nxt)
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            cur = cur + nxt
            vocab.setdefault(cur, len(vocab))
    for sp in (BOS, EOS):
        vocab.setdefault(sp, len(vocab))
    return CLIPTokenizer(
        vocab=vocab, merges=merges, model_max_length=max_length, unk_token=EOS, bos_token=BOS, eos_token=EOS,
        pad_token=EOS,
    )  # fmt: skip


@dataclass
class Components:
    """The parts of a text-to-image latent diffusion model."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    extra: dict[str, Any] = field(default_factory=dict)

    def pipeline(self):
        """A ``StableDiffusionPipeline`` over these parts (no safety checker)."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=self.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip

    @classmethod
    def from_pipeline(cls, pipe) -> Components:
        return cls(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)


def _unet_blocks(n: int) -> tuple[list[str], list[str]]:
    # Cross-attention at the two lowest resolutions (where global, tissue-level cues live, CRAFTS
    # eq. 7 discussion); the full-size presets put it at every level but the lowest, as SD does.
    if n >= 4:
        down = ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]
    else:
        down = ["DownBlock2D"] * (n - 2) + ["CrossAttnDownBlock2D"] * 2
    up = [d.replace("Down", "Up") for d in reversed(down)]
    return down, up


def build_components(cfg: ModelConfig | None = None, class_phrases: list[str] = (), seed: int = 0) -> Components:
    """Random-weight components for ``cfg.preset`` (seeded), with ``class_phrases`` in the tokenizer."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = cfg or ModelConfig()
    cfg.validate()
    p = dict(PRESETS[cfg.preset])
    for key in ("unet_channels", "layers_per_block", "vae_channels", "text_hidden", "text_layers", "max_length",
                "beta_schedule"):  # fmt: skip
        if getattr(cfg, key) is not None:
            p[key] = getattr(cfg, key)
    tok = build_tokenizer(class_phrases, p["max_length"])
    torch.manual_seed(seed)
    vch = list(p["vae_channels"])
    factor = 2 ** (len(vch) - 1)
    if cfg.resolution % factor:
        raise ValueError(f"resolution {cfg.resolution} is not divisible by the VAE factor {factor}")
    groups = min(p["norm_groups"], *vch)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vch, layers_per_block=1 if
        cfg.preset == "tiny" else 2, down_block_types=["DownEncoderBlock2D"] * len(vch),
        up_block_types=["UpDecoderBlock2D"] * len(vch), norm_num_groups=groups, sample_size=cfg.resolution,
        scaling_factor=p["scaling_factor"],
    )  # fmt: skip
    uch = list(p["unet_channels"])
    down, up = _unet_blocks(len(uch))
    heads = p["heads"]
    unet = UNet2DConditionModel(
        sample_size=cfg.resolution // factor, in_channels=4, out_channels=4, block_out_channels=uch,
        layers_per_block=p["layers_per_block"], down_block_types=down, up_block_types=up,
        cross_attention_dim=p["text_hidden"], attention_head_dim=heads, use_linear_projection=p["linear_proj"],
        norm_num_groups=min(p["norm_groups"], *uch),
    )  # fmt: skip
    text_cfg = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=p["text_hidden"], intermediate_size=p["text_ff"] if cfg.text_hidden is None
        else 2 * p["text_hidden"], num_hidden_layers=p["text_layers"], num_attention_heads=p["text_heads"] if
        p["text_hidden"] % p["text_heads"] == 0 else 1, max_position_embeddings=p["max_length"],
        hidden_act=p["act"], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, projection_dim=p["text_hidden"],
    )  # fmt: skip
    text_encoder = CLIPTextModel(text_cfg)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule=p["beta_schedule"], beta_start=p["beta_start"],
        beta_end=p["beta_end"], clip_sample=False, prediction_type="epsilon", steps_offset=1,
    )  # fmt: skip  # clip_sample=False: clipping to [-1, 1] wrecks scaled latents (ENVIRONMENT.md)
    for part in (unet, vae, text_encoder):
        part.eval()  # like from_pretrained; trainers switch to train mode themselves
    return Components(unet, vae, text_encoder, tok, scheduler)


def encode_text(tokenizer, text_encoder, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(token states [B, L, D] for cross-attention, pooled features [B, D]) of ``prompts``."""
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids.to(text_encoder.device)  # fmt: skip
    out = text_encoder(ids)
    return out.last_hidden_state, out.pooler_output


# ---------------------------------------------------------------- parameterisation and resolution

# What the UNet's output means (diffusers' ``prediction_type``). x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
# (DDPM forward process; CRAFTS eq. 3) in every case; only the regression target differs.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def prediction_type(scheduler) -> str:
    """The scheduler's ``prediction_type`` (what the base UNet was trained to output); refuses any other kind.

    SD 1.x and SD 2.1-base predict the noise ("epsilon"); the 768-px SD 2.1 predicts v ("v_prediction").
    """
    kind = getattr(scheduler.config, "prediction_type", None) or "epsilon"
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"scheduler prediction_type {kind!r} is not supported (one of {', '.join(PREDICTION_TYPES)})")
    return kind


def alpha_bar(scheduler, timesteps: torch.Tensor, ndim: int = 4) -> torch.Tensor:
    """abar_t (CRAFTS eq. 3) of the scheduler's training noise schedule at integer ``timesteps``, shaped [B, 1, ...].

    Read from ``alphas_cumprod``, which every diffusers scheduler of a DDPM-trained model carries (DDPM,
    DDIM, PNDM, Euler), so the forward process does not depend on which sampler a snapshot ships.
    """
    ac = scheduler.alphas_cumprod.to(timesteps.device, torch.float32)
    return ac[timesteps.long()].view(-1, *([1] * (ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (CRAFTS eq. 3; Ho et al. 2020, eq. 4).

    Not the scheduler's own ``add_noise``: Euler-type samplers define it as x_0 + sigma eps (unscaled),
    which is not what the UNet sees during training.
    """
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def training_target(kind: str, x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """What the UNet output is regressed on for a ``prediction_type`` (the target of CRAFTS eq. 5 / CRAFT eq. 1).

    epsilon -> eps; v_prediction -> v = alpha_t eps - sigma_t x_0 with alpha_t = sqrt(abar_t),
    sigma_t = sqrt(1 - abar_t) (Salimans & Ho 2022, "Progressive distillation", sec. 4 and app. D; what
    diffusers' ``get_velocity`` computes); sample -> x_0. Any other kind is refused.

    >>> abar = torch.tensor(0.64)  # alpha_t = 0.8, sigma_t = 0.6
    >>> training_target("v_prediction", torch.tensor(1.0), torch.tensor(2.0), abar)  # 0.8 * 2 - 0.6 * 1
    tensor(1.)
    """
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0
    if kind == "sample":
        return x0
    raise ValueError(f"prediction_type {kind!r} is not supported (one of {', '.join(PREDICTION_TYPES)})")


def predicted_x0(kind: str, xt: torch.Tensor, model_out: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """The model's clean-latent estimate x0_hat from x_t and its output (the z_i of CRAFTS eqs. 9-13).

    epsilon: (x_t - sigma_t eps_hat) / alpha_t; v_prediction: alpha_t x_t - sigma_t v_hat (Salimans &
    Ho 2022, app. D); sample: the output itself. alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t).

    >>> abar = torch.tensor(0.64)
    >>> x0, eps = torch.tensor(1.0), torch.tensor(2.0)
    >>> xt = add_noise(x0, eps, abar)  # 0.8 + 1.2 = 2.0
    >>> [round(float(predicted_x0(k, xt, training_target(k, x0, eps, abar), abar)), 6) for k in PREDICTION_TYPES]
    [1.0, 1.0, 1.0]
    """
    if kind == "epsilon":
        return (xt - (1 - abar).sqrt() * model_out) / abar.sqrt()
    if kind == "v_prediction":
        return abar.sqrt() * xt - (1 - abar).sqrt() * model_out
    if kind == "sample":
        return model_out
    raise ValueError(f"prediction_type {kind!r} is not supported (one of {', '.join(PREDICTION_TYPES)})")


def vae_factor(vae) -> int:
    """Pixel-to-latent downsampling of an AutoencoderKL: 2 ** (levels - 1) (diffusers' ``vae_scale_factor``)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def model_resolution(unet, vae) -> int:
    """Image side in pixels the model trains and samples at: UNet ``sample_size`` x VAE factor.

    Not ``vae.config.sample_size``: the SD 2.x VAE configs all declare 768, also beside the 512-px
    SD 2.1-base UNet (sample_size 64). diffusers' pipelines default to the same UNet-implied size, so
    training (every stage) and sampling (``craft sample``, evaluation, DRaFT) agree.
    """
    s = unet.config.sample_size
    s = int(s if isinstance(s, int) else s[0])
    return s * vae_factor(vae)


def code_version() -> str:
    """The code version recorded in lineage: :func:`craft.version.code_version` (the image's git sha)."""
    from craft.version import code_version as _code_version

    return _code_version()


def save_pipeline(pipe, out_dir: str | os.PathLike, lineage: dict[str, Any] | None = None) -> Path:
    """Write ``pipe`` in diffusers layout (safetensors) plus ``lineage.json``, atomically replacing ``out_dir``.

    ``lineage`` should name dataset version, config and parent; ``code_version`` is added when absent.
    """
    lineage = dict(lineage or {})
    lineage.setdefault("code_version", code_version())
    with atomic_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        atomic_write_json(Path(tmp) / LINEAGE, lineage)
    return Path(out_dir)


def read_lineage(model_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(model_dir) / LINEAGE
    return json.loads(path.read_text()) if path.is_file() else {}


def unneeded_pickles(paths: list[str]) -> list[str]:
    """The pickle weight files of a snapshot's file list that loading never reads, so need not be downloaded.

    Those at the top level (single-file ``.ckpt`` checkpoints) and those in a component folder that also
    holds ``.safetensors`` weights. A folder with pickle weights only keeps them, so that loading refuses it
    with the component named (``pickle_files``) rather than failing on missing weights.

    >>> unneeded_pickles(["v2-1_768.ckpt", "unet/a.bin", "unet/a.safetensors", "vae/b.bin", "model_index.json"])
    ['unet/a.bin', 'v2-1_768.ckpt']
    """
    with_st = {p.split("/", 1)[0] for p in paths if "/" in p and p.endswith(".safetensors")}
    out = []
    for p in paths:
        if Path(p).suffix in PICKLE_SUFFIXES and ("/" not in p or p.split("/", 1)[0] in with_st):
            out.append(p)
    return sorted(out)


def manifest_digest(manifest: dict) -> str:
    """sha256 over a committed prefix's file list (path, size, sha256): the id of what the prefix holds.

    Upload time and staging id are left out, so re-uploading identical files keeps the digest.
    """
    files = sorted((e["path"], int(e["size"]), e["sha256"]) for e in manifest["files"])
    return hashlib.sha256(json.dumps(files, separators=(",", ":")).encode()).hexdigest()


def _complete(folder: Path, want: dict[str, int]) -> bool:
    """``folder`` holds every wanted file at its manifest size (sha256 was checked when it was downloaded)."""
    if not folder.is_dir():
        return False
    for rel, size in want.items():
        try:
            if (folder / rel).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive ``flock`` on ``path``: one fetcher per version downloads, the others wait for it."""
    import fcntl

    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_TEMP = re.compile(r"\.tmp-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}")


def _remove_stale_temps(home: Path, digest: str) -> None:
    """Remove temporary download folders of ``digest`` left by fetchers that died on this host.

    Only those whose process is gone: where locks do not hold, another live fetcher may be downloading
    into its own temporary folder right now, and a folder of another host (a shared volume) is not ours.
    """
    for p in home.glob(f"*{digest}.tmp-*"):
        m = _TEMP.search(p.name)
        if not m or m["host"] != socket.gethostname():
            continue
        try:
            os.kill(int(m["pid"]), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ``s3://`` models are cached: ``cache_dir``, else the model cache (a pod's ``$CRAFT_MODEL_CACHE``, a
    local run's folder: ``craft.data.loader.model_cache_dir``), else ~/.cache/craft/models."""
    from craft.data.loader import model_cache_dir

    return Path(cache_dir or model_cache_dir() or Path.home() / ".cache" / "craft" / "models")


def _fetch(uri: str, cache_dir: str | os.PathLike | None) -> Path:
    """The committed version of ``uri`` in the local cache: ``<root>/<sha256(uri)[:16]>/<manifest digest[:32]>``.

    The manifest is read first (one small GET); a complete folder for its digest is used as it is, without
    downloading. A folder is never replaced or written once it has its final name: a new version of the
    prefix is a new folder, downloaded into a temporary one and renamed into place, so a reader (another rank,
    another step on the same volume) never sees files change under it. Fetchers of one version take a file
    lock, so one downloads and the others wait; the rename only happens if the name is free, so even
    without working locks two fetchers cannot mix their files.
    """
    from craft.storage.objectstore import ObjectStore

    store = ObjectStore.from_env()
    manifest = store.read_manifest(uri)
    digest = manifest_digest(manifest)[:32]
    # An SD 2.1 snapshot carries every weight twice (.safetensors and .bin) plus .ckpt files: several GB
    # that would be downloaded to every pod and never read.
    skip = unneeded_pickles([e["path"] for e in manifest["files"]])
    want = {e["path"]: int(e["size"]) for e in manifest["files"] if e["path"] not in set(skip)}
    home = cache_root(cache_dir) / hashlib.sha256(uri.encode()).hexdigest()[:16]
    final = home / digest
    if _complete(final, want):
        log.info("%s: version %s already in the cache at %s", uri, digest[:12], final)
        return final
    home.mkdir(parents=True, exist_ok=True)
    with _file_lock(home / f".{digest}.lock"):
        if _complete(final, want):  # another fetcher finished it while we waited for the lock
            return final
        if final.exists():
            # incomplete under its final name (a file deleted or truncated by hand): set aside, never rewritten
            broken = home / f".{digest}.broken-{uuid.uuid4().hex[:8]}"
            log.warning("%s: cached %s is incomplete; moving it to %s and downloading again", uri, final, broken)
            os.rename(final, broken)
        _remove_stale_temps(home, digest)
        if skip:
            log.info("%s: not downloading pickle files %s (only .safetensors weights are loaded)", uri,
                     ", ".join(skip))  # fmt: skip
        tmp = home / f".{digest}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            store.download_dir(uri, tmp, skip=skip, manifest=manifest)
            try:
                os.rename(tmp, final)  # fails when the name exists: another fetcher (without the lock) won
            except OSError:
                if not _complete(final, want):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s: version %s downloaded to %s", uri, digest[:12], final)
    return final


def resolve_model_dir(path_or_uri: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local model directory: ``path_or_uri`` itself, or an ``s3://`` prefix downloaded into the cache."""
    s = str(path_or_uri)
    if s.startswith("s3://"):
        return _fetch(s, cache_dir)
    p = Path(s)
    if not (p / "model_index.json").is_file():
        raise FileNotFoundError(f"{p}: not a diffusers pipeline directory (no model_index.json)")
    return p


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # torch.load / pickle formats: never loaded


def pickle_files(model_dir: str | os.PathLike) -> list[str]:
    """Pickle weight files of a pipeline directory that loading ignores (relative paths, sorted).

    A real snapshot (stabilityai/stable-diffusion-2-1) ships every weight twice, ``.safetensors`` and
    ``.bin``, plus single-file ``.ckpt`` checkpoints at the top level; ``load_pipeline`` reads only the
    safetensors. Refuses a directory where a component listed in ``model_index.json`` has pickle weights
    and no safetensors file, naming the component and the file (loading it would need unpickling).
    """
    d = Path(model_dir)
    index = json.loads((d / "model_index.json").read_text())
    for name, spec in sorted(index.items()):
        sub = d / name
        if name.startswith("_") or not isinstance(spec, list) or not spec or spec[0] is None or not sub.is_dir():
            continue
        files = [f for f in sub.rglob("*") if f.is_file()]
        pkl = sorted(str(f.relative_to(d)) for f in files if f.suffix in PICKLE_SUFFIXES)
        if pkl and not any(f.suffix == ".safetensors" for f in files):
            raise ValueError(f"{d}: component {name!r} has only pickle weights ({pkl[0]}), no .safetensors; "
                             f"refusing to unpickle it (convert it to safetensors first)")  # fmt: skip
    return sorted(str(f.relative_to(d)) for f in d.rglob("*") if f.is_file() and f.suffix in PICKLE_SUFFIXES)


def load_pipeline(path_or_uri: str | os.PathLike, cache_dir: str | os.PathLike | None = None, dtype=None):
    """A ``StableDiffusionPipeline`` from a local directory or an ``s3://`` prefix; safetensors only, offline.

    Pickle files beside the safetensors (``.bin`` / ``.ckpt`` in every SD 2.1 snapshot) are ignored and
    named in a log line; a component with pickle weights only is refused (``pickle_files``).
    """
    from diffusers import StableDiffusionPipeline

    d = resolve_model_dir(path_or_uri, cache_dir)
    ignored = pickle_files(d)
    if ignored:
        log.info("%s: ignoring pickle files %s (only .safetensors weights are loaded)", d, ", ".join(ignored))
    kwargs = dict(local_files_only=True, use_safetensors=True, safety_checker=None, feature_extractor=None,
                  requires_safety_checker=False)  # fmt: skip
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    pipe = StableDiffusionPipeline.from_pretrained(str(d), **kwargs)
    if getattr(pipe.tokenizer, "model_max_length", 0) > 10_000:
        raise ValueError(f"{d}/tokenizer: model_max_length is unset ({pipe.tokenizer.model_max_length})")
    prediction_type(pipe.scheduler)  # refuse a parameterisation no trainer can target, at load time
    pipe.set_progress_bar_config(disable=True)
    return pipe
