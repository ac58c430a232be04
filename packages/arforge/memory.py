"""Free device memory, and the sampling batch that fits in it (``jobs.sample.batch_size = "auto"``).

A fixed batch is wrong on every machine but one: 32 images of GPT-XXL do not fit a 24 GB card,
and 32 images of GPT-B leave an 80 GB card mostly idle. So the sample job's default batch is
picked from what the device has free once the weights are loaded:

* the AR model's decoding caches are allocated once for one image (two rows under CFG) and
  measured (``ARModel.cache_tensors``): the KV caches of every layer, the heads' caches, IAR2's
  window history. They grow linearly with the batch and dominate the decode's memory;
* to them each row adds its logits, fp32, a few times over (the CFG combine, top-k, the
  softmax and the draw each hold a (rows, V) tensor);
* the tokenizer decodes in chunks whose size is picked the same way, from the largest
  activation of a one-image decode (forward hooks), four times over (a convolution's input and
  output, a norm, a skip connection);
* half of the free memory goes to the batch, the rest stays for the allocator's fragmentation
  and whatever else runs.

``tools/benchmark.py --batches`` measures images/s against the batch size; docs/performance.md
gives the figures.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["free_memory_bytes", "SampleBatch", "auto_sample_batch", "decode_bytes_per_image"]

#: the share of free memory a sampling batch may take
FREE_SHARE = 0.5
#: no more images per batch than this (the images/s curve is flat well before, docs/performance.md)
MAX_BATCH = 256


def free_memory_bytes(device: torch.device) -> int:
    """Bytes free on ``device``: the CUDA/NPU driver's count, or the host's ``MemAvailable``."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "npu":
        return int(torch.npu.mem_get_info(device)[0])  # type: ignore[attr-defined]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


@dataclass(frozen=True)
class SampleBatch:
    """The batch picked for sampling, and why (logged by the sample job)."""

    batch: int  #: images per AR decode batch
    decode_batch: int  #: images per tokenizer decode chunk (<= batch)
    free_bytes: int  #: free device memory when it was picked
    ar_bytes_per_image: int  #: decoding caches + logits of one image (both CFG rows)
    decode_bytes_per_image: int  #: the tokenizer's estimated peak for one image

    def describe(self) -> str:
        mib = 1 << 20
        return (f"batch {self.batch}, tokenizer decode chunks of {self.decode_batch} (free memory "
                f"{self.free_bytes / mib:.0f} MiB; per image {self.ar_bytes_per_image / mib:.1f} MiB of decoding "
                f"caches and logits, {self.decode_bytes_per_image / mib:.1f} MiB to decode; "
                f"{FREE_SHARE:.0%} of free memory, at most {MAX_BATCH})")


def ar_bytes_per_image(model: Any, *, guided: bool, dtype: torch.dtype, device: torch.device) -> int:
    """Bytes one image costs the AR decode: its caches (measured) and its rows' fp32 logits."""
    rows = 2 if guided else 1
    model.setup_caches(batch=rows, dtype=dtype, device=device)
    try:
        caches = sum(t.numel() * t.element_size() for t in model.cache_tensors().values())
    finally:
        model.release_caches()
    logits = rows * sum(int(v) for v in model.vocab_sizes) * 4 * 4  # fp32, held about four times
    return int(caches + logits)


def decode_bytes_per_image(decode: Any) -> int:
    """Estimated peak bytes of decoding one image: 4 x the largest activation of ``decode()``.

    ``decode`` is a callable that decodes one image while the hooks listen (the sample job's probe).
    """
    largest = 0

    def hook(_module, _inputs, output):
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel() * output.element_size())

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        decode()
    finally:
        handle.remove()
    return 4 * largest


def auto_sample_batch(model: Any, *, guided: bool, dtype: torch.dtype, device: torch.device,
                      decode_bytes: int, samples: int, free_bytes: int | None = None) -> SampleBatch:
    """The largest batch (<= ``samples``, <= :data:`MAX_BATCH`) whose caches and logits fit in
    half the free memory, and the tokenizer's decode chunk sized the same way."""
    free = free_memory_bytes(device) if free_bytes is None else int(free_bytes)
    per_image = ar_bytes_per_image(model, guided=guided, dtype=dtype, device=device)
    budget = FREE_SHARE * free
    batch = max(1, min(int(budget // max(per_image, 1)), MAX_BATCH, max(int(samples), 1)))
    decode_batch = max(1, min(int(budget // max(decode_bytes, 1)), batch))
    return SampleBatch(batch=batch, decode_batch=decode_batch, free_bytes=free, ar_bytes_per_image=per_image,
                       decode_bytes_per_image=int(decode_bytes))
