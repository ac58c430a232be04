"""`arforge run --dry-run` on every gin file in the repository, and the mistakes it catches."""

from __future__ import annotations

from pathlib import Path

import pytest

from arforge import dryrun
from arforge.errors import ConfigError

pytestmark = pytest.mark.plumbing  # no floating-point result compared across kernels

REPO = Path(__file__).resolve().parents[1]
GIN_FILES = sorted(p for d in ("gin", "experiments") for p in (REPO / d).rglob("*.gin"))
QUICKSTART = REPO / "experiments" / "quickstart"


@pytest.mark.parametrize("path", GIN_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_gin_file_passes_the_dry_run(path):
    report = dryrun.dry_run(path)
    assert report.file == str(path)


def test_paper_presets_are_checked_against_documented_counts():
    report = dryrun.dry_run(REPO / "gin" / "models" / "iar2_b.gin")
    assert report.checks == ["iar2_gpt/B: 143,111,616 parameters as documented"]


def test_pipeline_checks_every_stage():
    report = dryrun.dry_run(QUICKSTART / "pipeline.gin")
    assert [Path(s.file).name for s in report.stages] == [
        "1_tokenizer.gin", "2_extract.gin", "3_ar.gin", "4_classifier.gin", "5_reference.gin", "6_sample.gin",
        "7_evaluate.gin"]
    assert any("vocabularies" in c for c in report.stages[2].checks)


def test_vocabulary_mismatch_is_caught():
    with pytest.raises(ConfigError, match=r"codebook sizes \(4096,\) differ from the factorization's \(256,\)"):
        dryrun.dry_run(QUICKSTART / "3_ar.gin", ["quantizers.lfq.bits = 12",
                                                 'tokenizers.open_magvit2.preset = {"ch": 32, "ch_mult": (1, 2), '
                                                 '"num_res_blocks": 1, "z_channels": 12, "num_groups": 8}'])


def test_sequence_length_mismatch_is_caught():
    with pytest.raises(ConfigError, match="16x16 token grid .* block_size is 64"):
        dryrun.dry_run(QUICKSTART / "3_ar.gin", ["IMAGE_SIZE = 32"])


def test_missing_required_binding_is_caught(tmp_path):
    f = tmp_path / "ar.gin"
    f.write_text('include "base.gin"\nlaunch.experiment = "x"\nlaunch.job = @jobs.train_ar\n'
                 "jobs.train_ar.steps = 3\n")
    with pytest.raises(ConfigError, match="missing required values jobs.train_ar.model, jobs.train_ar.dataset, "
                                          "jobs.train_ar.batch_size"):
        dryrun.dry_run(f)


def test_parameter_count_drift_is_caught(monkeypatch):
    from arforge_plugins.models import ar_presets

    monkeypatch.setitem(ar_presets.PRESET_PARAMS, "llamagen_gpt/B", 111_000_000)
    with pytest.raises(ConfigError, match="llamagen_gpt/B has 110,888,448 parameters but the preset documents "
                                          "111,000,000"):
        dryrun.dry_run(REPO / "gin" / "models" / "llamagen_b.gin")


def test_cli_dry_run(capsys):
    from arforge.cli import main

    assert main(["run", str(QUICKSTART / "6_sample.gin"), "--dry-run"]) == 0
    assert "dry run ok" in capsys.readouterr().out
