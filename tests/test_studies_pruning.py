"""Training-curve pruning: a loss-weight study whose AR trials report their held-out NLL by training
step (``ctx.report("val_nll", value, step)``); Optuna's median pruner stops a bad weight at a
training step, and training stops there."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from arforge import studies
from test_studies import _home, _load, _mlflow_runs, _write, seed_mlflow_store

pytestmark = [pytest.mark.plumbing, pytest.mark.usefixtures("one_thread")]  # decisions, not digits

STEPS, EVAL_EVERY = 12, 2


def _codes(folder: Path, *, n: int, seed: int) -> Path:
    """Token codes whose ids follow the class and the position (learnable in a few steps)."""
    from arforge.data.token_codes import TokenCodeWriter

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    pos = np.arange(16)
    codes = (labels[:, None] * 5 + pos[None, :] * 3) % 16  # (N, L)
    flip = rng.random(codes.shape) < 0.1
    codes = np.where(flip, rng.integers(0, 16, size=codes.shape), codes)
    writer = TokenCodeWriter(folder, capacity=n, n_aug=1, seq_len=16, codebook_sizes=(16,))
    writer.write(codes[:, None, :, None].astype(np.int64), labels.astype(np.int64))
    writer.commit(grid=(4, 4), augmentations=["center"], class_names=["a", "b"])
    return folder


def _files(tmp_path: Path) -> Path:
    train, val = _codes(tmp_path / "train", n=64, seed=0), _codes(tmp_path / "val", n=32, seed=1)
    _write(tmp_path / "train_ar.gin", f"""
        launch.experiment = "not-the-study"
        launch.job = @jobs.train_ar
        launch.device = "cpu"
        jobs.train_ar.model = @models.ar_model()
        models.ar_model.factorization = @factorizations.bit_split()
        factorizations.bit_split.bits = (2, 2)
        models.ar_model.backbone = @backbones.llama()
        backbones.llama.dim = 32
        backbones.llama.n_layer = 1
        backbones.llama.n_head = 2
        backbones.llama.block_size = 16
        models.ar_model.head = @heads.next_subtoken
        heads.next_subtoken.n_layer = 1
        heads.next_subtoken.n_head = 2
        models.ar_model.num_classes = 2
        jobs.train_ar.dataset = @train/datasets.token_codes()
        train/datasets.token_codes.root = "{train}"
        jobs.train_ar.val_dataset = @val/datasets.token_codes()
        val/datasets.token_codes.root = "{val}"
        jobs.train_ar.steps = {STEPS}
        jobs.train_ar.batch_size = 16
        jobs.train_ar.lr = 3e-3
        jobs.train_ar.log_every = {EVAL_EVERY}
        jobs.train_ar.eval_every = {EVAL_EVERY}
        jobs.train_ar.save_every = {EVAL_EVERY}
        jobs.train_ar.keep_last = 100
        jobs.train_ar.log_checkpoint = False
    """)
    # Trial 0 weighs both sub-tokens; trial 1 gives the first sub-token weight 0, so its
    # (unweighted) held-out NLL cannot fall as far: the median pruner, with trial 0 as the
    # only finished trial, stops it at the first step where it lags.
    return _write(tmp_path / "weights.gin", """
        import arforge.studies

        study.launch_file = "train_ar.gin"
        study.objective = "val_nll"
        study.direction = "minimize"
        study.n_trials = 2
        study.pruner = "median"
        study.n_startup_trials = 1
        study.space = {
            "jobs.train_ar.loss_weights[0]": @w1/space.float(),
            "jobs.train_ar.loss_weights[1]": @w2/space.categorical(),
        }
        w1/space.float.low = 0.0
        w1/space.float.high = 2.0
        w2/space.categorical.choices = [1.0]
        study.enqueue = [{"jobs.train_ar.loss_weights[0]": 1.0, "jobs.train_ar.loss_weights[1]": 1.0},
                         {"jobs.train_ar.loss_weights[0]": 0.0, "jobs.train_ar.loss_weights[1]": 1.0}]
    """)


def _history(run_id: str, key: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    return {m.step: m.value for m in MlflowClient().get_metric_history(run_id, key)}


def test_pruned_trial_stopped_at_a_training_step_not_after_it_finished(tmp_path):
    seed_mlflow_store(_home())
    f = _files(tmp_path)
    result = studies.run_study(f, verbose=False, plots=True)
    st = _load("weights")
    full, pruned = st.get_trials()
    assert (full.state.name, pruned.state.name) == ("COMPLETE", "PRUNED"), (full.state, pruned.state)
    assert result.n_complete == 1 and result.n_pruned == 1
    # The finished trial reported at every evaluation step and at the end; its value is the last.
    assert sorted(full.intermediate_values) == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    assert full.value == full.intermediate_values[STEPS]
    # The pruned one stopped at a training step before the last, lagging the finished trial there.
    stop = max(pruned.intermediate_values)
    assert stop < STEPS and sorted(pruned.intermediate_values) == list(range(EVAL_EVERY, stop + 1, EVAL_EVERY))
    assert pruned.intermediate_values[stop] > full.intermediate_values[stop]

    _, runs = _mlflow_runs("weights")
    by_name = {r.info.run_name: r for r in runs}
    run = by_name["trial-0001"]
    assert run.info.status == "KILLED" and run.data.tags["arforge.trial_state"] == "PRUNED"
    # Training itself stopped there: no logged step and no checkpoint after it.
    assert max(_history(run.info.run_id, "train/loss")) == stop
    assert sorted(_history(run.info.run_id, "val/nll")) == sorted(pruned.intermediate_values)
    assert all(math.isclose(v, pruned.intermediate_values[s], rel_tol=1e-6)
               for s, v in _history(run.info.run_id, "val/nll").items())
    out = _home() / "outputs" / "weights"
    saved = sorted(int(re.match(r"step_(\d+)", p.name).group(1))
                   for p in (out / "trial-0001" / "checkpoints").glob("step_*"))
    assert saved and max(saved) == stop, saved  # saved before the report that pruned it
    full_saved = [p.name for p in (out / "trial-0000" / "checkpoints").glob("step_*")]
    assert f"step_{STEPS:08d}" in full_saved
    # train/nll is the unweighted likelihood: the weights enter train/loss only.
    full_run = by_name["trial-0000"]
    assert set(_history(full_run.info.run_id, "train/nll")) == set(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    # The study's plots include the intermediate values (the pruned trial's curve among them).
    assert any(p.name == "intermediate_values.png" for p in result.plots), result.plots
