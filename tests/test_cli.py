"""The CLI surface: argument checks before heavy imports, --version, plain-text help and plugin
descriptions, and `arforge ui` (loopback, the chosen port in every hint, no server left after SIGTERM)."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from arforge import __version__, cli, tracking

pytestmark = pytest.mark.plumbing  # no floating-point result compared across kernels

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "mlflow", "gin", "optuna")


def _main_in_subprocess(args: list[str], *, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    """`arforge ARGS` in a fresh interpreter that prints, after the command, which heavy modules it imported."""
    code = ("import sys\nfrom arforge import cli\nrc = cli.main(sys.argv[1:])\n"
            f"print('imported:', sorted(m for m in {HEAVY!r} if m in sys.modules))\nsys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


@pytest.mark.parametrize("args, what, suggestion, imported", [
    (["run", "experiments/quickstart/pipline.gin"], "launch file experiments/quickstart/pipline.gin",
     "experiments/quickstart/pipeline.gin", "[]"),
    # `study` builds its parser from arforge.studies (gin, Optuna), but reaches neither torch nor MLflow
    (["study", "experiments/quickstart/cfg_stuyd.gin", "--n-trials", "2"],
     "study file experiments/quickstart/cfg_stuyd.gin", "experiments/quickstart/cfg_study.gin", "['gin', 'optuna']"),
])
def test_a_mistyped_file_is_reported_before_heavy_imports(args, what, suggestion, imported):
    out = _main_in_subprocess(args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"arforge: error: {what} does not exist"), out.stderr
    assert f"Did you mean {suggestion}?" in lines[0] and "Give the path of a .gin file" in lines[0]
    assert f"imported: {imported}" in out.stdout, out.stdout


def test_malformed_bind_and_folder_are_reported_before_heavy_imports():
    out = _main_in_subprocess(["run", "experiments/quickstart/pipeline.gin", "--bind", "jobs.train_ar.steps 10"])
    assert out.returncode == 2 and "imported: []" in out.stdout, (out.stdout, out.stderr)
    assert "--bind 'jobs.train_ar.steps 10' is not a binding: write it as 'name.param = value'" in out.stderr
    out = _main_in_subprocess(["run", "experiments/quickstart"])
    assert out.returncode == 2 and "imported: []" in out.stdout
    assert "experiments/quickstart is a folder; give one of its .gin files: 1_tokenizer.gin" in out.stderr


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"arforge {__version__} (")


def _parsers(parser: argparse.ArgumentParser):
    yield "arforge", parser
    for action in parser._actions:  # noqa: SLF001  (argparse has no public walk of sub-parsers)
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for name, sub in action.choices.items():
                yield name, sub


def test_help_is_plain_text_and_every_option_has_help():
    parsers = dict(_parsers(cli.build_parser()))
    assert {"run", "plugins", "ui", "study", "compare"} <= set(parsers)
    for name, parser in parsers.items():
        text = parser.format_help()
        for markup in ("``", ":class:", ":func:", "docs/", "§"):
            assert markup not in text, (name, markup, text)
        for action in parser._actions:  # noqa: SLF001
            if action.option_strings or action.dest not in ("command", argparse.SUPPRESS):
                assert action.help and action.help != argparse.SUPPRESS, (name, action.option_strings or action.dest)
    assert "port to listen on" in parsers["ui"].format_help()


@pytest.mark.parametrize("text, plain", [
    ("Open-MAGVIT2 LFQ (docs/open_magvit2.md#lfq-and-token-ids): K sign bits per token.",
     "Open-MAGVIT2 LFQ: K sign bits per token."),
    ("LlamaGen VQ-16 (or IAR2), docs/llamagen.md#tokenizer, docs/iar2.md#tokenizer.", "LlamaGen VQ-16 (or IAR2)."),
    ("IAR2's CFG (docs/iar2.md#sampling; defaults: the IAR2 README, docs/llamagen.md#sampling-defaults).",
     "IAR2's CFG (defaults: the IAR2 README)."),
    ("A :class:`~arforge.losses.TokenizerLoss` from ``recipe`` (spec §4.2).", "A TokenizerLoss from recipe."),
    ("Images in webdataset ``.tar`` shards (jpg, png, ...).", "Images in webdataset .tar shards (jpg, png, ...)."),
    ("h (B, L, D) -> [(B, L, V)] fp32 (LlamaGen docs/llamagen.md#linear-head).", "h (B, L, D) -> [(B, L, V)] fp32 (LlamaGen)."),
])
def test_plain_text(text, plain):
    assert cli.plain_text(text) == plain


def test_plugins_list_plain_descriptions(capsys):
    assert cli.main(["plugins"]) == 0
    out = capsys.readouterr().out
    rows = out.splitlines()[1:]
    assert len(rows) > 40
    for markup in ("``", ":class:", "docs/", "§", ".md#"):
        assert markup not in out, markup
    lfq = next(r for r in rows if r.startswith("quantizers.lfq "))
    assert lfq.rstrip().endswith("Open-MAGVIT2 LFQ: K sign bits per token, ids (B, h*w, 1).")


def test_plugins_unknown_kind(capsys):
    assert cli.main(["plugins", "--kind", "quantizer"]) == 2
    err = capsys.readouterr().err
    assert "unknown kind 'quantizer'; did you mean 'quantizers'?" in err


def test_ui_binds_loopback_on_embedded_store(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "serve", lambda cmd, env=None: calls.append((cmd, env)) or 0)
    monkeypatch.setattr(cli, "_tag_training_view", lambda uri: None)
    assert cli.main(["ui", "--port", "5123"]) == 0
    cmd, env = calls[0]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--port") + 1] == "5123"
    assert cmd[cmd.index("--backend-store-uri") + 1] == tracking.tracking_uri()
    assert tracking.tracking_uri().startswith("sqlite:///") and tracking.tracking_uri().endswith("mlflow.db")
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert "http://127.0.0.1:5123/#/experiments?workflowType=machine_learning" in capsys.readouterr().out
    monkeypatch.setenv(cli.UI_PORT_ENV, "5124")  # the port the hints name is the default port too
    assert cli.main(["ui"]) == 0
    assert calls[1][0][calls[1][0].index("--port") + 1] == "5124"


def test_ui_hint_names_the_port_once_per_process(monkeypatch):
    monkeypatch.setattr(cli, "_HINTED", set())
    monkeypatch.setenv(cli.UI_PORT_ENV, "5124")
    hint = cli.ui_hint("quickstart")
    assert "`ARFORGE_HOME=" in hint and "arforge ui --port 5124`" in hint and "http://127.0.0.1:5124/" in hint
    assert tracking.tracking_uri() in hint and "experiment 'quickstart'" in hint
    assert cli.ui_hint("quickstart") is None  # every later stage or trial stays quiet
    monkeypatch.setattr(cli, "_HINTED", set())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert "tracking server http://tracking.example:5000" in cli.ui_hint()


# ------------------------------------------------------------------ `arforge ui` and SIGTERM
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid``, from /proc (psutil is not a dependency)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process tree from /proc")
def test_ui_stops_its_server_on_sigterm(tmp_path):
    port = _free_port()
    env = dict(os.environ, ARFORGE_HOME=str(tmp_path / "home"))
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "arforge.cli", "ui", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:  # wait until the server listens
            assert proc.poll() is None, proc.communicate()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the MLflow UI did not start listening within 90 s"
                time.sleep(0.1)
        server = _descendants(proc.pid)
        assert server, "arforge ui started no server process"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"http://127.0.0.1:{port}/" in out
    assert "stopped the MLflow server (SIGTERM)" in err
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in server) and time.monotonic() < deadline:  # orphans are reaped by init
        time.sleep(0.05)
    assert not [p for p in server if _alive(p)], "server processes left after SIGTERM"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()


def test_ui_marks_experiments_for_the_model_training_view():
    """MLflow 3 opens an experiment in its GenAI view unless the experiment says otherwise."""
    from mlflow.tracking import MlflowClient

    tracking.configure()  # the per-test embedded store (not MLflow's default ./mlflow.db)
    exp_id = tracking.ensure_experiment("cli-view")
    cli._tag_training_view(tracking.tracking_uri())
    tags = MlflowClient(tracking_uri=tracking.tracking_uri()).get_experiment(exp_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process tree from /proc")
def test_serve_kills_a_server_that_ignores_sigterm():
    """After the grace period the server's process group gets SIGKILL: nothing outlives `arforge ui`."""
    server = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); "
              "time.sleep(120)")
    code = f"import sys; from arforge import cli; sys.exit(cli.serve([sys.executable, '-c', {server!r}], grace=0.5))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"  # the server started, its SIGTERM handler set
        children = _descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "stopped the MLflow server (SIGTERM)" in err, err
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert children and not [p for p in children if _alive(p)]
