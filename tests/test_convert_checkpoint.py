"""tools/convert_checkpoint.py: official layout -> arforge checkpoint -> identical logits."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import gin
import pytest
import torch

from arforge import checkpoint as ck
from arforge import launch

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO / "tools" / "convert_checkpoint.py")
convert_checkpoint = importlib.util.module_from_spec(spec)
spec.loader.exec_module(convert_checkpoint)

TINY = {  # format -> (preset, official exporter, container)
    "llamagen_gpt": ("gin/models/tiny_llamagen.gin", "export_llamagen_gpt", "model"),
    "iar2_gpt": ("gin/models/tiny_iar2.gin", "export_iar2_gpt", "bare"),
    "open_magvit2_ar": ("gin/models/tiny_open_magvit2.gin", "export_open_magvit2_ar", "state_dict"),
}


def _build(preset):
    launch.parse(REPO / preset)
    return gin.query_parameter("%MODEL").scoped_configurable_fn()


@pytest.mark.parametrize("fmt", sorted(TINY))
def test_official_file_converts_and_gives_identical_logits(tmp_path, fmt):
    from arforge_plugins.loaders import ar_checkpoints

    preset, exporter, container = TINY[fmt]
    torch.manual_seed(0)
    official_model = _build(preset).eval()
    with torch.no_grad():  # non-zero output layers, so the logits say something
        for p in official_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = getattr(ar_checkpoints, exporter)(official_model, container=container)
    if container == "model":
        state = {**state, "args": argparse.Namespace(gpt_model="GPT-tiny"), "steps": 7}
    src = tmp_path / "official.pt"
    torch.save(state, src)

    assert convert_checkpoint.main([fmt, str(src), str(tmp_path / "out"), "--gin", str(REPO / preset)]) == 0
    converted = ck.load_checkpoint(tmp_path / "out")
    assert converted.meta["config"]["format"] == fmt and len(converted.meta["config"]["source_sha256"]) == 64
    fresh = ck.restore(_build(preset).eval(), checkpoint=tmp_path / "out")
    block = official_model.block_size
    sub = torch.randint(0, min(official_model.factorization.vocab_sizes), (2, block, len(official_model.factorization.vocab_sizes)))
    labels = torch.tensor([1, 3])
    for a, b in zip(official_model.logits_full(sub, labels), fresh.logits_full(sub, labels)):
        assert torch.equal(a, b)


def test_unmapped_key_is_reported_and_nothing_written(tmp_path, capsys):
    from arforge_plugins.loaders import ar_checkpoints

    model = _build("gin/models/tiny_llamagen.gin")
    state = ar_checkpoints.export_llamagen_gpt(model, container="bare")
    state["layers.0.attention.extra_bias"] = torch.zeros(3)
    del state["norm.weight"]
    src = tmp_path / "official.pt"
    torch.save(state, src)
    code = convert_checkpoint.main(["llamagen_gpt", str(src), str(tmp_path / "out"), "--gin",
                                    str(REPO / "gin/models/tiny_llamagen.gin")])
    err = capsys.readouterr().err
    assert code == 2
    assert "layers.0.attention.extra_bias" in err and "missing" in err
    assert not (tmp_path / "out").exists()


def test_missing_official_file_is_clear(tmp_path, capsys):
    code = convert_checkpoint.main(["llamagen_gpt", str(tmp_path / "c2i_B_256.pt"), str(tmp_path / "out"),
                                    "--gin", str(REPO / "gin/models/tiny_llamagen.gin")])
    assert code == 2 and "c2i_B_256.pt does not exist" in capsys.readouterr().err
