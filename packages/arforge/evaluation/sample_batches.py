"""Sample and reference batches: ADM-format ``.npz`` files, read and written in a stream.

docs/evaluation.md#sample-files, docs/evaluation.md#reference-batch. A batch holds ``arr_0``: uint8 images
(N, H, W, 3), NHWC, RGB, C-contiguous, written uncompressed with ``np.savez``
semantics; optionally ``arr_1`` (int64 labels, ignored by the evaluator) and,
for a reference batch, FID statistics ``mu``/``sigma`` and sFID statistics
``mu_s``/``sigma_s``. A 50,000-image 256 px file is 9.8 GB, so nothing here
loads ``arr_0`` whole:

- :class:`ImageBatchReader` streams ``arr_0`` in batches straight out of the
  zip member (as the ADM evaluator does), or memory-maps a plain ``.npy``;
- :class:`ImageBatchWriter` streams images into ``arr_0.npy`` inside a new zip
  and renames it into place only when complete (a killed writer leaves no
  file that looks valid).

arforge's reference batches may also carry ``feature_extractor`` and
``feature_extractor_sha256`` (0-d strings) naming the network behind their
statistics, so statistics from another network are refused instead of
silently compared (the ADM evaluator ignores extra keys).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from arforge.errors import ArforgeError

IMAGES_KEY = "arr_0"
LABELS_KEY = "arr_1"
STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
EXTRACTOR_KEY = "feature_extractor"
EXTRACTOR_SHA_KEY = "feature_extractor_sha256"


class BatchFileError(ArforgeError):
    """A sample/reference batch file that cannot be used: names the file, the key and the fix."""


def _read_into(fp, out: np.ndarray, path: Path) -> np.ndarray:
    """Fill the uint8 array ``out`` from the stream (a zip member returns short reads)."""
    view, pos = memoryview(out.reshape(-1)), 0
    while pos < len(view):
        got = fp.readinto(view[pos:])
        if not got:
            raise BatchFileError(f"{path}: arr_0 ends {len(view) - pos} bytes early; the file is truncated "
                                 "(was its writer killed?). Write it again.")
        pos += got
    return out


def _read_npy_header(fp, path: Path) -> tuple[tuple[int, ...], bool, np.dtype]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fp)
        if version == (1, 0):
            return fmt.read_array_header_1_0(fp)
        if version == (2, 0):
            return fmt.read_array_header_2_0(fp)
        return fmt._read_array_header(fp, version)  # noqa: SLF001  (3.0 has no public reader)
    except ValueError as exc:
        raise BatchFileError(f"{path}: arr_0 is not a valid .npy array ({exc})") from exc


def _check_images(shape, fortran: bool, dtype: np.dtype, path: Path) -> None:
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
        raise BatchFileError(
            f"{path}: arr_0 must be uint8 images of shape (N, H, W, 3) (NHWC, RGB, C order; "
            f"docs/evaluation.md#sample-files), got dtype {dtype}, shape {tuple(shape)}"
            f"{', Fortran order' if fortran else ''}. Convert [-1, 1] NCHW float images with "
            "arforge.metrics.adm.to_uint8 (rounding, not truncation).")


class ImageBatchReader:
    """Streams ``arr_0`` of a ``.npz`` (or a ``.npy`` array) in file order.

    Use as a context manager; ``len(reader)`` is the number of images and
    ``reader.image_shape`` is (H, W, 3). :meth:`batches` yields consecutive
    uint8 (b, H, W, 3) arrays; :meth:`read` returns the next ``n`` images.
    """

    def __init__(self, path: str | os.PathLike, *, key: str = IMAGES_KEY) -> None:
        self.path = Path(path)
        self.key = key
        if not self.path.is_file():
            raise BatchFileError(f"batch file {self.path} does not exist")
        self._zip: zipfile.ZipFile | None = None
        self._fp = None
        self._mmap: np.ndarray | None = None
        self._pos = 0
        if self.path.suffix == ".npy":
            try:
                arr = np.load(self.path, mmap_mode="r")
            except ValueError as exc:
                raise BatchFileError(f"{self.path}: not a readable .npy array ({exc})") from exc
            _check_images(arr.shape, not arr.flags.c_contiguous, arr.dtype, self.path)
            self._mmap, self.shape = arr, tuple(arr.shape)
            return
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise BatchFileError(f"{self.path} is not an .npz (zip) archive ({exc}); a sample/reference batch "
                                 "is written with np.savez") from exc
        member = f"{key}.npy"
        if member not in self._zip.namelist():
            names = sorted(n[:-4] for n in self._zip.namelist() if n.endswith(".npy"))
            self._zip.close()
            raise BatchFileError(f"{self.path} has no '{key}' array (it has {names}); the images of a "
                                 f"sample/reference batch are stored under '{IMAGES_KEY}'")
        self._fp = self._zip.open(member)
        shape, fortran, dtype = _read_npy_header(self._fp, self.path)
        _check_images(shape, fortran, dtype, self.path)
        self.shape = tuple(int(s) for s in shape)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.shape[1:]  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, n: int) -> np.ndarray:
        """The next ``min(n, remaining)`` images, uint8 (n, H, W, 3)."""
        n = max(0, min(n, len(self) - self._pos))
        if self._mmap is not None:
            out = np.array(self._mmap[self._pos:self._pos + n])  # a writable copy, not a view of the map
        else:
            out = _read_into(self._fp, np.empty((n, *self.image_shape), dtype=np.uint8), self.path)
        self._pos += n
        return out

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        """Consecutive batches from the current position, ``limit`` images in all (default: the rest)."""
        left = len(self) - self._pos if limit is None else min(limit, len(self) - self._pos)
        while left > 0:
            batch = self.read(min(batch_size, left))
            left -= len(batch)
            yield batch

    def close(self) -> None:
        if self._fp is not None:
            self._fp.close()
        if self._zip is not None:
            self._zip.close()
        self._fp = self._zip = None
        self._mmap = None

    def __enter__(self) -> "ImageBatchReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def batch_keys(path: str | os.PathLike) -> list[str]:
    """The array names in an ``.npz`` (without loading any of them)."""
    path = Path(path)
    if not path.is_file():
        raise BatchFileError(f"batch file {path} does not exist")
    if path.suffix == ".npy":
        return [IMAGES_KEY]
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    except zipfile.BadZipFile as exc:
        raise BatchFileError(f"{path} is not an .npz (zip) archive ({exc})") from exc


def read_arrays(path: str | os.PathLike, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named small arrays (statistics, provenance) of an ``.npz``; absent keys are left out.

    Pickled object arrays are refused (``allow_pickle=False``).
    """
    path = Path(path)
    present = set(batch_keys(path))
    out: dict[str, np.ndarray] = {}
    if not present.intersection(keys):
        return out
    try:
        with np.load(path, allow_pickle=False) as npz:
            for k in keys:
                if k in present:
                    out[k] = npz[k]
    except ValueError as exc:
        raise BatchFileError(f"{path}: cannot read {sorted(present.intersection(keys))} ({exc})") from exc
    return out


