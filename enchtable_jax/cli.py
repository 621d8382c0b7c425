"""`enchtable` command line: thin wrappers over the Python API, one subcommand per stage."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from enchtable_jax import api
from enchtable_jax.converters.atomic import check_destination
from enchtable_jax.converters.hf import DEFAULT_SHARD_SIZE, parse_size
from enchtable_jax.converters.orbax_io import is_orbax_checkpoint
from enchtable_jax.models.init import PRESETS, init_params, preset_config


def _convert(args: argparse.Namespace) -> None:
    src = Path(args.src)
    to_hf = is_orbax_checkpoint(src)
    # refuse bad requests before reading anything
    check_destination(args.dst, args.overwrite)
    parse_size(args.shard_size)
    if args.like is not None and not to_hf:
        raise ValueError("--like applies to orbax -> HF conversion; an HF source brings its own files")
    start = time.perf_counter()
    model = api.load(src, dtype=args.dtype)
    if to_hf:
        out = api.save(model, args.dst, like=args.like, shard_size=args.shard_size, overwrite=args.overwrite)
        what = "HF folder"
    else:
        out = api.save_orbax(model, args.dst, overwrite=args.overwrite)
        what = "orbax checkpoint"
    print(f"wrote {what} {out} ({len(model.params)} tensors) in {time.perf_counter() - start:.1f}s")


def _info(args: argparse.Namespace) -> None:
    info = api.describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key == "files":
            value = ", ".join(f"{f['file']} ({f['bytes'] / 1e6:.1f} MB)" for f in value)
        elif key == "dtypes":
            value = ", ".join(f"{k}: {v:,} params" for k, v in value.items())
        elif key == "parameters":
            value = f"{value:,}"
        elif key == "extra_tensors":
            value = ", ".join(value) if value else "none"
        print(f"{key:<{width}}  {value}")


def _init(args: argparse.Namespace) -> None:
    check_destination(args.dst, args.overwrite)
    config = preset_config(args.preset, args.arch)
    model = api.Model(config, init_params(config, seed=args.seed, dtype=args.dtype))
    out = api.save(model, args.dst, overwrite=args.overwrite)
    print(f"wrote a random {args.arch} model of preset {args.preset!r} to {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="enchtable",
        description="EnchTable in JAX: transfer safety alignment into fine-tuned LLMs. "
                    "Models are Hugging Face folders or enchtable orbax checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="HF folder -> orbax checkpoint, or orbax checkpoint -> HF folder",
                       description="Convert between an HF model folder (safetensors or .bin) and an orbax "
                                   "checkpoint. The direction follows the source.")
    p.add_argument("src", help="HF model folder or enchtable orbax checkpoint")
    p.add_argument("dst", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--like", help="orbax -> HF: folder whose tokenizer/chat-template files to copy "
                                  "(default: those stored in the checkpoint)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast floating tensors (default: keep)")
    p.add_argument("--shard-size", default=DEFAULT_SHARD_SIZE, help="largest safetensors shard, e.g. 5GB, 500MB")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_convert)

    p = sub.add_parser("info", help="architecture, parameter count, dtypes and shards of a model",
                       description="Describe a model folder or checkpoint from its headers, without loading weights.")
    p.add_argument("path", help="HF model folder or enchtable orbax checkpoint")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_info)

    p = sub.add_parser("init", help="write a randomly initialised model of a built-in shape (demos, tests, speed)",
                       description="Write an HF folder holding a random model of a preset shape.")
    p.add_argument("dst", help="output folder")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS))
    p.add_argument("--arch", default="llama", choices=["llama", "mistral", "qwen2"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_init)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        print(f"enchtable {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
