"""``craft validate DATASET_DIR``: refuse a dataset directory that breaks the contract (issue 2, item 6).

Two layers of checks, both always run, every failure kept (nothing stops at the first one):

1. Table checks with great-expectations 1.x on the manifest (an ephemeral context, a pandas data
   source, one ``ExpectationSuite``): required columns exist, ``image_id`` not null and unique,
   ``label`` in the declared class set, ``split`` in {train, val, test}, ``patient_id`` not null,
   ``image_path`` not null and a safe relative path. Each failed expectation is mapped back to its
   rows through ``unexpected_index_list`` (result format COMPLETE), so every failure names the row
   number, the image id and the file.
2. File and cross-row checks in plain Python: a path that escapes the dataset root once symlinks are
   resolved; every referenced file exists (``image_path``, ``mask_path``, ``condition_path``); each
   image's header gives a size within bounds and a pixel count under ``max_pixels`` BEFORE any
   decoding (decompression bombs are refused from the header; PIL's own ``DecompressionBombError``
   is caught too); the image decodes fully (``Image.load()``; a truncated PNG fails because
   ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never switched on); its mode is the declared ``mode``;
   the same file content (sha256 of the bytes) in train and test; a patient in two splits; too few
   images of a class.

A dataset is valid only when every check passed: ``report.ok`` is False on any failure, and
``craft validate`` then exits non-zero. ``main`` writes ``report.json`` and ``report.html``.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import logging
import os
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image, ImageFile

from craft.data.manifest import COLUMNS, MANIFEST, REQUIRED_COLUMNS, SPLITS, DatasetMeta, read_manifest, read_meta
from craft.io import atomic_write_json, atomic_write_text, sha256_file

log = logging.getLogger(__name__)

# A manifest path: relative (no leading "/" or drive letter), forward slashes only, no "." or ".."
# component, no empty component. Checked by great-expectations on the table and again per file.
SAFE_PATH_REGEX = r"^(?![A-Za-z]:)(?!/)(?!.*(?:^|/)\.{1,2}(?:/|$))(?!.*//)[^\\\x00]+$"
_SAFE_PATH = re.compile(SAFE_PATH_REGEX)
FILE_COLUMNS = ("image_path", "mask_path", "condition_path")
MODES = ("RGB", "L")


@dataclass
class ValidateConfig:
    """What ``craft validate`` accepts."""

    min_per_class: int = 2  # every declared class needs at least this many images in the train split
    min_per_class_test: int = 1  # ... and this many in the test split (only when require_test_split)
    max_pixels: int = 50_000_000  # decompression-bomb guard: width*height from the header, checked before decoding
    min_side: int = 8  # smallest allowed image width / height in pixels
    max_side: int = 8192  # largest allowed image width / height in pixels
    check_decode: bool = True  # decode every image (and mask / condition) fully; False checks headers only
    check_mode: bool = True  # each image's PIL mode must equal dataset.yaml `mode`
    require_test_split: bool = True  # a dataset without test rows is invalid (evaluation needs them)
    max_failures_logged: int = 200  # failures beyond this are kept in the report but not logged one by one

    def validate(self) -> None:
        if self.min_per_class < 0 or self.min_per_class_test < 0:
            raise ValueError("validate.min_per_class / min_per_class_test must be >= 0")
        if self.max_pixels <= 0:
            raise ValueError("validate.max_pixels must be > 0")
        if not 1 <= self.min_side <= self.max_side:
            raise ValueError("validate.min_side must be >= 1 and <= max_side")


@dataclass
class Failure:
    """One failed check, naming what failed: the manifest row (0-based), image id and file when known."""

    check: str
    message: str
    row: int | None = None
    image_id: str | None = None
    file: str | None = None


@dataclass
class ValidationReport:
    """The outcome of ``validate``; ``ok`` is True only when no check failed."""

    ok: bool
    dataset: str
    n_rows: int
    failures: list[Failure]
    stats: dict[str, Any]
    manifest_sha256: str
    checks: dict[str, int] = field(default_factory=dict)  # check name -> number of failures (0 = passed)
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Every check this module runs, in report order, with what it means.
CHECKS: dict[str, str] = {
    "dataset_yaml": "dataset.yaml parses and declares name, modality, classes, mode",
    "manifest": "manifest.parquet reads and has the required columns",
    "schema": "contract columns hold strings",
    "gx.columns_exist": "required columns exist (great-expectations)",
    "gx.image_id_not_null": "image_id is set (great-expectations)",
    "gx.image_id_unique": "image_id is unique (great-expectations)",
    "gx.label_in_classes": "label is one of the declared classes (great-expectations)",
    "gx.split_in_set": "split is train, val or test (great-expectations)",
    "gx.patient_id_not_null": "patient_id is set (great-expectations)",
    "gx.image_path_not_null": "image_path is set (great-expectations)",
    "gx.image_path_safe": "image_path is a safe relative path (great-expectations)",
    "path_escape": "no path escapes the dataset root (symlinks resolved)",
    "file_exists": "every referenced file exists",
    "image_size": "image size within bounds (from the header, before decoding)",
    "decompression_bomb": "no image over max_pixels (refused from the header)",
    "decode": "every image decodes fully",
    "mode": "image mode equals dataset.yaml mode",
    "duplicate_id": "no duplicate image_id",
    "train_test_duplicate": "no identical image content in both train and test",
    "patient_leak": "no patient in two splits",
    "min_per_class": "enough images per class",
    "test_split": "a test split exists",
}


@functools.lru_cache(maxsize=1)
def _gx_batch_definition() -> Any:
    """One ephemeral great-expectations context per process (building it costs ~1 s; importing gx ~3 s)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = ctx.data_sources.add_pandas("craft_manifest").add_dataframe_asset("manifest")
    return asset.add_batch_definition_whole_dataframe("whole_manifest")


