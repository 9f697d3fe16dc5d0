"""The annotate stage: one enriched prompt per image and one checklist per class (CRAFT section 3.1).

    main(cfg, dataset_dir, out_dir) -> summary
    out_dir/annotations.parquet   image_id, enriched_prompt, backend, model, prompt_version, status, error, ...
    out_dir/checklists.json       {class: [{attribute, description}, ... 5]}
    out_dir/summary.json          done / failed / skipped / requests / tokens / cost

Label conditioning (appendix B.0.1): the true label is stated in the instruction as given, and the
model is told to describe its visual signs in this image, never to diagnose. Schema enforcement
(B.0.2): the answer must validate against the modality's schema and its label's forbidden terms;
a bad answer is asked again up to ``max_attempts`` times and then recorded as ``failed`` with the
reason. A failed row never carries a prompt.

Resumable: results are committed every ``batch_size`` answers as small part files (atomic
writes) and merged into ``annotations.parquet`` at the end; a rerun skips images already ``ok``
with the same backend, model and prompt_version. A crash loses at most the answers in flight and
the ones not yet committed (fewer than ``batch_size``); an exception inside the run commits what
finished before it propagates.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from craft.annotate import checklists as ck
from craft.annotate.backends import (
    AnnotationRequest,
    BackendError,
    OfflineBackend,
    OpenAIBackend,
    Prices,
    ResponseSchema,
    TransformersBackend,
    Usage,
)
from craft.annotate.schema import (
    SCHEMAS,
    enriched_prompt,
    find_forbidden,
    forbidden_terms,
    parse_json_answer,
    validate_answer,
)
from craft.data.manifest import DatasetMeta, read_manifest, read_meta
from craft.io import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

ANNOTATIONS = "annotations.parquet"
CHECKLISTS = "checklists.json"
PARTS = "parts"
COLUMNS = (
    "image_id",
    "label",
    "enriched_prompt",
    "backend",
    "model",
    "prompt_version",
    "status",
    "error",
    "attempts",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "answer",
    "annotated_at",
)


@dataclass
class AnnotateConfig:
    """``craft annotate``: MLLM (or offline) enriched prompts and class checklists."""

    backend: Literal["openai", "transformers", "offline"] = "offline"  # who writes the descriptions
    model: str = ""  # openai: model name (gpt-4o); transformers: local model folder; offline: ignored
    base_url: str = "https://api.openai.com/v1"  # OpenAI-compatible server (vLLM: http://host:8000/v1)
    api_key_env: str = "OPENAI_API_KEY"  # NAME of the environment variable holding the key (never the key)
    concurrency: int = 8  # requests in flight at most (transformers runs one at a time)
    timeout_s: float = 60.0  # per HTTP request
    max_retries: int = 4  # transport retries per request (timeouts, 5xx, 429)
    backoff_base_s: float = 0.5  # first retry delay; doubles each retry, with jitter
    backoff_max_s: float = 30.0  # cap on one retry delay
    max_retry_after_s: float = 300.0  # a 429 asking to wait longer than this fails the request
    max_attempts: int = 3  # answers per image before it is recorded failed (schema / forbidden-term retries)
    batch_size: int = 8  # answers per committed part file (a crash loses fewer than this plus those in flight)
    prompt_version: str = "v1"  # bump when the instruction changes: rerun then redoes every image
    price_input_per_mtok: float = 0.0  # USD per million prompt tokens (cost line of the summary)
    price_output_per_mtok: float = 0.0  # USD per million completion tokens
    max_tokens: int = 400  # answer length limit
    temperature: float = 0.2  # openai sampling temperature (transformers decodes greedily)
    image_detail: Literal["low", "high", "auto"] = "low"  # openai image_url detail
    # openai: what response_format asks for. json_schema: the answer's JSON schema (closed vocabulary, the given
    # label) constrains decoding (OpenAI, vLLM); json_object: any JSON object, for servers without schema
    # support; none: no response_format. A server that refuses it stops the run naming this key.
    structured_output: Literal["json_schema", "json_object", "none"] = "json_schema"
    checklist: str = "auto"  # auto (bundled file named like the dataset) | bundled name | path.json | generate
    splits: list[str] = field(default_factory=list)  # annotate only these splits (empty = all)
    limit: int = 0  # annotate at most this many images (0 = all), for trials
    device: str = "cpu"  # transformers backend device
    dtype: str = "auto"  # transformers backend dtype: auto | float32 | bfloat16 | float16
    progress: bool = True  # tqdm progress bar
    max_cost_usd: float = 0.0  # no new answer is requested once the run's spend reaches this (0 = no cap)
    commit_every_s: float = 30.0  # also commit a partial batch this often, so slow servers lose little on a crash
    compact_every_parts: int = 256  # merge part files into annotations.parquet after this many commits

    def validate(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.max_attempts < 1 or self.max_retries < 0 or self.batch_size < 1:
            raise ValueError("max_attempts and batch_size must be >= 1, max_retries >= 0")
        if self.max_cost_usd < 0 or self.commit_every_s <= 0 or self.compact_every_parts < 1:
            raise ValueError("max_cost_usd must be >= 0, commit_every_s > 0, compact_every_parts >= 1")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        if self.backend in ("openai", "transformers") and not self.model:
            raise ValueError(f"model is required for backend {self.backend!r}")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.prompt_version):
            raise ValueError(f"prompt_version {self.prompt_version!r}: letters, digits, . _ - only")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            raise ValueError("api_key_env is the NAME of an environment variable, not a key")


def make_backend(cfg: AnnotateConfig, setting: str = "annotate.structured_output"):
    """The backend the config names; ``setting`` is the config key a refused response_format error names."""
    if cfg.backend == "openai":
        return OpenAIBackend(
            model=cfg.model,
            base_url=cfg.base_url,
            api_key_env=cfg.api_key_env,
            concurrency=cfg.concurrency,
            timeout_s=cfg.timeout_s,
            max_retries=cfg.max_retries,
            backoff_base_s=cfg.backoff_base_s,
            backoff_max_s=cfg.backoff_max_s,
            max_retry_after_s=cfg.max_retry_after_s,
            max_tokens=cfg.max_tokens,
            temperature=cfg.temperature,
            image_detail=cfg.image_detail,
            structured_output=cfg.structured_output,
            setting=setting,
        )
    if cfg.backend == "transformers":
        return TransformersBackend(cfg.model, max_new_tokens=cfg.max_tokens, device=cfg.device, dtype=cfg.dtype)
    return OfflineBackend()


def backend_model(cfg: AnnotateConfig) -> str:
    """The model identity recorded per row (part of the resume key)."""
    return OfflineBackend.model if cfg.backend == "offline" else cfg.model


# ----------------------------------------------------------------------------- instruction (B.0.1)
def _readable(term: str) -> str:
    t = term.replace(r"[\s_-]", " ").replace(r"\s+", " ").replace(r"\w*", "*").replace("\\", "")
    return re.sub(r"\(\?:([^)]*)\)", lambda m: m.group(1).split("|")[0], t).replace("s?", "s")


def instruction(meta: DatasetMeta, label: str) -> tuple[str, str]:
    """System and user text for one image: the label is a given fact, the answer a schema JSON."""
    schema = SCHEMAS[meta.modality]
    phrase = meta.phrase(label)
    banned = forbidden_terms(meta.modality, label, meta.classes)
    system = (
        "You describe medical images for training an image generator. The diagnosis of the image is KNOWN "
        f"and given to you as ground truth: {phrase} (label {label!r}). Do not diagnose, doubt or change it, "
        "and do not name any other diagnosis. Describe only the visual signs of the given label that are "
        "visible in THIS image: morphology, colour or density, texture, borders, location and extent. "
        "Answer with one JSON object and nothing else, with exactly these keys:\n"
        + json.dumps(schema.json_template(label, banned), indent=1)
        + "\nCategorical fields take only the listed values."
    )
    if banned:
        system += " Never use these words, not even negated: " + ", ".join(_readable(t) for t in banned) + "."
    user = f"Describe the visible signs of {phrase} in this {meta.modality} image as the JSON object."
    return system, user


def response_schema(meta: DatasetMeta, label: str) -> ResponseSchema:
    """The answer's JSON schema for one image (structured output): the same values the instruction offers."""
    banned = forbidden_terms(meta.modality, label, meta.classes)
    return ResponseSchema(f"{meta.modality}_annotation", SCHEMAS[meta.modality].json_schema(label, banned))