class ImageBatchWriter:
    """Writes an ADM-format batch in a stream: ``arr_0`` first, then small extra arrays.

    The number and shape of the images are fixed up front (the ``.npy`` header
    comes first). The archive is written uncompressed (``np.savez``) as
    ``.<name>.tmp-<pid>`` next to ``path`` and renamed into place by
    :meth:`close` only after every image was written; an exception inside the
    ``with`` block removes the partial file.
    """

    def __init__(self, path: str | os.PathLike, *, num_images: int, image_shape: tuple[int, int, int]) -> None:
        if len(image_shape) != 3 or image_shape[-1] != 3:
            raise BatchFileError(f"images must be (H, W, 3) NHWC, got {image_shape}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.num_images, self.image_shape = int(num_images), tuple(int(s) for s in image_shape)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._zip = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._fp = self._zip.open(f"{IMAGES_KEY}.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": (self.num_images, *self.image_shape)}
        np.lib.format.write_array_header_1_0(self._fp, header)
        self.written = 0
        self._extra: dict[str, np.ndarray] = {}

    def write(self, images: np.ndarray) -> None:
        """Append uint8 (b, H, W, 3) images."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape[1:] != self.image_shape:
            raise BatchFileError(f"{self.path}: expected uint8 images of shape (b, *{self.image_shape}), "
                                 f"got {images.dtype} {images.shape}")
        if self.written + len(images) > self.num_images:
            raise BatchFileError(f"{self.path}: more than the announced {self.num_images} images written")
        self._fp.write(np.ascontiguousarray(images).tobytes())
        self.written += len(images)

    def add_array(self, key: str, value) -> None:
        """A further array (labels, statistics, provenance strings), written after ``arr_0``."""
        if key == IMAGES_KEY:
            raise BatchFileError(f"'{IMAGES_KEY}' is written with write()")
        self._extra[key] = np.asarray(value)

    def close(self) -> Path:
        if self.written != self.num_images:
            self.abort()
            raise BatchFileError(f"{self.path}: {self.written} of the announced {self.num_images} images "
                                 "were written; nothing was saved")
        self._fp.close()
        for key, value in self._extra.items():
            if value.dtype == object:
                raise BatchFileError(f"{self.path}: array {key!r} would need pickle; store numbers or strings")
            with self._zip.open(f"{key}.npy", "w", force_zip64=True) as fp:
                np.lib.format.write_array(fp, value, allow_pickle=False)
        self._zip.close()
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self._fp.close()
        except Exception:  # a short arr_0 makes zipfile's size check fail: the file goes anyway
            pass
        try:
            self._zip.close()
        except Exception:
            pass
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ImageBatchWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


def write_image_batch(path: str | os.PathLike, images: np.ndarray, *,
                      extra: Mapping[str, np.ndarray] | None = None) -> Path:
    """Write in-memory uint8 NHWC ``images`` (and ``extra`` arrays) as a batch file, atomically."""
    images = np.asarray(images)
    with ImageBatchWriter(path, num_images=len(images), image_shape=images.shape[1:]) as w:
        w.write(images)
        for k, v in (extra or {}).items():
            w.add_array(k, v)
    return Path(path)
