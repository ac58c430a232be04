"""The extract_codes job: ten-crop order, round trips through a tiny tokenizer, shards, two ranks."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import TensorDataset

from arforge.data.digits import DigitsDataset
from arforge.data.extraction import extract_codes, local_context
from arforge.data.image_datasets import (
    DataError,
    ImageFolderDataset,
    ImageShardsDataset,
    decode_image,
    make_loader,
    set_epoch,
    write_image_shards,
)
from arforge.data.token_codes import TokenCodeDataset
from arforge.data.transforms import center_crop_arr, to_tensor
from arforge.errors import ConfigError
from arforge.interfaces import Tokenizer, TokenizerOutput
from arforge.tracking import Tracker
from two_ranks import run_on_ranks

S, CROP_RANGE = 8, 1.5  # views of 8 px cut from a center crop of int(8 * 1.5) = 12 px
BROKEN = 3  # index of the truncated JPEG in the tree below


class PoolTokenizer(torch.nn.Module):
    """A deterministic toy tokenizer: average-pool each ``downsample`` block, then
    the nearest of 16 fixed colours (S = 1), or additionally the nearest of 8
    fixed residuals (S = 2, an IAR2-like (s, d) pair)."""

    def __init__(self, *, downsample: int = 4, two_level: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("colours", torch.rand(16, 3, generator=g) * 2 - 1)
        self.register_buffer("residuals", (torch.rand(8, 3, generator=g) * 2 - 1) * 0.25)
        self.downsample, self.two_level = downsample, two_level
        self.codebook_sizes = (16, 8) if two_level else (16,)

    @staticmethod
    def _nearest(z: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
        return ((z[..., None, :] - book) ** 2).sum(-1).argmin(-1)  # (B, L, K) -> (B, L)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        z = F.avg_pool2d(images, self.downsample).flatten(2).transpose(1, 2)  # (B, 3, h, w) -> (B, L, 3)
        s = self._nearest(z, self.colours)
        if not self.two_level:
            return s[..., None]  # (B, L, 1)
        d = self._nearest(z - self.colours[s], self.residuals)
        return torch.stack([s, d], dim=-1)  # (B, L, 2)

    def decode(self, ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        z = self.colours[ids[..., 0]]  # (B, L, 3)
        if self.two_level:
            z = z + self.residuals[ids[..., 1]]
        z = z.transpose(1, 2).reshape(len(ids), 3, *grid)  # (B, 3, h, w)
        return z.repeat_interleave(self.downsample, 2).repeat_interleave(self.downsample, 3)

    def forward(self, images: torch.Tensor) -> TokenizerOutput:
        ids = self.encode(images)
        grid = (images.shape[2] // self.downsample, images.shape[3] // self.downsample)
        return TokenizerOutput(self.decode(ids, grid), ids, {}, {})


def reference_reconstruction(view: torch.Tensor, tok: PoolTokenizer) -> torch.Tensor:
    """Slow reference: each 4x4 block painted with the colour nearest to its mean."""
    out = torch.empty_like(view)
    k = tok.downsample
    for y in range(0, view.shape[1], k):
        for x in range(0, view.shape[2], k):
            mean = view[:, y:y + k, x:x + k].mean(dim=(1, 2))
            best = min(range(16), key=lambda i: float(((tok.colours[i] - mean) ** 2).sum()))
            out[:, y:y + k, x:x + k] = tok.colours[best][:, None, None]
    return out


def make_tree(root: Path) -> Path:
    """cat: 2 images, dog: 1 image + a truncated JPEG, eel: 2 images (sizes vary)."""
    rng = np.random.default_rng(1)
    files = [("cat/a.png", (20, 14)), ("cat/b.jpg", (14, 20)), ("dog/a.png", (16, 16)), ("dog/broken.jpg", None),
             ("eel/a.png", (30, 18)), ("eel/b.png", (12, 13))]
    for rel, size in files:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(rng.integers(0, 256, size=(size or (32, 32))[::-1] + (3,), dtype=np.uint8))
        if size is None:
            buf = io.BytesIO()
            image.save(buf, format="JPEG")
            path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        else:
            image.save(path)
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "images")


def _extract(dataset: Any, out: Path, **kw: Any):
    kw = {"image_size": S, "crop_range": CROP_RANGE, "batch_size": 2, "progress": False, **kw}
    return extract_codes(None, tokenizer=kw.pop("tokenizer", PoolTokenizer()), dataset=dataset, output_dir=out, **kw)


# ------------------------------------------------------------------ tests
def test_ten_crop_codes_order_and_round_trip(tree: Path, tmp_path: Path) -> None:
    tok = PoolTokenizer()
    assert isinstance(tok, Tokenizer)
    ds = ImageFolderDataset(root=tree, image_size=S)
    result = _extract(ds, tmp_path / "codes", tokenizer=tok)
    good = [i for i in range(len(ds)) if i != BROKEN]
    assert (result.num_samples, result.skipped, result.n_aug) == (len(good), 1, 10)
    m = result.manifest
    assert m.grid == (2, 2) and m.seq_len == 4 and m.crop_size == 12 and m.codebook_sizes == (16,)
    assert m.augmentations == ["crop12/top_left", "crop12/top_right", "crop12/bottom_left", "crop12/bottom_right",
                               "crop12/center", "hflip/crop12/top_left", "hflip/crop12/top_right",
                               "hflip/crop12/bottom_left", "hflip/crop12/bottom_right", "hflip/crop12/center"]
    assert m.class_names == ["cat", "dog", "eel"] and m.skipped == 1 and m.dataset_source == str(tree)

    codes = np.load(tmp_path / "codes" / "codes.npy")  # (N, 10, L, 1)
    assert codes.shape == (len(good), 10, 4, 1) and codes.dtype == np.int16
    assert np.load(tmp_path / "codes" / "indices.npy").tolist() == good  # dataset order, broken one left out
    assert np.load(tmp_path / "codes" / "labels.npy").tolist() == [ds.targets[i] for i in good]
    for row, index in enumerate(good):
        base = center_crop_arr(decode_image(ds.samples[index][0]), 12)
        flipped = base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        by_hand = {0: base.crop((0, 0, 8, 8)), 1: base.crop((4, 0, 12, 8)), 3: base.crop((4, 4, 12, 12)),
                   4: base.crop((2, 2, 10, 10)), 5: flipped.crop((0, 0, 8, 8)), 9: flipped.crop((2, 2, 10, 10))}
        for view, crop in by_hand.items():
            expected = tok.encode(to_tensor(crop)[None])[0].numpy()
            assert np.array_equal(codes[row, view], expected), (index, view)
        views = torch.stack([to_tensor(c) for c in by_hand.values()])  # (6, 3, 8, 8)
        decoded = tok.decode(torch.from_numpy(codes[row, list(by_hand)]).long(), (2, 2))
        for v in range(len(views)):
            assert torch.equal(decoded[v], reference_reconstruction(views[v], tok))

    reader = TokenCodeDataset(root=tmp_path / "codes", codebook_sizes=tok.codebook_sizes, augmentation=0)
    assert torch.equal(reader[1].codes, torch.from_numpy(codes[1, 0]).long()) and reader[1].label == ds.targets[1]


def test_center_and_flip_views_on_digits_with_pair_ids(tmp_path: Path) -> None:
    tok = PoolTokenizer(two_level=True)
    digits = DigitsDataset(split="val", image_size=16)
    result = _extract(digits, tmp_path / "codes", tokenizer=tok, ten_crop=False, image_size=16, batch_size=64)
    m = result.manifest
    assert (result.num_samples, m.n_aug, m.grid, m.crop_size, m.crop_range) == (300, 2, (4, 4), 16, 1.0)
    assert m.augmentations == ["center16", "hflip/center16"] and m.class_names == [str(d) for d in range(10)]
    assert "load_digits" in m.dataset_source
    codes = torch.from_numpy(np.load(tmp_path / "codes" / "codes.npy")).long()  # (300, 2, 16, 2)
    images = torch.stack([to_tensor(digits.pil_image(i)) for i in range(300)])  # (300, 3, 16, 16)
    assert torch.equal(codes[:, 0], tok.encode(images))
    assert torch.equal(codes[:, 1], tok.encode(images.flip(-1)))
    assert np.load(tmp_path / "codes" / "labels.npy").tolist() == digits.targets
    assert len(TokenCodeDataset(root=tmp_path / "codes", codebook_sizes=(16, 8))) == 300


def test_shards_extract_the_same_codes_as_the_folder(tree: Path, tmp_path: Path) -> None:
    info = write_image_shards(source=tree, output_dir=tmp_path / "shards", max_count=2, shuffle_seed=None,
                              verify=False, progress=False)
    folder = _extract(ImageFolderDataset(root=tree, image_size=S), tmp_path / "from_folder")
    shards = _extract(ImageShardsDataset(urls=info.pattern, image_size=S), tmp_path / "from_shards")
    assert shards.num_samples == folder.num_samples == 5 and shards.skipped == 1
    for name in ("codes.npy", "labels.npy"):
        assert np.array_equal(np.load(tmp_path / "from_folder" / name), np.load(tmp_path / "from_shards" / name))
    assert set(np.load(tmp_path / "from_shards" / "indices.npy").tolist()) == {-1}  # streams have no index


class RecordingTracker(Tracker):
    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.dicts: dict[str, Any] = {}

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.update(metrics)

    def log_dict(self, data, artifact_file) -> None:
        self.dicts[artifact_file] = data


def test_run_context_logging_and_mode_restore(tree: Path, tmp_path: Path) -> None:
    tracker = RecordingTracker()
    ctx = local_context(tmp_path / "run", tracker=tracker)
    tok = PoolTokenizer().train()
    result = extract_codes(ctx, tokenizer=tok, dataset=ImageFolderDataset(root=tree, image_size=S), image_size=S,
                           crop_range=CROP_RANGE, progress=False, tokenizer_checkpoint=tree / "cat" / "a.png",
                           num_workers=2, batch_size=2)
    assert np.array_equal(np.load(result.output_dir / "indices.npy"), [0, 1, 2, 4, 5])
    assert result.output_dir == tmp_path / "run" / "codes" and (result.output_dir / "manifest.json").is_file()
    assert tracker.metrics == {"extract/samples": 5, "extract/views": 10, "data/skipped": 1}
    logged = tracker.dicts["extract/manifest.json"]
    assert logged["tokenizer_checkpoint"] == str(tree / "cat" / "a.png") and len(logged["tokenizer_sha256"]) == 64
    assert logged["tokenizer_class"].endswith("PoolTokenizer")
    assert tok.training  # eval during extraction, restored after


def test_extraction_errors_leave_nothing_behind(tree: Path, tmp_path: Path) -> None:
    ds = ImageFolderDataset(root=tree, image_size=S)
    with pytest.raises(ConfigError, match="lacks 'downsample'"):
        _extract(ds, tmp_path / "c", tokenizer=type("T", (), {"encode": None, "codebook_sizes": (4,)})())
    with pytest.raises(ConfigError, match="not a multiple"):
        _extract(ds, tmp_path / "c", image_size=10)
    liar = PoolTokenizer()
    liar.codebook_sizes = (4,)  # ids reach 15
    with pytest.raises(DataError, match="outside its codebook of 4"):
        _extract(ds, tmp_path / "c", tokenizer=liar)
    assert not list(tmp_path.glob("*c*"))  # neither the folder nor its temporary twin
    _extract(ds, tmp_path / "c")
    with pytest.raises(DataError, match="already holds token codes"):
        _extract(ds, tmp_path / "c")
    assert _extract(ds, tmp_path / "c", overwrite=True, ten_crop=False).n_aug == 2
    assert TokenCodeDataset(root=tmp_path / "c").n_aug == 2


# ------------------------------------------------------------- two ranks
def _rank_main(tree: str, pattern: str, out: str) -> None:
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    ctx = local_context(out)
    assert ctx.dist.world_size == world and ctx.dist.rank == rank
    kw = {"tokenizer": PoolTokenizer(), "image_size": S, "crop_range": CROP_RANGE, "batch_size": 2,
          "progress": False}
    folder, shards = ImageFolderDataset(root=tree, image_size=S), ImageShardsDataset(urls=pattern, image_size=S)
    a = extract_codes(ctx, dataset=folder, output_dir=Path(out) / "folder", **kw)
    b = extract_codes(ctx, dataset=shards, output_dir=Path(out) / "shards", **kw)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps([a.num_samples, a.skipped, b.num_samples, b.skipped]))
    # make_loader shards a map-style dataset by rank through its DistributedSampler.
    loader = make_loader(TensorDataset(torch.arange(10)), batch_size=3, shuffle=True, seed=0)
    set_epoch(loader, 1)
    mine = [int(i) for (batch,) in loader for i in batch]
    (Path(out) / f"loader{rank}.json").write_text(json.dumps(mine))


@pytest.mark.multirank
def test_two_ranks_write_every_sample_once_in_dataset_order(tree: Path, tmp_path: Path) -> None:
    info = write_image_shards(source=tree, output_dir=tmp_path / "shards", max_count=2, shuffle_seed=None,
                              verify=False, progress=False)  # 3 shards: rank 0 reads 2, rank 1 reads 1
    _extract(ImageFolderDataset(root=tree, image_size=S), tmp_path / "single")  # the one-process reference
    out = tmp_path / "ddp"
    run_on_ranks(_rank_main, tmp_path, tree=str(tree), pattern=info.pattern, out=str(out))

    for rank in (0, 1):  # every rank returns rank 0's numbers
        assert json.loads((out / f"rank{rank}.json").read_text()) == [5, 1, 5, 1]
    indices = np.load(out / "folder" / "indices.npy")
    assert indices.tolist() == [i for i in range(6) if i != BROKEN]  # exactly N, in order, no duplicates
    for name in ("codes.npy", "labels.npy", "indices.npy"):
        assert np.array_equal(np.load(out / "folder" / name), np.load(tmp_path / "single" / name))
    # Shards: rows arrive rank by rank, so compare as sets of (label, codes) rows.
    def rows(folder: Path) -> list[tuple]:
        codes, labels = np.load(folder / "codes.npy"), np.load(folder / "labels.npy")
        return sorted((int(y), c.tobytes()) for y, c in zip(labels, codes))

    assert rows(out / "shards") == rows(tmp_path / "single")
    parts = [json.loads((out / f"loader{rank}.json").read_text()) for rank in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == 5 and sorted(parts[0] + parts[1]) == list(range(10))
    assert json.loads((out / "shards" / "manifest.json").read_text())["num_samples"] == 5