def _gx_checks(df: pd.DataFrame, meta: DatasetMeta) -> list[Failure]:
    """Run the expectation suite on the manifest; one Failure per failing row (or per missing column)."""
    batch_definition = _gx_batch_definition()  # the context must exist before a suite is built
    import great_expectations as gx
    import great_expectations.expectations as gxe

    suite = gx.ExpectationSuite(name="craft_manifest")
    names: dict[tuple[str, str], str] = {}  # (expectation type, column) -> our check name

    def add(name: str, exp: Any) -> None:
        suite.add_expectation(exp)
        names[(exp.expectation_type, exp.column)] = name

    present = set(df.columns)
    for col in REQUIRED_COLUMNS:
        add("gx.columns_exist", gxe.ExpectColumnToExist(column=col))
    if "image_id" in present:
        add("gx.image_id_not_null", gxe.ExpectColumnValuesToNotBeNull(column="image_id"))
        add("gx.image_id_unique", gxe.ExpectColumnValuesToBeUnique(column="image_id"))
    if "label" in present:
        add("gx.label_in_classes", gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(meta.classes)))
    if "split" in present:
        add("gx.split_in_set", gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)))
    if "patient_id" in present:
        add("gx.patient_id_not_null", gxe.ExpectColumnValuesToNotBeNull(column="patient_id"))
    if "image_path" in present:
        add("gx.image_path_not_null", gxe.ExpectColumnValuesToNotBeNull(column="image_path"))
        add("gx.image_path_safe", gxe.ExpectColumnValuesToMatchRegex(column="image_path", regex=SAFE_PATH_REGEX))

    # GX works on a plain object-typed copy with a 0..n-1 index, so index values are manifest row numbers.
    table = df.reset_index(drop=True).astype(object).where(df.reset_index(drop=True).notna(), None)
    batch = batch_definition.get_batch(batch_parameters={"dataframe": table})
    result = batch.validate(suite, result_format={"result_format": "COMPLETE"})

    failures: list[Failure] = []
    for r in result.results:
        if r.success:
            continue
        cfg = r.expectation_config
        col = cfg.kwargs.get("column")
        name = names.get((cfg.type, col), cfg.type)
        exc = r.exception_info or {}
        raised = exc.get("raised_exception") if isinstance(exc, dict) else False
        if name == "gx.columns_exist":
            failures.append(Failure(name, f"manifest: required column {col!r} is missing"))
            continue
        idx = (r.result or {}).get("unexpected_index_list")
        if raised or idx is None:
            msg = exc.get("exception_message") if isinstance(exc, dict) else None
            failures.append(Failure(name, f"{cfg.type} on column {col!r} failed: {msg or r.result}"))
            continue
        for i in idx:
            i = int(i)
            value = table.at[i, col]
            failures.append(
                Failure(
                    name,
                    f"row {i}: {col} = {value!r} fails {CHECKS.get(name, name)}"
                    + (f" (declared: {', '.join(meta.classes)})" if name == "gx.label_in_classes" else ""),
                    row=i,
                    image_id=_s(table.at[i, "image_id"]) if "image_id" in table.columns else None,
                    file=_s(table.at[i, "image_path"]) if "image_path" in table.columns else None,
                )
            )
    return failures


