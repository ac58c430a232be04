"""``jobs.cluster_codebook``: IAR's clustering as a pipeline stage (the end-to-end runs are the
experiments/iar launch files in tests/test_launch_files.py); here what it writes from a loaded
tokenizer, and its refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arforge import checkpoint as ck
from arforge.data.extraction import local_context
from arforge.data.token_codes import TokenCodeDataset, TokenCodeWriter
from arforge.errors import ArforgeError
from arforge_plugins.clustering.balanced_kmeans import balanced_kmeans
from arforge_plugins.clustering.cluster_job import cluster_codebook
from arforge_plugins.quantizers.vector_quantization import VectorQuantizer
from arforge_plugins.tokenizers.llamagen_vq import llamagen_vq_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _tokenizer():
    torch.manual_seed(0)
    return llamagen_vq_tokenizer(preset="tiny", quantizer=VectorQuantizer(codebook_size=32, dim=8))


def test_writes_the_reordered_tokenizer_and_a_mapping_that_remaps_codes(tmp_path):
    tok = ck.mark_loaded(_tokenizer(), "test weights")
    old = tok.state_dict()
    metrics = cluster_codebook(local_context(tmp_path), tokenizer=tok, clusters=4, cluster_size=8)
    mapping = np.load(tmp_path / "mapping.npy")
    expected = balanced_kmeans(old["quantize.embedding.weight"], 4, 8, seed=42)
    assert np.array_equal(mapping, expected.mapping.numpy())
    assert metrics["cluster_size_min"] == metrics["cluster_size_max"] == 8 and metrics["iterations"] >= 1
    new = ck.load_checkpoint(tmp_path / "checkpoints").weights["model"]
    key = "quantize.embedding.weight"
    assert torch.equal(new[key][torch.from_numpy(mapping)], old[key])  # E_new[mapping[k]] = E_old[k]
    assert all(torch.equal(new[k], v) for k, v in old.items() if k != key)  # nothing else moved
    # The reordered tokenizer encodes to mapping[old id]: extracting with it equals remapping old codes.
    fresh = _tokenizer()
    ck.restore(fresh, checkpoint=tmp_path / "checkpoints")
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        before, after = tok.eval().encode(images), fresh.eval().encode(images)
    assert torch.equal(after, torch.from_numpy(mapping)[before])
    # ... and datasets.token_codes.remap reads stored old codes as the new ids.
    writer = TokenCodeWriter(tmp_path / "codes", capacity=2, n_aug=1, seq_len=before.shape[1], codebook_sizes=(32,))
    writer.write(before[:, None].numpy(), np.array([0, 1]))
    writer.commit(grid=(4, 4), augmentations=["center"])
    remapped = TokenCodeDataset(root=tmp_path / "codes", remap=tmp_path / "mapping.npy", augmentation=0)
    assert torch.equal(torch.as_tensor(np.asarray(remapped[1][0])), after[1])


def test_refuses_random_weights_and_a_codebook_of_another_size(tmp_path):
    with pytest.raises(ck.CheckpointError, match="jobs.cluster_codebook.tokenizer: .*never loaded"):
        cluster_codebook(local_context(tmp_path), tokenizer=_tokenizer(), clusters=4, cluster_size=8)
    tok = ck.mark_loaded(_tokenizer(), "test weights")
    with pytest.raises(ArforgeError, match=r"has shape \(32, 8\), but clusters x cluster_size = 8 x 8 = 64"):
        cluster_codebook(local_context(tmp_path), tokenizer=tok, clusters=8, cluster_size=8)
    assert not (tmp_path / "mapping.npy").exists()
