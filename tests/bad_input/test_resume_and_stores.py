"""Bad input around resuming, stores and the CLI, from a user's point of view (issue 16, classes 4, 5, 7).

Each case runs ``arforge`` on a tiny launch file (``base.gin`` + the tiny VQ tokenizer preset on the
digits) and checks: a nonzero exit (or the documented recovery), no Python traceback, a message that
names the file/option/binding and what to do, and nothing lost (outputs, checkpoints, MLflow runs).
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from arforge import cli

pytestmark = [pytest.mark.plumbing, pytest.mark.usefixtures("one_thread")]

LAUNCH = """
    include "base.gin"
    include "tokenizers/tiny_vq.gin"
    launch.experiment = "drift"
    launch.run_name = "tok"
    launch.job = @jobs.train_tokenizer
    launch.device = "cpu"
    jobs.train_tokenizer.dataset = @train/datasets.digits()
    jobs.train_tokenizer.val_dataset = @val/datasets.digits()
    train/datasets.digits.split = "train"
    val/datasets.digits.split = "val"
    datasets.digits.image_size = 16
    jobs.train_tokenizer.steps = 2
    jobs.train_tokenizer.batch_size = 8
    jobs.train_tokenizer.eval_images = 8
"""


def _launch_file(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    f = folder / "tok.gin"
    f.write_text(textwrap.dedent(LAUNCH).lstrip())
    return f


def _arforge(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def _runs(home: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("drift")
    return [] if exp is None else client.search_runs([exp.experiment_id])


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (the lock file next to it is not part of a run's outputs)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished tiny run (its ARFORGE_HOME is copied by each test that needs one)."""
    root = tmp_path_factory.mktemp("trained")
    old = os.environ.get("ARFORGE_HOME")
    os.environ["ARFORGE_HOME"] = str(root / "home")
    # Set up before any test's clean environment: a tracking URI left by an earlier test in
    # this worker would send the run to another store.
    leaked_uri = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        assert cli.main(["run", str(_launch_file(root))]) == 0
    finally:
        if leaked_uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = leaked_uri
        if old is None:
            os.environ.pop("ARFORGE_HOME", None)
        else:
            os.environ["ARFORGE_HOME"] = old
    return root / "home"


@pytest.fixture
def home(trained, tmp_path, monkeypatch):
    """This test's ARFORGE_HOME: a copy of the finished run, which a kill left RUNNING (a killed
    launch never writes its final status), so the next launch resumes it."""
    h = tmp_path / "home"
    shutil.copytree(trained, h)
    monkeypatch.setenv("ARFORGE_HOME", str(h))
    state_file = h / "outputs" / "drift" / "tok" / "run.json"
    state = json.loads(state_file.read_text())
    state["status"] = "RUNNING"
    state_file.write_text(json.dumps(state))
    return h


@pytest.fixture
def gin_file(tmp_path):
    return _launch_file(tmp_path / "exp")


def _out(home: Path) -> Path:
    return home / "outputs" / "drift" / "tok"


# ------------------------------------------------------------------ resume drift
def test_resume_with_a_lower_lr_prints_and_tags_the_change(home, gin_file, capsys):
    run_id = json.loads((_out(home) / "run.json").read_text())["run_id"]
    code, text = _arforge(capsys, "run", str(gin_file), "--bind", "jobs.train_tokenizer.lr = 5e-4",
                          "--bind", "jobs.train_tokenizer.steps = 3")
    assert code == 0, text
    assert "Traceback" not in text
    assert "jobs.train_tokenizer.lr: 0.001 -> 0.0005" in text
    assert "jobs.train_tokenizer.steps: 2 -> 3" in text
    assert "resumed from" in text  # the change did not start the run over
    runs = _runs(home)
    assert [r.info.run_id for r in runs] == [run_id]  # the same MLflow run goes on
    tags = runs[0].data.tags
    assert tags["resume.changed.jobs.train_tokenizer.lr"] == "0.001 -> 0.0005"
    assert tags["resume.changed.jobs.train_tokenizer.steps"] == "2 -> 3"
    assert runs[0].data.params["jobs.train_tokenizer.lr"] == "0.001"  # params keep the first value
    state = json.loads((_out(home) / "run.json").read_text())
    assert state["status"] == "FINISHED"
    assert state["bindings"]["jobs.train_tokenizer.lr"] == "0.0005"  # the next resume compares with this