def _s(v: Any) -> str | None:
    return None if v is None or (isinstance(v, float) and pd.isna(v)) or v is pd.NA else str(v)


def _inside(root: Path, rel: str) -> tuple[Path | None, str | None]:
    """Resolve ``rel`` under ``root``; (path, None) when safe, (None, reason) when it escapes."""
    if not _SAFE_PATH.match(rel):
        return None, "not a safe relative path (absolute, '..' or '.' component, backslash or empty component)"
    resolved = (root / rel).resolve()
    if resolved != root and root not in resolved.parents:
        return None, f"resolves to {resolved}, outside the dataset root {root}"
    return resolved, None


def _png_header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk (the first 24 bytes), or None when the file is not a PNG.

    Read by hand so that the size bound is ours for any size: PIL's ``Image.open`` itself raises on
    images over 2 * ``Image.MAX_IMAGE_PIXELS`` and would hide the actual dimensions.
    """
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _check_image(path: Path, cfg: ValidateConfig, want_mode: str | None) -> tuple[list[tuple[str, str]], tuple | None]:
    """Header checks, then a full decode. Returns ([(check, message)], (width, height, mode) or None)."""
    problems: list[tuple[str, str]] = []
    size = _png_header_size(path)
    if size is not None and size[0] * size[1] > cfg.max_pixels:
        w, h = size
        problems.append(("decompression_bomb", f"{w}x{h} = {w * h} pixels > max_pixels {cfg.max_pixels}; not decoded"))
        return problems, (w, h, "")
    try:
        with warnings.catch_warnings():
            # Our own bound below decides; PIL's warning tier would only duplicate it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # reads the header only
                w, h = im.size
                mode = im.mode
                if w * h > cfg.max_pixels:
                    problems.append(
                        ("decompression_bomb", f"{w}x{h} = {w * h} pixels > max_pixels {cfg.max_pixels}; not decoded")
                    )
                    return problems, (w, h, mode)
                if not (cfg.min_side <= w <= cfg.max_side and cfg.min_side <= h <= cfg.max_side):
                    problems.append(("image_size", f"{w}x{h} outside [{cfg.min_side}, {cfg.max_side}] per side"))
                if want_mode is not None and mode != want_mode:
                    problems.append(("mode", f"mode {mode} but dataset.yaml declares {want_mode}"))
                if cfg.check_decode:
                    im.load()  # full decode; validate() holds LOAD_TRUNCATED_IMAGES at False meanwhile
                return problems, (w, h, mode)
    except Image.DecompressionBombError as e:
        problems.append(("decompression_bomb", f"refused by PIL before decoding: {e}"))
    except Exception as e:  # noqa: BLE001 - any decoder error means the file is not a usable image
        problems.append(("decode", f"does not decode: {type(e).__name__}: {e}"))
    return problems, None


def validate(dataset_dir: str | os.PathLike, cfg: ValidateConfig | None = None) -> ValidationReport:
    """Check a dataset directory against the contract; never raises on bad data, reports it instead."""
    cfg = cfg or ValidateConfig()
    cfg.validate()
    # A truncated image must fail to decode, whatever another module set globally.
    truncated, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        return _validate(Path(dataset_dir).resolve(), cfg)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated


def _validate(root: Path, cfg: ValidateConfig) -> ValidationReport:
    failures: list[Failure] = []
    stats: dict[str, Any] = {}
    manifest_sha = ""

    try:
        meta = read_meta(root)
        if not meta.classes or len(set(meta.classes)) != len(meta.classes):
            failures.append(Failure("dataset_yaml", f"{root}/dataset.yaml: classes must be a non-empty unique list"))
        if meta.mode not in MODES:
            failures.append(Failure("dataset_yaml", f"{root}/dataset.yaml: mode {meta.mode!r} not one of {MODES}"))
    except Exception as e:  # noqa: BLE001 - reported, not raised
        meta = None
        failures.append(Failure("dataset_yaml", f"{type(e).__name__}: {e}", file="dataset.yaml"))

    df = None
    if (root / MANIFEST).is_file():
        manifest_sha = sha256_file(root / MANIFEST)
        try:
            df = pd.read_parquet(root / MANIFEST).reset_index(drop=True)
        except Exception as e:  # noqa: BLE001
            failures.append(Failure("manifest", f"{root / MANIFEST}: unreadable: {e}", file=MANIFEST))
    else:
        failures.append(Failure("manifest", f"{root / MANIFEST}: missing", file=MANIFEST))

    if df is not None and meta is not None:
        for col in df.columns:
            if col in COLUMNS and not (pd.api.types.is_string_dtype(df[col]) or df[col].isna().all()):
                failures.append(
                    Failure("schema", f"manifest column {col!r} has dtype {df[col].dtype}, expected strings")
                )
        failures += _gx_checks(df, meta)
        if all(c in df.columns for c in REQUIRED_COLUMNS):
            # Fill optional columns with nulls for the file checks (the GX run saw the raw table).
            df = read_manifest(root)
            failures += _row_checks(root, df, meta, cfg, stats)

    counts = {name: 0 for name in CHECKS}
    for f in failures:
        counts[f.check] = counts.get(f.check, 0) + 1
    report = ValidationReport(
        ok=not failures,
        dataset=meta.name if meta is not None else root.name,
        n_rows=0 if df is None else len(df),
        failures=failures,
        stats=stats,
        manifest_sha256=manifest_sha,
        checks=counts,
        config=dataclasses.asdict(cfg),
    )
    return report


def _row_checks(
    root: Path, df: pd.DataFrame, meta: DatasetMeta, cfg: ValidateConfig, stats: dict[str, Any]
) -> list[Failure]:
    failures: list[Failure] = []
    ids = df["image_id"].astype(object).where(df["image_id"].notna(), None)

    def fail(check: str, msg: str, i: int | None = None, file: str | None = None) -> None:
        failures.append(Failure(check, msg, row=i, image_id=None if i is None else _s(ids.iat[i]), file=file))

    # Duplicate ids, named in full (GX flags them too; this check names the first row of each id).
    first: dict[str, int] = {}
    for i, v in enumerate(ids):
        if v is None:
            continue
        if v in first:
            fail(
                "duplicate_id",
                f"row {i}: image_id {v!r} already used by row {first[v]}",
                i,
                _s(df.at[i, "image_path"]),
            )
        else:
            first[v] = i

    digests: dict[int, str] = {}
    sizes: list[tuple[int, int]] = []
    for i, row in df.iterrows():
        i = int(i)
        for col in FILE_COLUMNS:
            rel = _s(row[col])
            if rel is None:
                continue
            path, why = _inside(root, rel)
            if path is None:
                fail("path_escape", f"row {i}: {col} {rel!r} {why}", i, rel)
                continue
            if not path.is_file():
                fail("file_exists", f"row {i}: {col} {rel!r} does not exist (looked for {path})", i, rel)
                continue
            want = meta.mode if (col == "image_path" and cfg.check_mode) else None
            problems, info = _check_image(path, cfg, want)
            for check, msg in problems:
                fail(check, f"row {i}: {col} {rel!r}: {msg}", i, rel)
            if col == "image_path":
                if info is not None:
                    sizes.append(info[:2])
                digests[i] = sha256_file(path)

    split = df["split"].astype(object)
    label = df["label"].astype(object)
    patient = df["patient_id"].astype(object)

    # Same image bytes in train and test: the test score would be measured on training data.
    train_hashes: dict[str, int] = {}
    for i, d in digests.items():
        if split.iat[i] == "train":
            train_hashes.setdefault(d, i)
    for i, d in digests.items():
        if split.iat[i] == "test" and d in train_hashes:
            j = train_hashes[d]
            fail(
                "train_test_duplicate",
                f"row {i} (test, {df.at[i, 'image_path']}) has the same bytes (sha256 {d[:12]}) as row {j} "
                f"(train, {df.at[j, 'image_path']}, image_id {ids.iat[j]!r})",
                i,
                _s(df.at[i, "image_path"]),
            )

    # A patient in two splits (patient-level split required: images of one patient are correlated).
    rows_of: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(patient):
        if p is not None and not pd.isna(p) and split.iat[i] in SPLITS:
            rows_of[str(p)].append(i)
    for p, rows in rows_of.items():
        splits = sorted({split.iat[i] for i in rows})
        if len(splits) > 1:
            detail = "; ".join(f"row {i} ({split.iat[i]}, {ids.iat[i]})" for i in rows[:10])
            more = f" and {len(rows) - 10} more" if len(rows) > 10 else ""
            fail("patient_leak", f"patient {p!r} is in splits {', '.join(splits)}: {detail}{more}", rows[0])

    # Images per class and split.
    per: dict[str, dict[str, int]] = {s: {c: 0 for c in meta.classes} for s in SPLITS}
    for s, c in zip(split, label):
        if s in per and c in per[s]:
            per[s][c] += 1
    for c in meta.classes:
        if per["train"][c] < cfg.min_per_class:
            fail("min_per_class", f"class {c!r}: {per['train'][c]} train images < min_per_class {cfg.min_per_class}")
    n_test = int((split == "test").sum())
    if cfg.require_test_split:
        if n_test == 0:
            fail("test_split", "no rows with split 'test' (require_test_split is on)")
        else:
            for c in meta.classes:
                if per["test"][c] < cfg.min_per_class_test:
                    fail(
                        "min_per_class",
                        f"class {c!r}: {per['test'][c]} test images < min_per_class_test {cfg.min_per_class_test}",
                    )

    stats.update(
        {
            "per_split_class": per,
            "n_per_split": {s: int((split == s).sum()) for s in SPLITS},
            "n_patients": len(rows_of),
            "n_unique_images": len(set(digests.values())),
            "min_size": [min(s[0] for s in sizes), min(s[1] for s in sizes)] if sizes else None,
            "max_size": [max(s[0] for s in sizes), max(s[1] for s in sizes)] if sizes else None,
        }
    )
    return failures


def render_html(report: ValidationReport) -> str:
    """A self-contained page: verdict, the checks table (pass/fail, counts), stats, then every failure."""
    e = html.escape
    verdict = "VALID" if report.ok else "INVALID"
    color = "#1a7f37" if report.ok else "#cf222e"
    rows = "".join(
        f"<tr><td>{e(name)}</td><td>{e(CHECKS.get(name, ''))}</td>"
        f"<td style='color:{'#1a7f37' if n == 0 else '#cf222e'}'>{'pass' if n == 0 else 'FAIL'}</td><td>{n}</td></tr>"
        for name, n in report.checks.items()
    )
    fails = "".join(
        f"<tr><td>{e(f.check)}</td><td>{'' if f.row is None else f.row}</td><td>{e(f.image_id or '')}</td>"
        f"<td>{e(f.file or '')}</td><td>{e(f.message)}</td></tr>"
        for f in report.failures
    )
    per = report.stats.get("per_split_class") or {}
    classes = sorted({c for d in per.values() for c in d})
    stat_rows = "".join(
        f"<tr><td>{e(s)}</td>" + "".join(f"<td>{per[s].get(c, 0)}</td>" for c in classes) + "</tr>" for s in per
    )
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1.5em}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f3f3f3}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Validation: {e(report.dataset)}</title>"
        f"<style>{style}</style></head><body>"
        f"<h1>Dataset {e(report.dataset)}: <span style='color:{color}'>{verdict}</span></h1>"
        f"<p>{report.n_rows} rows, {len(report.failures)} failures, manifest sha256 "
        f"<code>{e(report.manifest_sha256)}</code></p>"
        "<h2>Checks</h2><table><tr><th>check</th><th>meaning</th><th>result</th><th>failures</th></tr>"
        f"{rows}</table>"
        "<h2>Images per split and class</h2><table><tr><th>split</th>"
        + "".join(f"<th>{e(c)}</th>" for c in classes)
        + f"</tr>{stat_rows}</table>"
        "<h2>Failures</h2>"
        + (
            f"<table><tr><th>check</th><th>row</th><th>image_id</th><th>file</th><th>message</th></tr>{fails}</table>"
            if fails
            else "<p>none</p>"
        )
        + "</body></html>\n"
    )


def main(cfg: ValidateConfig, dataset_dir: str | os.PathLike, report_dir: str | os.PathLike | None = None):
    """Validate, log each failure, write ``report.json`` + ``report.html``.

    ``report_dir`` defaults to ``DATASET_DIR/../<name>-validation`` (as the CLI), so the dataset itself is untouched.
    """
    report = validate(dataset_dir, cfg)
    for k, f in enumerate(report.failures):
        if k == cfg.max_failures_logged:
            log.error("... %d more failures (see report.json)", len(report.failures) - k)
            break
        log.error("[%s] %s", f.check, f.message)
    d = Path(dataset_dir)
    out = Path(report_dir) if report_dir is not None else d.parent / f"{d.name}-validation"
    atomic_write_json(out / "report.json", report.to_dict())
    atomic_write_text(out / "report.html", render_html(report))
    if report.ok:
        log.info("dataset %s: valid (%d rows); report in %s", report.dataset, report.n_rows, out)
    else:
        log.error("dataset %s: INVALID, %d failures; report in %s", report.dataset, len(report.failures), out)
    return report
