"""The Python API: load what a run trained, generate images, reconstruct images (docs/api.md).

::

    import arforge

    run = arforge.load("quickstart/pipeline")          # experiment/run, a run id, a folder, a .gin file
    samples = run.generate(classes=[3] * 8, guidance=1.5, seed=0)
    samples.grid()                                     # a PIL image (shown inline in a notebook)
    recon = arforge.reconstruct(run, samples.images)   # tokenize and decode again

Where a run's objects come from
    Every launch writes ``run.json`` into its output folder: the MLflow run id, the launch file
    and every resolved gin binding (docs/tracking.md#resuming-and-runjson). :func:`load` rebuilds
    the components from those recorded bindings, not from the launch file, so a run still loads
    after its launch file changed or moved, from any working directory. The weights come from
    the run's own checkpoints (``<output>/checkpoints``, EMA when there is one, as ``jobs.sample``
    does) or, for a sample run, from the checkpoints and loaders its bindings name
    (``loaders.arforge_checkpoint``, ``loaders.official_*``, docs/checkpoints.md#loading).

    ``outputs:`` and ``pipeline:`` paths in those bindings resolve against the run's own home and
    pipeline folder (taken from where the run folder lies), not the caller's working directory,
    which is what made loading work only from the repository root before.

What each kind of run gives
    ============================  ===========================================================
    job of the run                model, tokenizer
    ============================  ===========================================================
    ``jobs.sample``               the model and tokenizer it sampled with, and its guidance
    ``jobs.train_ar``             the trained model; the tokenizer whose codes it trained on
                                  (named by the codes' ``manifest.json``)
    ``jobs.train_tokenizer``      the tokenizer only
    ``jobs.pipeline`` (a study    its sample stage, else its AR stage
    trial is one)
    ============================  ===========================================================

``load`` replaces gin's global configuration with the loaded run's (as ``arforge run`` does);
the objects it returns do not depend on gin afterwards.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from arforge.errors import ArforgeError

if TYPE_CHECKING:  # torch, gin and PIL are imported when a function needs them: `import arforge` stays cheap
    import torch
    from PIL import Image

__all__ = ["LoadError", "LoadedRun", "Samples", "Reconstruction", "load", "generate", "reconstruct",
           "find_run_dir"]

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
#: The jobs whose runs hold something to load, in the order a pipeline's stages are tried.
_LOADABLE_JOBS = ("sample", "train_ar", "train_tokenizer")


class LoadError(ArforgeError):
    """What was asked for cannot be loaded: no such run, no weights, a job with no model."""


# ============================================================================ results
@dataclass(frozen=True)
class Samples:
    """Generated images, with the classes and settings that made them.

    ``images`` is uint8 (B, H, W, 3). Sample i draws from its own random stream, seeded by
    (``seed``, i) as ``jobs.sample`` seeds its samples (:func:`arforge.sampling_job.sample_seed`),
    so it does not depend on the other samples or the batch size, up to the floating-point
    differences some kernels show between batch shapes.
    """

    images: "torch.Tensor"  #: uint8 (B, H, W, 3)
    labels: "torch.Tensor"  #: int64 (B,)
    seed: int
    guidance: str  #: what guided them ("none", or the schedule's repr)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def pil(self) -> list["Image.Image"]:
        """One PIL image per sample."""
        from PIL import Image

        return [Image.fromarray(im) for im in self.images.cpu().numpy()]

    def grid(self, *, nrow: int | None = None) -> "Image.Image":
        """All samples in one picture, ``nrow`` per row (default: up to 8)."""
        return _grid(self.images, nrow=nrow)

    def _repr_png_(self) -> bytes:  # a notebook cell ending in `samples` shows the grid
        return _png(self.grid())


@dataclass(frozen=True)
class Reconstruction:
    """Images through a tokenizer and back: the originals, the token ids and the decoded images."""

    originals: "torch.Tensor"  #: uint8 (B, H, W, 3), what went in (rounded as the reconstructions are)
    images: "torch.Tensor"  #: uint8 (B, H, W, 3), decoded from ``ids``
    ids: "torch.Tensor"  #: int64 (B, L, S) token ids (docs/architecture.md conventions)
    grid_shape: tuple[int, int]  #: (h, w) tokens

    def pil(self) -> list["Image.Image"]:
        from PIL import Image

        return [Image.fromarray(im) for im in self.images.cpu().numpy()]

    def grid(self, *, nrow: int | None = None) -> "Image.Image":
        """Each row of originals with their reconstructions right below, ``nrow`` per row (default up to 8)."""
        from arforge.viz import reconstruction_grid

        def signed(u8: "torch.Tensor") -> "torch.Tensor":  # uint8 NHWC -> [-1, 1] NCHW, which to_uint8 inverts exactly
            return u8.permute(0, 3, 1, 2).float() / 127.5 - 1.0

        return reconstruction_grid(signed(self.originals), signed(self.images), per_row=nrow or 8)

    def _repr_png_(self) -> bytes:
        return _png(self.grid())


@dataclass
class LoadedRun:
    """The trained objects of a run (or of a launch file that loads official checkpoints).

    ``model`` or ``tokenizer`` is None when the run has none (a tokenizer run has no AR model).
    Both are in eval mode on ``device`` and marked with the checkpoint that filled them
    (:func:`arforge.checkpoint.loaded_from`).
    """

    model: Any  #: an :class:`arforge.ar_model.ARModel`, or None
    tokenizer: Any  #: a tokenizer module (``encode``/``decode``), or None
    config: dict[str, str]  #: the run's resolved gin bindings, ``selector.param`` -> gin text
    source: str  #: what was asked for
    run_dir: Path | None = None  #: the output folder the objects came from
    run_id: str | None = None  #: its MLflow run id
    job: str | None = None  #: the job of that run (``sample``, ``train_ar``, ...)
    guidance: Any = None  #: the run's own guidance schedule (sample runs), else None
    sampling: dict[str, Any] = field(default_factory=dict)  #: the run's temperature/top_k/top_p
    checkpoints: dict[str, str] = field(default_factory=dict)  #: ``model``/``tokenizer`` -> what filled it
    device: Any = None

    @property
    def config_str(self) -> str:
        """The bindings as gin text (parseable: ``gin.parse_config(run.config_str)``)."""
        return "\n".join(f"{_binding_line(k)} = {v}" for k, v in self.config.items())

    def generate(self, *, classes: int | Sequence[int] | "torch.Tensor", guidance: Any = "run", seed: int = 0,
                 temperature: float | Sequence[float] | None = None, top_k: int | Sequence[int] | None = None,
                 top_p: float | Sequence[float] | None = None, batch_size: int = 64,
                 progress: bool = False) -> Samples:
        """:func:`generate` with this run's model and tokenizer."""
        return generate(self, classes=classes, guidance=guidance, seed=seed, temperature=temperature,
                        top_k=top_k, top_p=top_p, batch_size=batch_size, progress=progress)

    def reconstruct(self, images: Any, *, batch_size: int = 64) -> Reconstruction:
        """:func:`reconstruct` with this run's tokenizer."""
        return reconstruct(self, images, batch_size=batch_size)

    def __repr__(self) -> str:
        what = ", ".join(f"{k}={type(v).__name__}" for k, v in (("model", self.model), ("tokenizer", self.tokenizer))
                         if v is not None)
        return f"LoadedRun({what}, job={self.job!r}, run_dir={str(self.run_dir) if self.run_dir else None!r})"


