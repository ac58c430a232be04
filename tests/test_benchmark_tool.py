"""tools/benchmark.py: the arforge-alone mode runs and says where it ran; the A B alternation and its statistics.

Nothing here times anything as an assertion (speed lives in the tool and docs/performance.md);
the side-by-side mode needs the upstream code and is not run here.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.plumbing  # a command-line tool's plumbing: no floating-point result compared

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("arforge_tools_benchmark", REPO / "tools" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


class FakeClock:
    """Each call returns the next reading; ``runs`` logs which side ran between readings."""

    def __init__(self, readings):
        self.readings = list(readings)
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.readings.pop(0)


def test_alternate_warms_each_side_once_then_alternates_and_times_with_the_clock(bench):
    order = []
    runs = {"upstream": lambda: order.append("A"), "arforge": lambda: order.append("B")}
    # round 1: A 0->3, B 3->4; round 2: A 10->12, B 12->13.5
    clock = FakeClock([0.0, 3.0, 3.0, 4.0, 10.0, 12.0, 12.0, 13.5])
    seen = []
    times = bench.alternate(runs, 2, clock=clock, report=lambda n, r, dt: seen.append((n, r, dt)))
    assert order == ["A", "B", "A", "B", "A", "B"]  # one warm-up each (untimed), then A B A B
    assert clock.calls == 8 and not clock.readings  # the warm-ups read no clock
    assert times == {"upstream": [3.0, 2.0], "arforge": [1.0, 1.5]}
    assert seen == [("upstream", 0, 3.0), ("arforge", 0, 1.0), ("upstream", 1, 2.0), ("arforge", 1, 1.5)]


def test_alternate_without_warmup_and_refuses_zero_repeats(bench):
    order = []
    times = bench.alternate({"a": lambda: order.append("a")}, 1, warmup=False, clock=FakeClock([1.0, 1.25]))
    assert order == ["a"] and times == {"a": [0.25]}
    with pytest.raises(ValueError, match="repeats"):
        bench.alternate({"a": lambda: None}, 0)


def test_summary_and_ratio_lines(bench):
    s = bench.summarize([4.0, 2.0, 3.0, 10.0])
    assert (s.n, s.median, s.min, s.max) == (4, 3.5, 2.0, 10.0)
    assert s.spread == pytest.approx(8.0 / 3.5)
    with pytest.raises(ValueError):
        bench.summarize([])
    lines = bench.ratio_lines({"upstream": [3.0, 5.0, 4.0], "arforge": [2.0, 1.0, 2.5]}, unit="s", per=4,
                              per_unit="per position")
    assert "median 4.000 s over 3 runs (min 3.000, max 5.000, spread 50%), 1000.0 ms per position" in lines[0]
    assert "median 2.000 s" in lines[1]
    assert "ratio upstream/arforge: 2.00x (medians), 3.00x (best runs), 2.00x (worst runs)" in lines[2]


def test_arforge_alone_at_tiny_size_prints_the_machine_and_a_median(bench, capsys, tmp_path):
    out_json = tmp_path / "bench.json"
    assert bench.main(["--family", "llamagen", "--size", "tiny", "--positions", "2", "--repeats", "1",
                       "--batch", "1", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    machine = next(line for line in out.splitlines() if line.startswith("machine: "))
    assert bench.cpu_model() in machine and "torch " in machine and "dtype float32" in machine
    assert re.search(r"\d+ torch threads", machine)
    assert "positions 2 of 256" in out
    assert re.search(r"arforge: median \d+\.\d+ s over 1 runs", out)
    result = json.loads(out_json.read_text())
    assert result["mode"] == "alone" and len(result["times"]["arforge"]) == 1 and result["positions"] == 2


@pytest.mark.parametrize("argv,needle", [
    (["--against", "llamagen"], "--against and --upstream-dir go together"),
    (["--against", "iar2", "--upstream-dir", "{tmp}", "--train"], "--train compares with LlamaGen"),
    (["--against", "llamagen", "--upstream-dir", "{tmp}/missing"], "is not a folder"),
])
def test_bad_options_are_refused_naming_them(bench, capsys, tmp_path, argv, needle):
    with pytest.raises(SystemExit):
        bench.main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert needle in capsys.readouterr().err


def test_upstream_commit_of_a_folder_that_is_no_checkout(bench, tmp_path):
    assert bench.upstream_commit(tmp_path) == "unknown (not a git checkout)"


def test_with_usage_passes_the_result_through_and_logs_cpu_times_and_page_faults(bench):
    log = []
    run = bench.with_usage(lambda: bytearray(1 << 20), log)  # 1 MiB of fresh memory
    assert len(run()) == 1 << 20 and len(run()) == 1 << 20
    assert len(log) == 2
    for entry in log:
        assert set(entry) == {"user_s", "sys_s", "minor_faults"}
        assert entry["user_s"] >= 0 and entry["sys_s"] >= 0 and entry["minor_faults"] >= 0


def test_throughput_tool_needs_one_of_tokenizer_or_inception(capsys):
    spec = importlib.util.spec_from_file_location("arforge_tools_throughput", REPO / "tools" / "benchmark_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for argv in ([], ["--tokenizer", "vq16", "--inception"]):
        with pytest.raises(SystemExit) as exc:
            module.main(argv)
        assert exc.value.code == 2 and "give one of --tokenizer KIND or --inception" in capsys.readouterr().err
    assert module.TOKENIZERS == ("vq16", "lfq", "semantic_detail")
