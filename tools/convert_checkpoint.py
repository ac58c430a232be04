"""Convert an official upstream checkpoint into an arforge checkpoint (safetensors, no pickle).

    python tools/convert_checkpoint.py FORMAT INPUT OUTPUT_DIR --gin PRESET.gin [--bind ...] [--weights model|ema]

FORMAT is one of the official loaders (``llamagen_gpt``, ``open_magvit2_ar``,
``iar2_gpt``, ``llamagen_vq``, ``iar2_vq``, ``open_magvit2_tokenizer``). The
module is built from a gin preset that defines ``%MODEL`` (AR formats) or
``%TOKENIZER`` (tokenizer formats), e.g. ``gin/models/llamagen_b.gin`` with
``--bind 'models.llamagen_gpt.block_size = 256'`` for ``c2i_B_256.pt``. The
official file is loaded with ``torch.load(weights_only=True)`` through the
strict key map; any key left unmapped, missing or mis-shaped is reported and
nothing is written. The output is an arforge checkpoint folder (step 0) whose
``model`` weights ``loaders.arforge_checkpoint`` loads strictly; its
``meta.json`` records the source file, its SHA-256 and the gin config. For
``open_magvit2_ar`` the embedded tokenizer is written to ``OUTPUT_DIR/tokenizer``
when the preset also defines ``%TOKENIZER``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

AR_FORMATS = ("llamagen_gpt", "open_magvit2_ar", "iar2_gpt")
TOKENIZER_FORMATS = ("llamagen_vq", "iar2_vq", "open_magvit2_tokenizer")


def convert(fmt: str, source: str | Path, output: str | Path, *, gin_file: str | Path,
            bindings: list[str] | tuple[str, ...] = (), weights: str | None = None) -> Path:
    import gin

    from arforge import checkpoint as ck
    from arforge import launch
    from arforge.errors import ConfigError

    if fmt not in AR_FORMATS + TOKENIZER_FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; choose one of {', '.join(AR_FORMATS + TOKENIZER_FORMATS)}")
    launch.parse(gin_file, list(bindings))
    macro = "MODEL" if fmt in AR_FORMATS else "TOKENIZER"
    try:
        module = gin.query_parameter(f"%{macro}").scoped_configurable_fn()
    except ValueError as exc:
        raise ConfigError(f"{gin_file} defines no %{macro} (use a preset from gin/models or gin/tokenizers)") from exc
    loader = launch.reg.get("loaders", f"official_{fmt}")
    kwargs = {"module": module, "checkpoint": source}
    if weights is not None:
        kwargs["weights"] = weights
    loader(**kwargs)
    tokenizer = None
    if fmt == "open_magvit2_ar":  # the file embeds its tokenizer: read it by the tokenizer's own loader
        try:
            tokenizer = gin.query_parameter("%TOKENIZER").scoped_configurable_fn()
        except ValueError:
            tokenizer = None
        if tokenizer is not None:
            launch.reg.get("loaders", "official_open_magvit2_tokenizer")(module=tokenizer, checkpoint=source,
                                                                        weights="model")
    config = {"source": str(source), "source_sha256": module.checkpoint_sha256, "format": fmt,
              "gin": gin.config_str()}
    out = ck.save_checkpoint(output, 0, {"model": module.state_dict()}, config=config)
    if tokenizer is not None:
        ck.save_checkpoint(Path(output) / "tokenizer", 0, {"model": tokenizer.state_dict()},
                           config={**config, "part": "embedded first_stage_model"})
    return out


def main(argv: list[str] | None = None) -> int:
    from arforge.errors import ArforgeError

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("format", choices=AR_FORMATS + TOKENIZER_FORMATS)
    p.add_argument("input", help="the official .pt/.pth/.ckpt file")
    p.add_argument("output", help="the arforge checkpoint folder to write")
    p.add_argument("--gin", required=True, help="a preset defining %%MODEL or %%TOKENIZER")
    p.add_argument("--bind", action="append", default=[], help="extra gin bindings (repeatable)")
    p.add_argument("--weights", choices=("model", "ema"), help="which weights of the file (format default)")
    args = p.parse_args(argv)
    try:
        out = convert(args.format, args.input, args.output, gin_file=args.gin, bindings=args.bind,
                      weights=args.weights)
    except ArforgeError as exc:
        print(f"convert_checkpoint: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} (every official key mapped; load it with loaders.arforge_checkpoint)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