# ============================================================================ finding runs
def _homes(home: str | os.PathLike | None) -> list[Path]:
    """Where runs are looked for: ``home`` if given, else ``$ARFORGE_HOME`` (or ./arforge_runs) and
    the checkout's ``arforge_runs`` (where the README's commands, run from the repository root, put
    them), so a notebook in another folder finds the quickstart's runs."""
    from arforge import tracking
    from arforge.launch import repo_root

    if home is not None:
        return [Path(home).expanduser().resolve()]
    homes = [tracking.home()]
    root = repo_root()
    if root is not None and (root / "arforge_runs").is_dir() and (root / "arforge_runs").resolve() not in homes:
        homes.append((root / "arforge_runs").resolve())
    return homes


def _run_dir_of(path: Path) -> Path | None:
    """The run folder holding ``path`` (itself, or a checkpoint folder inside it), if any."""
    for p in (path, *list(path.parents)[:3]):
        if (p / "run.json").is_file():
            return p
    return None


def find_run_dir(run: str | os.PathLike, *, home: str | os.PathLike | None = None) -> Path:
    """The output folder of ``run``: a folder (or a checkpoint inside one), ``outputs:<experiment>/<run>``,
    ``<experiment>/<run>[/<stage>]`` under the home's ``outputs/``, or an MLflow run id."""
    text = str(run)
    homes = _homes(home)
    tried: list[str] = []
    candidates: list[Path] = []
    if text.startswith("outputs:"):
        candidates += [h / "outputs" / text[len("outputs:"):].lstrip("/") for h in homes]
    else:
        candidates.append(Path(text).expanduser())
        if not Path(text).is_absolute():
            candidates += [h / "outputs" / text for h in homes]
    for c in candidates:
        tried.append(str(c))
        if c.exists():
            found = _run_dir_of(c.resolve())
            if found is not None:
                return found
    if _RUN_ID.match(text):  # an MLflow run id: its run.json names it
        for h in homes:
            tried.append(f"{h / 'outputs'}/**/run.json with run_id {text}")
            for state_file in sorted((h / "outputs").glob("**/run.json")):
                if _read_state(state_file, strict=False).get("run_id") == text:
                    return state_file.parent
    raise LoadError(
        f"no run {text!r}: looked for " + "; ".join(tried) + ". Give a run's output folder, "
        "'<experiment>/<run name>' (as under $ARFORGE_HOME/outputs), 'outputs:<experiment>/<run name>', an MLflow "
        "run id, or a launch .gin file; set ARFORGE_HOME (or home=...) to the folder that holds the runs.")


