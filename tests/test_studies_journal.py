"""Studies on Optuna's file journal (``journal:///path/study.log``): the storage named in the study
file or by --storage, heartbeats on the journal, and two workers of which one is killed mid-trial."""

from __future__ import annotations

import os
import signal

import pytest

from arforge import registry as reg
from arforge import studies
from arforge.studies.storage import HeartbeatJournalStorage, StudyError
from test_studies import (_load, _mlflow_runs, _poll, _start_worker, _study_files, seed_mlflow_store,
                          studyquad)

pytestmark = pytest.mark.plumbing  # storage and processes: nothing numeric


@pytest.fixture(autouse=True)
def _toy_job():
    reg.registry().register("jobs", "studyquad", studyquad)


def test_study_file_names_a_journal_relative_to_itself(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("ARFORGE_HOME", str(home))
    seed_mlflow_store(home)
    monkeypatch.chdir(tmp_path)
    f = _study_files(tmp_path, n_trials=3, name="journal1", extra_study='study.storage = "journal://store/j.log"')
    result = studies.run_study(f, verbose=False, plots=False)
    log = (tmp_path / "studies" / "store" / "j.log").resolve()
    assert result.storage == f"journal://{log}" and log.is_file()
    assert not (home / "optuna.db").exists()  # the default SQLite store was not used
    st = _load("journal1", f"journal://{log}")
    assert isinstance(st._storage, HeartbeatJournalStorage)  # noqa: SLF001
    assert [t.state.name for t in st.get_trials()] == ["COMPLETE"] * 3
    assert all(isinstance(t.system_attrs[HeartbeatJournalStorage.BEAT], float) for t in st.get_trials())
    assert not list(log.parent.glob("*.lock"))  # every lock released
    # --storage wins over the study file; a folder is not a journal file.
    with pytest.raises(StudyError, match=r"is a folder; name the journal file in it"):
        studies.run_study(f, storage=f"journal://{tmp_path}", verbose=False, plots=False)


def test_two_workers_on_a_journal_one_killed_mid_trial_reach_the_trial_count(tmp_path, monkeypatch):
    n = 4
    home = tmp_path / "home"
    monkeypatch.setenv("ARFORGE_HOME", str(home))
    seed_mlflow_store(home)
    started, gate, fifo = tmp_path / "started", tmp_path / "gate", tmp_path / "hold.fifo"
    started.mkdir()
    os.mkfifo(fifo)
    f = _study_files(tmp_path, n_trials=n, name="journal2", extra_launch=f"""
        jobs.studyquad.started_dir = "{started}"
        jobs.studyquad.gate = "{gate}"
    """)
    log = tmp_path / "shared" / "study.log"
    args = ["--storage", f"journal://{log}", "--heartbeat", "1", "--grace", "2"]
    doomed = _start_worker(tmp_path, f, "worker0.log", *args, "--bind", f'jobs.studyquad.hold = "{fifo}"')
    rescuer = _start_worker(tmp_path, f, "worker1.log", *args)
    procs = [doomed, rescuer]
    try:
        # Both workers inside a trial of the same journal before any trial may finish.
        _poll(lambda: len({p.name.split(".")[1] for p in started.iterdir()}) == 2, "both workers to start a trial",
              procs, tmp_path=tmp_path)
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.wait(timeout=60)
        gate.touch()
        rescuer.wait(timeout=240)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert rescuer.returncode == 0, (tmp_path / "worker1.log").read_text()[-4000:]

    trials = _load("journal2", f"journal://{log}").get_trials()
    victims = [t for t in trials if t.user_attrs.get("arforge.worker", "").endswith(f":{doomed.pid}")]
    assert len(victims) == 1, [(t.number, t.state.name, t.user_attrs) for t in trials]
    victim = victims[0]
    # Failed by the rescuer's heartbeat check (not by an exception), and its parameters re-run once.
    assert victim.state.name == "FAIL" and not victim.user_attrs.get("arforge.error")
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE" and retries[0].params == victim.params
    assert sum(t.state.name == "COMPLETE" for t in trials) == n and len(trials) == n + 1  # exactly the count
    assert all(t.user_attrs["arforge.worker"].endswith(f":{rescuer.pid}") for t in trials if t is not victim)
    parents, runs = _mlflow_runs("journal2", home)
    by_name = {r.info.run_name: r for r in runs}
    assert by_name[f"trial-{victim.number:04d}"].info.status == "FAILED"  # closed, not left RUNNING
    assert by_name[f"trial-{retries[0].number:04d}"].data.tags["arforge.retry_of"] == str(victim.number)
    assert parents[0].info.status == "FINISHED" and parents[0].data.metrics["n_complete"] == n
