"""`arforge compare`: the runs of an experiment sorted by a metric, differing params only, a plot."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from arforge import cli, launch
from arforge import registry as reg
from test_studies import seed_mlflow_store

pytestmark = pytest.mark.plumbing  # no floating-point result compared across kernels


def compare_toy(ctx, *, lr: float = 0.1, width: int = 4, label: str = "a"):
    """Logs fid = 10 * |lr - 0.3| + 1, except for lr >= 0.5 (a run that never got to its FID)."""
    if lr < 0.5:
        ctx.tracker.log_metrics({"fid": 10.0 * abs(lr - 0.3) + 1.0})
    ctx.tracker.log_metrics({"loss": lr})
    return {}


@pytest.fixture()
def experiment(tmp_path):
    reg.registry().register("jobs", "compare_toy", compare_toy)
    seed_mlflow_store(Path(os.environ["ARFORGE_HOME"]))
    f = tmp_path / "toy.gin"
    f.write_text(textwrap.dedent("""
        launch.experiment = "cmp"
        launch.job = @jobs.compare_toy
        launch.device = "cpu"
        jobs.compare_toy.width = 4
    """))
    # run -> lr (fid): a 0.45 (2.5), b 0.3 (1.0), c 0.2 (2.0), d 0.6 (no fid)
    for name, lr in [("a", 0.45), ("b", 0.3), ("c", 0.2), ("d", 0.6)]:
        launch.run_file(f, [f"launch.run_name = 'run-{name}'", f"jobs.compare_toy.lr = {lr}"])
    return "cmp"


def _table(out: str) -> list[list[str]]:
    lines = [ln for ln in out.splitlines() if ln.strip()]
    rows = []
    end = next((i for i, x in enumerate(lines) if x.startswith("plot:")), len(lines))
    for ln in lines[:end]:
        rows.append(ln.split())
    return rows


def test_compare_sorts_shows_only_differing_params_and_plots(experiment, capsys):
    import mlflow
    from mlflow.tracking import MlflowClient

    from arforge import tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())

    def store_state():
        runs = mlflow.search_runs(experiment_names=[experiment], output_format="list", max_results=100)
        return {r.info.run_id: (r.info.status, sorted(a.path for a in MlflowClient().list_artifacts(r.info.run_id)))
                for r in runs}

    before = store_state()
    assert cli.main(["compare", experiment, "--metric", "fid"]) == 0
    out = capsys.readouterr().out
    rows = _table(out)
    assert rows[0] == ["#", "run", "status", "fid", "jobs.compare_toy.lr"]
    # Ascending fid, the run without fid last; width (constant) and run_name are not shown.
    assert [r[1] for r in rows[1:]] == ["run-b", "run-c", "run-a", "run-d"]
    assert [r[3] for r in rows[1:]] == ["1", "2", "2.5", "-"]
    assert [r[4] for r in rows[1:]] == ["0.3", "0.2", "0.45", "0.6"]
    assert "width" not in out and "run_name" not in rows[0]
    # Reading writes nothing: no run, no artifact, no plot file.
    assert store_state() == before and not (tracking.home() / "compare").exists() and "plot:" not in out

    assert cli.main(["compare", experiment, "--metric", "fid", "--plot", "--log"]) == 0
    out = capsys.readouterr().out
    png = tracking.home() / "compare" / "cmp-fid.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot: {png} (fid vs jobs.compare_toy.lr)" in out
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list", max_results=100)
    holder = [r for r in runs if r.data.tags.get("arforge.role") == "compare"]
    assert len(holder) == 1 and holder[0].info.run_name == "compare"
    assert [a.path for a in MlflowClient().list_artifacts(holder[0].info.run_id, "compare")] == ["compare/cmp-fid.png"]

    # Descending keeps the missing metric last; the compare run itself is never listed; --plot
    # alone writes the file and logs nothing.
    assert cli.main(["compare", experiment, "--metric", "fid", "--descending", "--plot",
                     str(tracking.home() / "desc.png")]) == 0
    out = capsys.readouterr().out
    assert [r[1] for r in _table(out)[1:]] == ["run-a", "run-c", "run-b", "run-d"]
    assert (tracking.home() / "desc.png").is_file()
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list", max_results=100)
    assert len([r for r in runs if r.data.tags.get("arforge.role") == "compare"]) == 1
    assert len(MlflowClient().list_artifacts(holder[0].info.run_id, "compare")) == 1


def test_compare_formats(experiment, capsys):
    import csv
    import io
    import json

    assert cli.main(["compare", experiment, "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["run"] for r in records] == ["run-b", "run-c", "run-a", "run-d"]
    assert records[0]["fid"] == pytest.approx(1.0) and records[-1]["fid"] is None
    assert records[0]["params"] == {"jobs.compare_toy.lr": "0.3"} and records[0]["job"] == "jobs.compare_toy"
    assert cli.main(["compare", experiment, "--format", "csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["jobs.compare_toy.lr"] for r in table] == ["0.3", "0.2", "0.45", "0.6"] and table[-1]["fid"] == ""
    assert cli.main(["compare", experiment, "--format", "markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| run | job | status | fid | jobs.compare_toy.lr |" and lines[1] == "|---|---|---|---|---|"
    assert lines[2] == "| run-b | jobs.compare_toy | FINISHED | 1 | 0.3 |"


def test_compare_cuts_long_values_and_rounds_to_four_digits(tmp_path, capsys):
    reg.registry().register("jobs", "compare_toy", compare_toy)
    seed_mlflow_store(Path(os.environ["ARFORGE_HOME"]))
    f = tmp_path / "toy.gin"
    f.write_text(textwrap.dedent("""
        launch.experiment = "long"
        launch.job = @jobs.compare_toy
        launch.device = "cpu"
    """))
    for i, lr in enumerate([0.123456789, 0.2987654321]):
        launch.run_file(f, [f"launch.run_name = 'run-{i}'", f"jobs.compare_toy.lr = {lr}",
                            f"jobs.compare_toy.label = '{str(i) * 300}'"])
    capsys.readouterr()
    assert cli.main(["compare", "long"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) < 120, out
    assert "0.1235" in out and "0.123456789" not in out and "2.765 " in out  # fid = 10 |lr - 0.3| + 1
    assert "'" + "0" * 22 + "…" in out  # cut to 24 characters


def test_compare_user_mistakes_are_one_line_errors(experiment, capsys):
    assert cli.main(["compare", "cpm"]) == 2
    err = capsys.readouterr().err
    assert "no MLflow experiment 'cpm'" in err and "did you mean 'cmp'?" in err and "Traceback" not in err
    assert cli.main(["compare", experiment, "--metric", "fdi"]) == 2
    err = capsys.readouterr().err
    assert "logged metric 'fdi'" in err and "fid, loss" in err
    assert cli.main(["compare", experiment, "--metric", "fid", "--param", "width"]) == 2
    err = capsys.readouterr().err
    assert "--param 'width' is not a parameter that differs" in err and "jobs.compare_toy.lr" in err