def _read_state(path: Path, *, strict: bool = True) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
        return state
    except (OSError, ValueError) as exc:
        if not strict:
            return {}
        raise LoadError(f"{path} is unreadable ({exc}); it is written by every launch, so this folder is not a "
                        "complete run") from None


def _home_of(run_dir: Path) -> Path | None:
    """``<home>`` of ``<home>/outputs/<experiment>/<run>[/<stage>...]``."""
    for p in run_dir.parents:
        if p.name == "outputs":
            return p.parent
    return None


# ============================================================================ gin state
@contextlib.contextmanager
def _run_env(run_dir: Path | None, experiment: str | None, *,
             home: str | os.PathLike | None = None) -> Iterator[None]:
    """``outputs:``/``pipeline:`` paths resolve as they did for the run: against its home, its
    pipeline folder (the run folder's parent: a pipeline's, or the experiment's for a lone stage).
    Without a run folder (a launch file), against ``home`` and the experiment's folder, as a launch would."""
    from arforge import tracking

    saved = {k: os.environ.get(k) for k in ("ARFORGE_HOME", "ARFORGE_PIPELINE_DIR", "ARFORGE_EXPERIMENT")}
    pipeline_dir = run_dir.parent if run_dir is not None else None
    try:
        home = _home_of(run_dir) if run_dir is not None else home
        if home is not None:
            os.environ["ARFORGE_HOME"] = str(home)
        if pipeline_dir is not None:
            os.environ["ARFORGE_PIPELINE_DIR"] = str(pipeline_dir)
        if experiment:
            os.environ["ARFORGE_EXPERIMENT"] = experiment
        # Newer arforge scopes "pipeline:" paths with tracking.path_scope, older with the environment.
        scope = getattr(tracking, "path_scope", None)
        with (scope(experiment=experiment, pipeline_dir=pipeline_dir) if scope else contextlib.nullcontext()):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _binding_line(key: str) -> str:
    """``MODEL/gin.macro.value`` (how gin stores a macro) -> ``MODEL``."""
    return key[: -len("/gin.macro.value")] if key.endswith("/gin.macro.value") else key


def guidance_kind() -> str:
    """The registry kind of guidance schedules: ``guidance`` (``samplers`` in older arforge)."""
    from arforge import registry as reg

    return "guidance" if "guidance" in reg.KINDS else "samplers"


def _modernised(bindings: Mapping[str, str]) -> dict[str, str]:
    """Recorded bindings in the installed arforge's names: runs made before the guidance kind was
    called ``guidance`` name ``samplers.*`` and ``jobs.sample.sampler``."""
    kind = guidance_kind()
    if kind == "samplers":
        return dict(bindings)
    out = {}
    for k, v in bindings.items():
        k = re.sub(r"(^|/)samplers\.", r"\1guidance.", k)
        if k == "jobs.sample.sampler":
            k = "jobs.sample.guidance"
        out[k] = re.sub(r"@(\w+/)?samplers\.", r"@\1guidance.", v)
    return out


def _parse_bindings(bindings: Mapping[str, str], *, where: Path) -> None:
    from arforge import launch
    from arforge.errors import ConfigError

    # A value gin could not write back as text is recorded as null: it cannot be rebuilt from
    # run.json, and the component's default is all a later parse could give it.
    lines = [f"{_binding_line(k)} = {v}" for k, v in bindings.items() if v is not None]
    unwritable = [k for k, v in bindings.items() if v is None]
    if unwritable:
        print(f"arforge.load: {where} records no gin text for {', '.join(unwritable)}; "
              "they take their defaults", flush=True)
    try:
        launch.parse(None, lines)
    except ConfigError as exc:
        raise LoadError(f"{where}: a recorded binding does not parse with the installed arforge and plugins "
                        f"({exc}). Install the plugins the run was made with (its MLflow tag arforge.plugins "
                        "lists them), or load it with the arforge version that made it.") from None


def _has(binding: str) -> bool:
    import gin

    try:
        gin.query_parameter(binding)
        return True
    except ValueError:
        return False


