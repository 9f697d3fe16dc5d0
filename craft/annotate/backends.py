"""Annotation backends: an OpenAI-compatible chat endpoint, a local transformers VLM, and an offline measurer.

Every backend answers an ``AnnotationRequest`` (one image, its true label, the instruction) with a
``Completion`` whose text should be the JSON object of ``craft.annotate.schema``; the caller
validates it. ``chat(text)`` is the text-only call used to generate checklists.

- ``OpenAIBackend``: POST {base_url}/chat/completions with the image as a base64 data URL (GPT-4o
  as in CRAFT appendix B, or MedGemma / any VLM behind vLLM). Bounded concurrency, timeouts,
  retries with exponential backoff and jitter, 429 / Retry-After handling shared by all threads,
  token usage for cost accounting. The key is read from the environment only, sent as a Bearer
  header and scrubbed from every error message.
- ``TransformersBackend``: AutoProcessor + AutoModelForImageTextToText from a local directory.
- ``OfflineBackend``: no model; fills the schema from measurements of the image (``measure.py``)
  and the given label, so the demo runs offline with grounded, image-specific descriptions.
"""

from __future__ import annotations

import base64
import email.utils
import json
import logging
import mimetypes
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class BackendError(RuntimeError):
    """A request that failed for good (retries exhausted or a non-retryable HTTP status)."""


