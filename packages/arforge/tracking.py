"""MLflow tracking, embedded by default.

With no ``MLFLOW_TRACKING_URI``, runs go to an embedded store in the working
directory::

    ./arforge_runs/mlflow.db      # SQLite tracking store (runs, params, metrics, tags)
    ./arforge_runs/artifacts/     # artifacts (operative gin config, grids, checkpoints)
    ./arforge_runs/optuna.db      # Optuna studies (next to the MLflow store)

``ARFORGE_HOME`` moves that folder. With ``MLFLOW_TRACKING_URI`` set, runs go to
that server, which is probed before any work starts. :func:`check_store` is the one
place that turns a bad tracking URI or study storage (unknown scheme, SQLite path
under a file, missing driver, unreachable server or database) into a one-line
:class:`TrackingError`; launches call it before touching any outputs.

Components never import MLflow: trainers and jobs receive a :class:`Tracker`
and call ``log_metrics``/``log_image``; only this module talks to MLflow.
"""

from __future__ import annotations

from arforge.errors import ArforgeError

import contextvars
import difflib
import io
import json
import os
import re
import subprocess
import tempfile
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no DNS lookups offline

MLFLOW_PARAM_LIMIT = 6000


class TrackingError(ArforgeError):
    """A user-facing tracking problem (e.g. an unreachable tracking server)."""


def home() -> Path:
    """The folder of the embedded stores (``$ARFORGE_HOME`` or ``./arforge_runs``)."""
    path = Path(os.environ.get("ARFORGE_HOME", "arforge_runs")).resolve()
    blocker = _file_in_the_way(path)
    if blocker is not None:
        where = "ARFORGE_HOME" if os.environ.get("ARFORGE_HOME") else "the default ARFORGE_HOME (./arforge_runs)"
        raise TrackingError(f"{where} = {path} cannot be a folder: {blocker} is a file. Point ARFORGE_HOME at "
                            "a folder (it is created if missing), or move that file away.")
    return path


