"""Training data with a bounded working set: pixels decoded from disk per batch, latents cached on disk.

A training stage hands ``craft.train.loop.train`` a dict of equal-length **columns**. A column is a
tensor or list (small, in memory: captions, labels, typicality scores) or a lazy column that produces
the rows ``idx`` of one batch on request:

- ``PixelColumn``: images (or ControlNet conditions) read from disk as uint8 and converted to float
  for the requested rows only; ``image_column`` builds one over manifest rows.
- ``LatentColumn``: rows of a latent cache file read with ``os.pread`` (no mapping of the whole file,
  so the resident set stays at one batch), multiplied by the VAE's current ``scaling_factor``.
- ``StatesColumn``: text-encoder states of a cached table of unique prompts, indexed per row.

The loop puts the dict behind a torch ``DataLoader`` whose batch sampler is ``batch_indices``, so the
batches are the ones the in-memory dicts gave, and ``LoopConfig.data_workers`` decode ahead of the step.

**Latent cache.** The frozen first stage's posterior means of a split are computed once and written to
``<cache root>/latents/<key>/`` (``latents.npy`` + ``meta.json``), built in a temporary sibling and renamed
into place (``craft.io.atomic_dir``). The key hashes everything that decides the numbers: the dataset's
content version (``dataset_ref.json`` when the pipeline's data step wrote one, else the folder's
``craft.storage.datasets.local_version``), the rows (image ids and paths of the split), the VAE digest
(weights and config, except ``scaling_factor``/``shift_factor``: the cache holds unscaled means so that the
CRAFTS autoencoder's two encodes, before and after its scaling factor is set, share one entry), the
resolution, the encode dtype and the resize policy. ``meta.json`` carries the key, the shape and the
sha256 of ``latents.npy``; an entry whose file is missing, truncated or altered is reported, deleted and
recomputed, never read. A file lock serialises builders of one key (DDP ranks, concurrent stages).

Cache root: ``$CRAFT_CACHE_DIR``, else ``<model cache>/data-cache`` (:func:`model_cache_dir`: the pipeline's
model-cache volume on a cluster, ``pipelines/resources.py``, or a local run's folder), else ``~/.cache/craft/data``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from craft.io import atomic_dir, atomic_write_json, sha256_file

log = logging.getLogger(__name__)

CACHE_ENV = "CRAFT_CACHE_DIR"
MODEL_CACHE_ENV = "CRAFT_MODEL_CACHE"  # a pod's model-cache emptyDir (pipelines/resources.py sets it per GPU task)
LOCAL_CACHE_ENV = "CRAFT_LOCAL_MODEL_CACHE"  # a local run's model cache, under its root (pipelines.local.run_local)
CACHE_FORMAT = 1  # bump when the entry layout or the encode recipe changes: old entries then miss
# How a stored image becomes an R x R training image: converted to RGB, resized to R x R with bicubic
# filtering when its size differs (no crop, aspect ratio not kept), as the eager loaders always did.
RESIZE_POLICY = "rgb-bicubic-squash"
ValueRange = Literal["signed", "unit"]  # signed: [-1, 1] (VAE input); unit: [0, 1] (encoders, ControlNet)


def model_cache_dir() -> Path | None:
    """The folder of this process's model cache, or None (callers then use ``~/.cache/craft/<kind>``).

    A local run's (``$CRAFT_LOCAL_MODEL_CACHE``, under the run's root) wins over ``$CRAFT_MODEL_CACHE``:
    kfp.local passes a task the env the compiled pipeline sets, whose ``CRAFT_MODEL_CACHE`` is the pod's
    emptyDir mount path (``/cache/models``), which on the user's machine does not exist and which a non-root
    user cannot create. A cluster pod has no ``CRAFT_LOCAL_MODEL_CACHE`` and uses its mount.
    """
    for env in (LOCAL_CACHE_ENV, MODEL_CACHE_ENV):
        if os.environ.get(env):
            return Path(os.environ[env])
    return None


def cache_root() -> Path:
    """Where cached latents and text states live (module docstring)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    if model_cache_dir() is not None:
        return model_cache_dir() / "data-cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "craft" / "data"


# ---------------------------------------------------------------- pixels