@dataclass
class Completion:
    """One model answer with its token usage and how many HTTP requests it took."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 1


@dataclass
class AnnotationRequest:
    """Everything a backend needs to describe one image under its true label."""

    image_path: Path
    modality: str
    label: str
    label_phrase: str
    classes: tuple[str, ...]
    system: str
    user: str
    attempt: int = 1  # 1-based answer attempt (validation retries); the offline backend ignores it


# ----------------------------------------------------------------------------- OpenAI-compatible
def image_data_url(path: str | os.PathLike) -> str:
    """The file as a ``data:<mime>;base64,...`` URL (the image input format of chat completions)."""
    mime = mimetypes.guess_type(str(path))[0] or "application/octet-stream"
    if not mime.startswith("image/"):
        raise ValueError(f"{path}: not an image file type ({mime})")
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode('ascii')}"


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or None.

    >>> retry_after_seconds("2")
    2.0
    >>> retry_after_seconds(None) is None
    True
    """
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with "equal jitter": half the capped delay fixed, half random.

    >>> 0.5 <= backoff_delay(0, 1.0, 30.0, random.Random(0)) <= 1.0
    True
    """
    cap = min(max_s, base_s * (2**attempt))
    return cap / 2 + rng.random() * cap / 2


class OpenAIBackend:
    """Chat-completions client for any OpenAI-compatible server, safe to call from many threads."""

    name = "openai"
    RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}

    def __init__(
        self,
        model: str,
        base_url: str,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout_s: float = 60.0,
        max_retries: int = 4,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        max_retry_after_s: float = 300.0,
        max_tokens: int = 400,
        temperature: float = 0.2,
        image_detail: str = "low",
        json_mode: bool = True,
        seed: int = 0,
    ):
        import httpx

        if not model:
            raise ValueError("openai backend: model is required (e.g. model=gpt-4o)")
        self.model = model
        self.max_retries = max_retries
        self.backoff = (backoff_base_s, backoff_max_s)
        self.max_retry_after_s = max_retry_after_s
        self.max_tokens, self.temperature = max_tokens, temperature
        self.image_detail, self.json_mode = image_detail, json_mode
        self._key = os.environ.get(api_key_env) or ""
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        if not self._key:
            log.warning("no API key in $%s: requests go out without an Authorization header", api_key_env)
        self._client = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self._httpx = httpx
        self._slots = threading.BoundedSemaphore(concurrency)  # requests in flight never exceed this
        self._cool_lock = threading.Lock()
        self._cool_until = 0.0  # a 429's Retry-After pauses every thread, not just the one that got it
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _delay(self, attempt: int) -> float:
        with self._rng_lock:
            return backoff_delay(attempt, *self.backoff, self._rng)

    def _wait_cooldown(self) -> None:
        while True:
            with self._cool_lock:
                wait = self._cool_until - time.monotonic()
            if wait <= 0:
                return
            time.sleep(wait)

    def _cool_down(self, seconds: float) -> None:
        with self._cool_lock:
            self._cool_until = max(self._cool_until, time.monotonic() + seconds)

    def _post(self, payload: dict[str, Any]) -> Completion:
        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            self._wait_cooldown()
            delay = None
            with self._slots:
                try:
                    r = self._client.post("/chat/completions", json=payload)
                except self._httpx.TimeoutException as e:
                    last = f"timeout ({type(e).__name__})"
                except self._httpx.TransportError as e:
                    last = f"transport error ({type(e).__name__}: {self._scrub(str(e))[:200]})"
                else:
                    if r.status_code == 200:
                        try:
                            body = r.json()
                            text = body["choices"][0]["message"]["content"] or ""
                        except (ValueError, KeyError, IndexError, TypeError) as e:
                            last = f"unreadable 200 response ({type(e).__name__}): {self._scrub(r.text[:200])!r}"
                        else:
                            usage = body.get("usage") or {}
                            return Completion(
                                text=text,
                                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                                completion_tokens=int(usage.get("completion_tokens") or 0),
                                requests=attempt + 1,
                            )
                    else:
                        last = f"HTTP {r.status_code}: {self._scrub(r.text[:200])!r}"
                        if r.status_code not in self.RETRY_STATUS:
                            raise BackendError(f"{last} (not retryable)")
                        if r.status_code == 429:
                            wait = retry_after_seconds(r.headers.get("retry-after"))
                            if wait is not None:
                                if wait > self.max_retry_after_s:
                                    raise BackendError(f"{last}: Retry-After {wait:.0f} s exceeds max_retry_after_s")
                                self._cool_down(wait)
                                delay = 0.0  # the shared cooldown does the waiting
            if attempt == self.max_retries:
                break
            delay = self._delay(attempt) if delay is None else delay
            log.info("request failed (%s); retry %d/%d in %.2f s", last, attempt + 1, self.max_retries, delay)
            time.sleep(delay)
        raise BackendError(f"gave up after {self.max_retries + 1} requests: {last}")

    def _payload(self, messages: list[dict]) -> dict[str, Any]:
        p: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        if self.json_mode:
            p["response_format"] = {"type": "json_object"}
        return p

    def chat(self, text: str, image_path: str | os.PathLike | None = None, system: str | None = None) -> Completion:
        content: list[dict[str, Any]] = [{"type": "text", "text": text}]
        if image_path is not None:
            url = {"url": image_data_url(image_path), "detail": self.image_detail}
            content.append({"type": "image_url", "image_url": url})
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        return self._post(self._payload(messages))

    def annotate(self, req: AnnotationRequest) -> Completion:
        return self.chat(req.user, image_path=req.image_path, system=req.system)

    def close(self) -> None:
        self._client.close()


# ----------------------------------------------------------------------------- local transformers VLM
class TransformersBackend:
    """A vision-language model loaded from a local directory (no hub access), greedy decoding."""

    name = "transformers"

    def __init__(
        self, model_dir: str | os.PathLike, max_new_tokens: int = 400, device: str = "cpu", dtype: str = "auto"
    ):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"transformers backend: {path}/config.json not found (model= must be a local folder)"
            )
        self.model = str(path)
        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        if getattr(self.processor, "chat_template", None) is None:
            raise ValueError(f"{path}: the processor has no chat_template; save one with the processor")
        torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if dtype not in torch_dtype:
            raise ValueError(f"transformers backend: dtype {dtype!r} is not one of {', '.join(torch_dtype)}")
        self.net = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=torch_dtype[dtype])
        self.net.to(device).eval()
        self.device, self.max_new_tokens = device, max_new_tokens
        self._lock = threading.Lock()  # one generate at a time: the model is not shared across threads
        self._torch = torch

    def messages(self, text: str, with_image: bool, system: str | None) -> list[dict]:
        user = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
        sys = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
        return sys + [{"role": "user", "content": user}]

    def chat(self, text: str, image_path: str | os.PathLike | None = None, system: str | None = None) -> Completion:
        from PIL import Image

        prompt = self.processor.apply_chat_template(
            self.messages(text, image_path is not None, system), add_generation_prompt=True, tokenize=False
        )
        kwargs: dict[str, Any] = {"text": [prompt], "return_tensors": "pt"}
        if image_path is not None:
            kwargs["images"] = [Image.open(image_path).convert("RGB")]
        inputs = self.processor(**kwargs).to(self.device)
        with self._lock, self._torch.no_grad():
            out = self.net.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        n_in = inputs["input_ids"].shape[1]
        new = out[0, n_in:]
        answer = self.processor.decode(new, skip_special_tokens=True)
        return Completion(text=answer, prompt_tokens=int(n_in), completion_tokens=int(new.numel()), requests=1)

    def annotate(self, req: AnnotationRequest) -> Completion:
        return self.chat(req.user, image_path=req.image_path, system=req.system)

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- offline measurer
def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _histo_answer(label: str, m: dict[str, float]) -> dict[str, Any]:
    """Schema fields for an H&E tile from its measurements; the label picks the class-defining values."""
    he = m["mean_hematoxylin_od"] / max(1e-6, m["mean_hematoxylin_od"] + m["mean_eosin_od"])
    stain = "hematoxylin_dominant" if he > 0.75 else "balanced" if he > 0.6 else "eosin_dominant"
    dense = m["hematoxylin_fraction"] > 0.2
    density = "high_nuclear_density" if dense else "low_nuclear_density"
    # Short on purpose: the prompt feeds 64-77-token text encoders, and numbers cost several tokens each.
    desc = (
        f"Nuclei cover {_pct(m['hematoxylin_fraction'])} of the tile in {m['nuclear_clusters']:.0f} clusters; "
        f"open lumina {_pct(m['lumen_fraction'])}, pale mucin {_pct(m['mucin_fraction'])}, "
        f"pink stroma {_pct(m['stroma_fraction'])}."
    )
    lab = label
    if lab == "mucinous_carcinoma" or (
        lab not in ("normal", "adenoma", "adenocarcinoma") and m["mucin_fraction"] > 0.2
    ):
        return {
            "tissue_context": "mucin_pools",
            "architecture": "cell_clusters_floating_in_mucin",
            "nuclei": "enlarged_crowded",
            "stroma": "mucinous",
            "stain_balance": "pale_basophilic_mucin" if m["mucin_fraction"] > 0.15 else stain,
            "key_findings": ["extracellular_mucin_lakes", "floating_epithelial_islands", density],
            "description": desc,
        }
    if lab == "normal":
        return {
            "tissue_context": "colonic_mucosa",
            "architecture": "regular_crypts" if m["lumen_fraction"] > 0.05 else "crowded_regular_glands",
            "nuclei": "small_uniform_basal",
            "stroma": "pink_collagenous",
            "stain_balance": stain,
            "key_findings": ["round_open_lumina", "smooth_gland_outlines", "bland_cytology", density],
            "description": desc,
        }
    if lab == "adenoma":
        return {
            "tissue_context": "glandular_epithelium",
            "architecture": "crowded_regular_glands",
            "nuclei": "elongated_stratified",
            "stroma": "pink_collagenous" if m["stroma_fraction"] > 0.5 else "scant",
            "stain_balance": stain,
            "key_findings": ["nuclear_stratification", "smooth_gland_outlines", density],
            "description": desc,
        }
    # adenocarcinoma and other malignant gland-forming classes
    return {
        "tissue_context": "glandular_epithelium",
        "architecture": "irregular_angulated_glands" if m["lumen_fraction"] > 0.008 else "solid_nests_and_cords",
        "nuclei": "pleomorphic_hyperchromatic",
        "stroma": "desmoplastic",
        "stain_balance": stain,
        "key_findings": ["jagged_gland_borders", "dense_nuclear_clusters", density],
        "description": desc,
    }


def _zone(height: float) -> str:
    return "upper" if height < 0.5 else "lower"


def _cxr_answer(label: str, m: dict[str, Any]) -> dict[str, Any]:
    """Schema fields for a frontal radiograph from its measurements; the label picks the finding."""
    ctr = m["cardiothoracic_ratio"]
    base = {
        "view": "frontal",
        "cardiac_silhouette": "normal",
        "lung_fields": "clear",
        "costophrenic_angles": "sharp",
        "opacity_location": "none",
    }
    heart = f"Heart {_pct(ctr)} of chest width"
    depth = f"lungs {_pct(max(m['right_lung_height'], m['left_lung_height']))} of image height"  # inspiration depth
    if label == "no_finding":
        diff = m["left_right_brightness_difference"]
        side = "evenly dark" if abs(diff) < 0.03 else f"{'left' if diff > 0 else 'right'} lung slightly brighter"
        desc = f"{heart}; {depth}, {side}; bases dark to the diaphragm."
        return {**base, "key_findings": ["sharp_hemidiaphragms", "fine_vascular_markings"], "description": desc}
    if label == "cardiomegaly":
        desc = f"{heart}, broad rounded heart shadow; {depth}, bases dark."
        findings = ["widened_heart_shadow"] + (["globular_heart_shape"] if ctr > 0.6 else [])
        return {**base, "cardiac_silhouette": "enlarged", "key_findings": findings, "description": desc}
    if label == "pleural_effusion":
        r, l = m["right_basal_brightness"], m["left_basal_brightness"]
        side = "bilateral" if abs(r - l) < 0.08 else ("right" if r > l else "left")
        where = {"bilateral": "both bases", "right": "the right base", "left": "the left base"}[side]
        hr, hl = m["right_lung_height"], m["left_lung_height"]
        if side == "bilateral":
            desc = f"Dense uniform fluid at {where} with curved upper edges; aerated lungs {_pct(max(hr, hl))} of image height."
        else:
            short, other = (hr, hl) if side == "right" else (hl, hr)
            desc = (
                f"Dense uniform fluid at {where} with a curved upper edge; aerated {side} lung "
                f"{_pct(1 - short / max(other, 1e-6))} shorter than the other."
            )
        return {
            **base,
            "lung_fields": "basal_opacity",
            "costophrenic_angles": f"blunted_{side}",
            "opacity_location": "bilateral_lower" if side == "bilateral" else f"{side}_lower",
            "key_findings": ["meniscus_sign", "homogeneous_basal_opacity", "obscured_hemidiaphragm"],
            "description": desc,
        }
    if label == "pneumonia":
        r, l = m["right_consolidation_fraction"], m["left_consolidation_fraction"]
        if max(r, l) > 0:
            side = "right" if r >= l else "left"
            h = m[f"{side}_consolidation_height"]
            extent = max(r, l)
        else:  # no hole in either lung: the brighter lung holds the opacity
            side = "left" if m["left_right_brightness_difference"] > 0 else "right"
            h, extent = 0.5, 0.0
        desc = f"Fluffy ill-defined patch in the {_zone(h)} {side} lung, about {_pct(extent)} of that lung."
        return {
            **base,
            "lung_fields": "focal_opacity" if extent < 0.05 else "patchy_opacity",
            "opacity_location": f"{side}_{_zone(h)}",
            "key_findings": ["fluffy_ill_defined_opacity", "asymmetric_lung_density"],
            "description": desc,
        }
    raise ValueError(f"offline backend: no cxr description rule for label {label!r}")


class OfflineBackend:
    """Writes schema answers from measurements of the image and its label; no model, deterministic."""

    name = "offline"
    model = "measure-v1"

    def annotate(self, req: AnnotationRequest) -> Completion:
        from craft.annotate import measure  # scipy: only the offline backend needs it

        if req.modality == "histo":
            obj = _histo_answer(req.label, measure.measure_histo(req.image_path))
        elif req.modality == "cxr":
            obj = _cxr_answer(req.label, measure.measure_cxr(req.image_path))
        else:
            raise BackendError(f"offline backend: no measurements for modality {req.modality!r} (histo, cxr only)")
        return Completion(text=json.dumps({"label": req.label, **obj}), requests=0)

    def chat(self, text: str, image_path: Any = None, system: str | None = None) -> Completion:
        raise BackendError("the offline backend cannot write checklists; use a bundled or a file checklist")

    def close(self) -> None:
        pass


@dataclass
class Prices:
    """USD per million tokens, for the cost line of the summary."""

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6


@dataclass
class Usage:
    """Thread-safe running totals of requests and tokens."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, c: Completion) -> None:
        with self._lock:
            self.requests += c.requests
            self.prompt_tokens += c.prompt_tokens
            self.completion_tokens += c.completion_tokens
