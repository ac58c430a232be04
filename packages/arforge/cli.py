"""The arforge command.

    arforge run EXPERIMENT.gin [--bind 'name.param = value' ...] [--dry-run]
    arforge plugins [--kind quantizers]
    arforge ui [--port 5000] [--host 127.0.0.1]
    arforge study STUDY.gin [--storage URL] [--n-trials N] [--bind ...]
    arforge compare EXPERIMENT [--metric fid] [--param NAME] [--plot [out.png]] [--log] [--format table|csv|markdown|json]
    arforge --version

User mistakes (gin typos, unknown plugins, bad checkpoints, missing weights) print one line
naming the file or option at fault and exit with status 2; set ARFORGE_TRACEBACK=1 to see the
Python traceback as well.

Arguments are checked before anything heavy is imported: torch, MLflow, gin and Optuna take
seconds to import, and a mistyped file name must not wait for them (tests/test_cli.py checks
that such an error is reported with none of them imported).
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Sequence

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from arforge import __version__  # noqa: E402  (the package's __init__ imports nothing heavy)
from arforge.errors import ArforgeError  # noqa: E402

DESCRIPTION = ("Train, sample and evaluate class-conditional autoregressive image generators "
               "from gin launch files; every launch is an MLflow run.")
EPILOG = ("examples:\n"
          "  arforge run experiments/quickstart/pipeline.gin\n"
          "  arforge run FILE.gin --bind 'jobs.train_ar.steps = 100' --dry-run\n"
          "  arforge study experiments/quickstart/cfg_study.gin\n"
          "  arforge ui --port 5001\n"
          "Set ARFORGE_TRACEBACK=1 to see Python tracebacks.")

#: Sub-commands whose parser needs no other module: for them the study/compare parsers (which
#: import Optuna and MLflow) are not built at all.
_LIGHT_COMMANDS = ("run", "plugins", "ui")
#: The UI port used by `arforge ui` and named in every "open it with arforge ui" hint.
UI_PORT_ENV = "ARFORGE_UI_PORT"


class UsageError(ArforgeError):
    """A command-line mistake found before any work starts (a missing file, a malformed --bind)."""


# ============================================================================ fast checks
def _similar_files(path: Path) -> list[str]:
    """.gin files next to where ``path`` was expected, closest name first."""
    folder = path.parent if str(path.parent) not in ("", ".") else Path(".")
    if not folder.is_dir():
        return []
    names = [p.name for p in folder.iterdir() if p.suffix == ".gin"]
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.5)
    return [str(folder / n) if str(path.parent) not in ("", ".") else n for n in close]


def check_launch_file(value: str, *, what: str = "launch file",
                      example: str = "experiments/quickstart/pipeline.gin") -> None:
    """A one-line :class:`UsageError` if ``value`` is not an existing file: the path, where it was
    looked for, the closest .gin names in that folder, and what to give instead."""
    path = Path(value).expanduser()
    if path.is_file():
        return
    if path.is_dir():
        files = sorted(p.name for p in path.glob("*.gin"))
        raise UsageError(f"{what} {value} is a folder; give one of its .gin files"
                         + (f": {', '.join(files[:8])}{' ...' if len(files) > 8 else ''}" if files else ""))
    hint = _similar_files(path)
    where = "" if path.is_absolute() else f" (relative to the working directory {Path.cwd()})"
    if not path.parent.is_dir() and str(path.parent) not in ("", "."):
        where += f"; the folder {path.parent} does not exist either"
    raise UsageError(f"{what} {value} does not exist{where}. "
                     + (f"Did you mean {hint[0]}? " if hint else "")
                     + f"Give the path of a .gin file, e.g. {example}.")


def check_bindings(bindings: Sequence[str]) -> None:
    """Each --bind must read ``name.param = value`` or be a gin ``include``/``import`` statement
    (gin checks the rest, after its import)."""
    for b in bindings:
        if b.lstrip().startswith(("include ", "import ", "from ")):
            continue
        name, eq, value = b.partition("=")
        if not eq or not name.strip() or not value.strip():
            raise UsageError(f"--bind {b!r} is not a binding: write it as 'name.param = value', "
                             "e.g. --bind 'jobs.train_ar.steps = 100'")


def _check_args(args: argparse.Namespace) -> None:
    if args.command == "run":
        check_launch_file(args.config)
    elif args.command == "study":
        check_launch_file(args.study_file, what="study file", example="experiments/quickstart/cfg_study.gin")
    check_bindings(getattr(args, "bind", None) or [])


# ============================================================================ commands
def _cmd_run(args: argparse.Namespace) -> int:
    if args.dry_run:
        from arforge import dryrun

        dryrun.print_report(dryrun.dry_run(args.config, args.bind))
        return 0
    from arforge import launch

    launch.run_file(args.config, args.bind)
    hint = ui_hint()
    if hint:
        print(hint, flush=True)
    return 0


_ROLE = re.compile(r":[\w:.-]+:`~?([^`]*?)(?:\s*<[^>`]*>)?`")
# A citation of a docs page (docs/page.md#anchor) or of a spec section; the anchor may not end in
# a dot, which is the sentence's.
_CITATION = re.compile(r"(?:\bsee\s+)?(?:\bdocs/[\w./-]+\.md(?:#[\w-]+(?:\.[\w-]+)*)?|(?:\bspec\s+)?§\s*\d+(?:\.\d+)*)")
_GONE = "\x00"


def plain_text(text: str) -> str:
    """A docstring's words without markup: reST roles and literals unwrapped (:class:`~a.B` -> B,
    ``x`` -> x), citations of docs pages (docs/page.md#anchor) and spec sections dropped, with the
    parentheses and separators they leave behind."""
    text = _ROLE.sub(lambda m: m.group(1).split(".")[-1] if m.group(0).split("`")[1].startswith("~")
                     else m.group(1), text)
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r"`([^`]+)`_?", r"\1", text)
    text = re.sub(r"\*\*([^*]+)\*\*|\*([^*]+)\*", lambda m: m.group(1) or m.group(2), text)
    text = _CITATION.sub(_GONE, text)

    def drop(part: str) -> str:
        # a citation that opens a list takes the separator after it; any other, the one before it
        part = re.sub(rf"^\s*{_GONE}\s*[,;:]?\s*", "", part)
        return re.sub(rf"(?:\s*[,;])?(?:\s+and)?\s*{_GONE}", "", part).strip()

    text = re.sub(r"(\s*)\(([^()]*)\)",
                  lambda m: f"{m.group(1)}({drop(m.group(2))})" if drop(m.group(2)) else _GONE, text)
    text = drop(text)
    text = re.sub(r"[,;]\s*(?=[.]?$)", "", text)  # a separator left at the end
    return re.sub(r"\s{2,}", " ", text).strip()


def summary(obj: object) -> str:
    """What a component is, in plain words: its docstring's first paragraph (its first sentence
    when the paragraph runs long), without markup or citations."""
    import inspect

    doc = inspect.getdoc(obj) or ""
    para = " ".join(doc.strip().split("\n\n")[0].split()) if doc.strip() else ""
    if not para:
        return "(no description)"
    text = plain_text(para)
    if len(text) > 120:
        first = re.match(r"(.+?[.!?])(?:\s+[A-Z(]|$)", text)
        text = first.group(1) if first else text
    return text


def _cmd_plugins(args: argparse.Namespace) -> int:
    from arforge import registry as reg

    comps = reg.load_plugins().all()
    if args.kind:
        if args.kind not in reg.KINDS:
            hint = reg.closest(args.kind, reg.KINDS)
            raise UsageError(f"unknown kind {args.kind!r}" + (f"; did you mean {hint!r}?" if hint else "")
                             + f" Kinds: {', '.join(reg.KINDS)}.")
        comps = [c for c in comps if c.kind == args.kind]
    rows = [(c.qualified_name, c.distribution, summary(c.obj)) for c in comps]
    if not rows:
        print("no components registered")
        return 0
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print(f"{'COMPONENT':<{w0}}  {'DISTRIBUTION':<{w1}}  DESCRIPTION")
    for name, dist, desc in rows:
        print(f"{name:<{w0}}  {dist:<{w1}}  {desc}")
    return 0


def default_ui_port() -> int:
    """``$ARFORGE_UI_PORT``, else 5000: what `arforge ui` listens on and what the hints name."""
    value = os.environ.get(UI_PORT_ENV, "")
    if not value:
        return 5000
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise UsageError(f"{UI_PORT_ENV}={value!r} is not a port number (1-65535); unset it or fix it")
    return int(value)


def ui_url(host: str = "127.0.0.1", port: int | None = None) -> str:
    """The MLflow UI address, opening in its model-training view: MLflow 3 starts in the GenAI view
    unless the page is asked for ``workflowType=machine_learning``."""
    return f"http://{host}:{port or default_ui_port()}/#/experiments?workflowType=machine_learning"


_HINTED: set[str] = set()


def ui_hint(experiment: str | None = None) -> str | None:
    """Where to look at the runs, once per process (a study's trials, a pipeline's stages and the
    launch around them would each repeat it): None after the first call."""
    if "ui" in _HINTED or os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks
        return None
    _HINTED.add("ui")
    from arforge import tracking

    uri = tracking.tracking_uri()
    exp = f", experiment {experiment!r}" if experiment else ""
    if not uri.startswith("sqlite:"):
        return f"runs, metrics and pictures are on the tracking server {uri}{exp}: open its UI in a browser"
    port = default_ui_port()
    cmd = "arforge ui" + (f" --port {port}" if port != 5000 else "")
    if os.environ.get("ARFORGE_HOME"):
        cmd = f"ARFORGE_HOME={tracking.home()} {cmd}"
    return f"runs, metrics and pictures in {uri}; open them with `{cmd}` ({ui_url(port=port)}{exp})"


def _tag_training_view(uri: str) -> None:
    """Mark the store's experiments as model-training ones (MLflow's ``mlflow.experimentKind`` tag),
    so MLflow 3 opens them in that view rather than the GenAI one. Best effort: the UI works without."""
    db = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
    if db is not None and not db.is_file():  # a new store has no experiments yet: nothing to tag
        return
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        for exp in client.search_experiments():
            if "mlflow.experimentKind" not in exp.tags:
                client.set_experiment_tag(exp.experiment_id, "mlflow.experimentKind", "custom_model_development")
    except Exception:  # noqa: BLE001  (an older MLflow, a locked store: the UI still starts)
        pass


def _cmd_ui(args: argparse.Namespace) -> int:
    from arforge import tracking

    uri = tracking.tracking_uri()
    if not uri.startswith("sqlite:"):
        print(f"MLFLOW_TRACKING_URI is set ({uri}): open that server's UI instead.")
        return 0
    port = args.port if args.port is not None else default_ui_port()
    tracking.home().mkdir(parents=True, exist_ok=True)
    _tag_training_view(uri)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--default-artifact-root", tracking.artifact_root().as_uri(),
           "--host", args.host, "--port", str(port), "--workers", "1"]
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    print(f"MLflow UI for {uri} at {ui_url(args.host, port)} (Ctrl-C to stop)", flush=True)
    return serve(cmd, env=env)


def serve(cmd: Sequence[str], *, env: dict[str, str] | None = None, grace: float = 10.0) -> int:
    """Run a server (``mlflow ui`` and the uvicorn it starts) until it exits or this process gets
    SIGTERM/SIGINT; then stop its whole process group, so no server is left behind.

    The server runs in a session of its own: a terminal's Ctrl-C reaches only this process, which
    forwards SIGTERM to the group (and SIGKILL after ``grace`` seconds), instead of the children
    getting the signal twice or, under SIGTERM from a supervisor, not at all.
    """
    proc = subprocess.Popen(list(cmd), env=env, start_new_session=True)
    received: list[int] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        _signal_group(proc, signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    kill_at = None
    try:
        while True:  # short waits: a signal handled meanwhile starts the grace period
            try:
                code = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if received and kill_at is None:
                    kill_at = time.monotonic() + grace
                if kill_at is not None and time.monotonic() > kill_at:  # asked to stop, still running
                    _signal_group(proc, signal.SIGKILL)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        # The group may outlive its leader (uvicorn workers): stop whatever is left of it.
        _signal_group(proc, signal.SIGTERM)
    if received:
        print(f"arforge ui: stopped the MLflow server ({signal.Signals(received[0]).name})", file=sys.stderr,
              flush=True)
        return 0
    return code


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the child leads its own session, so its pid is the group id
    except (ProcessLookupError, PermissionError):
        pass


# ============================================================================ parser
def _version() -> str:
    try:
        from importlib import metadata

        plugins = metadata.version("arforge-plugins")
        return f"arforge {__version__} (arforge-plugins {plugins}, Python {sys.version.split()[0]})"
    except Exception:  # noqa: BLE001  (plugins not installed: the framework's version alone)
        return f"arforge {__version__} (Python {sys.version.split()[0]})"


def build_parser(*, extra: bool = True) -> argparse.ArgumentParser:
    """The argument parser; ``extra=False`` leaves out study/compare (their modules import Optuna)."""
    p = argparse.ArgumentParser(prog="arforge", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=_version(), help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run a gin launch file", description="Run a gin launch file as an MLflow run.")
    r.add_argument("config", metavar="FILE.gin", help="the launch file")
    r.add_argument("--bind", "-b", action="append", default=[], metavar="BINDING",
                   help="an extra gin binding, e.g. 'jobs.train_ar.steps = 10' (repeatable)")
    r.add_argument("--dry-run", action="store_true",
                   help="build the components on the meta device and check that they fit; no data, no weights")
    r.set_defaults(fn=_cmd_run)

    pl = sub.add_parser("plugins", help="list every registered component",
                        description="List every registered component: kind.name, distribution, description.")
    pl.add_argument("--kind", help="only this kind, e.g. quantizers")
    pl.set_defaults(fn=_cmd_plugins)

    u = sub.add_parser("ui", help="start the MLflow UI on the embedded store",
                       description="Start the MLflow UI on the embedded store ($ARFORGE_HOME, default ./arforge_runs). "
                                   "Ctrl-C or SIGTERM stops it and its server processes.")
    u.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    u.add_argument("--port", type=int, default=None,
                   help=f"port to listen on (default ${UI_PORT_ENV}, else 5000; the run hints name the same port)")
    u.set_defaults(fn=_cmd_ui)
    if extra:
        _add_extra_commands(sub)
    return p


def _add_extra_commands(sub) -> None:
    """Commands whose implementation lives in other framework modules."""
    try:
        from arforge.studies import add_cli as add_study_cli  # noqa: WPS433
    except ImportError:
        return
    add_study_cli(sub)


def _command(argv: Sequence[str]) -> str | None:
    """The sub-command named in ``argv`` (the first word that is not an option), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


