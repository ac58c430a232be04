#!/usr/bin/env python
"""Make an ADM-format reference batch (.npz) from a dataset: arr_0 uint8 NHWC, seeded order, optional statistics.

    # an image folder (ImageNet layout), centre-cropped to 256 by the ADM transform
    python tools/make_reference.py val_ref.npz --folder /data/imagenet/val --image-size 256

    # any registered dataset, configured by gin bindings; with digits-classifier statistics
    python tools/make_reference.py digits_ref.npz --dataset '@datasets.digits()' \\
        --bind 'datasets.digits.split = "val"' --bind 'datasets.digits.image_size = 16' \\
        --feature-extractor '@feature_extractors.digits_classifier()' \\
        --bind 'feature_extractors.digits_classifier.path = "outputs/quickstart/fe/feature_extractor.safetensors"'

Runs ``jobs.make_reference`` (``arforge.evaluation.jobs``) as an MLflow run of
experiment ``--experiment`` (default ``references``). The images are converted
by rounding (``to_uint8``, docs/evaluation.md#sample-files), shuffled with
``np.random.default_rng(--seed).permutation``, optionally subsampled
(``--num-images``) and resized (``--resize``: bicubic, no antialiasing, as the
sample protocol), and written uncompressed next to ``arr_1`` (labels). With
``--feature-extractor`` the file also holds ``mu``/``sigma`` (and
``mu_s``/``sigma_s`` where the network has spatial features) and names the
network, so the evaluator uses these statistics and refuses another network's.
The file appears only when complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from arforge.errors import ArforgeError


def bindings_from_args(args: argparse.Namespace) -> list[str]:
    """The gin bindings that configure ``launch`` and ``jobs.make_reference`` from the command line."""
    out = ["launch.job = @jobs.make_reference",
           f"launch.experiment = {args.experiment!r}",
           f"launch.run_name = {args.run_name!r}",
           f"launch.device = {args.device!r}",
           f"jobs.make_reference.output = {str(Path(args.output).resolve())!r}",
           f"jobs.make_reference.seed = {args.seed}",
           f"jobs.make_reference.batch_size = {args.batch_size}",
           f"jobs.make_reference.num_workers = {args.num_workers}"]
    if args.folder is not None:
        out += ["jobs.make_reference.dataset = @datasets.image_folder()",
                f"datasets.image_folder.root = {str(Path(args.folder).resolve())!r}",
                f"datasets.image_folder.image_size = {args.image_size}",
                f"datasets.image_folder.transform = {args.transform!r}"]
    elif args.dataset is not None:
        out.append(f"jobs.make_reference.dataset = {args.dataset}")
    if args.num_images is not None:
        out.append(f"jobs.make_reference.num_images = {args.num_images}")
    if args.resize is not None:
        out.append(f"jobs.make_reference.image_size = {args.resize}")
    if args.feature_extractor is not None:
        out.append(f"jobs.make_reference.feature_extractor = {args.feature_extractor}")
    if args.quiet:
        out.append("jobs.make_reference.progress = False")
    return out + list(args.bind)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", help="the reference .npz to write")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--folder", help="an ImageNet-layout image folder (one subfolder per class)")
    src.add_argument("--dataset", help="a gin reference to a dataset, e.g. '@datasets.digits()' (configure it "
                                       "with --bind or --gin)")
    p.add_argument("--image-size", type=int, default=256, help="--folder: crop size of its transform (default 256)")
    p.add_argument("--transform", default="adm_eval", help="--folder: its transform (default adm_eval: "
                                                           "ADM centre crop)")
    p.add_argument("--resize", type=int, default=None,
                   help="resize every image to S x S before rounding (bicubic, no antialiasing)")
    p.add_argument("--num-images", type=int, default=None, help="a seeded random subset of this size (default all)")
    p.add_argument("--seed", type=int, default=0, help="the shuffle seed (default 0)")
    p.add_argument("--feature-extractor", default=None,
                   help="gin reference to a feature extractor whose statistics to store, e.g. "
                        "'@feature_extractors.inception()'")
    p.add_argument("--gin", default=None, help="a gin file with further bindings (parsed before --bind)")
    p.add_argument("--bind", "-b", action="append", default=[], help="a gin binding (repeatable)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default 0)")
    p.add_argument("--device", default="auto", help="device of the feature extractor: auto|cpu|cuda|npu")
    p.add_argument("--experiment", default="references", help="MLflow experiment (default references)")
    p.add_argument("--run-name", default="make_reference", help="MLflow run name (default make_reference)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.folder is None and args.dataset is None and args.gin is None:
        p.error("give the images with --folder DIR, --dataset '@datasets.NAME()' or a --gin file that binds "
                "jobs.make_reference.dataset")
    from arforge import launch

    try:
        info = launch.run_file(args.gin, bindings_from_args(args))
    except ArforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if info is not None:
        print(f"wrote {info.num_images} images of {info.image_size[0]}x{info.image_size[1]} (seed {info.seed})"
              f"{' with ' + info.feature_extractor + ' statistics' if info.with_stats else ''}: {info.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
