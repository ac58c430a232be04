"""CFG (arforge.guidance): guidance decisions, the [cond; uncond] layout, schedules, LlamaGen's cfg_interval
mapping, IAR2's adaptive CFG, and the one name each setting is logged under."""

from __future__ import annotations

import math

import pytest
import torch

from arforge.ar_model import DecodeInfo
from arforge.errors import ConfigError
from arforge.generation import generate
from arforge.guidance import (AdaptiveAttentionCFG, last_guided_position, ConstantCFG, GuidedBatch, IntervalCFG, LinearCFG, NoGuidance,
                              guidance_params, progress_weight)

pytestmark = pytest.mark.usefixtures("one_thread")


INFO = DecodeInfo(n=0, L=10)


def _iar2():
    from arforge_plugins.models import ar_presets

    torch.manual_seed(0)
    m = ar_presets.iar2_gpt("tiny", semantic_size=8, detail_size=16, block_size=25)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return m.eval()


class Spy:
    """Wraps a schedule and records every (k, n, scale, attn_cls) it hands out."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.guided, self.needs_cls_attention = inner.guided, inner.needs_cls_attention

    def scale(self, k, n, L, info):
        s = self.inner.scale(k, n, L, info)
        self.calls.append((k, n, s, info.attn_cls))
        return s


# --------------------------------------------------------------- guided flags
def test_guidance_is_on_iff_some_scale_differs_from_one():
    assert ConstantCFG(scale=1.5).guided and not ConstantCFG(scale=1.0).guided
    assert ConstantCFG(scale=(1.0, 2.0)).guided and not ConstantCFG(scale=(1.0, 1.0)).guided
    assert ConstantCFG(scale=0.5).guided  # < 1 is guidance too (upstream tests > 1 only, docs/llamagen.md#cfg-batch-layout)
    assert IntervalCFG(scale=2.0, interval=0).guided and not IntervalCFG(scale=1.0).guided
    assert LinearCFG(start=1.0, end=3.0).guided and not LinearCFG(start=1.0, end=1.0).guided
    assert AdaptiveAttentionCFG().guided
    assert AdaptiveAttentionCFG(sem_start=1.0, sem_end=1.0, det_start=1.0, det_end=1.2).guided
    assert not AdaptiveAttentionCFG(scales=((1.0, 1.0), (1.0, 1.0))).guided
    assert AdaptiveAttentionCFG.needs_cls_attention and not ConstantCFG.needs_cls_attention


def test_constant_per_subtoken_scales():
    s = ConstantCFG(scale=(1.9, 2.0))  # Open-MAGVIT2-B (pre, post), docs/llamagen.md#sampling-defaults
    assert [s.scale(k, 5, 256, INFO) for k in (0, 1)] == [1.9, 2.0]
    assert ConstantCFG(scale=1.75).scale(1, 0, 576, INFO) == 1.75
    with pytest.raises(ConfigError, match="2 per-sub-token values"):
        s.scale(2, 0, 256, INFO)
    with pytest.raises(ConfigError, match="finite"):
        ConstantCFG(scale=math.nan)
    assert guidance_params(s, "guidance.cfg_constant") == {"jobs.sample.guidance": "@guidance.cfg_constant()",
                                                           "guidance.cfg_constant.scale": "(1.9, 2.0)"}


# ------------------------------------------------------------------- interval
def test_interval_guides_tokens_zero_to_interval():
    s = IntervalCFG(scale=2.0, interval=3)
    assert [s.scale(0, n, 16, INFO) for n in range(6)] == [2.0, 2.0, 2.0, 2.0, 1.0, 1.0]
    always = IntervalCFG(scale=(2.0, 3.0), interval=-1)
    assert all(always.scale(1, n, 16, INFO) == 3.0 for n in range(16))
    # where the unconditional rows can be dropped: after position 3; never when guidance lasts
    assert last_guided_position(s, 16) == 3 and last_guided_position(s, 4) is None
    assert last_guided_position(always, 16) is None and last_guided_position(ConstantCFG(scale=2.0), 16) is None
    batch = GuidedBatch(s, batch=2)
    assert [n for n in range(16) if batch.ends_after(n, 16)] == [3] and batch.rows == 4
    batch.end_guidance()
    assert (batch.rows, batch.guided, batch.scale(0, INFO)) == (2, False, 1.0)
    for bad in (-2, 1.5):
        with pytest.raises(ConfigError, match="interval"):
            IntervalCFG(scale=2.0, interval=bad)
    assert guidance_params(s, "guidance.cfg_interval") == {"jobs.sample.guidance": "@guidance.cfg_interval()",
                                                           "guidance.cfg_interval.scale": "2.0",
                                                           "guidance.cfg_interval.interval": "3"}


@pytest.mark.parametrize("cfg_interval", [-1, -3, -0.5, 0, 0.5, 4, 7.9, 20])
def test_interval_from_upstream_matches_llamagen_loop(cfg_interval):
    """LlamaGen: token 0 is the guided prefill; decode index i samples token i + 1 and drops
    guidance when cfg_interval > -1 and i > cfg_interval (docs/llamagen.md#sampling)."""
    L = 16
    upstream = [True] + [not (cfg_interval > -1 and i > cfg_interval) for i in range(L - 1)]
    s = IntervalCFG.from_upstream(cfg_scale=2.0, cfg_interval=cfg_interval)
    assert [s.scale(0, n, L, INFO) != 1.0 for n in range(L)] == upstream


def test_interval_ends_guidance_inside_generate():
    from arforge_plugins.models import ar_presets

    torch.manual_seed(0)
    m = ar_presets.llamagen_gpt("tiny", vocab_size=32, block_size=16)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    m.eval()
    labels = torch.tensor([3, 8])
    spy = Spy(IntervalCFG(scale=3.0, interval=4))
    a = generate(m, labels, guidance=spy, seed=2)
    assert [c[2] for c in spy.calls] == [3.0] * 5 + [1.0] * 11
    b = generate(m, labels, guidance=ConstantCFG(scale=3.0), seed=2)
    assert torch.equal(a[:, :5], b[:, :5]) and not torch.equal(a, b)


# --------------------------------------------------------------------- linear
def test_linear_ramps_from_start_to_end_per_subtoken():
    s = LinearCFG(start=(1.0, 2.0), end=(3.0, 2.0))
    L = 11
    assert s.scale(0, 0, L, INFO) == 1.0 and s.scale(0, L - 1, L, INFO) == 3.0
    assert s.scale(0, 5, L, INFO) == pytest.approx(2.0)
    assert all(s.scale(1, n, L, INFO) == 2.0 for n in range(L))  # start = end: exactly constant
    assert LinearCFG(start=1.0, end=3.0).scale(0, 0, 1, INFO) == 2.0  # L = 1: w = 0.5
    with pytest.raises(ConfigError, match="same number"):
        LinearCFG(start=(1.0, 2.0), end=(1.0, 2.0, 3.0))


# ------------------------------------------------------------------- adaptive
def test_adaptive_formula_per_sample():
    s = AdaptiveAttentionCFG(sem_start=1.5, sem_end=3.5, det_start=2.0, det_end=2.5, w_attn=0.1)
    a = torch.tensor([1.0, 0.5, 0.2])
    L = 9
    for n in (0, 4, L - 1):
        info = DecodeInfo(n=n, L=L, attn_cls=a)
        w = n / (L - 1) + 0.1 * a
        assert torch.allclose(s.weight(n, L, a), w)
        assert torch.allclose(s.scale(0, n, L, info), 1.5 * (1 - w) + 3.5 * w)
        assert torch.allclose(s.scale(1, n, L, info), 2.0 * (1 - w) + 2.5 * w)
    assert torch.allclose(s.weight(0, L, torch.ones(1)), torch.tensor([0.1]))  # w(0) = w_attn with a_0 = 1
    assert torch.allclose(s.weight(L - 1, L, a), 1 + 0.1 * a)  # beyond 1: extrapolates past s_k2
    assert torch.allclose(s.weight(0, 1, a), 0.5 + 0.1 * a)  # L = 1 (upstream)
    assert progress_weight(3, 7) == 0.5
    with pytest.raises(ConfigError, match="class-token attention"):
        s.scale(0, 1, L, DecodeInfo(n=1, L=L))


def test_adaptive_named_scales_and_their_gin_names():
    s = AdaptiveAttentionCFG(sem_start=1.7, sem_end=2.9, det_start=1.6, det_end=3.1, w_attn=0.05)
    assert s.pairs == ((1.7, 2.9), (1.6, 3.1))
    name = "guidance.cfg_adaptive_attention"
    assert guidance_params(s, name) == {"jobs.sample.guidance": f"@{name}()", f"{name}.sem_start": "1.7",
                                        f"{name}.sem_end": "2.9", f"{name}.det_start": "1.6",
                                        f"{name}.det_end": "3.1", f"{name}.w_attn": "0.05"}
    assert AdaptiveAttentionCFG().pairs == ((1.75, 3.0), (1.75, 3.0))  # the IAR2 README (docs/llamagen.md#sampling-defaults)
    assert AdaptiveAttentionCFG(scales=((1.0, 2.0),)).pairs == ((1.0, 2.0),)
    with pytest.raises(ConfigError, match="not both"):
        AdaptiveAttentionCFG(scales=((1.0, 2.0), (1.0, 2.0)), sem_start=1.5)
    with pytest.raises(ConfigError, match="pairs"):
        AdaptiveAttentionCFG(scales=((1.0, 2.0, 3.0),))


def test_adaptive_cfg_in_generation_uses_the_recorded_class_attention():
    m = _iar2()
    labels = torch.tensor([1, 6, 9])
    spy = Spy(AdaptiveAttentionCFG(sem_start=1.5, sem_end=3.0, det_start=2.0, det_end=2.0, w_attn=0.05))
    generate(m, labels, guidance=spy, seed=0)
    L = m.block_size
    assert [(k, n) for k, n, _, _ in spy.calls] == [(k, n) for n in range(L) for k in (0, 1)]
    first_sem = spy.calls[0]
    assert torch.allclose(first_sem[3], torch.ones(3))  # a_0 = 1: the class token sees only itself
    assert torch.allclose(first_sem[2], torch.full((3,), 1.5 + 1.5 * 0.05))  # w(0) = w_attn
    k, n, s_last, a_last = spy.calls[-2]
    assert (k, n) == (0, L - 1)
    assert torch.allclose(s_last, 1.5 + 1.5 * (1 + 0.05 * a_last))  # w(L-1) = 1 + w_attn·a
    mid = spy.calls[2 * 12]  # semantic head at n = 12: scales differ per sample through a_n
    assert mid[2].shape == (3,) and not torch.allclose(mid[2], mid[2][0].expand(3))
    assert all(torch.equal(c[2], torch.full((3,), 2.0)) for c in spy.calls if c[0] == 1)  # constant det head


# --------------------------------------------------------------------- layout
def test_guided_batch_lays_out_conditional_then_unconditional_rows():
    """docs/llamagen.md#cfg-batch-layout: [y; null] rows, chosen tokens in both halves, the
    conditional half read back; unguided, the rows are the images themselves."""
    labels = torch.tensor([3, 5, 7])
    g = GuidedBatch(ConstantCFG(scale=2.0), batch=3)
    assert (g.guided, g.rows) == (True, 6)
    assert g.labels(labels, null_class=10).tolist() == [3, 5, 7, 10, 10, 10]
    tok = torch.tensor([[1, 2], [3, 4], [5, 6]])  # (B, K)
    assert torch.equal(g.tokens(tok), torch.cat([tok, tok]))
    assert torch.equal(g.conditional(g.tokens(tok)), tok)
    attn = torch.tensor([0.1, 0.2, 0.3, 0.9, 0.8, 0.7])  # (rows,): the schedule sees the conditional half
    assert torch.equal(g.info(DecodeInfo(n=1, L=4, attn_cls=attn)).attn_cls, attn[:3])
    with pytest.raises(ValueError, match="expected 6 rows"):
        g.conditional(tok)
    assert g.scale(0, INFO) == 2.0

    plain = GuidedBatch(None, batch=3)  # NoGuidance: B rows, scale 1, the schedule never asked
    assert isinstance(plain.guidance, NoGuidance) and (plain.guided, plain.rows) == (False, 3)
    assert plain.labels(labels, null_class=10) is labels and plain.tokens(tok) is tok
    assert GuidedBatch(ConstantCFG(scale=1.0), batch=2).rows == 2  # every scale 1: not guided
    assert GuidedBatch(Spy(ConstantCFG(scale=1.0)), batch=2).scale(0, INFO) == 1.0


def test_each_setting_is_logged_under_its_gin_binding_only():
    """One name per parameter (docs/studies.md): the gin binding, defaults filled in, values as a
    gin file writes them (so a study's trial bind and the sample job's param agree), and no
    ``cfg.*`` copies; an unregistered schedule has no gin names and gets none."""
    assert guidance_params(LinearCFG(start=1.25, end=(2.0, 3)), "guidance.cfg_linear") == {
        "jobs.sample.guidance": "@guidance.cfg_linear()", "guidance.cfg_linear.start": "1.25",
        "guidance.cfg_linear.end": "(2.0, 3)"}
    assert guidance_params(AdaptiveAttentionCFG(scales=[[1.0, 2.0]]), "guidance.cfg_adaptive_attention") == {
        "jobs.sample.guidance": "@guidance.cfg_adaptive_attention()",
        "guidance.cfg_adaptive_attention.scales": "[[1.0, 2.0]]", "guidance.cfg_adaptive_attention.w_attn": "0.05"}
    assert guidance_params(AdaptiveAttentionCFG(), "g.a")["g.a.sem_end"] == "3.0"  # a default, still one name
    assert guidance_params(NoGuidance(), None) == {"jobs.sample.guidance": "None"}
    assert guidance_params(Spy(ConstantCFG()), None) == {}


@pytest.mark.plumbing
def test_a_gin_file_still_naming_samplers_gets_one_line_suggesting_guidance(tmp_path):
    """The kind was renamed samplers -> guidance: an old file fails in one line naming the file
    and the new name, not with gin's traceback."""
    from arforge import launch

    old = tmp_path / "old.gin"
    old.write_text("launch.job = @jobs.sample\njobs.sample.guidance = @guidance.cfg_linear()\n"
                   "samplers.cfg_linear.start = 1.0\n")
    with pytest.raises(ConfigError) as err:
        launch.parse(old)
    msg = str(err.value)
    assert "\n" not in msg and str(old) in msg and "Did you mean guidance.cfg_linear?" in msg, msg
