"""craft.evaluate.memorization: pHash vs imagehash, chunked searches vs brute force, planted duplicates, top-k SSIM."""

import imagehash
import numpy as np
import pytest
from PIL import Image

from craft.config import config_dir, load_stage_config
from craft.data.demo import CLASSES, render_one
from craft.evaluate import memorization as mem
from craft.evaluate.metrics import ssim


def _demo(modality, n, seed):
    rng = np.random.default_rng(seed)
    imgs = [render_one(modality, CLASSES[modality][i % 4], rng, 48)[0] for i in range(n)]
    return np.stack([np.asarray(im) for im in imgs])


def test_phash_bits_equal_imagehash():
    rng = np.random.default_rng(0)
    imgs = list(_demo("histo", 6, 1)) + list(_demo("cxr", 6, 2)) + [rng.integers(0, 256, (40, 56, 3), np.uint8)]
    for a in imgs:
        pil = Image.fromarray(a)
        ours = mem.phash_bits([pil])[0]
        theirs = imagehash.phash(pil).hash.reshape(-1)
        assert np.array_equal(ours, theirs)
        ours16 = mem.phash_bits([pil], hash_size=16)[0]
        assert np.array_equal(ours16, imagehash.phash(pil, hash_size=16).hash.reshape(-1))


def test_packed_hamming_equals_brute_force():
    rng = np.random.default_rng(3)
    a, b = rng.random((37, 100)) > 0.5, rng.random((53, 100)) > 0.5  # 100 bits -> 2 words
    dmin, arg, cnt = mem.hamming_nearest(mem.pack_bits(a), mem.pack_bits(b), threshold=45, chunk=8)
    brute = np.array([[np.sum(x != y) for y in b] for x in a])
    assert np.array_equal(dmin, brute.min(1))
    assert np.array_equal(brute[np.arange(len(a)), arg], brute.min(1))
    assert np.array_equal(cnt, (brute <= 45).sum(1))


def test_chunked_nearest_cosine_equals_brute_force():
    rng = np.random.default_rng(4)
    q, r = rng.normal(size=(41, 16)), rng.normal(size=(29, 16))
    d, i = mem.nearest_cosine_distance(q, r, chunk=7)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    rn = r / np.linalg.norm(r, axis=1, keepdims=True)
    brute = 1 - qn @ rn.T
    assert np.allclose(d, brute.min(1), atol=1e-5)
    assert np.array_equal(i, brute.argmin(1))


def test_exact_ssim_search_matches_torchmetrics_and_topk_finds_copies():
    gen, train = _demo("histo", 8, 10), _demo("histo", 24, 11)
    gen[3] = train[17]  # a planted copy
    exact, exact_idx = mem.max_ssim_to_reference(gen, train, top_k="all")
    topk, topk_idx = mem.max_ssim_to_reference(gen, train, top_k=8)
    assert exact_idx[3] == 17 and exact[3] == pytest.approx(1.0, abs=1e-6)
    assert topk_idx[3] == 17 and topk[3] == pytest.approx(1.0, abs=1e-6)  # the copy is in the top-k
    assert np.all(topk <= exact + 1e-12)  # top-k is a lower bound for non-duplicates
    # exact search == torchmetrics SSIM on every pair (float32 round-off), one batched call
    gi, ti = np.repeat(np.arange(4), len(train)), np.tile(np.arange(len(train)), 4)
    brute = ssim(gen[gi], train[ti]).reshape(4, len(train))
    assert np.allclose(exact[:4], brute.max(1), atol=1e-4)
    assert np.array_equal(exact_idx[:4], brute.argmax(1))


def test_memorization_report_finds_planted_duplicate_and_gap():
    gen, train, test = _demo("histo", 10, 20), _demo("histo", 30, 21), _demo("histo", 20, 22)
    gen[0] = train[5]
    # a slightly noised copy: still an SSIM and pHash near-duplicate
    noisy = np.clip(train[9].astype(int) + np.random.default_rng(0).integers(-2, 3, train[9].shape), 0, 255)
    gen[1] = noisy.astype(np.uint8)
    rng = np.random.default_rng(5)
    train_emb, test_emb = rng.normal(size=(30, 8)), rng.normal(size=(20, 8))
    gen_emb = rng.normal(size=(10, 8))
    gen_emb[0] = train_emb[5]  # memorised in feature space too: d_train = 0
    per = mem.memorization_per_image(gen, train, test, gen_emb, train_emb, test_emb)
    assert per.loc[0, "max_ssim_train_index"] == 5 and per.loc[0, "min_phash_train"] == 0
    assert bool(per.loc[1, "ssim_duplicate"]) and bool(per.loc[1, "phash_duplicate"])
    assert per.loc[0, "d_train"] == pytest.approx(0.0, abs=1e-6) and per.loc[0, "nn_gap"] > 0
    rep = mem.memorization_report(gen, train, test, gen_emb, train_emb, test_emb)
    assert rep["ssim_duplicates"] == 2 and rep["any_duplicates"] >= 2
    assert rep["max_ssim"] == pytest.approx(1.0, abs=1e-6) and rep["min_phash_distance"] == 0
    assert rep["gap"] == pytest.approx(float(np.mean(per["d_test"] - per["d_train"])))
    # fresh images of the same generator are not duplicates of each other
    assert not per.loc[2:, "ssim_duplicate"].any()


