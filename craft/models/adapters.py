"""Adapters on a base text-to-image pipeline: textual-inversion tokens and a UNet LoRA, loaded for generation.

The training stages (``craft.train.reward``, ``craft.train.baselines``) write an adapter directory:
``pytorch_lora_weights.safetensors`` (diffusers' LoRA layout) and/or ``learned_embeds.safetensors``
(token -> vector), with ``adapter.json`` naming the LoRA settings and the class -> token mapping.
Everything that samples from a trained variant (evaluation, promotion, ``craft sample``) loads it here,
so measuring never depends on the training code.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for
EMBEDS_FILE = "learned_embeds.safetensors"  # textual-inversion tokens -> vectors
ADAPTER_JSON = "adapter.json"


def add_tokens(tokenizer, text_encoder, embeddings: dict[str, torch.Tensor]) -> list[int]:
    """Add textual-inversion tokens to ``tokenizer`` and set their rows of the text encoder's embedding table."""
    tokens = sorted(embeddings)
    have = set(tokenizer.get_vocab())
    new = [t for t in tokens if t not in have]
    if new:
        tokenizer.add_tokens(new)
        text_encoder.resize_token_embeddings(len(tokenizer))
    ids = tokenizer.convert_tokens_to_ids(tokens)
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for t, i in zip(tokens, ids):
            vec = embeddings[t]
            if vec.shape != table[i].shape:
                raise ValueError(
                    f"token {t!r}: embedding shape {tuple(vec.shape)} != text encoder {tuple(table[i].shape)}"
                )
            table[i] = vec.to(table.dtype)
    return ids


@contextmanager
def merged_lora(model):
    """While inside, every plain LoRA layer of ``model`` computes with its base weight replaced by W + s*B*A (peft's
    delta) and peft's ``merged`` state set, so its forward is one matmul. On exit the original weight tensors are put
    back as they were (swapped, not subtracted: no drift in fp16/bf16 base weights over thousands of steps).

    For no-graph calls only: the merged weight is a constant, so nothing inside trains the LoRA. Layers it cannot fold
    exactly are left as they are (already merged, disabled, a DoRA-style variant, or dropout active in train mode).
    """
    from peft.tuners.lora import LoraLayer

    swapped = []
    try:
        with torch.no_grad():
            for m in model.modules():
                if not isinstance(m, LoraLayer) or m.merged or m.disable_adapters or m.lora_variant:
                    continue
                active = [a for a in m.active_adapters if a in m.lora_A]
                if not active or (m.training and any(not isinstance(m.lora_dropout[a], torch.nn.Identity)
                                                     for a in active)):  # fmt: skip
                    continue
                w = m.get_base_layer().weight
                orig = w.data
                merged = orig.float() if orig.device.type == "cpu" and orig.dtype != torch.float32 else orig.clone()
                for a in active:
                    merged += m.get_delta_weight(a).to(merged.dtype)
                swapped.append((m, w, orig))
                w.data = merged.to(orig.dtype)
                m.merged_adapters = list(active)
        yield
    finally:
        for m, w, orig in swapped:
            w.data = orig
            m.merged_adapters = []


def read_adapter_meta(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """``adapter.json`` of an adapter directory; a folder without one is refused (not written by craft)."""
    meta_path = Path(adapter_dir) / ADAPTER_JSON
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: missing (not an adapter directory written by craft)")
    return json.loads(meta_path.read_text())


def load_adapters(pipe, adapter_dir: str | os.PathLike):
    """Load what the training stages wrote (TI tokens and/or LoRA) into ``pipe`` in place; returns ``pipe``."""
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    meta = read_adapter_meta(d)
    found = False
    if (d / EMBEDS_FILE).is_file():
        add_tokens(pipe.tokenizer, pipe.text_encoder, load_file(str(d / EMBEDS_FILE)))
        found = True
    if (d / LORA_FILE).is_file():
        pipe.load_lora_weights(str(d), weight_name=LORA_FILE)
        lora = meta.get("lora") or {}
        if lora and float(lora["alpha"]) != float(lora["rank"]):
            # diffusers files carry no alpha: it loads with alpha = rank (scale 1); restore alpha / rank
            from peft.tuners.lora import LoraLayer

            for m in pipe.unet.modules():
                if isinstance(m, LoraLayer):
                    for name in m.scaling:
                        m.scaling[name] = float(lora["alpha"]) / float(lora["rank"])
        found = True
    if not found:
        raise FileNotFoundError(f"{d}: neither {LORA_FILE} nor {EMBEDS_FILE}")
    return pipe


def class_token_prompt(prompt: str, label: str, adapter_meta: dict[str, Any]) -> str:
    """The prompt a variant is conditioned on: a textual-inversion adapter puts its class token in front.

    ``adapter_meta["class_tokens"]`` maps class -> learned token; an adapter that learned tokens but
    does not say which class each belongs to is refused (its tokens would silently go unused). This is
    the generator's input only: critics and evaluators score the image against the plain ``prompt``.
    """
    tokens = adapter_meta.get("tokens") or []
    mapping = adapter_meta.get("class_tokens") or {}
    if tokens and not mapping:
        raise ValueError("adapter learned textual-inversion tokens but adapter.json has no class_tokens mapping")
    if label in mapping:
        return f"{mapping[label]}, {prompt}"
    return str(prompt)


# the reward monitor's readings inside a reward adapter (issue 21; written by craft.train.monitor, read by the
# evaluate step's over-optimisation curve): ADAPTER/monitor/monitor.jsonl and a snapshot ADAPTER/monitor/step-N/
MONITOR_DIR = "monitor"
MONITOR_LOG = "monitor.jsonl"


def read_monitor_log(adapter_dir: str | os.PathLike) -> list[dict]:
    """The readings a reward adapter was trained with ([] when it was trained without the monitor)."""
    p = Path(adapter_dir) / MONITOR_DIR / MONITOR_LOG
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.is_file() else []