# ----------------------------------------------------------------------------- state (resume)
def _parts_dir(out_dir: Path) -> Path:
    return out_dir / PARTS


def load_state(out_dir: str | os.PathLike, known: dict[Path, pd.DataFrame] | None = None) -> pd.DataFrame:
    """The latest row per image from annotations.parquet and any committed parts (later parts win).

    ``known`` maps part files this process committed to the frames it wrote: those are not read back
    (the end-of-run merge re-read every part, ~2 ms each, after the last reply)."""
    out_dir, known = Path(out_dir), known or {}
    frames = []
    if (out_dir / ANNOTATIONS).is_file():
        frames.append(pd.read_parquet(out_dir / ANNOTATIONS))
    parts = sorted(_parts_dir(out_dir).glob("part-*.parquet")) if _parts_dir(out_dir).is_dir() else []
    frames += [known[p] if p in known else pd.read_parquet(p) for p in parts]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in COLUMNS})
    df = pd.concat(frames, ignore_index=True)
    missing = [c for c in ("image_id", "status", "backend", "model", "prompt_version") if c not in df.columns]
    if missing:
        raise ValueError(f"{out_dir}: existing annotations lack column {missing[0]!r}")
    return df.drop_duplicates("image_id", keep="last").reset_index(drop=True)


