""":func:`load`: a run's trained model and tokenizer, rebuilt from its recorded bindings (docs/api.md#load).

What is built depends on the run's job (docs/api.md#load has the table): a sample run gives the
model and tokenizer it sampled with and its guidance; an AR run its model and the tokenizer whose
codes it trained on; a tokenizer run its tokenizer; a pipeline (or study trial) its sample stage,
else its AR stage, else its tokenizer stage. Weights load strictly, EMA when a checkpoint has it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from arforge.api.bindings import binding_line, build, has, modernised, parse_bindings, run_scope
from arforge.api.runs import LoadError, find_run_dir, job_of, read_state, run_dir_of

if TYPE_CHECKING:  # torch is imported when a function needs it: `import arforge` stays cheap
    import torch

    from arforge.api.reconstruction import Reconstruction
    from arforge.api.samples import Samples

__all__ = ["LoadedRun", "load"]

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
#: The jobs whose runs hold something to load, in the order a pipeline's stages are tried.
_LOADABLE_JOBS = ("sample", "train_ar", "train_tokenizer")


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
        return "\n".join(f"{binding_line(k)} = {v}" for k, v in self.config.items())

    def generate(self, *, classes: int | Sequence[int] | "torch.Tensor", guidance: Any = "run", seed: int = 0,
                 temperature: float | Sequence[float] | None = None, top_k: int | Sequence[int] | None = None,
                 top_p: float | Sequence[float] | None = None, batch_size: int = 64,
                 progress: bool = False) -> "Samples":
        """:func:`arforge.generate` with this run's model and tokenizer."""
        from arforge.api.samples import generate  # imported here: that module imports this one

        return generate(self, classes=classes, guidance=guidance, seed=seed, temperature=temperature,
                        top_k=top_k, top_p=top_p, batch_size=batch_size, progress=progress)

    def reconstruct(self, images: Any, *, batch_size: int = 64) -> "Reconstruction":
        """:func:`arforge.reconstruct` with this run's tokenizer."""
        from arforge.api.reconstruction import reconstruct  # imported here: that module imports this one

        return reconstruct(self, images, batch_size=batch_size)

    def __repr__(self) -> str:
        what = ", ".join(f"{k}={type(v).__name__}" for k, v in (("model", self.model), ("tokenizer", self.tokenizer))
                         if v is not None)
        return f"LoadedRun({what}, job={self.job!r}, run_dir={str(self.run_dir) if self.run_dir else None!r})"


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


# ============================================================================ launch files and runs
def _load_launch_file(path: Path, bind: list[str], *, weights: str, home: str | os.PathLike | None) -> LoadedRun:
    from arforge import launch  # importing it registers the `arforge.launch` configurable the file binds

    launch.parse(path, bind)
    bindings = launch.bound_parameters()
    job = job_of(bindings)
    if job != "sample":
        # A training launch file names a run: load what that run trained.
        experiment = str(build("arforge.launch.experiment"))
        run_name = str(build("arforge.launch.run_name") if has("arforge.launch.run_name") else job)
        out = (build("arforge.launch.output_dir") if has("arforge.launch.output_dir") else None)
        run_dir = Path(out) if out else launch.default_output_dir(experiment, run_name)
        if home is not None and not out:
            run_dir = Path(home) / "outputs" / run_dir.parent.name / run_dir.name
        if not (run_dir / "run.json").is_file():
            raise LoadError(f"{path} is a launch file of jobs.{job}, whose run would be {run_dir}, which holds no "
                            f"run.json: run it first (arforge run {path}); if it ran as a stage of a pipeline, load "
                            f"the pipeline or the stage ('{experiment}/<pipeline run>/{run_name}')")
        return _load_run(run_dir, weights=weights, source=str(path))
    experiment = str(build("arforge.launch.experiment")) if has("arforge.launch.experiment") else None
    with run_scope(None, experiment, home=home):
        model, tokenizer, guidance, sampling, filled = _build_sample_job(path, weights=weights)
    return LoadedRun(model=model, tokenizer=tokenizer, config=bindings, source=str(path), job=job,
                     guidance=guidance, sampling=sampling, checkpoints=filled)


def _load_run(run_dir: Path, *, weights: str, source: str, tokenizer_step: Path | None = None) -> LoadedRun:
    state_file = run_dir / "run.json"
    state = read_state(state_file)
    bindings = state.get("bindings")
    if not isinstance(bindings, dict):
        raise LoadError(f"{state_file} records no bindings (written by an older arforge?); load the run's launch "
                        f"file instead: arforge.load({state.get('config_file')!r})")
    job = job_of(bindings)
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
    with run_scope(run_dir, state.get("experiment")):
        parse_bindings(modernised(bindings), where=state_file)
        if job == "sample":
            model, tokenizer, guidance, sampling, filled = _build_sample_job(state_file, weights=weights)
            return LoadedRun(model=model, tokenizer=tokenizer, guidance=guidance, sampling=sampling,
                             checkpoints=filled, **common)
        checkpoints = run_dir / "checkpoints"
        if job == "train_tokenizer":
            tok = build("jobs.train_tokenizer.tokenizer")
            filled = {"tokenizer": _load_weights(tok, tokenizer_step or checkpoints, which=weights,
                                                 what="tokenizer", where=state_file)}
            return LoadedRun(model=None, tokenizer=tok, checkpoints=filled, **common)
        model = build("jobs.train_ar.model")
        filled = {"model": _load_weights(model, checkpoints, which=weights, what="model", where=state_file)}
        codes = _codes_folder()
    # The tokenizer comes from its own run, parsed after this one's objects are built (gin holds
    # one configuration at a time); this run's bindings are parsed again afterwards, so gin ends
    # up holding the configuration of the run that was asked for.
    tokenizer, tok_filled = _tokenizer_of_codes(codes, weights=weights)
    if tok_filled:
        filled["tokenizer"] = tok_filled
    with run_scope(run_dir, state.get("experiment")):
        parse_bindings(modernised(bindings), where=state_file)
    return LoadedRun(model=model, tokenizer=tokenizer, checkpoints=filled, **common)


