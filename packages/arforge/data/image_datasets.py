"""Image datasets: ImageNet-layout folders and webdataset shards, plus the loader helper.

Every item is an :class:`ImageSample` ``(image, label)``: a float (3, H, W)
tensor in [-1, 1] (or whatever the chosen transform returns) and an int class
index; the default collate turns a batch into ``ImageSample((B, 3, H, W), (B,))``.

Unreadable files (corrupt, truncated, not an image) never stop a run: each one
is logged once with its name and counted in :attr:`skipped`, which a trainer
logs as the metric ``data/skipped``. The count lives in shared memory so the
main process sees what its DataLoader workers met. A folder dataset hands out
the next readable file in index order instead, so batches keep their size (and
ranks their step counts); a shard stream simply leaves the sample out.

Setup mistakes (a wrong path, no class subfolders, an empty dataset, a shard
pattern matching nothing) raise :class:`DataError` naming the path and what to do.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import random
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data.distributed import DistributedSampler

from arforge.errors import ArforgeError
from arforge.data.transforms import ImageTransform, resolve_transform

logger = logging.getLogger("arforge.data")

#: File suffixes read as images (torchvision's ImageFolder list, compared lower-case).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SHARDS_INFO_FORMAT = "arforge-image-shards-v1"


class DataError(ArforgeError):
    """A dataset that cannot be used: names the path and what to do."""


class ImageSample(NamedTuple):
    """One dataset item; the default collate keeps the field names for a batch."""

    image: torch.Tensor  #: (3, H, W) float in [-1, 1]; (B, 3, H, W) in a batch
    label: int  #: class index; a (B,) int64 tensor in a batch


def decode_image(source: str | os.PathLike | bytes) -> Image.Image:
    """Open and fully decode an image as RGB.

    ``load()`` forces the whole file to be decoded here, so a truncated file
    fails now (and is skipped) instead of inside a later transform.
    """
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    with Image.open(fp) as img:
        img.load()
        return img.convert("RGB")


# ------------------------------------------------------------------ skip log
_WORKER_SLOTS = 1024


class SkipLog:
    """Counts unreadable samples across DataLoader worker processes; logs each once.

    Map-style datasets mark one flag per index, so :attr:`count` is the number
    of distinct bad files however often they are read. Streams have no index:
    each process increments only its own slot (worker id + 1; 0 is the main
    process), so no update is lost without a lock, and a bad sample read again
    in a later pass counts again.
    """

    def __init__(self, *, num_items: int = 0) -> None:
        # share_memory_(): fork workers would otherwise write copy-on-write pages
        # the main process never sees; spawn workers receive the shared handle.
        self._flags = torch.zeros(num_items, dtype=torch.bool).share_memory_()
        self._slots = torch.zeros(_WORKER_SLOTS, dtype=torch.int64).share_memory_()
        self._logged: set[str] = set()  # per process: one warning per file

    def record(self, name: str, error: BaseException | str, *, index: int | None = None) -> None:
        if index is not None:
            if bool(self._flags[index]):
                return
            self._flags[index] = True
        else:
            info = torch.utils.data.get_worker_info()
            slot = 0 if info is None else 1 + info.id % (_WORKER_SLOTS - 1)
            self._slots[slot] += 1
        if name not in self._logged:
            self._logged.add(name)
            reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
            logger.warning("skipping unreadable sample %s (%s)", name, reason)

    @property
    def count(self) -> int:
        return int(self._flags.sum()) + int(self._slots.sum())


# ------------------------------------------------------------- image folder
def scan_image_folder(root: str | os.PathLike, *, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                      exclude: Sequence[str] = ()) -> tuple[list[str], list[tuple[str, int]]]:
    """``(classes, samples)`` of an ImageNet-layout folder, in torchvision ImageFolder order.

    Classes are the sorted subfolder names (hidden ones skipped); files are
    walked recursively, sorted, filtered by suffix (case-insensitive). The
    index of a file is therefore the upstream ``ImageFolder`` index
    (docs/data.md#ten-crop-code-extraction). ``exclude`` lists file names to leave out (e.g.
    Open-MAGVIT2's ``n06596364_9591.JPEG``, docs/data.md#transforms).
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"image folder {root} does not exist; point the dataset's root at a folder "
                        "with one subfolder per class (ImageNet layout: root/<class>/<image>)")
    if not root.is_dir():
        raise DataError(f"{root} is a file, not an image folder; for webdataset .tar shards use the "
                        "image_shards dataset")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class subfolders: expected {root}/<class name>/<image files>, "
                        "one subfolder per class (ImageNet layout)")
    suffixes = tuple(s.lower() for s in extensions)
    skip = set(exclude)
    samples: list[tuple[str, int]] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        before = len(samples)
        for dirpath, _, filenames in sorted(os.walk(root / name, followlinks=True)):
            for fname in sorted(filenames):
                if fname.lower().endswith(suffixes) and fname not in skip:
                    samples.append((os.path.join(dirpath, fname), label))
        if len(samples) == before:
            empty.append(name)
    if not samples:
        raise DataError(f"{root} holds no image files ({', '.join(suffixes)}) in its {len(classes)} "
                        "class subfolders; check the path and the file suffixes")
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise DataError(f"class folder(s) {shown} under {root} hold no image files; remove them or add "
                        "images (labels come from the sorted folder names, so an empty class shifts nothing "
                        "but cannot be trained)")
    return classes, samples


