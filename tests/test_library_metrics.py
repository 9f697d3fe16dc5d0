"""Every metric cross-checked against a standard library on the same inputs (issue 22).

Each test feeds the same numbers to craft's function and to the library's own public entry point
(scikit-learn, torchmetrics, choix, scipy), so a wrong argument (ddof, data range, label order,
reduction) or a stale hand-written copy shows up as a mismatch. The EMA of the training loop is
checked against diffusers' documented schedule in tests/test_train_loop.py.
"""

from importlib.metadata import version

import numpy as np
import pytest
import torch

from craft.evaluate import metrics as M


def _pairs(seed: int, n: int = 5, shape=(24, 24, 3)):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    noise = rng.integers(-40, 40, size=x.shape)
    y = np.clip(x.astype(int) + noise * rng.random((n, 1, 1, 1)).round(1), 0, 255).astype(np.uint8)
    # the library sees the very tensors our functions compute on (uint8 / 255 in float32, then float64)
    return x, y, M.as_image_tensor(x).double(), M.as_image_tensor(y).double()


# ---------------------------------------------------------------------------------------- embeddings


def test_silhouette_equals_sklearn():
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(2)
    emb = np.concatenate([rng.normal(c, 1.0, size=(n, 6)) for c, n in ((0, 12), (2, 9), (-1, 1), (4, 7))])
    labels = np.repeat(["a", "b", "c", "d"], [12, 9, 1, 7])  # a singleton class scores 0 in both
    assert M.silhouette(emb, labels) == pytest.approx(silhouette_score(emb, labels, metric="euclidean"), abs=1e-12)


