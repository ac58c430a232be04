"""Tiny overrides and expected outputs for ``experiments/quickstart/``.

The quickstart is already CPU-sized and reads scikit-learn's bundled digits, so nothing is
generated: shrinking it means fewer steps, smaller batches and fewer samples. The same bindings
go to every file: a pipeline forwards them to each stage and a study to each trial, and a binding
given to the launch wins over a pipeline's own (``short_pipeline.gin``'s budget), so the checks
below can expect the tiny sizes everywhere.

What a stage must leave behind is checked by its job (:func:`_check_stage`) wherever it ran:
alone, as a pipeline stage, inside a study trial. Where it read its inputs from is checked against
the launch file's own path macros (``AR_CHECKPOINT``, ``SAMPLES``, ...), so a stage that silently
read another run's files fails.
"""

from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path

import numpy as np

import tiny_launches as tl

NUM_CLASSES = 10
IMAGE_SIZE = 16
TRAIN_DIGITS, VAL_DIGITS = 1497, 300   # packages/arforge/data/digits.py's fixed split
TRAIN_PER_CLASS = [148, 152, 147, 152, 151, 152, 151, 149, 145, 150]
SEQ_LEN, GRID = 64, [8, 8]             # the tokenizer downsamples 16 px by 2
TOKENIZER_STEPS = 3
AR_STEPS = 3
CLASSIFIER_STEPS = 20                  # seeded: 65 % held-out accuracy (chance 10 %)
SAMPLES_PER_CLASS = 2
FIDELITY_STEPS = (10, 20)

TINY = [
    f"jobs.train_tokenizer.steps = {TOKENIZER_STEPS}", "jobs.train_tokenizer.batch_size = 8",
    "jobs.train_tokenizer.eval_images = 16",
    f"jobs.train_ar.steps = {AR_STEPS}", "jobs.train_ar.batch_size = 8", "jobs.train_ar.warmup_steps = 1",
    f"jobs.train_feature_extractor.steps = {CLASSIFIER_STEPS}",
    f"jobs.sample.samples_per_class = {SAMPLES_PER_CLASS}",
    f"jobs.sample.batch_size = {SAMPLES_PER_CLASS * NUM_CLASSES}",
    f"jobs.evaluate_samples.fidelity_steps = {FIDELITY_STEPS}",
    f"evaluators.generation.is_split_size = {FIDELITY_STEPS[-1]}",
]

#: What each stage reads or writes, by the common.gin macro that names it: (job, logged param) -> macro.
#: A checkpoint param names the step folder inside the macro's ``checkpoints`` folder.
WIRING = {
    ("extract_codes", "manifest.tokenizer_checkpoint"): "TOKENIZER_CHECKPOINT",
    ("sample_images", "sample.model_checkpoint"): "AR_CHECKPOINT",
    ("sample_images", "sample.tokenizer_checkpoint"): "TOKENIZER_CHECKPOINT",
    ("sample_images", "sample.output"): "SAMPLES",
    ("evaluate_samples", "eval.samples"): "SAMPLES",
    ("evaluate_samples", "eval.reference"): "REFERENCE",
    ("evaluate_samples", "eval.weights_file"): "FEATURE_EXTRACTOR",
}


def bindings(lf: tl.LaunchFile, world: tl.World) -> list[str]:
    """The same shrink for every quickstart launch: each binding names one job's own knob, so a
    stage ignores the others' and a new launch file of any of these jobs is covered as it is."""
    return list(TINY)


def expect(lf: tl.LaunchFile, world: tl.World, result) -> None:
    """Stage files are checked as one stage, pipelines stage by stage, studies trial by trial."""
    if lf.kind == "study":
        if tl.describe(lf.study_launch).job != "jobs.pipeline":  # e.g. a tokenizer study: one stage per trial
            from tiny_launches import studies

            studies.expect(lf, world, result)
            return
        _expect_study(lf, world)
        return
    run = tl.expect_job(lf, world, result)
    out = Path(result[1])
    if lf.job == "jobs.pipeline":
        _expect_pipeline(lf, world, run, out)
    else:
        # Alone, a stage resolves "pipeline:" paths in its experiment's folder, which holds its own.
        _check_stage(world, run, out, vocab=_vocabulary(lf), wiring=_wiring(lf, world, out.parent))


