"""The sample-export job: exactly N per class, per-sample seeds, the ADM .npz, the grid, two ranks, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from arforge.checkpoint import CheckpointError, mark_loaded, save_checkpoint
from arforge.data.extraction import local_context
from arforge.generation import decode_tokens, generate
from arforge.metrics.adm import to_uint8
from arforge.sampling_job import sample_images, sample_labels, sample_seed
from two_ranks import run_on_ranks

C, N, SEED = 3, 3, 5  # 3 classes x 3 samples

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeTracker:
    """Records what a job logs."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.tags: dict[str, str] = {}
        self.metrics: dict[str, float] = {}
        self.images: dict[str, Any] = {}

    def log_params(self, params):
        self.params.update(params)

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_image(self, image, artifact_file):
        self.images[artifact_file] = image

    def log_text(self, text, artifact_file):
        pass

    def log_dict(self, data, artifact_file):
        pass


def _llamagen_pair():
    """A tiny LlamaGen AR model (vocab 32, 4x4 tokens) and a tiny VQ tokenizer (8x8 images)."""
    from arforge_plugins.models import ar_presets
    from arforge_plugins.tokenizers import llamagen_vq
    from arforge_plugins.quantizers.vector_quantization import VectorQuantizer

    torch.manual_seed(0)
    model = ar_presets.llamagen_gpt("tiny", vocab_size=32, block_size=16, num_classes=C)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    tokenizer = llamagen_vq.llamagen_vq_tokenizer(preset="tiny", quantizer=VectorQuantizer(codebook_size=32, dim=8))
    return model.eval(), tokenizer.eval()


def _guidance():
    from arforge.guidance import ConstantCFG

    return ConstantCFG(scale=2.0)


def _run(out: Path, tracker=None, **kw) -> dict:
    model, tokenizer = kw.pop("pair", None) or _llamagen_pair()
    for module, checkpoint in ((model, "model_checkpoint"), (tokenizer, "tokenizer_checkpoint")):
        if kw.get(checkpoint) is None:  # weights set here in Python: declared, as jobs.sample requires
            mark_loaded(module, "set by the test")
    ctx = local_context(out, tracker=tracker or FakeTracker(), seed=SEED)
    args = dict(model=model, tokenizer=tokenizer, guidance=_guidance(), samples_per_class=N, batch_size=4,
                top_k=8, progress=False)
    args.update(kw)
    return sample_images(ctx, **args)


