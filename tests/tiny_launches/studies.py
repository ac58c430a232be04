"""``experiments/studies``: the paper-scale Optuna studies, two trials each, at a tiny size.

A study is as tiny as the launch file it studies: its trials get that file's own tiny bindings,
from the module of that file's folder (``tiny_launches/<folder>.py``), and run in that folder's
world (``tiny_launches.world_key``), where the stages its launch reads (trained checkpoints, data)
were written. A new study file is covered by adding nothing, whatever folder it points into.

One override is the studies' own: trials that evaluate samples compute the FID on the small
``feature_extractors.digits_classifier`` (random weights, 8-d features) against a statistics-free
reference batch of the samples' size. Each trial evaluates once, and Inception costs ~1 s to load
and ~0.3 s per image at 299 px on one core here (plus ~25 s per 2048 x 2048 ``sqrtm`` where the
FID needs one); the Inception path is the launch folders' to run.

The checks: two trials ran, nested under the study's MLflow run, each a complete launch of the study's
file whose suggested values lie in the searched ranges, reached a configurable that the trial's
stages really called (gin's operative config), and produced the objective the study recorded, in
Optuna and in MLflow; the study's best is the best trial's.
"""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

import tiny_launches as tl

N_TRIALS = 2  # the harness runs every study with --n-trials 2
REFERENCE_IMAGES = 6
_INDEXED = re.compile(r"^(?P<base>.+)\[(?P<index>\d+)\]$")


def target(lf: tl.LaunchFile) -> tl.LaunchFile:
    """The launch file the study runs for each trial."""
    found = tl.describe(lf.study_launch)
    assert found is not None and found.kind == "run", f"{lf.rel}: study.launch_file is not a launch file"
    return found


def _stages(lf: tl.LaunchFile) -> list[tl.LaunchFile]:
    if lf.job != "jobs.pipeline":
        return [lf]
    names = ast.literal_eval(tl.flat_bindings(lf.path)["jobs.pipeline.stages"])
    return [tl.describe((lf.path.parent / n).resolve()) for n in names]


# -------------------------------------------------------------------------------- bindings
def _sample_side(binds: list[str]) -> int:
    """The side of the images the trials sample: ``jobs.sample.eval_size`` if the launch's tiny
    bindings resize them, else its ``IMAGE_SIZE``."""
    values = {k.strip(): v.strip() for k, _, v in (b.partition("=") for b in binds)}
    side = values.get("jobs.sample.eval_size", "None")
    side = values.get("IMAGE_SIZE") if side == "None" else side
    assert side is not None, f"the tiny bindings set neither jobs.sample.eval_size nor IMAGE_SIZE: {binds}"
    return int(side)


def _feature_extractor(folder: Path, side: int) -> Path:
    import torch

    from arforge_plugins.evaluators.digits_classifier import DigitsClassifier

    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = DigitsClassifier(image_size=side, width=4, feature_dim=8, num_classes=4)
        with torch.no_grad():  # the default init leaves the ReLU features ~0 for any image: a blind FID
            for p in net.parameters():
                torch.nn.init.normal_(p, std=0.3)
    return net.save(folder / "feature_extractor.safetensors")


def _reference(folder: Path, side: int) -> Path:
    rng = np.random.default_rng(2)
    folder.mkdir(parents=True)
    np.savez(folder / "reference.npz",
             arr_0=rng.integers(0, 256, size=(REFERENCE_IMAGES, side, side, 3), dtype=np.uint8),
             arr_1=np.arange(REFERENCE_IMAGES, dtype=np.int64) % 2)
    return folder / "reference.npz"


def evaluation(world: tl.World, side: int) -> dict[str, Path]:
    return {"feature_extractor": world.once(f"studies_feature_extractor_{side}",
                                            lambda f: _feature_extractor(f, side)),
            "reference": world.once(f"studies_reference_{side}", lambda f: _reference(f, side))}