class ImageFolderDataset(Dataset):
    """An ImageNet-layout folder: one subfolder per class, labels from the sorted names.

    Args:
        root: the folder (``root/<class>/<image>``).
        transform: a name from :data:`arforge.data.transforms.TRANSFORMS`
            (docs/data.md#transforms: ``adm_train``, ``adm_eval``, ``magvit2_train``,
            ``magvit2_eval``, ``to_tensor``), any callable from an RGB PIL
            image to a tensor, or None to return the PIL image itself.
        image_size: the side S of a named transform.
        extensions: file suffixes read as images.
        exclude: file names to leave out (Open-MAGVIT2 drops ``n06596364_9591.JPEG``).

    ``classes``/``class_to_idx`` are what the launch layer records. A file that
    fails to decode is skipped (see :class:`SkipLog`): ``dataset[i]`` then
    returns the next readable file, :meth:`read` returns None.
    """

    def __init__(self, *, root: str | os.PathLike, transform: str | ImageTransform | None = "adm_eval",
                 image_size: int = 256, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 exclude: Sequence[str] = ()) -> None:
        self.root = Path(root).expanduser()
        self.classes, self.samples = scan_image_folder(self.root, extensions=extensions, exclude=exclude)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.targets = [label for _, label in self.samples]
        self.image_size = image_size
        self.transform = resolve_transform(transform, image_size=image_size)
        self.skip_log = SkipLog(num_items=len(self.samples))
        self.source = str(self.root)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def skipped(self) -> int:
        """Distinct unreadable files met so far (this process and its workers)."""
        return self.skip_log.count

    def read(self, index: int) -> ImageSample | None:
        """Item ``index``, or None (logged and counted) if its file cannot be decoded."""
        path, label = self.samples[index]
        try:
            image = decode_image(path)
        except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, struct.error... on bad data
            self.skip_log.record(path, exc, index=index)
            return None
        return ImageSample(self.transform(image) if self.transform is not None else image, label)

    def __getitem__(self, index: int) -> ImageSample:
        n = len(self.samples)
        for step in range(n):
            sample = self.read((index + step) % n)
            if sample is not None:
                return sample
        raise DataError(f"no file under {self.root} could be decoded as an image ({n} tried); "
                        "the folder is corrupt or holds no images")

    def with_transform(self, transform: str | ImageTransform | None) -> "ImageFolderDataset":
        """A copy reading the same files through another transform (shares the skip log)."""
        out = copy.copy(self)
        out.transform = resolve_transform(transform, image_size=self.image_size)
        return out


# ------------------------------------------------------------------ shards
def _expand_urls(urls: str | os.PathLike | Sequence[str]) -> list[str]:
    """Shard names from a brace pattern, a list of them, or a folder of ``*.tar``."""
    import braceexpand  # a webdataset dependency

    if isinstance(urls, (str, os.PathLike)):
        text = str(urls)
        if "://" not in text and not text.startswith("pipe:") and Path(text).expanduser().is_dir():
            found = sorted(str(p) for p in Path(text).expanduser().glob("*.tar"))
            if not found:
                raise DataError(f"shard folder {text} holds no .tar files; write shards with tools/make_shards.py")
            return found
        items: Sequence[str] = [text]
    else:
        items = [str(u) for u in urls]
    out = [u for item in items for u in braceexpand.braceexpand(item)]
    if not out:
        raise DataError(f"shard pattern {urls!r} names no shards")
    return out


