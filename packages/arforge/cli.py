"""The ``arforge`` command.

    arforge run EXPERIMENT.gin [--bind 'name.param = value' ...] [--dry-run]
    arforge plugins [--kind quantizers]
    arforge ui [--port 5000] [--host 127.0.0.1]
    arforge study STUDY.gin [--storage URL] [--n-trials N] [--bind ...]
    arforge compare EXPERIMENT [--metric fid] [--param NAME] [--plot out.png]

User mistakes (gin typos, unknown plugins, bad checkpoints, missing weights)
print one line naming the file/option at fault and exit with status 2; set
``ARFORGE_TRACEBACK=1`` to see the Python traceback as well.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import traceback
from typing import Sequence

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _cmd_run(args: argparse.Namespace) -> int:
    if args.dry_run:
        from arforge import dryrun

        dryrun.print_report(dryrun.dry_run(args.config, args.bind))
        return 0
    from arforge import launch

    launch.run_file(args.config, args.bind)
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from arforge import registry as reg

    comps = reg.load_plugins().all()
    if args.kind:
        if args.kind not in reg.KINDS:
            raise reg.UnknownComponentError(
                f"unknown kind {args.kind!r}; kinds: {', '.join(reg.KINDS)}")
        comps = [c for c in comps if c.kind == args.kind]
    rows = [(c.qualified_name, c.distribution, c.description) for c in comps]
    if not rows:
        print("no components registered")
        return 0
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print(f"{'COMPONENT':<{w0}}  {'DISTRIBUTION':<{w1}}  DESCRIPTION")
    for name, dist, desc in rows:
        print(f"{name:<{w0}}  {dist:<{w1}}  {desc}")
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    from arforge import tracking

    uri = tracking.tracking_uri()
    if not uri.startswith("sqlite:"):
        print(f"MLFLOW_TRACKING_URI is set ({uri}): open that server's UI instead.")
        return 0
    tracking.home().mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--default-artifact-root", tracking.artifact_root().as_uri(),
           "--host", args.host, "--port", str(args.port), "--workers", "1"]
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    print(f"MLflow UI for {uri} at http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    return subprocess.call(cmd, env=env)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="arforge", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a gin launch file")
    r.add_argument("config", help="the launch .gin file")
    r.add_argument("--bind", "-b", action="append", default=[],
                   help="an extra gin binding, e.g. 'jobs.train_ar.steps = 10' (repeatable)")
    r.add_argument("--dry-run", action="store_true",
                   help="build the components on the meta device and check that they fit; no data, no weights")
    r.set_defaults(fn=_cmd_run)

    pl = sub.add_parser("plugins", help="list every registered component")
    pl.add_argument("--kind", help="only this kind (e.g. quantizers)")
    pl.set_defaults(fn=_cmd_plugins)

    u = sub.add_parser("ui", help="start the MLflow UI on the embedded store")
    u.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: local only)")
    u.add_argument("--port", type=int, default=5000)
    u.set_defaults(fn=_cmd_ui)
    _add_extra_commands(sub)
    return p


def _add_extra_commands(sub) -> None:
    """Commands whose implementation lives in other framework modules."""
    try:
        from arforge.studies import add_cli as add_study_cli  # noqa: WPS433
    except ImportError:
        return
    add_study_cli(sub)


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
    from arforge.errors import ArforgeError

    args = build_parser().parse_args(argv)
    try:
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