def test_memorization_rejects_mismatched_inputs():
    gen, train = _demo("cxr", 4, 1), _demo("cxr", 5, 2)
    with pytest.raises(ValueError, match="gen_emb: 3 rows but 4"):
        mem.memorization_per_image(gen, train, train, np.zeros((3, 2)), np.ones((5, 2)), np.ones((5, 2)))


def _plant_near_copies(gen, train, rng):
    """Rows 0-3 of ``gen`` become near-copies of training images 7, 2, 11, 19: exact, noised, brighter, re-saved."""
    gen[0] = train[7]
    gen[1] = np.clip(train[2].astype(int) + rng.integers(-3, 4, train[2].shape), 0, 255).astype(np.uint8)
    gen[2] = np.clip(train[11].astype(int) + 4, 0, 255).astype(np.uint8)
    gen[3] = (train[19].astype(np.float32) * 0.97 + 4).astype(np.uint8)
    return {0: 7, 1: 2, 2: 11, 3: 19}


@pytest.mark.parametrize("modality", ["cxr", "histo"])
def test_top_k_search_finds_the_same_duplicates_as_exhaustive(modality):
    # radiographs all look alike at 16x16, the hard case for a thumbnail prefilter
    gen, train, test = _demo(modality, 12, 30), _demo(modality, 40, 31), _demo(modality, 8, 32)
    planted = _plant_near_copies(gen, train, np.random.default_rng(1))
    rng = np.random.default_rng(2)
    ge, tre, tee = rng.normal(size=(12, 8)), rng.normal(size=(40, 8)), rng.normal(size=(8, 8))  # uninformative
    full = mem.memorization_per_image(gen, train, test, ge, tre, tee, ssim_top_k="all")
    topk = mem.memorization_per_image(gen, train, test, ge, tre, tee, ssim_top_k=3)
    assert full["ssim_duplicate"].sum() >= len(planted)
    assert np.array_equal(topk["ssim_duplicate"], full["ssim_duplicate"])
    dup = full["ssim_duplicate"].to_numpy()
    assert np.array_equal(topk.loc[dup, "max_ssim_train_index"], full.loc[dup, "max_ssim_train_index"])
    assert np.allclose(topk.loc[dup, "max_ssim_train"], full.loc[dup, "max_ssim_train"])
    assert {i: int(full.loc[i, "max_ssim_train_index"]) for i in planted} == planted
    assert np.all(topk["max_ssim_train"] <= full["max_ssim_train"] + 1e-12)  # a lower bound elsewhere
    # the summary says which search ran
    s_full, s_top = mem.memorization_summary(full), mem.memorization_summary(topk)
    assert (s_full["ssim_search"], s_full["ssim_top_k"], s_full["ssim_prefilter"]) == ("exhaustive", None, None)
    assert s_full["ssim_pairs"] == 12 * 40
    assert (s_top["ssim_search"], s_top["ssim_top_k"]) == ("top_k", 3)
    assert s_top["ssim_prefilter"].startswith(mem.PREFILTER) and 12 * 3 <= s_top["ssim_pairs"] <= 12 * 5
    assert s_top["ssim_duplicates"] == s_full["ssim_duplicates"]


def test_ssim_search_chunks_do_not_change_the_result(monkeypatch):
    gen, train = _demo("histo", 9, 40), _demo("histo", 17, 41)
    for k in ("all", 4):
        big = mem.max_ssim_to_reference(gen, train, top_k=k, device="cpu")
        # budgets of a few maps: one generated image per chunk, one pair per batch
        with monkeypatch.context() as mp:
            mp.setattr(mem, "_PAIR_BUDGET_CPU", 48 * 48 * 3 * 4 * 14)
            small = mem.max_ssim_to_reference(gen, train, top_k=k, device="cpu", mem_budget=48 * 48 * 3 * 4 * 6)
        assert np.array_equal(big[1], small[1]) and np.allclose(big[0], small[0], atol=1e-6)
    # float input, a k above the training set size = exhaustive
    f = mem.max_ssim_to_reference(gen / 255.0, train / 255.0, top_k=100)
    e = mem.max_ssim_to_reference(gen, train, top_k="all")
    assert np.array_equal(f[1], e[1]) and np.allclose(f[0], e[0], atol=1e-6)


def test_top_k_setting_is_checked():
    assert mem.resolve_top_k(8, 100) == 8 and mem.resolve_top_k(8, 8) is None and mem.resolve_top_k("all", 5) is None
    for bad in (0, -1, "some", 2.5, True):
        with pytest.raises(ValueError, match="ssim_top_k"):
            mem.resolve_top_k(bad, 100)


def test_every_profile_defaults_to_the_top_k_search():
    names = sorted(p.stem for p in config_dir().glob("*.yaml") if p.stem != "gates")
    assert {"chexpert", "breakhis", "fitzpatrick17k", "origa", "demo-histo"} <= set(names)
    for name in names:
        k = load_stage_config("evaluate", name).memorization.ssim_top_k
        assert isinstance(k, int) and 1 <= k <= mem.DEFAULT_SSIM_TOP_K, (name, k)
    exhaustive = load_stage_config("evaluate", "chexpert", ["memorization.ssim_top_k=all"])
    assert exhaustive.memorization.ssim_top_k == mem.EXHAUSTIVE