def _check_local(urls: list[str], pattern: Any) -> None:
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).expanduser().is_file()]
    if missing and len(missing) == len(urls):
        raise DataError(f"shard pattern {pattern!r} matches no file (first expected: {missing[0]}); "
                        "check the path and the brace range, e.g. shards/train-{000000..000009}.tar")
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DataError(f"{len(missing)} of the {len(urls)} shards of {pattern!r} are missing: {shown}; "
                        "fix the brace range or re-write the shards")


def shards_info_path(first_shard: str) -> Path:
    """Where :func:`write_image_shards` puts the sidecar JSON: ``<dir>/<prefix>.json``."""
    path = Path(first_shard).expanduser()
    prefix = re.sub(r"-\d+$", "", path.name[: -len(".tar")] if path.name.endswith(".tar") else path.stem)
    return path.parent / f"{prefix}.json"


def _mix(*values: int) -> int:
    """A 63-bit seed from several ints (deterministic across processes, unlike ``hash``)."""
    x = 0x243F6A8885A308D3
    for v in values:
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


class ImageShardsDataset(IterableDataset):
    """Images in webdataset ``.tar`` shards: an image file (jpg, png, ...) plus ``cls`` per sample.

    Args:
        urls: a brace pattern (``shards/train-{000000..000009}.tar``), a list of
            shards, or a folder of ``*.tar``.
        transform, image_size: as :class:`ImageFolderDataset` (docs/data.md#transforms).
        info: the sidecar JSON written by :func:`write_image_shards` (class
            names, sample count); default ``<shard dir>/<prefix>.json`` if present.
        num_samples: the dataset length, when there is no sidecar JSON.
        class_names: overrides the sidecar's class names.
        shuffle_shards: permute the whole shard list each pass, seeded by
            (seed, epoch) and identical on every rank, before the split.
        shuffle_buffer: samples in webdataset's shuffle buffer (0: no shuffling).
        seed: seed of both shuffles.
        repeat: loop over passes forever (epoch + 1 each), for step-based
            training where ranks must never run dry at different times.

    Distribution: shards are split by rank (``torch.distributed``), then by
    DataLoader worker; give each rank and worker at least one shard. Shards are
    decoded to tensors in the pipeline, so the default collate works.
    """

    def __init__(self, *, urls: str | os.PathLike | Sequence[str], transform: str | ImageTransform | None = "adm_eval",
                 image_size: int = 256, info: str | os.PathLike | None = None, num_samples: int | None = None,
                 class_names: Sequence[str] | None = None, shuffle_shards: bool = False,
                 shuffle_buffer: int = 0, seed: int = 0, repeat: bool = False) -> None:
        self.pattern = str(urls) if isinstance(urls, (str, os.PathLike)) else list(urls)
        self.urls = _expand_urls(urls)
        _check_local(self.urls, self.pattern)
        info_path = Path(info).expanduser() if info is not None else shards_info_path(self.urls[0])
        self.info: dict[str, Any] = {}
        if info is not None and not info_path.is_file():
            raise DataError(f"shards info file {info_path} does not exist; pass the JSON that "
                            "tools/make_shards.py wrote, or leave info unset and give num_samples/class_names")
        if info_path.is_file():
            try:
                self.info = json.loads(info_path.read_text())
            except json.JSONDecodeError as exc:
                raise DataError(f"shards info file {info_path} is not valid JSON ({exc}); "
                                "re-run tools/make_shards.py") from exc
        self.classes: list[str] = list(class_names if class_names is not None else self.info.get("class_names", []))
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        # The sidecar's count covers all the shards it lists; for a subset the length is unknown.
        whole = sorted(Path(u).name for u in self.urls) == sorted(self.info.get("shards", []))
        self.num_samples = num_samples if num_samples is not None else (self.info.get("num_samples") if whole else None)
        self.image_size = image_size
        self.transform = resolve_transform(transform, image_size=image_size)
        self.shuffle_shards = shuffle_shards
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = seed
        self.repeat = repeat
        self.epoch = 0
        self.skip_log = SkipLog()
        self.source = str(self.pattern)
        self._open_url: str | None = None  # the shard being read, for error reports
        self._failed_url: str | None = None  # the shard last counted as broken in this pass

    @property
    def shuffles(self) -> bool:
        return self.shuffle_shards or self.shuffle_buffer > 0

    @property
    def skipped(self) -> int:
        """Unreadable samples (or shards) met so far, this process and its workers."""
        return self.skip_log.count

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError(f"the length of shards {self.source!r} is unknown: no sidecar JSON; pass num_samples")
        return int(self.num_samples)

    def set_epoch(self, epoch: int) -> None:
        """Reseed the shuffles for ``epoch`` (call before creating the epoch's iterator)."""
        self.epoch = int(epoch)

    def with_transform(self, transform: str | ImageTransform | None) -> "ImageShardsDataset":
        out = copy.copy(self)
        out.transform = resolve_transform(transform, image_size=self.image_size)
        return out

    def __iter__(self) -> Iterator[ImageSample]:
        epoch = self.epoch
        while True:
            yield from self._one_pass(epoch)
            if not self.repeat:
                return
            epoch += 1

    # ---------------------------------------------------------------- pass
    def _one_pass(self, epoch: int) -> Iterator[ImageSample]:
        import webdataset as wds
        from webdataset.tariterators import group_by_keys, tar_file_expander

        urls = list(self.urls)
        if self.shuffle_shards:
            # Same permutation on every rank (seeded by seed and epoch only), so the
            # split by rank below still hands each shard to exactly one rank.
            random.Random(_mix(self.seed, epoch)).shuffle(urls)
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        # An explicit pipeline rather than wds.WebDataset: the shard order is ours
        # (no shardshuffle), an empty rank or worker is fine (no empty_check: webdataset
        # 1.0.2 otherwise refuses more workers than shards), and our opener closes each shard when it is done, which
        # webdataset 1.0.2's opener leaves to the garbage collector.
        stages: list[Any] = [
            wds.SimpleShardList(urls),
            wds.split_by_node,
            wds.split_by_worker,
            self._open_shards,
            partial(tar_file_expander, handler=self._on_stream_error),
            partial(group_by_keys, handler=self._on_stream_error),
        ]
        if self.shuffle_buffer > 0:
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100),
                                      seed=_mix(self.seed, epoch, rank, worker)))
        yielded = 0
        before = self.skipped
        self._open_url = self._failed_url = None
        for sample in wds.DataPipeline(*stages):
            item = self._decode(sample)
            if item is not None:
                yielded += 1
                yield item
        if yielded == 0 and world == 1 and workers == 1:
            # Only a lone process can tell that the whole dataset is empty.
            what = f"all {self.skipped - before} samples were unreadable" if self.skipped > before else "no samples"
            raise DataError(f"shards {self.source!r}: {what}; check them, or re-write them with tools/make_shards.py")

    def _open_shards(self, shards: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Open each shard; close it once the tar reader asks for the next one."""
        from webdataset.gopen import gopen

        for shard in shards:
            url = self._open_url = shard["url"]
            try:
                stream = gopen(url)
            except Exception as exc:  # a shard that vanished or a failing pipe: skip it
                self._on_stream_error(exc)
                continue
            try:
                yield {**shard, "stream": stream}
            finally:
                stream.close()

    def _on_stream_error(self, exc: BaseException) -> bool:
        """webdataset's handler for a shard that cannot be opened or read to its end: skip the rest of it.

        A truncated tar reaches this handler twice (from the member reader, then
        from the shard reader); it is counted once per shard and pass.
        """
        url = self._open_url or self.source
        if self._failed_url != url:
            self._failed_url = url
            self.skip_log.record(url, exc)
        return True  # True: go on with the next shard (False would end the whole pass)

    def _decode(self, sample: dict[str, Any]) -> ImageSample | None:
        name = f"{sample.get('__url__', self.source)}:{sample.get('__key__', '?')}"
        ext = next((k for k in sample if "." + k.lower() in IMAGE_EXTENSIONS), None)
        try:
            if ext is None:
                raise ValueError(f"no image entry among {sorted(k for k in sample if not k.startswith('__'))}")
            if "cls" not in sample:
                raise ValueError("no 'cls' entry")
            label = int(bytes(sample["cls"]).decode().strip())
            image = decode_image(sample[ext])
        except Exception as exc:  # bad bytes raise anything from PIL; a bad cls ValueError
            self.skip_log.record(name, exc)
            return None
        return ImageSample(self.transform(image) if self.transform is not None else image, label)


# ------------------------------------------------------------ shard writer
@dataclass
class ShardsInfo:
    """What :func:`write_image_shards` wrote (also saved as ``<prefix>.json``)."""

    pattern: str  #: brace pattern of all shards, e.g. ``/data/shards/train-{000000..000003}.tar``
    shards: list[str]
    num_samples: int
    class_names: list[str]
    class_counts: list[int]
    skipped: list[str] = field(default_factory=list)  #: unreadable files left out (verify=True)
    info_path: str = ""


def write_image_shards(*, source: str | os.PathLike, output_dir: str | os.PathLike, prefix: str = "train",
                       max_count: int = 1000, max_size: float = 1e9, shuffle_seed: int | None = 0,
                       verify: bool = True, exclude: Sequence[str] = (), progress: bool = True) -> ShardsInfo:
    """Convert an ImageNet-layout folder into webdataset shards (``tools/make_shards.py``).

    Each sample holds the original file bytes under its suffix (no re-encoding),
    ``cls`` (the folder label) and the key ``%08d`` of its folder index. With
    ``shuffle_seed`` the samples are written in a seeded random order, so that
    shard-level shuffling mixes classes; None keeps the folder order. With
    ``verify`` every file is decoded first and unreadable ones are left out and
    listed. The sidecar ``<prefix>.json`` (class names and counts) is written
    last: its presence marks a complete conversion.
    """
    import webdataset as wds
    from tqdm import tqdm

    classes, samples = scan_image_folder(source, exclude=exclude)
    order = list(range(len(samples)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    out = Path(output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if not re.fullmatch(r"[A-Za-z0-9_]+", prefix):
        raise DataError(f"shard prefix {prefix!r} must be letters, digits and underscores "
                        "(webdataset splits keys at '.', and '-' separates the shard number)")
    counts = [0] * len(classes)
    skipped: list[str] = []
    shards: list[str] = []
    writer = wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=max_count, maxsize=max_size,
                             verbose=0, post=shards.append)
    try:
        for index in tqdm(order, desc="shards", unit="img", disable=not progress):
            path, label = samples[index]
            if verify:
                try:
                    decode_image(path)
                except Exception as exc:  # see decode_image: PIL raises many types
                    logger.warning("skipping unreadable image %s (%s: %s)", path, type(exc).__name__, exc)
                    skipped.append(path)
                    continue
            ext = Path(path).suffix.lower().lstrip(".")
            writer.write({"__key__": f"{index:08d}", ext: Path(path).read_bytes(), "cls": label})
            counts[label] += 1
    finally:
        writer.close()
    total = sum(counts)
    if total == 0:
        for s in shards:
            Path(s).unlink(missing_ok=True)
        raise DataError(f"no readable image in {source}; nothing was written to {out}")
    pattern = str(out / f"{prefix}-{{{0:06d}..{len(shards) - 1:06d}}}.tar")
    info = ShardsInfo(pattern=pattern, shards=[Path(s).name for s in shards], num_samples=total,
                      class_names=classes, class_counts=counts, skipped=skipped,
                      info_path=str(out / f"{prefix}.json"))
    payload = {"format": SHARDS_INFO_FORMAT, "source": str(Path(source).expanduser().resolve()),
               "order": "folder" if shuffle_seed is None else f"shuffled(seed={shuffle_seed})",
               **{k: v for k, v in info.__dict__.items() if k != "info_path"}}
    tmp = out / f".{prefix}.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, info.info_path)
    return info


# ------------------------------------------------------------------ loaders
def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0,
                num_workers: int = 0, drop_last: bool = False, *, pin_memory: bool = False) -> DataLoader:
    """A DataLoader for any arforge dataset, single-process or under torchrun.

    Map-style datasets always go through a :class:`DistributedSampler` (with
    one replica when ``torch.distributed`` is not initialised), so the order of
    epoch e is a function of (seed, e) alone: call :func:`set_epoch` each epoch
    and a resumed run sees the same batches. Iterable datasets (shards) split
    themselves by rank and worker and shuffle by their own settings; asking
    ``shuffle=True`` of one that does not shuffle is an error, not a no-op.
    """
    rank, world = _rank_world()
    generator = torch.Generator().manual_seed(_mix(seed, 0, rank))  # DataLoader worker seeds
    if isinstance(dataset, IterableDataset):
        if shuffle and not getattr(dataset, "shuffles", False):
            raise DataError(f"{type(dataset).__name__} shuffles by its own settings; set its "
                            "shuffle_shards/shuffle_buffer instead of the loader's shuffle=True")
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, drop_last=drop_last,
                            pin_memory=pin_memory, generator=generator)
    else:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed,
                                     drop_last=drop_last)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                            drop_last=drop_last, pin_memory=pin_memory, generator=generator)
    loader.arforge_seed = seed  # read back by set_epoch
    return loader


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Make epoch ``epoch`` of a :func:`make_loader` loader reproducible: the
    sampler order, the dataset's reseeding (shards, token codes) and the
    DataLoader workers' seeds (hence their random crops) all follow (seed, epoch)."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
    if loader.generator is not None:
        rank, _ = _rank_world()
        loader.generator.manual_seed(_mix(getattr(loader, "arforge_seed", 0), epoch, rank))