def bindings(lf: tl.LaunchFile, world: tl.World) -> list[str]:
    launch = target(lf)
    binds = list(tl.module_for(launch).bindings(launch, world))
    if "IMAGENET_VAL" in Path(lf.path).read_text():  # a tokenizer study's validation images
        from tiny_launches import _imagenet as im

        binds.append(f'IMAGENET_VAL = "{im.image_folder(world)}"')
    if any(s.job == "jobs.evaluate_samples" for s in _stages(launch)):
        files = evaluation(world, _sample_side(binds))
        binds += [f'REFERENCE = "{files["reference"]}"',
                  "evaluators.generation.feature_extractor = @feature_extractors.digits_classifier()",
                  f'feature_extractors.digits_classifier.path = "{files["feature_extractor"]}"',
                  "evaluators.generation.progress = False"]
    return binds


# ---------------------------------------------------------------------------------- checks
def _client(world: tl.World):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{world.home / 'mlflow.db'}")


def _study_value(lf: tl.LaunchFile, key: str) -> Any:
    return ast.literal_eval(tl.flat_bindings(lf.path)[key])


def _space(lf: tl.LaunchFile) -> dict[str, dict[str, Any]]:
    """``study.space`` as {parameter: {"low", "high", "log"}}, from the study file's own bindings."""
    b = tl.flat_bindings(lf.path)
    text = Path(lf.path).read_text()
    body = text[text.index("study.space"):]
    body = body[body.index("{") + 1:body.index("}")]
    out = {}
    for name, ref in re.findall(r'"([^"]+)"\s*:\s*@([\w/.]+)\(\)', body):
        scope = ref.rsplit("/", 1)[0] if "/" in ref else ""
        prefix = f"{scope}/space.float" if scope else "space.float"
        assert ref.endswith("space.float"), f"{lf.rel}: {name} is searched by @{ref}(); teach the check its kind"
        out[name] = {"low": float(b[f"{prefix}.low"]), "high": float(b[f"{prefix}.high"]),
                     "log": ast.literal_eval(b.get(f"{prefix}.log", "False"))}
    assert out, f"{lf.rel}: no study.space entries found"
    return out


def _operative_config(client, run_id: str, folder: Path) -> str:
    path = client.download_artifacts(run_id, "config/operative_config.gin", str(folder))
    return Path(path).read_text()