def _load_pipeline(run_dir: Path, *, weights: str, source: str) -> LoadedRun:
    """A pipeline's (or study trial's) stage that has a model: its sample stage, else its AR stage."""
    stages = {}
    for state_file in sorted(run_dir.glob("*/run.json")):
        state = read_state(state_file, strict=False)
        job = job_of(state.get("bindings") or {})
        if job in _LOADABLE_JOBS and state.get("status") == "FINISHED":
            stages.setdefault(job, []).append((state.get("ended", 0), state_file.parent))
    for job in _LOADABLE_JOBS:
        if job in stages:
            stage_dir = max(stages[job])[1]  # the newest, if a pipeline ran the job twice
            return _load_run(stage_dir, weights=weights, source=source)
    raise LoadError(f"pipeline run {run_dir} has no finished stage of "
                    f"{', '.join('jobs.' + j for j in _LOADABLE_JOBS)}: nothing trained to load yet")


# ============================================================================ what the job was given
def _codes_folder() -> Path | None:
    """The token-code folder the parsed ``jobs.train_ar`` config trains on (``datasets.token_codes.root``)."""
    from arforge.gin_parsing import bindings_of, bound_configurables
    from arforge.tracking import resolve_path

    for binding in ("datasets.token_codes.root", "train/datasets.token_codes.root"):
        if has(binding):
            return resolve_path(str(build(binding)))
    for scope, selector in bound_configurables():  # a dataset bound in another scope
        if selector.endswith("datasets.token_codes") and "root" in bindings_of(scope, selector):
            return resolve_path(str(build(f"{scope + '/' if scope else ''}{selector}.root")))
    return None


def _tokenizer_of_codes(codes: Path | None, *, weights: str) -> tuple[Any, str | None]:
    """The tokenizer that made the codes an AR run trained on: the codes' ``manifest.json`` names its
    checkpoint, and the run folder holding that checkpoint says how to build it."""
    if codes is None:
        return None, None
    manifest = read_state(codes / "manifest.json", strict=False)
    ckpt = manifest.get("tokenizer_checkpoint")
    tok_run = run_dir_of(Path(ckpt)) if ckpt and Path(ckpt).exists() else None
    if tok_run is None:
        print(f"arforge.load: {codes / 'manifest.json'} names no tokenizer run (its tokenizer_checkpoint is "
              f"{ckpt!r}); the model is loaded without a tokenizer", flush=True)
        return None, None
    tok = _load_run(tok_run, weights=weights, source=str(tok_run), tokenizer_step=Path(ckpt))
    return tok.tokenizer, tok.checkpoints.get("tokenizer")


def _build_sample_job(where: Path, *, weights: str) -> tuple[Any, Any, Any, dict[str, Any], dict[str, str]]:
    """Model, tokenizer, guidance and sampling settings of the parsed ``jobs.sample`` config; the
    model and tokenizer filled by the checkpoints or loaders it names."""
    from arforge.checkpoint import loaded_from

    model = build("jobs.sample.model")  # a loader binding (loaders.*) fills it while it is built
    tokenizer = build("jobs.sample.tokenizer")
    filled = {}
    for what, module in (("model", model), ("tokenizer", tokenizer)):
        ckpt_binding = f"jobs.sample.{what}_checkpoint"
        ckpt = build(ckpt_binding) if has(ckpt_binding) else None
        which = weights
        if weights == "auto" and has(f"jobs.sample.{what}_weights"):
            which = str(build(f"jobs.sample.{what}_weights"))
        if ckpt is not None:
            filled[what] = _load_weights(module, ckpt, which=which, what=what, where=where)
        elif loaded_from(module):
            filled[what] = str(loaded_from(module))
        else:
            raise LoadError(f"{where}: jobs.sample.{what} gets no weights: bind jobs.sample.{what}_checkpoint or "
                            f"a loader (loaders.arforge_checkpoint, loaders.official_*) to it")
    guidance = build("jobs.sample.guidance") if has("jobs.sample.guidance") else None
    sampling = {k: build(f"jobs.sample.{k}") for k in ("temperature", "top_k", "top_p")
                if has(f"jobs.sample.{k}")}
    return model, tokenizer, guidance, sampling, filled


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