def _build(binding: str) -> Any:
    """The value of ``binding`` as the job would have received it (references called, macros expanded)."""
    import gin

    return _evaluate(gin.query_parameter(binding))


def _evaluate(value: Any) -> Any:
    import gin

    if isinstance(value, gin.config.ConfigurableReference):
        return value.scoped_configurable_fn() if value.evaluate else value.scoped_configurable_fn
    if isinstance(value, (list, tuple)):
        return type(value)(_evaluate(v) for v in value)
    if isinstance(value, dict):
        return {k: _evaluate(v) for k, v in value.items()}
    return value


def _job_of(bindings: Mapping[str, str]) -> str | None:
    for k, v in bindings.items():
        if k.split("/")[-1] in ("launch.job", "arforge.launch.job"):
            m = re.match(r"@(?:\w+/)?jobs\.(\w+)", v.strip())
            return m.group(1) if m else v
    return None


# ============================================================================ weights
def _load_weights(module: Any, checkpoint: str | os.PathLike, *, which: str, what: str, where: Path | str) -> str:
    """Load ``model``/``ema`` weights of an arforge checkpoint folder into ``module`` strictly, marking it
    (``which="auto"``: ``ema`` when the checkpoint has it, as ``jobs.sample`` does)."""
    from arforge.checkpoint import CheckpointError, load_checkpoint, mark_loaded, strip_wrapper_prefixes
    from arforge.tracking import resolve_path

    path = resolve_path(checkpoint)
    if not Path(path).exists():
        raise LoadError(f"{where}: the {what} checkpoint {checkpoint} ({path}) does not exist. Was the run moved "
                        "without its checkpoints, or did it stop before its first checkpoint?")
    ckpt = load_checkpoint(path)
    entry = which if which != "auto" else ("ema" if "ema" in ckpt.weights else "model")
    if entry not in ckpt.weights:
        raise LoadError(f"{ckpt.path} has no {entry!r} weights (it has {', '.join(sorted(ckpt.weights))}); "
                        f"load with weights='auto', 'model' or 'ema' from those")
    try:
        module.load_state_dict(strip_wrapper_prefixes(ckpt.weights[entry]), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{ckpt.path} [{entry}] does not fit the {what} its run's bindings build "
                              f"({type(module).__name__}): {str(exc)[:1000]}") from exc
    mark_loaded(module, ckpt.path)
    return f"{ckpt.path} [{entry}]"


def _filled_by(module: Any) -> str | None:
    from arforge.checkpoint import loaded_from

    return loaded_from(module)


# ============================================================================ load
def load(source: str | os.PathLike, *, bind: Sequence[str] = (), device: str = "auto",
         weights: str = "auto", home: str | os.PathLike | None = None) -> LoadedRun:
    """The trained model, tokenizer and configuration of a run.

    Args:
        source: a run's output folder (or a checkpoint folder in it); ``<experiment>/<run name>``
            (``quickstart/pipeline``, or a stage: ``quickstart/pipeline/ar``) or
            ``outputs:<experiment>/<run name>``, looked up under ``$ARFORGE_HOME/outputs`` and the
            checkout's ``arforge_runs``; an MLflow run id; or a launch ``.gin`` file of
            ``jobs.sample``, whose loaders (``loaders.official_*``, ``loaders.arforge_checkpoint``)
            fill the model and tokenizer: that is how official checkpoints load, e.g.
            ``load("experiments/llamagen/official_sample.gin", bind=['AR_OFFICIAL = "/ckpts/c2i_B_384.pt"'])``.
            A launch file of another job loads the run it writes.
        bind: extra gin bindings for a launch file (as ``arforge run --bind``).
        device: ``auto``, ``cpu``, ``cuda``, ``npu`` (``cuda:1``...).
        weights: ``auto`` (EMA when a checkpoint has it), ``model`` or ``ema``, for arforge checkpoints.
        home: the folder holding ``outputs/`` (default ``$ARFORGE_HOME``, then the checkout's ``arforge_runs``).

    Raises:
        LoadError: no such run, nothing trained in it, or missing checkpoints; the message says
            what was tried and what to give instead.
    """
    if weights not in ("auto", "model", "ema"):
        raise LoadError(f"weights must be 'auto', 'model' or 'ema', not {weights!r}")
    text = str(source)
    path = Path(text).expanduser()
    if text.endswith(".gin"):
        if not path.is_file():
            raise LoadError(f"launch file {text} does not exist (working directory {Path.cwd()}); give its path")
        loaded = _load_launch_file(path.resolve(), list(bind), weights=weights, home=home)
    else:
        if bind:
            raise LoadError("bind=... applies to a launch .gin file; a run is loaded with the bindings it recorded")
        if path.is_file() and path.suffix in _CHECKPOINT_SUFFIXES:
            raise LoadError(
                f"{text} is a checkpoint file. An official checkpoint loads through a launch file that names its "
                f"loader (loaders.official_*, docs/checkpoints.md#loading), e.g. "
                f"arforge.load('experiments/llamagen/official_sample.gin', bind=['AR_OFFICIAL = \"{text}\"'])")
        loaded = _load_run(find_run_dir(text, home=home), weights=weights, source=text)
    return _to_device(loaded, device)