def _reference_sample(model, tokenizer, index: int) -> np.ndarray:
    """Sample ``index`` decoded on its own from its own seed."""
    gen = [torch.Generator().manual_seed(sample_seed(SEED, index))]
    sub = generate(model, torch.tensor([index // N]), guidance=_guidance(), sampling=_settings(),
                   generator=gen)
    return to_uint8(decode_tokens(tokenizer, model.factorization, sub))[0]


def _settings():
    from arforge.interfaces import SubTokenSampling

    return SubTokenSampling(top_k=8)


# ------------------------------------------------------------------ one rank
def test_exactly_n_per_class_in_a_seeded_order_with_per_sample_content(tmp_path):
    tracker = FakeTracker()
    pair = _llamagen_pair()
    res = _run(tmp_path, tracker=tracker, pair=pair)
    assert res["num_samples"] == C * N and res["path"] == str(tmp_path / "samples.npz")
    with np.load(res["path"]) as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]
        images, labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (C * N, 8, 8, 3) and images.flags.c_contiguous
    assert labels.dtype == np.int64 and np.bincount(labels, minlength=C).tolist() == [N] * C
    perm = np.random.default_rng(SEED).permutation(C * N)  # arr_0[j] is sample perm[j]
    assert labels.tolist() == sample_labels(C, N)[perm].tolist()
    assert labels.tolist() != sorted(labels.tolist())  # really shuffled
    # every sample is where the permutation puts it, with the content of its own seed: none is duplicated
    for j, i in enumerate(perm):
        assert np.array_equal(images[j], _reference_sample(*pair, int(i))), (j, i)
    assert len({im.tobytes() for im in images}) == C * N
    # the grid: one row per class, N columns (8 px cells upscaled to 64 and 2 px padding) at the
    # bottom right, under a title line (the guidance) and right of a strip of class labels
    grid = np.asarray(tracker.images["samples/grid.png"].convert("RGB"))
    cells = grid[-(C * 66 + 2):, -(N * 66 + 2):]
    assert grid.shape[0] > C * 66 + 2 and grid.shape[1] > N * 66 + 2
    assert (cells[:2] == 255).all() and (cells[:, :2] == 255).all()  # the grid's own white frame
    strip, title = grid[-(C * 66 + 2):, : -(N * 66 + 2)], grid[: -(C * 66 + 2)]
    assert (strip < 128).any() and (title < 128).any()  # the labels and the title are drawn
    assert tracker.params["guidance.cfg_constant.scale"] == "2.0" and tracker.params["sample.top_k"] == 8
    assert not any(k.startswith("cfg.") for k in tracker.params)  # one name per setting: its gin binding
    assert tracker.tags["sample.guidance"] == "ConstantCFG(scale=2.0)"
    assert tracker.params["sample.samples_per_class"] == N and tracker.params["sample.seed"] == SEED
    assert tracker.metrics["sample/images_per_s"] > 0 and tracker.metrics["sample/tokens_per_s"] > 0


def test_auto_batch_size_decodes_in_the_picked_batches_and_writes_the_same_file(tmp_path, monkeypatch):
    from arforge import memory, sampling_job

    pair = _llamagen_pair()
    fixed = _run(tmp_path / "fixed", pair=pair)
    per = memory.ar_bytes_per_image(pair[0], guided=True, dtype=torch.float32, device=torch.device("cpu"))
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: int(2 * 3.5 * per))  # room for 3 images
    monkeypatch.setattr(sampling_job, "decode_bytes_per_image", lambda decode: (decode(), int(1.5 * per))[1])
    decoded: list[int] = []
    real = sampling_job.decode_tokens
    monkeypatch.setattr(sampling_job, "decode_tokens", lambda tok, fac, sub, *a, **kw: decoded.append(len(sub)) or
                        real(tok, fac, sub, *a, **kw))
    tracker = FakeTracker()
    auto = _run(tmp_path / "auto", tracker=tracker, pair=pair, batch_size="auto")
    assert tracker.params["sample.batch_size"] == 3
    # two one-image probes (the memory estimate, the image shape), then batches of 3 in chunks of 2
    assert decoded == [1, 1, 2, 1, 2, 1, 2, 1]
    with np.load(fixed["path"]) as a, np.load(auto["path"]) as b:  # per-sample seeds: the batch changes nothing
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


def test_compiled_decode_writes_the_same_file_and_a_bad_backend_is_named(tmp_path):
    from arforge.errors import ArforgeError

    pair = _llamagen_pair()
    eager = _run(tmp_path / "eager", pair=pair, greedy=True)
    compiled = _run(tmp_path / "compiled", pair=pair, greedy=True, compile="aot_eager")
    assert pair[0]._compiled_step is not None
    pair[0].compile_decode(backend=None)
    with np.load(eager["path"]) as a, np.load(compiled["path"]) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])
    with pytest.raises(ArforgeError, match=r"jobs\.sample\.compile.*torch\.compile backend"):
        _run(tmp_path / "bad", pair=pair, compile="no_such_backend")


def test_resize_to_eval_size_and_explicit_output(tmp_path):
    out = tmp_path / "sub" / "mine.npz"
    res = _run(tmp_path, output=out, eval_size=6, samples_per_class=1)
    assert res["path"] == str(out) and res["image_shape"] == (6, 6, 3)
    assert not list(out.parent.glob(".*tmp*"))  # the temporary file was renamed into place
    with np.load(out) as f:
        assert f["arr_0"].shape == (C, 6, 6, 3)


