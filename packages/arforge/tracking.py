"""MLflow tracking, embedded by default.

With no ``MLFLOW_TRACKING_URI``, runs go to an embedded store in the working
directory::

    ./arforge_runs/mlflow.db      # SQLite tracking store (runs, params, metrics, tags)
    ./arforge_runs/artifacts/     # artifacts (operative gin config, grids, checkpoints)
    ./arforge_runs/optuna.db      # Optuna studies (next to the MLflow store)

``ARFORGE_HOME`` moves that folder. With ``MLFLOW_TRACKING_URI`` set, runs go to
that server, which is probed before any work starts.

Components never import MLflow: trainers and jobs receive a :class:`Tracker`
and call ``log_metrics``/``log_image``; only this module talks to MLflow.
"""

from __future__ import annotations

from arforge.errors import ArforgeError

import io
import json
import os
import subprocess
import tempfile
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no DNS lookups offline

MLFLOW_PARAM_LIMIT = 6000


class TrackingError(ArforgeError):
    """A user-facing tracking problem (e.g. an unreachable tracking server)."""


def home() -> Path:
    """The folder of the embedded stores (``$ARFORGE_HOME`` or ``./arforge_runs``)."""
    return Path(os.environ.get("ARFORGE_HOME", "arforge_runs")).resolve()


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
        base = os.environ.get("ARFORGE_PIPELINE_DIR")
        if not base:
            base = str(home() / "outputs" / os.environ.get("ARFORGE_EXPERIMENT", "default"))
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


def check_reachable(uri: str | None = None, timeout: float = 5.0) -> None:
    """Fail fast, before any work, if an http(s) tracking server does not answer."""
    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    probe = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(probe, timeout=timeout) as resp:
            if resp.status >= 500:
                raise TrackingError(f"MLflow tracking server {uri} answered HTTP {resp.status}")
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            raise TrackingError(f"MLflow tracking server {uri} answered HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise TrackingError(
            f"MLflow tracking server {uri} (from MLFLOW_TRACKING_URI) is unreachable: {exc}. "
            "Start it, fix the URI, or unset MLFLOW_TRACKING_URI to use the embedded store "
            f"in {home()}."
        ) from exc


def configure() -> str:
    """Point MLflow at the configured store; creates the embedded folder if needed."""
    import mlflow

    uri = tracking_uri()
    if uri.startswith("sqlite:"):
        home().mkdir(parents=True, exist_ok=True)
        artifact_root().mkdir(parents=True, exist_ok=True)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
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