def _to_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    for c in ("attempts", "requests", "prompt_tokens", "completion_tokens"):
        df[c] = df[c].astype("int64")
    for c in set(COLUMNS) - {"attempts", "requests", "prompt_tokens", "completion_tokens"}:
        df[c] = df[c].astype("string")
    return df


def _parquet_bytes(df: pd.DataFrame) -> bytes:
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def commit_part(out_dir: Path, rows: list[dict[str, Any]], known: dict[Path, pd.DataFrame] | None = None) -> Path:
    """Write one batch of results as a new part file, atomically; names sort in commit order.

    With ``known``, the frame is also kept there under its path, for ``compact`` to use unread."""
    name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:6]}.parquet"
    frame = _to_frame(rows)
    path = atomic_write_bytes(_parts_dir(out_dir) / name, _parquet_bytes(frame))
    if known is not None:
        known[Path(path)] = frame
    return path


def compact(out_dir: Path, order: list[str], known: dict[Path, pd.DataFrame] | None = None) -> pd.DataFrame:
    """Merge parts into annotations.parquet (manifest order first) atomically, then drop the parts.

    ``known``: the frames of parts this process committed (see ``load_state``); emptied with the parts."""
    state = load_state(out_dir, known)
    rank = {k: i for i, k in enumerate(order)}
    state["_r"] = state["image_id"].map(lambda k: rank.get(k, len(rank)))
    state = state.sort_values(["_r", "image_id"], kind="stable").drop(columns="_r").reset_index(drop=True)
    atomic_write_bytes(out_dir / ANNOTATIONS, _parquet_bytes(state))
    for p in sorted(_parts_dir(out_dir).glob("part-*.parquet")) if _parts_dir(out_dir).is_dir() else []:
        p.unlink()
    if known is not None:
        known.clear()
    return state


