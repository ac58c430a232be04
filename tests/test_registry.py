"""The central registry: entry-point discovery, gin registration, duplicate and unknown names."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import gin
import pytest

from arforge import registry as reg
from plugin_fixtures import TOY_JOB_SOURCE, make_plugin_dist

pytestmark = pytest.mark.plumbing  # no floating-point result compared across kernels

REPO = Path(__file__).resolve().parents[1]


def _env_with(path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(path), env.get("PYTHONPATH", "")])
    return env


def test_out_of_tree_entry_point_is_discovered(tmp_path, monkeypatch):
    root = make_plugin_dist(tmp_path / "site", "toy-arforge-plugin", "1.2", "toy_plugin_a", TOY_JOB_SOURCE,
                            {"quantizers.toy_sign_a": "toy_plugin_a:SignQuantizer"})
    monkeypatch.syspath_prepend(str(root))
    r = reg.Registry()
    r.load_entry_points()
    comp = r.component("quantizers", "toy_sign_a")
    assert comp.distribution == "toy-arforge-plugin==1.2"
    assert comp.source == "toy_plugin_a:SignQuantizer"
    assert comp.description == "Quantise to the sign of each channel (a third-party quantizer)."
    # Registered with gin under its kind: a gin file can name it.
    gin.parse_config("quantizers.toy_sign_a.dim = 7")
    q = gin.get_configurable("quantizers.toy_sign_a")()
    assert q.dim == 7


def test_arforge_plugins_lists_third_party_component(tmp_path):
    root = make_plugin_dist(tmp_path / "site", "toy-arforge-plugin", "1.2", "toy_plugin_b", TOY_JOB_SOURCE,
                            {"quantizers.toy_sign_b": "toy_plugin_b:SignQuantizer",
                             "jobs.toy_fit_b": "toy_plugin_b:toy_fit"})
    out = subprocess.run([sys.executable, "-m", "arforge.cli", "plugins"], capture_output=True, text=True,
                         env=_env_with(root), timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["COMPONENT", "DISTRIBUTION", "DESCRIPTION"]
    row = next(line for line in lines if line.startswith("quantizers.toy_sign_b"))
    assert "toy-arforge-plugin==1.2" in row and "Quantise to the sign" in row
    assert any(line.startswith("jobs.toy_fit_b ") for line in lines)
    # The built-in plugins ship through the same mechanism: every listed component
    # names the distribution that declared its entry point.
    assert all(len(line.split()) >= 2 for line in lines[1:])


def test_duplicate_name_names_both_sources(tmp_path, monkeypatch):
    a = make_plugin_dist(tmp_path / "a", "plugin-one", "1.0", "dup_one", TOY_JOB_SOURCE,
                         {"quantizers.dup_sign": "dup_one:SignQuantizer"})
    b = make_plugin_dist(tmp_path / "b", "plugin-two", "2.0", "dup_two", TOY_JOB_SOURCE,
                         {"quantizers.dup_sign": "dup_two:SignQuantizer"})
    monkeypatch.syspath_prepend(str(a))
    monkeypatch.syspath_prepend(str(b))
    with pytest.raises(reg.DuplicateComponentError) as err:
        reg.Registry().load_entry_points()
    msg = str(err.value)
    assert "quantizers.dup_sign" in msg
    assert "plugin-one==1.0 (dup_one:SignQuantizer)" in msg
    assert "plugin-two==2.0 (dup_two:SignQuantizer)" in msg


def test_unknown_name_lists_registered_and_closest():
    r = reg.Registry()
    r._loaded_entry_points = True  # only what this test registers
    for name in ("lfq", "vq", "semantic_detail"):
        r.register("quantizers", name, type(name, (), {"__doc__": f"{name} quantizer"}))
    with pytest.raises(reg.UnknownComponentError) as err:
        r.get("quantizers", "lfqq")
    msg = str(err.value)
    assert "unknown quantizer 'lfqq'" in msg
    assert "did you mean quantizers.lfq?" in msg
    assert "Registered quantizers: lfq, semantic_detail, vq." in msg


def test_unknown_kind_and_bad_entry_point_name_are_errors(tmp_path, monkeypatch):
    r = reg.Registry()
    with pytest.raises(reg.RegistryError, match="did you mean 'quantizers'"):
        r.register("quantizer", "x", object)
    root = make_plugin_dist(tmp_path / "site", "bad-plugin", "0.1", "bad_plugin", TOY_JOB_SOURCE,
                            {"toyfit": "bad_plugin:toy_fit"})
    monkeypatch.syspath_prepend(str(root))
    with pytest.raises(reg.RegistryError, match="must be '<kind>.<name>'"):
        reg.Registry().load_entry_points()


def test_broken_plugin_import_names_the_plugin(tmp_path, monkeypatch):
    root = make_plugin_dist(tmp_path / "site", "broken-plugin", "0.1", "broken_plugin",
                            "raise ImportError('needs libfoo')\n", {"heads.broken": "broken_plugin:Head"})
    monkeypatch.syspath_prepend(str(root))
    with pytest.raises(reg.RegistryError) as err:
        reg.Registry().load_entry_points()
    assert "heads.broken" in str(err.value) and "broken-plugin==0.1" in str(err.value)
    assert "needs libfoo" in str(err.value)


def _declared_entry_points() -> dict[str, dict[str, str]]:
    """``{distribution: {"<kind>.<name>": "module:attr"}}`` as the two pyproject files declare them."""
    import tomllib

    out = {}
    for path in (REPO / "pyproject.toml", REPO / "plugins" / "pyproject.toml"):
        project = tomllib.loads(path.read_text())["project"]
        out[project["name"]] = project["entry-points"][reg.ENTRY_POINT_GROUP]
    return out


def test_every_builtin_entry_point_loads_and_is_in_gin():
    """The registry holds exactly what arforge and arforge-plugins declare, each under its kind in gin."""
    r = reg.load_plugins()
    declared = _declared_entry_points()
    assert set(declared) == {"arforge", "arforge-plugins"}
    for dist, entries in declared.items():
        registered = {c.qualified_name: c for c in r.all() if c.distribution.split("==")[0] == dist}
        # an entry point added to or dropped from pyproject.toml without reinstalling shows up here
        assert set(registered) == set(entries), (dist, sorted(set(registered) ^ set(entries)))
        for qualified, source in entries.items():
            comp = registered[qualified]
            assert comp.kind in reg.KINDS and comp.source == source, (qualified, comp.source)
            module, _, attr = source.partition(":")
            assert comp.obj is getattr(importlib.import_module(module), attr), qualified
            configurable = gin.get_configurable(qualified)
            # gin wraps a function (functools.wraps) and subclasses a class; either way this object
            assert getattr(configurable, "__wrapped__", None) is comp.obj or (
                isinstance(configurable, type) and issubclass(configurable, comp.obj)), qualified
