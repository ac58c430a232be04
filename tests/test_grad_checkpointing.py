"""Activation (gradient) checkpointing of the transformer blocks: ``grad_checkpointing``.

Checkpointing must change memory and compute only: the loss and every gradient equal those
without it (dropout active, so this also proves the RNG replay of the recomputation), the
blocks really run twice per training step, and eval, ``no_grad`` and cached decoding are
untouched. Gradients are compared in float64 so the check holds on any CPU's kernels.
"""

from __future__ import annotations

from pathlib import Path

import gin
import pytest
import torch

from arforge import launch
from arforge.generation import generate
from arforge_plugins.models.ar_presets import iar2_gpt, llamagen_gpt, open_magvit2_ar

REPO = Path(__file__).resolve().parents[1]
FAMILIES = {  # gin file -> (configurable, factory)
    "tiny_llamagen": ("models.llamagen_gpt", llamagen_gpt),
    "tiny_open_magvit2": ("models.open_magvit2_ar", open_magvit2_ar),
    "tiny_iar2": ("models.iar2_gpt", iar2_gpt),
}


def _build_from_gin(stem: str, bindings: list[str] | None = None):
    launch.parse(REPO / "gin" / "models" / f"{stem}.gin", bindings or [])
    return gin.query_parameter("%MODEL").scoped_configurable_fn()


def _tiny(stem: str, *, grad_checkpointing: bool = False, dtype=torch.float64):
    """The tiny preset with every weight random (the docs/llamagen.md#llama-backbone init zeroes the output layers, which
    would leave the backbone's gradients zero and the comparison vacuous)."""
    _, factory = FAMILIES[stem]
    torch.manual_seed(0)
    model = factory("tiny", grad_checkpointing=grad_checkpointing).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return model


def _batch(model, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    L = model.block_size
    sub = torch.stack([torch.randint(0, v, (batch, L), generator=g) for v in model.vocab_sizes], dim=-1)
    labels = torch.randint(0, 1000, (batch,), generator=g)
    return sub, labels  # (B, L, K), (B,)


def _loss_and_grads(model, sub, labels, seed: int = 123):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout draws in both runs
    loss = model.loss(sub, labels).total
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _has_head_blocks(model) -> bool:
    return hasattr(model.head, "factorized_blocks")


@pytest.mark.parametrize("stem", list(FAMILIES))
def test_checkpointed_loss_and_gradients_equal_plain_with_dropout_active(stem):
    model = _tiny(stem)
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    sub, labels = _batch(model)

    plain_loss, plain_grads = _loss_and_grads(model, sub, labels)
    model.backbone.grad_checkpointing = True  # switchable after construction
    if _has_head_blocks(model):
        model.head.grad_checkpointing = True
    ckpt_loss, ckpt_grads = _loss_and_grads(model, sub, labels)

    # dropout is really active: another seed gives another loss
    model.backbone.grad_checkpointing = False
    other_loss, _ = _loss_and_grads(model, sub, labels, seed=124)
    assert not torch.allclose(other_loss, plain_loss, rtol=0, atol=1e-12)

    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=0, atol=1e-12)
    assert set(ckpt_grads) == set(plain_grads) == {n for n, _ in model.named_parameters()}
    for name, g in plain_grads.items():
        assert g.abs().sum() > 0, name  # no vacuous comparison
        torch.testing.assert_close(ckpt_grads[name], g, rtol=0, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("stem", list(FAMILIES))
def test_factory_flag_is_the_same_as_setting_it_later(stem):
    a = _tiny(stem, grad_checkpointing=True)
    b = _tiny(stem)
    assert a.backbone.grad_checkpointing and not b.backbone.grad_checkpointing
    if _has_head_blocks(a):
        assert a.head.grad_checkpointing and not b.head.grad_checkpointing
    sub, labels = _batch(a)
    la, ga = _loss_and_grads(a, sub, labels)
    lb, gb = _loss_and_grads(b, sub, labels)
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-12)
    for name in gb:
        torch.testing.assert_close(ga[name], gb[name], rtol=0, atol=1e-12)


@pytest.mark.parametrize("stem", list(FAMILIES))
def test_gin_binding_reaches_backbone_and_head(stem):
    configurable, _ = FAMILIES[stem]
    with torch.device("meta"):
        off = _build_from_gin(stem)
    assert off.backbone.grad_checkpointing is False
    gin.clear_config()
    with torch.device("meta"):
        on = _build_from_gin(stem, [f"{configurable}.grad_checkpointing = True"])
    assert on.backbone.grad_checkpointing is True
    if _has_head_blocks(on):
        assert on.head.grad_checkpointing is True


def _count_calls(module):
    """Count entries into ``module``'s forward. A pre-hook, because the non-reentrant checkpoint
    stops the recomputation early (once the last saved tensor is rebuilt), so a forward hook
    would not fire on the recomputation."""
    calls = []
    handle = module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("stem", list(FAMILIES))
@pytest.mark.parametrize("flag", [False, True])
def test_blocks_are_recomputed_in_backward_only_with_the_flag(stem, flag):
    model = _tiny(stem, grad_checkpointing=flag, dtype=torch.float32)
    sub, labels = _batch(model)
    watched = [model.backbone.layers[0]] + ([model.head.factorized_blocks[0]] if _has_head_blocks(model) else [])
    counters = [_count_calls(m) for m in watched]
    model.train()
    loss = model.loss(sub, labels).total
    assert [len(c) for c, _ in counters] == [1] * len(watched)
    loss.backward()
    assert [len(c) for c, _ in counters] == [2 if flag else 1] * len(watched)  # recomputed in backward

    # train mode without grad, and eval with grad: never checkpointed, one call each
    for c, _ in counters:
        c.clear()
    with torch.no_grad():
        model.loss(sub, labels)
    model.eval()
    model.loss(sub, labels).total.backward()
    assert [len(c) for c, _ in counters] == [2] * len(watched)
    for _, h in counters:
        h.remove()


@pytest.mark.parametrize("stem", list(FAMILIES))
def test_eval_forward_and_cached_generation_are_unaffected(stem):
    model = _tiny(stem, dtype=torch.float32).eval()
    sub, labels = _batch(model)
    with torch.no_grad():
        ref_logits = model.logits_full(sub, labels)
        ref_tokens = generate(model, labels, seed=5, num_positions=8)
        model.backbone.grad_checkpointing = True
        if _has_head_blocks(model):
            model.head.grad_checkpointing = True
        logits = model.logits_full(sub, labels)
        tokens = generate(model, labels, seed=5, num_positions=8)
    for a, b in zip(logits, ref_logits):
        assert torch.equal(a, b)
    assert torch.equal(tokens, ref_tokens)
    # eval mode with grad enabled: still the plain path, bit for bit
    out = model(sub, labels).logits
    for a, b in zip(out, ref_logits):
        assert torch.equal(a.detach(), b)
