"""The code-extraction job: run a tokenizer over a dataset and write token codes.

docs/data.md#ten-crop-code-extraction (ten-crop extraction of LlamaGen, IAR and IAR2), written
in arforge's format (:mod:`arforge.data.token_codes`). Per image the views are

- ``ten_crop=True``: center_crop_arr to int(S * crop_range), then TenCrop(S):
  top-left, top-right, bottom-left, bottom-right, centre, then the same five
  of the flipped image (10 views; 5 with ``flips=False``);
- ``ten_crop=False``: center_crop_arr(S) and its horizontal flip (2; 1 with
  ``flips=False``).

Under torchrun rank r encodes the dataset indices r, r + W, r + 2W, ... (as
upstream's non-shuffled distributed sampler does); every step rank 0 gathers
the ranks' batches and writes them at their dataset positions, so the result
is one set of arrays in dataset order, whatever W. Shard streams split
themselves by rank; their rows are stored in arrival order. Unreadable images
are left out (``indices.npy`` maps each row back to its dataset index) and
counted in ``manifest.skipped``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset

from arforge import validation as V
from arforge.data.image_datasets import DataError
from arforge.data.token_codes import CodesManifest, TokenCodeWriter, sha256_file
from arforge.data.transforms import ExtractionCrops
from arforge.errors import ConfigError


# ------------------------------------------------------------------ context
@dataclass
class LocalContext:
    """The parts of :class:`arforge.launch.RunContext` a job uses, for plain
    library calls and tests: no gin, no MLflow (a :class:`arforge.tracking.Tracker`
    that drops everything unless another is given)."""

    output_dir: Path
    device: torch.device
    tracker: Any
    dist: Any
    precision: Any
    seed: int = 0
    experiment: str = "local"
    run_name: str = "local"
    resume: bool = False
    config_file: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def log(self, msg: str) -> None:
        if self.is_main:
            print(f"[{self.run_name}] {msg}", flush=True)

    def report(self, metric: str, value: float, step: int) -> None:
        """Intermediate values only matter inside a study; a local call drops them."""


def local_context(output_dir: str | os.PathLike = ".", *, device: str = "cpu", seed: int = 0,
                  tracker: Any = None, run_name: str = "local") -> LocalContext:
    """A context for calling jobs from Python; picks up an initialised process group."""
    from arforge.device import Precision, dist_info, resolve_device
    from arforge.tracking import Tracker

    return LocalContext(output_dir=Path(output_dir), device=resolve_device(device),
                        tracker=tracker if tracker is not None else Tracker(), dist=dist_info(),
                        precision=Precision("fp32"), seed=seed, run_name=run_name)


# -------------------------------------------------------------------- views
class _IndexedViews(Dataset):
    """(dataset index, (A, 3, S, S) views, label) for the indices of this rank; None if unreadable."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], crops: ExtractionCrops) -> None:
        self.crops = crops
        self.has_transform = hasattr(dataset, "with_transform")
        self.dataset = dataset.with_transform(crops) if self.has_transform else dataset
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, int] | None:
        index = int(self.indices[i])
        read = getattr(self.dataset, "read", self.dataset.__getitem__)
        sample = read(index)  # arforge datasets: None for an unreadable file (already counted)
        if sample is None:
            return None
        image, label = sample
        return index, _as_views(image, self.crops), int(label)


class _StreamViews(IterableDataset):
    """(-1, views, label) from a stream (it splits itself by rank and worker; it skips bad samples)."""

    def __init__(self, dataset: IterableDataset, crops: ExtractionCrops) -> None:
        self.crops = crops
        self.dataset = dataset.with_transform(crops) if hasattr(dataset, "with_transform") else dataset

    def __iter__(self):
        for image, label in self.dataset:
            yield -1, _as_views(image, self.crops), int(label)


