"""`python -m mlx_dgemma.convert`: the converter's command line (and, with --to-hf, the exporter's).

    python -m mlx_dgemma.convert --hf-path google/diffusiongemma-26B-A4B-it --mlx-path dgemma-4bit -q

The library lives below: `convert()` and `estimate()` in `conversion.py`, the plan in `conversion_plan.py`,
`resolve_checkpoint` in `checkpoint.py`. Their names are re-exported here (imported on first use, so that
`--help` does not load MLX), and the module itself can be called like the `convert` function.
"""

from __future__ import annotations

import argparse
import signal
import sys

from .config import DTYPES, QUANT_RECIPES
from .reexports import lazy_reexports

MAX_SHARD_HELP = "5GB"  # conversion.MAX_SHARD_BYTES, mlx-lm's shard size

_LIBRARY = {
    "checkpoint": ("HUB_PATTERNS", "ConversionError", "resolve_checkpoint", "config_path_for"),
    "conversion_plan": ("CHUNK_ELEMENTS", "row_ranges", "Entry", "expected_shapes", "vision_shapes", "Plan",
                        "source_dtype", "make_plan", "bits_per_weight"),
    "conversion": ("MAX_SHARD_BYTES", "COPIED_FILES", "staged_folder", "shard", "shard_filenames", "write_folder",
                   "convert", "COMPONENTS", "estimate"),
}


def parse_size(text: str) -> int:
    units = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "K": 1e3, "M": 1e6, "G": 1e9, "B": 1}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_dgemma.convert",
        description="Convert a Hugging Face DiffusionGemma checkpoint to MLX format (optionally quantized).",
    )
    p.add_argument("--hf-path", "--model", dest="hf_path", required=True, help="Local folder or Hugging Face repo id.")
    p.add_argument("--mlx-path", default="mlx_model", help="Output folder (must not exist). Default: mlx_model")
    p.add_argument("--dtype", choices=DTYPES, help="Float dtype of the weights. Default: the checkpoint's.")
    p.add_argument("-q", "--quantize", action="store_true", help="Quantize the weights.")
    p.add_argument("--q-bits", type=int, help="Bits per weight for quantization (4 or 8). Default: 4.")
    p.add_argument("--q-group-size", type=int, help="Group size for quantization (32, 64, 128). Default: 64.")
    p.add_argument("--q-mode", default="affine", help="Quantization mode: affine, mxfp4, mxfp8. Default: affine.")
    p.add_argument("--quant-recipe", default="mixed", choices=QUANT_RECIPES,
                   help="mixed: only the experts at --q-bits, everything else 8-bit (default); uniform: all at --q-bits.")
    p.add_argument("-d", "--dequantize", action="store_true", help="Dequantize a quantized MLX folder.")
    p.add_argument("--dry-run", action="store_true", help="Read only config.json and print the output size per component.")
    p.add_argument("--max-shard-size", type=parse_size, help=f"Largest weight file. Default: {MAX_SHARD_HELP}.")
    p.add_argument("--revision", help="Hub revision to download.")
    p.add_argument("--to-hf", action="store_true",
                   help="The other way: export the MLX folder --mlx-path to a Hugging Face folder --hf-path "
                        "(dequantized; loads with transformers' from_pretrained).")
    p.add_argument("--adapter-path", help="With --to-hf: fuse these LoRA adapters into the exported weights.")
    return p


def _interrupt(*_):
    raise KeyboardInterrupt


def main(argv=None):
    args = build_parser().parse_args(argv)
    # A terminated conversion must still clean up its temporary folder.
    signal.signal(signal.SIGTERM, _interrupt)
    from .conversion import convert, estimate
    from .conversion_plan import bits_per_weight

    shards = {} if args.max_shard_size is None else {"max_shard_size": args.max_shard_size}
    try:
        if args.to_hf:
            from .export import export_hf

            export_hf(args.mlx_path, args.hf_path, adapter_path=args.adapter_path, dtype=args.dtype, **shards)
            return 0
        if args.dry_run:
            rows, plan = estimate(
                args.hf_path, dtype=args.dtype, quantize=args.quantize, q_bits=args.q_bits,
                q_group_size=args.q_group_size, q_mode=args.q_mode, quant_recipe=args.quant_recipe,
                dequantize=args.dequantize, revision=args.revision,
            )
            width = max(len(r[0]) for r in rows)
            for label, nbytes, params in rows:
                print(f"{label:<{width}}  {nbytes / 1e9:8.3f} GB  {params / 1e9:7.3f} B params  {8 * nbytes / params:6.2f} bits/weight")
            total = sum(r[1] for r in rows)
            print(f"Total: {total / 1e9:.2f} GB ({bits_per_weight(plan):.2f} bits per weight)")
            return 0
        convert(
            args.hf_path, args.mlx_path, dtype=args.dtype, quantize=args.quantize, q_bits=args.q_bits,
            q_group_size=args.q_group_size, q_mode=args.q_mode, quant_recipe=args.quant_recipe,
            dequantize=args.dequantize, revision=args.revision, **shards,
        )
        return 0
    except ValueError as e:  # ConversionError, ConfigError, CheckpointError: each names the file, key or flag
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130


lazy_reexports(__name__, _LIBRARY, call="convert")

if __name__ == "__main__":
    sys.exit(main())
