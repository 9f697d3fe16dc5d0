"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1 for the annotation tests and bench.

It answers POST /v1/chat/completions. A ``script(n, req)`` callable decides each reply: ``n`` is
the 0-based global request number, ``req`` a ``Seen`` record (label parsed from the instruction,
image hashes, per-image request number, headers). The default script answers with a valid schema
JSON for the label. The server counts requests, tracks the most requests in flight at once and
can add a fixed latency per request.

Structured outputs, as OpenAI / vLLM handle ``response_format``:
- every ``response_format`` is checked: a ``json_schema`` one must carry a valid name, a schema that is
  a real JSON schema and, with ``strict``, keep to strict mode (every object closed with
  ``additionalProperties: false``, every property required, only supported keywords); a bad one is
  answered 400 "Invalid schema for response_format" before the script runs;
- ``supports`` says what the server accepts: ``json_schema`` (both types), ``json_object`` (a
  ``json_schema`` request gets a 400 naming response_format, like a server without schema support)
  or ``none`` (any response_format is refused);
- ``constrain=True`` emulates constrained decoding: the scripted answer of a ``json_schema`` request is
  replaced by the nearest answer the schema allows (``conform``), as a grammar-constrained sampler
  could only have produced such an answer.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

VALID = {
    "no_finding": {
        "view": "frontal",
        "cardiac_silhouette": "normal",
        "lung_fields": "clear",
        "costophrenic_angles": "sharp",
        "opacity_location": "none",
        "key_findings": ["sharp_hemidiaphragms", "fine_vascular_markings"],
        "description": "Dark clear lungs with fine vascular lines and sharp angles.",
    },
    "cardiomegaly": {
        "view": "frontal",
        "cardiac_silhouette": "enlarged",
        "lung_fields": "clear",
        "costophrenic_angles": "sharp",
        "opacity_location": "none",
        "key_findings": ["widened_heart_shadow"],
        "description": "Broad globular heart shadow over half the chest width.",
    },
    "pleural_effusion": {
        "view": "frontal",
        "cardiac_silhouette": "normal",
        "lung_fields": "basal_opacity",
        "costophrenic_angles": "blunted_right",
        "opacity_location": "right_lower",
        "key_findings": ["meniscus_sign"],
        "description": "Dense white band at the right base with a curved upper edge.",
    },
    "pneumonia": {
        "view": "frontal",
        "cardiac_silhouette": "normal",
        "lung_fields": "patchy_opacity",
        "costophrenic_angles": "sharp",
        "opacity_location": "left_upper",
        "key_findings": ["fluffy_ill_defined_opacity"],
        "description": "Fluffy cloud-like patch in the left upper lung.",
    },
}


def valid_answer(label: str, **changes) -> str:
    return json.dumps({"label": label, **VALID[label], **changes})


def chat_reply(content: str, prompt_tokens: int = 100, completion_tokens: int = 50) -> tuple[int, dict, str]:
    body = {
        "id": "x",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
    }
    return 200, {"Content-Type": "application/json"}, json.dumps(body)


@dataclass
class Seen:
    """One request as the server saw it."""

    n: int
    t: float  # monotonic arrival time
    label: str | None
    image: str | None  # sha1 of the (last) image data URL
    per_image: int  # how many earlier requests carried the same image
    headers: dict
    body: dict
    images: list[str] = field(default_factory=list)  # sha1 of every image data URL, in message order

    @property
    def response_format(self) -> dict | None:
        return self.body.get("response_format")


# keywords OpenAI's strict structured outputs accept (a subset of JSON Schema)
STRICT_KEYWORDS = {
    "type", "properties", "required", "additionalProperties", "enum", "const", "items", "minItems", "maxItems",
    "description", "title", "anyOf", "$defs", "$ref", "pattern", "format", "minimum", "maximum",
}  # fmt: skip


def strict_problem(schema: Any, path: str = "$") -> str | None:
    """Why ``schema`` breaks OpenAI's strict mode, or None."""
    if not isinstance(schema, dict):
        return f"{path}: not a schema object"
    unknown = sorted(set(schema) - STRICT_KEYWORDS)
    if unknown:
        return f"{path}: keyword {unknown[0]!r} is not supported in strict mode"
    if schema.get("type") == "object":
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is not False:
            return f"{path}: additionalProperties must be false"
        if sorted(schema.get("required", [])) != sorted(props):
            return f"{path}: every property must be required"
        for k, v in props.items():
            if problem := strict_problem(v, f"{path}.{k}"):
                return problem
    if schema.get("type") == "array" and (problem := strict_problem(schema.get("items"), f"{path}[]")):
        return problem
    return None


