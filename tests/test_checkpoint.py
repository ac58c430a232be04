"""arforge checkpoints (atomic, verified, bit-exact) and the safe foreign loader."""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import pytest
import torch

from arforge import checkpoint as ck

pytestmark = pytest.mark.plumbing  # no floating-point result compared across kernels


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    return m


def _trained_state():
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    for _ in range(3):
        loss = m(torch.randn(5, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m, opt


def test_round_trip_is_bit_exact(tmp_path):
    m, opt = _trained_state()
    bf16 = {"w": torch.randn(3, 5).to(torch.bfloat16), "i": torch.arange(7)}
    emb = torch.randn(6, 4)
    shared = {"tok.weight": emb, "head.weight": emb}  # tied weights must stay tied
    rng = {"torch": torch.get_rng_state(), "step": 42, "note": "plain data only"}
    path = ck.save_checkpoint(tmp_path / "ckpt", 42,
                              {"model": m.state_dict(), "extra": bf16, "tied": shared},
                              {"optimizer": opt.state_dict(), "rng": rng}, config={"lr": 1e-3})
    assert path.name == "step_00000042"
    loaded = ck.load_checkpoint(tmp_path / "ckpt")  # via the 'latest' pointer
    assert loaded.step == 42 and loaded.meta["config"] == {"lr": 1e-3}
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.weights["model"][k], v) and loaded.weights["model"][k].dtype == v.dtype
    assert loaded.weights["extra"]["w"].dtype == torch.bfloat16
    assert torch.equal(loaded.weights["extra"]["w"], bf16["w"])
    assert torch.equal(loaded.weights["tied"]["head.weight"], emb)
    assert loaded.weights["tied"]["head.weight"].data_ptr() == loaded.weights["tied"]["tok.weight"].data_ptr()
    assert torch.equal(loaded.state["rng"]["torch"], rng["torch"])
    opt2 = torch.optim.AdamW(_model().parameters(), lr=1e-3)
    opt2.load_state_dict(loaded.state["optimizer"])
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_truncated_weights_file_is_detected(tmp_path):
    m, _ = _trained_state()
    path = ck.save_checkpoint(tmp_path, 1, {"model": m.state_dict()})
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match="model.safetensors is truncated"):
        ck.load_checkpoint(path)
    # Without the recorded-size check, safetensors itself still refuses it clearly.
    with pytest.raises(ck.CheckpointError, match="could not be read"):
        ck.load_checkpoint(path, verify=False)


def test_altered_file_fails_hash(tmp_path):
    m, _ = _trained_state()
    path = ck.save_checkpoint(tmp_path, 1, {"model": m.state_dict()})
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match="SHA-256"):
        ck.load_checkpoint(path)


def test_killed_save_leaves_previous_checkpoint_current(tmp_path):
    m, _ = _trained_state()
    ck.save_checkpoint(tmp_path, 10, {"model": m.state_dict()})
    # A save killed mid-way leaves only a temporary folder behind, which never looks valid.
    partial = tmp_path / ".step_00000020.tmp-999"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00" * 10)
    assert ck.latest_checkpoint(tmp_path).name == "step_00000010"
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000010"]
    # A stale 'latest' pointer falls back to the newest complete checkpoint.
    (tmp_path / "latest").write_text("step_00000020\n")
    assert ck.latest_checkpoint(tmp_path).name == "step_00000010"


def test_keep_last_prunes_older(tmp_path):
    m, _ = _trained_state()
    for step in (1, 2, 3, 4):
        ck.save_checkpoint(tmp_path, step, {"model": m.state_dict()}, keep_last=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]


def test_not_a_checkpoint_dir(tmp_path):
    with pytest.raises(ck.CheckpointError, match="not an arforge checkpoint"):
        ck.load_checkpoint(tmp_path)


# ------------------------------------------------------------------ foreign
class NotAllowed:
    def __init__(self):
        self.x = 1


def test_foreign_namespace_is_allow_listed_and_prefixes_stripped(tmp_path):
    sd = {"module._orig_mod.layers.0.w": torch.ones(2), "_fsdp_wrapped_module.norm.weight": torch.zeros(3)}
    p = tmp_path / "upstream.pt"
    torch.save({"model": sd, "args": argparse.Namespace(vocab_size=16384), "steps": 5}, p)
    obj = ck.load_foreign(p)
    assert obj["args"].vocab_size == 16384
    weights, where = ck.unwrap_container(obj)
    assert where == "model"
    clean = ck.strip_wrapper_prefixes(weights)
    assert set(clean) == {"layers.0.w", "norm.weight"}
    # 'modules' is a real name, not a wrapper segment: only whole segments are stripped.
    assert ck.strip_wrapper_prefixes({"modules.module.x": 1}) == {"modules.x": 1}


def test_foreign_pickle_with_unlisted_global_is_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(1)}, "payload": NotAllowed()}, p)
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_foreign(p)
    assert "NotAllowed" in str(err.value) and "allow-list" in str(err.value)


def test_plain_pickle_file_is_refused(tmp_path):
    p = tmp_path / "plain.pkl"
    p.write_bytes(pickle.dumps({"w": 1, "obj": NotAllowed()}))
    with pytest.raises(ck.CheckpointError):
        ck.load_foreign(p)


def test_truncated_foreign_file_is_detected(tmp_path):
    p = tmp_path / "c2i_B_256.pt"
    torch.save({"model": {"w": torch.randn(256, 256)}}, p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match="c2i_B_256.pt"):
        ck.load_foreign(p)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ck.CheckpointError, match="empty"):
        ck.load_foreign(tmp_path / "empty.pt")
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.load_foreign(tmp_path / "missing.pt")


def test_bare_state_dict_container():
    sd = {"a": torch.ones(1), "b": torch.zeros(2)}
    got, where = ck.unwrap_container(sd)
    assert where == "(bare state dict)" and set(got) == {"a", "b"}
    with pytest.raises(ck.CheckpointError, match="no weights found"):
        ck.unwrap_container({"optimizer": {}, "steps": 1})
    with pytest.raises(ck.CheckpointError, match="no 'ema' entry"):
        ck.unwrap_container({"model": sd, "steps": 1}, prefer="ema")
    assert ck.unwrap_container({"model": sd, "ema": {"a": torch.zeros(1)}}, prefer="ema")[1] == "ema"


def test_save_weights_round_trip(tmp_path):
    emb = torch.randn(4, 3)
    p = ck.save_weights(tmp_path / "w.safetensors", {"a": emb, "b": emb, "c": torch.ones(2)})
    back = ck.load_weights(p)
    assert torch.equal(back["b"], emb) and torch.equal(back["a"], emb)
    assert not any(name.startswith(".") for name in os.listdir(tmp_path))


def test_restore_strict_and_records_path(tmp_path):
    m, _ = _trained_state()
    ck.save_checkpoint(tmp_path, 3, {"model": m.state_dict(), "ema": m.state_dict()})
    fresh = _model()
    out = ck.restore(fresh, checkpoint=tmp_path, weights="ema")
    assert out is fresh and fresh.checkpoint_path.endswith("step_00000003")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), m.state_dict().values()))
    with pytest.raises(ck.CheckpointError, match="no 'disc' weights"):
        ck.restore(_model(), checkpoint=tmp_path, weights="disc")
    other = torch.nn.Sequential(torch.nn.Linear(4, 9))
    with pytest.raises(ck.CheckpointError, match="does not fit Sequential"):
        ck.restore(other, checkpoint=tmp_path)