def _file_in_the_way(path: Path) -> Path | None:
    """The first existing ancestor-or-self of ``path`` if it is not a folder (so nothing can be
    created under it), else None."""
    for p in (path, *path.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


@dataclass(frozen=True)
class PathScope:
    """Where ``pipeline:`` paths point: the enclosing ``jobs.pipeline`` run's folder, or the
    launch's experiment folder outside a pipeline (see :func:`resolve_path`)."""

    experiment: str | None = None
    pipeline_dir: Path | None = None


# Components resolve "pipeline:" paths while gin builds them (a dataset's root, a loader's
# checkpoint), long after the launch that knows the folder and with no run context to receive
# it; the launch and jobs.pipeline open a scope around what they run instead. A context
# variable, unlike the environment, ends with the launch that set it and stays in this process.
_PATH_SCOPE: contextvars.ContextVar[PathScope] = contextvars.ContextVar("arforge_path_scope",
                                                                         default=PathScope())


@contextmanager
def path_scope(*, experiment: str | None = None, pipeline_dir: str | os.PathLike | None = None) -> Iterator[PathScope]:
    """Resolve ``pipeline:`` paths under ``pipeline_dir`` (or the ``experiment``'s folder) inside
    this block; what is not given is kept from the enclosing scope (a pipeline's stages)."""
    scope = _PATH_SCOPE.get()
    if experiment is not None:
        scope = replace(scope, experiment=experiment)
    if pipeline_dir is not None:
        scope = replace(scope, pipeline_dir=Path(pipeline_dir))
    token = _PATH_SCOPE.set(scope)
    try:
        yield scope
    finally:
        _PATH_SCOPE.reset(token)


def pipeline_dir() -> Path | None:
    """The folder of the enclosing ``jobs.pipeline`` run, if any."""
    return _PATH_SCOPE.get().pipeline_dir


def resolve_path(path: str | os.PathLike) -> Path:
    """Resolve ``outputs:<experiment>/<run_name>/...`` to the run's output folder.

    Launches write to ``$ARFORGE_HOME/outputs/<experiment>/<run_name>`` by
    default, so a later stage can name an earlier one's checkpoint or codes in
    gin without knowing where ``ARFORGE_HOME`` is::

        loaders.arforge_checkpoint.checkpoint = "outputs:quickstart/tokenizer/checkpoints"

    ``pipeline:<file>`` names a file in the folder of the enclosing ``jobs.pipeline``
    run (or of the experiment, outside a pipeline): stages of one pipeline share it.
    """
    text = str(path)
    if text.startswith("outputs:"):
        return home() / "outputs" / text[len("outputs:"):].lstrip("/")
    if text.startswith("pipeline:"):
        # Inside jobs.pipeline: the pipeline run's own folder, so that concurrent pipelines (study
        # trials) never share files; outside one: the launch's experiment folder.
        scope = _PATH_SCOPE.get()
        base = scope.pipeline_dir or home() / "outputs" / (scope.experiment or "default")
        return Path(base) / text[len("pipeline:"):].lstrip("/")
    return Path(path)


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{home() / 'mlflow.db'}"


def artifact_root() -> Path:
    return home() / "artifacts"


def is_embedded(uri: str | None = None) -> bool:
    uri = uri or tracking_uri()
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


#: Where each SQL scheme's default SQLAlchemy driver comes from (module, pip package).
_SQL_DRIVERS = {
    "postgresql": ("psycopg2", "psycopg2-binary (pip install 'arforge[postgres]')"),
    "postgres": ("psycopg2", "psycopg2-binary (pip install 'arforge[postgres]')"),
    "postgresql+psycopg2": ("psycopg2", "psycopg2-binary (pip install 'arforge[postgres]')"),
    "postgresql+psycopg": ("psycopg", "psycopg[binary]"),
    "postgresql+pg8000": ("pg8000", "pg8000"),
    "mysql": ("MySQLdb", "mysqlclient (or use mysql+pymysql:// with pip install pymysql)"),
    "mysql+mysqldb": ("MySQLdb", "mysqlclient"),
    "mysql+pymysql": ("pymysql", "pymysql"),
    "mysql+mysqlconnector": ("mysql.connector", "mysql-connector-python"),
    "mariadb": ("MySQLdb", "mysqlclient (or use mariadb+pymysql:// with pip install pymysql)"),
    "mariadb+pymysql": ("pymysql", "pymysql"),
    "mssql": ("pyodbc", "pyodbc"),
    "mssql+pyodbc": ("pyodbc", "pyodbc"),
    "mssql+pymssql": ("pymssql", "pymssql"),
}
_HTTP_SCHEMES = ("http", "https")
_OTHER_MLFLOW_SCHEMES = ("file", "databricks", "databricks-uc", "uc")


def _mask(uri: str) -> str:
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", uri)


def _store_schemes(what: str) -> set[str]:
    schemes = set(_SQL_DRIVERS) | {"sqlite"}
    if what == "mlflow":
        schemes |= set(_HTTP_SCHEMES) | set(_OTHER_MLFLOW_SCHEMES)
        try:
            from importlib.metadata import entry_points

            schemes |= {e.name for e in entry_points(group="mlflow.tracking_store")}
        except Exception:  # a broken plugin must not hide the real problem
            pass
    return schemes


def check_store(uri: str | None = None, *, option: str = "MLFLOW_TRACKING_URI", what: str = "mlflow",
                timeout: float = 5.0) -> None:
    """Check a store URI (MLflow tracking URI or Optuna storage) before any work or file move.

    The one place that turns a store mistake into a one-line :class:`TrackingError` naming
    ``option`` and what to do: an unknown scheme (``htp://``), a SQLite path under a file, a
    missing database driver (with its pip package), an unreachable or non-MLflow http server and
    an unreachable database.
    """
    uri = uri or tracking_uri()
    shown = _mask(uri)
    if "://" not in uri and not uri.startswith("sqlite:"):
        if what == "mlflow":  # a plain path: MLflow's file store
            blocker = _file_in_the_way(Path(uri).resolve())
            if blocker is not None:
                raise TrackingError(f"{option} = {shown}: {blocker} is a file, not a folder. "
                                    "Point it at a folder or unset it.")
            return
        raise TrackingError(f"{option} = {shown} is not a database URL; use sqlite:///path/to/file.db "
                            "or postgresql://user:password@host/db.")
    scheme = uri.split(":", 1)[0].lower()
    if scheme not in _store_schemes(what):
        kinds = ("http(s)://host:port, sqlite:///path.db, file:///folder, postgresql://..., mysql://..."
                 if what == "mlflow" else "sqlite:///path.db, postgresql://..., mysql://...")
        close = difflib.get_close_matches(scheme, sorted(_store_schemes(what)), n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]}://?" if close else ""
        raise TrackingError(f"{option} = {shown}: unknown scheme {scheme!r}.{hint} Use one of {kinds}"
                            + (" or unset it for the embedded store." if what == "mlflow" else "."))
    if scheme == "sqlite":
        path = uri.split(":///", 1)[1] if ":///" in uri else ""
        if path and not path.startswith(":memory:") and not path.startswith("file:"):
            path = path.split("?", 1)[0]
            db = Path(path).resolve()
            if db.is_dir():
                raise TrackingError(f"{option} = {shown}: {db} is a folder; name the database file in it, "
                                    f"e.g. sqlite:///{db / 'mlflow.db' if what == 'mlflow' else db / 'optuna.db'}.")
            blocker = _file_in_the_way(db.parent)
            if blocker is not None:
                raise TrackingError(f"{option} = {shown}: cannot create the SQLite database there, "
                                    f"{blocker} is a file, not a folder. Choose a path in a folder.")
        return
    if scheme in _HTTP_SCHEMES:
        _check_http(uri, option=option, timeout=timeout)
        return
    if scheme in _SQL_DRIVERS:
        _check_driver(uri, scheme, option=option)
        _check_database(uri, option=option, timeout=timeout)


