#!/usr/bin/env python
"""Tokenizer and evaluation throughput: images/s of encode, decode and Inception features.

    # the three tokenizers at paper size (256 px), arforge alone
    python tools/benchmark_throughput.py --tokenizer vq16 --batch 8
    python tools/benchmark_throughput.py --tokenizer lfq --batch 8
    python tools/benchmark_throughput.py --tokenizer semantic_detail --batch 8

    # LlamaGen's VQ-16 side by side (the reference code imported from a local checkout)
    python tools/benchmark_throughput.py --tokenizer vq16 --batch 8 --upstream-dir ~/src/LlamaGen

    # Inception-v3 features (FID/IS/PR): arforge's extractor against torch-fidelity's own
    python tools/benchmark_throughput.py --inception --batch 32

Results and the commands that made them: docs/performance.md#tokenizer-and-evaluation-throughput.

**Same weights, same images.** Tokenizers get seeded random weights at paper size (the
throughput of a convolution does not depend on its values). Against LlamaGen, upstream's
``VQ_16`` is built, drawn from a seeded generator, saved in the release container
(``{"model": state_dict}``) and read into arforge by ``loaders.official_llamagen_vq``, as a user
loads ``vq_ds16_c2i.pt``; both sides must give the same ids (encode) and images within 1e-4
(decode) before timing. Inception: torch-fidelity's Inception-v3 with random He-initialised
weights (no network here; as the tests build it) saved under the official file name; both
extractors read that file and must give the same pool features before timing.

**Timing.** One warm-up of each side, then ``--repeats`` rounds A B A B, as ``tools/benchmark.py``
(whose statistics and machine line this tool shares); images/s = batch / median time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import SEED, _registry, alternate, machine, machine_line, summarize, upstream_commit  # noqa: E402

TOKENIZERS = ("vq16", "lfq", "semantic_detail")


def _randomize(module, seed: int) -> None:
    """Seeded weights at a scale that keeps activations O(1) through the conv stacks."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if p.dim() == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.02 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)


def arforge_tokenizer(kind: str):
    """The paper-size tokenizer through the registry, as a gin file builds it."""
    reg = _registry()
    if kind == "vq16":  # LlamaGen VQ-16: codebook 16384 x 8, l2-normalised
        q = reg.get("quantizers", "vq")(codebook_size=16384, dim=8)
        return reg.get("tokenizers", "llamagen_vq")(quantizer=q, preset="vq16")
    if kind == "lfq":  # Open-MAGVIT2 256 px: 2^18 codes
        q = reg.get("quantizers", "lfq")(bits=18)
        return reg.get("tokenizers", "open_magvit2")(quantizer=q, preset="256")
    # IAR2 stage-2 tokenizer: VQ-16 with a semantic (256) and a detail (4096) codebook
    q = reg.get("quantizers", "semantic_detail")(semantic_codebook_size=256, detail_codebook_size=4096, dim=8)
    return reg.get("tokenizers", "llamagen_vq")(quantizer=q, preset="vq16")


def _images(batch: int, size: int):
    import torch

    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(SEED)) * 2 - 1


def _report(times: dict[str, list[float]], batch: int, what: str) -> dict[str, float]:
    rates = {}
    for side, ts in times.items():
        s = summarize(ts)
        rates[side] = batch / s.median
        print(f"  {what} {side:>8}: {s.median:.3f} s per batch (min {s.min:.3f}, max {s.max:.3f}), "
              f"{rates[side]:.2f} images/s", flush=True)
    if len(rates) == 2:
        print(f"  {what}: arforge / upstream images/s = {rates['arforge'] / rates['upstream']:.2f}x", flush=True)
    return rates


