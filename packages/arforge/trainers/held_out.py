"""The AR model's negative log-likelihood on held-out data, during training.

This is the training-curve objective of loss-weight studies (docs/studies.md#pruning): the trainer
reports it with ``ctx.report("val_nll", value, step)`` every ``eval_every`` optimizer steps, so
an Optuna pruner compares trials at equal training steps and stops a bad weight early.

It is the plain per-token NLL, Σ_k CE_k over the sub-tokens (p(token) = Π_k p(sub-token k | ...)),
whatever the training loss weights (IAR2's w1) or IAR's cluster term: a loss-weight study
compares trials whose training losses are weighted differently, and only an unweighted
likelihood is the same yardstick for all of them. ``train_nll`` is the same quantity on the
training batches (no held-out data needed).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from arforge.ar_model import subtoken_loss


def unweighted_nll(parts: dict[str, Any]) -> float:
    """Σ of the unweighted sub-token cross-entropies ``ce_*`` of a loss breakdown."""
    return float(sum(float(v) for k, v in parts.items() if k.startswith("ce_")))


class HeldOutCodes:
    """The first ``max_items`` items of a held-out dataset as fixed token batches, encoded once.

    Items are ``(codes (L, S), label)`` or, with ``tokenizer``, ``(image (3, H, W), label)``; the
    frozen tokenizer encodes the images once, in fp32 (reduced precision can flip ids).
    """

    def __init__(self, dataset, *, max_items: int, batch_size: int, device: torch.device,
                 tokenizer: nn.Module | None = None):
        n = min(len(dataset), max_items)
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        for start in range(0, n, batch_size):
            items = [dataset[i] for i in range(start, min(n, start + batch_size))]
            x = torch.stack([torch.as_tensor(it[0]) for it in items]).to(device)
            labels = torch.as_tensor([int(it[1]) for it in items], device=device)
            if tokenizer is not None:
                with torch.no_grad():
                    x = tokenizer.encode(x.float())  # images (B, 3, H, W) -> ids (B, L, S)
            self.batches.append((x.long(), labels))
        self.count = n

    @torch.no_grad()
    def nll(self, model: nn.Module, factorization: Any, *, precision: Any, device: torch.device) -> float:
        """Mean per-token NLL of ``model`` (eval mode: no label or token dropout) over the batches."""
        was = model.training
        model.eval()
        total = 0.0
        try:
            for codes, labels in self.batches:
                sub = factorization.split(codes)  # (B, L, S) -> (B, L, K)
                with precision.autocast(device):
                    out = model(sub, labels)
                total += unweighted_nll(subtoken_loss(out.logits, sub).parts) * codes.shape[0]
        finally:
            model.train(was)
        return total / max(self.count, 1)