def _as_views(image: Any, crops: ExtractionCrops) -> torch.Tensor:
    if isinstance(image, Image.Image):  # a dataset without with_transform() that yields PIL images
        return crops(image.convert("RGB"))
    if not (isinstance(image, torch.Tensor) and image.shape[0] == len(crops.names)):
        raise ConfigError("extract_codes needs a dataset with with_transform() (arforge's image datasets) "
                          "or one whose items are (PIL image, label); got items of type "
                          f"{type(image).__name__}")
    return image


def _collate_views(batch: list[tuple[int, torch.Tensor, int] | None]):
    """Drop unreadable items; an all-unreadable batch becomes (empty, None, empty)."""
    kept = [b for b in batch if b is not None]
    if not kept:
        return torch.zeros(0, dtype=torch.int64), None, torch.zeros(0, dtype=torch.int64)
    index = torch.tensor([b[0] for b in kept], dtype=torch.int64)
    views = torch.stack([b[1] for b in kept])  # (b, A, 3, S, S)
    labels = torch.tensor([b[2] for b in kept], dtype=torch.int64)
    return index, views, labels


# ---------------------------------------------------------------------- job
@dataclass
class ExtractionResult:
    """What :func:`extract_codes` produced (the same on every rank)."""

    output_dir: Path
    num_samples: int
    n_aug: int
    skipped: int
    manifest: CodesManifest | None  #: on rank 0; None elsewhere


def _encode(tokenizer: Any, views: torch.Tensor, device: torch.device, seq_len: int) -> np.ndarray:
    b, A = views.shape[:2]
    ids = tokenizer.encode(views.flatten(0, 1).to(device))  # (b * A, 3, S, S) -> (b * A, L, S_ids)
    S = len(tokenizer.codebook_sizes)
    if ids.dim() != 3 or tuple(ids.shape) != (b * A, seq_len, S):
        raise ConfigError(f"{type(tokenizer).__name__}.encode returned ids of shape {tuple(ids.shape)}; "
                          f"expected (B, L, S) = ({b * A}, {seq_len}, {S}) by arforge.interfaces.Tokenizer "
                          "(L = (image_size / downsample)^2, S = len(codebook_sizes))")
    return ids.reshape(b, A, seq_len, S).to("cpu", torch.int64).numpy()  # (b, A, L, S)