# ----------------------------------------------------------------------------- launch-file facts
def _macro(bound: dict[str, str], value: str) -> str:
    return bound[value[1:]] if value.startswith("%") else value


def _vocabulary(lf: tl.LaunchFile) -> tuple[int, ...]:
    """The vocabulary of each token id component the file's tokenizer produces (its S sizes)."""
    bound = tl.flat_bindings(lf.path)
    tokenizer = _macro(bound, bound["TOKENIZER"]).lstrip("@").split("(")[0]
    quantizer = bound[f"{tokenizer}.quantizer"].lstrip("@").split("(")[0]
    if quantizer == "quantizers.semantic_detail":  # IAR2: (semantic, detail) ids
        return (int(bound[f"{quantizer}.semantic_codebook_size"]), int(bound[f"{quantizer}.detail_codebook_size"]))
    if quantizer == "quantizers.lfq":
        return (2 ** int(_macro(bound, bound[f"{quantizer}.bits"])),)
    raise AssertionError(f"{lf.rel}: no expected vocabulary for {quantizer}")


def _wiring(lf: tl.LaunchFile, world: tl.World, pipeline_dir: Path) -> dict[str, Path]:
    """Where ``lf``'s stages read and write each path macro: a pipeline's own bindings
    (``jobs.pipeline.bindings``) win over common.gin; ``pipeline:`` is ``pipeline_dir``."""
    bound = tl.flat_bindings(lf.path)
    text = lf.path.read_text()
    paths = {}
    for macro in set(WIRING.values()):
        own = re.search(rf"\b{macro}\s*=\s*\"([^\"]+)\"", text)
        value = own.group(1) if own else bound[macro].strip('"')
        scheme, _, rest = value.partition(":")
        paths[macro] = {"outputs": world.home / "outputs" / rest, "pipeline": pipeline_dir / rest}.get(
            scheme, Path(value))
    return paths


# ----------------------------------------------------------------------------- MLflow helpers
def _client(world: tl.World):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{world.home / 'mlflow.db'}")


def _history(world: tl.World, run, key: str) -> dict[int, float]:
    return {m.step: m.value for m in _client(world).get_metric_history(run.info.run_id, key)}


def _artifacts(world: tl.World, run, folder: str) -> set[str]:
    return {a.path for a in _client(world).list_artifacts(run.info.run_id, folder)}


def _own_folder(run, out: Path) -> None:
    """``out`` is the folder ``run``'s launch wrote (its run.json names the run)."""
    state = json.loads((out / "run.json").read_text())
    assert state["run_id"] == run.info.run_id and state["status"] == "FINISHED", (out, state)


