"""``craft validate DATASET_DIR``: refuse a dataset directory that breaks the contract (issue 2, item 6).

Two layers of checks, both always run, every failure kept (nothing stops at the first one). Every
per-row failure names its row number (0-based) and image id, in ``Failure.row`` / ``Failure.image_id``
and in the message text (``row 3 (image_id 'h000003'): ...``), so a curator can find the image.

1. Table checks with great-expectations 1.x on the manifest (an ephemeral context, a pandas data
   source, one ``ExpectationSuite``): required columns exist, ``image_id`` not null and unique,
   ``label`` set (not null, NaN, empty or whitespace) and in the declared class set, ``split`` set
   and in {train, val, test}, ``patient_id`` not null, ``image_path`` not null and a safe relative path.
   Each failed expectation is mapped back to its rows through ``unexpected_index_list`` (result
   format COMPLETE). A blank label is reported once, as empty, not also as an unknown class.
2. File and cross-row checks in plain Python: a path that escapes the dataset root once symlinks are
   resolved; every referenced file exists (``image_path``, ``mask_path``, ``condition_path``); each
   image's header gives a size within bounds and a pixel count under ``max_pixels`` BEFORE any
   decoding (decompression bombs are refused from the header; PIL's own ``DecompressionBombError``
   is caught too); the image decodes fully (``Image.load()``; a truncated PNG fails because
   ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never switched on); its mode is the declared ``mode``;
   the same file content (sha256 of the bytes) in train and test; a patient in two splits; too few
   images of a class.
3. Near-duplicates across splits: the same picture re-encoded or re-exported (PNG re-saved as JPEG,
   slightly resized) has other bytes, so the sha256 check misses it. Each image gets a perceptual hash
   once (``phash``: DCT of a grey thumbnail, 256 bits); any train-val, train-test or val-test pair whose
   hashes differ in at most ``near_duplicate_distance`` bits fails, naming both rows, image ids, splits
   and files. Hashes are compared with XOR + popcount on chunks of rows (``nearest_hamming``), no loop
   over pairs. The smallest cross-split distances land in ``stats["phash_min_distance"]``: the margin.

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

import imagehash
import numpy as np
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
BLANK_REGEX = r"^\s*$"  # an empty or whitespace-only label
# pHash size: imagehash's phash(hash_size=16), i.e. the 16x16 lowest DCT frequencies of a 64x64 grey
# thumbnail (highfreq_factor 4) -> 256 bits. The common 8x8 (64-bit) hash encodes little more than the
# coarse layout: distinct demo chest radiographs of different patients (one anatomy, one positioning)
# collide at distance 0, so no threshold separates them from copies; at 16x16 they stay apart.
PHASH_SIZE = 16
PHASH_HIGHFREQ = 4
PHASH_BITS = PHASH_SIZE * PHASH_SIZE
CROSS_SPLITS = (("train", "val"), ("train", "test"), ("val", "test"))  # (reference split, query split)


@dataclass
class ValidateConfig:
    """What ``craft validate`` accepts."""

    min_per_class: int = 2  # every declared class needs at least this many images in the train split
    min_per_class_test: int = 1  # ... and this many in the test split (only when require_test_split)
    max_pixels: int = 50_000_000  # decompression-bomb guard: width*height from the header, checked before decoding
    min_side: int = 8  # smallest allowed image width / height in pixels
    max_side: int = 8192  # largest allowed image width / height in pixels
    check_decode: bool = True  # decode every image (and mask / condition) fully; False: headers (and pHash) only
    check_mode: bool = True  # each image's PIL mode must equal dataset.yaml `mode`
    require_test_split: bool = True  # a dataset without test rows is invalid (evaluation needs them)
    # pHash near-duplicates between splits (re-encoded / resized copies that the sha256 check misses);
    # needs every image decoded, even with check_decode off.
    check_near_duplicates: bool = True
    # Largest Hamming distance between two 256-bit pHashes (PHASH_BITS) that still counts as one image.
    # 8 (3% of the bits): wide enough for a JPEG re-save at quality 90 or a +-10% resize even of a
    # 64-pixel image (a bigger image's 64x64 thumbnail moves less), and still below the closest pairs
    # of distinct demo chest radiographs, which all share one layout. A 1-pixel shift of a small image
    # moves more bits than that: pHash is not shift-invariant.
    near_duplicate_distance: int = 8
    max_failures_logged: int = 200  # failures beyond this are kept in the report but not logged one by one

    def validate(self) -> None:
        if self.min_per_class < 0 or self.min_per_class_test < 0:
            raise ValueError("validate.min_per_class / min_per_class_test must be >= 0")
        if self.max_pixels <= 0:
            raise ValueError("validate.max_pixels must be > 0")
        if not 1 <= self.min_side <= self.max_side:
            raise ValueError("validate.min_side must be >= 1 and <= max_side")
        if not 0 <= self.near_duplicate_distance < PHASH_BITS:
            raise ValueError(f"validate.near_duplicate_distance must be in [0, {PHASH_BITS})")


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
    "gx.label_not_empty": "label is set: not null, empty or whitespace (great-expectations)",
    "gx.label_in_classes": "label is one of the declared classes (great-expectations)",
    "gx.split_in_set": "split is set and is train, val or test (great-expectations)",
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
    "near_duplicate": "no perceptually near-identical images (pHash) in two splits",
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
    # GX skips nulls in its column-map expectations, so a null label or split passes a set check:
    # each gets its own not-null expectation.
    if "label" in present:
        add("gx.label_not_empty", gxe.ExpectColumnValuesToNotBeNull(column="label"))
        add("gx.label_not_empty", gxe.ExpectColumnValuesToNotMatchRegex(column="label", regex=BLANK_REGEX))
        add("gx.label_in_classes", gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(meta.classes)))
    if "split" in present:
        add("gx.split_in_set", gxe.ExpectColumnValuesToNotBeNull(column="split"))
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

    def name_of(r: Any) -> str:
        cfg = r.expectation_config
        return names.get((cfg.type, cfg.kwargs.get("column")), cfg.type)

    # A row failed as an empty label is not reported again as an unknown class.
    blank_label = {
        int(i)
        for r in result.results
        if not r.success and name_of(r) == "gx.label_not_empty"
        for i in (r.result or {}).get("unexpected_index_list") or ()
    }
    failures: list[Failure] = []
    for r in result.results:
        if r.success:
            continue
        cfg = r.expectation_config
        col = cfg.kwargs.get("column")
        name = name_of(r)
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
            if name == "gx.label_in_classes" and i in blank_label:
                continue
            value = table.at[i, col]
            image_id = _s(table.at[i, "image_id"]) if "image_id" in table.columns else None
            failures.append(
                Failure(
                    name,
                    f"{_row_name(i, image_id)}: {col} = {value!r} fails {CHECKS.get(name, name)}"
                    + (f" (declared: {', '.join(meta.classes)})" if name == "gx.label_in_classes" else ""),
                    row=i,
                    image_id=image_id,
                    file=_s(table.at[i, "image_path"]) if "image_path" in table.columns else None,
                )
            )
    return failures


def _row_name(i: int, image_id: str | None, split: str | None = None, file: str | None = None) -> str:
    """How a failure message names a manifest row: ``row 3 (image_id 'h3')``, ``row 3 (train, image_id 'h3', a.png)``."""
    parts = (split, "no image_id" if image_id is None else f"image_id {image_id!r}", file)
    return f"row {i} ({', '.join(p for p in parts if p)})"


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


def phash(im: Image.Image, hash_size: int = PHASH_SIZE, highfreq_factor: int = PHASH_HIGHFREQ) -> np.ndarray:
    """Perceptual hash of one image: (hash_size**2 // 64,) uint64 words, bits row-major, packed big-endian.

    ``imagehash.phash`` (grey, Lanczos resize to (hash_size * highfreq_factor)^2, 2-D DCT-II, top-left
    hash_size x hash_size low frequencies, bit = coefficient > their median), the same library the memorization
    search uses (``craft.evaluate.memorization.phash_bits``); only the packing into words is ours.
    """
    if hash_size < 8 or hash_size % 8:
        raise ValueError(f"hash_size: {hash_size} must be a positive multiple of 8 (whole 64-bit words)")
    bits = imagehash.phash(im, hash_size=hash_size, highfreq_factor=highfreq_factor).hash
    return np.packbits(bits.ravel()).view(">u8").astype(np.uint64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Differing bits between packed hashes ``a`` (..., W) and ``b`` (..., W), summed over the W words.

    >>> int(hamming(np.array([0b1011], np.uint64), np.array([0b0001], np.uint64)))
    2
    """
    return np.bitwise_count(np.bitwise_xor(a, b)).sum(-1, dtype=np.int64)


def nearest_hamming(
    query: np.ndarray, ref: np.ndarray, max_distance: int, chunk_elems: int = 1 << 22
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each query hash (Nq, W) against ref (Nr, W): (distance to the nearest ref, its index, refs within max_distance).

    Chunked over query rows so that one block's (rows, Nr, W) XOR holds about ``chunk_elems`` words (32 MiB).
    """
    if len(ref) == 0:
        raise ValueError("ref: empty")
    rows = max(1, chunk_elems // (len(ref) * ref.shape[1]))
    dmin = np.empty(len(query), np.int64)
    arg = np.empty(len(query), np.int64)
    cnt = np.empty(len(query), np.int64)
    for s in range(0, len(query), rows):
        d = hamming(query[s : s + rows, None, :], ref[None, :, :])
        arg[s : s + rows] = d.argmin(1)
        dmin[s : s + rows] = d.min(1)
        cnt[s : s + rows] = (d <= max_distance).sum(1)
    return dmin, arg, cnt


def _check_image(
    path: Path, cfg: ValidateConfig, want_mode: str | None, want_hash: bool = False
) -> tuple[list[tuple[str, str]], tuple | None]:
    """Header checks, then a full decode (and a pHash when ``want_hash``).

    Returns ([(check, message)], (width, height, mode, phash or None) or None).
    """
    problems: list[tuple[str, str]] = []
    size = _png_header_size(path)
    if size is not None and size[0] * size[1] > cfg.max_pixels:
        w, h = size
        problems.append(("decompression_bomb", f"{w}x{h} = {w * h} pixels > max_pixels {cfg.max_pixels}; not decoded"))
        return problems, (w, h, "", None)
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
                    return problems, (w, h, mode, None)
                if not (cfg.min_side <= w <= cfg.max_side and cfg.min_side <= h <= cfg.max_side):
                    problems.append(("image_size", f"{w}x{h} outside [{cfg.min_side}, {cfg.max_side}] per side"))
                if want_mode is not None and mode != want_mode:
                    problems.append(("mode", f"mode {mode} but dataset.yaml declares {want_mode}"))
                if cfg.check_decode:
                    im.load()  # full decode; validate() holds LOAD_TRUNCATED_IMAGES at False meanwhile
                return problems, (w, h, mode, phash(im) if want_hash else None)
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
    paths = df["image_path"].astype(object).where(df["image_path"].notna(), None)
    split = df["split"].astype(object).where(df["split"].notna(), None)
    label = df["label"].astype(object).where(df["label"].notna(), None)
    patient = df["patient_id"].astype(object).where(df["patient_id"].notna(), None)

    def where(i: int, split_name: str | None = None, file: str | None = None) -> str:
        return _row_name(i, ids.iat[i], split_name, file)

    def fail(check: str, msg: str, i: int | None = None, file: str | None = None, prefix: bool = True) -> None:
        """Record a failure; a per-row one (``i`` given) is named ``row i (image_id ...)`` unless ``prefix`` is off."""
        text = f"{where(i)}: {msg}" if i is not None and prefix else msg
        failures.append(Failure(check, text, row=i, image_id=None if i is None else _s(ids.iat[i]), file=file))

    # Duplicate ids, named in full (GX flags them too; this check names the first row of each id).
    first: dict[str, int] = {}
    for i, v in enumerate(ids):
        if v is None:
            continue
        if v in first:
            j = first[v]
            fail("duplicate_id", f"image_id already used by row {j} ({paths.iat[j]})", i, paths.iat[i])
        else:
            first[v] = i

    digests: dict[int, str] = {}
    phashes: dict[int, np.ndarray] = {}
    sizes: list[tuple[int, int]] = []
    for i, row in df.iterrows():
        i = int(i)
        for col in FILE_COLUMNS:
            rel = _s(row[col])
            if rel is None:
                continue
            path, why = _inside(root, rel)
            if path is None:
                fail("path_escape", f"{col} {rel!r} {why}", i, rel)
                continue
            if not path.is_file():
                fail("file_exists", f"{col} {rel!r} does not exist (looked for {path})", i, rel)
                continue
            is_image = col == "image_path"
            want = meta.mode if (is_image and cfg.check_mode) else None
            problems, info = _check_image(path, cfg, want, want_hash=is_image and cfg.check_near_duplicates)
            for check, msg in problems:
                fail(check, f"{col} {rel!r}: {msg}", i, rel)
            if is_image:
                if info is not None:
                    sizes.append(info[:2])
                    if info[3] is not None:
                        phashes[i] = info[3]
                digests[i] = sha256_file(path)

    # Same image bytes in train and test: the test score would be measured on training data.
    train_digests: dict[str, int] = {}
    for i, d in digests.items():
        if split.iat[i] == "train":
            train_digests.setdefault(d, i)
    exact: set[int] = set()  # test rows already failed as byte copies (not reported again as near-duplicates)
    for i, d in digests.items():
        if split.iat[i] == "test" and d in train_digests:
            j = train_digests[d]
            exact.add(i)
            fail(
                "train_test_duplicate",
                f"test image {paths.iat[i]} has the same bytes (sha256 {d[:12]}) as {where(j, 'train', paths.iat[j])}",
                i,
                paths.iat[i],
            )

    # The same picture re-encoded or resized in two splits: as much a leak as a byte copy, invisible to sha256.
    if cfg.check_near_duplicates:
        matches, stats["phash_min_distance"] = _near_duplicates(phashes, split, cfg.near_duplicate_distance, exact)
        for i, j, dist, n in matches:
            more = f"; {n - 1} more {split.iat[j]} images within it" if n > 1 else ""
            fail(
                "near_duplicate",
                f"{split.iat[i]} image {paths.iat[i]} is a near-duplicate of {where(j, split.iat[j], paths.iat[j])}: "
                f"pHash distance {dist} <= near_duplicate_distance {cfg.near_duplicate_distance} "
                f"of {PHASH_BITS} bits{more}",
                i,
                paths.iat[i],
            )

    # A patient in two splits (patient-level split required: images of one patient are correlated).
    rows_of: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(patient):
        if p is not None and split.iat[i] in SPLITS:
            rows_of[str(p)].append(i)
    for p, rows in rows_of.items():
        splits = sorted({split.iat[i] for i in rows})
        if len(splits) > 1:
            detail = "; ".join(where(i, split.iat[i]) for i in rows[:10])
            more = f" and {len(rows) - 10} more" if len(rows) > 10 else ""
            msg = f"patient {p!r} is in splits {', '.join(splits)}: {detail}{more}"
            fail("patient_leak", msg, rows[0], paths.iat[rows[0]], prefix=False)

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


def _near_duplicates(
    hashes: dict[int, np.ndarray], split: pd.Series, max_distance: int, skip: set[int]
) -> tuple[list[tuple[int, int, int, int]], dict[str, int]]:
    """Rows whose pHash lies within ``max_distance`` bits of an image in an earlier split (train < val < test).

    Returns ([(row, nearest row of the earlier split, distance, images of that split within max_distance)],
    {"train-test": smallest distance between the two splits, ...}). Rows in ``skip`` (already failed as
    byte copies) are not matched against train.
    """
    rows = {s: np.array([i for i in hashes if split.iat[i] == s], dtype=np.int64) for s in SPLITS}
    matches: list[tuple[int, int, int, int]] = []
    closest: dict[str, int] = {}
    for ref_split, query_split in CROSS_SPLITS:
        ref, query = rows[ref_split], rows[query_split]
        if not len(ref) or not len(query):
            continue
        dmin, arg, cnt = nearest_hamming(
            np.stack([hashes[i] for i in query]), np.stack([hashes[i] for i in ref]), max_distance
        )
        closest[f"{ref_split}-{query_split}"] = int(dmin.min())
        for k in np.flatnonzero(dmin <= max_distance):
            i = int(query[k])
            if not (ref_split == "train" and query_split == "test" and i in skip):
                matches.append((i, int(ref[arg[k]]), int(dmin[k]), int(cnt[k])))
    matches.sort()
    return matches, closest


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
