"""The files of ``jobs.sample``: the ADM ``.npz`` and the resumable work folder.

See :mod:`arforge.sampling_job` (Work folder, Output) and docs/evaluation.md#sample-files. The
``.npz`` is written as ``np.savez`` (uncompressed) would write it, streamed from the work folder's
``pixels.npy`` a batch at a time, to a temporary name, then renamed into place.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from arforge.checkpoint import write_json_atomic
from arforge.errors import ArforgeError, ConfigError

WORK_FORMAT = "arforge-sample-work-v1"
PIXELS, SETTINGS = "pixels.npy", "settings.json"


class SampleResumeError(ArforgeError):
    """A sample work folder that this run cannot continue (other settings, or damaged)."""


def write_adm_npz(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray) -> Path:
    """``np.savez`` (uncompressed) of ``arr_0`` uint8 NHWC and ``arr_1`` int64, atomically."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"arr_0 must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    images = np.ascontiguousarray(images)
    return _write_adm_zip(path, images.shape, [memoryview(images.reshape(-1))], labels)


def _write_adm_zip(path: str | os.PathLike, shape: tuple[int, ...], chunks, labels: np.ndarray) -> Path:
    """The bytes ``np.savez(arr_0=<uint8 array of shape>, arr_1=labels)`` writes, with arr_0's data
    taken from ``chunks`` (buffers, C order) as they come: temporary file, fsync, rename."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ConfigError(f"the sample file must end in .npz, got {path}")
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": tuple(int(v) for v in shape)}
    expected = int(np.prod(shape))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            # np.savez's own calls (numpy.lib._npyio_impl._savez): a stored zip64 member per array
            with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                with zf.open("arr_0.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array_header_1_0(member, header)
                    written = 0
                    for chunk in chunks:
                        member.write(chunk)
                        written += memoryview(chunk).nbytes
                    if written != expected:
                        raise RuntimeError(f"arr_0 got {written} bytes of pixels for {expected}")
                with zf.open("arr_1.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(labels, dtype=np.int64))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# ------------------------------------------------------------------ work folder
def work_folder(output: str | os.PathLike) -> Path:
    """The folder that holds a sample job's unfinished pixels and ledger: ``<output>.work``."""
    output = Path(output)
    return output.with_name(output.name + ".work")


def _weights_sha256(module: Any) -> str | None:
    """SHA-256 over the names, dtypes, shapes and bytes of a module's state (one tensor in RAM at a time)."""
    state_dict = getattr(module, "state_dict", None)
    if state_dict is None:
        return None
    h = hashlib.sha256()
    for name, value in sorted(state_dict().items()):
        if not isinstance(value, torch.Tensor):
            h.update(f"{name}:{value!r};".encode())
            continue
        t = value.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _npy_layout(path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    """(data offset, shape, dtype) of a C-order ``.npy`` file, from its header."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if fortran:
            raise SampleResumeError(f"{path} is in Fortran order; it was not written by jobs.sample")
        return f.tell(), tuple(shape), dtype


def _encode_done(done: np.ndarray) -> str:
    return base64.b64encode(np.packbits(done).tobytes()).decode("ascii")


def _read_done(work: Path, total: int) -> np.ndarray:
    """The union of every rank's ledger (of this run or an earlier one, of any world size)."""
    done = np.zeros(total, dtype=bool)
    for ledger in sorted(work.glob("done-rank*.json")):
        try:
            data = json.loads(ledger.read_text())
            bits = np.unpackbits(np.frombuffer(base64.b64decode(data["done"]), dtype=np.uint8), count=total)
            if int(data["num_samples"]) != total:
                raise ValueError(f"it counts {data['num_samples']} samples, not {total}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SampleResumeError(f"the sample ledger {ledger} is unreadable ({exc}); delete {work} to "
                                    "start the samples again") from exc
        done |= bits.astype(bool)
    return done


def _prepare_work(work: Path, settings: dict[str, Any], shape: tuple[int, ...]) -> bool:
    """Create the work folder, or check that the one there holds these settings. True: resumed."""
    settings_file = work / SETTINGS
    if settings_file.is_file():
        try:
            recorded = json.loads(settings_file.read_text())
        except (OSError, ValueError) as exc:
            raise SampleResumeError(f"{settings_file} is unreadable ({exc}); delete {work} to start again") from exc
        wanted = json.loads(json.dumps(settings["match"]))  # tuples as lists, as the file holds them
        have = recorded.get("match", {}) if recorded.get("format") == WORK_FORMAT else {}
        changed = sorted(k for k in set(wanted) | set(have) if wanted.get(k) != have.get(k))
        if changed:
            diff = "; ".join(f"{k}: {_short(have.get(k))} then, {_short(wanted.get(k))} now" for k in changed)
            raise SampleResumeError(
                f"{work} holds unfinished samples made with other settings ({diff}). Resuming would mix two "
                f"configurations in one file: delete {work} to start these samples afresh, or choose another "
                "output (jobs.sample.output)")
        pixels = work / PIXELS
        try:
            offset, have_shape, dtype = _npy_layout(pixels)
            complete = pixels.stat().st_size == offset + int(np.prod(have_shape))
        except (OSError, ValueError) as exc:
            raise SampleResumeError(f"{pixels} is unreadable ({exc}); delete {work} to start again") from exc
        if have_shape != shape or dtype != np.uint8 or not complete:
            raise SampleResumeError(f"{pixels} holds {dtype} {have_shape}, not uint8 {shape}; delete {work} "
                                    "to start again")
        return True
    if work.exists():  # killed before settings.json, which is written last: nothing of value in it
        shutil.rmtree(work)
    work.mkdir(parents=True)
    pixels = np.lib.format.open_memmap(work / PIXELS, mode="w+", dtype=np.uint8, shape=shape)  # sparse, no RAM
    del pixels
    with open(work / PIXELS, "rb+") as f:
        os.fsync(f.fileno())
    write_json_atomic(settings_file, {"format": WORK_FORMAT, **settings})
    return False


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def _pixel_chunks(path: Path, offset: int, nbytes: int, chunk: int):
    """The data of ``path`` from ``offset``, ``chunk`` bytes at a time through one reused buffer."""
    buf = bytearray(min(chunk, nbytes) or 1)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        left = nbytes
        while left:
            want, got = min(len(buf), left), 0
            while got < want:
                n = f.readinto(view[got:want])
                if not n:
                    raise SampleResumeError(f"{path} ended {left - got} bytes early")
                got += n
            yield view[:want]
            left -= want


def _read_images(path: Path, offset: int, image_shape: tuple[int, ...], positions: Sequence[int]) -> np.ndarray:
    """The images at ``positions`` of a (N, H, W, 3) uint8 ``.npy`` file, read one by one."""
    nbytes = int(np.prod(image_shape))
    out = np.empty((len(positions),) + tuple(image_shape), dtype=np.uint8)
    with open(path, "rb") as f:
        for k, j in enumerate(positions):
            f.seek(offset + int(j) * nbytes)
            out[k] = np.frombuffer(f.read(nbytes), dtype=np.uint8).reshape(image_shape)
    return out
