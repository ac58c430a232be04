"""The official-checkpoint sampling launches, run end to end on tiny official-layout files."""

from __future__ import annotations

import argparse
from pathlib import Path

import gin
import numpy as np
import torch

from arforge import launch

REPO = Path(__file__).resolve().parents[1]


def _build(macro, preset_bindings):
    launch.parse(REPO / "experiments/llamagen/official_sample.gin", preset_bindings)
    return gin.query_parameter(f"%{macro}").scoped_configurable_fn()


def test_llamagen_official_sample_launch(tmp_path):
    from arforge_plugins.loaders import ar_checkpoints, tokenizer_checkpoints

    tiny = ['models.llamagen_gpt.size = "tiny"', "models.llamagen_gpt.block_size = 16",
            'tokenizers.llamagen_vq.preset = "tiny"', "quantizers.vq.codebook_size = 64",
            "models.llamagen_gpt.vocab_size = 64"]
    torch.manual_seed(0)
    gpt = _build("MODEL", tiny)
    vq = _build("TOKENIZER", tiny)
    ar_file, vq_file = tmp_path / "c2i_tiny.pt", tmp_path / "vq_tiny.pt"
    torch.save({**ar_checkpoints.export_llamagen_gpt(gpt, container="model"),
                "args": argparse.Namespace(gpt_model="GPT-tiny")}, ar_file)
    torch.save({"model": tokenizer_checkpoints.export_llamagen_vq(vq, with_usage_buffers=True),
                "args": argparse.Namespace(codebook_size=64)}, vq_file)
    out = launch.run_file(REPO / "experiments/llamagen/official_sample.gin", [
        *tiny, f'AR_OFFICIAL = "{ar_file}"', f'VQ_OFFICIAL = "{vq_file}"', "jobs.sample.samples_per_class = 2",
        "jobs.sample.num_classes = 3", "jobs.sample.batch_size = 6", "jobs.sample.eval_size = None",
        'launch.device = "cpu"', 'launch.precision = "fp32"'])
    data = np.load(out["path"])
    assert data["arr_0"].shape == (6, 8, 8, 3)  # tiny VQ: 4x4 tokens x 2 = 8 px
    assert sorted(data["arr_1"].tolist()) == [0, 0, 1, 1, 2, 2]
