"""Every shipped launch file runs end to end at a tiny size and produces what it must.

The tiny overrides and the expected outputs live in ``tests/tiny_launches/`` (one module per
experiment folder); stages that read another stage's outputs run after it in the same home.
"""

from __future__ import annotations

import pytest

import tiny_launches as tl

# plumbing: no floating-point result compared across kernels. one_thread: tiny launches on a busy
# 2-core machine ran several times slower with two OpenMP threads (a 40-image sample took 20 s).
pytestmark = [pytest.mark.plumbing, pytest.mark.usefixtures("one_thread")]

FILES = tl.launch_files()


def _param(lf):
    # One xdist worker per experiment world: its stages share outputs and run in dependency order.
    try:
        world = tl.world_key(lf)
    except ModuleNotFoundError:
        world = lf.folder
    return pytest.param(lf, id=lf.rel, marks=pytest.mark.xdist_group(world))


@pytest.fixture(scope="session")
def runner(tmp_path_factory):
    return tl.Runner(tmp_path_factory)


def test_every_launch_file_has_tiny_overrides():
    missing = []
    for lf in FILES:
        try:
            mod = tl.module_for(lf)
        except ModuleNotFoundError:
            missing.append(f"experiments/{lf.rel}: add tests/tiny_launches/{lf.folder}.py")
            continue
        if not (hasattr(mod, "bindings") and hasattr(mod, "expect")):
            missing.append(f"tests/tiny_launches/{lf.folder}.py needs bindings() and expect()")
    assert not missing, "\n".join(missing)


def test_launch_files_are_found_and_their_dependencies_resolve():
    rels = {lf.rel for lf in FILES}
    assert {"quickstart/pipeline.gin", "llamagen/1_tokenizer.gin", "open_magvit2/official_sample.gin",
            "iar2/2_tokenizer_stage2.gin", "studies/loss_weights.gin"} <= rels
    assert not {"quickstart/common.gin", "llamagen/common.gin", "quickstart/iar2.gin"} & rels
    by_rel = {lf.rel: lf for lf in FILES}
    deps = [d.rel for d in tl.dependencies(by_rel["llamagen/4_sample_b.gin"], FILES)]
    # Macros of common.gin count too (CODES), so the set can be a superset of what the file reads.
    assert {"llamagen/3_ar_b.gin", "llamagen/1_tokenizer.gin"} <= set(deps)
    assert "llamagen/4_sample_b.gin" not in deps and "llamagen/3_ar_l.gin" not in deps


@pytest.mark.parametrize("lf", [_param(lf) for lf in FILES])
def test_launch_file_runs_end_to_end(lf, runner):
    result = runner.run(lf)
    tl.module_for(lf).expect(lf, runner.world(lf), result)
