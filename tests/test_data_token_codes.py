"""The token-code format: writer, manifest, reader (view choice, secondary set, remap, vocabulary check)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from arforge.data.image_datasets import DataError
from arforge.data.token_codes import (
    CodesManifest,
    TokenCodeDataset,
    TokenCodeWriter,
    VocabularyError,
    codes_dtype,
)

pytestmark = pytest.mark.plumbing  # no floating-point result compared across kernels

N, A, L = 12, 10, 4  # samples, views, positions (2 x 2 grid)


def write_codes(directory: Path, codes: np.ndarray, labels: np.ndarray, sizes: tuple[int, ...],
                order: np.ndarray | None = None, **kw) -> CodesManifest:
    writer = TokenCodeWriter(directory, capacity=len(codes), n_aug=codes.shape[1], seq_len=codes.shape[2],
                             codebook_sizes=sizes, overwrite=kw.pop("overwrite", False))
    order = np.arange(len(codes)) if order is None else order
    for chunk in np.array_split(order, 3):
        writer.write(codes[chunk], labels[chunk], positions=chunk, source_indices=chunk + 100)
    return writer.commit(grid=(2, 2), augmentations=[f"view{i}" for i in range(codes.shape[1])],
                         class_names=["a", "b", "c"], **kw)


def view_coded(n: int = N, offset: int = 0) -> np.ndarray:
    """codes[i, v, l, 0] = offset + 10 * v + l: every stored id tells its view."""
    codes = np.zeros((n, A, L, 1), dtype=np.int64)
    codes[..., 0] = offset + 10 * np.arange(A)[None, :, None] + np.arange(L)[None, None, :]
    return codes


@pytest.fixture
def labels() -> np.ndarray:
    return np.arange(N) % 3


def test_dtype_follows_the_vocabulary() -> None:
    assert codes_dtype((16384,)) == np.int16  # LlamaGen VQ
    assert codes_dtype((256, 4096)) == np.int16  # IAR2 (s, d)
    assert codes_dtype((32768,)) == np.int16 and codes_dtype((32769,)) == np.int32
    assert codes_dtype((2 ** 18,)) == np.int32  # Open-MAGVIT2
    assert codes_dtype((2 ** 40,)) == np.int64


def test_write_out_of_order_with_gaps_then_read(tmp_path: Path, labels: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 300, size=(N, A, L, 2))
    writer = TokenCodeWriter(tmp_path / "codes", capacity=N, n_aug=A, seq_len=L, codebook_sizes=(300, 300))
    kept = np.array([i for i in range(N) if i not in (3, 7)])  # two unreadable images
    for chunk in (kept[5:], kept[:5]):  # arrival order is not dataset order
        writer.write(codes[chunk], labels[chunk], positions=chunk, source_indices=chunk)
    manifest = writer.commit(grid=(2, 2), augmentations=[f"v{i}" for i in range(A)], skipped=2,
                             tokenizer_checkpoint="/x/vq.pt", factorization="identity", image_size=32)
    folder = tmp_path / "codes"
    assert sorted(p.name for p in folder.iterdir()) == ["codes.npy", "indices.npy", "labels.npy", "manifest.json"]
    assert not list(tmp_path.glob(".codes.tmp-*"))
    stored = np.load(folder / "codes.npy")
    assert stored.dtype == np.int16 and stored.shape == (N - 2, A, L, 2)
    assert np.array_equal(stored, codes[kept])
    assert np.array_equal(np.load(folder / "labels.npy"), labels[kept])
    assert np.array_equal(np.load(folder / "indices.npy"), kept)
    data = json.loads((folder / "manifest.json").read_text())
    assert data["num_samples"] == N - 2 and data["n_aug"] == A and data["grid"] == [2, 2]
    assert data["codebook_sizes"] == [300, 300] and data["id_components"] == 2 and data["skipped"] == 2
    assert data["max_ids"] == codes[kept].reshape(-1, 2).max(0).tolist()
    assert manifest.num_samples == N - 2
    ds = TokenCodeDataset(root=folder, augmentation=3)
    item = ds[4]
    assert item.codes.dtype == torch.int64 and item.codes.shape == (L, 2)
    assert torch.equal(item.codes, torch.from_numpy(codes[kept[4], 3])) and item.label == labels[kept[4]]
    batch = next(iter(DataLoader(ds, batch_size=5)))
    assert batch.codes.shape == (5, L, 2) and batch.label.shape == (5,)  # (B, L, S), interfaces.py


def test_writer_refuses_bad_rows_and_existing_folders(tmp_path: Path, labels: np.ndarray) -> None:
    writer = TokenCodeWriter(tmp_path / "c", capacity=N, n_aug=A, seq_len=L, codebook_sizes=(100,))
    writer.write(view_coded(2), labels[:2], positions=np.array([0, 1]))
    with pytest.raises(DataError, match="written twice"):
        writer.write(view_coded(1), labels[:1], positions=np.array([1]))
    with pytest.raises(DataError, match="id 143 in component 0, outside its codebook of 100"):
        writer.write(view_coded(1) + 50, labels[:1], positions=np.array([2]))
    with pytest.raises(DataError, match="do not match"):
        writer.write(view_coded(1)[:, :3], labels[:1])
    writer.abort()
    assert not list(tmp_path.iterdir())
    write_codes(tmp_path / "c", view_coded(), labels, (100,))
    with pytest.raises(DataError, match="already holds token codes"):
        write_codes(tmp_path / "c", view_coded(), labels, (100,))
    write_codes(tmp_path / "c", view_coded(offset=1), labels, (100,), overwrite=True)
    assert np.load(tmp_path / "c" / "codes.npy")[0, 0, 0, 0] == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="not a token-code folder"):
        write_codes(tmp_path / "other", view_coded(), labels, (100,))


def test_vocab_check_names_file_component_and_sizes(tmp_path: Path, labels: np.ndarray) -> None:
    write_codes(tmp_path / "c", view_coded(), labels, (100,))  # max id 10 * 9 + 3 = 93
    manifest = tmp_path / "c" / "manifest.json"
    ds = TokenCodeDataset(root=tmp_path / "c")
    ds.check_vocab((94,))
    ds.check_vocab((94,), scan=True)
    with pytest.raises(VocabularyError) as err:
        ds.check_vocab((64,))
    text = str(err.value)
    assert str(manifest) in text and "component 0" in text and "93" in text and "64" in text
    with pytest.raises(VocabularyError, match="2 \\(\\[64, 4096\\]\\)"):
        TokenCodeDataset(root=tmp_path / "c", codebook_sizes=(64, 4096))
    with pytest.raises(VocabularyError, match="vocabulary size is 90"):
        TokenCodeDataset(root=tmp_path / "c", codebook_sizes=(90,))


def test_remap_is_applied_and_checked(tmp_path: Path, labels: np.ndarray) -> None:
    write_codes(tmp_path / "c", view_coded(), labels, (100,))
    mapping = torch.randperm(100, generator=torch.Generator().manual_seed(0))  # mapping[old] = new
    plain = TokenCodeDataset(root=tmp_path / "c", seed=1)
    remapped = TokenCodeDataset(root=tmp_path / "c", seed=1, remap=mapping, codebook_sizes=(100,))
    for i in range(N):
        assert torch.equal(remapped[i].codes, mapping[plain[i].codes])
    torch.save(mapping, tmp_path / "mapping.pt")
    from_file = TokenCodeDataset(root=tmp_path / "c", seed=1, remap=tmp_path / "mapping.pt")
    assert torch.equal(from_file[5].codes, remapped[5].codes)
    with pytest.raises(VocabularyError, match="remap has only 50 entries"):
        TokenCodeDataset(root=tmp_path / "c", remap=torch.arange(50))
    with pytest.raises(VocabularyError, match="after the remap"):
        TokenCodeDataset(root=tmp_path / "c", remap=torch.arange(100) + 100, codebook_sizes=(100,))
    with pytest.raises(DataError, match="1-D integer"):
        TokenCodeDataset(root=tmp_path / "c", remap=torch.zeros(10, 10, dtype=torch.long))


def test_view_choice_is_seeded_reproducible_and_uniform(tmp_path: Path) -> None:
    n = 400
    write_codes(tmp_path / "c", view_coded(n), np.zeros(n, dtype=np.int64), (100,))

    def views(seed: int, epoch: int) -> list[int]:
        ds = TokenCodeDataset(root=tmp_path / "c", seed=seed)
        ds.set_epoch(epoch)
        return [int(ds[i].codes[0, 0]) // 10 for i in range(n)]

    first = views(0, 0)
    assert first == views(0, 0)
    assert first != views(0, 1) and first != views(1, 0)
    counts = np.bincount(first + views(0, 1) + views(0, 2), minlength=A)
    assert counts.min() > 0.6 * 3 * n / A and counts.max() < 1.4 * 3 * n / A
    # The choice depends on (seed, epoch, index) only: DataLoader workers read the same views.
    ds = TokenCodeDataset(root=tmp_path / "c", seed=0)
    loaded = torch.cat([b.codes[:, 0, 0] for b in DataLoader(ds, batch_size=64, num_workers=2)])
    assert (loaded // 10).tolist() == first
    fixed = TokenCodeDataset(root=tmp_path / "c", augmentation=4)
    assert {int(fixed[i].codes[0, 0]) // 10 for i in range(20)} == {4}
    with pytest.raises(DataError, match="view index"):
        TokenCodeDataset(root=tmp_path / "c", augmentation=10)


def test_secondary_extraction_mixing(tmp_path: Path, labels: np.ndarray) -> None:
    n = 300
    labels = np.arange(n) % 3
    write_codes(tmp_path / "p", view_coded(n), labels, (300,))
    write_codes(tmp_path / "s", view_coded(n, offset=200), labels, (300,))

    def secondary_share(prob: float) -> float:
        ds = TokenCodeDataset(root=tmp_path / "p", secondary=tmp_path / "s", secondary_prob=prob, seed=2)
        return float(np.mean([int(ds[i].codes[0, 0]) >= 200 for i in range(n)]))

    assert secondary_share(0.0) == 0.0 and secondary_share(1.0) == 1.0
    assert 0.4 < secondary_share(0.5) < 0.6
    write_codes(tmp_path / "other", view_coded(n), (labels + 1) % 3, (300,))
    with pytest.raises(DataError, match="labels .* differ"):
        TokenCodeDataset(root=tmp_path / "p", secondary=tmp_path / "other")
    write_codes(tmp_path / "short", view_coded(n - 1), labels[:-1], (300,))
    with pytest.raises(DataError, match="num_samples"):
        TokenCodeDataset(root=tmp_path / "p", secondary=tmp_path / "short")


def test_reader_errors_and_pickling(tmp_path: Path, labels: np.ndarray) -> None:
    with pytest.raises(DataError, match="does not exist"):
        TokenCodeDataset(root=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="manifest.json does not exist"):
        TokenCodeDataset(root=tmp_path / "empty")
    write_codes(tmp_path / "c", view_coded(), labels, (100,))
    ds = TokenCodeDataset(root=tmp_path / "c")
    ds[0]
    assert len(pickle.dumps(ds)) < 20_000  # memory maps are reopened, never copied into workers
    assert torch.equal(pickle.loads(pickle.dumps(ds))[3].codes, ds[3].codes)
    np.save(tmp_path / "c" / "labels.npy", labels[:-1])
    with pytest.raises(DataError, match="do not match"):
        TokenCodeDataset(root=tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    del manifest["grid"]
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="lacks grid"):
        TokenCodeDataset(root=tmp_path / "c")
