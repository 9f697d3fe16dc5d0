"""craft.evaluate.metrics against hand-computed cases, scikit-learn and torchmetrics."""

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import silhouette_score
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from craft.evaluate import metrics as M


def test_per_image_cas_is_mean_of_primitives():
    cas = M.per_image_cas([0.2, 0.0], [0.1, 0.4], [1.0, 0.0], [0.5, 0.8])
    assert np.allclose(cas, [0.45, 0.3])


def test_per_image_cas_rejects_length_mismatch_and_nan():
    with pytest.raises(ValueError, match="ccs"):
        M.per_image_cas([0.1, 0.2], [0.1], [1, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="sfs: non-finite value at index 1"):
        M.per_image_cas([0.1, 0.2], [0.1, 0.2], [1, 0], [0.1, np.nan])


def test_dd_correct_is_probe_accuracy_indicator():
    dd = M.dd_correct(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2]))
    assert dd.tolist() == [1.0, 1.0, 0.0, 1.0]
    assert dd.mean() == 0.75


def test_low_alignment_rate_is_strict_at_ties():
    real = [0.1, 0.2, 0.3, 0.4, 0.5]  # P25 with linear interpolation = 0.2
    assert M.low_alignment_threshold(real) == pytest.approx(0.2)
    # 0.2 ties the threshold: not counted; only 0.1 and 0.15 are strictly below
    assert M.low_alignment_rate([0.1, 0.15, 0.2, 0.2, 0.9], real) == pytest.approx(2 / 5)
    assert M.low_alignment_rate([0.2, 0.2], [0.2, 0.2, 0.2]) == 0.0


def test_percentile_matches_hand_interpolation():
    assert M.percentile([1, 2, 3, 4], 10) == pytest.approx(1.3)  # 1 + 0.1 * 3 * (2 - 1)
    with pytest.raises(ValueError):
        M.percentile([1, 2], 101)


def test_fid_known_gaussian_case():
    # 1-D: real {-sqrt2, sqrt2} (mean 0, unbiased var 4), gen {3 -+ 1/sqrt2} (mean 3, var 1):
    # (m1 - m2)^2 + (s1 - s2)^2 = 9 + 1 (the library cross-check is in test_library_metrics.py)
    r2 = np.sqrt(2.0)
    real, gen = np.array([[-r2], [r2]]), np.array([[3 - 1 / r2], [3 + 1 / r2]])
    assert M.fid_from_embeddings(real, gen) == pytest.approx(10.0, rel=1e-9)
    x = np.random.default_rng(0).normal(size=(30, 4))
    assert M.fid_from_embeddings(x, x) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="at least 2 embeddings"):
        M.fid_from_embeddings(x[:1], x)


def test_fid_handles_rank_deficient_covariances():
    rng = np.random.default_rng(1)
    real, gen = rng.normal(size=(5, 16)), rng.normal(size=(6, 16))  # n < d: singular covariances
    fd = M.fid_from_embeddings(real, gen)
    assert np.isfinite(fd) and fd > 0
    with pytest.raises(ValueError, match="gen: dimension"):
        M.fid_from_embeddings(real, gen[:, :3])


def test_cosine_similarities_by_hand():
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([[0.0, 2.0], [2.0, 2.0]])
    assert np.allclose(M.paired_cosine(a, b), [0.0, 1.0])
    assert M.image_image_similarity(a, b) == pytest.approx(0.5)
    assert M.image_text_similarity(b, a) == pytest.approx(0.5)


def test_silhouette_matches_sklearn():
    rng = np.random.default_rng(2)
    emb = np.concatenate([rng.normal(c, 1.0, size=(n, 8)) for c, n in ((0, 20), (2, 15), (-1, 1), (4, 9))])
    labels = np.repeat(["a", "b", "c", "d"], [20, 15, 1, 9])  # includes a singleton class
    assert M.silhouette(emb, labels) == pytest.approx(silhouette_score(emb, labels), abs=1e-9)