def expect(lf: tl.LaunchFile, world: tl.World, result) -> None:
    import optuna

    tl.expect_job(lf, world, result)  # the last trial's launch
    client = _client(world)
    name = Path(lf.path).stem
    parents = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                 f"tags.`arforge.study` = '{name}' and tags.`arforge.role` = 'study'")
    assert len(parents) == 1, [p.info.run_id for p in parents]
    parent = parents[0]
    objective, direction = _study_value(lf, "study.objective"), _study_value(lf, "study.direction")
    trials = sorted((r for r in tl.child_runs(world, parent.info.run_id)
                     if r.data.tags.get("arforge.role") == "trial"),
                    key=lambda r: int(r.data.tags["arforge.trial_number"]))
    assert [t.data.tags["arforge.trial_number"] for t in trials] == [str(i) for i in range(N_TRIALS)], \
        [(t.info.run_name, t.data.tags) for t in trials]
    launch = target(lf)
    space = _space(lf)
    storage = f"sqlite:///{world.home / 'optuna.db'}"
    frozen = {t.number: t for t in optuna.load_study(study_name=name, storage=storage).get_trials()}
    assert sorted(frozen) == list(range(N_TRIALS)), sorted(frozen)
    values = []
    for trial in trials:
        number = int(trial.data.tags["arforge.trial_number"])
        assert trial.info.status == "FINISHED" and trial.data.tags["arforge.trial_state"] == "COMPLETE", \
            (trial.info.status, trial.data.tags.get("arforge.error"))
        assert trial.data.tags["mlflow.runName"] == f"trial-{number:04d}"
        assert trial.data.tags["arforge.config_file"] == str(launch.path), trial.data.tags["arforge.config_file"]
        value = trial.data.metrics[objective]
        assert math.isfinite(value) and value == frozen[number].value, (value, frozen[number].value)
        values.append(value)
        _expect_trial(lf, world, client, trial, frozen[number], space, launch)
    best = min(values) if direction == "minimize" else max(values)
    assert parent.data.metrics[f"best_{objective}"] == best, (parent.data.metrics, values)
    tagged = client.search_runs([parent.info.experiment_id],
                                f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`arforge.best` = 'true'")
    assert [t.data.metrics[objective] for t in tagged] == [best], [t.info.run_name for t in tagged]


def _expect_trial(lf, world, client, trial, frozen, space, launch) -> None:
    """One trial: its suggestions lie in the searched ranges and were bound, as the assembled
    parameter value, in the launch its stages ran with; each searched parameter was read by some
    stage (a name no stage's configurable reads would search nothing)."""
    params = trial.data.params
    suggested: dict[str, dict[int | None, float]] = {}
    for name, bounds in space.items():
        value, searched = frozen.params[name], frozen.distributions[name]
        assert (searched.low, searched.high, searched.log) == (bounds["low"], bounds["high"], bounds["log"]), \
            (name, searched, bounds)  # the file's range, as Optuna searched it
        assert bounds["low"] <= value <= bounds["high"], (name, value, bounds)
        assert math.isclose(float(params[_base(name)].strip("()").split(",")[_index(name) or 0]),
                            value, rel_tol=1e-9), (name, params[_base(name)], value)
        suggested.setdefault(_base(name), {})[_index(name)] = value
    stages = [r for r in tl.child_runs(world, trial.info.run_id)] if launch.job == "jobs.pipeline" else [trial]
    assert len(stages) == len(_stages(launch)), [s.info.run_name for s in stages]
    for stage in stages:  # the objective is the FID of this trial's own samples, on the studies' extractor
        if "eval.samples" in stage.data.params:
            _expect_own_fid(world, trial, stage, _study_value(lf, "study.objective"))
    folder = world.root / "checks" / trial.info.run_id
    used = {s.info.run_name: _operative_config(client, s.info.run_id, folder / s.info.run_name) for s in stages}
    for base, parts in suggested.items():
        expected = tuple(parts[i] for i in sorted(parts)) if None not in parts else parts[None]
        line = _operative_line(base)
        readers = {stage: m.group(1) for stage, text in used.items() if (m := line.search(text))}
        assert readers, f"{lf.rel}: no stage of {launch.rel} reads {base} (searched, but it changes nothing)"
        for stage, text in readers.items():
            bound = ast.literal_eval(text)
            assert np.allclose(np.asarray(bound, dtype=float), np.asarray(expected, dtype=float), rtol=1e-9), \
                (stage, base, bound, expected)


def _expect_own_fid(world: tl.World, trial, stage, objective: str) -> None:
    from arforge.metrics.adm import FeatureStats, frechet_distance
    from arforge_plugins.evaluators.digits_classifier import DigitsClassifier

    params = stage.data.params
    samples = Path(params["eval.samples"])
    assert f"/{trial.info.run_name}/" in str(samples), (trial.info.run_name, samples)  # never another trial's
    net = DigitsClassifier.load(params["eval.weights_file"])
    assert params["eval.weights_file"] == str(evaluation(world, net.image_size)["feature_extractor"])
    with np.load(samples) as s, np.load(params["eval.reference"]) as r:
        fid = frechet_distance(FeatureStats.of(net.features(s["arr_0"]).pool),
                               FeatureStats.of(net.features(r["arr_0"]).pool))
    assert objective == "fid" and math.isclose(trial.data.metrics[objective], fid, rel_tol=1e-6), \
        (objective, trial.data.metrics.get(objective), fid)


def _operative_line(param: str) -> re.Pattern:
    """The line binding ``param`` in gin's operative config, which names a configurable by its
    shortest unambiguous suffix (``cfg_constant.scale``, ``sample.temperature``), maybe scoped."""
    configurable, name = param.rsplit(".", 1)
    short = configurable.rsplit(".", 1)[-1]
    return re.compile(rf"^(?:[\w./]+/)?(?:[\w.]+\.)?{re.escape(short)}\.{re.escape(name)} = (.+)$", re.M)


def _base(name: str) -> str:
    m = _INDEXED.match(name)
    return m.group("base") if m else name


def _index(name: str) -> int | None:
    m = _INDEXED.match(name)
    return int(m.group("index")) if m else None
