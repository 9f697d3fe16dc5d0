"""Annotation backends: an OpenAI-compatible chat endpoint, a local transformers VLM, and an offline measurer.

Every backend answers an ``AnnotationRequest`` (one image, its true label, the instruction) with a
``Completion`` whose text should be the JSON object of ``craft.annotate.schema``, and a ``PairRequest``
(two images under neutral letters, a target class: DPO's pairwise judge) with ``{"choice", "reason"}``;
the caller validates both. ``chat(text, images=...)`` is the general call (text only for checklists,
several images in one message for the pairwise judge).

Structured outputs: a request may carry a ``ResponseSchema`` (the JSON schema of the expected answer,
derived from the same closed vocabulary its parser validates against). ``OpenAIBackend`` sends it as
``response_format = {"type": "json_schema", "json_schema": {"name", "schema", "strict": true}}``, the
shape OpenAI and vLLM both use to constrain decoding, so a malformed answer cannot be sampled and costs
no retry. ``structured_output`` picks what is sent: ``json_schema`` (default), ``json_object`` (JSON, any
shape: servers without schema support) or ``none``. A server that refuses the setting (HTTP 400/422
naming response_format) raises ``StructuredOutputRefused`` naming the config key to change; there is
no silent downgrade. The answer is validated by the caller whichever mode was used.

- ``OpenAIBackend``: POST {base_url}/chat/completions with each image as a base64 data URL (GPT-4o
  as in CRAFT appendix B, or MedGemma / any VLM behind vLLM). Bounded concurrency, timeouts,
  retries with exponential backoff and jitter, 429 / Retry-After handling shared by all threads,
  token usage for cost accounting. The key is read from the environment only, sent as a Bearer
  header and scrubbed from every error message.
- ``TransformersBackend``: AutoProcessor + AutoModelForImageTextToText from a local directory. It
  decodes greedily without a grammar: the schema reaches it only through the instruction text.
- ``OfflineBackend``: no model; fills the schema from measurements of the image (``measure.py``)
  and the given label, so the demo runs offline with grounded, image-specific descriptions; a pair
  goes to the image whose measurements show the target class's defining sign more strongly.
"""

from __future__ import annotations

import base64
import email.utils
import json
import logging
import math
import mimetypes
import os
import random
import re
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class BackendError(RuntimeError):
    """A request that failed for good (retries exhausted or a non-retryable HTTP status)."""


class StructuredOutputRefused(RuntimeError):
    """The server refused the ``response_format`` sent: a configuration error, so it stops the run.

    Deliberately not a ``BackendError``: per-image handlers record those as failed rows and go on,
    which would turn one wrong setting into thousands of failed rows.
    """


STRUCTURED_OUTPUTS = ("json_schema", "json_object", "none")
_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class ResponseSchema:
    """The JSON schema an answer must follow and its name (OpenAI: 1-64 of a-z A-Z 0-9 _ -).

    Built by the code that parses the answer, from the same vocabulary (``schema.Schema.json_schema``,
    ``checklists.checklist_json_schema``, the pairwise judge's letters), so the two cannot drift apart.
    """

    name: str
    schema: dict[str, Any]

    def __post_init__(self):
        if not _SCHEMA_NAME.fullmatch(self.name):
            raise ValueError(f"response schema name {self.name!r}: 1-64 of a-z A-Z 0-9 _ -")
        if self.schema.get("type") != "object":
            raise ValueError(f"response schema {self.name!r}: the root must be an object schema")

    def response_format(self) -> dict[str, Any]:
        """The ``response_format`` of a chat-completions request (OpenAI structured outputs; vLLM the same)."""
        return {"type": "json_schema", "json_schema": {"name": self.name, "schema": self.schema, "strict": True}}


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
    response_schema: ResponseSchema | None = None  # the answer's JSON schema (structured outputs)


@dataclass
class PairRequest:
    """Two candidate images for one target class, shown in order under neutral letters (pairwise judge)."""

    pair_id: str
    images: tuple[Path, ...]  # presentation order: images[k] is shown as letters[k]
    letters: tuple[str, ...]
    modality: str
    target: str  # the class label the images were generated for
    system: str
    user: str
    response_schema: ResponseSchema | None = None
    attempt: int = 1


