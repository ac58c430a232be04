"""``arforge run FILE.gin --dry-run``: check a launch without data, weights or compute.

The launch file is parsed, the job's required bindings are checked, and every
model-like component it names (models, tokenizers, quantizers, factorizations,
heads, backbones, guidance, and the modules inside ``loaders.*``) is built on
the meta device, so even a 3B-parameter model costs no memory. Then:

* the tokenizer's codebook sizes must equal the factorization's, and the
  head's vocabularies the factorization's sub-vocabularies (ARModel checks
  the latter when it is built);
* the model's sequence length must equal the tokenizer's grid at the launch's
  image size (``IMAGE_SIZE`` macro or ``jobs.extract_codes.image_size``);
* a model built from a named preset must have the preset's documented number
  of parameters (``documented_params``);
* a pipeline's stages are checked the same way, each with the pipeline's bindings.

Datasets, evaluators, feature extractors and losses (which may need files such
as LPIPS or Inception weights) are not built.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import gin
import torch

from arforge.errors import ConfigError

BUILT_KINDS = ("models", "tokenizers", "quantizers", "factorizations", "heads", "backbones", "guidance")


@dataclass
class DryRunReport:
    file: str
    job: str
    built: dict[str, str] = field(default_factory=dict)  #: parameter -> what was built
    checks: list[str] = field(default_factory=list)
    stages: list["DryRunReport"] = field(default_factory=list)

    def lines(self, indent: str = "") -> list[str]:
        out = [f"{indent}{self.file}: job {self.job}"]
        out += [f"{indent}  built {k}: {v}" for k, v in self.built.items()]
        out += [f"{indent}  ok: {c}" for c in self.checks]
        for st in self.stages:
            out += st.lines(indent + "  ")
        return out


def _selector(ref: Any) -> str:
    return ref.configurable.selector


def _build(ref: Any) -> Any:
    """Build a gin reference on the meta device; loaders build their ``module`` only."""
    selector = _selector(ref)
    kind = selector.split(".")[0]
    if kind == "loaders":
        inner = gin.query_parameter(f"{ref.scoped_selector}.module")
        return _build(inner) if isinstance(inner, gin.config.ConfigurableReference) else inner
    if kind not in BUILT_KINDS:
        return None
    with torch.device("meta"):
        return ref.scoped_configurable_fn()


def _macro(name: str) -> Any:
    try:
        return gin.query_parameter(f"%{name}")
    except ValueError:
        return None


_MACRO_LINE = re.compile(r"^([A-Za-z_][\w./]*) = ")


def _component_macros() -> dict[str, Any]:
    """Every macro whose value is a component this dry run builds (``MODEL = @models.x()``,
    ``TOKENIZER = @loaders.y()``), by name: whatever a file calls them, they name the model and
    the tokenizer whose sizes must agree even where the job reaches them only through a loader."""
    text = gin.config_str()  # gin's public view lists the macros first, one unindented line each
    names: list[str] = []
    if "# Macros:" in text:
        block = text.split("# Macros:", 1)[1].split("\n\n", 1)[0]
        names = [m.group(1) for line in block.splitlines() if (m := _MACRO_LINE.match(line))]
    out = {}
    for name in names:
        ref = _macro(name)
        if isinstance(ref, gin.config.ConfigurableReference) and _builds(ref):
            out[name] = ref
    return out


def _builds(ref: Any) -> bool:
    """Whether :func:`_build` builds ``ref`` (a component of a built kind, or a loader's module)."""
    kind = _selector(ref).split(".")[0]
    return kind in BUILT_KINDS or kind == "loaders"


def dry_run(config_file: str | Path, bindings: Sequence[str] = ()) -> DryRunReport:
    """Check a launch file (and a pipeline's stages); raise :class:`ConfigError` on a problem."""
    from arforge import launch

    config_file = Path(config_file)
    launch.parse(config_file, bindings)
    where = str(config_file)
    try:
        job_ref = gin.query_parameter("arforge.launch.job")
    except ValueError:
        # A preset or shared file (no launch): build and check what it defines.
        report = DryRunReport(file=where, job="(no launch: preset)")
        built = {}
        for macro, ref in _component_macros().items():
            built[macro.lower()] = _build(ref)
            report.built[f"%{macro}"] = type(built[macro.lower()]).__name__
        _check(report, {k: v for k, v in built.items() if v is not None}, where)
        return report
    try:
        gin.query_parameter("arforge.launch.experiment")
    except ValueError:
        raise ConfigError(f"{where}: missing required value arforge.launch.experiment") from None
    job_selector = job_ref.selector if hasattr(job_ref, "selector") else _selector(job_ref)
    fn = gin.get_configurable(job_selector)  # a function: gin's wrapper keeps its signature
    report = DryRunReport(file=where, job=job_selector)
    bound = gin.get_bindings(job_selector, resolve_references=False, inherit_scopes=False)
    missing = [n for n, p in inspect.signature(fn).parameters.items()
               if p.kind == p.KEYWORD_ONLY and p.default is inspect.Parameter.empty and n not in bound]
    if missing:
        raise ConfigError(f"{where}: missing required value{'s' if len(missing) > 1 else ''} "
                          + ", ".join(f"{job_selector}.{m}" for m in missing))

    built: dict[str, Any] = {}
    for name, value in bound.items():
        if isinstance(value, gin.config.ConfigurableReference):
            try:
                obj = _build(value)
            except ConfigError:
                raise
            except Exception as exc:  # a constructor's own validation: name the binding
                raise ConfigError(f"{where}: building {job_selector}.{name} = @{_selector(value)}() "
                                  f"failed: {type(exc).__name__}: {exc}") from exc
            if obj is not None:
                built[name] = obj
                report.built[name] = type(obj).__name__
    for macro, ref in _component_macros().items():
        if macro.lower() not in built:
            obj = _build(ref)
            if obj is not None:
                built[macro.lower()] = obj
                report.built[f"%{macro}"] = type(obj).__name__
    _check(report, built, where)
    if job_selector.endswith("jobs.pipeline"):
        stages = bound.get("stages", ())
        extra = list(bound.get("bindings", ()))
        for stage in stages:
            report.stages.append(dry_run(config_file.parent / stage, [*extra, *bindings]))
    return report


def _check(report: DryRunReport, built: dict[str, Any], where: str) -> None:
    models = [o for o in built.values() if hasattr(o, "factorization") and hasattr(o, "block_size")]
    tokenizers = [o for o in built.values() if hasattr(o, "codebook_sizes") and hasattr(o, "downsample")]
    for model in models:
        documented = getattr(model, "documented_params", None)
        if documented is not None:
            n = model.num_params()
            if n != documented:
                raise ConfigError(f"{where}: {model.preset} has {n:,} parameters but the preset documents "
                                  f"{documented:,}; the configuration changed the architecture")
            report.checks.append(f"{model.preset}: {n:,} parameters as documented")
    image_size = _macro("IMAGE_SIZE")
    try:
        image_size = image_size or gin.query_parameter("jobs.extract_codes.image_size")
    except ValueError:
        pass
    for model in models:
        fac = model.factorization
        for tok in tokenizers:
            if tuple(tok.codebook_sizes) != tuple(fac.codebook_sizes):
                raise ConfigError(
                    f"{where}: the tokenizer's codebook sizes {tuple(tok.codebook_sizes)} differ from the "
                    f"factorization's {tuple(fac.codebook_sizes)} ({type(fac).__name__}): the AR model "
                    "would read ids it has no embedding for")
            report.checks.append(f"vocabularies: tokenizer {tuple(tok.codebook_sizes)} -> "
                                 f"{type(fac).__name__} {tuple(fac.vocab_sizes)}")
            if isinstance(image_size, int):
                side = image_size // tok.downsample
                if side * side != model.block_size:
                    raise ConfigError(
                        f"{where}: {image_size} px images give a {side}x{side} token grid ({side * side} tokens) "
                        f"but the model's block_size is {model.block_size}")
                report.checks.append(f"sequence: {image_size} px / {tok.downsample} = {side}x{side} = "
                                     f"block_size {model.block_size}")


def print_report(report: DryRunReport) -> None:
    for line in report.lines():
        print(line)
    print("dry run ok: the configuration builds and its parts fit together")