def _to_device(loaded: LoadedRun, device: str) -> LoadedRun:
    import torch

    from arforge.device import resolve_device

    dev = resolve_device(device)
    for module in (loaded.model, loaded.tokenizer):
        if isinstance(module, torch.nn.Module):
            module.to(dev).eval()
    loaded.device = dev
    return loaded


def _load_launch_file(path: Path, bind: list[str], *, weights: str, home: str | os.PathLike | None) -> LoadedRun:
    from arforge import launch

    launch.parse(path, bind)
    bindings = launch.bound_parameters()
    job = _job_of(bindings)
    if job != "sample":
        # A training launch file names a run: load what that run trained.
        experiment = str(_build("arforge.launch.experiment"))
        run_name = str(_build("arforge.launch.run_name") if _has("arforge.launch.run_name") else job)
        out = (_build("arforge.launch.output_dir") if _has("arforge.launch.output_dir") else None)
        run_dir = Path(out) if out else launch.default_output_dir(experiment, run_name)
        if home is not None and not out:
            run_dir = Path(home) / "outputs" / run_dir.parent.name / run_dir.name
        if not (run_dir / "run.json").is_file():
            raise LoadError(f"{path} is a launch file of jobs.{job}, whose run would be {run_dir}, which holds no "
                            f"run.json: run it first (arforge run {path}); if it ran as a stage of a pipeline, load "
                            f"the pipeline or the stage ('{experiment}/<pipeline run>/{run_name}')")
        return _load_run(run_dir, weights=weights, source=str(path))
    experiment = str(_build("arforge.launch.experiment")) if _has("arforge.launch.experiment") else None
    with _run_env(None, experiment, home=home):
        model, tokenizer, guidance, sampling, filled = _build_sample_job(path, weights=weights)
    return LoadedRun(model=model, tokenizer=tokenizer, config=bindings, source=str(path), job=job,
                     guidance=guidance, sampling=sampling, checkpoints=filled)


def _load_run(run_dir: Path, *, weights: str, source: str, tokenizer_step: Path | None = None) -> LoadedRun:
    state_file = run_dir / "run.json"
    state = _read_state(state_file)
    bindings = state.get("bindings")
    if not isinstance(bindings, dict):
        raise LoadError(f"{state_file} records no bindings (written by an older arforge?); load the run's launch "
                        f"file instead: arforge.load({state.get('config_file')!r})")
    job = _job_of(bindings)
    common = dict(config=dict(bindings), source=source, run_dir=run_dir, run_id=state.get("run_id"), job=job)
    if state.get("status") not in (None, "FINISHED"):
        # A run that is still going (or died) has checkpoints: say so, and load the newest.
        print(f"arforge.load: run {run_dir} has status {state.get('status')}, not FINISHED; loading what it "
              "has written so far", flush=True)
    if job == "pipeline":
        return _load_pipeline(run_dir, weights=weights, source=source)
    if job not in _LOADABLE_JOBS:
        raise LoadError(f"{run_dir} is a run of jobs.{job}, which trains no model or tokenizer; load a run of "
                        f"{', '.join('jobs.' + j for j in _LOADABLE_JOBS)} or a pipeline holding one")
    with _run_env(run_dir, state.get("experiment")):
        _parse_bindings(_modernised(bindings), where=state_file)
        if job == "sample":
            model, tokenizer, guidance, sampling, filled = _build_sample_job(state_file, weights=weights)
            return LoadedRun(model=model, tokenizer=tokenizer, guidance=guidance, sampling=sampling,
                             checkpoints=filled, **common)
        checkpoints = run_dir / "checkpoints"
        if job == "train_tokenizer":
            tok = _build("jobs.train_tokenizer.tokenizer")
            filled = {"tokenizer": _load_weights(tok, tokenizer_step or checkpoints, which=weights,
                                                 what="tokenizer", where=state_file)}
            return LoadedRun(model=None, tokenizer=tok, checkpoints=filled, **common)
        model = _build("jobs.train_ar.model")
        filled = {"model": _load_weights(model, checkpoints, which=weights, what="model", where=state_file)}
        codes = _codes_folder()
    # The tokenizer comes from its own run, parsed after this one's objects are built (gin holds
    # one configuration at a time); this run's bindings are parsed again afterwards, so gin ends
    # up holding the configuration of the run that was asked for.
    tokenizer, tok_filled = _tokenizer_of_codes(codes, weights=weights)
    if tok_filled:
        filled["tokenizer"] = tok_filled
    with _run_env(run_dir, state.get("experiment")):
        _parse_bindings(_modernised(bindings), where=state_file)
    return LoadedRun(model=model, tokenizer=tokenizer, checkpoints=filled, **common)


