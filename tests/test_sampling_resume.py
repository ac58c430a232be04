"""jobs.sample at scale: a killed job resumes to the same file, memory does not grow with N,
other settings on resume are refused, and the streamed .npz is np.savez's file byte for byte."""

from __future__ import annotations

import io
import json
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

import arforge.sampling_job as sampling_job
from arforge.errors import ArforgeError
from arforge.sampling_job import work_folder, write_adm_npz
from test_sample_export import SEED, _llamagen_pair, _run
from two_ranks import run_on_ranks

pytestmark = pytest.mark.usefixtures("one_thread")

C, N, BATCH = 3, 3, 2  # 9 samples in batches of 2: 5 batches, the last one short


REAL_GENERATE, REAL_WRITE = sampling_job.generate, sampling_job._write_adm_zip


class Killed(Exception):
    """Stands in for a SIGKILL between two batches."""


def _count_generate(monkeypatch, *, kill_after: int | None = None) -> list[int]:
    """Count the decode batches (jobs.sample calls ``generate`` once per batch); raise after ``kill_after``."""
    calls: list[int] = []

    def counting(model, labels, **kw):
        if kill_after is not None and len(calls) == kill_after:
            raise Killed(f"killed after {kill_after} batches")
        calls.append(len(labels))
        return REAL_GENERATE(model, labels, **kw)

    monkeypatch.setattr(sampling_job, "generate", counting)
    return calls


def _kill(tmp_path: Path, monkeypatch, pair, *, after: int, **kw) -> Path:
    """Start a job into tmp_path/samples.npz and kill it after ``after`` batches; the work folder it left."""
    _count_generate(monkeypatch, kill_after=after)
    with pytest.raises(Killed):
        _run(tmp_path, pair=pair, batch_size=BATCH, **kw)
    monkeypatch.setattr(sampling_job, "generate", REAL_GENERATE)
    assert not (tmp_path / "samples.npz").exists()
    return work_folder(tmp_path / "samples.npz")


def _ledger_count(work: Path) -> int:
    return sum(json.loads(p.read_text())["count"] for p in work.glob("done-rank*.json"))


# ------------------------------------------------------------------ resume
def test_a_killed_job_resumes_where_it_stopped_and_writes_the_same_file(tmp_path, monkeypatch, capsys):
    pair = _llamagen_pair()
    whole = _run(tmp_path / "whole", pair=pair, batch_size=BATCH)
    assert whole["resumed"] == 0 and not work_folder(whole["path"]).exists()  # removed once the file is there

    work = _kill(tmp_path / "resumed", monkeypatch, pair, after=2)
    assert work == tmp_path / "resumed" / "samples.npz.work" and _ledger_count(work) == 2 * BATCH
    capsys.readouterr()
    calls = _count_generate(monkeypatch)
    res = _run(tmp_path / "resumed", pair=pair, batch_size=BATCH, progress=True)  # the same command again
    assert calls == [2, 2, 1]  # only the 3 batches the killed run had not finished, with their old sizes
    assert res["resumed"] == 2 * BATCH and res["num_samples"] == C * N
    assert "4/9" in capsys.readouterr().err  # the bar starts at the resumed count
    assert not work.exists()
    # byte for byte the uninterrupted run's file: resumed batches drew the same random numbers
    assert Path(res["path"]).read_bytes() == Path(whole["path"]).read_bytes()

    # killed after the last batch, before the file was assembled: assembled, nothing decoded again
    def killed(*args, **kw):
        raise Killed("killed while assembling")

    monkeypatch.setattr(sampling_job, "_write_adm_zip", killed)
    with pytest.raises(Killed):
        _run(tmp_path / "late", pair=pair, batch_size=BATCH)
    assert _ledger_count(work_folder(tmp_path / "late" / "samples.npz")) == C * N
    monkeypatch.setattr(sampling_job, "_write_adm_zip", REAL_WRITE)
    calls = _count_generate(monkeypatch)
    late = _run(tmp_path / "late", pair=pair, batch_size=BATCH)
    assert calls == [] and late["resumed"] == C * N
    assert Path(late["path"]).read_bytes() == Path(whole["path"]).read_bytes()