def test_fid_equals_torchmetrics_and_the_scipy_sqrtm_formula():
    """torchmetrics' FrechetInceptionDistance over the same features, and the classic pytorch-fid formula
    (scipy sqrtm of S1 S2, an independent route to Tr((S1 S2)^1/2))."""
    import scipy.linalg
    from torchmetrics.image.fid import FrechetInceptionDistance

    rng = np.random.default_rng(0)
    real = rng.normal(size=(120, 6))
    gen = rng.normal(loc=0.3, scale=1.2, size=(90, 6)) @ rng.normal(size=(6, 6)) * 0.5
    ours = M.fid_from_embeddings(real, gen)

    class Ident(torch.nn.Module):
        num_features = 6

        def forward(self, x):
            return x

    lib = FrechetInceptionDistance(feature=Ident())
    lib.update(torch.from_numpy(real), real=True)
    lib.update(torch.from_numpy(gen), real=False)
    assert ours == pytest.approx(float(lib.compute()), rel=1e-9)

    mu1, mu2 = real.mean(0), gen.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(gen, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    classic = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert ours == pytest.approx(classic, rel=1e-8)


def test_fid_rank_deficient_equals_the_symmetric_psd_route():
    """n < d (singular covariances): Tr((S1 S2)^1/2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), a symmetric PSD
    eigenproblem (scipy eigh) that stays exact where sqrtm(S1 S2) needs pytorch-fid's eps * I."""
    import scipy.linalg

    rng = np.random.default_rng(1)
    real, gen = rng.normal(size=(8, 20)), rng.normal(loc=0.2, size=(9, 20))
    s1, s2 = np.cov(real, rowvar=False), np.cov(gen, rowvar=False)
    w, v = scipy.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sum(np.sqrt(np.clip(scipy.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)))
    exact = np.sum((real.mean(0) - gen.mean(0)) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert M.fid_from_embeddings(real, gen) == pytest.approx(exact, rel=1e-7)


def test_paired_cosine_and_diversity_equal_sklearn_cosine():
    from sklearn.metrics.pairwise import cosine_distances, cosine_similarity

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
    assert np.allclose(M.paired_cosine(a, b), np.diag(cosine_similarity(a, b)), atol=1e-12)
    ids = np.array([0, 0, 0, 1, 1, 2, 2])
    want = []
    for g in (0, 1, 2):
        d = cosine_distances(a[ids == g])
        want.append(d[np.triu_indices(len(d), 1)].mean())
    assert M.prompt_diversity(a, ids) == pytest.approx(np.mean(want), abs=1e-12)


# ---------------------------------------------------------------------------------------- paired images


def test_mse_ncc_psnr_ssim_equal_torchmetrics_modules():
    from torchmetrics import MeanSquaredError, PearsonCorrCoef
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    x, y, tx, ty = _pairs(0)
    for i in range(len(x)):  # one fresh metric object per pair: per-pair values, as our functions return
        a, b = tx[i : i + 1], ty[i : i + 1]
        assert M.mse(x, y)[i] == pytest.approx(
            MeanSquaredError().set_dtype(torch.float64)(a.flatten(), b.flatten()).item(), rel=1e-9
        )
        r = PearsonCorrCoef().set_dtype(torch.float64)(a.flatten(), b.flatten()).item()
        assert M.ncc(x, y)[i] == pytest.approx(r, abs=1e-9)
        assert M.ncc(x, y)[i] == pytest.approx(np.corrcoef(a.flatten(), b.flatten())[0, 1], abs=1e-9)
        assert M.psnr(x, y)[i] == pytest.approx(
            PeakSignalNoiseRatio(data_range=1.0).set_dtype(torch.float64)(a, b).item(), abs=1e-6
        )
        ssim_lib = StructuralSimilarityIndexMeasure(data_range=1.0)(a.float(), b.float()).item()
        assert M.ssim(x, y)[i] == pytest.approx(ssim_lib, abs=1e-5)
    # a single pair goes through the 1-output path of the library calls
    assert M.mse(x[:1], y[:1])[0] == pytest.approx(M.mse(x, y)[0], rel=1e-12)
    assert M.ncc(x[:1], y[:1])[0] == pytest.approx(M.ncc(x, y)[0], rel=1e-12)


def test_batched_memorization_ssim_equals_torchmetrics():
    """The batched SSIM of craft.evaluate.memorization (kept for speed, bench/bench_memorization.py) against
    torchmetrics' SSIM over every (generated, reference) pair."""
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    from craft.evaluate.memorization import max_ssim_to_reference

    rng = np.random.default_rng(5)
    ref = rng.integers(0, 256, size=(6, 20, 20, 3), dtype=np.uint8)
    gen = np.clip(ref[[1, 4, 0]].astype(int) + rng.integers(-25, 25, size=(3, 20, 20, 3)), 0, 255).astype(np.uint8)
    best, arg = max_ssim_to_reference(gen, ref, top_k="all", device="cpu")
    tg, tr = M.as_image_tensor(gen), M.as_image_tensor(ref)
    full = np.array(
        [[tm_ssim(tg[i : i + 1], tr[j : j + 1], data_range=1.0).item() for j in range(len(ref))] for i in range(3)]
    )
    assert np.allclose(best, full.max(1), atol=1e-5)
    assert list(arg) == list(full.argmax(1)) == [1, 4, 0]


# ---------------------------------------------------------------------------------------- report, preferences


def test_report_confusion_matrix_equals_sklearn():
    from sklearn.metrics import confusion_matrix

    from craft.evaluate import report as R

    rng = np.random.default_rng(4)
    classes = ["normal", "adenoma", "adenocarcinoma"]
    t, p = rng.choice(classes, 40), rng.choice(classes, 40)
    assert np.array_equal(R.confusion_matrix(t, p, classes), confusion_matrix(t, p, labels=classes))
    ti, pi = rng.integers(0, 3, 30), rng.integers(0, 3, 30)
    assert np.array_equal(R.confusion_matrix(ti, pi, classes), confusion_matrix(ti, pi, labels=[0, 1, 2]))
    with pytest.raises(ValueError, match="y_true: index 3 outside 0..2"):
        R.confusion_matrix([3], [0], classes)


def test_bradley_terry_equals_choix_mm_on_the_same_comparisons():
    """Our fit (choix ILSR on the wins matrix) against choix's MM algorithm on the same comparisons as
    (winner, loser) tuples: two algorithms, one maximum-likelihood estimate."""
    import choix

    from craft.evaluate import preferences as P

    rng = np.random.default_rng(6)
    wins = rng.integers(1, 9, size=(4, 4)).astype(float)
    np.fill_diagonal(wins, 0)
    data = [(i, j) for i in range(4) for j in range(4) for _ in range(int(wins[i, j]))]
    mm = choix.mm_pairwise(4, data, tol=1e-12, max_iter=100000)
    assert np.allclose(P.fit_bradley_terry(wins, prior=0.0), mm - mm.mean(), atol=1e-6)
    # the prior is virtual wins: the same as an integer prior written out as extra comparisons
    data1 = data + [(i, j) for i in range(4) for j in range(4) if i != j]
    mm1 = choix.mm_pairwise(4, data1, tol=1e-12, max_iter=100000)
    assert np.allclose(P.fit_bradley_terry(wins, prior=1.0), mm1 - mm1.mean(), atol=1e-6)


# ---------------------------------------------------------------------------------------- provenance


def test_implementations_name_every_metric_with_the_installed_version():
    impl = M.implementations()
    for key in ("fid", "silhouette", "diversity", "ssim", "mse", "ncc", "psnr", "confusion_matrix", "bradley_terry",
                "memorization_ssim", "image_image", "image_text", "cas", "low_cas_rate"):  # fmt: skip
        assert key in impl, key
    assert impl["silhouette"].endswith(f"scikit-learn {version('scikit-learn')}")
    assert impl["fid"].endswith(f"torchmetrics {version('torchmetrics')}")
    assert impl["bradley_terry"].endswith(f"choix {version('choix')}")
    assert "LPIPS unavailable" in impl["diversity"]
