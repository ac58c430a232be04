"""Pre-extracted token codes on disk: the format, its writer and its reader.

docs/data.md#ten-crop-code-extraction and docs/data.md#token-code-folders. Upstream writes one tiny
``.npy`` per image, finds the number of augmentations by a path substring and
hard-codes the file count. arforge writes one folder of a few large arrays::

    codes/
      codes.npy      (N, n_aug, L, S)  int16/int32/int64, the smallest that holds the vocabulary
      labels.npy     (N,)              int64 class index
      indices.npy    (N,)              int64 index of the row's image in the source dataset (-1: unknown)
      manifest.json  what produced them (see :class:`CodesManifest`)

Ids follow ``arforge.interfaces``: L = h*w positions in raster order, S id
components per position (1 for VQ/LFQ, 2 for IAR2's (s, d)). The folder is
written under a temporary name and renamed into place complete, so a reader
never sees half an extraction. Arrays are opened with ``mmap_mode='r'``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from arforge.data.image_datasets import DataError

CODES_FORMAT = "arforge-token-codes-v1"
MANIFEST = "manifest.json"
CODES_FILE, LABELS_FILE, INDICES_FILE = "codes.npy", "labels.npy", "indices.npy"


class VocabularyError(DataError):
    """Stored codes do not fit the vocabulary a model expects."""


def codes_dtype(codebook_sizes: Sequence[int]) -> np.dtype:
    """The smallest signed integer dtype holding every id (< max codebook size).

    LlamaGen (16384) and IAR2 (256, 4096) -> int16; Open-MAGVIT2 (2^18) -> int32.
    Signed, so that torch reads it natively and a negative id is detectable.
    """
    largest = max(int(s) for s in codebook_sizes)
    for dtype in (np.int16, np.int32):
        if largest - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- manifest
@dataclass
class CodesManifest:
    """``manifest.json``: what the arrays hold and what produced them."""

    num_samples: int
    n_aug: int
    seq_len: int  #: L = h * w
    grid: tuple[int, int]  #: (h, w) token grid
    codebook_sizes: tuple[int, ...]  #: vocabulary of each of the S id components
    dtype: str  #: dtype of codes.npy
    augmentations: list[str]  #: name of each of the n_aug views, in array order
    max_ids: list[int]  #: per component, over the whole array (checked against vocabularies)
    min_ids: list[int]
    tokenizer_checkpoint: str | None = None
    tokenizer_sha256: str | None = None  #: when the checkpoint is a file
    tokenizer_class: str | None = None
    factorization: str = "identity"
    image_size: int | None = None
    crop_range: float | None = None
    crop_size: int | None = None
    ten_crop: bool | None = None
    flips: bool | None = None
    dataset_source: str = ""
    class_names: list[str] = field(default_factory=list)
    skipped: int = 0  #: unreadable source images left out
    created: str = ""
    format: str = CODES_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def id_components(self) -> int:
        return len(self.codebook_sizes)

    def save(self, path: str | os.PathLike) -> None:
        data = asdict(self)
        data["id_components"] = self.id_components
        data["files"] = {"codes": CODES_FILE, "labels": LABELS_FILE, "indices": INDICES_FILE}
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CodesManifest":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path} does not exist: {path.parent} is not a token-code folder; "
                            "extract codes first with the extract_codes job")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON ({exc}); re-run the extraction") from exc
        if data.get("format") != CODES_FORMAT:
            raise DataError(f"{path}: unknown token-code format {data.get('format')!r} (expected {CODES_FORMAT!r})")
        names = {f.name for f in fields(cls)}
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise DataError(f"{path} lacks {', '.join(missing)}; it is incomplete, re-run the extraction")
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["grid"] = tuple(kwargs["grid"])
        kwargs["codebook_sizes"] = tuple(kwargs["codebook_sizes"])
        return cls(**kwargs)


# ------------------------------------------------------------------ writer
class TokenCodeWriter:
    """Writes one token-code folder; rows may arrive in any order (by position) or appended.

    The arrays are pre-allocated for ``capacity`` rows in a temporary sibling
    folder; rows never written (unreadable images) are squeezed out at
    :meth:`commit`, which then renames the folder into place.

    Args:
        directory: the token-code folder to create.
        capacity: the most rows that can arrive (the source dataset's length).
        n_aug, seq_len, codebook_sizes: the shape (capacity, n_aug, L, S) and vocabulary.
        overwrite: replace an existing token-code folder.
    """

    def __init__(self, directory: str | os.PathLike, *, capacity: int, n_aug: int, seq_len: int,
                 codebook_sizes: Sequence[int], overwrite: bool = False) -> None:
        self.directory = Path(directory).expanduser()
        if capacity < 1:
            raise DataError(f"nothing to write to {self.directory}: the source dataset is empty")
        if self.directory.exists():
            if not self.directory.is_dir():
                raise DataError(f"{self.directory} exists and is a file; choose another output_dir")
            if (self.directory / MANIFEST).is_file():
                if not overwrite:
                    raise DataError(f"{self.directory} already holds token codes; pass overwrite=True "
                                    "to replace them, or choose another output_dir")
            elif any(self.directory.iterdir()):
                raise DataError(f"{self.directory} exists and is not a token-code folder; refusing to "
                                "replace it. Choose a new or empty output_dir")
        self.codebook_sizes = tuple(int(s) for s in codebook_sizes)
        self.capacity, self.n_aug, self.seq_len = int(capacity), int(n_aug), int(seq_len)
        self.dtype = codes_dtype(self.codebook_sizes)
        self.tmp = self.directory.parent / f".{self.directory.name}.tmp-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        S = len(self.codebook_sizes)
        self._codes = np.lib.format.open_memmap(self.tmp / CODES_FILE, mode="w+", dtype=self.dtype,
                                                shape=(self.capacity, self.n_aug, self.seq_len, S))
        self._labels = np.lib.format.open_memmap(self.tmp / LABELS_FILE, mode="w+", dtype=np.int64,
                                                 shape=(self.capacity,))
        self._indices = np.lib.format.open_memmap(self.tmp / INDICES_FILE, mode="w+", dtype=np.int64,
                                                  shape=(self.capacity,))
        self._written = np.zeros(self.capacity, dtype=bool)
        self._next = 0
        self._max = np.full(S, -1, dtype=np.int64)
        self._min = np.full(S, np.iinfo(np.int64).max, dtype=np.int64)

    @property
    def rows_written(self) -> int:
        return int(self._written.sum())

    def write(self, codes: np.ndarray, labels: np.ndarray, *, positions: np.ndarray | None = None,
              source_indices: np.ndarray | None = None) -> None:
        """Store ``codes`` (b, n_aug, L, S) and ``labels`` (b,) at ``positions`` (default: appended)."""
        codes = np.asarray(codes)
        b = len(codes)
        expected = (b, self.n_aug, self.seq_len, len(self.codebook_sizes))
        if codes.shape != expected:
            raise DataError(f"codes of shape {codes.shape} do not match the folder's (b, n_aug, L, S) = {expected}")
        if b == 0:
            return
        if positions is None:
            if self._next + b > self.capacity:
                raise DataError(f"more rows arrived for {self.directory} than the {self.capacity} announced: "
                                "the source yielded more samples than its stated length (fix num_samples "
                                "or the shards' JSON)")
            positions = np.arange(self._next, self._next + b)
            self._next += b
        positions = np.asarray(positions, dtype=np.int64)
        if positions.min() < 0 or positions.max() >= self.capacity:
            raise DataError(f"row positions {positions.min()}..{positions.max()} outside 0..{self.capacity - 1}")
        if self._written[positions].any() or len(np.unique(positions)) != b:
            raise DataError(f"row(s) {positions[self._written[positions]].tolist()[:5]} written twice")
        flat = codes.reshape(-1, codes.shape[-1])  # (b * n_aug * L, S)
        hi, lo = flat.max(axis=0), flat.min(axis=0)
        for c, size in enumerate(self.codebook_sizes):
            if lo[c] < 0 or hi[c] >= size:
                raise DataError(f"the tokenizer produced id {int(hi[c]) if hi[c] >= size else int(lo[c])} in "
                                f"component {c}, outside its codebook of {size}; its codebook_sizes are wrong")
        np.maximum(self._max, hi, out=self._max)
        np.minimum(self._min, lo, out=self._min)
        self._codes[positions] = codes.astype(self.dtype, copy=False)
        self._labels[positions] = np.asarray(labels, dtype=np.int64)
        self._indices[positions] = (np.asarray(source_indices, dtype=np.int64) if source_indices is not None
                                    else np.full(b, -1, dtype=np.int64))
        self._written[positions] = True

    def commit(self, *, grid: tuple[int, int], augmentations: Sequence[str], **metadata: Any) -> CodesManifest:
        """Squeeze out unwritten rows, write the manifest and rename the folder into place."""
        kept = np.flatnonzero(self._written)  # rows in position order
        if len(kept) == 0:
            self.abort()
            raise DataError(f"no sample could be encoded for {self.directory}: every source image was unreadable")
        if grid[0] * grid[1] != self.seq_len:
            self.abort()
            raise DataError(f"grid {grid} does not hold the {self.seq_len} positions per view")
        for arr in (self._codes, self._labels, self._indices):
            arr.flush()
        if len(kept) < self.capacity:
            self._compact(kept)
        manifest = CodesManifest(
            num_samples=int(len(kept)), n_aug=self.n_aug, seq_len=self.seq_len, grid=tuple(grid),
            codebook_sizes=self.codebook_sizes, dtype=self.dtype.name, augmentations=list(augmentations),
            max_ids=self._max.tolist(), min_ids=self._min.tolist(),
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **metadata)
        if len(manifest.augmentations) != self.n_aug:
            self.abort()
            raise DataError(f"{len(manifest.augmentations)} augmentation names for {self.n_aug} views")
        del self._codes, self._labels, self._indices  # close the maps before the rename
        for name in (CODES_FILE, LABELS_FILE, INDICES_FILE):
            with open(self.tmp / name, "rb+") as f:
                os.fsync(f.fileno())
        manifest.save(self.tmp / MANIFEST)
        if self.directory.exists():  # overwrite: swap whole folders so no mix is ever visible
            trash = self.directory.parent / f".{self.directory.name}.trash-{os.getpid()}"
            os.rename(self.directory, trash)
            os.rename(self.tmp, self.directory)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(self.tmp, self.directory)
        return manifest

    def _compact(self, kept: np.ndarray, chunk: int = 4096) -> None:
        """Copy the kept rows, in order, into arrays of exactly ``len(kept)`` rows."""
        for name, old in ((CODES_FILE, self._codes), (LABELS_FILE, self._labels), (INDICES_FILE, self._indices)):
            new = np.lib.format.open_memmap(self.tmp / f"compact-{name}", mode="w+", dtype=old.dtype,
                                            shape=(len(kept),) + old.shape[1:])
            for start in range(0, len(kept), chunk):
                new[start:start + chunk] = old[kept[start:start + chunk]]
            new.flush()
            del new
        del self._codes, self._labels, self._indices
        for name in (CODES_FILE, LABELS_FILE, INDICES_FILE):
            os.replace(self.tmp / f"compact-{name}", self.tmp / name)
        self._codes = np.load(self.tmp / CODES_FILE, mmap_mode="r")
        self._labels = np.load(self.tmp / LABELS_FILE, mmap_mode="r")
        self._indices = np.load(self.tmp / INDICES_FILE, mmap_mode="r")

    def abort(self) -> None:
        """Drop everything written (the temporary folder)."""
        for name in ("_codes", "_labels", "_indices"):
            if hasattr(self, name):
                delattr(self, name)
        shutil.rmtree(self.tmp, ignore_errors=True)


# ------------------------------------------------------------------ reader
class TokenSample(NamedTuple):
    """One item; the default collate gives codes (B, L, S) and labels (B,)."""

    codes: torch.Tensor  #: (L, S) int64
    label: int


class _Extraction:
    """One token-code folder: its manifest and lazily opened memory maps.

    The maps are opened in the process that reads them (and dropped when
    pickled): a pickled ``np.memmap`` would copy the whole array into every
    spawned DataLoader worker.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        from arforge.tracking import resolve_path

        self.root = resolve_path(root).expanduser()  # "outputs:<experiment>/<run>/codes" names a run's output
        if not self.root.is_dir():
            raise DataError(f"token-code folder {self.root} does not exist; run the extract_codes job "
                            "or fix the path")
        self.manifest_path = self.root / MANIFEST
        self.manifest = CodesManifest.load(self.manifest_path)
        self._codes: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        self._id_range: tuple[np.ndarray, np.ndarray] | None = None
        m = self.manifest
        codes, labels = self.codes, self.labels
        expected = (m.num_samples, m.n_aug, m.seq_len, m.id_components)
        if codes.shape != expected or labels.shape != (m.num_samples,):
            raise DataError(f"{self.root}: codes {codes.shape} / labels {labels.shape} do not match "
                            f"{self.manifest_path} ({expected}); the folder is corrupt, re-run the extraction")

    def _open(self, name: str) -> np.ndarray:
        try:
            return np.load(self.root / name, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise DataError(f"{self.root / name} cannot be read ({exc}); re-run the extraction") from exc

    @property
    def codes(self) -> np.ndarray:  # (N, n_aug, L, S)
        if self._codes is None:
            self._codes = self._open(CODES_FILE)
        return self._codes

    @property
    def labels(self) -> np.ndarray:  # (N,)
        if self._labels is None:
            self._labels = self._open(LABELS_FILE)
        return self._labels

    def scan_ids(self, chunk: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
        """Per-component (min, max) read from the array itself, about ``chunk`` ids at a time.

        The manifest's ``min_ids``/``max_ids`` are only what the extraction saw; a copied,
        edited or truncated ``codes.npy`` is caught only by reading it. The memory map is
        read in row blocks, so memory stays O(chunk) whatever the folder's size; the result
        is kept for the life of this object.
        """
        if self._id_range is None:
            m = self.manifest
            S = m.id_components
            per_row = max(1, m.n_aug * m.seq_len * S)
            rows = max(1, chunk // per_row)
            lo, hi = np.full(S, np.iinfo(np.int64).max), np.full(S, np.iinfo(np.int64).min)
            for start in range(0, m.num_samples, rows):
                block = np.asarray(self.codes[start:start + rows]).reshape(-1, S)  # (rows * n_aug * L, S)
                lo, hi = np.minimum(lo, block.min(axis=0)), np.maximum(hi, block.max(axis=0))
            self._id_range = (lo, hi)
        return self._id_range

    def label_range(self, chunk: int = 1 << 22) -> tuple[int, int]:
        """(min, max) of ``labels.npy``, read in chunks."""
        lo, hi = np.iinfo(np.int64).max, np.iinfo(np.int64).min
        for start in range(0, self.manifest.num_samples, chunk):
            block = np.asarray(self.labels[start:start + chunk])
            lo, hi = min(lo, int(block.min())), max(hi, int(block.max()))
        return lo, hi

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_codes": None, "_labels": None}


def _uniform(seed: int, epoch: int, index: int, stream: int) -> float:
    """A uniform in [0, 1) from (seed, epoch, index, stream): splitmix64, no state.

    Counter-based, so the choice for a read depends on nothing but these four
    numbers: not on the worker count, the read order or earlier reads.
    """
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xD1B54A32D192ED03 + index * 0x8CB92BA72F3D8DD7
         + stream * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return (x >> 11) * 2.0 ** -53


def _load_remap(remap: Any) -> np.ndarray:
    source = "the remap tensor"
    if isinstance(remap, (str, os.PathLike)):
        from arforge.tracking import resolve_path  # "pipeline:cluster/mapping.npy" from jobs.cluster_codebook

        path = resolve_path(remap).expanduser()
        source = str(path)
        if not path.is_file():
            raise DataError(f"remap file {path} does not exist (IAR's mapping-*.pt, mapping[old id] = new id)")
        if path.suffix == ".npy":
            remap = np.load(path)
        else:
            from arforge.checkpoint import load_foreign  # weights_only=True with an allow-list

            remap = load_foreign(path)
    arr = remap.detach().cpu().numpy() if isinstance(remap, torch.Tensor) else np.asarray(remap)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{source} must be a 1-D integer mapping (mapping[old id] = new id), "
                        f"got shape {arr.shape} dtype {arr.dtype}")
    return arr.astype(np.int64)


class TokenCodeDataset(Dataset):
    """Reads a token-code folder: one augmentation per read, optional secondary set and remap.

    docs/data.md#ten-crop-code-extraction (loading) and docs/data.md#token-code-folders.

    Args:
        root: the token-code folder (``manifest.json`` + arrays).
        secondary: another extraction of the same images (e.g. crop_range 1.05),
            used instead of ``root`` with probability ``secondary_prob``.
        secondary_prob: 0.5 upstream.
        remap: IAR's mapping (docs/iar.md#codebook-clustering, mapping[old id] = new id):
            a LongTensor, an array, or a ``.pt``/``.npy`` file.
        remap_component: the id component the remap applies to.
        codebook_sizes: if given, :meth:`check_vocab` runs on open.
        augmentation: ``"random"`` (uniform over the stored views per read) or
            a fixed view index (e.g. 4, the centre crop, for evaluation).
        seed: with the epoch (:meth:`set_epoch`) and the index, decides each
            read's view and source, so runs are reproducible whatever the
            worker count.
    """

    def __init__(self, *, root: str | os.PathLike, secondary: str | os.PathLike | None = None,
                 secondary_prob: float = 0.5, remap: Any = None, remap_component: int = 0,
                 codebook_sizes: Sequence[int] | None = None, augmentation: Literal["random"] | int = "random",
                 seed: int = 0) -> None:
        self.primary = _Extraction(root)
        m = self.primary.manifest
        self.secondary = _Extraction(secondary) if secondary is not None else None
        if self.secondary is not None:
            self._check_secondary()
        if not 0.0 <= secondary_prob <= 1.0:
            raise DataError(f"secondary_prob must be in [0, 1], not {secondary_prob}")
        self.secondary_prob = float(secondary_prob)
        if augmentation != "random" and not (isinstance(augmentation, int) and 0 <= augmentation < m.n_aug):
            raise DataError(f"augmentation must be 'random' or a view index in 0..{m.n_aug - 1} "
                            f"({self.primary.manifest_path} holds {m.augmentations}), not {augmentation!r}")
        self.augmentation = augmentation
        if not 0 <= remap_component < m.id_components:
            raise DataError(f"remap_component {remap_component} does not exist: the codes have "
                            f"{m.id_components} id component(s)")
        self.remap = _load_remap(remap) if remap is not None else None
        self.remap_component = remap_component
        self.seed = int(seed)
        self.epoch = 0
        self.manifest = m
        self.classes = list(m.class_names)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.source = str(self.primary.root)
        if codebook_sizes is not None:
            self.check_vocab(codebook_sizes)
        elif self.remap is not None:
            self.check_vocab(m.codebook_sizes)  # the remap must at least fit the codes' own vocabulary

    # ----------------------------------------------------------- properties
    @property
    def seq_len(self) -> int:
        return self.manifest.seq_len

    @property
    def grid(self) -> tuple[int, int]:
        return self.manifest.grid

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return self.manifest.codebook_sizes

    @property
    def n_aug(self) -> int:
        return self.manifest.n_aug

    @property
    def skipped(self) -> int:
        """Always 0 when reading (images skipped at extraction are in ``manifest.skipped``)."""
        return 0

    def __len__(self) -> int:
        return self.manifest.num_samples

    def set_epoch(self, epoch: int) -> None:
        """New view choices for ``epoch`` (call before creating the epoch's iterator)."""
        self.epoch = int(epoch)

    # --------------------------------------------------------------- checks
    def _check_secondary(self) -> None:
        a, b = self.primary, self.secondary
        assert b is not None
        for key in ("num_samples", "seq_len", "grid", "codebook_sizes"):
            va, vb = getattr(a.manifest, key), getattr(b.manifest, key)
            if va != vb:
                raise DataError(f"secondary extraction {b.manifest_path} has {key} = {vb}, but "
                                f"{a.manifest_path} has {va}: both must encode the same images with the same tokenizer")
        if not np.array_equal(a.labels, b.labels):
            raise DataError(f"the labels of {b.root} differ from {a.root}: the secondary extraction "
                            "is not of the same images in the same order")

    def check_vocab(self, codebook_sizes: Sequence[int], *, scan: bool = True) -> None:
        """Raise :class:`VocabularyError` unless every stored id (after the remap) fits ``codebook_sizes``.

        The per-component min/max recorded in the manifest are checked first (no
        reading); then, unless ``scan=False``, the arrays themselves are scanned
        (chunked, see :meth:`_Extraction.scan_ids`): the manifest may be wrong.
        """
        sizes = tuple(int(s) for s in codebook_sizes)
        for ext in filter(None, (self.primary, self.secondary)):
            m = ext.manifest
            if len(sizes) != m.id_components:
                raise VocabularyError(f"{ext.manifest_path}: the codes have {m.id_components} id component(s) "
                                      f"(codebook_sizes {list(m.codebook_sizes)}), but the vocabulary has "
                                      f"{len(sizes)} ({list(sizes)}); use the matching tokenizer/factorization")
            self._check_range(ext, sizes, np.asarray(m.min_ids), np.asarray(m.max_ids), ext.manifest_path)
            if scan:
                lo, hi = ext.scan_ids()
                self._check_range(ext, sizes, lo, hi, f"{ext.root / CODES_FILE} (read from the array; "
                                  f"{MANIFEST} records ids {m.min_ids}..{m.max_ids}, so the file changed "
                                  "after the extraction)")

    def label_range(self) -> tuple[int, int]:
        """(min, max) class label over the stored rows (a chunked read of ``labels.npy``)."""
        return self.primary.label_range()

    def _check_range(self, ext: "_Extraction", sizes: tuple[int, ...], lo: np.ndarray, hi: np.ndarray,
                     where: Any) -> None:
        m = ext.manifest
        for c, size in enumerate(sizes):
            low, high = int(lo[c]), int(hi[c])
            if low < 0:
                raise VocabularyError(f"{where}: component {c} holds a negative id ({low}); the codes are corrupt")
            if self.remap is not None and c == self.remap_component:
                if high >= len(self.remap):
                    raise VocabularyError(
                        f"{where}: component {c} holds ids up to {high}, but the remap has only "
                        f"{len(self.remap)} entries; it belongs to another codebook")
                high = int(self.remap.max())
                low = int(self.remap.min())
                if low < 0:
                    raise VocabularyError(f"the remap maps to a negative id ({low})")
            if high >= size:
                raise VocabularyError(
                    f"{where}: component {c} holds ids up to {high}"
                    + (" after the remap" if self.remap is not None and c == self.remap_component else "")
                    + f", but the vocabulary size is {size} (ids must be < {size}). The codes were "
                    f"extracted for codebook_sizes {list(m.codebook_sizes)}; use the matching "
                    "tokenizer/factorization or re-extract")

    # ---------------------------------------------------------------- items
    def choice(self, index: int) -> tuple[int, int]:
        """``(source, view)`` of a read of ``index`` this epoch: source 0 primary, 1 secondary."""
        if self.augmentation != "random":
            return 0, int(self.augmentation)
        source = 0
        if self.secondary is not None and _uniform(self.seed, self.epoch, index, 0) < self.secondary_prob:
            source = 1
        n_aug = (self.secondary if source else self.primary).manifest.n_aug
        return source, int(_uniform(self.seed, self.epoch, index, 1) * n_aug)

    def __getitem__(self, index: int) -> TokenSample:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        source, view = self.choice(index)
        ext = self.secondary if source else self.primary
        codes = np.array(ext.codes[index, view], dtype=np.int64)  # (L, S), a copy out of the map
        if self.remap is not None:
            codes[:, self.remap_component] = self.remap[codes[:, self.remap_component]]
        return TokenSample(torch.from_numpy(codes), int(self.primary.labels[index]))