_GIN_CONTEXT = re.compile(r"\n\s*In call to configurable '[^']*' \(.*?\)\s*$")


def _one_message(exc: BaseException) -> str:
    """The error's message without the "In call to configurable ..." lines that gin appends
    to an exception raised inside a configurable (the message already names the file/option)."""
    text = str(exc).rstrip()
    while True:
        stripped = _GIN_CONTEXT.sub("", text)
        if stripped == text:
            return text
        text = stripped.rstrip()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command(argv)
    light = command in _LIGHT_COMMANDS or (command is None and "--version" in argv)
    args = build_parser(extra=not light).parse_args(argv)
    try:
        _check_args(args)
        code = int(args.fn(args) or 0)
        sys.stdout.flush()  # a closed pipe (arforge plugins | head) surfaces here, not at exit
        return code
    except BrokenPipeError:
        # The reader went away: stop quietly, like other Unix tools. stdout is pointed at
        # /dev/null so that the interpreter's final flush does not complain either.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # stdout replaced (captured in tests)
            pass
        return 141  # 128 + SIGPIPE, what a tool killed by the signal reports
    except ArforgeError as exc:
        if os.environ.get("ARFORGE_TRACEBACK"):
            traceback.print_exc()
        print(f"arforge: error: {_one_message(exc)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("arforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
