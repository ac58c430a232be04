"""``experiments/iar``: IAR's stages at a tiny size, and what each must produce.

Two families of files share the folder. ``quickstart/`` is the quickstart on the digits made IAR
(a 64-code VQ clustered 8 x 8, ``models.iar_gpt``): it is CPU-sized already and shrinks like the
quickstart (:data:`tiny_launches.quickstart.TINY`). The ImageNet files at the top (LlamaGen's
VQ-16, 128 x 128 clusters, IAR-B) shrink like LlamaGen's (:mod:`tiny_launches.llamagen`): the tiny
VQ with 32 codes clustered 4 x 8 and the tiny GPT over them, the official VQ-16 file written here in
the official container from the file's own tokenizer preset.

What IAR adds is checked wherever it runs (alone, as a pipeline stage): the clustering stage wrote a
tokenizer whose codebook is the original's rows permuted (E_new[mapping[k]] = E_old[k], every other
tensor unchanged) into equal clusters; the AR stage read the codes through that mapping and trained
with the cluster-oriented loss (``train/cce``, total = CE + lambda CCE); the sampler decoded with
the reordered tokenizer.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

import tiny_launches as tl
from tiny_launches import _imagenet as im
from tiny_launches import quickstart as qs

# ImageNet files: the tiny VQ with 4 clusters of 8 codes.
CLUSTERS, CLUSTER_SIZE = 4, 8
CODEBOOK = CLUSTERS * CLUSTER_SIZE
TOKENIZER = ['tokenizers.llamagen_vq.preset = "tiny"', f"quantizers.vq.codebook_size = {CODEBOOK}",
             f"CLUSTERS = {CLUSTERS}", f"CLUSTER_SIZE = {CLUSTER_SIZE}"]
MODEL = ['models.iar_gpt.size = "tiny"', f"models.iar_gpt.vocab_size = {CODEBOOK}",
         f"models.iar_gpt.block_size = {im.GRID * im.GRID}", f"models.iar_gpt.num_classes = {im.CLASSES}",
         f"models.iar_gpt.cluster_size = {CLUSTER_SIZE}"]
FAMILY = {
    "jobs.cluster_codebook": TOKENIZER,
    "jobs.extract_codes": TOKENIZER,
    "jobs.train_ar": MODEL + TOKENIZER,
    "jobs.sample": TOKENIZER + MODEL,
}
# The quickstart variant (experiments/iar/quickstart/iar.gin).
QS_CODEBOOK, QS_CLUSTER_SIZE = 64, 8


def _quickstart(lf: tl.LaunchFile) -> bool:
    return lf.rel.startswith("iar/quickstart/")


# --------------------------------------------------------------------------------- files
def _official_vq(lf: tl.LaunchFile, out: Path) -> Path:
    """``vq_ds16_c2i.pt`` ({"model": ...} with the usage buffer, as LlamaGen releases it) from the
    tiny VQ the file's presets build, with its own seed."""
    import torch

    from arforge_plugins.loaders import tokenizer_checkpoints

    im.parse_for_check(lf, TOKENIZER)
    with torch.random.fork_rng():
        torch.manual_seed(4321)
        vq = im.build("%TOKENIZER")
    out.mkdir(parents=True)
    path = out / "vq_ds16_c2i.pt"
    torch.save({"model": tokenizer_checkpoints.export_llamagen_vq(vq, with_usage_buffers=True),
                "args": argparse.Namespace(codebook_size=CODEBOOK)}, path)
    return path


def official_vq(lf: tl.LaunchFile, world: tl.World) -> Path:
    """The stand-in for LlamaGen's released VQ-16 file, written once per world."""
    return world.once("official_iar_vq", lambda out: _official_vq(tl.stage_files(lf)[0], out))


def bindings(lf: tl.LaunchFile, world: tl.World) -> list[str]:
    if _quickstart(lf):
        return list(qs.TINY)
    return im.bindings(lf, world, FAMILY, [f'VQ_OFFICIAL = "{official_vq(lf, world)}"'])


# --------------------------------------------------------------------------------- checks
def _client(world: tl.World):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{world.home / 'mlflow.db'}")


def _history(world: tl.World, run, key: str) -> dict[int, float]:
    return {m.step: m.value for m in _client(world).get_metric_history(run.info.run_id, key)}


def _resolve(world: tl.World, value: str, pipeline_dir: Path, experiment: str) -> Path:
    scheme, _, rest = value.partition(":")
    if scheme == "outputs":
        return world.home / "outputs" / rest
    if scheme == "pipeline":
        return pipeline_dir / rest
    return Path(value)


def check_cluster(world: tl.World, run, out: Path, tokenizer_ckpt: Path, clusters: int, size: int) -> None:
    """The reordered tokenizer is the trained one with its codebook rows permuted into equal clusters."""
    import torch

    from arforge import checkpoint as ck
    from arforge_plugins.clustering.balanced_kmeans import balanced_kmeans

    mapping = np.load(out / "mapping.npy")
    assert sorted(mapping.tolist()) == list(range(clusters * size)), mapping  # a permutation of the ids
    new = ck.load_checkpoint(out / "checkpoints").weights["model"]
    if tokenizer_ckpt.suffix == ".pt":  # the official file: its codebook in the official key
        state = torch.load(tokenizer_ckpt, weights_only=False)["model"]
    else:
        state = ck.load_checkpoint(tokenizer_ckpt).weights["model"]
    key = "quantize.embedding.weight"
    old = state[key]
    assert torch.equal(new[key][torch.from_numpy(mapping)], old), "E_new[mapping[k]] != E_old[k]"
    again = balanced_kmeans(old, clusters, size, seed=42)  # the stage's clustering, recomputed
    assert np.array_equal(again.mapping.numpy(), mapping)
    assert np.bincount(again.assignments.numpy(), minlength=clusters).tolist() == [size] * clusters
    if tokenizer_ckpt.suffix != ".pt":
        assert set(new) == set(state) and all(torch.equal(new[k], state[k]) for k in state if k != key)
    metrics = run.data.metrics
    assert metrics["cluster/cluster_size_min"] == metrics["cluster/cluster_size_max"] == size, metrics
    assert math.isfinite(metrics["cluster/intra_mse"]) and metrics["cluster/iterations"] >= 1, metrics