# ----------------------------------------------------------------------------- per stage
def _check_stage(world: tl.World, run, out: Path, *, vocab: tuple[int, ...], wiring: dict[str, Path]) -> None:
    """What a quickstart stage run must have produced in ``out``, and read from where ``wiring`` says."""
    job = run.data.tags["arforge.job"]
    metrics, params = run.data.metrics, dict(run.data.params)
    name = run.info.run_name
    assert run.info.status == "FINISHED", (name, run.info.status)
    _own_folder(run, out)
    if job == "train_tokenizer":
        assert (out / "checkpoints" / "latest").is_file(), out
        assert max(_history(world, run, "train/loss")) == TOKENIZER_STEPS, name
        assert math.isfinite(metrics["val/psnr"]) and 0.0 <= metrics["val/ssim"] <= 1.0, metrics
        assert "reconstructions/final.png" in _artifacts(world, run, "reconstructions")
    elif job == "extract_codes":
        codes_dir = out / "codes"
        manifest = json.loads((codes_dir / "manifest.json").read_text())
        params["manifest.tokenizer_checkpoint"] = manifest["tokenizer_checkpoint"]
        # One view per training digit (digits are not flipped), 8 x 8 tokens, S components in range.
        assert manifest["num_samples"] == TRAIN_DIGITS and manifest["n_aug"] == 1, manifest
        assert manifest["seq_len"] == SEQ_LEN and manifest["grid"] == GRID, manifest
        assert tuple(manifest["codebook_sizes"]) == vocab, (manifest["codebook_sizes"], vocab)
        codes = np.load(codes_dir / "codes.npy", mmap_mode="r")
        assert codes.shape == (TRAIN_DIGITS, 1, SEQ_LEN, len(vocab)), codes.shape
        assert all(0 <= codes[..., s].min() and codes[..., s].max() < v for s, v in enumerate(vocab))
        labels = np.load(codes_dir / "labels.npy")
        assert np.bincount(labels, minlength=NUM_CLASSES).tolist() == TRAIN_PER_CLASS
    elif job == "train_ar":
        assert (out / "checkpoints" / "latest").is_file(), out
        losses = _history(world, run, "train/loss")
        assert max(losses) == AR_STEPS and all(math.isfinite(v) for v in losses.values()), losses
    elif job == "train_feature_extractor":
        assert (out / "feature_extractor.safetensors").is_file(), out
        assert max(_history(world, run, "train/loss")) == CLASSIFIER_STEPS, name
        assert metrics["val/accuracy"] > 0.5, metrics
    elif job == "make_reference":
        ref = np.load(out / "val_digits.npz")
        assert ref["arr_0"].shape == (VAL_DIGITS, IMAGE_SIZE, IMAGE_SIZE, 3) and ref["arr_0"].dtype == np.uint8
        assert ref["mu"].ndim == 1 and ref["sigma"].shape == (len(ref["mu"]),) * 2
        assert np.isfinite(ref["mu"]).all() and np.isfinite(ref["sigma"]).all()
        assert metrics["reference/num_images"] == VAL_DIGITS, metrics
    elif job == "sample_images":
        data = np.load(out / "samples.npz")
        images, labels = data["arr_0"], data["arr_1"]
        assert images.shape == (NUM_CLASSES * SAMPLES_PER_CLASS, IMAGE_SIZE, IMAGE_SIZE, 3), images.shape
        assert images.dtype == np.uint8 and images.std() > 0, "blank samples"
        assert np.bincount(labels, minlength=NUM_CLASSES).tolist() == [SAMPLES_PER_CLASS] * NUM_CLASSES
        assert "samples/grid.png" in _artifacts(world, run, "samples")
        assert params["sample.model_step"] == str(AR_STEPS) and params["sample.tokenizer_step"] == str(TOKENIZER_STEPS)
    elif job == "evaluate_samples":
        for key in ("fid", "is", "precision", "recall"):
            assert math.isfinite(metrics[key]), (key, metrics)
        assert 0.0 <= metrics["precision"] <= 1.0 and 0.0 <= metrics["recall"] <= 1.0, metrics
        assert 1.0 - 1e-6 <= metrics["is"] <= NUM_CLASSES + 1e-6, metrics  # IS lies in [1, classes]
        fid = _history(world, run, "fid")
        assert sorted(fid) == sorted(FIDELITY_STEPS) and all(math.isfinite(v) for v in fid.values()), fid
        assert fid[FIDELITY_STEPS[-1]] == metrics["fid"], (fid, metrics)
        # The FID run carries the guidance settings next to its metrics, under their gin names (arforge compare).
        assert "sample.temperature" in params and any(k.startswith("guidance.") for k in params), params
    else:
        raise AssertionError(f"{name}: no quickstart check for job {job!r}")
    for (wired_job, param), macro in WIRING.items():
        if wired_job == job:
            read = Path(params[param])
            read = read.parent if read.name.startswith("step_") else read
            assert read == wiring[macro], f"{name}: {param} = {read}, but {macro} is {wiring[macro]}"


