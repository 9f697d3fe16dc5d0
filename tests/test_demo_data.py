"""Demo datasets: manifest contract, determinism, patient-level splits, masks, separable classes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from craft.data.demo import (
    CLASSES,
    CXR_CLASSES,
    FINDING_ATTRIBUTES,
    HISTO_CLASSES,
    DemoConfig,
    class_grid,
    finding_values,
    generate,
    main,
    render_one,
)
from craft.data.manifest import COLUMNS, attributes_of, read_manifest, read_meta


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def histo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(DemoConfig(modality="histo", n=48, seed=3), tmp_path_factory.mktemp("h") / "histo")


@pytest.fixture(scope="module")
def cxr_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(DemoConfig(modality="cxr", n=48, seed=3), tmp_path_factory.mktemp("c") / "cxr")


@pytest.mark.parametrize("which", ["histo", "cxr"])
def test_manifest_contract(which: str, histo_dir: Path, cxr_dir: Path) -> None:
    root = histo_dir if which == "histo" else cxr_dir
    meta = read_meta(root)
    assert meta.name == f"demo-{which}" and meta.modality == which
    assert meta.classes == list(CLASSES[which])
    assert meta.mode == ("RGB" if which == "histo" else "L") and meta.resolution == 64
    assert set(meta.class_names) == set(meta.classes) and "seed=3" in meta.source
    df = read_manifest(root)
    assert len(df) == 48 and list(df.columns[: len(COLUMNS)]) == list(COLUMNS)
    for col, (dtype, _) in COLUMNS.items():
        assert str(df[col].dtype) == dtype, col
    assert df["image_id"].is_unique and set(df["label"]) == set(meta.classes)
    assert (df["image_path"] == "images/" + df["image_id"] + ".png").all()
    assert (df["mask_path"] == "masks/" + df["image_id"] + ".png").all()
    assert df["caption"].str.len().gt(5).all()
    if which == "histo":
        assert (df["condition_path"] == "conditions/" + df["image_id"] + ".png").all()
    else:
        assert df["condition_path"].isna().all()
    row = df.iloc[0]
    with Image.open(root / row["image_path"]) as im:
        assert im.mode == meta.mode and im.size == (64, 64)
    with Image.open(root / row["mask_path"]) as im:
        assert np.asarray(im).dtype == np.uint16
    attrs = attributes_of(row)
    assert attrs["label"] == row["label"]
    assert ("n_nuclei" in attrs) if which == "histo" else ("ctr" in attrs)


def test_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    a = generate(DemoConfig(modality="histo", n=16, seed=5, images_per_patient=2), tmp_path / "a")
    b = generate(DemoConfig(modality="histo", n=16, seed=5, images_per_patient=2), tmp_path / "b")
    c = generate(DemoConfig(modality="histo", n=16, seed=6, images_per_patient=2), tmp_path / "c")
    assert _tree_hash(a) == _tree_hash(b)
    assert (a / "images" / "h000000.png").read_bytes() != (c / "images" / "h000000.png").read_bytes()
    x = generate(DemoConfig(modality="cxr", n=16, seed=5, images_per_patient=2), tmp_path / "x")
    y = generate(DemoConfig(modality="cxr", n=16, seed=5, images_per_patient=2), tmp_path / "y")
    assert _tree_hash(x) == _tree_hash(y)
    # regenerating into an existing folder replaces it atomically, no temp folder left behind
    generate(DemoConfig(modality="cxr", n=16, seed=5, images_per_patient=2), tmp_path / "x")
    assert _tree_hash(x) == _tree_hash(y)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("which", ["histo", "cxr"])
def test_patient_level_split(which: str, tmp_path: Path) -> None:
    cfg = DemoConfig(modality=which, n=96, seed=1, test_fraction=0.25, val_fraction=0.2)
    df = read_manifest(generate(cfg, tmp_path / "d"))
    assert df.groupby("patient_id")["split"].nunique().max() == 1
    assert df.groupby("patient_id")["label"].nunique().max() == 1
    assert df.groupby("patient_id").size().max() == cfg.images_per_patient
    for split in ("train", "val", "test"):
        assert set(df.loc[df["split"] == split, "label"]) == set(CLASSES[which]), split
    assert df["split"].value_counts()["train"] > df["split"].value_counts()["test"]


def test_histo_masks_align_with_nuclei(histo_dir: Path) -> None:
    df = read_manifest(histo_dir)
    for _, row in df.head(12).iterrows():
        img = np.asarray(Image.open(histo_dir / row["image_path"]), dtype=np.float64)
        mask = np.asarray(Image.open(histo_dir / row["mask_path"]))
        cond = np.asarray(Image.open(histo_dir / row["condition_path"]), dtype=np.float64)
        labels = np.unique(mask)
        n = attributes_of(row)["n_nuclei"]
        assert n > 5 and labels.tolist() == list(range(n + 1)), "instance ids are 0..n_nuclei, contiguous"
        nuc, bg = mask > 0, mask == 0
        # hematoxylin: nuclei darker and bluer (blue minus red higher) than the rest
        assert img[nuc].mean() < img[bg].mean() - 20
        assert (img[nuc][:, 2] - img[nuc][:, 0]).mean() > (img[bg][:, 2] - img[bg][:, 0]).mean()
        # fluorescence channel: bright nuclei on dark background
        assert cond[nuc].mean() > cond[bg].mean() + 60


def test_cxr_mask_regions(cxr_dir: Path) -> None:
    df = read_manifest(cxr_dir)
    for _, row in df.iterrows():
        mask = np.asarray(Image.open(cxr_dir / row["mask_path"]))
        img = np.asarray(Image.open(cxr_dir / row["image_path"]), dtype=np.float64)
        attrs = attributes_of(row)
        assert {1, 2, 3} <= set(np.unique(mask).tolist())
        assert img[mask == 3].mean() > img[(mask == 1) | (mask == 2)].mean() + 40, "heart brighter than lungs"
        assert (4 in mask) == (row["label"] in ("pleural_effusion", "pneumonia"))
        if row["label"] == "cardiomegaly":
            assert attrs["ctr"] > 0.55
        else:
            assert attrs["ctr"] < 0.5


def _features(modality: str, img: Image.Image) -> np.ndarray:
    """Cheap image features. cxr: coarse thumbnail and row/column profiles (the anatomy is aligned).

    histo (translation/rotation invariant): colour histograms, dark/white/blue-grey pixel shares,
    edge energy and the count/size/size-spread of dark connected blobs (nuclei).
    """
    a = np.asarray(img, dtype=np.float64) / 255.0
    a = a[..., None] if a.ndim == 2 else a
    gray = a.mean(axis=2)
    hist = np.concatenate([np.histogram(a[..., c], bins=8, range=(0, 1))[0] / gray.size for c in range(a.shape[2])])
    if modality == "cxr":
        thumb = gray.reshape(8, 8, 8, 8).mean(axis=(1, 3)).ravel()
        return np.concatenate([thumb, hist, gray.mean(axis=1), gray.mean(axis=0)])
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    dark = gray < 0.45
    blobs, n = ndimage.label(dark)
    sizes = np.bincount(blobs.ravel())[1:] if n else np.zeros(1)
    shares = [dark.mean(), (gray > 0.88).mean(), ((b > r) & (gray > 0.6)).mean(), (b - r).mean(), (g - r).mean()]
    edges = np.abs(np.diff(gray, axis=0)).mean() + np.abs(np.diff(gray, axis=1)).mean()
    return np.concatenate([hist, shares, [edges, n, sizes.mean(), sizes.std(), gray.std()]])


@pytest.mark.parametrize("modality", ["histo", "cxr"])
def test_classes_separable_on_fresh_draws(modality: str) -> None:
    classes = CLASSES[modality]

    def draw(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        y = np.arange(n) % len(classes)
        x = np.stack([_features(modality, render_one(modality, classes[k], rng, 64)[0]) for k in y])
        return x, y

    xtr, ytr = draw(100, 160)
    xte, yte = draw(200, 80)
    scaler = StandardScaler().fit(xtr)
    clf = LogisticRegression(max_iter=2000, C=0.5).fit(scaler.transform(xtr), ytr)
    acc = (clf.predict(scaler.transform(xte)) == yte).mean()
    assert acc > 0.9, acc


def test_ground_truth_attributes_follow_class() -> None:
    rng = np.random.default_rng(0)
    att = {c: [render_one("histo", c, rng, 64)[3] for _ in range(6)] for c in HISTO_CLASSES}

    def mean(c: str, k: str) -> float:
        return float(np.mean([a[k] for a in att[c]]))

    assert mean("mucinous_carcinoma", "mucin_fraction") > 0.4 > mean("normal", "mucin_fraction")
    assert mean("adenocarcinoma", "nuclear_area_cv") > mean("normal", "nuclear_area_cv")
    assert mean("adenocarcinoma", "gland_irregularity") > 3 * mean("normal", "gland_irregularity")
    assert mean("adenoma", "n_nuclei") > mean("normal", "n_nuclei")
    cx = {c: [render_one("cxr", c, rng, 64)[3] for _ in range(6)] for c in CXR_CLASSES}
    assert min(a["ctr"] for a in cx["cardiomegaly"]) > max(a["ctr"] for a in cx["no_finding"])
    assert all(a["cp_angle_blunted"] for a in cx["pleural_effusion"])
    assert all(not a["cp_angle_blunted"] for a in cx["pneumonia"] + cx["no_finding"])
    assert all(a["opacity_zone"] != "none" for a in cx["pneumonia"])


@pytest.mark.parametrize("res", [32, 128, 256])
def test_resolution_configurable(res: int) -> None:
    for modality in ("histo", "cxr"):
        for label in CLASSES[modality]:
            img, mask, cond, attrs = render_one(modality, label, 7, res)
            assert img.size == (res, res) and mask.shape == (res, res) and mask.dtype == np.uint16
            assert (cond is None) == (modality == "cxr")
            json.dumps(attrs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": 3}, "n"),
        ({"n": 8, "test_fraction": 0.25, "val_fraction": 0.2}, "n"),
        ({"test_fraction": 1.2}, "test_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"test_fraction": 0.6, "val_fraction": 0.5}, "test_fraction"),
        ({"resolution": 8}, "resolution"),
        ({"images_per_patient": 0}, "images_per_patient"),
        ({"modality": "mri"}, "modality"),
        ({"caption_class_rate": 0.95, "caption_wrong_rate": 0.1}, "caption_wrong_rate"),
    ],
)
def test_bad_config_names_field(kwargs: dict, field: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=rf"^{field}:"):
        generate(DemoConfig(**kwargs), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_captions_weak_but_informative(histo_dir: Path) -> None:
    df = read_manifest(generate(DemoConfig(modality="histo", n=200, seed=2), histo_dir.parent / "cap"))
    phrases = read_meta(histo_dir).class_names
    named = [any(p in cap or lb.replace("_", " ") in cap for lb, p in phrases.items()) for cap in df["caption"]]
    right = [phrases[lb] in cap or lb.replace("_", " ") in cap for lb, cap in zip(df["label"], df["caption"])]
    assert 0.4 < np.mean(right) < 0.85 and np.mean(named) < 0.95  # some vague, some wrong
    assert df["caption"].nunique() > 20


def test_main_and_class_grid(tmp_path: Path) -> None:
    out = main(DemoConfig(modality="cxr", n=16, seed=0, images_per_patient=2), tmp_path / "d")
    png = class_grid(out, tmp_path / "grid.png", per_class=3)
    with Image.open(png) as im:
        assert im.mode == "L" and im.height == 4 * (128 + 2) and im.width > 3 * 128


def test_finding_values_follow_class() -> None:
    """The findings the oracle's readers learn: one value per FINDING_ATTRIBUTES name, ordered by class as drawn."""
    rng = np.random.default_rng(5)
    h = {
        c: np.array([finding_values("histo", render_one("histo", c, rng, 64)[3]) for _ in range(4)])
        for c in HISTO_CLASSES
    }
    assert all(v.shape == (4, len(FINDING_ATTRIBUTES["histo"])) for v in h.values())
    assert h["mucinous_carcinoma"][:, 2].min() > 0.3 and h["normal"][:, 2].max() == 0.0  # mucin fraction
    assert h["adenocarcinoma"][:, 1].max() < h["normal"][:, 1].min()  # irregular glands: lower regularity
    assert h["adenocarcinoma"][:, 0].mean() > h["mucinous_carcinoma"][:, 0].mean()  # nuclear density
    c = {k: np.array([finding_values("cxr", render_one("cxr", k, rng, 64)[3]) for _ in range(4)]) for k in CXR_CLASSES}
    assert c["cardiomegaly"][:, 0].min() > c["no_finding"][:, 0].max()  # cardiothoracic ratio
    assert c["pleural_effusion"][:, 1].min() >= 1 and c["pneumonia"][:, 1].max() == 0  # blunted angles
    assert c["pneumonia"][:, 2].tolist() == [1.0] * 4 and c["no_finding"][:, 2].max() == 0  # opacity presence
    with pytest.raises(ValueError, match="modality"):
        finding_values("mri", {})