def _resume_rank(out: str) -> None:
    calls = []
    real = sampling_job.generate
    sampling_job.generate = lambda model, labels, **kw: calls.append(len(labels)) or real(model, labels, **kw)
    res = _run(Path(out), batch_size=BATCH)
    (Path(out) / f"rank{torch.distributed.get_rank()}.json").write_text(json.dumps({"result": res, "calls": calls}))


@pytest.mark.multirank
def test_two_ranks_finish_what_one_rank_started(tmp_path, monkeypatch):
    """Each rank writes its own samples into the work file (no pixels gathered) and reads every ledger."""
    whole = _run(tmp_path / "whole", batch_size=BATCH)
    out = tmp_path / "ddp"
    _kill(out, monkeypatch, _llamagen_pair(), after=2)  # samples 0-3 done on one rank
    run_on_ranks(_resume_rank, tmp_path, out=str(out))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["result"] == ranks[1]["result"] and ranks[0]["result"]["resumed"] == 4
    assert ranks[0]["calls"] == [2, 1] and ranks[1]["calls"] == [2]  # 4, 6, 8 on rank 0; 5, 7 on rank 1
    with np.load(whole["path"]) as a, np.load(out / "samples.npz") as b:
        assert np.array_equal(a["arr_1"], b["arr_1"]) and np.array_equal(a["arr_0"], b["arr_0"])
    assert not work_folder(out / "samples.npz").exists()


# ------------------------------------------------------------------ settings
@pytest.mark.parametrize("change, named", [
    ({"seed": SEED + 1}, "seed"),
    ({"samples_per_class": N + 1}, "samples_per_class"),
    ({"top_k": 4}, "sampling"),
    ({"eval_size": 6}, "image_shape"),
    ({"pair": "perturbed"}, "model"),
])
def test_other_settings_on_resume_are_refused(tmp_path, monkeypatch, change, named):
    pair = _llamagen_pair()
    work = _kill(tmp_path, monkeypatch, pair, after=1)
    if change.get("pair") == "perturbed":  # another checkpoint of the same model
        other = _llamagen_pair()
        with torch.no_grad():
            next(other[0].parameters()).add_(0.01)
        change = {"pair": other}
    kw = {"pair": pair, **change}
    with pytest.raises(ArforgeError, match=rf"(?s){named}.*delete {re.escape(str(work))}.*another output"):
        _run(tmp_path, batch_size=BATCH, **kw)
    assert _ledger_count(work) == BATCH and not (tmp_path / "samples.npz").exists()  # left as it was
    # the same settings as the killed run still finish it (a new batch size only regroups the samples)
    res = _run(tmp_path, pair=pair, batch_size=BATCH + 1)
    assert res["resumed"] == BATCH and not work.exists()


# ------------------------------------------------------------------ memory
def _traced_peak(out: Path, pair, samples_per_class: int) -> tuple[int, int]:
    """(tracemalloc peak of a whole job, bytes of its arr_0); numpy's arrays are traced, torch's are not."""
    tracemalloc.start()
    try:
        res = _run(out, pair=pair, samples_per_class=samples_per_class, batch_size=BATCH, eval_size=64,
                   grid_classes=1, grid_samples=1)
        return tracemalloc.get_traced_memory()[1], C * samples_per_class * int(np.prod(res["image_shape"]))
    finally:
        tracemalloc.stop()


def test_memory_stays_per_batch_as_the_number_of_samples_grows(tmp_path):
    pair = _llamagen_pair()
    _traced_peak(tmp_path / "warm", pair, 1)  # imports and first-call caches are not the job's memory
    few, few_bytes = _traced_peak(tmp_path / "few", pair, 2)
    many, many_bytes = _traced_peak(tmp_path / "many", pair, 12)
    assert many_bytes - few_bytes == 30 * 64 * 64 * 3  # 30 more images of 12 KiB: 360 KiB
    # holding every image (as np.savez needs) would raise the peak by all of that
    assert many - few < (many_bytes - few_bytes) // 4, (few, many)


# ------------------------------------------------------------------ format
def test_the_streamed_npz_is_np_savez_byte_for_byte(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 4, 6, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 5)
    expected = io.BytesIO()
    np.savez(expected, arr_0=images, arr_1=labels.astype(np.int64))
    path = write_adm_npz(tmp_path / "x.npz", images, labels)
    assert path.read_bytes() == expected.getvalue()
    with np.load(path) as f:
        assert np.array_equal(f["arr_0"], images) and f["arr_1"].dtype == np.int64
