"""A tiny pipeline directory laid out exactly like a stabilityai/stable-diffusion-2-1 snapshot (built in code).

What a real snapshot has that the pipelines this package saves do not:

- ``model_index.json`` as the hub repo writes it: StableDiffusionPipeline with DDIMScheduler, CLIPTextModel,
  CLIPTokenizer, UNet2DConditionModel, AutoencoderKL, no safety checker or feature extractor
  (``[null, null]``), ``requires_safety_checker: false``;
- ``scheduler/scheduler_config.json`` with ``prediction_type`` (v_prediction for the 768-px model) and the
  PNDM-era keys the real file carries (``skip_prk_steps``, ``trained_betas``);
- ``vae/config.json`` declaring ``sample_size: 768`` beside a UNet whose ``sample_size`` implies another
  (here smaller) image size, as SD 2.1-base's 64-latent UNet does (64 x 8 = 512 px);
- ``tokenizer/`` as vocab.json + merges.txt + special_tokens_map.json + tokenizer_config.json (no
  tokenizer.json), as the hub repo has it;
- every weight twice, ``.safetensors`` and pickle ``.bin``, plus top-level single-file checkpoints
  (``v2-1_768-ema-pruned.ckpt`` ...). The decoys here are not valid pickles (nor valid safetensors), so a
  loader that opened one would crash.

Sizes (tiny): VAE factor 2 (two levels), UNet sample_size 8 -> 16 px images, while the VAE says 768.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from craft.models.diffusion import ModelConfig, build_components

CLASSES = ["normal", "adenocarcinoma"]
UNET_SAMPLE_SIZE = 8  # latent side
VAE_FACTOR = 2  # two VAE levels
RESOLUTION = UNET_SAMPLE_SIZE * VAE_FACTOR  # 16 px: what every stage must train and sample at
VAE_DECLARED = 768  # what the SD 2.x vae/config.json says
DECOY = b"DECOY: not a pickle and not safetensors; loading this file must never happen\n"
# pickle / single-file weights a real snapshot has beside the diffusers safetensors
DECOYS = (
    "v2-1_768-ema-pruned.ckpt",
    "v2-1_768-nonema-pruned.ckpt",
    "v2-1_768-ema-pruned.safetensors",  # single-file checkpoint: not part of the diffusers layout
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.bin",
    "vae/diffusion_pytorch_model.bin",
    "vae/diffusion_pytorch_model.fp16.bin",
    "text_encoder/pytorch_model.bin",
    "text_encoder/pytorch_model.fp16.bin",
)

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.10.0.dev0",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def scheduler_config(prediction_type: str) -> dict:
    """The real SD 2.1 ``scheduler/scheduler_config.json`` (DDIM, scaled-linear betas), with ``prediction_type``."""
    return {
        "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
        "prediction_type": prediction_type, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None,
    }  # fmt: skip


def build_sd21_dir(
    path: str | Path, prediction_type: Literal["v_prediction", "epsilon"] = "v_prediction", seed: int = 0
) -> Path:
    """Write the tiny SD-2.1-layout snapshot to ``path`` (created) and return it."""
    from diffusers import StableDiffusionPipeline

    root = Path(path)
    mc = ModelConfig(preset="tiny", resolution=RESOLUTION, unet_channels=[8, 16], vae_channels=[8, 16],
                     text_hidden=16, text_layers=1, max_length=16)  # fmt: skip
    comp = build_components(mc, CLASSES, seed=seed)
    assert comp.unet.config.sample_size == UNET_SAMPLE_SIZE
    comp.vae.register_to_config(sample_size=VAE_DECLARED)
    pipe = StableDiffusionPipeline(
        vae=comp.vae, text_encoder=comp.text_encoder, tokenizer=comp.tokenizer, unet=comp.unet,
        scheduler=comp.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(root, safe_serialization=True)
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(prediction_type), indent=2))
    _slow_tokenizer_files(root / "tokenizer")
    vae_cfg = json.loads((root / "vae" / "config.json").read_text())
    assert vae_cfg["sample_size"] == VAE_DECLARED
    for rel in DECOYS:
        (root / rel).write_bytes(DECOY)
    (root / "README.md").write_text("tiny stand-in for stabilityai/stable-diffusion-2-1 (built in code)\n")
    return root


def _slow_tokenizer_files(tok_dir: Path) -> None:
    """Replace tokenizer.json by the vocab.json / merges.txt / special_tokens_map.json files the hub repo has."""
    tj = json.loads((tok_dir / "tokenizer.json").read_text())
    model = tj["model"]
    (tok_dir / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    special = {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in cfg}
    (tok_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (tok_dir / "tokenizer.json").unlink()