def response_format_problem(rf: Any) -> str | None:
    """Why a ``response_format`` is malformed, or None."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        return f"unknown response_format {rf!r}"
    if rf["type"] != "json_schema":
        return None
    js = rf.get("json_schema")
    if not isinstance(js, dict) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", str(js.get("name", ""))):
        return "json_schema.name must be 1-64 of a-z A-Z 0-9 _ -"
    try:
        Draft202012Validator.check_schema(js.get("schema"))
    except SchemaError as e:
        return f"json_schema.schema is not a JSON schema: {e.message}"
    if js.get("strict") is True:
        return strict_problem(js["schema"])
    return None


def conform(value: Any, schema: dict) -> Any:
    """The answer closest to ``value`` that ``schema`` allows: what a schema-constrained sampler could emit.

    Kept: every allowed value already there. Replaced: out-of-vocabulary values (by the first allowed),
    missing keys (filled), extra keys (dropped), too long or too short lists (cut / padded).
    """
    if "enum" in schema:
        return value if value in schema["enum"] else schema["enum"][0]
    kind = schema.get("type")
    if kind == "object":
        value = value if isinstance(value, dict) else {}
        return {k: conform(value.get(k), sub) for k, sub in schema.get("properties", {}).items()}
    if kind == "array":
        items = [conform(v, schema["items"]) for v in (value if isinstance(value, list) else [])]
        items = items[: schema.get("maxItems", len(items))]
        while len(items) < schema.get("minItems", 0):
            items.append(conform(None, schema["items"]))
        return items
    if kind == "boolean":
        return value if isinstance(value, bool) else False
    if kind == "string":
        return value if isinstance(value, str) else ""
    raise ValueError(f"conform: unsupported schema {schema}")


def _json_in(text: str) -> Any:
    start, end = text.find("{"), text.rfind("}")
    try:
        return json.loads(text[start : end + 1]) if 0 <= start < end else None
    except json.JSONDecodeError:
        return None


def error_reply(status: int, message: str, param: str | None = None) -> tuple[int, dict, str]:
    """An OpenAI-style error body (vLLM answers the same shape)."""
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
    return status, {"Content-Type": "application/json"}, json.dumps(body)


def default_script(n: int, req: Seen) -> tuple[int, dict, str]:
    return chat_reply(valid_answer(req.label))


@dataclass
class ScriptedServer:
    script: Callable[[int, Seen], tuple[int, dict, str]] = default_script
    latency_s: float = 0.0
    supports: str = "json_schema"  # response_format types accepted: json_schema (and json_object) | json_object | none
    constrain: bool = False  # emulate constrained decoding of json_schema requests (``conform``)
    seen: list[Seen] = field(default_factory=list)
    max_in_flight: int = 0
    in_flight: int = 0
    replies: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time, status) per reply

    def __post_init__(self):
        self._lock = threading.Lock()
        self._per_image: Counter = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # TCP_NODELAY, as real servers (uvicorn under vLLM) set it: with Nagle on, the body written after
            # the headers waits for the client's delayed ACK, ~40 ms per reply on a keep-alive connection
            disable_nagle_algorithm = True

            def log_message(self, *a):  # keep test output quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                body = json.loads(raw or b"{}")
                status, headers, text = server._handle(dict(self.headers), body)
                data = text.encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def _handle(self, headers: dict, body: dict) -> tuple[int, dict, str]:
        label, image, images = None, None, []
        for m in body.get("messages", []):
            content = m.get("content")
            texts = [content] if isinstance(content, str) else [c.get("text", "") for c in content or []]
            for t in texts:
                hit = re.search(r"\(label '([a-z_]+)'\)", t or "")
                label = hit.group(1) if hit else label
            if isinstance(content, list):
                for c in content:
                    if c.get("type") == "image_url":
                        image = hashlib.sha1(c["image_url"]["url"].encode()).hexdigest()
                        images.append(image)
        with self._lock:
            n = len(self.seen)
            per = self._per_image[image]
            self._per_image[image] += 1
            req = Seen(n, time.monotonic(), label, image, per, headers, body, images)
            self.seen.append(req)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            reply = self._structured(req) or self.script(n, req)
            rf = req.response_format
            if self.constrain and reply[0] == 200 and rf and rf["type"] == "json_schema":
                reply = self._constrained(reply, rf["json_schema"]["schema"])
            # latency_s is the time from receipt to reply: the server's own work (the schema check, ~2.5 ms of
            # Python) happens inside it, as a real server's request handling overlaps its model's generation time
            if self.latency_s:
                time.sleep(max(0.0, req.t + self.latency_s - time.monotonic()))
        finally:
            with self._lock:
                self.in_flight -= 1
        with self._lock:
            self.replies.append((time.monotonic(), reply[0]))
        return reply

    def _structured(self, req: Seen) -> tuple[int, dict, str] | None:
        """A 400 for a malformed or unsupported response_format, else None (the script answers)."""
        rf = req.response_format
        if rf is None:
            return None
        problem = response_format_problem(rf)
        if problem:
            return error_reply(400, f"Invalid schema for response_format: {problem}", "response_format")
        accepted = {"json_schema": ("json_schema", "json_object"), "json_object": ("json_object",), "none": ()}
        if rf["type"] != "text" and rf["type"] not in accepted[self.supports]:
            return error_reply(400, f"response_format type {rf['type']!r} is not supported", "response_format")
        return None

    @staticmethod
    def _constrained(reply: tuple[int, dict, str], schema: dict) -> tuple[int, dict, str]:
        body = json.loads(reply[2])
        raw = body["choices"][0]["message"]["content"]
        body["choices"][0]["message"]["content"] = json.dumps(conform(_json_in(raw), schema))
        return reply[0], reply[1], json.dumps(body)

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
