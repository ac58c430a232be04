"""``experiments/llamagen``: every stage at a tiny size, and what each must produce.

The paper sizes map to tiny ones by preset, whatever the file: the VQ-16 tokenizer becomes the
``tiny`` LlamaGen VQ (2x downsampling) with a ``CODEBOOK``-entry codebook, every GPT size (B ... 3B)
the ``tiny`` GPT over that vocabulary and the 6x6 grid of the tiny image size. Data, evaluator
weights and the job-kind overrides come from :mod:`tiny_launches._imagenet`; the official release
files of ``official_sample.gin`` are written here, in the official containers, from modules built
by the file's own gin presets. A tokenizer file also runs once more on webdataset shards, with the
``--bind`` lines the README documents for them.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import tiny_launches as tl
from tiny_launches import _imagenet as im

CODEBOOK = 32
VOCAB = {"ce_token": CODEBOOK}  # the AR loss's cross-entropies, in sub-token order
CODEBOOK_SIZES = (CODEBOOK,)

TOKENIZER = ['tokenizers.llamagen_vq.preset = "tiny"', f"quantizers.vq.codebook_size = {CODEBOOK}"]
MODEL = ['models.llamagen_gpt.size = "tiny"', f"models.llamagen_gpt.vocab_size = {CODEBOOK}",
         f"models.llamagen_gpt.block_size = {im.GRID * im.GRID}", f"models.llamagen_gpt.num_classes = {im.CLASSES}"]
FAMILY = {
    "jobs.train_tokenizer": TOKENIZER,
    "jobs.extract_codes": TOKENIZER,
    "jobs.train_ar": MODEL,
    "jobs.sample": TOKENIZER + MODEL,
}


# --------------------------------------------------------------------------- official files
def _official_files(lf: tl.LaunchFile, out: Path) -> dict:
    """``c2i_*.pt`` ({"model": ...} as LlamaGen's DDP trainer saves) and ``vq_ds16_c2i.pt`` ({"model":
    ...} with the usage buffer), from tiny modules built by the file's presets with their own seed,
    so that their weights differ from anything a fresh build in the launch could produce."""
    import torch

    from arforge_plugins.loaders import ar_checkpoints, tokenizer_checkpoints

    im.parse_for_check(lf, TOKENIZER + MODEL)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        gpt, vq = im.build("%MODEL"), im.build("%TOKENIZER")
    out.mkdir(parents=True)
    ar_file, vq_file = out / "c2i_tiny_384.pt", out / "vq_ds2_c2i.pt"
    torch.save({**ar_checkpoints.export_llamagen_gpt(gpt, container="model"),
                "args": argparse.Namespace(gpt_model="GPT-tiny")}, ar_file)
    torch.save({"model": tokenizer_checkpoints.export_llamagen_vq(vq, with_usage_buffers=True),
                "args": argparse.Namespace(codebook_size=CODEBOOK)}, vq_file)
    return {"ar": ar_file, "vq": vq_file, "model": gpt.state_dict(), "tokenizer": vq.state_dict()}


def official_files(lf: tl.LaunchFile, world: tl.World) -> dict | None:
    return im.official_files(lf, world, "official_llamagen", _official_files)


# --------------------------------------------------------------------------------- bindings
def bindings(lf: tl.LaunchFile, world: tl.World) -> list[str]:
    return im.bindings(lf, world, FAMILY, im.official_bindings(official_files(lf, world)))


_README_BIND = re.compile(r"--bind '([^']*datasets\.image_shards[^']*)'")


def shard_bindings(lf: tl.LaunchFile, world: tl.World) -> list[str]:
    """The README's shard variant of a tokenizer file ("Data"): its ``--bind`` lines as documented,
    with the tiny shards, image size and shuffle buffer, in a run of its own."""
    documented = _README_BIND.findall((lf.path.parent / "README.md").read_text())
    tiny = {"datasets.image_shards.urls": f'"{im.image_shards(world).pattern}"',
            "datasets.image_shards.image_size": str(im.TRAIN_PX),
            "datasets.image_shards.shuffle_buffer": "4"}
    binds = []
    for bind in documented:
        key, _, value = (part.strip() for part in bind.partition("="))
        binds.append(f"{key} = {tiny.get(key, value)}")
    keys = {b.partition("=")[0].strip() for b in binds}
    assert {"jobs.train_tokenizer.dataset", "datasets.image_shards.urls"} <= keys, documented
    return bindings(lf, world) + binds + [f'launch.run_name = "{lf.run_name}_shards"']


# --------------------------------------------------------------------------------- expect
def expect(lf: tl.LaunchFile, world: tl.World, result) -> None:
    run = tl.expect_job(lf, world, result)
    if lf.job == "jobs.pipeline":
        im.expect_pipeline(lf, world, result, run, expect)
    elif lf.job == "jobs.train_tokenizer":
        im.expect_tokenizer(lf, world, result, run, CODEBOOK_SIZES)
        expect_shards(lf, world)
    elif lf.job == "jobs.extract_codes":
        im.expect_extract(lf, world, result, CODEBOOK_SIZES)
    elif lf.job == "jobs.train_ar":
        im.expect_ar(lf, world, result, run, CODEBOOK_SIZES, VOCAB, (1.0,))
    elif lf.job == "jobs.sample":
        im.expect_sample(lf, world, result, run)
        official = official_files(lf, world)
        if official is not None:
            im.expect_same_samples(lf, world, result, bindings(lf, world), official)
    elif lf.job == "jobs.evaluate_samples":
        im.expect_evaluate(lf, world, result, run)
    else:
        raise AssertionError(f"{lf.rel}: no expectations for {lf.job}; add them to tiny_launches/llamagen.py")


def expect_shards(lf: tl.LaunchFile, world: tl.World) -> None:
    """The tokenizer file trains on the same images as webdataset shards, as the README documents
    (IAR2's README points here; its tokenizers read images through the same dataset and loader)."""
    if im.file_value(lf, "jobs.train_tokenizer.dataset") != "@datasets.image_folder()":
        return
    result = im.run_variant(lf, world, shard_bindings(lf, world))
    run = tl.expect_job(lf, world, result)
    im.expect_tokenizer(lf, world, result, run, CODEBOOK_SIZES)  # loader state: 3 batches into the first pass
    params = run.data.params
    assert params["jobs.train_tokenizer.dataset"] == "@datasets.image_shards()", params
    assert params["datasets.image_shards.urls"].strip("'\"") == im.image_shards(world).pattern