def _load_pipeline(run_dir: Path, *, weights: str, source: str) -> LoadedRun:
    """A pipeline's (or study trial's) stage that has a model: its sample stage, else its AR stage."""
    stages = {}
    for state_file in sorted(run_dir.glob("*/run.json")):
        state = _read_state(state_file, strict=False)
        job = _job_of(state.get("bindings") or {})
        if job in _LOADABLE_JOBS and state.get("status") == "FINISHED":
            stages.setdefault(job, []).append((state.get("ended", 0), state_file.parent))
    for job in _LOADABLE_JOBS:
        if job in stages:
            stage_dir = max(stages[job])[1]  # the newest, if a pipeline ran the job twice
            loaded = _load_run(stage_dir, weights=weights, source=source)
            return loaded
    raise LoadError(f"pipeline run {run_dir} has no finished stage of "
                    f"{', '.join('jobs.' + j for j in _LOADABLE_JOBS)}: nothing trained to load yet")


def _codes_folder() -> Path | None:
    """The token-code folder the parsed ``jobs.train_ar`` config trains on (``datasets.token_codes.root``)."""
    import gin

    from arforge.tracking import resolve_path

    for binding in ("datasets.token_codes.root", "train/datasets.token_codes.root"):
        if _has(binding):
            return resolve_path(str(_build(binding)))
    for (scope, selector), params in gin.config._CONFIG.items():  # noqa: SLF001  (a scoped dataset binding)
        if selector.endswith("datasets.token_codes") and "root" in params:
            return resolve_path(str(_build(f"{scope + '/' if scope else ''}{selector}.root")))
    return None


def _tokenizer_of_codes(codes: Path | None, *, weights: str) -> tuple[Any, str | None]:
    """The tokenizer that made the codes an AR run trained on: the codes' ``manifest.json`` names its
    checkpoint, and the run folder holding that checkpoint says how to build it."""
    if codes is None:
        return None, None
    manifest = _read_state(codes / "manifest.json", strict=False)
    ckpt = manifest.get("tokenizer_checkpoint")
    tok_run = _run_dir_of(Path(ckpt)) if ckpt and Path(ckpt).exists() else None
    if tok_run is None:
        print(f"arforge.load: {codes / 'manifest.json'} names no tokenizer run (its tokenizer_checkpoint is "
              f"{ckpt!r}); the model is loaded without a tokenizer", flush=True)
        return None, None
    tok = _load_run(tok_run, weights=weights, source=str(tok_run), tokenizer_step=Path(ckpt))
    return tok.tokenizer, tok.checkpoints.get("tokenizer")


def _sample_param(name: str) -> str:
    """``jobs.sample``'s argument for the guidance schedule (``guidance``; ``sampler`` in older arforge)."""
    if name != "guidance":
        return name
    from arforge import registry as reg

    params = inspect.signature(reg.get("jobs", "sample")).parameters
    return "guidance" if "guidance" in params else "sampler"


def _build_sample_job(where: Path, *, weights: str) -> tuple[Any, Any, Any, dict[str, Any], dict[str, str]]:
    """Model, tokenizer, guidance and sampling settings of the parsed ``jobs.sample`` config; the
    model and tokenizer filled by the checkpoints or loaders it names."""
    model = _build("jobs.sample.model")  # a loader binding (loaders.*) fills it while it is built
    tokenizer = _build("jobs.sample.tokenizer")
    filled = {}
    for what, module in (("model", model), ("tokenizer", tokenizer)):
        ckpt_binding = f"jobs.sample.{what}_checkpoint"
        ckpt = _build(ckpt_binding) if _has(ckpt_binding) else None
        which = weights
        if weights == "auto" and _has(f"jobs.sample.{what}_weights"):
            which = str(_build(f"jobs.sample.{what}_weights"))
        if ckpt is not None:
            filled[what] = _load_weights(module, ckpt, which=which, what=what, where=where)
        elif _filled_by(module):
            filled[what] = str(_filled_by(module))
        else:
            raise LoadError(f"{where}: jobs.sample.{what} gets no weights: bind jobs.sample.{what}_checkpoint or "
                            f"a loader (loaders.arforge_checkpoint, loaders.official_*) to it")
    g = _sample_param("guidance")
    guidance = _build(f"jobs.sample.{g}") if _has(f"jobs.sample.{g}") else None
    sampling = {k: _build(f"jobs.sample.{k}") for k in ("temperature", "top_k", "top_p")
                if _has(f"jobs.sample.{k}")}
    return model, tokenizer, guidance, sampling, filled


