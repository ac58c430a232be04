"""``experiments/iar2``: every stage at a tiny size, and what each must produce.

The paper sizes map to tiny ones by preset, whatever the file: both tokenizer stages become the
``tiny`` LlamaGen VQ backbone with a ``SEMANTIC``-entry semantic and a ``DETAIL``-entry detail
codebook, every GPT size (B ... XXL) the ``tiny`` IAR2 GPT over those two vocabularies on the 6x6
grid. Data, evaluator weights and the job-kind overrides are shared with LlamaGen
(:mod:`tiny_launches._imagenet`); the official release files of ``official_sample.gin`` are written
here in the official containers (``0485000.pt`` {"model": ...}, the FSDP ``IAR2-*.pth`` bare state
dict).
"""

from __future__ import annotations

from pathlib import Path

import tiny_launches as tl
from tiny_launches import _imagenet as im

SEMANTIC, DETAIL = 16, 32
VOCAB = {"ce_sem": SEMANTIC, "ce_det": DETAIL}  # the AR loss's cross-entropies, in sub-token order
CODEBOOK_SIZES = (SEMANTIC, DETAIL)

TOKENIZER = ['tokenizers.llamagen_vq.preset = "tiny"',
             f"quantizers.semantic_detail.semantic_codebook_size = {SEMANTIC}",
             f"quantizers.semantic_detail.detail_codebook_size = {DETAIL}"]
MODEL = ['models.iar2_gpt.size = "tiny"', f"models.iar2_gpt.semantic_size = {SEMANTIC}",
         f"models.iar2_gpt.detail_size = {DETAIL}", f"models.iar2_gpt.block_size = {im.GRID * im.GRID}",
         f"models.iar2_gpt.num_classes = {im.CLASSES}"]
FAMILY = {
    "jobs.train_tokenizer": TOKENIZER,
    "jobs.extract_codes": TOKENIZER,
    "jobs.train_ar": MODEL,
    "jobs.sample": TOKENIZER + MODEL,
}


# --------------------------------------------------------------------------- official files
def _official_files(lf: tl.LaunchFile, out: Path) -> dict:
    """The stage-2 tokenizer ``0485000.pt`` ({"model": ...} with both usage buffers) and an FSDP
    ``IAR2-*.pth`` (a bare state dict), from tiny modules built by the file's presets with their own
    seed, so that their weights differ from anything a fresh build in the launch could produce."""
    import torch

    from arforge_plugins.loaders import ar_checkpoints, tokenizer_checkpoints

    im.parse_for_check(lf, TOKENIZER + MODEL)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        gpt, vq = im.build("%MODEL"), im.build("%TOKENIZER")
    out.mkdir(parents=True)
    ar_file, vq_file = out / "IAR2-tiny.pth", out / "0000003.pt"
    torch.save(ar_checkpoints.export_iar2_gpt(gpt, container="bare"), ar_file)
    torch.save({"model": tokenizer_checkpoints.export_iar2_vq(vq, with_usage_buffers=True)}, vq_file)
    return {"ar": ar_file, "vq": vq_file, "model": gpt.state_dict(), "tokenizer": vq.state_dict()}


def official_files(lf: tl.LaunchFile, world: tl.World) -> dict | None:
    return im.official_files(lf, world, "official_iar2", _official_files)


# --------------------------------------------------------------------------------- bindings
def bindings(lf: tl.LaunchFile, world: tl.World) -> list[str]:
    return im.bindings(lf, world, FAMILY, im.official_bindings(official_files(lf, world)))


# --------------------------------------------------------------------------------- expect
def expect(lf: tl.LaunchFile, world: tl.World, result) -> None:
    run = tl.expect_job(lf, world, result)
    if lf.job == "jobs.pipeline":
        im.expect_pipeline(lf, world, result, run, expect)
    elif lf.job == "jobs.train_tokenizer":
        detail = im.file_value(lf, "quantizers.semantic_detail.detail_codebook", True)
        ck = im.expect_tokenizer(lf, world, result, run, CODEBOOK_SIZES if detail else (SEMANTIC,))
        if im.file_value(lf, "jobs.train_tokenizer.init_from"):
            expect_started_from(lf, world, ck)
    elif lf.job == "jobs.extract_codes":
        im.expect_extract(lf, world, result, CODEBOOK_SIZES)
    elif lf.job == "jobs.train_ar":
        w1 = float(im.file_value(lf, "models.iar2_gpt.semantic_loss_weight", 1.0))
        im.expect_ar(lf, world, result, run, CODEBOOK_SIZES, VOCAB, (w1, 1.0))
    elif lf.job == "jobs.sample":
        im.expect_sample(lf, world, result, run)
        official = official_files(lf, world)
        if official is not None:
            im.expect_same_samples(lf, world, result, bindings(lf, world), official)
    elif lf.job == "jobs.evaluate_samples":
        im.expect_evaluate(lf, world, result, run)
    else:
        raise AssertionError(f"{lf.rel}: no expectations for {lf.job}; add them to tiny_launches/iar2.py")


def expect_started_from(lf: tl.LaunchFile, world: tl.World, ck) -> None:
    """Stage 2 starts from stage 1 (docs/iar2.md#stage-2-training-schedule): every weight but the new detail codebook,
    the discriminator's included. Each Adam step moves a weight by at most about ``lr``, so after
    the tiny budget every inherited parameter is within ``steps * lr`` of stage 1's final value,
    while a fresh initialisation would be off by orders of magnitude more."""
    import torch

    from arforge import checkpoint as ckpt

    init = ckpt.load_checkpoint(im.resolve(world, im.file_value(lf, "jobs.train_tokenizer.init_from")))
    bound = im.TOKENIZER_STEPS * float(im.file_value(lf, "jobs.train_tokenizer.lr")) * 1.01
    assert set(ck.weights["model"]) - set(init.weights["model"]) == {"quantize.embedding_second"}
    for group in ("model", "loss"):
        for key, before in init.weights[group].items():
            if not before.is_floating_point() or "running_" in key:
                continue  # BatchNorm statistics follow the batches, not the optimizer
            moved = (ck.weights[group][key] - before).abs().max().item()
            assert moved <= bound, f"{group}.{key} moved {moved:.3g} from stage 1 (> {bound:.3g})"
    assert set(ck.state["optimizers"]) == {"e1", "e2", "rest", "disc"}, sorted(ck.state["optimizers"])
    assert torch.count_nonzero(ck.weights["model"]["quantize.embedding_second"]).item() > 0