#: pip package of each SQLAlchemy driver name.
_DRIVER_PACKAGES = {
    "psycopg2": "psycopg2-binary (pip install 'arforge[postgres]'; then write postgresql+psycopg2://)",
    "psycopg": "'psycopg[binary]' (or, with psycopg2-binary installed, write postgresql+psycopg2://)",
    "pg8000": "pg8000", "mysqldb": "mysqlclient (or write mysql+pymysql:// after pip install pymysql)",
    "pymysql": "pymysql", "mysqlconnector": "mysql-connector-python", "pyodbc": "pyodbc",
    "pymssql": "pymssql",
}


def _check_driver(uri: str, scheme: str, *, option: str) -> None:
    shown = _mask(uri)
    try:
        from sqlalchemy.engine import make_url

        dialect = make_url(uri).get_dialect()
    except ImportError:  # pragma: no cover (MLflow and Optuna need SQLAlchemy)
        return
    except Exception as exc:
        raise TrackingError(f"{option} = {shown}: not a valid database URL ({_first_line(exc)}).") from None
    driver = getattr(dialect, "driver", "") or ""
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        package = _DRIVER_PACKAGES.get(driver, _SQL_DRIVERS.get(scheme, ("", driver))[1])
        raise TrackingError(f"{option} = {shown}: the {scheme} database driver {driver or ''} is not installed "
                            f"({exc}): pip install {package}") from None