# ============================================================================ generate
def _guidance(guidance: Any, loaded: LoadedRun | None) -> Any:
    """A schedule object from what the caller gave: a number is constant CFG at that scale."""
    from arforge import registry as reg

    if isinstance(guidance, str) and guidance == "run":
        return loaded.guidance if loaded is not None else None
    if guidance is None:
        return None
    if isinstance(guidance, bool):
        raise LoadError("guidance must be a CFG scale (a number), a guidance schedule object, None or 'run', "
                        f"not {guidance!r}")
    if isinstance(guidance, (int, float)) or (isinstance(guidance, (tuple, list))
                                               and all(isinstance(s, (int, float)) for s in guidance)):
        return reg.get(guidance_kind(), "cfg_constant")(scale=guidance)
    if isinstance(guidance, str):
        kind = guidance_kind()
        raise LoadError(f"guidance={guidance!r}: give a scale (guidance=1.5) or a schedule object, e.g. "
                        f"arforge.registry.get({kind!r}, 'cfg_linear')(start=1.0, end=2.0); registered: "
                        f"{', '.join(reg.names(kind))}")
    if not hasattr(guidance, "scale") or not hasattr(guidance, "guided"):
        raise LoadError(f"guidance={guidance!r} is not a guidance schedule (it needs .guided and .scale(...))")
    return guidance


def _model_and_tokenizer(loaded: Any) -> tuple[Any, Any]:
    if isinstance(loaded, LoadedRun):
        if loaded.model is None:
            raise LoadError(f"{loaded.source} holds no AR model (a jobs.{loaded.job} run): load an AR, sample or "
                            "pipeline run to generate")
        if loaded.tokenizer is None:
            raise LoadError(f"{loaded.source}: no tokenizer was found for its model, so its tokens cannot become "
                            "images; load the pipeline or sample run instead")
        return loaded.model, loaded.tokenizer
    raise LoadError(f"generate needs what arforge.load returned, not {type(loaded).__name__}")


def generate(loaded: LoadedRun, *, classes: int | Sequence[int] | "torch.Tensor", guidance: Any = "run",
             seed: int = 0, temperature: float | Sequence[float] | None = None,
             top_k: int | Sequence[int] | None = None, top_p: float | Sequence[float] | None = None,
             batch_size: int = 64, progress: bool = False) -> Samples:
    """Images of the given classes from a loaded run.

    Args:
        loaded: what :func:`load` returned.
        classes: one class per image (``[3] * 8``), or one class (one image).
        guidance: a CFG scale (``1.5``; a tuple gives one per sub-token), a guidance schedule
            object (``arforge.registry.get("guidance", "cfg_linear")(start=1.0, end=2.0)``),
            None (unguided) or ``"run"``: the run's own schedule (sample runs), else unguided.
        seed: sample i draws from its own stream seeded by (seed, i), as ``jobs.sample`` does.
        temperature, top_k, top_p: per sub-token or for all; default: the run's, else 1.0, 0, 1.0.
        batch_size: images decoded at once (guidance doubles the rows).
        progress: a progress bar per batch.
    """
    import numpy as np
    import torch

    from arforge import generation
    from arforge.interfaces import as_grid
    from arforge.metrics.adm import to_uint8
    from arforge.sampling_job import sample_seed

    model, tokenizer = _model_and_tokenizer(loaded)
    labels = torch.as_tensor([classes] if isinstance(classes, int) else classes, dtype=torch.int64).reshape(-1)
    n_classes = int(model.null_class)
    bad = [int(c) for c in labels if not 0 <= int(c) < n_classes]
    if bad or len(labels) == 0:
        raise LoadError(f"classes must be 1 or more labels in [0, {n_classes}) (the model's classes; "
                        f"{n_classes} is the CFG null class), got {bad[:5] if bad else 'none'}")
    if batch_size < 1:
        raise LoadError(f"batch_size must be >= 1, got {batch_size}")
    schedule = _guidance(guidance, loaded)
    run_sampling = loaded.sampling if isinstance(loaded, LoadedRun) else {}
    settings = generation.sampling_settings(
        model.num_subtokens,
        temperature=run_sampling.get("temperature", 1.0) if temperature is None else temperature,
        top_k=run_sampling.get("top_k", 0) if top_k is None else top_k,
        top_p=run_sampling.get("top_p", 1.0) if top_p is None else top_p)
    device = next(model.parameters()).device
    model.eval()
    if isinstance(tokenizer, torch.nn.Module):
        tokenizer.to(device).eval()
    # The guidance argument of generation.generate was called `sampler` before it was `guidance`.
    kw = "guidance" if "guidance" in inspect.signature(generation.generate).parameters else "sampler"
    grid = as_grid(model.block_size)
    out = []
    starts = range(0, len(labels), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="generate", unit="batch")
    for start in starts:
        lab = labels[start:start + batch_size].to(device)
        gens = [torch.Generator(device=device).manual_seed(sample_seed(seed, i))
                for i in range(start, start + len(lab))]
        sub = generation.generate(model, lab, **{kw: schedule}, sampling=settings, generator=gens)  # (b, L, K)
        out.append(to_uint8(generation.decode_tokens(tokenizer, model.factorization, sub, grid).float()))
    images = torch.from_numpy(np.concatenate(out))  # (B, H, W, 3) uint8
    return Samples(images=images, labels=labels.cpu(), seed=int(seed),
                   guidance="none" if schedule is None or not schedule.guided else repr(schedule))


