"""Pure loss and reward functions. No state, no I/O: tensors in, tensors out.

CRAFTS (seed 004, Methods) adds two batch-relational losses to the denoising objective:

- ``semantic_consistency_loss`` (L_corr, eqs. 8-10): the batch cosine-similarity matrix of image
  latents should match that of the conditioning texts.
- ``category_guidance_loss`` (L_cate, eqs. 11-13): the image similarity matrix should match the
  category similarity matrix, each pair weighted by how typical both captions are of their class.

The trainers (``craft.train.crafts``) decide which tensors go in; these functions only do the maths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_matrix(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pairwise cosine similarities of the rows of ``x`` [B, D] -> [B, B] (eqs. 8 and 9 of CRAFTS).

    >>> cosine_matrix(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])).round(decimals=4)
    tensor([[1.0000, 0.0000, 0.7071],
            [0.0000, 1.0000, 0.7071],
            [0.7071, 0.7071, 1.0000]])
    """
    if x.ndim != 2:
        raise ValueError(f"cosine_matrix expects [B, D] features, got shape {tuple(x.shape)}")
    xn = F.normalize(x.float(), dim=1, eps=eps)
    return xn @ xn.T


def _check_pair(z: torch.Tensor, t: torch.Tensor, names: str) -> None:
    if z.ndim != 2 or t.ndim != 2:
        raise ValueError(f"{names}: expected 2-D [B, D] tensors, got {tuple(z.shape)} and {tuple(t.shape)}")
    if z.shape[0] != t.shape[0]:
        raise ValueError(f"{names}: batch sizes differ ({z.shape[0]} vs {t.shape[0]})")


