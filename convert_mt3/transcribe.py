"""mt3-transcribe MODEL INPUT... -o OUT_DIR: many audio files -> MIDI / JSON / CSV notes with a converted MT3.

Runs the model the way a Hub user does: `transformers.pipeline(model=MODEL, trust_remote_code=True)` (the folder's
own pipeline_mt3.py). Folders (recursively) and globs are expanded to their files with an audio suffix
(AUDIO_SUFFIXES); a file named as such is read whatever its suffix. Outputs are OUT_DIR/NAME.mid|.json|.csv (a
folder's sub-folders kept, a glob's matches by file name). Files whose outputs all exist are skipped, so an
interrupted run resumes (without --overwrite only the missing outputs are written: a file already there is never
replaced; with it, every output is written again); an unreadable file or folder, or an output that cannot be
written, gets one error line and the others carry on. Every output is written to a temporary file beside it and
renamed into place. Exit status: 0 all done, 1 a file or the model failed, 2 a bad option, 130/143 interrupted.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from .cli import DTYPES, Interrupts, OneLineParser, first_line, printable
from .mt3.notes_mt3 import GM_FAMILIES, notes_to_csv, notes_to_json, parse_programs
from .output import some_names

FORMATS = {"midi": ".mid", "json": ".json", "csv": ".csv"}
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".caf", ".w64"}


class UsageError(ValueError):
    """A bad argument, found before any audio is read: an option (exit status 2, as argparse's own errors)."""

    status = 2


class ModelError(UsageError):
    """A MODEL that is no converted MT3 folder or repo (exit status 1, as a file that fails)."""

    status = 1


@dataclass
class Job:
    source: Path
    outputs: dict[str, Path]  # format -> file


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="mt3-transcribe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL", help="converted MT3 folder or Hub repo id")
    parser.add_argument("inputs", metavar="INPUT", nargs="+", help="audio files, folders (searched recursively) or globs")
    parser.add_argument("-o", "--out-dir", required=True, metavar="OUT_DIR", help="folder for the outputs (created if its parent exists)")
    parser.add_argument("--format", default="midi", help="comma-separated output formats: midi, json, csv (default midi)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--programs", metavar="LIST", help="keep only the notes of these GM programs, e.g. 0-7,32 (and the drums)")
    which.add_argument("--instruments", metavar="NAMES", help=f"keep only the notes of these GM families (and the drums): {', '.join(GM_FAMILIES)}")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, else mps, else cpu")
    parser.add_argument("--batch-size", type=int, help="segments (2.048 s each for mt3, 4.096 s for ismir2021) per generate call, across files (default: the model's "
                        "segment_batch_size for the device, generation_config.json: 32 on CPU, 256 on CUDA)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="model dtype (default float32, as trained)")
    parser.add_argument("--overwrite", action="store_true", help="transcribe again even where all outputs exist")
    parser.add_argument("--quiet", action="store_true", help="no progress bar; error lines only, and the summary if a file failed")
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    return args


def resolve_device(name: str) -> str:
    """'auto' -> the best available device; an unavailable explicit one is a UsageError."""
    import torch

    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        return next((device for device, ok in available.items() if ok), "cpu")
    if name != "cpu" and not available[name]:
        raise UsageError(f"--device {name}: not available on this machine (torch {torch.__version__}); use --device cpu")
    return name


def parse_formats(text: str) -> list[str]:
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise UsageError(f"--format {text!r}: expected a comma-separated list of {', '.join(FORMATS)}")
    return list(dict.fromkeys(formats))


def check_model(model: str) -> None:
    """A MODEL that cannot be a Hub repo id (absolute, starting with . or ~, more than one /, a backslash) must be a
    folder: said here, before transformers answers with its repo-id rules. Anything else may be a repo id. A folder
    must hold a config.json (else a run whose outputs all exist would skip them all with a wrong MODEL)."""
    path = Path(model)
    if os.path.isdir(path):
        if not os.path.isfile(path / "config.json"):
            raise ModelError(f"MODEL {model}: no config.json in this folder, so no converted MT3 model")
        return
    if not (path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1 or "\\" in model):
        return
    raise ModelError(f"MODEL {model}: " + ("is not a folder" if os.path.exists(path) else "no such folder"))


def check_out_dir(out_dir: Path) -> None:
    """A folder that exists, or can be made in a folder that does, and takes new files: tried with a file made there
    and removed, so that a read-only -o fails now, not after the model loaded or for every output in turn."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"-o {out_dir}: exists and is not a directory")
    if not out_dir.exists() and not out_dir.parent.is_dir():
        raise UsageError(f"-o {out_dir}: parent folder {out_dir.parent} does not exist")
    probe = (out_dir if out_dir.is_dir() else out_dir.parent) / f".mt3-transcribe.{os.getpid()}.probe"
    try:
        open(probe, "xb").close()
    except OSError as err:
        raise UsageError(f"-o {out_dir}: cannot be written ({err.strerror or err})") from None
    probe.unlink()


def is_audio_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in AUDIO_SUFFIXES and os.path.isfile(path)


def audio_files_in(folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """The audio files under `folder` (sorted), and (folder, error) for each folder in it that cannot be read."""
    found, unreadable = [], []

    def refused(err: OSError) -> None:
        unreadable.append((err.filename, f"cannot be read ({err.strerror or err})"))

    for root, _, names in os.walk(folder, onerror=refused):
        found += [Path(root, name) for name in names if is_audio_file(os.path.join(root, name))]
    return sorted(found), unreadable


def expand_inputs(inputs: list[str]) -> tuple[list[tuple[Path, Path]], list[tuple[str, str]]]:
    """INPUT arguments -> (file, name of its outputs without suffix) pairs, and (input, error) for empty patterns
    and for paths that cannot be looked at (a folder we may not read, a name too long).

    A folder contributes its audio files (recursively, named by their path inside it); a glob its audio files;
    anything else is taken as a file (a missing one then fails on its own, with the others carrying on).
    """
    files, errors = [], []
    for text in inputs:
        path = Path(text)
        try:
            if path.is_dir():
                found, unreadable = audio_files_in(path)
                files += [(p, p.relative_to(path).with_suffix("")) for p in found]
                errors += unreadable
                if not found and not unreadable:
                    errors.append((text, f"no audio files ({', '.join(sorted(AUDIO_SUFFIXES))}) in this folder"))
            elif not path.exists() and glob.has_magic(text):
                matches = sorted(Path(p) for p in glob.glob(text, recursive=True) if is_audio_file(p))
                files += [(p, Path(p.stem)) for p in matches]
                if not matches:
                    errors.append((text, "no audio file matches this pattern"))
            else:
                files.append((path, Path(path.stem)))
        except OSError as err:  # stat() refused: a folder on the way we may not search, a name too long
            errors.append((text, err.strerror or str(err)))
    return files, errors


def plan_jobs(files: list[tuple[Path, Path]], out_dir: Path, formats: list[str]) -> tuple[list[Job], list[tuple[str, str]]]:
    """One job per distinct input file (the first of its names); an input whose outputs another input already claims
    is an (input, error)."""
    jobs, errors, claimed, refused = [], [], {}, set()
    planned: set[Path] = set()
    for source, name in files:
        key, resolved = name.as_posix(), source.resolve()
        if resolved in planned or resolved in refused:  # once, under its first name; one error per file
            continue
        if key in claimed:
            refused.add(resolved)
            errors.append((str(source), f"its outputs {out_dir / name}.* are already those of {claimed[key]}"))
            continue
        claimed[key] = resolved
        planned.add(resolved)
        jobs.append(Job(source, {f: out_dir / (key + FORMATS[f]) for f in formats}))
    return jobs, errors


def write_atomic(path: Path, write) -> None:
    """`write(temporary_path)`, then rename into `path`: never a half-written output. The temporary file is created
    by `write`, so it gets the usual permissions (the umask's), as a file written directly would."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".mt3-transcribe.{os.getpid()}.tmp")  # short: the output's own name may be near the limit
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def missing_outputs(job: Job) -> dict[str, Path]:
    """The outputs of `job` that are not there yet (a folder in an output's place counts as missing: writing fails)."""
    return {fmt: path for fmt, path in job.outputs.items() if not path.is_file()}


def write_outputs(outputs: dict[str, Path], result: dict) -> None:
    """Write `outputs` (format -> file); an OSError names the output that could not be written."""
    for fmt, path in outputs.items():
        try:
            if fmt == "midi":
                write_atomic(path, result["midi"].write)
            else:
                text = notes_to_json(result["notes"]) if fmt == "json" else notes_to_csv(result["notes"])
                write_atomic(path, lambda temporary, text=text: Path(temporary).write_text(text))
        except OSError as err:
            raise OSError(f"cannot write {path} ({err.strerror or err})") from None


def load_pipeline(args: argparse.Namespace, device: str, programs: set[int] | None):
    import torch
    from transformers import pipeline
    from transformers.utils import logging as transformers_logging

    if args.quiet:
        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
        # the folder's own code logs under transformers_modules.<hash>, outside transformers' logger
        logging.getLogger("transformers_modules").setLevel(logging.ERROR)
    try:
        return pipeline(
            "music-transcription",
            model=args.model,
            trust_remote_code=True,
            device=device,
            dtype=getattr(torch, args.dtype),
            batch_size=args.batch_size,
            programs=sorted(programs) if programs is not None else None,
        )
    except (OSError, ValueError, RuntimeError, KeyError) as err:  # KeyError: a folder of another model (no such task)
        reason = first_line(err)
        if isinstance(err, OSError) and not Path(args.model).exists():  # "a/b", no such folder: tried on the Hub
            raise ModelError(f"MODEL {args.model}: no such folder, nor a loadable Hub repo id ({reason})") from None
        raise ModelError(f"{args.model}: cannot load the MT3 pipeline ({reason})") from None


def run(args: argparse.Namespace, interrupts: Interrupts) -> int:
    # Every argument is checked before a model or any audio is read.
    check_model(args.model)
    formats = parse_formats(args.format)
    spec, option = (args.programs, "--programs") if args.programs is not None else (args.instruments, "--instruments")
    try:
        programs = parse_programs(spec) if spec is not None else None
    except ValueError as err:
        raise UsageError(f"{option} {str(err).removeprefix('programs ')}") from None  # "--programs '7-x': expected ..."
    out_dir = Path(args.out_dir)
    check_out_dir(out_dir)
    with interrupts.hold():  # torch's import: a signal waits for its end (raised inside, it can abort the process)
        device = resolve_device(args.device)
    files, errors = expand_inputs(args.inputs)
    jobs, duplicate_errors = plan_jobs(files, out_dir, formats)
    errors += duplicate_errors
    pending = [job for job in jobs if args.overwrite or missing_outputs(job)]
    skipped = len(jobs) - len(pending)
    # inputs that are no files fail here, before the model loads (nothing to do: no model, no OUT_DIR)
    is_file = [os.path.isfile(job.source) for job in pending]
    errors += [(str(job.source), "not a file" if os.path.exists(job.source) else "no such file")
               for job, ok in zip(pending, is_file) if not ok]
    pending = [job for job, ok in zip(pending, is_file) if ok]
    for source, error in errors:
        print(printable(f"error: {source}: {error}"), file=sys.stderr)
    failures = [source for source, _ in errors]
    done = 0

    from tqdm.auto import tqdm

    if pending:
        with interrupts.hold():  # transformers' imports, as torch's
            import transformers.pipelines  # noqa: F401  (what load_pipeline needs)
        pipe = load_pipeline(args, device, programs)
        try:
            out_dir.mkdir(exist_ok=True)  # once the model loaded: a run that cannot start leaves nothing
        except OSError as err:
            raise UsageError(f"-o {out_dir}: cannot be written ({err.strerror or err})") from None
        with tqdm(total=len(pending), unit="file", disable=args.quiet) as bar:
            queued: deque[Job] = deque()

            def audio_stream():
                """Read each file (the pipeline's own reader); a file that cannot be read is reported and skipped."""
                for job in pending:
                    try:
                        samples = pipe.load_audio(str(job.source))
                    except (ValueError, MemoryError) as err:
                        message = f"{job.source}: out of memory" if isinstance(err, MemoryError) else str(err)
                        bar.write(printable(f"error: {message}"), file=sys.stderr)
                        failures.append(str(job.source))
                        bar.update(1)
                        continue
                    queued.append(job)
                    yield {"array": samples, "sampling_rate": pipe.feature_extractor.sampling_rate}

            for result in pipe(audio_stream(), return_midi="midi" in formats):
                job = queued.popleft()
                try:
                    write_outputs(job.outputs if args.overwrite else missing_outputs(job), result)
                except OSError as err:
                    bar.write(printable(f"error: {job.source}: {err}"), file=sys.stderr)
                    failures.append(str(job.source))
                else:
                    done += 1
                bar.update(1)
    if not args.quiet or failures:
        failed = f"{len(failures)} failed" + (f" ({some_names(failures)})" if failures else "")
        where = f"; outputs in {out_dir}" if done or skipped else ""  # no folder named when nothing is in it
        print(printable(f"mt3-transcribe: {done} transcribed, {skipped} skipped (outputs exist), {failed}{where}"),
              file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Ctrl-C and SIGTERM alike: the output being written is removed, one line, status 130 / 143 (SIGTERM left a
    # temporary file)
    interrupts = Interrupts()
    try:
        with interrupts.installed():
            return run(args, interrupts)
    except UsageError as err:
        print(printable(f"error: {err}"), file=sys.stderr)
        return err.status
    except (ImportError, OSError) as err:
        print(printable(f"error: {err}"), file=sys.stderr)
        return 1
    except (RuntimeError, MemoryError) as err:  # the model's, as CUDA out of memory: the run cannot go on
        message = "out of memory" if isinstance(err, MemoryError) else first_line(err)
        hint = " (a smaller --batch-size needs less memory)" if "out of memory" in message else ""
        print(printable(f"error: {message}; the outputs written so far are complete, a rerun skips them{hint}"),
              file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:
        # every output is renamed into place whole: the files written so far are complete, a rerun skips them
        written = os.path.isdir(args.out_dir)
        word, status = interrupts.report(interrupt)
        print(printable(f"{word}; " + (f"the outputs written so far are complete, in {args.out_dir}" if written
                                       else "nothing written")), file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