def image_labels(letters) -> list[str]:
    """The text part placed before each image of a pair ("Image A:")."""
    return [f"Image {L}:" for L in letters]


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
        structured_output: str = "json_schema",
        setting: str = "structured_output",
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
        if structured_output not in STRUCTURED_OUTPUTS:
            raise ValueError(f"structured_output {structured_output!r}: one of {', '.join(STRUCTURED_OUTPUTS)}")
        self.image_detail, self.structured_output = image_detail, structured_output
        self.setting = setting  # the config key named when the server refuses response_format
        self.base_url = base_url.rstrip("/")
        self._key = os.environ.get(api_key_env) or ""
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        if not self._key:
            log.warning("no API key in $%s: requests go out without an Authorization header", api_key_env)
        # A plain-http server (vLLM on the cluster network) never does TLS, and loading the CA bundle costs
        # 0.1-0.2 s per client (bench/bench_annotate.py): give it a context that trusts no CA, so that a TLS
        # connection, should one ever be attempted, fails instead of going unverified.
        verify: Any = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT) if self.base_url.startswith("http://") else True
        # keep-alive pool sized to the concurrency: every request in flight has its own reused connection
        self._client = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            verify=verify,
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
                        self._check_refused(r.status_code, r.text, payload)
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

    def _check_refused(self, status: int, text: str, payload: dict[str, Any]) -> None:
        """Raise ``StructuredOutputRefused`` when a 400/422 names the response_format this request sent."""
        sent = payload.get("response_format")
        low = text.lower()
        if not sent or status not in (400, 422):
            return
        if not any(k in low for k in ("response_format", "json_schema", "json_object", "structured")):
            return
        weaker = "json_object" if sent["type"] == "json_schema" else "none"
        raise StructuredOutputRefused(
            f"{self.base_url} refused response_format type {sent['type']!r} (HTTP {status}: "
            f"{self._scrub(text[:300])!r}). If this server does not support it, set "
            f"{self.setting}={weaker}" + (" (or none)" if weaker == "json_object" else "")
        )

    def _payload(self, messages: list[dict], response_schema: ResponseSchema | None = None) -> dict[str, Any]:
        p: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        if self.structured_output == "json_schema" and response_schema is not None:
            p["response_format"] = response_schema.response_format()
        elif self.structured_output != "none":  # json_object, or json_schema for a call that has no schema
            p["response_format"] = {"type": "json_object"}
        return p

    def chat(
        self,
        text: str,
        images: Sequence[str | os.PathLike] = (),
        system: str | None = None,
        response_schema: ResponseSchema | None = None,
        image_labels: Sequence[str] = (),
    ) -> Completion:
        """One user message: ``text``, then each image (after its label text, when given), in order."""
        content: list[dict[str, Any]] = [{"type": "text", "text": text}]
        for part in _interleave(images, image_labels):
            if isinstance(part, str):
                content.append({"type": "text", "text": part})
            else:
                url = {"url": image_data_url(part), "detail": self.image_detail}
                content.append({"type": "image_url", "image_url": url})
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        return self._post(self._payload(messages, response_schema))

    def annotate(self, req: AnnotationRequest) -> Completion:
        return self.chat(req.user, images=[req.image_path], system=req.system, response_schema=req.response_schema)

    def compare(self, req: PairRequest) -> Completion:
        return self.chat(req.user, images=req.images, system=req.system, response_schema=req.response_schema,
                         image_labels=image_labels(req.letters))  # fmt: skip

    def close(self) -> None:
        self._client.close()