# ============================================================================ reconstruct
def _as_float_images(images: Any) -> "torch.Tensor":
    """uint8 NHWC / PIL / float NCHW in [-1, 1] -> float (B, 3, H, W) in [-1, 1]."""
    import numpy as np
    import torch

    if hasattr(images, "convert") and hasattr(images, "size"):  # one PIL image
        images = [images]
    if isinstance(images, (list, tuple)) and images and hasattr(images[0], "convert"):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    t = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if t.dim() == 3:
        t = t.unsqueeze(0)
    if t.dim() != 4:
        raise LoadError(f"images must be (B, H, W, 3) uint8, (B, 3, H, W) float in [-1, 1] or PIL images; "
                        f"got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        if t.shape[-1] != 3:
            raise LoadError(f"uint8 images must be (B, H, W, 3), got {tuple(t.shape)}")
        return t.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W), the inverse of to_uint8
    if t.shape[1] != 3:
        raise LoadError(f"float images must be (B, 3, H, W) in [-1, 1], got {tuple(t.shape)}")
    return t.float()


def reconstruct(tokenizer: Any, images: Any, *, batch_size: int = 64) -> Reconstruction:
    """Encode ``images`` to token ids and decode them again.

    Args:
        tokenizer: what :func:`load` returned, or a tokenizer module.
        images: uint8 (B, H, W, 3) (``Samples.images``, an ADM ``.npz``'s ``arr_0``), PIL images,
            or float (B, 3, H, W) in [-1, 1]; H and W multiples of the tokenizer's downsampling.
    """
    import numpy as np
    import torch

    from arforge.metrics.adm import to_uint8

    if isinstance(tokenizer, LoadedRun):
        if tokenizer.tokenizer is None:
            raise LoadError(f"{tokenizer.source} holds no tokenizer (a jobs.{tokenizer.job} run)")
        tokenizer = tokenizer.tokenizer
    if not (hasattr(tokenizer, "encode") and hasattr(tokenizer, "decode")):
        raise LoadError(f"reconstruct needs a tokenizer (encode/decode) or what arforge.load returned, "
                        f"not {type(tokenizer).__name__}")
    x = _as_float_images(images)
    down = int(getattr(tokenizer, "downsample", 1))
    H, W = x.shape[-2:]
    if H % down or W % down:
        raise LoadError(f"images of {H}x{W} px do not tile into {down}x{down}-pixel tokens; crop or resize them "
                        f"to a multiple of {down}")
    grid = (H // down, W // down)
    device = next(tokenizer.parameters()).device if isinstance(tokenizer, torch.nn.Module) else torch.device("cpu")
    if isinstance(tokenizer, torch.nn.Module):
        tokenizer.eval()
    ids_all, recon = [], []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            ids = tokenizer.encode(x[start:start + batch_size].to(device))  # (b, L, S)
            ids_all.append(ids.cpu())
            recon.append(to_uint8(tokenizer.decode(ids, grid).float()))
    return Reconstruction(originals=torch.from_numpy(to_uint8(x)), images=torch.from_numpy(np.concatenate(recon)),
                          ids=torch.cat(ids_all).to(torch.int64), grid_shape=grid)


# ============================================================================ pictures
def _grid(images: "torch.Tensor", *, nrow: int | None) -> "Image.Image":
    from arforge.viz import image_grid

    arr = images.cpu().numpy()
    return image_grid(arr, nrow=nrow or min(len(arr), 8))


def _png(image: "Image.Image") -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