def read_image(path: str | os.PathLike, resolution: int | None) -> np.ndarray:
    """One image file as uint8 [R, R, 3] (RGB; resized per ``RESIZE_POLICY``; ``None`` keeps its size)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if resolution is not None and im.size != (resolution, resolution):
                im = im.resize((resolution, resolution), Image.BICUBIC)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from e


def to_float(u8: torch.Tensor, value_range: ValueRange) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 in [-1, 1] (``signed``) or [0, 1] (``unit``), as the eager loaders did."""
    if value_range == "signed":
        return u8.float().div(127.5).sub(1.0)
    if value_range == "unit":
        return u8.float().div(255.0)
    raise ValueError(f"value_range must be signed or unit, got {value_range!r}")


class ImageFiles:
    """Reader of image files by row: ``files(i)`` -> uint8 [R, R, 3] (picklable, for DataLoader workers)."""

    def __init__(self, dataset_dir: str | os.PathLike, paths: Sequence[str], resolution: int | None):
        self.root, self.paths, self.resolution = Path(dataset_dir), [str(p) for p in paths], resolution

    def __len__(self) -> int:
        return len(self.paths)

    def __call__(self, i: int) -> np.ndarray:
        return read_image(self.root / self.paths[i], self.resolution)


class PixelColumn:
    """A column of images produced per batch: ``col[idx]`` -> float32 [B, 3, H, W]; nothing is kept.

    ``read(i)`` returns row i as uint8 [H, W, 3]; the float conversion happens on the batch only.
    """

    def __init__(self, read: Callable[[int], np.ndarray], n: int, value_range: ValueRange = "signed"):
        to_float(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), value_range)  # refuse an unknown range now
        self.read, self.n, self.value_range = read, int(n), value_range
        self.rows: np.ndarray | None = None  # row i of this column is row rows[i] of ``read`` (None: identity)

    def __len__(self) -> int:
        return self.n if self.rows is None else len(self.rows)

    def _source(self, i: int) -> int:
        return i if self.rows is None else int(self.rows[i])

    def uint8(self, idx) -> torch.Tensor:
        """Rows ``idx`` as uint8 [B, 3, H, W]."""
        idx = _as_list(idx, len(self))
        if not idx:
            raise ValueError("PixelColumn: empty index")
        arrs = [self.read(self._source(i)) for i in idx]
        shapes = {a.shape for a in arrs}
        if len(shapes) != 1:
            raise ValueError(f"images differ in size {sorted(shapes)[:3]}; give a resolution to resize them")
        return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)

    def __getitem__(self, idx) -> torch.Tensor:
        return to_float(self.uint8(idx), self.value_range)

    def subset(self, rows: Sequence[int]) -> PixelColumn:
        """The column restricted to ``rows`` (in that order), still lazy."""
        out = PixelColumn(self.read, self.n, self.value_range)
        out.rows = np.asarray([self._source(int(r)) for r in rows], dtype=np.int64)
        return out

    def chunks(self, size: int) -> Iterator[torch.Tensor]:
        """Consecutive float batches of at most ``size`` rows, in row order."""
        for i in range(0, len(self), size):
            yield self[list(range(i, min(i + size, len(self))))]


def image_column(dataset_dir, df, resolution: int | None, value_range: ValueRange = "signed") -> PixelColumn:
    """The images of manifest rows ``df`` (``image_path``) as a lazy column at ``resolution``."""
    return PixelColumn(ImageFiles(dataset_dir, df["image_path"].tolist(), resolution), len(df), value_range)


def _as_list(idx, n: int) -> list[int]:
    if isinstance(idx, torch.Tensor):
        idx = idx.tolist()
    elif isinstance(idx, slice):
        idx = list(range(n))[idx]
    elif isinstance(idx, (int, np.integer)):
        idx = [int(idx)]
    out = [int(i) for i in idx]
    bad = [i for i in out if not -n <= i < n]
    if bad:
        raise IndexError(f"index {bad[0]} out of range for a column of {n} rows")
    return [i % n for i in out]


# ---------------------------------------------------------------- the one VAE encode


def encode_dtype(device, requested: str = "auto") -> torch.dtype:
    """The dtype the VAE encodes in: bf16 on CUDA (``auto``), fp32 on CPU, or what ``requested`` names."""
    table = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if requested == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if requested not in table:
        raise ValueError(f"encode dtype must be auto, fp32 or bf16, got {requested!r}")
    return table[requested]


