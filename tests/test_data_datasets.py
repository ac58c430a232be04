"""Image datasets and transforms: folders, webdataset shards, digits, ADM/Open-MAGVIT2 transforms."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from arforge.data.digits import DigitsDataset
from arforge.data.image_datasets import (
    DataError,
    ImageFolderDataset,
    ImageShardsDataset,
    make_loader,
    set_epoch,
    write_image_shards,
)
from arforge.data.transforms import (
    ADMTrainTransform,
    build_transform,
    center_crop_arr,
    five_crop,
    random_crop_arr,
    random_crop_range,
    ten_crop,
    to_tensor,
)
from arforge.errors import ArforgeError, ConfigError

REPO = Path(__file__).resolve().parents[1]

# (class, relative file, (width, height), mode); None marks the truncated JPEG.
TREE = [
    ("cat", "a.png", (20, 14), "RGB"),
    ("cat", "b.jpg", (14, 20), "RGB"),
    ("cat", "sub/c.png", (16, 16), "L"),
    ("dog", "a.jpg", (24, 18), "RGB"),
    ("dog", "broken.jpg", None, None),
    ("dog", "c.png", (18, 24), "RGBA"),
    ("eel", "a.png", (30, 30), "RGB"),
    ("eel", "b.JPEG", (12, 16), "RGB"),
]
BROKEN_INDEX = 4  # sorted folder order: cat a, b, sub/c; dog a, broken, c; eel a, b


def _random_image(rng: np.random.Generator, size: tuple[int, int], mode: str) -> Image.Image:
    w, h = size
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    arr = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr)


def make_image_tree(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for cls, rel, size, mode in TREE:
        path = root / cls / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if size is None:  # a JPEG cut to 60 %: the header opens, decoding fails
            buf = io.BytesIO()
            _random_image(rng, (32, 32), "RGB").save(buf, format="JPEG", quality=90)
            path.write_bytes(buf.getvalue()[: int(len(buf.getvalue()) * 0.6)])
        else:
            fmt = "JPEG" if rel.lower().endswith((".jpg", ".jpeg")) else "PNG"
            _random_image(rng, size, mode).save(path, format=fmt, quality=90)
    (root / "cat" / "notes.txt").write_text("not an image, ignored by suffix")
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_image_tree(tmp_path / "images")


# ------------------------------------------------------------------ folder
def test_folder_classes_labels_and_order(tree: Path) -> None:
    ds = ImageFolderDataset(root=tree, transform="adm_eval", image_size=8)
    assert ds.classes == ["cat", "dog", "eel"]
    assert ds.class_to_idx == {"cat": 0, "dog": 1, "eel": 2}
    assert len(ds) == len(TREE)  # the broken file is listed; it is skipped when read
    names = [Path(p).relative_to(tree).as_posix() for p, _ in ds.samples]
    assert names == [f"{c}/{r}" for c, r, _, _ in TREE]
    assert ds.targets == [0, 0, 0, 1, 1, 1, 2, 2]
    image, label = ds[0]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and label == 0
    assert image.min() >= -1 and image.max() <= 1


def test_folder_skips_corrupt_file_once_and_substitutes(tree: Path) -> None:
    ds = ImageFolderDataset(root=tree, transform="adm_eval", image_size=8)
    assert ds.read(BROKEN_INDEX) is None
    assert ds.skipped == 1
    substitute = ds[BROKEN_INDEX]  # the next readable file, so batches keep their size
    expected = ds[BROKEN_INDEX + 1]
    assert torch.equal(substitute.image, expected.image) and substitute.label == expected.label
    for _ in range(3):  # read again: still one distinct bad file
        ds[BROKEN_INDEX]
    assert ds.skipped == 1


def test_text_file_named_png_is_skipped(tree: Path) -> None:
    (tree / "eel" / "fake.png").write_text("this is text, not a PNG")
    ds = ImageFolderDataset(root=tree, transform="adm_eval", image_size=8)
    loader = make_loader(ds, batch_size=4, shuffle=False)
    total = sum(len(batch.label) for batch in loader)
    assert total == len(ds) == len(TREE) + 1
    assert ds.skipped == 2  # the truncated JPEG and the text file


def test_folder_skip_counter_sees_dataloader_workers(tree: Path) -> None:
    ds = ImageFolderDataset(root=tree, transform="adm_eval", image_size=8)
    loader = make_loader(ds, batch_size=3, shuffle=True, seed=1, num_workers=2)
    batches = list(loader)
    assert sum(len(b.label) for b in batches) == len(ds)
    assert batches[0].image.shape == (3, 3, 8, 8) and batches[0].label.dtype == torch.int64
    assert ds.skipped == 1  # counted in a worker process, seen here


def test_make_loader_epochs_are_reproducible(tree: Path) -> None:
    ds = ImageFolderDataset(root=tree, transform="adm_eval", image_size=8)

    def labels(epoch: int) -> list[int]:
        loader = make_loader(ds, batch_size=8, shuffle=True, seed=3)
        set_epoch(loader, epoch)
        return [int(v) for b in loader for v in b.label]

    assert labels(0) == labels(0)
    assert labels(1) == labels(1)
    assert sorted(labels(0)) == sorted(labels(1))


def test_exclude_leaves_a_file_out(tree: Path) -> None:
    ds = ImageFolderDataset(root=tree, image_size=8, exclude=["broken.jpg"])
    assert len(ds) == len(TREE) - 1 and all(ds.read(i) is not None for i in range(len(ds)))


@pytest.mark.parametrize("case", ["missing", "file", "no_classes", "no_images"])
def test_folder_setup_errors_name_the_path(tmp_path: Path, case: str) -> None:
    root = tmp_path / "data"
    if case == "file":
        root.write_text("x")
    elif case == "no_classes":
        root.mkdir()
        _random_image(np.random.default_rng(0), (8, 8), "RGB").save(root / "loose.png")
    elif case == "no_images":
        (root / "cls").mkdir(parents=True)
        (root / "cls" / "readme.txt").write_text("x")
    with pytest.raises(DataError) as err:
        ImageFolderDataset(root=root)
    assert isinstance(err.value, ArforgeError)
    assert str(root) in str(err.value)
    hint = {"missing": "does not exist", "file": "not an image folder", "no_classes": "no class subfolders",
            "no_images": "no image files"}[case]
    assert hint in str(err.value)


# ------------------------------------------------------------------ shards
def test_folder_and_shards_read_the_same_samples(tree: Path, tmp_path: Path) -> None:
    info = write_image_shards(source=tree, output_dir=tmp_path / "shards", max_count=3, shuffle_seed=None,
                              verify=False, progress=False)
    assert len(info.shards) == 3 and info.num_samples == len(TREE)  # unverified: the broken file is inside
    folder = ImageFolderDataset(root=tree, transform="adm_eval", image_size=8)
    shards = ImageShardsDataset(urls=info.pattern, transform="adm_eval", image_size=8)
    assert shards.classes == folder.classes and len(shards) == len(TREE)

    from_folder = [s for s in (folder.read(i) for i in range(len(folder))) if s is not None]
    from_shards = list(shards)
    assert len(from_shards) == len(from_folder) == len(TREE) - 1
    for a, b in zip(from_folder, from_shards):
        assert a.label == b.label
        assert torch.equal(a.image, b.image)
    assert folder.skipped == 1
    assert shards.skipped == 1


def test_shards_with_workers_read_each_sample_once(tree: Path, tmp_path: Path) -> None:
    info = write_image_shards(source=tree, output_dir=tmp_path / "shards", max_count=2, shuffle_seed=None,
                              verify=False, progress=False)
    shards = ImageShardsDataset(urls=info.pattern, transform="adm_eval", image_size=8)
    loader = make_loader(shards, batch_size=2, num_workers=2)
    labels = sorted(int(v) for b in loader for v in b.label)
    assert labels == [0, 0, 0, 1, 1, 2, 2]  # every readable sample exactly once
    assert shards.skipped == 1
    with pytest.raises(DataError, match="shuffle"):
        make_loader(shards, batch_size=2, shuffle=True)


def test_shard_shuffling_is_seeded(tree: Path, tmp_path: Path) -> None:
    info = write_image_shards(source=tree, output_dir=tmp_path / "shards", max_count=1, shuffle_seed=None,
                              verify=False, progress=False)

    def order(seed: int, epoch: int) -> list[int]:
        ds = ImageShardsDataset(urls=info.pattern, transform=None, shuffle_shards=True, shuffle_buffer=4, seed=seed)
        ds.set_epoch(epoch)
        return [s.image.size[0] for s in ds]  # widths identify the images

    assert order(0, 0) == order(0, 0)
    assert sorted(order(0, 0)) == sorted(order(5, 1))
    assert order(0, 0) != order(0, 1)  # a new epoch reshuffles
    assert order(0, 0) != order(1, 0)  # so does a new seed


def test_write_shards_verifies_and_writes_json(tree: Path, tmp_path: Path) -> None:
    info = write_image_shards(source=tree, output_dir=tmp_path / "shards", prefix="train", max_count=4,
                              shuffle_seed=0, progress=False)
    assert info.num_samples == len(TREE) - 1
    assert [Path(p).name for p in info.skipped] == ["broken.jpg"]
    data = json.loads((tmp_path / "shards" / "train.json").read_text())
    assert data["class_names"] == ["cat", "dog", "eel"] and data["class_counts"] == [3, 2, 2]
    assert data["num_samples"] == 7 and data["order"] == "shuffled(seed=0)"
    shards = ImageShardsDataset(urls=info.pattern, transform="adm_eval", image_size=8)
    samples = list(shards)
    assert len(samples) == len(shards) == 7 and shards.skipped == 0
    assert sorted(s.label for s in samples) == [0, 0, 0, 1, 1, 2, 2]


@pytest.mark.plumbing
def test_make_shards_cli(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "make_shards.py"), str(tree), str(out),
                           "--prefix", "val", "--max-count", "5", "--keep-order", "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 7 samples of 3 classes in 2 shard(s)" in proc.stdout
    assert "skipped 1 unreadable" in proc.stdout
    assert json.loads((out / "val.json").read_text())["order"] == "folder"
    assert sorted(p.name for p in out.glob("*.tar")) == ["val-000000.tar", "val-000001.tar"]


def test_truncated_shard_is_skipped_not_fatal(tree: Path, tmp_path: Path) -> None:
    info = write_image_shards(source=tree, output_dir=tmp_path / "shards", max_count=4, shuffle_seed=None,
                              progress=False)
    last = tmp_path / "shards" / info.shards[-1]
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    shards = ImageShardsDataset(urls=info.pattern, transform="adm_eval", image_size=8)
    samples = list(shards)
    assert 4 <= len(samples) < 7  # the first shard whole, part of the second at most
    assert shards.skipped >= 1


def test_shard_errors(tmp_path: Path, tree: Path) -> None:
    with pytest.raises(DataError, match="matches no file") as err:
        ImageShardsDataset(urls=str(tmp_path / "nothing-{000000..000003}.tar"))
    assert str(tmp_path) in str(err.value)
    info = write_image_shards(source=tree, output_dir=tmp_path / "s", max_count=4, shuffle_seed=None,
                              progress=False)
    with pytest.raises(DataError, match="1 of the 3 shards"):
        ImageShardsDataset(urls=str(tmp_path / "s" / "train-{000000..000002}.tar"))
    with pytest.raises(DataError, match="holds no .tar"):
        (tmp_path / "empty").mkdir()
        ImageShardsDataset(urls=str(tmp_path / "empty"))
    assert len(ImageShardsDataset(urls=str(tmp_path / "s"))) == info.num_samples  # a folder of shards
    subset = ImageShardsDataset(urls=str(tmp_path / "s" / "train-000000.tar"))
    assert subset.classes == ["cat", "dog", "eel"]  # the sidecar still names the classes...
    with pytest.raises(TypeError, match="num_samples"):
        len(subset)  # ...but its count covers both shards, not this one
    assert len(ImageShardsDataset(urls=str(tmp_path / "s" / "train-000000.tar"), num_samples=4)) == 4
    # A shard of non-images only: the lone reader reports an unusable dataset.
    bad = tmp_path / "bad-000000.tar"
    with tarfile.open(bad, "w") as tar:
        for name, payload in (("0.png", b"text"), ("0.cls", b"1")):
            member = tarfile.TarInfo(name)
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    ds = ImageShardsDataset(urls=str(bad))
    with pytest.raises(DataError, match="unreadable"):
        list(ds)
    assert ds.skipped == 1


# ------------------------------------------------------------------ digits
def test_digits_offline_shapes_classes_split() -> None:
    train = DigitsDataset(split="train", image_size=16)
    val = DigitsDataset(split="val", image_size=16)
    assert (len(train), len(val), len(DigitsDataset(split="all"))) == (1497, 300, 1797)
    assert train.classes == [str(d) for d in range(10)]
    assert set(train.targets) == set(range(10))
    assert np.bincount(val.targets).tolist() == [30, 30, 30, 31, 30, 30, 30, 30, 29, 30]
    assert not set(train.indices.tolist()) & set(val.indices.tolist())
    image, label = train[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and isinstance(label, int)
    assert train.images.min() >= -1 and train.images.max() <= 1
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])  # grey -> RGB
    again = DigitsDataset(split="train", image_size=16)
    assert torch.equal(again.images, train.images) and again.targets == train.targets


def test_digits_resampling_modes() -> None:
    from sklearn.datasets import load_digits

    near = DigitsDataset(split="val", image_size=32, resample="nearest")
    raw = torch.from_numpy(load_digits().images[near.indices[0]]).float() / 8 - 1  # (8, 8)
    assert torch.equal(near.images[0, 0], raw.repeat_interleave(4, 0).repeat_interleave(4, 1))
    cubic = DigitsDataset(split="val", image_size=32)
    assert cubic.images.shape == (300, 1, 32, 32) and not torch.equal(cubic.images, near.images)
    tensor_view = DigitsDataset(split="val", image_size=16, transform="to_tensor")
    plain = DigitsDataset(split="val", image_size=16)
    assert torch.allclose(tensor_view[3].image, plain[3].image, atol=1 / 127.5)  # uint8 round trip
    with pytest.raises(DataError):
        DigitsDataset(split="test")


# -------------------------------------------------------------- transforms
def _grid_image(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(width * 1000 + height)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("size, S, halved, resized, offset", [
    ((500, 375), 256, (500, 375), (341, 256), (42, 0)),      # no halving; 500 * 256/375 = 341.33
    ((1200, 900), 256, (600, 450), (341, 256), (42, 0)),     # one BOX halving (900 >= 512)
    ((1025, 1030), 256, (256, 257), (256, 257), (0, 0)),     # two halvings; (257 - 256) // 2 = 0
    ((6, 4), 3, (6, 4), (4, 3), (0, 0)),                     # round(4.5) = 4: Python rounds half to even
    ((30, 50), 16, (30, 50), (16, 27), (0, 5)),              # portrait: 50 * 16/30 = 26.67 -> 27
])
def test_center_crop_arr_integer_rules(size, S, halved, resized, offset) -> None:
    image = _grid_image(*size)
    expected = image
    while min(expected.size) >= 2 * S:
        expected = expected.resize((expected.size[0] // 2, expected.size[1] // 2), resample=Image.Resampling.BOX)
    assert expected.size == halved
    expected = expected.resize(resized, resample=Image.Resampling.BICUBIC)
    left, top = offset
    expected = expected.crop((left, top, left + S, top + S))
    out = center_crop_arr(image, S)
    assert out.size == (S, S)
    assert np.array_equal(np.asarray(out), np.asarray(expected))


class _ScriptedRandom:
    """Stands in for ``random``: returns scripted values and records the calls."""

    def __init__(self, values: list[int]) -> None:
        self.values, self.calls = list(values), []

    def randrange(self, *args: int) -> int:
        self.calls.append(args)
        return self.values.pop(0)


def test_random_crop_arr_integer_rules() -> None:
    assert random_crop_range(256) == (256, 320)
    assert random_crop_range(384) == (384, 480)
    assert random_crop_range(16) == (16, 20)
    image = _grid_image(300, 200)
    rng = _ScriptedRandom([20, 3, 5])
    out = random_crop_arr(image, 16, rng=rng)
    # short side 20: halve while min >= 40: 300x200 -> 150x100 -> 75x50 -> 37x25; then 25 -> 20:
    # 37 * 0.8 = 29.6 -> 30, so 30x20, crop at top 3 of 5 options, left 5 of 15.
    assert rng.calls == [(16, 21), (5,), (15,)]
    expected = image
    for size in ((150, 100), (75, 50), (37, 25)):
        expected = expected.resize(size, resample=Image.Resampling.BOX)
    expected = expected.resize((30, 20), resample=Image.Resampling.BICUBIC).crop((5, 3, 21, 19))
    assert np.array_equal(np.asarray(out), np.asarray(expected))


def test_adm_train_transform_is_seeded_and_flips() -> None:
    image = _grid_image(40, 30)
    a = [ADMTrainTransform(image_size=16, rng=random.Random(7))(image) for _ in range(2)]
    assert torch.equal(a[0], a[1]) and a[0].shape == (3, 16, 16)
    no_flip = ADMTrainTransform(image_size=16, flip_prob=0.0, rng=random.Random(7))(image)
    always = ADMTrainTransform(image_size=16, flip_prob=1.0, rng=random.Random(7))(image)
    assert torch.equal(always, no_flip.flip(-1))


def test_named_transforms() -> None:
    image = _grid_image(40, 30)
    for name in ("adm_train", "adm_eval", "magvit2_train", "magvit2_eval"):
        out = build_transform(name, image_size=16)(image)
        assert out.shape == (3, 16, 16) and out.dtype == torch.float32
        assert out.min() >= -1 and out.max() <= 1
    from torchvision import transforms as T

    reference = T.CenterCrop(16)(T.Resize(16, antialias=True)(image))
    assert torch.equal(build_transform("magvit2_eval", image_size=16)(image), to_tensor(reference))
    black_white = Image.fromarray(np.array([[[0, 0, 0], [255, 255, 255]]], dtype=np.uint8))
    assert to_tensor(black_white)[:, 0, :].tolist() == [[-1.0, 1.0]] * 3
    with pytest.raises(ConfigError, match="unknown transform"):
        build_transform("random_resized_crop", image_size=16)


@pytest.mark.parametrize("width, height, size", [(12, 12, 8), (13, 17, 8), (17, 13, 8), (9, 10, 9)])
def test_ten_crop_matches_torchvision(width: int, height: int, size: int) -> None:
    from torchvision.transforms import functional as TF

    image = _grid_image(width, height)
    ours = ten_crop(image, size)
    theirs = TF.ten_crop(image, size)
    assert len(ours) == len(theirs) == 10
    for a, b in zip(ours, theirs):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert five_crop(image, size)[0].size == (size, size)
