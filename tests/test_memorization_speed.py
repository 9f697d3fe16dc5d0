"""The fast memorization searches give exactly the exhaustive answer: bf16/fp32 prefilter + float64 rescore for the
nearest neighbour, blocked XOR/popcount for pHash, and imagehash's pHash behind ``phash_bits``."""

import imagehash
import numpy as np
import pytest
import torch
from PIL import Image

from craft.evaluate import memorization as mem


def _brute_nn(q, r):
    """float64 cosine of the float32 inputs (what the search promises), first index on ties."""
    q, r = np.asarray(q, np.float32).astype(np.float64), np.asarray(r, np.float32).astype(np.float64)
    qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    rn = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
    cos = np.einsum("id,jd->ij", qn, rn)
    return 1.0 - cos.max(1), cos.argmax(1), cos


def _reference_fp32(q, r, chunk=64):
    """The search as it was before the prefilter: chunked float32 product, row max."""
    qn = torch.nn.functional.normalize(torch.as_tensor(np.asarray(q, np.float32)), dim=1)
    rn = torch.nn.functional.normalize(torch.as_tensor(np.asarray(r, np.float32)), dim=1)
    v, i = torch.cat([qn[s : s + chunk] @ rn.T for s in range(0, len(qn), chunk)]).max(1)
    return (1.0 - v.double()).clamp_min(0.0).numpy(), i.numpy()


def _near_ties(rng, n_q=200, per=6, d=64):
    """Every query has ``per`` refs whose cosines to it differ by ~1e-3, below bf16's resolution (2^-8)."""
    q = rng.normal(size=(n_q, d))
    r = rng.normal(size=(n_q * per + 40, d))
    for k in range(n_q):
        base = q[k] + rng.normal(size=d)
        r[per * k : per * (k + 1)] = base + 3e-3 * rng.normal(size=(per, d))
    return q, r


@pytest.mark.parametrize("precision", ["bf16", "fp32", "auto"])
def test_nearest_equals_float64_brute_force(precision):
    rng = np.random.default_rng(0)
    q, r = rng.normal(size=(150, 48)), rng.normal(size=(400, 48))
    r[7] = r[3]  # an exact tie: the lower index wins
    q[5] = 2 * r[3]  # an exact copy (cosine 1)
    r[9] = -q[6]  # and its opposite
    q[10] = -r.mean(0)  # a row whose nearest is at a low cosine
    q[11] = 0.0  # a zero vector: cosine 0 to everything, so the first ref
    d, i = mem.nearest_cosine_distance(q, r, chunk=17, precision=precision)
    bd, bi, _ = _brute_nn(q, r)
    assert np.array_equal(i, bi) and i[5] == 3
    assert np.allclose(d, bd, rtol=0, atol=1e-12)
    # the pre-prefilter float32 search agrees too (no near-ties in this data)
    rd, ri = _reference_fp32(q, r)
    assert np.array_equal(i, ri) and np.allclose(d, rd, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_nearest_resolves_ties_finer_than_the_prefilter(precision):
    rng = np.random.default_rng(1)
    q, r = _near_ties(rng)
    d, i = mem.nearest_cosine_distance(q, r, precision=precision)
    bd, bi, cos = _brute_nn(q, r)
    assert np.array_equal(i, bi) and np.allclose(d, bd, rtol=0, atol=1e-12)
    # the data does discriminate: in bf16 the true nearest is strictly below the row max on some rows
    qb = torch.nn.functional.normalize(torch.as_tensor(q, dtype=torch.float32), dim=1).bfloat16()
    rb = torch.nn.functional.normalize(torch.as_tensor(r, dtype=torch.float32), dim=1).bfloat16()
    cheap = (qb @ rb.T).float().numpy()
    assert (cheap[np.arange(len(q)), bi] < cheap.max(1)).sum() >= 5


def test_crowded_neighbourhoods_switch_to_float32_and_stay_exact(monkeypatch):
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(3, 32))
    r = centres[rng.integers(0, 3, 500)] + 0.05 * rng.normal(size=(500, 32))
    q = centres[rng.integers(0, 3, 90)] + 0.05 * rng.normal(size=(90, 32))
    calls = []
    real = mem._prefilter_floor
    monkeypatch.setattr(mem, "_prefilter_floor", lambda *a: calls.append(a[-1]) or real(*a))
    d, i = mem.nearest_cosine_distance(q, r, chunk=30, precision="bf16")
    bd, bi, _ = _brute_nn(q, r)
    assert np.array_equal(i, bi) and np.allclose(d, bd, rtol=0, atol=1e-12)
    assert calls[0] == "bf16" and calls[1:] == ["fp32"] * 3  # first block tried bf16, then float32 for good


