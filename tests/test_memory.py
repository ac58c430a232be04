"""arforge.memory: the sampling batch picked from free memory (``jobs.sample.batch_size = "auto"``)."""

from __future__ import annotations

import pytest
import torch

from arforge import memory

pytestmark = pytest.mark.plumbing  # sizes and byte counts: no floating-point result compared


def _model():
    from arforge_plugins.models import ar_presets

    return ar_presets.llamagen_gpt("tiny", vocab_size=32, block_size=16).eval()


def test_free_memory_of_the_host_is_positive_and_below_its_total():
    free = memory.free_memory_bytes(torch.device("cpu"))
    import os

    assert 0 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_bytes_per_image_are_the_kv_caches_of_every_layer_plus_logits():
    m = _model()
    att = m.backbone.layers[0].attention
    s_max = 24  # find_multiple(1 + 16, 8)
    per_row = 2 * len(m.backbone.layers) * att.n_kv_head * s_max * att.head_dim * 4  # k and v, fp32
    logits = 32 * 4 * 4
    cpu = torch.device("cpu")
    assert memory.ar_bytes_per_image(m, guided=False, dtype=torch.float32, device=cpu) == per_row + logits
    assert memory.ar_bytes_per_image(m, guided=True, dtype=torch.float32, device=cpu) == 2 * (per_row + logits)
    assert memory.ar_bytes_per_image(m, guided=True, dtype=torch.bfloat16, device=cpu) == per_row + 2 * logits
    assert m.cache_tensors() == {}  # measured, then released


def test_auto_batch_takes_half_the_free_memory_within_its_caps():
    m, cpu = _model(), torch.device("cpu")
    per = memory.ar_bytes_per_image(m, guided=True, dtype=torch.float32, device=cpu)
    pick = memory.auto_sample_batch(m, guided=True, dtype=torch.float32, device=cpu, decode_bytes=per // 2,
                                    samples=1000, free_bytes=2 * 7.5 * per)
    assert (pick.batch, pick.decode_batch) == (7, 7) and pick.ar_bytes_per_image == per
    assert "batch 7" in pick.describe() and "50% of free memory" in pick.describe()
    small = memory.auto_sample_batch(m, guided=True, dtype=torch.float32, device=cpu, decode_bytes=3 * per,
                                     samples=1000, free_bytes=2 * 7.5 * per)
    assert (small.batch, small.decode_batch) == (7, 2)  # the tokenizer decodes in chunks of 2
    assert memory.auto_sample_batch(m, guided=True, dtype=torch.float32, device=cpu, decode_bytes=1,
                                    samples=5, free_bytes=10 ** 12).batch == 5  # never more than the samples
    assert memory.auto_sample_batch(m, guided=True, dtype=torch.float32, device=cpu, decode_bytes=1,
                                    samples=10 ** 6, free_bytes=10 ** 12).batch == memory.MAX_BATCH
    assert memory.auto_sample_batch(m, guided=True, dtype=torch.float32, device=cpu, decode_bytes=1,
                                    samples=10, free_bytes=1).batch == 1  # at least one image


def test_decode_estimate_is_four_times_the_largest_activation():
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 2, 1))
    x = torch.zeros(1, 3, 16, 16)
    assert memory.decode_bytes_per_image(lambda: conv(x)) == 4 * (8 * 16 * 16 * 4)