def test_resume_with_another_architecture_is_refused(home, gin_file, capsys):
    before = _snapshot(_out(home))
    code, text = _arforge(capsys, "run", str(gin_file), "--bind", "quantizers.vq.codebook_size = 32")
    assert code == 2, text
    assert "Traceback" not in text and "In call to configurable" not in text
    assert str(_out(home) / "run.json") in text
    assert "quantizers.vq.codebook_size: 64 -> 32" in text
    assert "launch.resume = 'never'" in text and "launch.run_name" in text
    assert _snapshot(_out(home)) == before  # checkpoints and run.json untouched
    assert len(_runs(home)) == 1 and _runs(home)[0].info.status == "FINISHED"


def test_truncated_run_json_is_a_clear_error_and_resume_never_recovers(home, gin_file, capsys):
    state_file = _out(home) / "run.json"
    state_file.write_text(state_file.read_text()[:40])  # cut short by a crash mid-write
    before = _snapshot(_out(home))
    code, text = _arforge(capsys, "run", str(gin_file))
    assert code == 2, text
    assert "Traceback" not in text and "JSONDecodeError" not in text
    assert f"{state_file} is corrupt" in text and "launch.resume = 'never'" in text
    assert _snapshot(_out(home)) == before

    code, text = _arforge(capsys, "run", str(gin_file), "--bind", "launch.resume = 'never'")
    assert code == 0, text
    kept = [p for p in _out(home).parent.iterdir() if p.name.startswith("tok-")]
    assert len(kept) == 1 and _snapshot(kept[0]) == before  # the old outputs were moved aside, whole
    assert json.loads(state_file.read_text())["status"] == "FINISHED"
    assert len(_runs(home)) == 2


