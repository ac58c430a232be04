"""Where studies live, and the one guarantee Optuna leaves to us: exactly ``n_trials``.

Optuna provides the rest of the worker protocol (docs/studies.md, "Storage and
workers"): ``RDBStorage`` or a file ``JournalStorage`` shared by every worker
(the journal given heartbeats here, :class:`HeartbeatJournalStorage`), heartbeats that fail a dead
worker's trial (``heartbeat_interval``/``grace_period``),
``RetryHeartbeatStaleTrialCallback`` that re-queues its parameters, and
``MaxTrialsCallback`` that stops a worker once the target is met.

What it lacks is an atomic "start a trial only if the target has room":
``MaxTrialsCallback`` looks after a trial has ended, so two workers that finish
at once both start another, and the study ends with more trials than asked
for. :class:`StudyLock` and :func:`slots_used` close that gap; they guard
``Study.ask`` in :class:`CappedStudy` and nothing else of Optuna's.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import optuna
from optuna.storages._heartbeat import BaseHeartbeat  # Optuna's heartbeat protocol; no public name
from optuna.trial import TrialState

from arforge.errors import ArforgeError

#: A trial that counts against ``n_trials``: it has finished, or it will.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_HOLDING = (*FINISHED, TrialState.RUNNING, TrialState.WAITING)
#: How long a heartbeat-failed trial keeps its slot while no retry of it appears (at least).
_STALE_WINDOW_S = 300.0


class StudyError(ArforgeError):
    """A user-facing study problem (storage unreachable, too many failing trials, ...)."""


def default_storage_url() -> str:
    from arforge import tracking

    return f"sqlite:///{tracking.home() / 'optuna.db'}"


JOURNAL = "journal://"


def journal_path(url: str) -> Path | None:
    """The log file of a ``journal:///abs/path.log`` (or ``journal://relative.log``) URL, else None."""
    if not url.startswith(JOURNAL):
        return None
    return Path(url[len(JOURNAL):]).expanduser()


def normalize_storage_url(url: str, *, base: str | os.PathLike | None = None) -> str:
    """Pin a bare ``postgresql://`` URL to the installed driver; make a journal path absolute.

    A relative ``journal://`` path is taken against ``base`` (the study file's folder, for
    ``study.storage``) or the working directory (``--storage``), so every worker of a study,
    whatever its folder, prints and opens the same file.

    SQLAlchemy 2.1 maps ``postgresql://`` to psycopg 3 (2.0 mapped it to
    psycopg2); arforge's ``postgres`` extra installs psycopg2-binary, so take
    whichever of the two is importable. ``postgres://`` is accepted as well.
    """
    path = journal_path(url)
    if path is not None:
        if not str(path) or str(path) == ".":
            raise StudyError(f"study storage {url!r} names no file; write journal:///path/to/study.log")
        if not path.is_absolute():
            path = Path(base or os.getcwd()) / path
        return JOURNAL + str(Path(os.path.normpath(path)))
    m = re.match(r"^(postgresql|postgres)://", url)
    if not m:
        return url
    rest = url[m.end():]
    for module, dialect in (("psycopg2", "postgresql+psycopg2"), ("psycopg", "postgresql+psycopg")):
        if importlib.util.find_spec(module) is not None:
            return f"{dialect}://{rest}"
    raise StudyError(f"study storage {mask_url(url)} needs a PostgreSQL driver: "
                     "pip install 'arforge[postgres]' (psycopg2-binary)")