def test_iar2_with_adaptive_cfg_and_two_subtokens(tmp_path):
    from arforge_plugins.models import ar_presets
    from arforge_plugins.tokenizers import llamagen_vq
    from arforge.guidance import AdaptiveAttentionCFG
    from arforge_plugins.quantizers.semantic_detail_quantization import SemanticDetailQuantizer

    torch.manual_seed(0)
    model = ar_presets.iar2_gpt("tiny", semantic_size=8, detail_size=16, block_size=16, num_classes=2).eval()
    tok = llamagen_vq.llamagen_vq_tokenizer(
        preset="tiny", quantizer=SemanticDetailQuantizer(semantic_codebook_size=8, detail_codebook_size=16, dim=8))
    res = _run(tmp_path, pair=(model, tok.eval()), guidance=AdaptiveAttentionCFG(), samples_per_class=2,
               temperature=(1.0, 0.9))
    with np.load(res["path"]) as f:
        assert f["arr_0"].shape == (4, 8, 8, 3) and np.bincount(f["arr_1"]).tolist() == [2, 2]


# ---------------------------------------------------------------- checkpoints
def test_loads_ema_weights_strictly_from_checkpoints(tmp_path):
    model, tokenizer = _llamagen_pair()
    trained, _ = _llamagen_pair()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    from arforge.tracking import home

    ar_dir = home() / "outputs" / "exp" / "ar" / "checkpoints"  # named "outputs:exp/ar/checkpoints" below
    save_checkpoint(ar_dir, 7, {"model": model.state_dict(), "ema": trained.state_dict()})
    save_checkpoint(tmp_path / "tok", 3, {"model": tokenizer.state_dict()})
    tracker = FakeTracker()
    _run(tmp_path / "run", tracker=tracker, pair=(model, tokenizer), model_checkpoint="outputs:exp/ar/checkpoints",
         tokenizer_checkpoint=tmp_path / "tok", samples_per_class=1)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values()))
    assert tracker.params["sample.model_weights"] == "ema" and tracker.params["sample.model_step"] == 7
    assert model.checkpoint_path == str(ar_dir / "step_00000007")
    assert tracker.params["sample.tokenizer_weights"] == "model"
    with pytest.raises(CheckpointError, match="no 'ema' weights"):
        _run(tmp_path / "run2", tokenizer_checkpoint=tmp_path / "tok", tokenizer_weights="ema")
    from arforge_plugins.models import ar_presets

    other = ar_presets.llamagen_gpt("tiny", vocab_size=64, block_size=16, num_classes=C)
    save_checkpoint(tmp_path / "other", 1, {"model": other.state_dict()})
    with pytest.raises(CheckpointError, match="does not fit the configured model"):
        _run(tmp_path / "run3", model_checkpoint=tmp_path / "other")


# ------------------------------------------------------------------ two ranks
def _rank_main(out: str) -> None:
    rank = torch.distributed.get_rank()
    tracker = FakeTracker()
    res = _run(Path(out), tracker=tracker)
    assert (len(tracker.images) == 1) == (rank == 0)  # only rank 0 logs
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(res))


@pytest.mark.multirank
def test_two_ranks_write_the_same_file_as_one(tmp_path):
    single = _run(tmp_path / "single")
    out = tmp_path / "ddp"
    out.mkdir()
    run_on_ranks(_rank_main, tmp_path, out=str(out))
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0] == results[1] and results[0]["num_samples"] == C * N  # every rank returns rank 0's result
    with np.load(single["path"]) as a, np.load(out / "samples.npz") as b:
        assert np.bincount(b["arr_1"]).tolist() == [N] * C
        assert np.array_equal(a["arr_1"], b["arr_1"])
        assert np.array_equal(a["arr_0"], b["arr_0"])  # per-sample seeds: content independent of the world size
        assert len({im.tobytes() for im in b["arr_0"]}) == C * N
