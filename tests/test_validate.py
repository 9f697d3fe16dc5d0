"""craft validate: a clean dataset passes; each defect of issue 2 ("Done when") is refused, naming row, image id and file."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from craft.data.manifest import DatasetMeta, read_manifest, write_manifest, write_meta
from craft.data.validate import PHASH_BITS, ValidateConfig, main, phash, validate

CLASSES = ["benign", "malignant"]


def _png(path: Path, seed: int, size: int = 16, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def _natural(path: Path | None, seed: int, size: int = 96) -> Image.Image:
    """A photo-like RGB image (1/f noise, the spectrum of natural images; saved when ``path``): what pHash is for.

    Not ``_png``'s white noise, whose fine detail a re-encode destroys; nor a blob on a gradient, whose
    DCT is so nearly zero past the first few frequencies that the median-thresholded bits are noise.
    """
    rng = np.random.default_rng(seed)
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size)))
    f[0, 0] = 1.0
    img = np.real(np.fft.ifft2((rng.normal(size=(3, size, size)) + 1j * rng.normal(size=(3, size, size))) / f))
    img = (img - img.mean()) / img.std() * 40 + 128
    im = Image.fromarray(img.transpose(1, 2, 0).clip(0, 255).astype(np.uint8), "RGB")
    if path is not None:
        im.save(path)
    return im


def make_dataset(root: Path) -> Path:
    """2 classes; train 3 per class, test 2 per class; one patient per image; 16x16 RGB PNGs."""
    rows = []
    k = 0
    for split, n in (("train", 3), ("test", 2)):
        for label in CLASSES:
            for _ in range(n):
                rel = f"images/{label}/img{k:03d}.png"
                _png(root / rel, seed=k)
                rows.append(dict(image_id=f"img{k:03d}", image_path=rel, label=label, split=split, patient_id=f"p{k}"))
                k += 1
    write_meta(root, DatasetMeta(name="toy", modality="histo", classes=CLASSES, resolution=16, mode="RGB"))
    write_manifest(root, pd.DataFrame(rows))
    return root


def edit(root: Path, row: int, **values) -> None:
    df = read_manifest(root)
    for k, v in values.items():
        df.loc[row, k] = v
    write_manifest(root, df)


def png_bytes(width: int, height: int) -> bytes:
    """A real 1-bit PNG of any size, streamed through zlib (all-zero rows), never held decoded in memory."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte 0 + packed bits
    idat = bytearray()
    block = row * 500
    for _ in range(height // 500):
        idat += comp.compress(block)
    idat += comp.compress(row * (height % 500))
    idat += comp.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", bytes(idat)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def clean_template(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("clean") / "ds")


@pytest.fixture
def ds(clean_template: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(clean_template, tmp_path / "ds"))


def failures_of(report, check: str):
    found = [f for f in report.failures if f.check == check]
    assert found, f"expected a {check!r} failure, got {[(f.check, f.message) for f in report.failures]}"
    return found


def test_clean_dataset_passes_and_writes_reports(ds: Path, tmp_path: Path):
    report = main(ValidateConfig(), ds, tmp_path / "rep")
    assert report.ok, report.failures
    assert report.n_rows == 10 and report.stats["n_per_split"] == {"train": 6, "val": 0, "test": 4}
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert data["ok"] is True and len(data["manifest_sha256"]) == 64
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "VALID" in page and "gx.label_in_classes" in page
    main(ValidateConfig(), ds)  # default report folder: a sibling, the dataset stays untouched
    assert (ds.parent / "ds-validation" / "report.json").is_file() and not (ds / "validation").exists()


def test_truncated_png(ds: Path, monkeypatch):
    from PIL import ImageFile

    path = ds / "images/benign/img001.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # someone else's global setting
    report = validate(ds)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored
    assert not report.ok
    (f,) = failures_of(report, "decode")
    assert f.row == 1 and f.image_id == "img001" and f.file == "images/benign/img001.png"
    assert "row 1" in f.message


def test_unknown_label(ds: Path):
    edit(ds, 2, label="lymphoma")
    report = validate(ds)
    assert not report.ok
    (f,) = failures_of(report, "gx.label_in_classes")
    assert f.row == 2 and f.image_id == "img002" and "lymphoma" in f.message
    assert f.message.startswith("row 2 (image_id 'img002'): ")


@pytest.mark.parametrize("blank", [None, float("nan"), "", "  \t"])
def test_empty_label(ds: Path, blank):
    edit(ds, 2, label=blank)
    report = validate(ds)
    assert not report.ok
    (f,) = failures_of(report, "gx.label_not_empty")
    assert f.row == 2 and f.image_id == "img002" and f.message.startswith("row 2 (image_id 'img002'): ")
    assert report.checks["gx.label_in_classes"] == 0  # reported once, as empty


def test_missing_split(ds: Path):
    edit(ds, 8, split=None)  # GX skips nulls in a set check: this row passed before
    (f,) = failures_of(validate(ds), "gx.split_in_set")
    assert f.row == 8 and f.image_id == "img008" and "img008" in f.message


def test_every_row_failure_names_row_and_image(ds: Path):
    edit(ds, 1, label="lymphoma")
    edit(ds, 3, label="")
    edit(ds, 7, patient_id="p0")
    (ds / "images/malignant/img004.png").unlink()
    (ds / "images/benign/img006.png").write_bytes((ds / "images/benign/img000.png").read_bytes())
    path = ds / "images/malignant/img005.png"
    path.write_bytes(path.read_bytes()[:60])
    report = validate(ds)
    rows = [f for f in report.failures if f.row is not None]
    assert {f.check for f in rows} >= {
        "gx.label_in_classes",
        "gx.label_not_empty",
        "patient_leak",
        "file_exists",
        "train_test_duplicate",
        "decode",
    }
    for f in rows:
        assert f.image_id == f"img{f.row:03d}" and f"row {f.row} " in f.message and f.image_id in f.message, f


def test_missing_file(ds: Path):
    (ds / "images/malignant/img004.png").unlink()
    report = validate(ds)
    assert not report.ok
    (f,) = failures_of(report, "file_exists")
    assert f.row == 4 and f.file == "images/malignant/img004.png" and "does not exist" in f.message


def test_patient_in_two_splits(ds: Path):
    edit(ds, 7, patient_id="p0")  # row 7 is test, row 0 is train
    report = validate(ds)
    assert not report.ok
    (f,) = failures_of(report, "patient_leak")
    assert "'p0'" in f.message and "row 0 (train" in f.message and "row 7 (test" in f.message


def test_same_image_in_train_and_test(ds: Path):
    (ds / "images/benign/img006.png").write_bytes((ds / "images/benign/img000.png").read_bytes())
    report = validate(ds)
    assert not report.ok
    (f,) = failures_of(report, "train_test_duplicate")
    assert f.row == 6 and f.file == "images/benign/img006.png" and "row 0" in f.message
    assert "img006" in f.message and "img000" in f.message
    assert report.checks["near_duplicate"] == 0  # a byte copy is reported once


def _plant_copy(ds: Path, how: str) -> None:
    """Train row 0 becomes a photo-like image; test row 6 becomes a re-encoded JPEG copy of it."""
    im = _natural(ds / "images/benign/img000.png", seed=1)
    (ds / "images/benign/img006.png").unlink()
    if how == "resize":  # 10% smaller: a re-export from a viewer
        im = im.resize((86, 86), Image.Resampling.BILINEAR)
    im.save(ds / "images/benign/img006.jpg", quality=90)
    edit(ds, 6, image_path="images/benign/img006.jpg")


@pytest.mark.parametrize("how", ["jpeg90", "resize"])
def test_near_duplicate_across_splits(ds: Path, how: str):
    _plant_copy(ds, how)
    report = validate(ds)
    assert not report.ok and report.checks["train_test_duplicate"] == 0  # other bytes: sha256 misses it
    (f,) = failures_of(report, "near_duplicate")
    assert f.row == 6 and f.image_id == "img006" and f.file == "images/benign/img006.jpg"
    assert f.message.startswith("row 6 (image_id 'img006'): test image images/benign/img006.jpg is a near-dup")
    assert "near-duplicate of row 0 (train, image_id 'img000', images/benign/img000.png)" in f.message
    assert report.stats["phash_min_distance"]["train-test"] <= ValidateConfig().near_duplicate_distance


def test_near_duplicate_train_val(ds: Path):
    _plant_copy(ds, "jpeg90")
    edit(ds, 6, split="val")
    (f,) = failures_of(validate(ds), "near_duplicate")
    assert f.row == 6 and "val image" in f.message and "row 0 (train, image_id 'img000'" in f.message


def test_distinct_image_is_no_near_duplicate(ds: Path):
    _natural(ds / "images/benign/img000.png", seed=1)
    _natural(ds / "images/benign/img006.png", seed=2)
    report = validate(ds)
    assert report.ok, report.failures
    assert report.stats["phash_min_distance"]["train-test"] > 4 * ValidateConfig().near_duplicate_distance


def test_near_duplicate_switch_and_threshold(ds: Path):
    _plant_copy(ds, "jpeg90")
    off = validate(ds, ValidateConfig(check_near_duplicates=False))
    assert off.ok and "phash_min_distance" not in off.stats
    loose = validate(ds, ValidateConfig(check_near_duplicates=True, near_duplicate_distance=PHASH_BITS - 1))
    assert {f.row for f in failures_of(loose, "near_duplicate")} == set(range(6, 10))  # every test row
    with pytest.raises(ValueError, match="near_duplicate_distance"):
        validate(ds, ValidateConfig(near_duplicate_distance=PHASH_BITS))


def test_phash_is_imagehash_phash():
    imagehash = pytest.importorskip("imagehash")
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8), "RGB"),
        Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), "L"),
        _natural(None, seed=3, size=100),
        Image.new("L", (20, 20), 128),  # flat: every coefficient but DC ties with the median
    ]
    for im in images:
        for size in (8, 16):
            want = np.packbits(imagehash.phash(im, hash_size=size).hash.ravel()).view(">u8").astype(np.uint64)
            assert np.array_equal(phash(im, hash_size=size), want)