def extract_codes(ctx: Any = None, *, tokenizer: Any, dataset: Dataset, output_dir: str | os.PathLike | None = None,
                  ten_crop: bool = True, crop_range: float = 1.1, image_size: int = 256, batch_size: int = 8,
                  flips: bool = True, num_workers: int = 0, tokenizer_checkpoint: str | os.PathLike | None = None,
                  factorization: str = "identity", overwrite: bool = False, progress: bool = True) -> ExtractionResult:
    """Encode every image of ``dataset`` in its augmented views and write a token-code folder.

    docs/data.md#ten-crop-code-extraction. The tokenizer runs in eval mode, in fp32 whatever
    ``ctx.precision`` says (reduced precision can flip an argmin, i.e. an id).

    Args:
        ctx: a :class:`arforge.launch.RunContext`, a :func:`local_context`, or
            None for a local one (then ``output_dir`` is required).
        tokenizer: anything with ``encode(images) -> (B, L, S)``, ``codebook_sizes``
            and ``downsample`` (:class:`arforge.interfaces.Tokenizer`); an
            ``nn.Module`` is moved to ``ctx.device``.
        dataset: an arforge image dataset (its transform is replaced by the
            extraction views), or any dataset of (PIL image, label).
        output_dir: the token-code folder (default ``ctx.output_dir / "codes"``).
        ten_crop, crop_range, flips: the views (module docstring); upstream's
            second set uses crop_range 1.05.
        image_size: side S of each view (384 for the released AR models).
        batch_size: images per step per rank (each gives n_aug views).
        num_workers: DataLoader workers decoding images.
        tokenizer_checkpoint: recorded in the manifest with its SHA-256 if a file
            (default: the tokenizer's ``checkpoint_path`` attribute, if any).
        factorization: name of the token factorization the codes are meant for.
        overwrite: replace an existing token-code folder.
    """
    V.check_args("jobs.extract_codes", locals(), where=ctx,
                 image_size=V.POSITIVE_INT, batch_size=V.POSITIVE_INT, crop_range=V.POSITIVE_FLOAT,
                 ten_crop=V.BOOL, flips=V.BOOL, num_workers=V.NON_NEGATIVE_INT, output_dir=V.optional(V.PATH),
                 factorization=V.TEXT, overwrite=V.BOOL, progress=V.BOOL)
    if ctx is None:
        if output_dir is None:
            raise ConfigError("extract_codes without a run context needs output_dir")
        ctx = local_context(Path(output_dir).parent)
    from arforge.tracking import resolve_path

    out = resolve_path(output_dir) if output_dir is not None else Path(ctx.output_dir) / "codes"
    grid = _token_grid(tokenizer, image_size)
    seq_len = grid[0] * grid[1]
    crops = ExtractionCrops(image_size=image_size, ten_crop=ten_crop, crop_range=crop_range, flips=flips)
    n_aug = len(crops.names)

    dist = ctx.dist
    rank, world = dist.rank, dist.world_size
    distributed = world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    if world > 1 and not distributed:
        raise ConfigError(f"ctx.dist says world_size {world} but torch.distributed is not initialised")
    streaming = isinstance(dataset, IterableDataset)
    try:
        capacity = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise DataError(f"extract_codes needs the number of samples of {getattr(dataset, 'source', dataset)!r}; "
                        "give the shard dataset num_samples (or write shards with tools/make_shards.py)") from None
    if capacity == 0:
        raise DataError(f"dataset {getattr(dataset, 'source', type(dataset).__name__)} is empty")
    views = (_StreamViews(dataset, crops) if streaming
             else _IndexedViews(dataset, range(rank, capacity, world), crops))
    loader = DataLoader(views, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate_views)

    device = torch.device(ctx.device)
    was_training = getattr(tokenizer, "training", None)
    if isinstance(tokenizer, torch.nn.Module):
        tokenizer.to(device).eval()
    writer = None
    if dist.is_main:
        writer = TokenCodeWriter(out, capacity=capacity, n_aug=n_aug, seq_len=seq_len,
                                 codebook_sizes=tokenizer.codebook_sizes, overwrite=overwrite)
        ctx.log(f"extracting codes of {capacity} images x {n_aug} views ({', '.join(crops.names)}) at "
                f"{image_size}px, grid {grid[0]}x{grid[1]}, on {world} rank(s) into {out}")
    from tqdm import tqdm

    bar = tqdm(total=capacity, desc="extract codes", unit="img", disable=not (dist.is_main and progress))
    try:
        with torch.no_grad():
            for payloads in _lockstep(loader, tokenizer, device, seq_len, distributed, world):
                if writer is None:
                    continue
                for index, codes, labels in payloads:
                    if codes is None:
                        continue
                    writer.write(codes, labels, positions=None if streaming else index,
                                 source_indices=None if streaming else index)
                    bar.update(len(codes))
        skipped = _skipped(dataset, writer, capacity, streaming, distributed)
        manifest = None
        if writer is not None:
            manifest = writer.commit(grid=grid, augmentations=crops.names, factorization=factorization,
                                     image_size=image_size, crop_range=crops.crop_range, crop_size=crops.crop_size,
                                     ten_crop=ten_crop, flips=flips, skipped=skipped,
                                     **_provenance(tokenizer, tokenizer_checkpoint, dataset))
            writer = None
            ctx.tracker.log_metrics({"extract/samples": manifest.num_samples, "extract/views": n_aug,
                                     "data/skipped": skipped})
            ctx.tracker.log_dict(asdict(manifest), "extract/manifest.json")
            ctx.log(f"wrote {manifest.num_samples} samples ({skipped} unreadable skipped) to {out}")
    finally:
        bar.close()
        if writer is not None:
            writer.abort()
        if isinstance(tokenizer, torch.nn.Module) and was_training:
            tokenizer.train()
    num_samples = manifest.num_samples if manifest is not None else 0
    if distributed:  # every rank returns the same numbers, and none reads the folder before it exists
        shared = [num_samples, skipped]
        torch.distributed.broadcast_object_list(shared, src=0)
        num_samples, skipped = shared
        torch.distributed.barrier()
    return ExtractionResult(output_dir=out, num_samples=num_samples, n_aug=n_aug, skipped=skipped, manifest=manifest)