def test_nearest_rejects_bad_input():
    with pytest.raises(ValueError, match=r"query: embeddings contain NaN or infinite values \(row 1\)"):
        mem.nearest_cosine_distance(np.array([[0.0, 1.0], [np.inf, 1.0]]), np.ones((3, 2)))
    with pytest.raises(ValueError, match="ref: embeddings contain NaN"):
        mem.nearest_cosine_distance(np.ones((3, 2)), np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="query: embeddings contain NaN"):
        mem.nearest_cosine_distance(np.array([[np.nan, 1.0]]), np.ones((3, 2)))
    with pytest.raises(ValueError, match="precision"):
        mem.nearest_cosine_distance(np.ones((2, 2)), np.ones((3, 2)), precision="fp8")
    with pytest.raises(ValueError, match="do not match"):
        mem.nearest_cosine_distance(np.ones((2, 3)), np.ones((3, 2)))


def test_prefilter_floor_holds_on_real_bf16_products():
    # the bound of _prefilter_floor against what torch's bf16 product actually returns
    rng = np.random.default_rng(3)
    q = torch.nn.functional.normalize(torch.as_tensor(rng.normal(size=(64, 512)), dtype=torch.float32), dim=1)
    r = torch.nn.functional.normalize(torch.as_tensor(rng.normal(size=(2000, 512)), dtype=torch.float32), dim=1)
    qb, rb = q.bfloat16(), r.bfloat16()
    cheap = (qb @ rb.T).double().numpy()
    exact = (q.double() @ r.double().T).numpy()
    a_n = qb.float().norm(dim=1).double().numpy()
    ea_n = (q - qb.float()).norm(dim=1).double().numpy()
    b_mx, eb_mx = float(rb.float().norm(dim=1).max()), float((r - rb.float()).norm(dim=1).max())
    floor = mem._prefilter_floor(cheap.max(1), a_n, ea_n, b_mx, eb_mx, 512, "bf16")
    assert np.all(cheap[np.arange(64), exact.argmax(1)] >= floor)
    assert np.all(cheap.max(1) - floor < 5 * 2.0**-8)  # and it is a useful floor, not -1


@pytest.mark.parametrize("bits", [64, 100, 320])  # 1 word; 2 words; 5 words (distances beyond uint8)
@pytest.mark.parametrize("threads", [1, 2])
def test_blocked_hamming_equals_brute_force(monkeypatch, bits, threads):
    monkeypatch.setattr(mem, "_HAMMING_COLS", 7)  # many column blocks, a ragged last one
    monkeypatch.setattr(mem, "_HAMMING_ROWS", 5)
    rng = np.random.default_rng(bits)
    a, b = rng.random((37, bits)) > 0.5, rng.random((53, bits)) > 0.5
    b[20] = b[4]  # ties across blocks: the lower index wins
    a[3] = b[4]
    thr = bits // 2 - 2
    dmin, arg, cnt = mem.hamming_nearest(mem.pack_bits(a), mem.pack_bits(b), threshold=thr, threads=threads)
    brute = (a[:, None, :] != b[None, :, :]).sum(-1)
    assert np.array_equal(dmin, brute.min(1)) and np.array_equal(arg, brute.argmin(1))
    assert arg[3] == 4 and dmin[3] == 0
    assert np.array_equal(cnt, (brute <= thr).sum(1))
    _, _, none = mem.hamming_nearest(mem.pack_bits(a), mem.pack_bits(b))
    assert not none.any()


def test_phash_is_imagehash_and_packed_distances_match_its_subtraction():
    rng = np.random.default_rng(4)
    imgs = [rng.integers(0, 256, (40, 56, 3), np.uint8) for _ in range(5)]
    imgs.append(np.full((32, 32, 3), 128, np.uint8))  # flat: every DCT term ties
    imgs.append(np.tile(np.linspace(0, 255, 48).astype(np.uint8), (48, 1)))  # grey gradient, 2-D
    imgs.append(np.clip(imgs[0].astype(int) + 3, 0, 255).astype(np.uint8))  # a near copy of image 0
    pil = [Image.fromarray(x) for x in imgs]
    theirs = [imagehash.phash(p) for p in pil]
    packed = mem.pack_bits(mem.phash_bits(pil))
    dmin, arg, _ = mem.hamming_nearest(packed, packed[::-1])
    brute = np.array([[h - g for g in theirs[::-1]] for h in theirs])
    assert np.array_equal(dmin, brute.min(1)) and np.array_equal(arg, brute.argmin(1))
    for x, p, h in zip(imgs, pil, theirs):
        assert np.array_equal(mem.phash_bits([p])[0], h.hash.reshape(-1))
        assert np.array_equal(mem.phash_bits(x[None])[0], h.hash.reshape(-1))  # the uint8 array path
    same = np.stack(imgs[:5])
    assert np.array_equal(mem.phash_bits(same / 255.0), mem.phash_bits(same))  # float [0, 1] input
    assert mem.PHASH_IMPL.startswith(f"imagehash {imagehash.__version__} phash")


def test_summary_names_the_phash_implementation():
    rng = np.random.default_rng(5)
    gen, train = rng.integers(0, 256, (3, 24, 24), np.uint8), rng.integers(0, 256, (4, 24, 24), np.uint8)
    emb = rng.normal(size=(7, 4))
    rep = mem.memorization_report(gen, train, train, emb[:3], emb[3:], emb[3:], ssim_top_k="all")
    assert rep["phash_impl"] == mem.PHASH_IMPL
