#!/usr/bin/env python
"""Convert an ImageNet-layout image folder into webdataset shards.

    python tools/make_shards.py /data/imagenet/train /data/shards --prefix train --max-count 1000

Each sample keeps the original file bytes (no re-encoding) with its class index
under ``cls`` and its folder index as the key. Samples are written in a seeded
random order (``--shuffle-seed``, default 0) so that shard-level shuffling mixes
classes; ``--keep-order`` keeps the folder order. Unreadable files are left
out and listed (``--no-verify`` copies them unchecked; readers then skip them).
Next to the shards goes ``<prefix>.json``: the shard pattern, class names,
per-class counts and the skipped files. Read the shards with
``arforge.data.ImageShardsDataset(urls=<pattern>)``.
"""

from __future__ import annotations

import argparse
import sys

from arforge.data.image_datasets import write_image_shards
from arforge.errors import ArforgeError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="image folder: one subfolder per class")
    p.add_argument("output_dir", help="folder for the .tar shards and <prefix>.json")
    p.add_argument("--prefix", default="train", help="shard name prefix: <prefix>-000000.tar (default: train)")
    p.add_argument("--max-count", type=int, default=1000, help="samples per shard (default: 1000)")
    p.add_argument("--max-size", type=float, default=1e9, help="bytes per shard (default: 1e9)")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--shuffle-seed", type=int, default=0, help="seed of the write order (default: 0)")
    order.add_argument("--keep-order", action="store_true", help="write in folder order")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="do not decode each file first (faster; unreadable files end up in the shards)")
    p.add_argument("--exclude", action="append", default=[], metavar="FILENAME",
                   help="file name to leave out (repeatable), e.g. n06596364_9591.JPEG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        info = write_image_shards(source=args.source, output_dir=args.output_dir, prefix=args.prefix,
                                  max_count=args.max_count, max_size=args.max_size,
                                  shuffle_seed=None if args.keep_order else args.shuffle_seed,
                                  verify=args.verify, exclude=args.exclude, progress=not args.quiet)
    except ArforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {info.num_samples} samples of {len(info.class_names)} classes in {len(info.shards)} shard(s): "
          f"{info.pattern}")
    if info.skipped:
        print(f"skipped {len(info.skipped)} unreadable file(s), listed in {info.info_path}")
    print(f"info: {info.info_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
