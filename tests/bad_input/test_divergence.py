"""Training that diverges (NaN/inf) stops the run cleanly and loses nothing.

From a user's point of view, through ``arforge run``: a divergence at the last step ends the
run FAILED with exit status 2, one message (no traceback) naming the step, the non-finite
tensor, the last *finite* checkpoint and what to do; that checkpoint is intact, and rerunning
with a lower learning rate resumes from it and finishes. A learning rate that overflows
float32 is named instead of surfacing torch's RuntimeError.

A divergence is simulated where it happens in real training -- inside the optimizer update,
above a learning-rate threshold, after a finite loss -- so each case is exact and cheap.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

from arforge import checkpoint as ck

pytestmark = [pytest.mark.plumbing, pytest.mark.usefixtures("one_thread")]

STEPS, SAVE_EVERY = 4, 2
DIVERGING_LR = 0.05  # the simulated optimizer diverges at the last step at or above this lr

COMMON = """
include "models/tiny_llamagen.gin"
include "tokenizers/tiny_vq.gin"
launch.experiment = "divergence"
launch.device = "cpu"
datasets.digits.image_size = 8          # 4 x 4 tokens from the tiny VQ tokenizer
"""

AR = COMMON + """
launch.run_name = "ar"
launch.job = @jobs.train_ar
models.llamagen_gpt.vocab_size = 64
models.llamagen_gpt.block_size = 16
models.llamagen_gpt.num_classes = 10
jobs.train_ar.model = %MODEL
jobs.train_ar.tokenizer = %TOKENIZER
jobs.train_ar.dataset = @datasets.digits()
jobs.train_ar.steps = 4
jobs.train_ar.batch_size = 8
jobs.train_ar.save_every = 2
jobs.train_ar.log_every = 1
jobs.train_ar.log_checkpoint = False
jobs.train_ar.lr = 0.1
"""

TOKENIZER = COMMON + """
launch.run_name = "tokenizer"
launch.job = @jobs.train_tokenizer
jobs.train_tokenizer.dataset = @datasets.digits()
jobs.train_tokenizer.steps = 4
jobs.train_tokenizer.batch_size = 8
jobs.train_tokenizer.save_every = 2
jobs.train_tokenizer.log_every = 1
jobs.train_tokenizer.log_checkpoint = False
jobs.train_tokenizer.lr = 0.1
"""


def _write(tmp_path: Path, text: str, name: str) -> Path:
    f = tmp_path / name
    f.write_text(textwrap.dedent(text).lstrip())
    return f


def _run(capsys, f: Path, *binds: str) -> tuple[int, str]:
    from arforge.cli import main

    argv = ["run", str(f)]
    for b in binds:
        argv += ["--bind", b]
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out + out.err


def _diverge_at_last_step(monkeypatch, cls, poison):
    """``cls.step`` runs as usual, then at the last step and a high lr ``poison(optimizer)``
    writes the NaN that a diverged update leaves behind."""
    real = cls.step

    def step(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        done = int(next(iter(self.state.values()))["step"])
        if done == STEPS and self.param_groups[0]["lr"] >= DIVERGING_LR:
            poison(self)
        return out

    monkeypatch.setattr(cls, "step", step)


def _nan_weights(opt):
    with torch.no_grad():
        opt.param_groups[0]["params"][0].fill_(float("nan"))


def _nan_moments(opt):  # the weights stay finite: only the saved optimizer state is poisoned
    opt.state[opt.param_groups[0]["params"][0]]["exp_avg"].fill_(float("nan"))


def _mlflow_status() -> tuple[str, str]:
    import mlflow

    from arforge import launch, tracking

    run_id, _ = launch.last_run()
    tracking.configure()
    return run_id, mlflow.tracking.MlflowClient().get_run(run_id).info.status


def _assert_finite(path: Path) -> ck.Checkpoint:
    loaded = ck.load_checkpoint(path)  # verifies sizes and SHA-256
    for name, sd in loaded.weights.items():
        for k, v in sd.items():
            assert not v.is_floating_point() or torch.isfinite(v).all(), (name, k)
    assert ck.first_non_finite(loaded.state) is None
    return loaded


def _assert_stopped(code: int, text: str, f: Path, out: Path, *, names: str, option: str):
    assert code == 2, text[-3000:]
    assert "Traceback" not in text
    err = text[text.index("arforge: error: "):]
    good = out / "checkpoints" / f"step_{SAVE_EVERY:08d}"
    assert f"step {STEPS}" in err and names in err, err
    assert f"Last finite checkpoint (verified): {good}" in err, err
    assert f"arforge run {f} --bind '{option} = 0.01'" in err, err  # what to do, ready to paste
    # Nothing lost: the finite checkpoint is intact and nothing non-finite was written.
    assert [p.name for p in ck.list_checkpoints(out / "checkpoints")] == [good.name]
    assert _assert_finite(out / "checkpoints").step == SAVE_EVERY
    assert _mlflow_status()[1] == "FAILED"
    assert json.loads((out / "run.json").read_text())["status"] == "FAILED"


def test_ar_nan_weights_at_last_step_fail_the_run_and_keep_the_finite_checkpoint(tmp_path, capsys, monkeypatch):
    from arforge import launch

    _diverge_at_last_step(monkeypatch, torch.optim.AdamW, _nan_weights)
    f = _write(tmp_path, AR, "ar.gin")
    code, text = _run(capsys, f)
    _assert_stopped(code, text, f, launch.last_run()[1], names="model.", option="jobs.train_ar.lr")


def test_tokenizer_nan_optimizer_state_at_last_step_is_never_saved(tmp_path, capsys, monkeypatch):
    from arforge import launch

    _diverge_at_last_step(monkeypatch, torch.optim.Adam, _nan_moments)
    f = _write(tmp_path, TOKENIZER, "tok.gin")
    code, text = _run(capsys, f)
    _assert_stopped(code, text, f, launch.last_run()[1], names="exp_avg", option="jobs.train_tokenizer.lr")
    assert "refused to write checkpoint step_00000004" in text


def test_overflowing_learning_rate_is_named_not_a_raw_runtime_error(tmp_path, capsys):
    from arforge import launch

    f = _write(tmp_path, AR, "ar.gin")
    code, text = _run(capsys, f, "jobs.train_ar.lr = 1e39")
    assert code == 2, text[-3000:]
    assert "Traceback" not in text
    err = text[text.index("arforge: error: "):]
    assert "overflowed" in err and "step 1" in err and "lr=1e+39" in err, err
    assert f"arforge run {f} --bind 'jobs.train_ar.lr = 0.0001'" in err, err
    assert "Last finite checkpoint: none yet" in err, err
    assert ck.list_checkpoints(launch.last_run()[1] / "checkpoints") == []
    assert _mlflow_status()[1] == "FAILED"


def _plant_nan_checkpoint(good: Path, step: int) -> Path:
    """What the NaN guard used to leave behind: a complete, newer checkpoint of NaN weights."""
    from safetensors.torch import load_file, save_file

    bad = good.with_name(f"step_{step:08d}")
    shutil.copytree(good, bad)
    weights = load_file(str(bad / "model.safetensors"))
    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in weights.items()},
              str(bad / "model.safetensors"))
    meta = json.loads((bad / "meta.json").read_text())
    meta["step"] = step
    meta["files"]["model.safetensors"] = {"sha256": ck._sha256(bad / "model.safetensors"),  # noqa: SLF001
                                          "bytes": (bad / "model.safetensors").stat().st_size}
    (bad / "meta.json").write_text(json.dumps(meta))
    (good.parent / "latest").write_text(bad.name + "\n")
    return bad


def test_rerun_with_lower_lr_resumes_from_last_finite_checkpoint_and_finishes(tmp_path, capsys, monkeypatch):
    from arforge import launch

    _diverge_at_last_step(monkeypatch, torch.optim.AdamW, _nan_weights)
    f = _write(tmp_path, AR, "ar.gin")
    code, _ = _run(capsys, f)
    assert code == 2
    failed_id, out = launch.last_run()
    ckpts = out / "checkpoints"
    # A NaN checkpoint left by an older arforge (``latest`` points at it) is never resumed from.
    planted = _plant_nan_checkpoint(ckpts / f"step_{SAVE_EVERY:08d}", STEPS + 2)

    code, text = _run(capsys, f, "jobs.train_ar.lr = 0.01")
    assert code == 0, text[-3000:]
    assert f"resumed from {ckpts / f'step_{SAVE_EVERY:08d}'} at step {SAVE_EVERY}" in text
    assert f"not resuming from {planted}" in text and (ckpts / f"nonfinite-{planted.name}").is_dir()
    run_id, status = _mlflow_status()
    assert (run_id, status) == (failed_id, "FINISHED")  # the same MLflow run, continued
    final = _assert_finite(ckpts)
    assert final.step == STEPS


def test_save_checkpoint_refuses_nan_weights_and_optimizer_state(tmp_path):
    ok = {"model": {"w": torch.ones(3)}}
    with pytest.raises(ck.NonFiniteCheckpointError, match=r"step_00000003: model\.w holds NaN/inf"):
        ck.save_checkpoint(tmp_path / "c", 3, {"model": {"w": torch.tensor([1.0, float("nan")])}})
    moments = {"optimizers": {"opt": {"state": {0: {"exp_avg_sq": torch.tensor([float("inf")])}}}}}
    with pytest.raises(ck.NonFiniteCheckpointError, match=r"state\.optimizers\.opt\.state\.0\.exp_avg_sq"):
        ck.save_checkpoint(tmp_path / "c", 3, ok, moments)
    assert not (tmp_path / "c").exists()  # nothing half-written, no 'latest' moved
