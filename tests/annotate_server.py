"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1 for the annotation tests and bench.

It answers POST /v1/chat/completions. A ``script(n, req)`` callable decides each reply: ``n`` is
the 0-based global request number, ``req`` a ``Seen`` record (label parsed from the instruction,
image hash, per-image request number, headers). The default script answers with a valid schema
JSON for the label. The server counts requests, tracks the most requests in flight at once and
can add a fixed latency per request.
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
    image: str | None  # sha1 of the image data URL
    per_image: int  # how many earlier requests carried the same image
    headers: dict
    body: dict


def default_script(n: int, req: Seen) -> tuple[int, dict, str]:
    return chat_reply(valid_answer(req.label))


@dataclass
class ScriptedServer:
    script: Callable[[int, Seen], tuple[int, dict, str]] = default_script
    latency_s: float = 0.0
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
        label, image = None, None
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
        with self._lock:
            n = len(self.seen)
            per = self._per_image[image]
            self._per_image[image] += 1
            req = Seen(n, time.monotonic(), label, image, per, headers, body)
            self.seen.append(req)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.latency_s:
                time.sleep(self.latency_s)
            reply = self.script(n, req)
        finally:
            with self._lock:
                self.in_flight -= 1
        with self._lock:
            self.replies.append((time.monotonic(), reply[0]))
        return reply

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