def check_ar(world: tl.World, run, codes: Path, mapping: Path | None, codebook: int) -> None:
    """Trained with the cluster-oriented loss switched on, on codes read through ``mapping`` if given
    (extracted with the original codebook) or as they are (extracted with the reordered one)."""
    from arforge.data.token_codes import TokenCodeDataset

    metrics = run.data.metrics
    # total = CE + lambda * CCE with lambda = 1; the unweighted NLL is the CE alone.
    assert math.isclose(metrics["train/loss"], metrics["train/ce_token"] + metrics["train/cce"], rel_tol=1e-5), metrics
    assert math.isclose(metrics["train/nll"], metrics["train/ce_token"], rel_tol=1e-6), metrics
    assert 0.0 < metrics["train/cce"] < metrics["train/ce_token"], metrics  # log p(cluster) >= log p(token)
    if mapping is None:
        assert "datasets.token_codes.remap" not in run.data.params, run.data.params
        return
    assert "datasets.token_codes.remap" in run.data.params, sorted(run.data.params)  # read through the mapping
    remap = np.load(mapping)
    seen = TokenCodeDataset(root=codes, remap=mapping, augmentation=0)
    raw = seen.primary  # the stored arrays, before the remap
    first = np.asarray(seen[0][0])
    assert np.array_equal(first, remap[np.asarray(raw.codes[0, 0])]) and first.max() < codebook


def check_sample(run, clustered: Path) -> None:
    read = Path(run.data.params["sample.tokenizer_checkpoint"])
    read = read.parent if read.name.startswith("step_") else read
    assert read == clustered, (read, clustered)  # decodes cluster-ordered ids with the reordered codebook


def _quickstart_stage(lf: tl.LaunchFile, world: tl.World, run, out: Path, pipeline_dir: Path) -> None:
    job = run.data.tags["arforge.job"]
    experiment = lf.experiment or "iar-quickstart"
    bound = tl.flat_bindings(lf.path)
    path = {m: _resolve(world, bound[m].strip('"'), pipeline_dir, experiment)
            for m in ("TOKENIZER_CHECKPOINT", "CODES", "CLUSTERED_TOKENIZER", "MAPPING")}
    if job == "cluster_codebook":
        check_cluster(world, run, out, path["TOKENIZER_CHECKPOINT"], QS_CODEBOOK // QS_CLUSTER_SIZE, QS_CLUSTER_SIZE)
    elif job == "train_ar":
        assert max(_history(world, run, "train/loss")) == qs.AR_STEPS
        check_ar(world, run, path["CODES"], path["MAPPING"], QS_CODEBOOK)
    elif job == "sample_images":
        data = np.load(out / "samples.npz")
        assert data["arr_0"].shape == (qs.NUM_CLASSES * qs.SAMPLES_PER_CLASS, qs.IMAGE_SIZE, qs.IMAGE_SIZE, 3)
        check_sample(run, path["CLUSTERED_TOKENIZER"])
    elif job == "extract_codes":
        manifest_codes = np.load(out / "codes" / "codes.npy", mmap_mode="r")
        assert manifest_codes.shape == (qs.TRAIN_DIGITS, 1, qs.SEQ_LEN, 1) and manifest_codes.max() < QS_CODEBOOK
    elif job == "evaluate_samples":
        assert math.isfinite(run.data.metrics["fid"]), run.data.metrics


def expect(lf: tl.LaunchFile, world: tl.World, result) -> None:
    run = tl.expect_job(lf, world, result)
    out = Path(result[1])
    if _quickstart(lf):
        if lf.job == "jobs.pipeline":
            children = {c.info.run_name: c for c in tl.child_runs(world, run.info.run_id)}
            stages = tl.pipeline_stages(lf)
            assert sorted(children) == sorted(s.run_name for s in stages), sorted(children)
            for stage in stages:
                _quickstart_stage(stage, world, children[stage.run_name], out / stage.run_name, out)
        else:  # alone, "pipeline:" paths resolve in the experiment's folder
            _quickstart_stage(lf, world, run, out, out.parent)
        return
    if lf.job == "jobs.pipeline":
        im.expect_pipeline(lf, world, result, run, expect)
        return
    bound = tl.flat_bindings(lf.path)
    if lf.job == "jobs.cluster_codebook":
        check_cluster(world, run, out, official_vq(lf, world), CLUSTERS, CLUSTER_SIZE)
    elif lf.job == "jobs.extract_codes":
        im.expect_extract(lf, world, result, (CODEBOOK,))
    elif lf.job == "jobs.train_ar":
        codes = im.resolve(world, bound["CODES"].strip('"'))
        check_ar(world, run, codes, None, CODEBOOK)  # extracted with the reordered tokenizer
    elif lf.job == "jobs.sample":
        im.expect_sample(lf, world, result, run)
        check_sample(run, im.resolve(world, bound["TOKENIZER_CHECKPOINT"].strip('"')))
    elif lf.job == "jobs.evaluate_samples":
        im.expect_evaluate(lf, world, result, run)
    else:
        raise AssertionError(f"{lf.rel}: no expectations for {lf.job}; add them to tiny_launches/iar.py")