def test_silhouette_hand_case():
    # points 0, 1 (class a) and 10 (class b): a = 1 for both, b = 10 and 9; singleton -> 0
    x = np.array([[0.0], [1.0], [10.0]])
    want = np.mean([(10 - 1) / 10, (9 - 1) / 9, 0.0])
    assert M.silhouette(x, ["a", "a", "b"]) == pytest.approx(want)


def _imgs(seed, n=4, shape=(32, 32, 3)):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)


def test_ssim_psnr_match_torchmetrics_modules():
    x = _imgs(0)
    y = np.clip(x.astype(int) + np.random.default_rng(1).integers(-30, 30, size=x.shape), 0, 255).astype(np.uint8)
    tx = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    ty = torch.from_numpy(y).permute(0, 3, 1, 2).float() / 255
    want_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)(tx, ty).item()
    assert M.ssim(x, y).mean() == pytest.approx(want_ssim, abs=1e-5)
    want_psnr = [PeakSignalNoiseRatio(data_range=1.0)(tx[i : i + 1], ty[i : i + 1]).item() for i in range(len(x))]
    assert np.allclose(M.psnr(x, y), want_psnr, atol=1e-3)
    assert np.allclose(M.ssim(x, x), 1.0, atol=1e-6)


def test_mse_ncc_psnr_by_hand():
    x = np.zeros((1, 2, 2), dtype=np.float64)
    y = np.full((1, 2, 2), 0.5)
    assert M.mse(x, y)[0] == pytest.approx(0.25)
    assert M.psnr(x, y)[0] == pytest.approx(10 * np.log10(1 / 0.25))
    a = np.array([[[0.0, 0.2], [0.4, 0.6]]])
    assert M.ncc(a, 0.5 * a + 0.1)[0] == pytest.approx(1.0)
    assert M.ncc(a, 1.0 - a)[0] == pytest.approx(-1.0)
    assert M.ncc(a, y)[0] == 0.0  # flat image
    with pytest.raises(ValueError, match="float images must lie in"):
        M.mse(x + 2, y)


def test_prompt_diversity_hand_case_and_collapse():
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [5.0, 5.0]])
    ids = ["p", "p", "q", "q", "r"]  # p: distance 1, q: distance 0, r: single sample skipped
    assert M.prompt_diversity(emb, ids) == pytest.approx(0.5)
    imgs = _imgs(3, n=4)
    assert M.pixel_diversity(np.stack([imgs[0]] * 4), [0, 0, 1, 1]) == pytest.approx(0.0, abs=1e-6)
    assert M.pixel_diversity(imgs, [0, 0, 1, 1]) > 0.5


def test_variant_table_shape_and_values():
    real = pd.DataFrame({"variant": "real", "vdc": 0.2, "ccs": 0.2, "dd": 1.0, "sfs": 1.0}, index=range(4))
    real.loc[:, "dd"] = [1.0, 1.0, 0.0, 1.0]  # CAS 0.6, 0.6, 0.35, 0.6 -> P25 = 0.5375
    gen = pd.DataFrame({"variant": "craft", "vdc": [0.1, 0.3], "ccs": [0.1, 0.3], "dd": [0.0, 1.0], "sfs": [0.5, 0.9]})
    t = M.variant_table(pd.concat([gen, real], ignore_index=True))
    assert list(t["variant"]) == ["real", "craft"]
    assert list(t.columns) == ["variant", "n", "vdc", "ccs", "dd", "sfs", "cas", "real_p25", "low_cas_rate", "cas_p10"]
    row = t.set_index("variant").loc["craft"]
    assert row["cas"] == pytest.approx(np.mean([0.175, 0.625]))
    assert row["real_p25"] == pytest.approx(0.5375)
    assert row["low_cas_rate"] == 0.5
    assert row["cas_p10"] == pytest.approx(0.175 + 0.1 * (0.625 - 0.175))
    bad = gen.assign(cas=[0.0, 0.0])
    with pytest.raises(ValueError, match="row 0 has cas"):
        M.variant_table(bad)