def test_second_launch_of_a_running_run_is_refused(home, gin_file, capsys):
    """A launch holds the run while it runs: a second one (another terminal) is refused."""
    lock_file = _out(home).parent / ".tok.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, os, sys
            fh = open({str(lock_file)!r}, "a+")
            fcntl.flock(fh, fcntl.LOCK_EX)
            fh.seek(0); fh.truncate(); fh.write(str(os.getpid())); fh.flush()
            print("locked", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _snapshot(_out(home))
        code, text = _arforge(capsys, "run", str(gin_file))
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert code == 2, text
    assert "Traceback" not in text
    assert f"run 'tok' ({_out(home)}) is already running in process {holder.pid}" in text
    assert "another launch.run_name" in text
    assert _snapshot(_out(home)) == before
    assert _runs(home)[0].info.status == "FINISHED"  # the other launch's MLflow run was not taken over


def test_killed_run_resumes_over_its_stale_lock_and_removes_dead_tmp_folders(home, gin_file, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (_out(home).parent / ".tok.lock").write_text(f"{dead.pid}\n")  # the killed launch's lock
    ckpts = _out(home) / "checkpoints"
    stale = ckpts / f".step_00000003.tmp-{dead.pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a file")
    alive = ckpts / f".step_00000009.tmp-{os.getppid()}"  # a live process's folder stays
    alive.mkdir()
    code, text = _arforge(capsys, "run", str(gin_file), "--bind", "jobs.train_tokenizer.steps = 3")
    assert code == 0, text
    assert "Traceback" not in text and "resumed from" in text
    assert not stale.exists() and alive.is_dir()
    assert (ckpts / "step_00000002").is_dir() and (ckpts / "step_00000003").is_dir()


# ------------------------------------------------------------------ stores
class _NotFound(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def server_404():
    server = http.server.HTTPServer(("127.0.0.1", 0), _NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _finished(home: Path) -> None:
    state_file = _out(home) / "run.json"
    state = json.loads(state_file.read_text())
    state["status"] = "FINISHED"  # a rerun would move these outputs aside: the store comes first
    state_file.write_text(json.dumps(state))


@pytest.mark.parametrize("case", ["404", "scheme", "sqlite_under_file", "missing_driver", "unreachable_db"])
def test_bad_tracking_store_is_one_line_and_touches_nothing(case, home, gin_file, tmp_path, monkeypatch,
                                                            capsys, request):
    _finished(home)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    if case == "404":
        uri, expect = request.getfixturevalue("server_404"), "answered HTTP 404: no MLflow tracking server"
    elif case == "scheme":
        uri, expect = "htp://127.0.0.1:5000", "unknown scheme 'htp'. Did you mean http://?"
    elif case == "sqlite_under_file":
        uri, expect = f"sqlite:///{blocker}/mlflow.db", f"{blocker} is a file, not a folder"
    elif case == "missing_driver":
        pytest.importorskip("sqlalchemy")
        import importlib.util

        if importlib.util.find_spec("pymysql") is not None:
            pytest.skip("pymysql is installed")
        uri, expect = "mysql+pymysql://u:secret@127.0.0.1/db", "pip install pymysql"
    else:
        pytest.importorskip("psycopg2")
        uri, expect = "postgresql+psycopg2://u:secret@127.0.0.1:1/db", "cannot connect to the database"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    before = _snapshot(home)
    code, text = _arforge(capsys, "run", str(gin_file))
    assert code == 2, text
    assert "Traceback" not in text and "secret" not in text
    assert "MLFLOW_TRACKING_URI" in text and expect in text
    assert len([line for line in text.splitlines() if line.startswith("arforge: error:")]) == 1
    assert _snapshot(home) == before  # previous outputs not moved aside, embedded store untouched
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert len(_runs(home)) == 1


def test_unreachable_study_database_is_one_line(tmp_path, capsys):
    pytest.importorskip("psycopg2")
    study = _study_files(tmp_path)
    code, text = _arforge(capsys, "study", str(study), "--storage", "postgresql://u:secret@127.0.0.1:1/db")
    assert code == 2, text
    assert "Traceback" not in text and "secret" not in text
    assert "study storage (--storage)" in text and "cannot connect to the database" in text


def test_study_storage_under_a_file_is_one_line(tmp_path, capsys):
    study = _study_files(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, text = _arforge(capsys, "study", str(study), "--storage", f"sqlite:///{blocker}/optuna.db")
    assert code == 2, text
    assert "Traceback" not in text
    assert "study storage (--storage)" in text and f"{blocker} is a file" in text


# ------------------------------------------------------------------ small things
def _study_files(tmp_path: Path, *, n_trials: int = 5) -> Path:
    """A CFG-like study over a stage whose tokenizer has not been trained yet."""
    (tmp_path / "extract.gin").write_text(textwrap.dedent("""
        include "base.gin"
        include "tokenizers/tiny_vq.gin"
        launch.experiment = "early"
        launch.job = @jobs.extract_codes
        launch.device = "cpu"
        jobs.extract_codes.tokenizer = @tokenizer/loaders.arforge_checkpoint()
        tokenizer/loaders.arforge_checkpoint.module = %TOKENIZER
        tokenizer/loaders.arforge_checkpoint.checkpoint = "outputs:early/tokenizer/checkpoints"
        jobs.extract_codes.dataset = @train/datasets.digits()
        train/datasets.digits.split = "train"
        train/datasets.digits.transform = "to_tensor"
        datasets.digits.image_size = 16
        jobs.extract_codes.output_dir = "pipeline:codes"
        jobs.extract_codes.image_size = 16
        jobs.extract_codes.ten_crop = False
        jobs.extract_codes.flips = False
    """).lstrip())
    study = tmp_path / "study.gin"
    study.write_text(textwrap.dedent(f"""
        import arforge.studies
        study.launch_file = "extract.gin"
        study.study_name = "early"
        study.objective = "n_codes"
        study.direction = "minimize"
        study.n_trials = {n_trials}
        study.sampler = "random"
        study.seed = 0
        study.space = {{"jobs.extract_codes.batch_size": @space.int()}}
        space.int.low = 8
        space.int.high = 16
    """).lstrip())
    return study


def test_study_before_its_model_exists_stops_after_one_trial(tmp_path, capsys):
    import optuna

    from arforge import studies

    study = _study_files(tmp_path)
    code, text = _arforge(capsys, "study", str(study))
    assert code == 2, text
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if line.startswith("arforge: error:")]
    assert len(errors) == 1 and "outputs/early/tokenizer/checkpoints" in errors[0]
    trials = optuna.load_study(study_name="early", storage=studies.open_storage()).get_trials()
    assert [t.state.name for t in trials] == ["FAIL"]  # not five failing trials


def test_arforge_home_that_is_a_file(tmp_path, gin_file, monkeypatch, capsys):
    f = tmp_path / "home_file"
    f.write_text("oops")
    monkeypatch.setenv("ARFORGE_HOME", str(f))
    code, text = _arforge(capsys, "run", str(gin_file))
    assert code == 2, text
    assert "Traceback" not in text
    assert f"ARFORGE_HOME = {f} cannot be a folder" in text and "Point ARFORGE_HOME at a folder" in text
    assert f.read_text() == "oops"


def test_plugins_into_a_closed_pipe_is_quiet(tmp_path):
    """``arforge plugins | head -0``: the reader is gone before the list is written."""
    proc = subprocess.Popen([sys.executable, "-m", "arforge.cli", "plugins"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=tmp_path,
                            env={**os.environ, "ARFORGE_HOME": str(tmp_path / "h")})
    proc.stdout.close()
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err
    assert code == 141  # 128 + SIGPIPE, like any Unix tool whose reader went away
