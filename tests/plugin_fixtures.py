"""Build out-of-tree plugin distributions on the fly (a ``.dist-info`` folder on sys.path).

This is exactly what ``pip install`` leaves behind for a third-party plugin, so
the registry discovers them through the real ``arforge.plugins`` entry points.
"""

from __future__ import annotations

import textwrap
from pathlib import Path


def make_plugin_dist(root: Path, dist: str, version: str, module: str, source: str,
                     entry_points: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = ["[arforge.plugins]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    (info / "RECORD").write_text("")
    return root


TOY_JOB_SOURCE = '''
"""A third-party plugin: a tiny least-squares fit, logged step by step."""
import torch


def toy_fit(ctx, *, steps: int = 5, lr: float = 0.1, width: int = 3):
    """Fit y = X w by gradient descent and log the loss (a third-party job)."""
    g = torch.Generator().manual_seed(ctx.seed)
    x = torch.randn(64, width, generator=g)
    w_true = torch.arange(1.0, width + 1)
    y = x @ w_true
    w = torch.zeros(width, requires_grad=True)
    opt = torch.optim.SGD([w], lr=lr)
    for step in range(steps):
        loss = ((x @ w - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctx.tracker.log_metrics({"loss": float(loss)}, step=step)
    return float(loss)


class SignQuantizer:
    """Quantise to the sign of each channel (a third-party quantizer)."""

    def __init__(self, *, dim: int = 4):
        self.dim = dim
'''
