"""``torchrun --nproc_per_node 2 -m arforge.cli run experiments/llamagen/1_tokenizer.gin`` at the
tiny overrides of ``tiny_launches``: it trains on 2 ranks, checkpoints, is killed after its
step-2 checkpoint, and the same command resumes it to the end, logging once (rank 0) to one
MLflow run.

The kill is ``os._exit`` on every rank right after the checkpoint of step 2 (what a SIGKILL
leaves: no cleanup, no MLflow run end), installed by a ``sitecustomize`` on the workers'
``PYTHONPATH`` only for the first command; arforge itself is not told.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tiny_launches as tl
from tiny_launches import llamagen

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4

_DIE_AFTER_SAVE = textwrap.dedent("""
    import os

    if os.environ.get("ARFORGE_TEST_DIE_AFTER_STEP"):
        from arforge.trainers import common

        _save, _at = common.TrainLoop.save, int(os.environ["ARFORGE_TEST_DIE_AFTER_STEP"])

        def save(self):
            path = _save(self)
            if self.step == _at:
                os._exit(9)
            return path

        common.TrainLoop.save = save
""")


def _torchrun(binds: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "arforge.cli", "run", str(ROOT / "experiments/llamagen/1_tokenizer.gin")]
    for b in binds:
        cmd += ["--bind", b]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)


@pytest.mark.plumbing
def test_tokenizer_launch_under_torchrun_trains_checkpoints_resumes_and_logs_once(tmp_path):
    from mlflow.tracking import MlflowClient

    from arforge import checkpoint as ck

    lf = tl.describe(ROOT / "experiments/llamagen/1_tokenizer.gin")
    world = tl.World(tmp_path / "world")
    binds = llamagen.bindings(lf, world) + [f"jobs.train_tokenizer.steps = {STEPS}",
                                            "jobs.train_tokenizer.save_every = 2",
                                            "jobs.train_tokenizer.log_every = 1"]
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_DIE_AFTER_SAVE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ARFORGE_"))}
    env.update(ARFORGE_HOME=str(world.home), OMP_NUM_THREADS="1")

    killed = _torchrun(binds, dict(env, ARFORGE_TEST_DIE_AFTER_STEP="2",
                                   PYTHONPATH=os.pathsep.join([str(hook), env.get("PYTHONPATH", "")])))
    assert killed.returncode != 0, killed.stdout + killed.stderr
    runs_dir = world.home / "outputs" / "llamagen"
    out = next(p for p in runs_dir.iterdir() if p.name.startswith("tokenizer"))
    assert [p.name for p in sorted((out / "checkpoints").iterdir()) if p.name.startswith("step_")] == ["step_00000002"]

    done = _torchrun(binds, env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resum" in (done.stdout + done.stderr).lower()
    loaded = ck.load_checkpoint(out / "checkpoints")
    assert loaded.step == STEPS and {"model", "loss"} <= loaded.weights.keys()

    client = MlflowClient(tracking_uri=f"sqlite:///{world.home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("llamagen")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]  # rank 1 never opened a run; the resume reused it
    run = runs[0]
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    # One value per step, from rank 0 only: steps 1-2 before the kill, 3-4 after the resume.
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