def _interleave(images: Sequence[Any], labels: Sequence[str]) -> list[Any]:
    """[label 1, image 1, label 2, image 2, ...] (labels optional; one per image when given)."""
    images = [images] if isinstance(images, str | os.PathLike) else list(images)
    if labels and len(labels) != len(images):
        raise ValueError(f"{len(labels)} image labels for {len(images)} images")
    out: list[Any] = []
    for k, im in enumerate(images):
        if labels:
            out.append(labels[k])
        out.append(Path(im))
    return out


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

    def messages(self, text: str, parts: Sequence[Any], system: str | None) -> list[dict]:
        """Chat-template messages: ``text``, then the (label, image) parts in order."""
        user = [{"type": "text", "text": text}]
        user += [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image"} for p in parts]
        sys = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
        return sys + [{"role": "user", "content": user}]

    def chat(
        self,
        text: str,
        images: Sequence[str | os.PathLike] = (),
        system: str | None = None,
        response_schema: ResponseSchema | None = None,
        image_labels: Sequence[str] = (),
    ) -> Completion:
        """Greedy answer to ``text`` and the images; ``response_schema`` is not enforced here (no grammar)."""
        from PIL import Image

        parts = _interleave(images, image_labels)
        prompt = self.processor.apply_chat_template(
            self.messages(text, parts, system), add_generation_prompt=True, tokenize=False
        )
        kwargs: dict[str, Any] = {"text": [prompt], "return_tensors": "pt"}
        pil = [Image.open(p).convert("RGB") for p in parts if not isinstance(p, str)]
        if pil:
            kwargs["images"] = pil
        inputs = self.processor(**kwargs).to(self.device)
        with self._lock, self._torch.no_grad():
            out = self.net.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        n_in = inputs["input_ids"].shape[1]
        new = out[0, n_in:]
        answer = self.processor.decode(new, skip_special_tokens=True)
        return Completion(text=answer, prompt_tokens=int(n_in), completion_tokens=int(new.numel()), requests=1)

    def annotate(self, req: AnnotationRequest) -> Completion:
        return self.chat(req.user, images=[req.image_path], system=req.system)

    def compare(self, req: PairRequest) -> Completion:
        return self.chat(req.user, images=req.images, system=req.system, image_labels=image_labels(req.letters))

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


# The defining visible sign of each demo class, as one number from the measurements the descriptions
# above are written from (higher = shows it more). Histology: open round lumina and sparse nuclei
# (normal), crowded uniform nuclei (adenoma), dense nuclei of uneven cluster size with lumina gone
# (adenocarcinoma), extracellular mucin (mucinous carcinoma). Radiographs: cardiothoracic ratio
# (cardiomegaly), a base hidden by fluid, i.e. a shorter aerated lung (effusion), holes in a lung's
# dark field (pneumonia), and for no finding full-height lungs without consolidation or a wide heart.
# tests/test_preferences.py checks that on demo images each rule prefers an image of its own class over
# one of another class in most pairs.
def class_evidence(modality: str, label: str, m: dict[str, float]) -> float:
    """How strongly measurements ``m`` of one image show class ``label``'s defining sign (offline pairwise judge)."""
    if modality == "histo":
        rules = {
            "normal": lambda: m["lumen_fraction"] - 0.5 * m["hematoxylin_fraction"],
            "adenoma": lambda: m["hematoxylin_fraction"] * (1 - m["cluster_area_cv"]),
            "adenocarcinoma": lambda: m["hematoxylin_fraction"] * m["cluster_area_cv"] - m["lumen_fraction"],
            "mucinous_carcinoma": lambda: m["mucin_fraction"],
        }
    elif modality == "cxr":
        height = min(m["right_lung_height"], m["left_lung_height"])
        cons = max(m["right_consolidation_fraction"], m["left_consolidation_fraction"])
        ctr = m["cardiothoracic_ratio"]
        rules = {
            "cardiomegaly": lambda: ctr,
            "pleural_effusion": lambda: -height,
            "pneumonia": lambda: cons,
            "no_finding": lambda: height - 10 * cons - max(0.0, ctr - 0.5),
        }
    else:
        raise BackendError(f"offline backend: no measurements for modality {modality!r} (histo, cxr only)")
    if label not in rules:
        raise BackendError(f"offline backend: no pairwise rule for {modality} class {label!r} ({', '.join(rules)})")
    value = float(rules[label]())
    if not math.isfinite(value):
        raise ValueError(f"measurement for {label!r} is not finite ({value})")
    return value


class OfflineBackend:
    """Writes schema answers from measurements of the image and its label; no model, deterministic."""

    name = "offline"
    model = "measure-v1"

    @staticmethod
    def _measure(modality: str, path) -> dict[str, Any]:
        from craft.annotate import measure  # scipy: only the offline backend needs it

        if modality == "histo":
            return measure.measure_histo(path)
        if modality == "cxr":
            return measure.measure_cxr(path)
        raise BackendError(f"offline backend: no measurements for modality {modality!r} (histo, cxr only)")

    def annotate(self, req: AnnotationRequest) -> Completion:
        m = self._measure(req.modality, req.image_path)
        obj = _histo_answer(req.label, m) if req.modality == "histo" else _cxr_answer(req.label, m)
        return Completion(text=json.dumps({"label": req.label, **obj}), requests=0)

    def compare(self, req: PairRequest) -> Completion:
        """Choose the image whose measurements show ``req.target`` more strongly; deterministic.

        An image the measurer cannot read (no lung fields in a radiograph) shows no sign and loses,
        and the reason says so; when neither can be read the pair fails. Equal evidence (identical
        measurements) goes to the first image shown, and the reason says that too.
        """
        scores: dict[str, float] = {}
        unreadable: dict[str, str] = {}
        for letter, path in zip(req.letters, req.images):
            try:
                scores[letter] = class_evidence(req.modality, req.target, self._measure(req.modality, path))
            except ValueError as e:
                unreadable[letter] = str(e)
        if not scores:
            raise BackendError(
                f"offline backend: {req.pair_id}: no image could be measured ("
                + "; ".join(f"{L}: {e}" for L, e in unreadable.items())
                + ")"
            )
        best = max(scores.values())
        choice = next(L for L in req.letters if scores.get(L) == best)
        parts = [f"{L}: {req.target} evidence {scores[L]:.4f}" for L in req.letters if L in scores]
        parts += [f"{L}: not measurable ({e})" for L, e in unreadable.items()]
        if sum(v == best for v in scores.values()) > 1:
            parts.append("equal evidence: the first image shown is chosen")
        return Completion(text=json.dumps({"choice": choice, "reason": "; ".join(parts)}), requests=0)

    def chat(self, text: str, images: Any = (), system: str | None = None, **kw: Any) -> Completion:
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