def _check_http(uri: str, *, option: str, timeout: float) -> None:
    base = uri.rstrip("/")
    fix = ("Start it, fix the URI, or unset MLFLOW_TRACKING_URI to use the embedded store in "
           f"{home()}." if option == "MLFLOW_TRACKING_URI" else "Start it or fix the URI.")
    for path in ("/health", "/api/2.0/mlflow/experiments/search?max_results=1"):
        try:
            with urllib.request.urlopen(base + path, timeout=timeout) as resp:
                if resp.status < 400:
                    return
                code = resp.status
        except urllib.error.HTTPError as exc:
            code = exc.code
        except (urllib.error.URLError, OSError, TimeoutError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(f"MLflow tracking server {_mask(uri)} (from {option}) is unreachable: "
                                f"{reason}. {fix}") from None
        if code >= 500:
            raise TrackingError(f"MLflow tracking server {_mask(uri)} (from {option}) answered HTTP {code}. {fix}")
        if code in (401, 403):  # an authenticating proxy: MLflow's own credentials decide
            return
    raise TrackingError(f"{_mask(uri)} (from {option}) answered HTTP {code}: no MLflow tracking server "
                        f"there (check the host, port and path). {fix}")


def _check_database(uri: str, *, option: str, timeout: float) -> None:
    try:
        import sqlalchemy
        from sqlalchemy.pool import NullPool
    except ImportError:  # pragma: no cover (MLflow and Optuna need it)
        return
    connect_args: dict[str, Any] = {}
    if uri.startswith(("postgres", "mysql", "mariadb")):
        connect_args["connect_timeout"] = int(max(1, timeout))
    try:
        engine = sqlalchemy.create_engine(uri, poolclass=NullPool, connect_args=connect_args)
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except ImportError as exc:
        raise TrackingError(f"{option} = {_mask(uri)}: the database driver is missing ({exc}).") from None
    except Exception as exc:
        raise TrackingError(f"{option} = {_mask(uri)}: cannot connect to the database: "
                            f"{_first_line(exc)}. Start it, fix the URL, or check the credentials.") from None


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0][:300]


def check_reachable(uri: str | None = None, timeout: float = 5.0) -> None:
    """Fail fast, before any work, if the tracking store is unusable (see :func:`check_store`)."""
    check_store(uri, timeout=timeout)


@contextmanager
def store_errors(uri: str | None = None, *, option: str = "MLFLOW_TRACKING_URI") -> Iterator[None]:
    """Turn an MLflow/SQLAlchemy failure talking to the store into one-line :class:`TrackingError`."""
    try:
        yield
    except ArforgeError:
        raise
    except ImportError as exc:
        raise TrackingError(f"{option} = {_mask(uri or tracking_uri())}: a driver is missing ({exc}).") from None
    except Exception as exc:
        mod = type(exc).__module__ or ""
        if not mod.startswith(("mlflow", "sqlalchemy", "requests", "urllib3", "sqlite3", "psycopg", "pymysql",
                               "MySQLdb", "alembic")):
            raise
        raise TrackingError(f"the tracking store {_mask(uri or tracking_uri())} (from {option}) failed: "
                            f"{_first_line(exc)}") from exc


def configure() -> str:
    """Point MLflow at the configured store; creates the embedded folder if needed.

    The store is checked first (:func:`check_store`), so a launch calls this before it
    touches any outputs."""
    import mlflow

    uri = tracking_uri()
    option = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "ARFORGE_HOME"
    check_store(uri, option=option)
    if uri.startswith("sqlite:"):
        home().mkdir(parents=True, exist_ok=True)
        artifact_root().mkdir(parents=True, exist_ok=True)
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:///:memory:"):
            Path(uri[len("sqlite:///"):].split("?", 1)[0]).parent.mkdir(parents=True, exist_ok=True)
    user_set = "MLFLOW_TRACKING_URI" in os.environ
    mlflow.set_tracking_uri(uri)
    if not user_set:  # MLflow exports the URI; left there, it would pin every later launch in this process
        os.environ.pop("MLFLOW_TRACKING_URI", None)  # (a notebook, a test) to this ARFORGE_HOME's store
    return uri