# ----------------------------------------------------------------------------- one image
class BudgetExhausted(RuntimeError):
    """The run's spend reached ``max_cost_usd``; this image was not started."""


def annotate_one(
    backend,
    meta: DatasetMeta,
    row: dict[str, Any],
    dataset_dir: Path,
    cfg: AnnotateConfig,
    usage: Usage,
    spent=lambda: 0.0,
):
    """Ask for one image's description until it validates or ``max_attempts`` answers were refused.

    Raises BudgetExhausted before the first request when ``spent()`` has reached ``cfg.max_cost_usd``.
    """
    if cfg.max_cost_usd and spent() >= cfg.max_cost_usd:
        raise BudgetExhausted(f"spend reached max_cost_usd={cfg.max_cost_usd}")
    label = str(row["label"])
    system, user = instruction(meta, label)
    schema = response_schema(meta, label)
    out = {
        "image_id": str(row["image_id"]),
        "label": label,
        "enriched_prompt": None,
        "backend": cfg.backend,
        "model": backend_model(cfg),
        "prompt_version": cfg.prompt_version,
        "status": "failed",
        "error": None,
        "attempts": 0,
        "requests": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "answer": None,
        "annotated_at": None,
    }
    image_path = dataset_dir / str(row["image_path"])
    reason = "no attempt made"
    for attempt in range(1, cfg.max_attempts + 1):
        out["attempts"] = attempt
        req = AnnotationRequest(
            image_path, meta.modality, label, meta.phrase(label), tuple(meta.classes), system, user, attempt, schema
        )
        try:
            c = backend.annotate(req)
        except BackendError as e:
            reason = f"backend: {e}"
            break  # transport retries are already spent inside the backend
        except (OSError, ValueError) as e:  # unreadable image, measurement failure
            reason = f"{image_path}: {type(e).__name__}: {e}"
            break
        usage.add(c)
        out["requests"] += c.requests
        out["prompt_tokens"] += c.prompt_tokens
        out["completion_tokens"] += c.completion_tokens
        try:
            obj = parse_json_answer(c.text)
        except ValueError as e:
            reason = str(e)
            log.info("%s: answer %d refused: %s", out["image_id"], attempt, reason)
            continue
        reason = validate_answer(obj, meta.modality, label, meta.classes)
        if reason is None:
            prompt = enriched_prompt(obj, meta.modality, meta.phrase(label))
            hit = find_forbidden({"prompt": prompt}, forbidden_terms(meta.modality, label, meta.classes))
            if hit is None:
                out.update(status="ok", enriched_prompt=prompt, answer=json.dumps(obj, sort_keys=True), error=None)
                break
            reason = f"forbidden term {hit[0]!r} in the assembled prompt"
        log.info("%s: answer %d refused: %s", out["image_id"], attempt, reason)
    if out["status"] != "ok":
        out["error"] = f"after {out['attempts']} answer(s): {reason}"
    out["annotated_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    return out


# ----------------------------------------------------------------------------- checklists
def resolve_checklist(cfg: AnnotateConfig, meta: DatasetMeta, out_dir: Path, backend=None) -> dict:
    """The class checklists for this dataset: bundled, from a file, or generated by the backend."""
    src = cfg.checklist
    if src == "auto":
        if meta.name not in ck.SHIPPED:
            raise ValueError(
                f"no bundled checklist named like dataset {meta.name!r} (bundled: {', '.join(ck.SHIPPED)}); "
                "set checklist=<bundled name>, checklist=<path.json> or checklist=generate"
            )
        src = meta.name
    if src == "generate":
        existing = out_dir / CHECKLISTS
        if existing.is_file():  # generated by an earlier run: do not pay for it twice
            try:
                return ck.load_checklist(existing, meta.classes, meta.modality)
            except ValueError as e:
                log.warning("%s unusable (%s); generating a new checklist", existing, e)
        if backend is None:
            backend = make_backend(cfg)
        return ck.generate_checklist(
            backend, meta.name, meta.modality, list(meta.classes), meta.class_names, cfg.max_attempts
        )
    return ck.load_checklist(src, meta.classes, meta.modality)


# ----------------------------------------------------------------------------- the stage
def main(cfg: AnnotateConfig, dataset_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Annotate a dataset directory into ``out_dir``; returns (and prints) the summary."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    meta = read_meta(dataset_dir)
    if meta.modality not in SCHEMAS:
        raise ValueError(f"{dataset_dir}: modality {meta.modality!r} has no annotation schema ({', '.join(SCHEMAS)})")
    df = read_manifest(dataset_dir)
    if cfg.splits:
        df = df[df["split"].isin(cfg.splits)]
    if cfg.limit:
        df = df.head(cfg.limit)
    unknown = sorted(set(df["label"]) - set(meta.classes))
    if unknown:
        raise ValueError(f"{dataset_dir}/manifest.parquet: label {unknown[0]!r} is not in dataset.yaml classes")
    out_dir.mkdir(parents=True, exist_ok=True)

    backend = make_backend(cfg)
    try:
        checklist = resolve_checklist(cfg, meta, out_dir, backend)
        atomic_write_json(out_dir / CHECKLISTS, checklist)

        state = load_state(out_dir)
        done_ok = state[
            (state["status"] == "ok")
            & (state["backend"] == cfg.backend)
            & (state["model"] == backend_model(cfg))
            & (state["prompt_version"] == cfg.prompt_version)
        ]
        ok_ids = set(done_ok["image_id"].astype(str))
        rows = df.to_dict("records")
        todo = [r for r in rows if str(r["image_id"]) not in ok_ids]
        skipped = len(rows) - len(todo)
        usage = Usage()
        prices = Prices(cfg.price_input_per_mtok, cfg.price_output_per_mtok)
        n_ok = n_failed = n_unstarted = 0
        buffer: list[dict[str, Any]] = []
        order = [str(r["image_id"]) for r in rows]
        last_commit, parts_since_compact = time.monotonic(), 0
        mine: dict[Path, pd.DataFrame] = {}  # parts this run committed, kept for the merge

        def spent() -> float:
            return prices.cost(usage.prompt_tokens, usage.completion_tokens)

        workers = 1 if cfg.backend == "transformers" else cfg.concurrency
        bar = tqdm(total=len(todo), desc=f"annotate {meta.name}", unit="img", disable=not cfg.progress)
        pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="annotate")
        try:
            futures = [pool.submit(annotate_one, backend, meta, r, dataset_dir, cfg, usage, spent) for r in todo]
            for fut in cf.as_completed(futures):
                try:
                    res = fut.result()
                except BudgetExhausted:
                    n_unstarted += 1  # left for a later run; answers already paid for are still collected
                    bar.update(1)
                    continue
                buffer.append(res)
                n_ok += res["status"] == "ok"
                n_failed += res["status"] != "ok"
                bar.update(1)
                bar.set_postfix(ok=n_ok, failed=n_failed)
                if len(buffer) >= cfg.batch_size or time.monotonic() - last_commit >= cfg.commit_every_s:
                    commit_part(out_dir, buffer, mine)
                    buffer, last_commit, parts_since_compact = [], time.monotonic(), parts_since_compact + 1
                    if parts_since_compact >= cfg.compact_every_parts:
                        compact(out_dir, order, mine)
                        parts_since_compact = 0
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if buffer:  # commit whatever finished, even when the run is being torn down
                commit_part(out_dir, buffer, mine)
            bar.close()
        final = compact(out_dir, order, mine)
    finally:
        backend.close()

    elapsed = time.perf_counter() - t0
    current = final[final["image_id"].isin([str(r["image_id"]) for r in rows])]
    summary = {
        "dataset": meta.name,
        "backend": cfg.backend,
        "model": backend_model(cfg),
        "prompt_version": cfg.prompt_version,
        "structured_output": cfg.structured_output if cfg.backend == "openai" else "none",  # only openai constrains
        "images": len(rows),
        "done": n_ok,
        "failed": n_failed,
        "skipped": skipped,
        "not_started_budget": n_unstarted,
        "ok_total": int((current["status"] == "ok").sum()),
        "requests": usage.requests,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cost_usd": round(prices.cost(usage.prompt_tokens, usage.completion_tokens), 6),
        "elapsed_s": round(elapsed, 3),
        "classes_with_checklist": len(checklist),
    }
    atomic_write_json(out_dir / "summary.json", summary)
    if n_unstarted:
        print(f"annotate {meta.name}: max_cost_usd={cfg.max_cost_usd} reached; {n_unstarted} image(s) not started")
    print(
        f"annotate {meta.name}: done {n_ok}, failed {n_failed}, skipped {skipped} "
        f"({summary['ok_total']}/{len(rows)} ok); requests {usage.requests}, "
        f"tokens {usage.prompt_tokens}+{usage.completion_tokens}, cost ${summary['cost_usd']:.4f}, {elapsed:.1f} s"
    )
    if n_failed:
        for _, r in final[(final["status"] != "ok")].head(5).iterrows():
            print(f"  failed {r['image_id']}: {r['error']}")
    return summary


def write_checklists(cfg: AnnotateConfig, dataset_dir: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Generate (or load) the class checklists for a dataset and write them to ``out`` (a JSON file)."""
    meta = read_meta(dataset_dir)
    if cfg.checklist == "generate" and cfg.backend == "offline":
        raise ValueError("the offline backend cannot generate checklists: use --backend openai or transformers")
    backend = make_backend(cfg)
    try:
        result = resolve_checklist(cfg, meta, Path(out).parent, backend)
    finally:
        backend.close()
    atomic_write_json(out, result)
    return result


def annotate_step(dataset_dir: str | Path, out_dir: str | Path, profile: str | None, overrides: list[str]) -> dict:
    """Pipeline entry point: load the ``annotate`` config from profile + overrides, run, return numeric metrics."""
    from craft.config import load_stage_config

    cfg = load_stage_config("annotate", profile, overrides)
    cfg.progress = False  # no progress bar in pipeline logs
    summary = main(cfg, dataset_dir, out_dir)
    keys = ("images", "done", "failed", "skipped", "ok_total", "requests", "cost_usd", "elapsed_s")
    return {k: float(summary[k]) for k in keys}


def with_enriched_prompts(dataset_dir, annotations_dir, split: str) -> tuple[DatasetMeta, pd.DataFrame, Path]:
    """(meta, the manifest rows of ``split`` joined with their ok enriched prompt, annotations path).

    Rows without an ok prompt keep a null ``enriched_prompt``: callers decide whether that is an
    error (evaluation protocol) or a row to skip (training).
    """
    meta = read_meta(dataset_dir)
    df = read_manifest(dataset_dir)
    rows = df[df["split"] == split].reset_index(drop=True)
    if rows.empty:
        raise ValueError(f"{dataset_dir}/manifest.parquet: no rows with split={split!r}")
    ann_path = Path(annotations_dir) / "annotations.parquet"
    if not ann_path.is_file():
        raise FileNotFoundError(f"{ann_path}: missing (run craft annotate first)")
    ann = pd.read_parquet(ann_path)
    for col in ("image_id", "enriched_prompt", "status"):
        if col not in ann.columns:
            raise ValueError(f"{ann_path}: no column {col!r}")
    ok = ann[(ann["status"] == "ok") & ann["enriched_prompt"].notna()][["image_id", "enriched_prompt"]]
    return meta, rows.merge(ok.drop_duplicates("image_id"), on="image_id", how="left"), ann_path
