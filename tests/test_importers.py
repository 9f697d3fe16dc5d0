"""Importers: every layout on a small fixture tree built here; patient-level splits; clear errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from craft.data.importers import (
    FITZPATRICK_CONDITIONS,
    ImportConfig,
    ImportError_,
    Record,
    main,
    patient_split,
    slug,
)
from craft.data.manifest import read_manifest, read_meta
from craft.data.validate import ValidateConfig, validate


def img(path: Path, seed: int, size=(20, 16), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def check_dataset(out: Path, classes: list[str], modality: str, mode: str, **vcfg) -> tuple:
    meta = read_meta(out)
    df = read_manifest(out)
    assert meta.classes == classes and meta.modality == modality and meta.mode == mode
    # patient-level split: no patient in two splits
    assert (df.groupby("patient_id")["split"].nunique() == 1).all()
    report = validate(out, ValidateConfig(**vcfg))
    assert report.ok, [(f.check, f.message) for f in report.failures]
    return meta, df


# ------------------------------------------------------------------ generic csv


def make_csv(src: Path, n_per_class: int = 4, extra: str = "") -> Path:
    lines = ["file,diagnosis,pid,caption" + extra]
    k = 0
    for label in ("Benign", "Malignant"):
        for j in range(n_per_class):
            img(src / "imgs" / f"{label.lower()}_{j}.png", seed=k)
            lines.append(f"imgs/{label.lower()}_{j}.png,{label},P{k // 2}{label[0]},a {label.lower()} tile")
            k += 1
    (src / "labels.csv").write_text("\n".join(lines) + "\n")
    return src


def test_csv(tmp_path: Path):
    src = make_csv(tmp_path / "src")
    cfg = ImportConfig(format="csv", path_col="file", label_col="diagnosis", patient_col="pid", caption_col="caption")
    out = main(cfg, src, tmp_path / "out")
    meta, df = check_dataset(out, ["benign", "malignant"], "other", "RGB", min_per_class=1)
    assert meta.name == "src" and meta.resolution == [16, 20] and len(df) == 8
    assert set(df.split) == {"train", "test"} and df.caption.str.startswith("a ").all()
    # stratified: each class has patients in both splits
    assert (df.groupby("label")["split"].nunique() == 2).all()
    # deterministic in the seed
    again = read_manifest(main(cfg, src, tmp_path / "out2"))
    assert list(again.split) == list(df.split)


def test_csv_official_split_and_resize(tmp_path: Path):
    src = tmp_path / "src"
    lines = ["path,label,split"]
    for k, s in enumerate(["train", "train", "valid", "test"] * 2):
        lab = "a" if k < 4 else "b"
        img(src / f"{k}.jpg", seed=k, size=(30, 18))
        lines.append(f"{k}.jpg,{lab},{s}")
    (src / "x.csv").write_text("\n".join(lines) + "\n")
    out = main(ImportConfig(format="csv", split_col="split", resolution=12, mode="L"), src, tmp_path / "out")
    meta, df = check_dataset(out, ["a", "b"], "other", "L", min_per_class=1)
    assert list(df.split) == ["train", "train", "val", "test"] * 2 and meta.resolution == 12
    with Image.open(out / df.image_path[0]) as im:
        assert im.size == (12, 12) and im.mode == "L"


@pytest.mark.parametrize(
    "mutate, expect",
    [
        (
            lambda src: (src / "imgs" / "benign_2.png").unlink(),
            r"labels.csv row 3: image file .*benign_2.png not found",
        ),
        (lambda src: _rewrite(src, "pid", "patient"), r"missing column 'pid'"),
        (lambda src: _rewrite(src, "Malignant", "Lymphoma"), r"labels.csv row 5: unknown label 'lymphoma'"),
        (
            lambda src: (src / "imgs" / "benign_1.png").write_bytes(b"\x89PNG garbage"),
            r"row 2: image .* does not decode",
        ),
    ],
)
def test_csv_bad_input_names_row_or_file(tmp_path: Path, mutate, expect):
    src = make_csv(tmp_path / "src")
    mutate(src)
    cfg = ImportConfig(
        format="csv", path_col="file", label_col="diagnosis", patient_col="pid", classes=["benign", "malignant"]
    )
    with pytest.raises(ImportError_, match=expect):
        main(cfg, src, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # atomic: nothing half-written


def _rewrite(src: Path, old: str, new: str) -> None:
    p = src / "labels.csv"
    p.write_text(p.read_text().replace(old, new))


# ------------------------------------------------------------------ imagefolder


def test_imagefolder_with_and_without_split(tmp_path: Path):
    src = tmp_path / "flat"
    for k in range(12):
        img(src / ("cat" if k % 2 else "dog") / f"pt{k // 4}_img{k}.png", seed=k)
    out = main(ImportConfig(format="imagefolder", patient_pattern=r"^(pt\d+)_"), src, tmp_path / "o1")
    _, df = check_dataset(out, ["cat", "dog"], "other", "RGB", min_per_class=1)
    assert set(df.patient_id) == {"pt0", "pt1", "pt2"} and len(df) == 12

    src = tmp_path / "split"
    for k in range(8):
        img(src / ("train" if k < 4 else "test") / ("a" if k % 2 else "b") / f"{k}.jpg", seed=k)
    out = main(ImportConfig(format="imagefolder"), src, tmp_path / "o2")
    _, df = check_dataset(out, ["a", "b"], "other", "RGB", min_per_class=1)
    assert sorted(df.split) == ["test"] * 4 + ["train"] * 4
    assert df.image_id.str.startswith(("train_", "test_")).all()

    with pytest.raises(ImportError_, match=r"does not match patient_pattern"):
        main(ImportConfig(format="imagefolder", patient_pattern=r"^(zz\d+)"), tmp_path / "flat", tmp_path / "o3")


# ------------------------------------------------------------------ Fitzpatrick17k


def test_fitzpatrick17k(tmp_path: Path):
    src = tmp_path / "fitz"
    lines = ["md5hash,fitzpatrick_scale,fitzpatrick_centaur,label,nine_partition_label,three_partition_label,qc,url"]
    labels = ["psoriasis", "melanoma", "vitiligo", "dermatofibroma"]  # the last is not in CRAFT's 20
    k = 0
    for lab in labels:
        for j in range(4):
            h = f"{k:032x}"
            img(src / "images" / f"{h}.jpg", seed=k)
            lines.append(f"{h},{j % 6 + 1},{j % 6 + 1},{lab},x,y,,http://example.invalid/{k}")
            k += 1
    (src / "fitzpatrick17k.csv").write_text("\n".join(lines) + "\n")
    out = main(ImportConfig(format="fitzpatrick17k"), src, tmp_path / "out")
    _, df = check_dataset(out, ["melanoma", "psoriasis", "vitiligo"], "derm", "RGB")
    assert len(df) == 12 and (df.patient_id == df.image_id).all()
    assert (df.split == "test").sum() == 6  # 50/50
    assert json.loads(df.attributes[0])["fitzpatrick_scale"] in range(1, 7)
    assert len(FITZPATRICK_CONDITIONS) == 20 and slug("Squamous cell carcinoma") == "squamous_cell_carcinoma"

    (src / "images" / f"{5:032x}.jpg").unlink()
    with pytest.raises(ImportError_, match=r"fitzpatrick17k.csv row 6: image file .*00005.jpg not found"):
        main(ImportConfig(format="fitzpatrick17k"), src, tmp_path / "out2")


# ------------------------------------------------------------------ CheXpert


CHEX_HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
    "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
    "Fracture,Support Devices"
)
CHEX_COLS = CHEX_HEADER.split(",")


def chex_row(rel: str, view: str, **labels) -> str:
    vals = {c: "" for c in CHEX_COLS}
    vals.update({"Path": rel, "Sex": "Female", "Age": "60", "Frontal/Lateral": view, "AP/PA": "AP"})
    for k, v in labels.items():
        vals[k.replace("_", " ")] = v
    return ",".join(vals[c] for c in CHEX_COLS)


def make_chexpert(tmp_path: Path) -> Path:
    root = tmp_path / "CheXpert-v1.0-small"
    classes = ["No_Finding", "Cardiomegaly", "Pleural_Effusion", "Pneumonia"]
    lines = {"train": [CHEX_HEADER], "valid": [CHEX_HEADER]}
    k = 0
    for p in range(12):
        part = "valid" if p >= 10 else "train"
        pid = f"patient{p + 1:05d}"
        cls = classes[p % 4]
        for view in ("frontal", "lateral"):
            rel = f"CheXpert-v1.0-small/{part}/{pid}/study1/view1_{view}.jpg"
            img(tmp_path / rel, seed=k, size=(24, 24), mode="L")
            lines[part].append(chex_row(rel, view.capitalize(), **{cls: "1.0"}))
            k += 1
        # excluded: two positives; uncertain target; only an ignored positive alongside the class (kept)
        rel = f"CheXpert-v1.0-small/{part}/{pid}/study2/view1_frontal.jpg"
        img(tmp_path / rel, seed=k, size=(24, 24), mode="L")
        lines[part].append(chex_row(rel, "Frontal", Cardiomegaly="1.0", Edema="1.0"))
        rel = f"CheXpert-v1.0-small/{part}/{pid}/study3/view1_frontal.jpg"
        img(tmp_path / rel, seed=k + 100, size=(24, 24), mode="L")
        lines[part].append(chex_row(rel, "Frontal", Pneumonia="-1.0", Pleural_Effusion="1.0"))
        rel = f"CheXpert-v1.0-small/{part}/{pid}/study4/view1_frontal.jpg"
        img(tmp_path / rel, seed=k + 200, size=(24, 24), mode="L")
        lines[part].append(chex_row(rel, "Frontal", **{cls: "1.0", "Support_Devices": "1.0"}))
    for part, ls in lines.items():
        (root / f"{part}.csv").write_text("\n".join(ls) + "\n")
    return root


def test_chexpert(tmp_path: Path):
    root = make_chexpert(tmp_path)
    out = main(ImportConfig(format="chexpert"), root, tmp_path / "out")
    _, df = check_dataset(
        out, ["cardiomegaly", "no_finding", "pleural_effusion", "pneumonia"], "cxr", "L", min_per_class=1
    )
    assert len(df) == 24  # study1 frontal + study4 frontal for 12 patients
    assert not df.image_path.str.contains("lateral").any()
    assert df.patient_id.str.fullmatch(r"patient\d{5}").all() and df.patient_id.nunique() == 12
    assert not df.image_id.str.contains("study2|study3").any()
    # the parent folder works as SRC too
    assert len(read_manifest(main(ImportConfig(format="chexpert"), tmp_path, tmp_path / "o2"))) == 24

    p = root / "train.csv"
    p.write_text(p.read_text().replace(",1.0,", ",yes,", 1))
    with pytest.raises(ImportError_, match=r"train.csv row \d+: column '.*' has 'yes'"):
        main(ImportConfig(format="chexpert"), root, tmp_path / "o3")


# ------------------------------------------------------------------ BreaKHis


def test_breakhis(tmp_path: Path):
    base = tmp_path / "BreaKHis_v1" / "histology_slides" / "breast"
    k = 0
    for group, code, types in (
        ("benign", "B", ["adenosis", "fibroadenoma"]),
        ("malignant", "M", ["ductal_carcinoma", "mucinous_carcinoma"]),
    ):
        for t in types:
            short = "".join(w[0].upper() for w in t.split("_"))
            for _ in range(2):
                pid = f"14-{k:05d}"
                slide = base / group / "SOB" / t / f"SOB_{code}_{short}_{pid}"
                for mag in ("40X", "100X"):
                    for j in range(2):
                        img(
                            slide / mag / f"SOB_{code}_{short}-{pid}-{mag[:-1]}-{j:03d}.png",
                            seed=k * 10 + j + len(mag),
                        )
                k += 1
    out = main(ImportConfig(format="breakhis"), tmp_path, tmp_path / "out")
    _, df = check_dataset(
        out, ["adenosis", "ductal_carcinoma", "fibroadenoma", "mucinous_carcinoma"], "histo", "RGB", min_per_class=2
    )
    assert len(df) == 16 and df.image_path.str.contains("-100-").all()
    assert df.patient_id.str.fullmatch(r"14-\d{5}").all()
    assert (df.groupby("label")["split"].nunique() == 2).all()  # stratified: 1 test patient per class

    (base / "benign" / "SOB" / "adenosis" / "not_a_slide").mkdir()
    with pytest.raises(ImportError_, match=r"not_a_slide: slide folder name"):
        main(ImportConfig(format="breakhis"), tmp_path, tmp_path / "o2")


# ------------------------------------------------------------------ ORIGA


def test_origa(tmp_path: Path):
    src = tmp_path / "ORIGA"
    lines = ["Eye,Filename,ExpCDR,Set,Glaucoma"]
    for k in range(8):
        img(src / "Images" / f"{k + 1:03d}.jpg", seed=k)
        lines.append(f"OD,{k + 1:03d}.jpg,0.5,{'A' if k < 4 else 'B'},{k % 2}")
    (src / "OrigaList.csv").write_text("\n".join(lines) + "\n")
    out = main(ImportConfig(format="origa"), src, tmp_path / "out")
    _, df = check_dataset(out, ["glaucoma", "non_glaucoma"], "fundus", "RGB", min_per_class=1)
    assert list(df.split) == ["train"] * 4 + ["test"] * 4
    assert list(df.label[:2]) == ["non_glaucoma", "glaucoma"]

    out = main(ImportConfig(format="origa", use_official_split=False), src, tmp_path / "o2")
    assert (read_manifest(out).split == "test").sum() == 4

    p = src / "OrigaList.csv"
    p.write_text(p.read_text().replace("A,1", "A,2"))
    with pytest.raises(ImportError_, match=r"OrigaList.csv row 2: Glaucoma '2' is not 0 or 1"):
        main(ImportConfig(format="origa"), src, tmp_path / "o3")


# ------------------------------------------------------------------ split logic


def test_patient_split_keeps_patients_together_and_refuses_conflicting_official_split():
    recs = [Record(src=Path(f"{i}.png"), label="ab"[i % 2], patient=f"p{i // 3}", image_id=str(i)) for i in range(30)]
    patient_split(recs, test_fraction=0.5, val_fraction=0.2, seed=3)
    by_patient = {}
    for r in recs:
        assert by_patient.setdefault(r.patient, r.split) == r.split
    assert {r.split for r in recs} == {"train", "val", "test"}

    bad = [
        Record(src=Path("a"), label="a", patient="p", image_id="1", split="train", where="x.csv row 1"),
        Record(src=Path("b"), label="a", patient="p", image_id="2", split="test", where="x.csv row 2"),
    ]
    with pytest.raises(ImportError_, match=r"x.csv row 2: patient 'p'"):
        patient_split(bad, 0.5, 0.0, 0)