def ensure_experiment(name: str) -> str:
    """Create (with a local artifact location when embedded) or fetch an experiment."""
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    kwargs = {}
    if is_embedded():
        kwargs["artifact_location"] = (artifact_root() / name).as_uri()
    try:
        return mlflow.create_experiment(name, **kwargs)
    except Exception:  # created concurrently by another worker
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# --------------------------------------------------------------------- tags
def git_state(path: str | os.PathLike | None = None) -> dict[str, str]:
    """``{'git.commit': sha, 'git.dirty': 'true'|'false'}`` of the repo holding ``path``."""
    cwd = Path(path or Path.cwd())
    if cwd.is_file():
        cwd = cwd.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10)
        if sha.returncode != 0:
            return {"git.commit": "unknown", "git.dirty": "unknown"}
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=cwd, capture_output=True, text=True, timeout=10)
        return {"git.commit": sha.stdout.strip(), "git.dirty": str(bool(status.stdout.strip())).lower()}
    except (OSError, subprocess.SubprocessError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _param_value(v: Any) -> str:
    s = v if isinstance(v, str) else repr(v)
    return s if len(s) <= MLFLOW_PARAM_LIMIT else s[: MLFLOW_PARAM_LIMIT - 3] + "..."


# ------------------------------------------------------------------ tracker
class Tracker:
    """What trainers and jobs log through. The base class drops everything
    (used on non-zero ranks and when a component runs outside a launch)."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...
    def log_image(self, image: Any, artifact_file: str) -> None: ...
    def log_figure(self, figure: Any, artifact_file: str) -> None: ...
    def log_curves(self, artifact_file: str = "curves/training.png") -> None: ...
    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self.log_text(json.dumps(data, indent=1, sort_keys=True, default=str), artifact_file)

    @contextmanager
    def child(self, run_name: str) -> Iterator["Tracker"]:
        yield self


class MlflowTracker(Tracker):
    """Logs to one MLflow run (``run_id``)."""

    def __init__(self, run_id: str):
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self.client = MlflowClient()

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k[:250], _param_value(v)) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, int(step or 0)) for k, v in metrics.items()]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    def log_image(self, image: Any, artifact_file: str) -> None:
        """``image``: a PIL image, or a uint8 HWC numpy array."""
        from PIL import Image

        if not isinstance(image, Image.Image):
            image = Image.fromarray(image)
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / Path(artifact_file).name
            image.save(p)
            self.client.log_artifact(self.run_id, str(p), str(Path(artifact_file).parent) or None)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        buf = io.BytesIO()
        figure.savefig(buf, format="png", dpi=120, bbox_inches="tight")
        from PIL import Image

        buf.seek(0)
        self.log_image(Image.open(buf).convert("RGB"), artifact_file)

    #: The curves :meth:`log_curves` draws: metrics under these prefixes, but not throughputs.
    CURVE_PREFIXES = ("train/", "val/")
    MAX_CURVES = 16

    def log_curves(self, artifact_file: str = "curves/training.png") -> None:
        """The run's training curves (``train/*``, ``val/*`` metrics with two or more points) as one
        PNG: MLflow draws each metric on its own page, a researcher wants them side by side."""
        metrics = self.client.get_run(self.run_id).data.metrics
        names = sorted(k for k in metrics if k.startswith(self.CURVE_PREFIXES) and not k.endswith("_per_s"))
        curves = {}
        for name in names:
            history = sorted(self.client.get_metric_history(self.run_id, name), key=lambda m: (m.step, m.timestamp))
            if len(history) >= 2:
                curves[name] = ([m.step for m in history], [m.value for m in history])
        if not curves:
            return
        from arforge.viz import curves_figure

        fig = curves_figure(dict(list(curves.items())[: self.MAX_CURVES]))  # chooses the backend first
        import matplotlib.pyplot as plt

        try:
            self.log_figure(fig, artifact_file)
        finally:
            plt.close(fig)

    @contextmanager
    def child(self, run_name: str) -> Iterator["MlflowTracker"]:
        """A nested run (e.g. one stage of a pipeline, one trial of a study)."""
        run = self.client.get_run(self.run_id)
        child = self.client.create_run(
            run.info.experiment_id, run_name=run_name,
            tags={"mlflow.parentRunId": self.run_id, **{k: v for k, v in run.data.tags.items()
                                                        if k.startswith(("git.", "arforge."))}})
        tracker = MlflowTracker(child.info.run_id)
        status = "FAILED"
        try:
            yield tracker
            status = "FINISHED"
        finally:
            self.client.set_terminated(child.info.run_id, status=status)