@torch.no_grad()
def encode_batches(vae, images, batch_size: int = 64, dtype: torch.dtype | None = None) -> Iterator[torch.Tensor]:
    """UNscaled posterior means of ``images`` (a [-1, 1] tensor or ``PixelColumn``), one CPU float32 batch at a time.

    Runs on the VAE's device; ``dtype`` bf16 uses CUDA autocast (the weights stay as they are).
    """
    if batch_size < 1:
        raise ValueError(f"encode batch size must be >= 1, got {batch_size}")
    vae.eval()
    dev = next(vae.parameters()).device
    dtype = dtype or torch.float32
    chunks = images.chunks(batch_size) if isinstance(images, PixelColumn) else images.split(batch_size)
    for x in chunks:
        x = x.to(dev)
        if dtype == torch.float32:
            mean = vae.encode(x.to(vae.dtype)).latent_dist.mean
        else:
            with torch.autocast(dev.type, dtype=dtype):
                mean = vae.encode(x).latent_dist.mean
        yield mean.float().cpu()


def encode_latents(vae, images, batch_size: int = 64, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Scaled posterior means (the frozen first stage's deterministic code) of ``images``, in memory, on the CPU.

    For small sets; training stages read ``cached_latents`` instead.
    """
    lat = torch.cat(list(encode_batches(vae, images, batch_size, dtype)))
    return lat * vae.config.scaling_factor


# ---------------------------------------------------------------- digests and versions

_VERSIONS: dict[tuple, str] = {}


def dataset_version(dataset_dir: str | os.PathLike) -> str:
    """The content version of a dataset folder: its ``dataset_ref.json`` (written by the pipeline's data step
    after checking the files), else ``craft.storage.datasets.content_version`` of its files, as ``local_version``
    computes it (memoised per process on the files' sizes and mtimes)."""
    from craft.storage.datasets import REF_FILE, content_version, is_version

    root = Path(dataset_dir)
    ref = root / REF_FILE
    if ref.is_file():
        version = str(json.loads(ref.read_text()).get("version", ""))
        if not is_version(version):
            raise ValueError(f"{ref}: no valid dataset version in it ({version!r})")
        return version
    stats = []  # (relative posix path, size, mtime) of every file; plain strings (Path objects cost ~1 kB each)
    for dirpath, _, names in os.walk(root, followlinks=True):
        rel_dir = os.path.relpath(dirpath, root)
        for name in names:
            st = os.stat(os.path.join(dirpath, name))  # follows a symlinked file (see below)
            rel = name if rel_dir == "." else f"{Path(rel_dir).as_posix()}/{name}"
            stats.append((rel, st.st_size, st.st_mtime_ns))
    stats.sort()
    key = (str(root.resolve()), hashlib.sha256(repr(stats).encode()).hexdigest())
    if key not in _VERSIONS:
        # local_version's lines (relative path, sha256), except that a symlinked file (a DVC checkout with
        # link type symlink) counts as its target's content instead of being refused
        _VERSIONS[key] = content_version([{"path": rel, "sha256": sha256_file(root / rel)} for rel, _, _ in stats])
    return _VERSIONS[key]


def module_digest(module, skip_config: Sequence[str] = ()) -> str:
    """sha256 of a module's config (public keys except ``skip_config``) and every state-dict tensor."""
    h = hashlib.sha256()
    cfg = getattr(module, "config", None)
    if cfg is not None:  # a diffusers FrozenDict or a transformers PretrainedConfig
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        skip = {*skip_config, "transformers_version"}
        items = {k: v for k, v in cfg.items() if not str(k).startswith("_") and k not in skip}
        h.update(json.dumps(items, sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{t.numel()}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def vae_digest(vae) -> str:
    """The VAE's identity for the latent cache: weights + config, not the scaling applied after encoding."""
    return module_digest(vae, skip_config=("scaling_factor", "shift_factor"))


def _key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _rows_digest(ids: Sequence[str], paths: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(f"{i}\t{p}" for i, p in zip(ids, paths)).encode()).hexdigest()


# ---------------------------------------------------------------- cache entries


class CorruptCacheError(ValueError):
    """A cache entry that must not be read (missing, truncated or altered file, or another key)."""


_VERIFIED: dict[str, tuple] = {}  # entry path -> (size, mtime_ns) of a file whose sha256 was checked here


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of a C-order .npy file, from its header."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        offset = f.tell()
    if fortran:
        raise CorruptCacheError(f"{path}: Fortran-ordered array")
    return tuple(shape), dtype, offset


def check_entry(entry: Path, key: dict[str, Any]) -> dict[str, Any]:
    """The ``meta.json`` of a complete, intact cache entry for ``key``; ``CorruptCacheError`` otherwise."""
    meta_f, data_f = entry / "meta.json", entry / "data.npy"
    try:
        meta = json.loads(meta_f.read_text())
    except (OSError, ValueError) as e:
        raise CorruptCacheError(f"{meta_f}: unreadable ({e})") from e
    if meta.get("key") != key:
        raise CorruptCacheError(f"{entry}: written for another key")
    if not data_f.is_file():
        raise CorruptCacheError(f"{data_f}: missing")
    try:
        shape, dtype, offset = _npy_layout(data_f)
    except (OSError, ValueError) as e:
        raise CorruptCacheError(f"{data_f}: bad header ({e})") from e
    st = data_f.stat()
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if list(shape) != meta.get("shape") or str(dtype) != meta.get("dtype") or st.st_size != expected:
        raise CorruptCacheError(f"{data_f}: {st.st_size} bytes of shape {shape}; meta.json says {meta.get('shape')} "
                                f"({expected} bytes expected): truncated or altered")  # fmt: skip
    stamp = (st.st_size, st.st_mtime_ns)
    if _VERIFIED.get(str(data_f)) != stamp:
        if sha256_file(data_f) != meta.get("sha256"):
            raise CorruptCacheError(f"{data_f}: sha256 differs from meta.json (altered)")
        _VERIFIED[str(data_f)] = stamp
    return meta


def _open_or_build(kind: str, key: dict[str, Any], build: Callable[[Path], dict[str, Any]], root: Path | None) -> Path:
    """The entry directory of ``key`` under ``root/kind``: checked when present, else built by ``build(tmp)``.

    ``build`` writes ``data.npy`` into ``tmp`` and returns extra meta; the entry appears by one rename.
    """
    base = (root or cache_root()) / kind
    entry = base / _key_hash(key)
    with _locked(base / f".{entry.name}.lock"):
        if entry.exists():
            try:
                check_entry(entry, key)
                log.info("%s cache hit: %s", kind, entry)
                return entry
            except CorruptCacheError as e:
                log.warning("%s cache entry is not usable (%s): recomputing it", kind, e)
                shutil.rmtree(entry, ignore_errors=True)
        with atomic_dir(entry) as tmp:
            extra = build(tmp)
            data_f = tmp / "data.npy"
            shape, dtype, _ = _npy_layout(data_f)
            meta = {"key": key, "shape": list(shape), "dtype": str(dtype), "sha256": sha256_file(data_f), **extra}
            atomic_write_json(tmp / "meta.json", meta)
        st = (entry / "data.npy").stat()
        _VERIFIED[str(entry / "data.npy")] = (st.st_size, st.st_mtime_ns)  # hashed just now, in tmp
        check_entry(entry, key)
        log.info("%s cache written: %s", kind, entry)
    return entry


class RowFile:
    """Rows of a C-order .npy file read with ``os.pread``: only the requested rows enter memory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        shape, self.dtype, self.offset = _npy_layout(self.path)
        self.n, self.row_shape = shape[0], tuple(shape[1:])
        self.row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
        self._fd: int | None = None
        self._pid = -1

    def __getstate__(self):  # DataLoader workers open their own descriptor
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def rows(self, idx: Sequence[int]) -> np.ndarray:
        fd = self._file()
        out = np.empty((len(idx), *self.row_shape), dtype=self.dtype)
        flat = out.reshape(len(idx), -1).view(np.uint8)
        for k, i in enumerate(idx):
            buf = os.pread(fd, self.row_bytes, self.offset + int(i) * self.row_bytes)
            if len(buf) != self.row_bytes:
                raise CorruptCacheError(f"{self.path}: row {i} is short ({len(buf)} of {self.row_bytes} bytes)")
            flat[k] = np.frombuffer(buf, dtype=np.uint8)
        return out

    def __del__(self):
        if self._fd is not None and self._pid == os.getpid():
            with contextlib.suppress(OSError):
                os.close(self._fd)


class LatentColumn:
    """Cached unscaled latents, read per batch and multiplied by ``scale`` (the VAE's ``scaling_factor``)."""

    def __init__(self, entry: str | os.PathLike, scale: float = 1.0, rows: Sequence[int] | None = None):
        self.entry = Path(entry)
        self.file = RowFile(self.entry / "data.npy")
        self.scale = float(scale)
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self.ids: list[str] = json.loads((self.entry / "meta.json").read_text()).get("ids", [])

    def __len__(self) -> int:
        return self.file.n if self.rows is None else len(self.rows)

    def __getitem__(self, idx) -> torch.Tensor:
        idx = _as_list(idx, len(self))
        src = idx if self.rows is None else [int(self.rows[i]) for i in idx]
        return torch.from_numpy(self.file.rows(src)) * self.scale

    def subset(self, rows: Sequence[int]) -> LatentColumn:
        """The column restricted to ``rows`` (in that order)."""
        base = np.arange(self.file.n) if self.rows is None else self.rows
        return LatentColumn(self.entry, self.scale, base[np.asarray(rows, dtype=np.int64)])

    def select_ids(self, ids: Sequence[str]) -> LatentColumn:
        """The cached rows of these image ids, in this order (each must be in the cached rows)."""
        pos = {iid: k for k, iid in enumerate(self.ids)}
        if len(pos) != len(self.ids):
            raise ValueError(f"{self.entry}: the cached rows repeat an image_id; select rows by position instead")
        missing = [i for i in ids if i not in pos]
        if missing:
            raise KeyError(f"image_id {missing[0]!r} is not in the cached rows of {self.entry}")
        return LatentColumn(self.entry, self.scale, [pos[i] for i in ids])

    def std(self, chunk: int = 256) -> float:
        """Standard deviation (unbiased, over every element) of the scaled latents, read chunk by chunk."""
        s = ss = 0.0
        count = 0
        for i in range(0, len(self), chunk):
            x = self[list(range(i, min(i + chunk, len(self))))].double()
            s, ss, count = s + float(x.sum()), ss + float((x * x).sum()), count + x.numel()
        return float(np.sqrt(max(ss - s * s / count, 0.0) / max(count - 1, 1)))


def cached_latents(
    vae, dataset_dir, df, resolution: int, *, batch_size: int = 64, dtype: torch.dtype | None = None,
    root: str | os.PathLike | None = None,
) -> LatentColumn:  # fmt: skip
    """Latents of manifest rows ``df`` of ``dataset_dir`` through the frozen ``vae``: from the cache when it has them,
    else encoded once (streaming, ``batch_size`` images at a time) and cached. Rows keep ``df``'s order.

    ``dtype`` defaults to ``encode_dtype`` of the VAE's device (bf16 on CUDA, fp32 on CPU).
    """
    dev = next(vae.parameters()).device
    dtype = dtype or encode_dtype(dev)
    ids = [str(i) for i in df["image_id"].tolist()]
    paths = [str(p) for p in df["image_path"].tolist()]
    key = {
        "format": CACHE_FORMAT, "dataset": dataset_version(dataset_dir), "rows": _rows_digest(ids, paths),
        "vae": vae_digest(vae), "resolution": int(resolution), "dtype": str(dtype).replace("torch.", ""),
        "policy": RESIZE_POLICY,
    }  # fmt: skip

    def build(tmp: Path) -> dict[str, Any]:
        images = image_column(dataset_dir, df, resolution, "signed")
        out = None
        k = 0
        for lat in encode_batches(vae, images, batch_size, dtype):
            if out is None:  # the latent shape is known after the first batch
                out = np.lib.format.open_memmap(tmp / "data.npy", mode="w+", dtype=np.float32,
                                                shape=(len(ids), *lat.shape[1:]))  # fmt: skip
            out[k : k + len(lat)] = lat.numpy()
            k += len(lat)
        if out is None:
            raise ValueError(f"{dataset_dir}: no rows to encode")
        out.flush()
        del out
        return {"ids": ids, "n": len(ids)}

    entry = _open_or_build("latents", key, build, Path(root) if root else None)
    return LatentColumn(entry, vae.config.scaling_factor)


# ---------------------------------------------------------------- frozen text states


class StatesColumn:
    """Per-row text-encoder states [B, L, D] looked up in a cached table of unique prompts."""

    def __init__(self, entry: str | os.PathLike, index: Sequence[int]):
        self.entry = Path(entry)
        self.file = RowFile(self.entry / "data.npy")
        self.index = np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx) -> torch.Tensor:
        idx = _as_list(idx, len(self))
        return torch.from_numpy(self.file.rows([int(self.index[i]) for i in idx]))


def module_identity(tokenizer, text_encoder) -> str:
    """Digest of a frozen text encoder and its tokenizer (vocabulary incl. added tokens, window)."""
    vocab = sorted(tokenizer.get_vocab().items())
    tok = hashlib.sha256(json.dumps([vocab, tokenizer.model_max_length]).encode()).hexdigest()
    return hashlib.sha256((tok + module_digest(text_encoder)).encode()).hexdigest()


def cached_text_states(
    tokenizer, text_encoder, prompts: Sequence[str], *, batch_size: int = 64, root: str | os.PathLike | None = None
) -> StatesColumn:
    """Token states of each row's prompt through the FROZEN ``text_encoder``, each distinct prompt encoded once and
    cached (key: text encoder + tokenizer digest and the distinct prompts), as a column aligned with ``prompts``."""
    from craft.models.diffusion import encode_text

    uniq = list(dict.fromkeys(str(p) for p in prompts))
    dev = next(text_encoder.parameters()).device
    key = {
        "format": CACHE_FORMAT, "text_encoder": module_identity(tokenizer, text_encoder),
        "prompts": hashlib.sha256(json.dumps(uniq).encode()).hexdigest(), "dtype": str(text_encoder.dtype),
        "device": dev.type,
    }  # fmt: skip

    def build(tmp: Path) -> dict[str, Any]:
        was = text_encoder.training
        text_encoder.eval()
        out = None
        with torch.no_grad():
            for i in range(0, len(uniq), batch_size):
                states, _ = encode_text(tokenizer, text_encoder, uniq[i : i + batch_size])
                states = states.float().cpu().numpy()
                if out is None:
                    out = np.lib.format.open_memmap(tmp / "data.npy", mode="w+", dtype=np.float32,
                                                    shape=(len(uniq), *states.shape[1:]))  # fmt: skip
                out[i : i + len(states)] = states
        text_encoder.train(was)
        out.flush()
        del out
        return {"n": len(uniq)}

    entry = _open_or_build("text", key, build, Path(root) if root else None)
    pos = {p: k for k, p in enumerate(uniq)}
    return StatesColumn(entry, [pos[str(p)] for p in prompts])


# ---------------------------------------------------------------- the loop's view of a column dict


def column_len(data: dict[str, Any]) -> int:
    """The common length of a dict of columns (tensors, lists, lazy columns)."""
    lens = {k: len(v) for k, v in data.items()}
    if len(set(lens.values())) != 1:
        raise ValueError(f"dataset columns differ in length: {lens}")
    return next(iter(lens.values()))


def take(data: dict[str, Any], idx: torch.Tensor) -> dict[str, Any]:
    """Rows ``idx`` of a dict of columns: tensors indexed, lazy columns asked for those rows, lists picked."""
    out = {}
    for k, v in data.items():
        if isinstance(v, (torch.Tensor, PixelColumn, LatentColumn, StatesColumn)):
            out[k] = v[idx]
        else:
            out[k] = [v[i] for i in idx.tolist()]
    return out


class Batches(torch.utils.data.Dataset):
    """A column dict as a map dataset whose ``__getitems__`` builds one whole batch (DataLoader fetches it)."""

    def __init__(self, data: dict[str, Any]):
        self.data = data
        self.n = column_len(data)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return take(self.data, torch.tensor([i]))

    def __getitems__(self, idx: list[int]) -> dict[str, Any]:
        return take(self.data, torch.as_tensor(idx, dtype=torch.long))


def _whole_batch(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def batch_loader(data: dict[str, Any], index_batches, workers: int = 0, pin_memory: bool = False):
    """A DataLoader yielding ``take(data, b)`` for each index batch ``b`` of ``index_batches`` (a re-iterable).

    ``workers`` > 0 decodes ahead in worker processes (two batches each); the global torch RNG is not touched.
    """
    return torch.utils.data.DataLoader(
        Batches(data), batch_sampler=index_batches, num_workers=workers, collate_fn=_whole_batch,
        pin_memory=pin_memory, generator=torch.Generator(), persistent_workers=False,
    )  # fmt: skip
