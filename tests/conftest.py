"""Shared fixtures: every test gets its own embedded MLflow/Optuna home and a clean gin state."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs two workers on two cores: one intra-op thread each, or OpenMP barriers
    # stall every small op (a user's own OMP_NUM_THREADS still wins). torch is not imported yet.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    """Every test is ``numeric`` unless its module is marked ``plumbing``.

    ``tests/test_portability.py`` re-runs the numeric tests under other CPU kernels and another
    thread count; a new test module is covered by default and opts out only by saying that it tests
    configuration, command lines, tracking or files.
    """
    for item in items:
        if item.get_closest_marker("plumbing") is None:
            item.add_marker("numeric")
    # Longest modules first (pytest-xdist hands out whole modules in this order, kept by
    # --no-loadscope-reorder in pyproject.toml; by default it reorders by test count): the portability
    # re-run and the multi-process tests overlap the many short modules on the other worker
    # instead of one of them running alone at the end.
    first = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))


#: the modules that take longest on two cores, longest first (measured with --durations)
_LONGEST_FIRST = ("test_portability.py", "test_tokenizer_two_ranks.py", "test_torchrun_launch.py",
                  "test_ar_two_ranks.py", "test_studies.py", "test_studies_journal.py",
                  "test_tokenizer_trainer.py", "test_launch_files.py")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Runs write to a per-test ``ARFORGE_HOME``; no tracking server leaks in."""
    monkeypatch.setenv("ARFORGE_HOME", str(tmp_path / "arforge_runs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("ARFORGE_GIN_PATH", raising=False)
    yield
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; monkeypatch restores only what it saw
    # set, so a URI a test left behind would reach the next module fixture (set up before the
    # next test's clean environment) and send its runs to that test's store.
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(autouse=True)
def _clean_gin():
    """gin state is global: clear it around every test."""
    try:
        import gin
    except ImportError:  # pragma: no cover
        yield
        return
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture
def one_thread():
    """Tiny shapes gain nothing from intra-op threads, and on a busy 2-core machine OpenMP
    barriers can stall every small op for a scheduler time slice. Opt in per module with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``.

    Not in ``tests/test_portability.py``'s re-run, whose point is the other thread count."""
    import torch

    if os.environ.get("ARFORGE_OTHER_KERNELS"):
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
