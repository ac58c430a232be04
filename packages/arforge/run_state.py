"""A run's state between launches: ``run.json``, what a resume may change, one launch per run.

A rerun of a launch resumes it (docs/tracking.md#resuming-and-runjson): the resolved bindings of
the first launch are kept in ``run.json`` (written atomically) and compared with this launch's; a
change of architecture is refused (:func:`refused_on_resume`), any other change is printed and
tagged. :class:`RunLock` keeps a second launch of a live run out.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from arforge.errors import ArforgeError


class RunStateError(ArforgeError):
    """A run's output folder is unusable for this launch: locked, corrupt ``run.json``, refused change."""


#: Component kinds whose bindings decide the shapes of the weights in a checkpoint: changing one
#: and resuming would load weights of another architecture, so a resume refuses it.
ARCHITECTURE_KINDS = ("quantizers", "tokenizers", "factorizations", "heads", "backbones", "models")
#: Job/loader parameters that name the model being trained (``jobs.train_ar.model = %MODEL``).
ARCHITECTURE_PARAMS = ("preset", "model", "tokenizer", "quantizer", "factorization", "head", "backbone")
#: Bindings a resume never compares (they choose how to launch, not what is trained).
_NOT_COMPARED = ("arforge.launch.resume", "launch.resume")


def refused_on_resume(key: str, old: str | None, new: str | None) -> bool:
    """Whether changing binding ``key`` (``scope/selector.param``) from ``old`` to ``new`` refuses a resume.

    Refused: what decides the architecture whose weights the checkpoint holds (any binding of an
    architecture kind -- tokenizer/model presets, quantizer sizes, heads --, a job's
    ``model``/``tokenizer``/``preset`` argument, a macro naming an architecture component) and the
    job itself. Allowed, printed and tagged on the MLflow run: everything else (lr, steps, schedules,
    batch size, log/eval settings, data, device, precision, seed): a user recovering from a
    divergence lowers the lr and resumes.
    """
    selector = key.rsplit("/", 1)[-1]
    if selector.startswith("arforge."):
        selector = selector[len("arforge."):]
    kind = selector.split(".", 1)[0]
    param = selector.rsplit(".", 1)[-1]
    if selector == "launch.job":
        return True
    if kind in ARCHITECTURE_KINDS or (kind != "launch" and param in ARCHITECTURE_PARAMS):
        return True
    if selector.endswith("gin.macro.value"):
        refs = f"{old or ''} {new or ''}"
        return any(f"@{k}." in refs or f"/{k}." in refs for k in ARCHITECTURE_KINDS)
    return False


def config_changes(old: dict[str, str], new: dict[str, str]) -> dict[str, tuple[str | None, str | None]]:
    """``{binding: (old, new)}`` for every binding that differs, except those a resume never compares."""
    keys = (set(old) | set(new)) - set(_NOT_COMPARED)
    return {k: (old.get(k), new.get(k)) for k in sorted(keys) if old.get(k) != new.get(k)}


def format_change(key: str, old: str | None, new: str | None) -> str:
    return f"{key}: {old if old is not None else '(unset)'} -> {new if new is not None else '(unset)'}"


def tag_key(binding: str) -> str:
    """The MLflow tag carrying a changed binding (MLflow limits tag keys' characters and length)."""
    return ("resume.changed." + re.sub(r"[^A-Za-z0-9_.\-/ ]", "_", binding))[:250]


def write_run_state(path: Path, state: dict[str, Any]) -> None:
    """Write ``run.json`` atomically (:func:`arforge.checkpoint.write_json_atomic`)."""
    from arforge.checkpoint import write_json_atomic

    write_json_atomic(path, state)


def read_run_state(path: Path, *, resume: str) -> dict[str, Any] | None:
    """``run.json`` of a previous launch, or None. A corrupt one is a :class:`RunStateError`
    (with ``resume = 'never'`` it is ignored: the old outputs are moved aside anyway)."""
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict):
            raise ValueError(f"expected a JSON object, found {type(state).__name__}")
        return state
    except (ValueError, UnicodeDecodeError) as exc:
        if resume == "never":
            return None
        raise RunStateError(
            f"{path} is corrupt ({str(exc).splitlines()[0][:120]}), so this run cannot tell whether or how to "
            "resume. To start over keeping the old outputs (moved aside), run with "
            "--bind \"launch.resume = 'never'\"; to resume from its checkpoints instead, replace it with "
            "{\"run_id\": \"<the MLflow run id>\", \"status\": \"RUNNING\"}.") from None


class RunLock:
    """One launch per output folder: an ``flock`` on ``.<run>.lock`` next to the folder (the folder
    itself may be moved aside). The kernel drops the lock when its process dies; a lock still held
    by a forked child of a dead launch (data-loader worker) is taken over."""

    def __init__(self, out: Path, run_name: str):
        self.path = out.parent / f".{out.name}.lock"
        self.fh = None
        try:
            import fcntl
        except ImportError:  # pragma: no cover (Windows: no lock)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            text = fh.read().strip()
            pid = int(text) if text.isdigit() else None
            from arforge.checkpoint import _pid_alive

            if pid is None or _pid_alive(pid):
                fh.close()
                raise RunStateError(
                    f"run {run_name!r} ({out}) is already running" + (f" in process {pid}" if pid else "")
                    + f" (lock {self.path}). Wait for it to end, stop it, or launch this one under another "
                    "launch.run_name.") from None
            print(f"[{run_name}] taking over the lock {self.path} of dead process {pid}", flush=True)
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self.fh = fh

    def release(self) -> None:
        if self.fh is None:
            return
        try:
            self.fh.seek(0)
            self.fh.truncate()
        except OSError:
            pass
        self.fh.close()  # closing the file drops the flock
        self.fh = None