@pytest.mark.parametrize("bad", ["../outside.png", "images/../../outside.png", "/etc/passwd"])
def test_path_escaping_root(ds: Path, bad: str):
    _png(ds.parent / "outside.png", seed=99)
    edit(ds, 3, image_path=bad)
    report = validate(ds)
    assert not report.ok
    gx_f = failures_of(report, "gx.image_path_safe")
    assert gx_f[0].row == 3 and gx_f[0].image_id == "img003" and bad in gx_f[0].message
    (f,) = failures_of(report, "path_escape")
    assert f.row == 3 and f.file == bad


def test_symlink_escaping_root(ds: Path):
    _png(ds.parent / "outside.png", seed=99)
    (ds / "images/benign/img000.png").unlink()
    (ds / "images/benign/img000.png").symlink_to(ds.parent / "outside.png")
    report = validate(ds)
    (f,) = failures_of(report, "path_escape")
    assert not report.ok and f.row == 0 and "outside the dataset root" in f.message


def test_decompression_bomb_refused_from_header(ds: Path):
    (ds / "images/benign/img000.png").write_bytes(png_bytes(20000, 20000))
    # Would PIL decode it, 400 M one-bit pixels would take seconds; the header check refuses it first.
    report = validate(ds)
    assert not report.ok
    (f,) = failures_of(report, "decompression_bomb")
    assert f.row == 0 and f.file == "images/benign/img000.png" and "20000x20000" in f.message
    assert not [x for x in report.failures if x.check == "decode"]


