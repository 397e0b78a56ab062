"""python -m convert_mt3 CHECKPOINT_DIR OUT_DIR [options]: T5X MT3 checkpoint -> Hugging Face folder."""

from __future__ import annotations

import argparse
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import __version__
from .cli import DTYPES, Interrupts, OneLineParser, first_line, printable


def _checked(kind: type, ok, expected: str):
    """An argparse type: `kind(text)` if `ok` of it, else an error saying what was expected."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, found {text!r}")
        return value

    return parse


SIZE = _checked(int, lambda n: n >= 1, "an integer >= 1")
# bounded: the sinusoid table is allocated (1e9 rows ran out of memory, with no flag named)
POSITIONS = _checked(int, lambda n: 1 <= n <= 1 << 16, "an integer from 1 to 65536")


# MT3Config fields a flag can set (value type, help); unset flags keep what the checkpoint says.
OVERRIDES = {
    "d_model": (SIZE, "model width (default: from the token embedder's shape)"),
    "d_ff": (SIZE, "MLP width (default: from mlp/wi_0)"),
    "num_layers": (SIZE, "encoder layers (default: counted in the checkpoint)"),
    "num_decoder_layers": (SIZE, "decoder layers (default: counted in the checkpoint)"),
    "num_heads": (SIZE, "attention heads (default: config.gin, else 6)"),
    "d_kv": (SIZE, "size of one attention head (default: config.gin head_dim, else 64)"),
    "vocab_size": (SIZE, "output vocabulary (default: from the token embedder's shape)"),
    "input_depth": (SIZE, "log-mel bins per encoder frame (default: from continuous_inputs_projection)"),
    "max_position_embeddings": (POSITIONS, "rows of the sinusoid position table (default 2048)"),
    "dropout_rate": (_checked(float, lambda r: 0 <= r < 1, "a number from 0 to below 1"), "dropout for fine-tuning (default: config.gin, else 0.1)"),
    "layer_norm_epsilon": (_checked(float, lambda e: 0 < e < math.inf, "a finite number > 0"), "RMS-norm epsilon (default 1e-6)"),
}


# Layout of the checkpoint's variant (convert_mt3.variant): unset flags keep what the vocabulary size / config.gin say.
VARIANT_FLAGS = {
    "frames_per_segment": (int, "encoder input frames per segment (mt3 256, ismir2021 512)"),
    "num_velocity_bins": (int, "velocity bins of the vocabulary (mt3 1, ismir2021 127)"),
    "program_granularity": (str, "programs in the targets: full (mt3), midi_class or flat (ismir2021)"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(
        prog="python -m convert_mt3",
        description="Convert a Magenta MT3 T5X checkpoint into a Hugging Face transformers folder "
        "(safetensors, config, processor, remote code, model card), verify it, optionally push it.",
    )
    parser.add_argument("checkpoint_dir", metavar="CHECKPOINT_DIR", help="T5X checkpoint folder (msgpack `checkpoint` + target.* zarr folders)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write; built beside it and moved in when verified")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the saved weights (default float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is a folder convert-mt3 wrote (every entry listed in its .convert-mt3.json); never anything else")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or summary, errors only")
    parser.add_argument("--golden", metavar="DIR", help="folder of outputs of the original MT3 (case folders with frames.npy, encoder_out.npy, logits.npy, tokens.json): measure parity, put it in the model card, and write nothing if it misses the parity tests' tolerances (encoder 1e-4, logits 2.5e-4, greedy tokens identical)")
    hub = parser.add_argument_group("Hugging Face Hub")
    hub.add_argument("--push-to-hub", metavar="REPO_ID", help="after verification, upload OUT_DIR to this model repo (token: HF_TOKEN or cached login)")
    hub.add_argument("--private", action="store_true", help="create the repo as private (an existing public repo is refused)")
    hub.add_argument("--revision", metavar="BRANCH", help="branch to push to (created if missing)")
    hub.add_argument("--commit-message", help="commit message of the upload (default: 'Upload MT3 converted with convert-mt3')")
    config = parser.add_argument_group("config overrides", "values normally derived from the checkpoint's shapes and config.gin")
    for field, (kind, text) in OVERRIDES.items():
        config.add_argument("--" + field.replace("_", "-"), dest=field, type=kind, metavar="N" if kind in (SIZE, POSITIONS) else "X", help=text)
    variant = parser.add_argument_group(
        "variant", "tokenizer / feature extractor layout, normally from config.gin or the vocabulary size (mt3: 1536, ismir2021: 1664)"
    )
    for field, (kind, text) in VARIANT_FLAGS.items():
        variant.add_argument("--" + field.replace("_", "-"), dest=field, type=kind, metavar="N" if kind is int else "X", help=text)
    variant.add_argument("--use-ties", action=argparse.BooleanOptionalAction, default=None, help="segments start with a tie section (mt3 yes, ismir2021 no)")
    parser.add_argument("--version", action="version", version=f"convert-mt3 {__version__}")
    args = parser.parse_args(argv)
    if (args.private or args.revision or args.commit_message is not None) and not args.push_to_hub:
        parser.error("--private, --revision and --commit-message need --push-to-hub")
    if args.push_to_hub:  # before the conversion, not after it
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(args.push_to_hub)
        except ValueError as err:
            parser.error(f"argument --push-to-hub: {first_line(err)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .output import check_out_dir, out_dir_lock  # standard library only

    out_dir = Path(args.out_dir).absolute()
    pool = ThreadPoolExecutor(1)
    interrupts = Interrupts()
    try:
        with interrupts.installed():
            # Refuse a bad or busy OUT_DIR before any work; the lock is held until the folder is in place.
            check_out_dir(out_dir, Path(args.checkpoint_dir), args.overwrite)
            with out_dir_lock(out_dir):
                return _convert(args, out_dir, pool, interrupts)
    except (ValueError, OSError, RuntimeError, MemoryError) as err:
        # User-facing failures are one line, no traceback (the error classes name file/array).
        message = "out of memory" if isinstance(err, MemoryError) else str(err)
        print("error: " + printable(message), file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:
        # Staging folder and lock are already gone (finally clauses); a reading thread may still run.
        word, status = interrupts.report(interrupt)
        print(f"{word}; " + (f"{out_dir} is written (complete)" if interrupts.written else "nothing written"),
              file=sys.stderr)
        return status
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _convert(args: argparse.Namespace, out_dir: Path, pool: ThreadPoolExecutor, interrupts: Interrupts) -> int:
    """Read, convert, report and push; called with OUT_DIR checked and locked."""
    from .checkpoint import read_checkpoint  # light: numpy, msgpack, zlib

    with interrupts.hold():
        # gunzip releases the GIL: read the checkpoint while torch and transformers import.
        reading = pool.submit(read_checkpoint, args.checkpoint_dir, quiet=args.quiet)
        import torch  # noqa: F401  (a third of the imports below; most bad checkpoints are refused by the time it is in)

        if reading.done():
            reading.result()  # report a bad checkpoint now, not after transformers' imports
        from transformers.utils import logging as transformers_logging

        from .export import convert
        from .hub import HubError, push_folder

    if args.quiet:
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    checkpoint = reading.result()
    result = convert(
        checkpoint,
        out_dir,
        dtype=args.dtype,
        overwrite=args.overwrite,
        quiet=args.quiet,
        golden_dir=args.golden,
        overrides={field: getattr(args, field) for field in OVERRIDES},
        variant_overrides={field: getattr(args, field) for field in [*VARIANT_FLAGS, "use_ties"]},
        repo_id=args.push_to_hub,
        commit=interrupts.commit,
    )
    if not args.quiet:
        print(
            f"wrote {result.out_dir}: {result.num_arrays} arrays ({result.num_zarr} zarr + {result.num_inline} inline), "
            f"{result.num_parameters:,} parameters, {result.dtype}, step {result.step}, variant {result.variant.name}; "
            f"reload check max abs error {result.reload_max_abs_error:.1e}"
        )
        print(f"head layout and variant macros from {result.gin}" if result.gin else
              "no config.gin in the checkpoint folder or its parent: head layout from the flags, else MT3's 6 x 64")
        if result.parity:
            p = result.parity
            print(
                f"golden parity: encoder {p['encoder_max_abs_error']:.2e}, logits {p['logits_max_abs_error']:.2e}, "
                f"greedy segments identical {p['greedy_segments_identical']}/{p['greedy_segments']} (every segment of "
                f"{len(p['cases'])} cases)"
            )
    if args.push_to_hub:
        try:
            message = {"commit_message": args.commit_message} if args.commit_message is not None else {}  # else push_folder's
            url = push_folder(result.out_dir, args.push_to_hub, private=args.private, revision=args.revision, **message)
        except KeyboardInterrupt:
            print(f"interrupted during the push to {args.push_to_hub}; {result.out_dir} is complete, the repo may not have it", file=sys.stderr)
            return 130
        except HubError as err:
            raise HubError(f"{err}; {result.out_dir} is complete") from None
        print(url)
    return 0


if __name__ == "__main__":
    status = main()
    # Everything is written, closed and (with --push-to-hub) uploaded: skip the interpreter's teardown of the
    # ~3000 modules torch and transformers loaded, ~0.9 s of a ~5.5 s conversion on 2 cores.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