def semantic_consistency_loss(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """L_corr of CRAFTS (eq. 10): mean over all B^2 pairs of (M^Z_ij - M^T_ij)^2.

    z: [B, Dz] image latents or features; t: [B, Dt] text features. M^Z and M^T are the cosine
    matrices of eqs. 9 and 8. Zero when the image batch has the same relational structure as the
    text batch; the dimensions Dz and Dt may differ.

    >>> z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> t = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    >>> semantic_consistency_loss(z, t)  # off-diagonals 0 vs 1/sqrt(2): 2 * 0.5 / 4
    tensor(0.2500)
    """
    _check_pair(z, t, "semantic_consistency_loss(z, t)")
    mz = cosine_matrix(z)
    mt = cosine_matrix(t)
    return ((mz - mt) ** 2).mean()


def typicality_weights(s: torch.Tensor, mu: float, sigma: float) -> torch.Tensor:
    """W_ij = sigmoid((s_i + s_j - mu) / sigma) (eq. 12 of CRAFTS) for per-sample scores s [B].

    >>> typicality_weights(torch.tensor([0.5, 0.5]), mu=1.0, sigma=1.0)
    tensor([[0.5000, 0.5000],
            [0.5000, 0.5000]])
    """
    if sigma <= 0:
        raise ValueError(f"typicality_weights: sigma must be > 0, got {sigma}")
    a = s[:, None] + s[None, :]  # A_ij = s_i + s_j, the pair's typicality
    return torch.sigmoid((a - mu) / sigma)


def category_guidance_loss(
    z: torch.Tensor, t: torch.Tensor, c: torch.Tensor, mu: float, sigma: float, s: torch.Tensor | None = None
) -> torch.Tensor:
    """L_cate of CRAFTS (eqs. 11-13): (1/B^2) sum_ij W_ij (M^Z_ij - M^C_ij)^2.

    z: [B, Dz] image latents or features; t: [B, Dt] caption text features; c: [B, Dt] features
    of each sample's category-name text. s_k = cos(c_k, t_k) (eq. 11) is how strongly a caption
    supports its class; W_ij = sigmoid((s_i + s_j - mu) / sigma) (eq. 12) with mu, sigma the mean
    and standard deviation of s_i + s_j over the whole fine-tuning set (``typicality_stats``);
    M^C is the cosine matrix of c. Typical pairs are pulled harder toward the category structure.
    ``s`` [B]: the samples' s_k computed once with the same text encoder as mu and sigma (what a
    trainer passes when the text encoder trains: see ``craft.train.crafts``); None = from t and c.

    >>> z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> c = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # same class: M^C is all ones
    >>> category_guidance_loss(z, c, c, mu=2.0, sigma=1.0)  # s = 1, W = 0.5; off-diagonals (0-1)^2
    tensor(0.2500)
    """
    _check_pair(z, t, "category_guidance_loss(z, t)")
    _check_pair(t, c, "category_guidance_loss(t, c)")
    if s is None:
        s = F.cosine_similarity(c.float(), t.float(), dim=1)  # eq. 11
    elif s.shape != (z.shape[0],):
        raise ValueError(f"category_guidance_loss: s must have shape [{z.shape[0]}], got {tuple(s.shape)}")
    w = typicality_weights(s.float(), mu, sigma)  # eq. 12
    mz = cosine_matrix(z)
    mc = cosine_matrix(c)
    return (w * (mz - mc) ** 2).mean()  # eq. 13


def typicality_stats(s: torch.Tensor) -> tuple[float, float]:
    """(mu, sigma) of A_ij = s_i + s_j over every pair of a whole fine-tuning set (eq. 12 of CRAFTS).

    Computed once before training from s_k = cos(c_k, t_k) of all N samples. Over all ordered
    pairs (i, j) including i = j, mean(A) = 2 mean(s) and var(A) = 2 var(s), so this needs no
    N x N matrix. sigma is floored at 1e-6 so a set of identical scores still gives finite weights.

    >>> typicality_stats(torch.tensor([0.0, 1.0]))  # A = [[0, 1], [1, 2]]: mean 1, std sqrt(0.5)
    (1.0, 0.7071067811865476)
    """
    s = s.detach().double().flatten()
    if s.numel() == 0:
        raise ValueError("typicality_stats: empty score vector")
    mu = 2.0 * s.mean().item()
    var = 2.0 * s.var(unbiased=False).item()
    return mu, max(var**0.5, 1e-6)


# --- CRAFT rewards (eqs. 2-6 of CRAFT) ---

# Default component weights of the clinical reward (eq. 1/6 of CRAFT). Our copy of the paper lost the
# numbers in sec. 3.3 ("We use lambda = . and w = ., giving each reward component an effective weight
# of ."), so: the three cosine rewards get weight 1 (each lies in [-1, 1], same scale), and DD gets
# 0.2, the default of the sensitivity sweep in appendix J (Table 15: 0.2 gave the best DD and CAS on
# CheXpert, 0.02-1.0 all within 0.008 CAS). DD is a log-likelihood in (-inf, 0] (about -1.4 for a
# 4-class probe at chance), hence the smaller weight. The overall scale lambda belongs to the trainer.
DEFAULT_REWARD_WEIGHTS: dict[str, float] = {"vdc": 1.0, "ccs": 1.0, "dd": 0.2, "sfs": 1.0}
REWARD_NAMES = ("vdc", "ccs", "dd", "sfs")


def _rowwise_cos(a: torch.Tensor, b: torch.Tensor, name: str) -> torch.Tensor:
    _check_pair(a, b, name)
    return F.cosine_similarity(a.float(), b.float(), dim=1)


def vdc_reward(image_emb: torch.Tensor, prompt_emb: torch.Tensor) -> torch.Tensor:
    """R_VDC of CRAFT (eq. 2): cos(E_I(x_hat_i), E_T(p_i)) per sample, [B, D] x [B, D] -> [B].

    ``prompt_emb`` row i is the enriched prompt of sample i. Inputs need not be normalised.

    >>> vdc_reward(torch.tensor([[1.0, 0.0], [3.0, 4.0]]), torch.tensor([[2.0, 0.0], [4.0, -3.0]]))
    tensor([1., 0.])
    """
    return _rowwise_cos(image_emb, prompt_emb, "vdc_reward(image_emb, prompt_emb)")


def ccs_reward(image_emb: torch.Tensor, checklist_emb: torch.Tensor) -> torch.Tensor:
    """R_CCS of CRAFT (eq. 3): cos(E_I(x_hat_i), E_T(c_{y_i})) per sample, [B, D] x [B, D] -> [B].

    ``checklist_emb`` row i is the embedding of sample i's class checklist c_{y_i}. How that row is
    made is the caller's choice; ``ClinicalAlignmentModule`` uses by default the renormalised mean
    of the five item embeddings ("Attribute: description."), because the five items joined exceed
    the text tower's token window and would be cut.

    >>> ccs_reward(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]])).round(decimals=4)
    tensor([0.7071])
    """
    return _rowwise_cos(image_emb, checklist_emb, "ccs_reward(image_emb, checklist_emb)")


def dd_reward(probe_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """R_DD of CRAFT (eq. 4): log p(y_i | x_hat_i) = log_softmax(probe logits)[i, y_i], [B, C] x [B] -> [B].

    The probe is the frozen linear layer of appendix A.2 on the critic's embeddings. At chance over C
    classes the reward is -log C; it approaches 0 as the probe becomes certain of the true class.

    >>> dd_reward(torch.tensor([[0.0, 0.0], [2.0, 0.0]]), torch.tensor([1, 0])).round(decimals=4)
    tensor([-0.6931, -0.1269])
    """
    if probe_logits.ndim != 2 or labels.ndim != 1 or probe_logits.shape[0] != labels.shape[0]:
        raise ValueError(f"dd_reward: expected logits [B, C] and labels [B], got {tuple(probe_logits.shape)} "
                         f"and {tuple(labels.shape)}")  # fmt: skip
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= probe_logits.shape[1]):
        raise ValueError(f"dd_reward: labels outside [0, {probe_logits.shape[1]})")
    logp = F.log_softmax(probe_logits.float(), dim=1)
    return logp.gather(1, labels.long().view(-1, 1)).squeeze(1)


def sfs_reward(image_emb: torch.Tensor, reference_emb: torch.Tensor) -> torch.Tensor:
    """R_SFS of CRAFT (eq. 5): cos(E_I(x_hat_i), E_I(x_i)) with x_i the paired real image, [B, D] x [B, D] -> [B].

    >>> sfs_reward(torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, 0.0]]))
    tensor([-1.])
    """
    return _rowwise_cos(image_emb, reference_emb, "sfs_reward(image_emb, reference_emb)")


def clinical_reward(components: dict[str, torch.Tensor], weights: dict[str, float] | None = None) -> torch.Tensor:
    """R_clin = sum_k w_k R_k per sample (the reward of CRAFT eqs. 1 and 6), each R_k a [B] tensor -> [B].

    ``weights`` default to ``DEFAULT_REWARD_WEIGHTS`` (VDC, CCS, SFS 1.0; DD 0.2, appendix J). Every
    weighted name must be present in ``components`` except a missing "sfs", which is skipped (SFS
    needs a paired real image; CRAFT sec. 3.2 drops it for prompt-only use). A component with no
    weight is refused, so a typo cannot silently drop a reward. Averaging over DRaFT repeats (eq. 6)
    and the scale lambda are the trainer's.

    >>> r = {"vdc": torch.tensor([0.5]), "ccs": torch.tensor([0.25]), "dd": torch.tensor([-1.0])}
    >>> clinical_reward(r)  # 0.5 + 0.25 + 0.2 * -1.0
    tensor([0.5500])
    >>> clinical_reward(r, {"vdc": 2.0, "ccs": 0.0, "dd": 1.0})
    tensor([0.])
    """
    weights = dict(DEFAULT_REWARD_WEIGHTS if weights is None else weights)
    unknown = sorted(set(components) - set(weights))
    if unknown:
        raise ValueError(f"clinical_reward: component {unknown[0]!r} has no weight (weights: {sorted(weights)})")
    missing = sorted(k for k in weights if k not in components and k != "sfs")
    if missing:
        raise ValueError(f"clinical_reward: weighted component {missing[0]!r} is missing")
    present = [k for k in weights if k in components]
    if not present:
        raise ValueError("clinical_reward: no components")
    shape = components[present[0]].shape
    total = torch.zeros(shape, dtype=torch.float32, device=components[present[0]].device)
    for k in present:
        if components[k].shape != shape:
            raise ValueError(f"clinical_reward: {k!r} has shape {tuple(components[k].shape)}, expected {tuple(shape)}")
        total = total + float(weights[k]) * components[k].float()
    return total
