"""Transcribe an audio file to MIDI with a converted MT3 model, through transformers' pipeline only.

    python examples/transcribe.py MODEL AUDIO OUT.mid [--batch-size N] [--device cpu|cuda]
        [--dtype float32|bfloat16] [--plot ROLL.png] [--programs 0-7,32] [--overwrite] [--quiet]

MODEL is a converted folder or a Hub id; its own pipeline (pipeline_mt3.py, remote code) reads AUDIO (any format
libsndfile reads: wav, flac, ogg, mp3; stereo mixed to mono, resampled with soxr), cuts it into segments (2.048 s for mt3) and
decodes `--batch-size` of them per generate call, so memory stays bounded however long the file is. An existing
OUT.mid or ROLL.png is replaced only with `--overwrite`.
Needs: transformers, torch, soundfile, soxr, pretty_midi (and matplotlib for --plot).
For many files, JSON/CSV notes and resuming, use `mt3-transcribe` (installed with convert-mt3, from its repository).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import pipeline
from transformers.utils import logging as transformers_logging


def check_output_file(option: str, target: str, overwrite: bool) -> None:
    """A file to be written: not a folder, not a file already there unless `overwrite` (it may be the user's own),
    in a folder that exists and takes new files (tried: a file is made there and removed, as `write_beside` will
    make one)."""
    path = Path(target)
    if path.is_dir():
        raise ValueError(f"{option} {target}: is a directory, expected a file to write")
    if path.exists() and not overwrite:
        raise ValueError(f"{option} {target}: exists; --overwrite replaces it")
    if not path.absolute().parent.is_dir():
        raise ValueError(f"{option} {target}: folder {path.absolute().parent} does not exist")
    probe = path.absolute().parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        open(probe, "xb").close()
    except OSError as err:
        raise ValueError(f"{option} {target}: cannot be written ({err.strerror or err})") from None
    probe.unlink()


def check_model(model: str) -> None:
    """A MODEL that cannot be a Hub repo id (absolute, starting with . or ~, more than one /, a backslash) must be
    a folder (transformers does not expand ~); anything else may be a repo id, left to transformers."""
    path = Path(model)
    if path.is_dir() or not (path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1 or "\\" in model):
        return
    raise ValueError(f"MODEL {model}: " + ("is not a folder" if path.exists() else "no such folder"))


def first_line(err: BaseException) -> str:
    """An error's message cut to its first line (transformers' and torch's span several), or its class name."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


@contextlib.contextmanager
def loading(model: str):
    """Around loading MODEL: a name that is no folder here was tried as a Hub repo id, and transformers' OSError
    then speaks of the Hub only (often "couldn't connect"): the error says both. A model of another kind has no
    music-transcription pipeline (transformers' KeyError "Unknown task"): said in one line."""
    try:
        yield
    except KeyError:
        raise ValueError(f"MODEL {model}: not an MT3 model (it defines no music-transcription pipeline)") from None
    except OSError as err:
        if Path(model).exists():
            raise
        raise OSError(f"MODEL {model}: no such folder, nor a loadable Hub repo id ({first_line(err)})") from None


def write_beside(path: Path, write: Callable) -> None:
    """`write(file)` into a new file beside `path`, then renamed onto it: never half-written. Created with the
    umask's permissions (as `open` does; tempfile's files are private)."""
    temporary = path.absolute().parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    file = open(temporary, "xb")  # before the try: only a file made here is removed
    try:
        with file:
            write(file)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def plot_format(path: str) -> str:
    """The image format `path`'s suffix names, if matplotlib writes it."""
    from matplotlib.figure import Figure

    supported = Figure().canvas.get_supported_filetypes()
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in supported:
        raise ValueError(f"--plot {path}: matplotlib writes {', '.join(sorted(supported))}; found {suffix or 'no suffix'!r}")
    return suffix


def plot_piano_roll(notes: list[dict], path: Path) -> None:
    """One bar per note, coloured by program; drums as black ticks; written beside `path`, then renamed onto it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(14, 6))
    colours = plt.get_cmap("tab20")
    programs = sorted({n["program"] for n in notes if not n["is_drum"]})
    for note in notes:
        if note["is_drum"]:
            ax.plot([note["start"]], [note["pitch"]], marker="|", color="black", markersize=6)
        else:
            colour = colours(programs.index(note["program"]) % 20)
            ax.broken_barh([(note["start"], max(note["end"] - note["start"], 0.01))], (note["pitch"] - 0.4, 0.8), color=colour)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours(i % 20)) for i in range(len(programs))]
    ax.legend(handles, [f"program {p}" for p in programs], loc="upper right", fontsize="small", ncol=2)
    ax.set(xlabel="time (s)", ylabel="MIDI pitch", title=f"{len(notes)} notes")
    fig.tight_layout()
    write_beside(path, lambda file: fig.savefig(file, dpi=100, format=plot_format(str(path))))
    plt.close(fig)


def check_arguments(args: argparse.Namespace) -> None:
    """Everything that can be refused is refused before the model or the audio is read (`--programs`: by the
    folder's pipeline as it is built, before the audio is read)."""
    for option, target in [("OUT.mid", args.out), ("--plot", args.plot)]:
        if target is not None:
            check_output_file(option, target, args.overwrite)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib: pip install matplotlib")
    if args.plot:
        plot_format(args.plot)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda: CUDA is not available (torch {torch.__version__}); use --device cpu")
    if not Path(args.audio).exists():
        raise ValueError(f"{args.audio}: no such file")
    if Path(args.out).resolve() == Path(args.audio).resolve():  # (--plot takes image suffixes only)
        raise ValueError(f"OUT.mid {args.out}: is the AUDIO file, which it would replace; choose another name")
    check_model(args.model)


def transcribe(args: argparse.Namespace) -> int:
    check_arguments(args)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    try:
        with loading(args.model):
            pipe = pipeline("music-transcription", model=args.model, trust_remote_code=True, device=args.device,
                            dtype=dtype, programs=args.programs)
    except ValueError as err:
        if args.programs is not None and str(err).startswith("programs"):  # the folder's own parser refused it
            raise ValueError(f"--{err}") from None
        raise
    result = pipe(args.audio, batch_size=args.batch_size, return_midi=True)
    write_beside(Path(args.out), result["midi"].write)
    if args.plot:
        plot_piano_roll(result["notes"], Path(args.plot))
    if not args.quiet:
        notes = result["notes"]
        programs = sorted({n["program"] for n in notes if not n["is_drum"]}) + ["drums"] * any(n["is_drum"] for n in notes)
        print(f"{args.out}: {len(notes)} notes; programs {programs}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Audio file -> MIDI with a converted MT3 model (transformers pipeline only).")
    parser.add_argument("model", metavar="MODEL", help="converted MT3 folder or Hub repo id")
    parser.add_argument("audio", metavar="AUDIO", help="audio file (wav, flac, ogg, mp3, ...)")
    parser.add_argument("out", metavar="OUT.mid", help="MIDI file to write")
    parser.add_argument("--batch-size", type=int, help="segments (2.048 s each for mt3, 4.096 s for ismir2021) generated per batch (default: the model's "
                        "segment_batch_size for the device, generation_config.json)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device to run on (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype (default float32, exact)")
    parser.add_argument("--plot", metavar="ROLL.png", help="also draw a piano roll coloured by instrument")
    parser.add_argument("--programs", metavar="LIST", help="keep only the notes of these GM programs, e.g. 0-7,32 (and the drums)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT.mid and ROLL.png if they exist")
    parser.add_argument("--quiet", action="store_true", help="no summary line")
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.quiet:
        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
        logging.getLogger("transformers_modules").setLevel(logging.ERROR)  # the folder's own code logs there
    try:
        return transcribe(args)
    except (ValueError, ImportError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:  # the model's, as CUDA out of memory: its first line
        print(f"error: {first_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # OUT.mid is written whole or not at all
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