# ----------------------------------------------------------------------------------------------
# report.py


def test_report_figures_are_pngs_and_pca_is_correct():
    from PIL import Image

    from craft.evaluate import report as R

    rng = np.random.default_rng(0)
    png = R.tail_cdf_png({"real": rng.random(50), "craft": rng.random(40)}, threshold=0.25)
    assert Image.open(__import__("io").BytesIO(png)).size == (720, 420)
    # PCA: points on a line along (1, 1, 0) -> first component carries everything
    t = np.linspace(-1, 1, 9)
    xy = R.pca_2d(np.stack([t, t, np.zeros_like(t)], 1) + 5)
    assert np.allclose(np.abs(xy[:, 0]), np.abs(t) * np.sqrt(2)) and np.allclose(xy[:, 1], 0, atol=1e-9)
    emb = R.embedding_map_png(rng.normal(size=(20, 5)), ["a", "b"] * 10, markers=[True] * 10 + [False] * 10)
    grid = R.image_grid_png({"normal": [np.zeros((8, 8, 3), np.uint8)] * 3, "adenoma": [np.ones((8, 8))] * 2})
    for data in (emb, grid):
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="empty or non-finite"):
        R.tail_cdf_png({"x": []}, 0.1)


def test_confusion_matrix_matches_sklearn():
    from sklearn.metrics import confusion_matrix as sk_cm

    from craft.evaluate import report as R

    t, p = ["a", "b", "b", "c", "a"], ["a", "b", "a", "c", "c"]
    assert np.array_equal(R.confusion_matrix(t, p, ["a", "b", "c"]), sk_cm(t, p, labels=["a", "b", "c"]))
    html = R.confusion_table_html(R.confusion_matrix(t, p, ["a", "b", "c"]), ["a", "b", "c"])
    assert html.count("<tr>") == 4
    with pytest.raises(ValueError, match="y_pred: 'z' is not one of"):
        R.confusion_matrix(["a"], ["z"], ["a"])


def test_build_report_is_self_contained_and_writes_outputs(tmp_path):
    import json

    from craft.evaluate import report as R

    per = pd.DataFrame({"variant": ["real", "craft"], "vdc": [0.1, 0.2], "ccs": 0.1, "dd": 1.0, "sfs": [1.0, 0.5]})
    png = R.tail_cdf_png({"craft": [0.3, 0.4]}, 0.35)
    grid = tmp_path / "grid.png"
    grid.write_bytes(R.image_grid_png({"x": [np.zeros((8, 8), np.uint8)]}))
    out = R.build_report(
        tmp_path / "rep",
        {"Table 1": M.variant_table(per), "Confusion": R.confusion_table_html(np.eye(2, dtype=int), ["a", "b"])},
        {"Tail": png},
        {"Grid": grid},
        notes=["<b>not html</b>"],
        metrics={"fid": float("nan"), "cas": np.float32(0.5)},
        per_image=per,
    )
    text = out.read_text()
    assert text.count("data:image/png;base64,") == 2 and "&lt;b&gt;not html&lt;/b&gt;" in text
    assert 'src="http' not in text and "Table 1" in text
    assert json.loads((tmp_path / "rep" / "metrics.json").read_text()) == {"cas": 0.5, "fid": None}
    assert pd.read_parquet(tmp_path / "rep" / "per_image.parquet").equals(per)
    assert not [p for p in (tmp_path / "rep").iterdir() if ".tmp" in p.name]
    with pytest.raises(ValueError, match="expected PNG bytes"):
        R.build_report(tmp_path / "bad", {}, {"x": b"GIF89a"})


def test_report_shows_the_metric_implementations(tmp_path):
    from craft.evaluate import report as R

    impl = M.implementations()
    out = R.build_report(tmp_path, {"t": pd.DataFrame({"a": [1.0]})}, implementations=impl)
    page = out.read_text()
    assert "<h2>Metric implementations</h2>" in page
    for k, v in impl.items():
        assert f"<th>{k}</th>" in page and v in page