def test_png_writer_makes_real_pngs():
    import io

    im = Image.open(io.BytesIO(png_bytes(37, 1003)))
    im.load()
    assert im.size == (37, 1003) and im.mode == "1"


def test_duplicate_id(ds: Path):
    edit(ds, 5, image_id="img001")
    report = validate(ds)
    assert not report.ok
    gx_f = failures_of(report, "gx.image_id_unique")
    assert {f.row for f in gx_f} == {1, 5}
    (f,) = failures_of(report, "duplicate_id")
    assert f.row == 5 and "row 1" in f.message and f.file == "images/malignant/img005.png"


def test_wrong_mode_and_size_and_too_few_per_class(ds: Path):
    _png(ds / "images/benign/img000.png", seed=0, mode="L")
    _png(ds / "images/benign/img001.png", seed=1, size=4)
    edit(ds, 2, label="malignant")  # benign now has 2 train images
    report = validate(ds, ValidateConfig(min_per_class=3))
    assert failures_of(report, "mode")[0].row == 0
    assert failures_of(report, "image_size")[0].row == 1
    assert "'benign': 2 train images" in failures_of(report, "min_per_class")[0].message


def test_bad_dataset_yaml_and_missing_column(ds: Path, tmp_path: Path):
    (ds / "dataset.yaml").write_text("name: toy\nmodality: histo\nclasses: [a]\nfoo: 1\n")
    report = main(ValidateConfig(), ds, tmp_path / "rep")
    assert not report.ok and "foo" in failures_of(report, "dataset_yaml")[0].message
    assert "INVALID" in (tmp_path / "rep" / "report.html").read_text()

    ds2 = make_dataset(tmp_path / "ds2")
    df = read_manifest(ds2).drop(columns=["patient_id"])
    df.to_parquet(ds2 / "manifest.parquet", index=False)
    report = validate(ds2)
    assert not report.ok and "'patient_id' is missing" in failures_of(report, "gx.columns_exist")[0].message


def test_demo_datasets_validate(tmp_path: Path):
    demo = pytest.importorskip("craft.data.demo")
    for modality in ("histo", "cxr"):
        out = tmp_path / modality
        demo.generate(demo.DemoConfig(modality=modality, n=32, seed=0), out)
        report = validate(out)
        assert report.ok, [(f.check, f.message) for f in report.failures]


def test_pixel_bound_from_pil_header_for_any_format(ds: Path):
    Image.open(ds / "images/benign/img000.png").convert("RGB").save(ds / "images/benign/img000.jpg")
    edit(ds, 0, image_path="images/benign/img000.jpg")
    report = validate(ds, ValidateConfig(max_pixels=255))  # every 16x16 image is over
    rows = {f.row for f in failures_of(report, "decompression_bomb")}
    assert rows == set(range(10)) and not report.ok