def _token_grid(tokenizer: Any, image_size: int) -> tuple[int, int]:
    """The (h, w) token grid of ``image_size`` images, after checking the tokenizer's contract."""
    for attr in ("encode", "codebook_sizes", "downsample"):
        if not hasattr(tokenizer, attr):
            raise ConfigError(f"{type(tokenizer).__name__} is not a tokenizer: it lacks {attr!r} "
                              "(arforge.interfaces.Tokenizer: encode(images) -> (B, L, S), codebook_sizes, downsample)")
    if image_size % tokenizer.downsample:
        raise ConfigError(f"image_size {image_size} is not a multiple of the tokenizer's downsample "
                          f"factor {tokenizer.downsample}")
    return image_size // tokenizer.downsample, image_size // tokenizer.downsample


def _provenance(tokenizer: Any, checkpoint: str | os.PathLike | None, dataset: Any) -> dict[str, Any]:
    """Manifest fields saying which tokenizer weights and which images produced the codes."""
    if checkpoint is None:
        checkpoint = getattr(tokenizer, "checkpoint_path", None)
    path = Path(checkpoint).expanduser() if checkpoint is not None else None
    return {
        "tokenizer_checkpoint": str(path) if path is not None else None,
        "tokenizer_sha256": sha256_file(path) if path is not None and path.is_file() else None,
        "tokenizer_class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
        "dataset_source": str(getattr(dataset, "source", type(dataset).__name__)),
        "class_names": [str(c) for c in (getattr(dataset, "classes", None) or [])],
    }


def _lockstep(loader: DataLoader, tokenizer: Any, device: torch.device, seq_len: int, distributed: bool,
              world: int):
    """Yield, per step, the encoded batches of every rank (on rank 0; [] elsewhere).

    All ranks step together until every one has run dry: ranks may hold one
    batch more or less (or, for streams, any number), and a collective must be
    entered by all of them. Gathering per step keeps rank 0's memory at one
    batch per rank, with no shared file system needed.
    """
    batches = iter(loader)
    while True:
        batch = next(batches, None)
        payload = None
        if batch is not None:
            index, views, labels = batch
            codes = _encode(tokenizer, views, device, seq_len) if views is not None else None
            payload = (index.numpy(), codes, labels.numpy())
        if not distributed:
            if batch is None:
                return
            yield [payload]
            continue
        alive = torch.tensor([0 if batch is None else 1], dtype=torch.int64)
        torch.distributed.all_reduce(alive)
        if int(alive) == 0:
            return
        is_main = torch.distributed.get_rank() == 0
        gathered: list[Any] | None = [None] * world if is_main else None
        torch.distributed.gather_object(payload, gathered, dst=0)
        yield [p for p in gathered if p is not None] if gathered is not None else []


def _skipped(dataset: Any, writer: TokenCodeWriter | None, capacity: int, streaming: bool, distributed: bool) -> int:
    """Unreadable images: exact from the unwritten positions of a map-style
    dataset; summed over ranks from the streams' own counters otherwise."""
    if not streaming:
        return capacity - writer.rows_written if writer is not None else 0
    count = torch.tensor([int(getattr(dataset, "skipped", 0))], dtype=torch.int64)
    if distributed:
        torch.distributed.all_reduce(count)
    return int(count)