def bench_tokenizer(args) -> dict[str, Any]:
    import torch

    tok = arforge_tokenizer(args.tokenizer)
    _randomize(tok, SEED)
    up = None
    if args.upstream_dir:
        if args.tokenizer != "vq16":
            raise SystemExit("--upstream-dir compares LlamaGen's VQ-16 only (--tokenizer vq16)")
        folder = Path(args.upstream_dir).expanduser().resolve()
        sys.path.insert(0, str(folder))
        from tokenizer.tokenizer_image.vq_model import VQ_16

        torch.manual_seed(SEED)
        up = VQ_16(codebook_size=16384, codebook_embed_dim=8)
        _randomize(up, SEED)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "vq_ds16_c2i.pt"
            torch.save({"model": up.state_dict()}, path)
            tok = _registry().get("loaders", "official_llamagen_vq")(module=tok, checkpoint=path)
        up.eval()
        print(f"upstream: LlamaGen at {upstream_commit(folder)} ({folder}); weights: seeded upstream VQ_16 -> "
              "temp vq_ds16_c2i.pt -> loaders.official_llamagen_vq", flush=True)
    tok.eval()
    m = machine("float32")
    print(machine_line(m))
    images = _images(args.batch, args.image_size)
    grid = (args.image_size // 16, args.image_size // 16)
    with torch.no_grad():
        ids = tok.encode(images)  # (B, L, S)
        if up is not None:  # the same ids and images before timing
            _, _, (_, _, up_ids) = up.encode(images)
            if not torch.equal(up_ids.view(args.batch, -1), ids[..., 0]):
                raise SystemExit("encode: upstream and arforge ids differ: not timing")
            a = up.decode_code(ids[..., 0], (args.batch, 8, *grid))
            b = tok.decode(ids, grid)
            if (a - b).abs().max() > 1e-4:
                raise SystemExit(f"decode: images differ by {(a - b).abs().max():.2e}: not timing")
            print(f"check: equal ids and images within 1e-4 (max {(a - b).abs().max():.1e}) at batch {args.batch}")
    print(f"{args.tokenizer} tokenizer at {args.image_size} px, batch {args.batch}, float32, eager", flush=True)
    out: dict[str, Any] = {"machine": m, "tokenizer": args.tokenizer, "batch": args.batch}
    for what, ours, theirs in (
            ("encode", lambda: tok.encode(images),
             (lambda: up.encode(images)) if up is not None else None),
            ("decode", lambda: tok.decode(ids, grid),
             (lambda: up.decode_code(ids[..., 0], (args.batch, 8, *grid))) if up is not None else None)):
        runs: dict[str, Callable[[], Any]] = {"upstream": theirs} if theirs is not None else {}
        runs["arforge"] = ours
        with torch.no_grad():
            times = alternate(runs, args.repeats)
        out[what] = _report(times, args.batch, what)
    return out


def bench_inception(args) -> dict[str, Any]:
    import numpy as np
    import torch

    from arforge.evaluation.feature_extractors import InceptionV3Features, _import_torch_fidelity

    fe_cls = _import_torch_fidelity()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.inception_weights) if args.inception_weights else None
        if path is None:
            from unittest import mock

            import torch_fidelity.feature_extractor_inceptionv3 as fe

            torch.manual_seed(SEED)
            with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
                    mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None):
                net = fe.FeatureExtractorInceptionV3("random", ["2048"])
            for mod in net.modules():
                if isinstance(mod, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
            path = Path(tmp) / "weights-inception-2015-12-05-6726825d.pth"
            torch.save(net.state_dict(), path)
        ours = InceptionV3Features(weights_path=path, verify_hash=bool(args.inception_weights))
        theirs = fe_cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)).eval()
    m = machine("float32")
    print(machine_line(m))
    images = np.random.default_rng(SEED).integers(0, 256, size=(args.batch, args.image_size, args.image_size, 3),
                                                  dtype=np.uint8)
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # what torch-fidelity takes

    def fidelity():
        with torch.no_grad():
            return theirs(nchw)[0]

    a, b = fidelity().numpy(), ours.features(images).pool
    if not np.allclose(a, b, rtol=1e-5, atol=1e-5):
        raise SystemExit(f"pool features differ by {np.abs(a - b).max():.2e}: not timing")
    print(f"check: equal pool features (max |diff| {np.abs(a - b).max():.1e}); Inception-v3 at {args.image_size} px "
          f"-> 299, batch {args.batch}; arforge also returns the IS logits and the sFID map", flush=True)
    times = alternate({"upstream": fidelity, "arforge": lambda: ours.features(images)}, args.repeats)
    print("  (upstream = torch-fidelity's FeatureExtractorInceptionV3)")
    return {"machine": m, "inception": _report(times, args.batch, "features"), "batch": args.batch}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", choices=TOKENIZERS)
    ap.add_argument("--inception", action="store_true")
    ap.add_argument("--upstream-dir", help="--tokenizer vq16: a LlamaGen checkout to compare with")
    ap.add_argument("--inception-weights", help="the torch-fidelity Inception file (default: random, same for both)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if (args.tokenizer is None) == (not args.inception):
        ap.error("give one of --tokenizer KIND or --inception")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    bench_tokenizer(args) if args.tokenizer else bench_inception(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