# ----------------------------------------------------------------------------- pipelines
def _expect_pipeline(lf: tl.LaunchFile, world: tl.World, run, out: Path) -> dict:
    """Every stage of ``lf`` ran nested in ``run``, in ``out``, and produced what it must."""
    stages = tl.pipeline_stages(lf)
    assert stages, f"{lf.rel}: no jobs.pipeline.stages found"
    children = {c.info.run_name: c for c in tl.child_runs(world, run.info.run_id)}
    # The runs nested in the pipeline run are exactly its stages (the README's first command).
    assert sorted(children) == sorted(s.run_name for s in stages), (lf.rel, sorted(children))
    vocab, wiring = _vocabulary(lf), _wiring(lf, world, out)
    for stage in stages:
        assert f"pipeline/{stage.path.stem}_seconds" in run.data.metrics, (lf.rel, stage.rel)
        _check_stage(world, children[stage.run_name], out / stage.run_name, vocab=vocab, wiring=wiring)
    if "sample" in children and "evaluate" in children:
        sampled = {k: v for k, v in children["sample"].data.params.items() if k.startswith(("sample.", "guidance.", "jobs.sample.guidance"))}
        evaluated = children["evaluate"].data.params
        assert sampled and all(evaluated.get(k) == v for k, v in sampled.items()), (sampled, evaluated)
    return children


# ----------------------------------------------------------------------------- studies
def _study_config(lf: tl.LaunchFile):
    import gin

    from arforge.studies import load_study_config

    try:
        return load_study_config(lf.path)
    finally:
        gin.clear_config()


def _expect_study(lf: tl.LaunchFile, world: tl.World) -> None:
    """2 trials ran (the enqueued points first), each a full run of the study's launch file
    with its suggestions reaching the stages, and the parent run records the best value."""
    from arforge.studies import space_bindings

    cfg = _study_config(lf)
    client = _client(world)
    experiment = client.get_experiment_by_name(cfg.experiment)
    parents = client.search_runs([experiment.experiment_id], "tags.`arforge.role` = 'study'")
    assert len(parents) == 1, [p.info.run_name for p in parents]
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["arforge.study"] == cfg.study_name
    trials = sorted(tl.child_runs(world, parent.info.run_id), key=lambda r: int(r.data.tags["arforge.trial_number"]))
    assert [t.info.run_name for t in trials] == ["trial-0000", "trial-0001"], [t.info.run_name for t in trials]
    assert all(t.data.tags["arforge.trial_state"] == "COMPLETE" for t in trials), [t.data.tags for t in trials]
    assert parent.data.metrics["n_complete"] == 2 and parent.data.metrics["n_failed"] == 0, parent.data.metrics

    launch = tl.describe(lf.study_launch)
    for number, point in enumerate(cfg.enqueue):  # enqueued points run first, as given
        want = space_bindings(cfg.space, point)
        got = {k: trials[number].data.params[k] for k in want}
        assert {k: ast.literal_eval(v) for k, v in got.items()} == {k: ast.literal_eval(v) for k, v in want.items()}
    values = {}
    for trial in trials:
        assert trial.info.status == "FINISHED", trial.info.run_name
        out = world.home / "outputs" / cfg.experiment / trial.info.run_name
        _own_folder(trial, out)
        stages = _expect_pipeline(launch, world, trial, out)
        suggested = {k: trial.data.params[k] for k in json.loads(parent.data.tags["arforge.space"])}
        assert set(suggested) == set(space_bindings(cfg.space, {n: s.example() for n, s in cfg.space.items()}))
        for name, value in suggested.items():  # each suggestion reached every stage that binds it
            bound = [s.data.params[name] for s in stages.values() if name in s.data.params]
            assert bound and all(ast.literal_eval(b) == ast.literal_eval(value) for b in bound), (name, value, bound)
        values[trial.info.run_id] = trial.data.metrics[cfg.objective]
        assert values[trial.info.run_id] == stages["evaluate"].data.metrics[cfg.objective], trial.info.run_name
    best = (min if cfg.direction == "minimize" else max)(values.values())
    assert parent.data.metrics[f"best_{cfg.objective}"] == best, (parent.data.metrics, values)
    assert values[parent.data.tags["arforge.best_run_id"]] == best, parent.data.tags
