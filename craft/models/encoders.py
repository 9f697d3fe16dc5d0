"""Frozen dual encoders (critic and evaluator), linear probes and the Clinical Alignment Module of CRAFT.

- ``DualEncoder``: any SigLIP/CLIP-style image-text model in a transformers directory (SiglipModel,
  CLIPModel, and what ``AutoModel`` maps to them: MedSigLIP and SigLIP are ``siglip``, PLIP is
  ``clip``, MetaCLIP 2 is ``metaclip_2``). ``encode_images`` is differentiable w.r.t. the pixels
  (resize + normalise in torch with the model's own preprocessor settings), so DRaFT can push reward
  gradients into the generator; the encoder's own parameters never take gradients (CRAFT A.1).
- ``load_encoder(dir_or_s3)`` / ``save_encoder``: the same code loads a real MedSigLIP checkpoint and
  the tiny encoders ``craft train encoder`` builds (safetensors only, ``local_files_only``).
- ``EncodersConfig`` (stage ``encoders``): which model plays critic (training reward) and which
  evaluator (metrics); the same model in both roles is refused, by path in ``validate()`` and by
  weight identity in ``load_role_encoders`` (CRAFT sec. 4.1.4, Table 11: MedSigLIP critic, SigLIP
  evaluator, MetaCLIP 2 out-of-family evaluator).
- ``LinearProbe`` / ``save_probe`` / ``load_probe``: the DD probe of CRAFT A.2 (one nn.Linear on the
  frozen, L2-normalised image embeddings); trained by ``craft.train.probe``.
- ``ClinicalAlignmentModule``: critic + probe + checklists -> the four reward tensors of CRAFT
  eqs. 2-5 for a batch of generated images (DRaFT), or the evaluator's primitives (evaluation).

Use in a DRaFT-K step (critic) and in evaluation (evaluator)::

    enc = load_role_encoders(cfg, critic=critic_dir, evaluator=evaluator_dir)  # refuses the same model twice
    cam = ClinicalAlignmentModule(enc["critic"], load_probe(critic_probe_dir, enc["critic"]), checklists)
    ref = cam.reference_embeddings(real_images)                   # [B, D], no grad, once per batch
    r = cam(vae_decoded_in_01, labels, enriched_prompts, reference_emb=ref)   # {"vdc","ccs","dd","sfs"}: [B]
    loss = -craft.losses.clinical_reward(r).mean()                # gradients reach the pixels, not the critic
    ev = ClinicalAlignmentModule(enc["evaluator"], load_probe(eval_probe_dir, enc["evaluator"]), checklists,
                                 dd="accuracy")                   # CAS primitives; DD = probe accuracy
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from craft.io import atomic_dir, atomic_write_bytes, atomic_write_json

PREPROCESSOR = "preprocessor_config.json"
PROBE_WEIGHTS = "probe.safetensors"
PROBE_META = "probe.json"
ENCODER_LINEAGE = "lineage.json"

# transformers model_type -> how the text tower is fed. SigLIP was trained on max-length padded ids
# without an attention mask (its text pooling reads the last position); CLIP pools at the EOS token.
FAMILIES: dict[str, str] = {"siglip": "siglip", "clip": "clip", "metaclip_2": "clip"}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# ----------------------------------------------------------------------------------------------
# role separation (CRAFT sec. 4.1.4)


@dataclass
class EncodersConfig:
    """Stage ``encoders``: the frozen models in each role. Empty paths mean "the one the encoder stage trained"."""

    critic: str = ""  # local dir or s3:// prefix of the training critic (CRAFT: MedSigLIP-448)
    evaluator: str = ""  # local dir or s3:// prefix of the evaluator (CRAFT: SigLIP), never the critic
    evaluator2: str = ""  # optional out-of-family evaluator (CRAFT sec. 4.2.7: MetaCLIP 2); "" = none
    cache_dir: str = ""  # where s3:// encoders are downloaded ("" = $CRAFT_MODEL_CACHE or ~/.cache/craft/models)
    device: str = "cpu"  # torch device the encoders run on: cpu, cuda, or auto (cuda when there is one)

    def validate(self) -> None:
        named = {k: v for k, v in (("critic", self.critic), ("evaluator", self.evaluator),
                                   ("evaluator2", self.evaluator2)) if v}  # fmt: skip
        seen: dict[str, str] = {}
        for role, where in named.items():
            key = _location_key(where)
            if key in seen:
                raise ValueError(
                    f"{role}: {where!r} is the same model as {seen[key]} ({named[seen[key]]!r}); the critic "
                    "and the evaluators must be different models (CRAFT sec. 4.1.4)"
                )
            seen[key] = role


def _location_key(where: str) -> str:
    if where.startswith("s3://"):
        return where.rstrip("/")
    return str(Path(where).expanduser().resolve())


def check_distinct(encoders: dict[str, DualEncoder]) -> None:
    """Refuse two roles whose weights are identical (a copy of the critic at another path counts)."""
    seen: dict[str, str] = {}
    for role, enc in encoders.items():
        if enc.identity in seen:
            raise ValueError(
                f"{role} ({enc.source}) has the same weights as {seen[enc.identity]} (identity {enc.identity[:16]}); "
                "the critic and the evaluators must be different models (CRAFT sec. 4.1.4)"
            )
        seen[enc.identity] = f"{role} ({enc.source})"


def load_role_encoders(
    cfg: EncodersConfig, critic: str | os.PathLike | None = None, evaluator: str | os.PathLike | None = None
) -> dict[str, DualEncoder]:
    """Load every configured role ({"critic", "evaluator"[, "evaluator2"]}) and check they differ.

    ``critic`` / ``evaluator`` (e.g. pipeline artifacts) fill roles whose config path is empty.
    """
    paths = {"critic": cfg.critic or (str(critic) if critic else ""),
             "evaluator": cfg.evaluator or (str(evaluator) if evaluator else ""), "evaluator2": cfg.evaluator2}  # fmt: skip
    for role in ("critic", "evaluator"):
        if not paths[role]:
            raise ValueError(f"encoders.{role}: no model given (set it in the profile or pass the trained one)")
    EncodersConfig(**{**cfg.__dict__, **{k: v for k, v in paths.items()}}).validate()
    out = {role: load_encoder(p, cfg.cache_dir or None, device=cfg.device) for role, p in paths.items() if p}
    check_distinct(out)
    return out


# ----------------------------------------------------------------------------------------------
# the dual encoder


def weights_identity(model: torch.nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor in the state dict, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _image_geometry(pre: dict[str, Any], where: Path) -> tuple[tuple[int, int] | int, tuple[int, int] | None]:
    """(resize target, center-crop size) from a HF image-processor config.

    ``size`` is {"height", "width"} (SigLIP: resize to exactly that), {"shortest_edge"} (CLIP: resize
    the short side, then center-crop to ``crop_size``) or a bare int.
    """
    size = pre.get("size")
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if not isinstance(size, dict):
        raise ValueError(f"{where}: 'size' must be a mapping or an int, got {size!r}")
    if "height" in size and "width" in size:
        resize: tuple[int, int] | int = (int(size["height"]), int(size["width"]))
    elif "shortest_edge" in size:
        resize = int(size["shortest_edge"])
    else:
        raise ValueError(f"{where}: 'size' needs height+width or shortest_edge, got {size!r}")
    crop = None
    if pre.get("do_center_crop", False):
        c = pre.get("crop_size", size)
        c = {"height": c, "width": c} if isinstance(c, int) else c
        if "height" not in c or "width" not in c:
            raise ValueError(f"{where}: 'crop_size' needs height and width, got {c!r}")
        crop = (int(c["height"]), int(c["width"]))
    return resize, crop


class DualEncoder:
    """A frozen image-text encoder: unit-norm image embeddings (with pixel gradients) and cached text embeddings.

    Always in eval mode with ``requires_grad_(False)`` on every parameter: it is a critic, never trained
    here (CRAFT A.1: "No gradients are backpropagated into the VLM parameters").
    """

    def __init__(self, model, tokenizer, preprocessor: dict[str, Any], source: str = "", where: Path | None = None):
        model_type = getattr(model.config, "model_type", "")
        if model_type not in FAMILIES:
            raise ValueError(
                f"{where or source}: model_type {model_type!r} is not a supported dual encoder "
                f"(supported: {', '.join(sorted(FAMILIES))})"
            )
        for method in ("get_image_features", "get_text_features"):
            if not hasattr(model, method):
                raise ValueError(f"{where or source}: {type(model).__name__} has no {method}")
        self.family = FAMILIES[model_type]
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.source = source
        where = where or Path(source or ".")
        self.resize, self.crop = _image_geometry(preprocessor, where / PREPROCESSOR)
        self.do_normalize = bool(preprocessor.get("do_normalize", True))
        mean, std = preprocessor.get("image_mean"), preprocessor.get("image_std")
        if self.do_normalize and (not isinstance(mean, list) or not isinstance(std, list) or len(mean) != 3
                                  or len(std) != 3):  # fmt: skip
            raise ValueError(f"{where / PREPROCESSOR}: image_mean and image_std must be 3-element lists")
        self.mean = torch.tensor(mean or [0.0, 0.0, 0.0]).view(1, 3, 1, 1)
        self.std = torch.tensor(std or [1.0, 1.0, 1.0]).view(1, 3, 1, 1)
        tcfg = getattr(model.config, "text_config", model.config)
        limit = int(getattr(tcfg, "max_position_embeddings", 77))
        tok_max = int(getattr(tokenizer, "model_max_length", limit) or limit)
        self.max_length = min(limit, tok_max) if tok_max < 100_000 else limit
        self._text_cache: dict[str, torch.Tensor] = {}
        self._identity: str | None = None

    # -- bookkeeping
    @property
    def identity(self) -> str:
        """Content hash of the weights (``weights_identity``), computed once."""
        if self._identity is None:
            self._identity = weights_identity(self.model)
        return self._identity

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def image_size(self) -> tuple[int, int]:
        """Side lengths of the tensor the vision tower sees."""
        if self.crop is not None:
            return self.crop
        return self.resize if isinstance(self.resize, tuple) else (self.resize, self.resize)

    def to(self, device: str | torch.device) -> DualEncoder:
        self.model.to(device)
        self._text_cache.clear()
        return self

    def requires_grad_(self, flag: bool = False) -> DualEncoder:
        """Only ``False`` is accepted: the encoder is a frozen critic."""
        if flag:
            raise ValueError("DualEncoder is a frozen critic/evaluator; its parameters never take gradients")
        self.model.requires_grad_(False)
        return self

    def eval(self) -> DualEncoder:
        self.model.eval()
        return self

    # -- images
    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [0, 1] (C = 1 or 3) -> the normalised tensor the vision tower expects; differentiable."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"encode_images expects [B, 1|3, H, W] pixels in [0, 1], got shape {tuple(x.shape)}")
        x = x.to(device=self.device, dtype=self.dtype)
        if x.shape[1] == 1:  # grayscale radiographs -> 3 identical channels, as the HF processors do
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        if isinstance(self.resize, tuple):
            size = self.resize
        else:  # shortest edge -> self.resize, aspect kept (CLIP processors)
            s = self.resize / min(h, w)
            size = (max(1, round(h * s)), max(1, round(w * s)))
        if (h, w) != tuple(size):
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        if self.crop is not None:
            ch, cw = self.crop
            top, left = (x.shape[-2] - ch) // 2, (x.shape[-1] - cw) // 2
            if top < 0 or left < 0:
                raise ValueError(f"image {tuple(x.shape[-2:])} is smaller than the crop size {self.crop}")
            x = x[..., top : top + ch, left : left + cw]
        if self.do_normalize:
            x = (x - self.mean.to(x)) / self.std.to(x)
        return x

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] pixels in [0, 1] -> [B, D] unit-norm embeddings, differentiable w.r.t. ``x``."""
        out = self.model.get_image_features(pixel_values=self.preprocess(x))
        return F.normalize(_pooled(out).float(), dim=-1)

    # -- texts
    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")  # fmt: skip
        ids = {"input_ids": enc["input_ids"].to(self.device)}
        if self.family == "clip" and "attention_mask" in enc:
            ids["attention_mask"] = enc["attention_mask"].to(self.device)
        return ids

    def text_features(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings WITH autograd through the text tower (used by encoder training only)."""
        return F.normalize(_pooled(self.model.get_text_features(**self.tokenize(texts))).float(), dim=-1)

    def encode_texts(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """[B] strings -> [B, D] unit-norm embeddings, no grad, cached per string."""
        texts = [str(t) for t in texts]
        todo = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        with torch.no_grad():
            for i in range(0, len(todo), batch_size):
                chunk = todo[i : i + batch_size]
                for t, e in zip(chunk, self.text_features(chunk)):
                    self._text_cache[t] = e
        if not texts:
            return torch.zeros(0, self.embed_dim, device=self.device)
        return torch.stack([self._text_cache[t] for t in texts])

    @property
    def embed_dim(self) -> int:
        cfg = self.model.config
        if self.family == "clip":
            return int(cfg.projection_dim)
        tcfg = cfg.text_config
        return int(getattr(tcfg, "projection_size", None) or tcfg.hidden_size)


def _pooled(out) -> torch.Tensor:
    # transformers 5 returns BaseModelOutputWithPooling from get_*_features; older versions a tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _local_dir(path_or_uri: str | os.PathLike, cache_dir: str | os.PathLike | None) -> Path:
    s = str(path_or_uri)
    if s.startswith("s3://"):
        from craft.models.diffusion import resolve_model_dir

        return resolve_model_dir(s, cache_dir)
    return Path(s)


def load_encoder(
    path_or_uri: str | os.PathLike, cache_dir: str | os.PathLike | None = None, device: str = "cpu", dtype=None
) -> DualEncoder:
    """A frozen ``DualEncoder`` from a transformers directory or an ``s3://`` prefix (safetensors only, offline).

    The directory holds ``config.json``, ``model.safetensors`` (or shards), the tokenizer files and
    ``preprocessor_config.json`` -- the layout of a Hugging Face MedSigLIP / SigLIP / CLIP / PLIP
    snapshot and of what ``save_encoder`` writes. SigLIP and MedSigLIP ship the slow ``SiglipTokenizer``
    (``spiece.model`` + ``tokenizer_config.json``, no ``tokenizer.json``), which needs ``sentencepiece``;
    ``tests/real_layout.py`` builds such a snapshot at tiny size.
    """
    from transformers import AutoModel, AutoTokenizer

    d = _local_dir(path_or_uri, cache_dir)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d}: not an encoder directory (no config.json)")
    bins = sorted(str(f.relative_to(d)) for f in d.rglob("*") if f.suffix in _PICKLE_SUFFIXES)
    if bins:
        raise ValueError(f"{d}: refusing pickle weight files {bins[:3]} (safetensors only)")
    pre_path = d / PREPROCESSOR
    if not pre_path.is_file():
        raise FileNotFoundError(f"{pre_path}: missing (image size, mean and std are read from it)")
    try:
        pre = json.loads(pre_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{pre_path}: not valid JSON: {e}") from e
    # The tokenizer first: it loads in milliseconds, a real checkpoint's weights in many seconds, and a
    # missing backend (SigLIP / MedSigLIP ship only a SentencePiece spiece.model) should fail before them.
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except ImportError as e:
        raise ImportError(f"{d}: its tokenizer needs a package that is not installed ({e}); craft's pyproject "
                          "lists sentencepiece for SigLIP / MedSigLIP, reinstall craft") from e  # fmt: skip
    kwargs: dict[str, Any] = dict(local_files_only=True, use_safetensors=True)
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModel.from_pretrained(str(d), **kwargs)
    enc = DualEncoder(model, tokenizer, pre, source=str(path_or_uri), where=d)
    if device == "auto":  # the profiles' portable choice: a GPU pod's CUDA, else the CPU
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return enc.to(device)


def preprocessor_config(family: str, image_size: int, mean: list[float], std: list[float]) -> dict[str, Any]:
    """A HF image-processor config for a square ``image_size`` input (what real checkpoints ship)."""
    return {
        "image_processor_type": "SiglipImageProcessor" if family == "siglip" else "CLIPImageProcessor",
        "do_resize": True, "size": {"height": image_size, "width": image_size}, "resample": 3,
        "do_center_crop": False, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(mean), "image_std": list(std),
    }  # fmt: skip


def save_encoder(
    model, tokenizer, out_dir: str | os.PathLike, preprocessor: dict[str, Any], lineage: dict[str, Any] | None = None
) -> Path:
    """Write a dual encoder in the HF layout ``load_encoder`` reads (safetensors), atomically replacing ``out_dir``."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(Path(tmp) / PREPROCESSOR, preprocessor)
        lin = dict(lineage or {})
        lin.setdefault("identity", weights_identity(model))
        atomic_write_json(Path(tmp) / ENCODER_LINEAGE, lin)
        if not any(Path(tmp).glob("*.safetensors")):
            raise RuntimeError(f"{out_dir}: save_pretrained wrote no safetensors file")
    return Path(out_dir)


# ----------------------------------------------------------------------------------------------
# the DD linear probe (CRAFT A.2)


class LinearProbe(torch.nn.Module):
    """One linear layer on frozen unit-norm embeddings -> class logits (CRAFT A.2)."""

    def __init__(self, dim: int, classes: list[str], encoder_identity: str = ""):
        super().__init__()
        if len(set(classes)) != len(classes) or len(classes) < 2:
            raise ValueError(f"LinearProbe needs >= 2 distinct classes, got {classes}")
        self.classes = list(classes)
        self.encoder_identity = encoder_identity
        self.linear = torch.nn.Linear(dim, len(classes))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear(emb)

    def label_indices(self, labels: list[str] | torch.Tensor) -> torch.Tensor:
        """Class names (or indices) -> LongTensor of indices in this probe's class order."""
        if isinstance(labels, torch.Tensor):
            return labels.long().to(self.linear.weight.device)
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted({str(y) for y in labels} - set(index))
        if unknown:
            raise ValueError(f"label {unknown[0]!r} is not a probe class (classes: {', '.join(self.classes)})")
        return torch.tensor([index[str(y)] for y in labels], device=self.linear.weight.device)


def fit_linear_probe(emb: torch.Tensor, labels: list[str], classes: list[str], *, epochs: int = 50,
                     batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 0.0, seed: int = 0,
                     identity: str = "") -> LinearProbe:  # fmt: skip
    """Adam on cross-entropy, ``epochs`` passes in seeded shuffled batches (CRAFT A.2: 50 epochs, batch 256).

    Shared by the probe stage (``craft train probe``) and by evaluation, which fits the same probe for an
    evaluator given without one.
    """
    if epochs < 1 or batch_size < 1 or lr <= 0 or weight_decay < 0:
        raise ValueError(f"fit_linear_probe: epochs/batch_size >= 1, lr > 0, weight_decay >= 0 "
                         f"(got {epochs}, {batch_size}, {lr}, {weight_decay})")  # fmt: skip
    torch.manual_seed(seed)
    probe = LinearProbe(emb.shape[1], classes, identity)
    y = probe.label_indices(labels)
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    emb = emb.float()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(probe(emb[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return probe.eval().requires_grad_(False)


def save_probe(probe: LinearProbe, out_dir: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """``probe.safetensors`` (weight, bias) + ``probe.json`` (classes order, encoder identity, metrics)."""
    from safetensors.torch import save

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in probe.linear.state_dict().items()}
    atomic_write_bytes(out_dir / PROBE_WEIGHTS, save(tensors))
    meta = {"classes": probe.classes, "encoder_identity": probe.encoder_identity,
            "dim": probe.linear.in_features, **(extra or {})}  # fmt: skip
    atomic_write_json(out_dir / PROBE_META, meta)
    return out_dir


def load_probe(probe_dir: str | os.PathLike, encoder: DualEncoder | None = None) -> LinearProbe:
    """A frozen probe; with ``encoder``, refuse one trained on another encoder's embeddings."""
    from safetensors.torch import load_file

    probe_dir = Path(probe_dir)
    for name in (PROBE_META, PROBE_WEIGHTS):
        if not (probe_dir / name).is_file():
            raise FileNotFoundError(f"{probe_dir / name}: missing (a probe directory holds {PROBE_META} and "
                                    f"{PROBE_WEIGHTS})")  # fmt: skip
    meta = json.loads((probe_dir / PROBE_META).read_text())
    probe = LinearProbe(int(meta["dim"]), list(meta["classes"]), meta.get("encoder_identity", ""))
    probe.linear.load_state_dict(load_file(str(probe_dir / PROBE_WEIGHTS)))
    if encoder is not None:
        if probe.encoder_identity != encoder.identity:
            raise ValueError(
                f"{probe_dir}: trained on encoder {probe.encoder_identity[:16]}, not on {encoder.source} "
                f"({encoder.identity[:16]})"
            )
        probe.to(encoder.device)
    return probe.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# the Clinical Alignment Module (CRAFT sec. 3.2, A.1)


class ClinicalAlignmentModule:
    """Frozen encoder + probe + checklists -> per-sample VDC, CCS, DD, SFS tensors for generated images.

    Critic use (DRaFT, ``dd="loglik"``): every reward is differentiable w.r.t. the generated pixels;
    combine them with ``craft.losses.clinical_reward``. Evaluator use (``dd="accuracy"``): DD is
    1.0 where the probe's argmax is the true class (CRAFT sec. 4.1.4), the rest as for the critic.

    checklist_mode: ``"mean_items"`` (default) embeds each "Attribute: description." item separately
    and averages the unit vectors (renormalised): a joined five-item checklist runs past the 64-token
    SigLIP / 32-token tiny text windows and would be truncated. ``"joined"`` embeds the single sentence
    ``craft.annotate.checklists.checklist_text`` makes.
    """

    def __init__(
        self,
        encoder: DualEncoder,
        probe: LinearProbe,
        checklists: dict[str, list[dict[str, str]]],
        checklist_mode: Literal["mean_items", "joined"] = "mean_items",
        dd: Literal["loglik", "accuracy"] = "loglik",
    ):
        from craft.annotate.checklists import checklist_text

        if probe.encoder_identity and probe.encoder_identity != encoder.identity:
            raise ValueError(f"probe was trained on encoder {probe.encoder_identity[:16]}, not {encoder.source}")
        missing = [c for c in probe.classes if c not in checklists]
        if missing:
            raise ValueError(f"checklists: no checklist for class {missing[0]!r}")
        if checklist_mode not in ("mean_items", "joined"):
            raise ValueError(f"checklist_mode must be mean_items or joined, got {checklist_mode!r}")
        if dd not in ("loglik", "accuracy"):
            raise ValueError(f"dd must be loglik or accuracy, got {dd!r}")
        probe.eval().requires_grad_(False)  # frozen during CRAFT optimisation (A.2)
        self.encoder, self.probe, self.dd = encoder, probe.to(encoder.device), dd
        rows = []
        for c in probe.classes:
            items = checklists[c]
            if checklist_mode == "joined":
                rows.append(encoder.encode_texts([checklist_text(items)])[0])
            else:
                e = encoder.encode_texts([checklist_text([i]) for i in items]).mean(0)
                rows.append(F.normalize(e, dim=-1))
        self.checklist_emb = torch.stack(rows)  # [C, D], row order = probe.classes

    def reference_embeddings(self, references: torch.Tensor) -> torch.Tensor:
        """Embeddings of real reference images (no grad): compute once per batch for SFS."""
        with torch.no_grad():
            return self.encoder.encode_images(references)

    def __call__(
        self,
        images: torch.Tensor,
        labels: list[str] | torch.Tensor,
        prompts: list[str],
        references: torch.Tensor | None = None,
        reference_emb: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """images [B, C, H, W] in [0, 1]; labels (class names or indices); prompts = enriched prompts p_i.

        Returns {"vdc", "ccs", "dd"[, "sfs"]} each [B]; "sfs" only when references or reference_emb are given.
        """
        from craft.losses import ccs_reward, dd_reward, sfs_reward, vdc_reward

        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
        y = self.probe.label_indices(labels)
        emb = self.encoder.encode_images(images)
        out = {
            "vdc": vdc_reward(emb, self.encoder.encode_texts(prompts)),  # eq. 2
            "ccs": ccs_reward(emb, self.checklist_emb.to(emb.device)[y]),  # eq. 3
        }
        logits = self.probe(emb)
        out["dd"] = dd_reward(logits, y) if self.dd == "loglik" else (logits.argmax(-1) == y).float()  # eq. 4
        if reference_emb is None and references is not None:
            reference_emb = self.reference_embeddings(references)
        if reference_emb is not None:
            out["sfs"] = sfs_reward(emb, reference_emb)  # eq. 5
        return out
