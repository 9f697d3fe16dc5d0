"""Paired-folder importer: GLySAC/CoNSeP (.mat / PNG instance maps) and HEMIT/SHIFT (paired folders) layouts."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.io
from PIL import Image

from craft.config import load_stage_config
from craft.data.importers import ImportError_
from craft.data.manifest import read_manifest, read_meta
from craft.data.paired import PairedImportConfig, main


def _he(rng, size=16):
    return rng.integers(0, 255, (size, size, 3), dtype=np.uint8)


def _inst(size=16):
    m = np.zeros((size, size), np.uint16)
    m[2:6, 2:6] = 1
    m[9:13, 8:14] = 2
    return m


def _consep_tree(root, rng):
    for split, stems in (("Train", ["train_1", "train_2"]), ("Test", ["test_1"])):
        (root / split / "Images").mkdir(parents=True)
        (root / split / "Labels").mkdir(parents=True)
        for s in stems:
            rgba = np.concatenate([_he(rng), np.full((16, 16, 1), 255, np.uint8)], axis=2)
            Image.fromarray(rgba, "RGBA").save(root / split / "Images" / f"{s}.png")  # CoNSeP ships RGBA
            scipy.io.savemat(root / split / "Labels" / f"{s}.mat",
                             {"inst_map": _inst().astype(np.float64), "type_map": np.zeros((16, 16))})  # fmt: skip


def test_consep_mat_layout_official_split(tmp_path):
    rng = np.random.default_rng(0)
    _consep_tree(tmp_path / "CoNSeP", rng)
    out = main(PairedImportConfig(layout="consep"), tmp_path / "CoNSeP", tmp_path / "ds")
    df = read_manifest(out)
    assert sorted(df["split"]) == ["test", "train", "train"]
    assert df["condition_path"].isna().all() and df["mask_path"].notna().all()
    m = np.asarray(Image.open(out / df["mask_path"].iloc[0]))
    assert m.dtype == np.uint16 and np.array_equal(m, _inst())
    img = Image.open(out / df["image_path"].iloc[0])
    assert img.mode == "RGB" and img.size == (16, 16)
    meta = read_meta(out)
    assert meta.classes == ["tissue"] and meta.resolution == 16
    assert json.loads(df["attributes"].iloc[0])["n_nuclei"] == 2


def test_instance_png_masks_tiles_and_patient_split(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "glysac"
    (src / "Images").mkdir(parents=True)
    (src / "Labels").mkdir(parents=True)
    for k in range(4):
        Image.fromarray(_he(rng, 32)).save(src / "Images" / f"g{k}.tif")
        big = np.zeros((32, 32), np.uint16)
        big[:16, :16] = _inst()
        big[16:, 16:] = _inst() * 3  # ids 3 and 6
        Image.fromarray(big).save(src / "Labels" / f"g{k}.png")
    cfg = PairedImportConfig(layout="glysac", tile=16, resolution=8, test_fraction=0.5)
    out = main(cfg, src, tmp_path / "ds")
    df = read_manifest(out)
    assert len(df) == 16 and read_meta(out).resolution == 8
    # the tiles of one source image share its patient and split
    assert df.groupby("patient_id")["split"].nunique().max() == 1 and df["patient_id"].nunique() == 4
    assert set(df["split"]) == {"train", "test"}
    m = np.asarray(Image.open(out / df["mask_path"].iloc[-1]))
    assert m.shape == (8, 8) and set(np.unique(m)) <= {0, 3, 6}  # nearest resize keeps ids


def test_instance_layout_errors_name_the_file(tmp_path):
    rng = np.random.default_rng(2)
    src = tmp_path / "c"
    (src / "Images").mkdir(parents=True)
    (src / "Labels").mkdir(parents=True)
    Image.fromarray(_he(rng)).save(src / "Images" / "a.png")
    with pytest.raises(ImportError_, match="a.png: no instance map"):
        main(PairedImportConfig(layout="instance"), src, tmp_path / "o")
    scipy.io.savemat(src / "Labels" / "a.mat", {"other": np.zeros((16, 16))})
    with pytest.raises(ImportError_, match="a.mat: no variable 'inst_map'"):
        main(PairedImportConfig(layout="instance"), src, tmp_path / "o")
    scipy.io.savemat(src / "Labels" / "a.mat", {"inst_map": np.zeros((8, 8))})
    with pytest.raises(ImportError_, match="differs from its pair"):
        main(PairedImportConfig(layout="instance"), src, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_hemit_pairs_layout_channel_and_captions(tmp_path):
    rng = np.random.default_rng(3)
    src = tmp_path / "HEMIT"
    for split in ("train", "val", "test"):
        (src / split / "input").mkdir(parents=True)
        (src / split / "label").mkdir(parents=True)
        for k in range(2):
            Image.fromarray(_he(rng)).save(src / split / "input" / f"{split}{k}.tif")
            mihc = np.zeros((16, 16, 3), np.uint8)
            mihc[..., 0] = 200  # nuclei channel
            mihc[..., 1] = 17
            Image.fromarray(mihc).save(src / split / "label" / f"{split}{k}.tif")
    (src / "captions.csv").write_text("file,caption\ntrain0.tif,breast tissue with tumour cells\n")
    cfg = PairedImportConfig(layout="hemit", condition_channel=1, caption_file="captions.csv")
    out = main(cfg, src, tmp_path / "ds")
    df = read_manifest(out)
    assert sorted(df["split"].unique()) == ["test", "train", "val"] and len(df) == 6
    assert df["mask_path"].isna().all() and df["condition_path"].notna().all()
    c = np.asarray(Image.open(out / df["condition_path"].iloc[0]))
    assert c.ndim == 2 and c.dtype == np.uint8 and (c == 17).all()
    caps = dict(zip(df["image_id"], df["caption"]))
    assert caps["train_train0"] == "breast tissue with tumour cells" and caps["train_train1"] is pd.NA


def test_shift_pairs_unmatched_and_16bit(tmp_path):
    src = tmp_path / "SHIFT"
    (src / "HE").mkdir(parents=True)
    (src / "IF").mkdir(parents=True)
    rng = np.random.default_rng(4)
    for k in range(4):
        Image.fromarray(_he(rng)).save(src / "HE" / f"t{k}.png")
        Image.fromarray((np.arange(256).reshape(16, 16) * 100).astype(np.uint16)).save(src / "IF" / f"t{k}.png")
    out = main(PairedImportConfig(layout="shift", test_fraction=0.5), src, tmp_path / "ds")
    df = read_manifest(out)
    c = np.asarray(Image.open(out / df["condition_path"].iloc[0]))
    assert c.min() == 0 and c.max() == 255  # 16-bit range rescaled to 8 bits
    assert sorted(df["split"].value_counts().tolist()) == [2, 2]
    Image.fromarray(_he(rng)).save(src / "HE" / "lonely.png")
    with pytest.raises(ImportError_, match="lonely.png: no file with the same name"):
        main(PairedImportConfig(layout="shift"), src, tmp_path / "ds2")


def test_config_registered_and_validated():
    from craft.config import ConfigError

    cfg = load_stage_config("import_paired", None, ["layout=hemit"])
    assert cfg.folders() == ("label", "input")
    with pytest.raises(ConfigError, match="layout"):
        load_stage_config("import_paired", None, ["layout=monusac"])