def mask_url(url: str) -> str:
    """``url`` with any password hidden (safe to print and to log)."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def check_journal(url: str, *, option: str = "study storage (--storage)") -> Path:
    """The journal file of ``url``, its folder created; a clear error if it cannot be one."""
    path = journal_path(url)
    assert path is not None
    if path.is_dir():
        raise StudyError(f"{option} = {url}: {path} is a folder; name the journal file in it, "
                         f"e.g. journal://{path / 'studies.log'}")
    blocker = next((p for p in [path.parent, *path.parent.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise StudyError(f"{option} = {url}: {blocker} is a file, not a folder; choose a journal path in a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StudyError(f"{option} = {url}: cannot create {path.parent}: {exc.strerror}") from None
    return path


class HeartbeatJournalStorage(optuna.storages.JournalStorage, BaseHeartbeat):
    """Optuna's ``JournalStorage`` with heartbeats, for its file backend.

    Optuna's journal storage has no heartbeats (``RDBStorage`` alone implements
    ``BaseHeartbeat``), so a worker killed mid-trial would hold its slot for ever. This class
    implements Optuna's own heartbeat protocol on top of the journal: a beat is a trial system
    attribute ``arforge.heartbeat`` (the beating host's clock), and a RUNNING trial whose last
    beat (or start) is older than ``grace_period`` is stale. Optuna's optimize loop then runs the
    heartbeat thread, ``fail_stale_trials`` and ``RetryHeartbeatStaleTrialCallback`` exactly as on
    an RDB. Workers on several machines need clocks in step (NTP) to well within the grace period.
    """

    BEAT = "arforge.heartbeat"

    def __init__(self, backend: Any, *, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 stale_trial_callback: Callable[[Any, Any], None] | None = None):
        super().__init__(backend)
        self._heartbeat_interval = heartbeat_interval or None
        self._grace_period = grace_period or (2 * heartbeat_interval if heartbeat_interval else None)
        self._stale_trial_callback = stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, self.BEAT, time.time())
        except (optuna.exceptions.UpdateFinishedTrialError, KeyError):
            pass  # finished meanwhile (or failed as stale by another worker): nothing left to keep alive

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        if self._grace_period is None:
            return []
        now = time.time()
        stale = []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            last = t.system_attrs.get(self.BEAT)
            if last is None and t.datetime_start is not None:
                last = t.datetime_start.timestamp()  # the journal keeps local wall time
            if last is not None and now - float(last) > self._grace_period:
                stale.append(t._trial_id)  # noqa: SLF001  (Optuna's own storages key trials by it)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self._heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[Any, Any], None] | None:
        return self._stale_trial_callback


def open_storage(url: str | None = None, *, heartbeat_interval: int | None = None,
                 grace_period: int | None = None,
                 stale_trial_callback: Callable[[Any, Any], None] | None = None) -> Any:
    """The Optuna storage ``url`` names (default: ``$ARFORGE_HOME/optuna.db``).

    ``journal:///path/study.log``: Optuna's ``JournalStorage`` on a ``JournalFileBackend`` with
    its ``JournalFileOpenLock`` (an ``O_EXCL`` lock file, which works on NFSv3+, where SQLite's
    ``fcntl`` locks do not), plus heartbeats (:class:`HeartbeatJournalStorage`). Anything else is
    an ``RDBStorage``; SQLite gets a 30 s busy timeout so that several local workers can share the file.
    """
    url = normalize_storage_url(url or default_storage_url())
    if url.startswith(JOURNAL):
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        path = str(check_journal(url))
        return HeartbeatJournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)),
                                       heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                                       stale_trial_callback=stale_trial_callback)
    if url.startswith("sqlite:"):
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 30}}
    else:
        engine_kwargs = {"pool_pre_ping": True}  # a server may drop idle connections during a long trial
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval or None, grace_period=grace_period,
                heartbeat_stale_trial_callback=stale_trial_callback)
        except ImportError as exc:
            raise StudyError(f"study storage {mask_url(url)}: the database driver is missing ({exc}); "
                             "for PostgreSQL: pip install 'arforge[postgres]' (psycopg2-binary)") from exc
        except Exception as exc:
            if type(exc).__module__.startswith(("sqlalchemy", "optuna")):
                raise StudyError(f"cannot open study storage {mask_url(url)}: "
                                 f"{str(exc).splitlines()[0]}") from exc
            raise


class StudyLock:
    """A lock shared by every worker of one study in one storage.

    The storage's own database serves where it can (``pg_advisory_lock`` on
    PostgreSQL, ``GET_LOCK`` on MySQL); SQLite has no such lock, so an ``flock``
    on ``<database>.lock`` stands in. Not re-entrant: callers never nest it.
    """

    def __init__(self, url: str, study_name: str):
        self.url = url
        self.dialect = url.split(":", 1)[0].split("+")[0]
        digest = hashlib.blake2b(f"arforge-study:{study_name}".encode(), digest_size=8).digest()
        self.key = int.from_bytes(digest, "big", signed=True)
        self._engine = None

    def __call__(self) -> contextlib.AbstractContextManager:
        if self.dialect == "sqlite":
            return self._file_lock()
        if self.dialect == "journal":
            return self._journal_lock()
        if self.dialect in ("postgresql", "postgres", "mysql", "mariadb"):
            return self._db_lock()
        warnings.warn(f"no cross-process study lock for {self.dialect!r} storages: concurrent workers may "
                      "finish a few more trials than n_trials", stacklevel=2)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        db = self.url.split(":///", 1)[1] if ":///" in self.url else ""
        if not db or db.startswith(":memory:"):  # one process only: nothing to share
            yield
            return
        import fcntl

        Path(db).parent.mkdir(parents=True, exist_ok=True)
        with open(db + ".lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _journal_lock(self) -> Iterator[None]:
        # The journal's own kind of lock (an O_EXCL file), one per study, beside the log: it works
        # where the log is shared over NFS. A lock left by a killed worker is broken after 60 s
        # (Optuna's grace_period); the sections it guards take well under a second, or a few
        # seconds while a new MLflow store is created.
        from optuna.storages.journal import JournalFileOpenLock

        path = journal_path(self.url)
        assert path is not None
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = JournalFileOpenLock(f"{path}.study-{self.key & 0xFFFFFFFF:08x}", grace_period=60)
        lock.acquire()
        try:
            yield
        finally:
            lock.release()

    @contextlib.contextmanager
    def _db_lock(self) -> Iterator[None]:
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        if self._engine is None:
            self._engine = sqlalchemy.create_engine(self.url, poolclass=NullPool)
        if self.dialect in ("mysql", "mariadb"):
            take, give, arg = "SELECT GET_LOCK(:k, -1)", "SELECT RELEASE_LOCK(:k)", f"arforge-{self.key}"
        else:
            take, give, arg = "SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)", self.key
        with self._engine.connect() as conn:
            conn.execute(sqlalchemy.text(take), {"k": arg})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text(give), {"k": arg})
                conn.commit()


def slots_used(trials: Sequence[Any], *, max_retry: int | None, grace_period: float = 0.0,
               now: float | None = None) -> int:
    """Trials that finished or will: COMPLETE, PRUNED, RUNNING, WAITING, plus a trial
    failed by heartbeat whose retry is not queued yet.

    The last kind exists because Optuna fails a stale trial and queues its retry in
    two steps, and every worker fails stale trials before it asks (outside any lock
    of ours); without it a slot would look free for a moment. A trial a worker saw
    fail carries ``arforge.error`` and frees its slot at once. A heartbeat-failed
    trial whose retry never appears (its worker died in between) frees it after a
    while, so that the study can still finish.
    """
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    now = time.time() if now is None else now
    window = max(_STALE_WINDOW_S, 2.0 * grace_period)
    used = 0
    for t in trials:
        if t.state in _HOLDING:
            used += 1
        elif t.state == TrialState.FAIL and not t.user_attrs.get("arforge.error") and t.number not in retried:
            retries_left = max_retry is None or len(t.system_attrs.get("retry_history", ())) < max_retry
            recent = t.datetime_complete is not None and now - t.datetime_complete.timestamp() < window
            if retries_left and recent:
                used += 1
    return used


class NoRoom(Exception):
    """Raised by :meth:`CappedStudy.ask` when every slot of the study is taken."""


class CappedStudy(optuna.Study):
    """An Optuna study whose ``ask`` creates a trial only while the study has room.

    ``Study.optimize`` offers no hook between "should another trial start" and
    "create it", so the check and the creation are made one step here, under the
    study's :class:`StudyLock`. A WAITING trial (enqueued, or a retry) always has
    room: it was counted when it was queued.
    """

    def __init__(self, *, lock: StudyLock, room: Callable[[Sequence[Any]], bool], **kwargs: Any):
        super().__init__(**kwargs)
        self._lock, self._room = lock, room

    def ask(self, fixed_distributions: dict[str, Any] | None = None) -> optuna.Trial:
        with self._lock():
            trials = self.get_trials(deepcopy=False)
            if not any(t.state == TrialState.WAITING for t in trials) and not self._room(trials):
                raise NoRoom()
            return super().ask(fixed_distributions)
