""":func:`generate`: images of given classes from a loaded run, as :class:`Samples` (docs/api.md#generate)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from arforge.api.loaded import LoadedRun
from arforge.api.runs import LoadError

if TYPE_CHECKING:  # torch and PIL are imported when a function needs them: `import arforge` stays cheap
    import torch
    from PIL import Image

__all__ = ["Samples", "generate", "png"]


@dataclass(frozen=True)
class Samples:
    """Generated images, with the classes and settings that made them.

    ``images`` is uint8 (B, H, W, 3). Sample i draws from its own random stream, seeded by
    (``seed``, i) as ``jobs.sample`` seeds its samples (:func:`arforge.sampling_job.sample_seed`),
    so it does not depend on the other samples or the batch size, up to the floating-point
    differences some kernels show between batch shapes.
    """

    images: "torch.Tensor"  #: uint8 (B, H, W, 3)
    labels: "torch.Tensor"  #: int64 (B,)
    seed: int
    guidance: str  #: what guided them ("none", or the schedule's repr)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def pil(self) -> list["Image.Image"]:
        """One PIL image per sample."""
        from PIL import Image

        return [Image.fromarray(im) for im in self.images.cpu().numpy()]

    def grid(self, *, nrow: int | None = None) -> "Image.Image":
        """All samples in one picture, ``nrow`` per row (default: up to 8)."""
        from arforge.viz import image_grid

        arr = self.images.cpu().numpy()
        return image_grid(arr, nrow=nrow or min(len(arr), 8))

    def _repr_png_(self) -> bytes:  # a notebook cell ending in `samples` shows the grid
        return png(self.grid())


def png(image: "Image.Image") -> bytes:
    """``image`` as PNG bytes (what a notebook's ``_repr_png_`` hands to the display)."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _guidance(guidance: Any, loaded: LoadedRun) -> Any:
    """A schedule object from what the caller gave: a number is constant CFG at that scale."""
    from arforge import registry as reg

    if isinstance(guidance, str) and guidance == "run":
        return loaded.guidance
    if guidance is None:
        return None
    if isinstance(guidance, bool):
        raise LoadError("guidance must be a CFG scale (a number), a guidance schedule object, None or 'run', "
                        f"not {guidance!r}")
    if isinstance(guidance, (int, float)) or (isinstance(guidance, (tuple, list))
                                               and all(isinstance(s, (int, float)) for s in guidance)):
        return reg.get("guidance", "cfg_constant")(scale=guidance)
    if isinstance(guidance, str):
        raise LoadError(f"guidance={guidance!r}: give a scale (guidance=1.5) or a schedule object, e.g. "
                        f"arforge.registry.get('guidance', 'cfg_linear')(start=1.0, end=2.0); registered: "
                        f"{', '.join(reg.names('guidance'))}")
    if not hasattr(guidance, "scale") or not hasattr(guidance, "guided"):
        raise LoadError(f"guidance={guidance!r} is not a guidance schedule (it needs .guided and .scale(...))")
    return guidance


def _model_and_tokenizer(loaded: Any) -> tuple[Any, Any]:
    if isinstance(loaded, LoadedRun):
        if loaded.model is None:
            raise LoadError(f"{loaded.source} holds no AR model (a jobs.{loaded.job} run): load an AR, sample or "
                            "pipeline run to generate")
        if loaded.tokenizer is None:
            raise LoadError(f"{loaded.source}: no tokenizer was found for its model, so its tokens cannot become "
                            "images; load the pipeline or sample run instead")
        return loaded.model, loaded.tokenizer
    raise LoadError(f"generate needs what arforge.load returned, not {type(loaded).__name__}")


def generate(loaded: LoadedRun, *, classes: int | Sequence[int] | "torch.Tensor", guidance: Any = "run",
             seed: int = 0, temperature: float | Sequence[float] | None = None,
             top_k: int | Sequence[int] | None = None, top_p: float | Sequence[float] | None = None,
             batch_size: int = 64, progress: bool = False) -> Samples:
    """Images of the given classes from a loaded run.

    Args:
        loaded: what :func:`arforge.load` returned.
        classes: one class per image (``[3] * 8``), or one class (one image).
        guidance: a CFG scale (``1.5``; a tuple gives one per sub-token), a guidance schedule
            object (``arforge.registry.get("guidance", "cfg_linear")(start=1.0, end=2.0)``),
            None (unguided) or ``"run"``: the run's own schedule (sample runs), else unguided.
        seed: sample i draws from its own stream seeded by (seed, i), as ``jobs.sample`` does.
        temperature, top_k, top_p: per sub-token or for all; default: the run's, else 1.0, 0, 1.0.
        batch_size: images decoded at once (guidance doubles the rows).
        progress: a progress bar per batch.
    """
    import numpy as np
    import torch

    from arforge import generation
    from arforge.interfaces import as_grid
    from arforge.metrics.adm import to_uint8
    from arforge.sampling_job import sample_seed

    model, tokenizer = _model_and_tokenizer(loaded)
    labels = torch.as_tensor([classes] if isinstance(classes, int) else classes, dtype=torch.int64).reshape(-1)
    n_classes = int(model.null_class)
    bad = [int(c) for c in labels if not 0 <= int(c) < n_classes]
    if bad or len(labels) == 0:
        raise LoadError(f"classes must be 1 or more labels in [0, {n_classes}) (the model's classes; "
                        f"{n_classes} is the CFG null class), got {bad[:5] if bad else 'none'}")
    if batch_size < 1:
        raise LoadError(f"batch_size must be >= 1, got {batch_size}")
    schedule = _guidance(guidance, loaded)
    settings = generation.sampling_settings(
        model.num_subtokens,
        temperature=loaded.sampling.get("temperature", 1.0) if temperature is None else temperature,
        top_k=loaded.sampling.get("top_k", 0) if top_k is None else top_k,
        top_p=loaded.sampling.get("top_p", 1.0) if top_p is None else top_p)
    device = next(model.parameters()).device
    model.eval()
    if isinstance(tokenizer, torch.nn.Module):
        tokenizer.to(device).eval()
    grid = as_grid(model.block_size)
    out = []
    starts = range(0, len(labels), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="generate", unit="batch")
    for start in starts:
        lab = labels[start:start + batch_size].to(device)
        gens = [torch.Generator(device=device).manual_seed(sample_seed(seed, i))
                for i in range(start, start + len(lab))]
        sub = generation.generate(model, lab, guidance=schedule, sampling=settings, generator=gens)  # (b, L, K)
        out.append(to_uint8(generation.decode_tokens(tokenizer, model.factorization, sub, grid).float()))
    images = torch.from_numpy(np.concatenate(out))  # (B, H, W, 3) uint8
    return Samples(images=images, labels=labels.cpu(), seed=int(seed),
                   guidance="none" if schedule is None or not schedule.guided else repr(schedule))
