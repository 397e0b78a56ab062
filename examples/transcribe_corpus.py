"""Transcribe a corpus: a `datasets` audio column through the MT3 pipeline, split across processes with accelerate.

    accelerate launch --num_processes N examples/transcribe_corpus.py MODEL AUDIO_DIR OUT.jsonl   # N GPUs
    torchrun --standalone --nproc_per_node N examples/transcribe_corpus.py MODEL AUDIO_DIR OUT.jsonl    # N CPU processes
    python examples/transcribe_corpus.py MODEL AUDIO_DIR OUT.jsonl                               # one process

Each process takes its contiguous share of the dataset (`PartialState().split_between_processes`), iterates over
it in batches of files through the folder's own pipeline on its device (one GPU per process under accelerate; CPU
processes talk over gloo, by themselves where CUDA is absent, else with --cpu), and appends each file's line to its
share's file `.OUT.partN` as it is done; the main process then joins the shares in dataset order into OUT.jsonl: one
line per file, `{"path": ..., "notes": [...], "error": null}`, the same as one process writes (an existing OUT.jsonl
is replaced only with --overwrite). A file that cannot be
read gets `"notes": null` and the reason in `error`, the others go on, and the exit status is 1 (the main process's,
counting every process's files; the others exit 0). A run that is interrupted leaves its `.OUT.partN` files: the
same command again keeps the files they hold and transcribes the others (and those that failed) only. AUDIO_DIR's files with a suffix of a format libsndfile reads are
transcribed (`AUDIO_SUFFIXES`, as mt3-transcribe takes them: the pipeline reads them with soundfile; convert other
files first). Needs: transformers, torch, datasets, accelerate, soundfile, soxr. No import of convert_mt3: what a
Hub user runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from datasets import Audio, Dataset
from tqdm.auto import tqdm
from transformers import pipeline

sys.path.insert(0, str(Path(__file__).parent))
from transcribe import check_model, check_output_file, loading  # noqa: E402  (the sibling example's checks)

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".caf", ".w64"}


def find_files(args: argparse.Namespace) -> list[str]:
    """The corpus's audio files, after refusing what would fail only at the end (OUT) or give nothing."""
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    if args.files_per_map_batch < 1:  # datasets reads 0 or less as the whole dataset at once
        raise ValueError("--files-per-map-batch must be at least 1")
    check_output_file("OUT", args.out, args.overwrite)  # also tries a file in its folder
    if not Path(args.audio_dir).is_dir():
        raise ValueError(f"AUDIO_DIR {args.audio_dir}: no such folder")
    files = sorted(str(p) for p in Path(args.audio_dir).rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise ValueError(f"AUDIO_DIR {args.audio_dir}: no {', '.join(sorted(AUDIO_SUFFIXES))} files")
    if Path(args.out).resolve() in {Path(file).resolve() for file in files}:
        raise ValueError(f"OUT {args.out}: is one of AUDIO_DIR's audio files, which it would replace; choose another name")
    check_model(args.model)
    return files


def part_files(out: Path) -> list[Path]:
    """The shares' files `.OUT.partN` beside OUT, of this run and of interrupted ones (any process count)."""
    prefix = f".{out.name}.part"
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(prefix) and p.name[len(prefix):].isdigit())


def ends_inside_a_line(part: Path) -> bool:
    """Whether a share's file ends without its last line's newline: its last byte only (it may hold hours of notes)."""
    if not part.exists() or part.stat().st_size == 0:
        return False
    with open(part, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def read_parts(out: Path) -> dict[str, dict]:
    """The rows in the shares' files, by path: a transcribed row wins over a failed one of the same file (a rerun
    tries failed files again); a line that an interruption cut short is no row."""
    rows: dict[str, dict] = {}
    for part in part_files(out):
        for line in part.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not (isinstance(row, dict) and isinstance(row.get("path"), str) and "error" in row):
                continue
            kept = rows.get(row["path"])
            if kept is None or kept["error"] is not None:
                rows[row["path"]] = row
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="converted MT3 folder or Hub repo id")
    parser.add_argument("audio_dir", help="folder of audio files (searched recursively)")
    parser.add_argument("out", help="JSON lines file to write")
    parser.add_argument("--batch-size", type=int, help="segments per generate call (default: the model's "
                        "segment_batch_size for the device, generation_config.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--files-per-map-batch", type=int, default=8, help="files handed to the pipeline at once (default 8)")
    parser.add_argument("--cpu", action="store_true", help="CPU processes (gloo) on a machine with CUDA (without it, "
                        "several processes are CPU ones anyway)")
    args = parser.parse_args()
    try:
        files = find_files(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    launched = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's and accelerate launch's process count
    # accelerate sets up several processes only on GPUs unless told CPU: else each would do the whole corpus
    state = PartialState(cpu=args.cpu or (launched > 1 and not torch.cuda.is_available()))
    if state.num_processes != launched:
        print(f"error: {launched} processes were launched, accelerate set up {state.num_processes}", file=sys.stderr)
        return 1
    out = Path(args.out)
    done = {path for path, row in read_parts(out).items() if row["error"] is None}  # by an interrupted run
    state.wait_for_everyone()  # every process has read the shares' files before any process appends to them
    # decode=False: the column holds {"path", "bytes"} and the pipeline reads the files itself (soundfile + soxr),
    # so no datasets audio backend is needed and each process decodes only its own share.
    todo = [file for file in files if file not in done]
    dataset = Dataset.from_dict({"audio": todo}).cast_column("audio", Audio(decode=False))
    try:
        with loading(args.model):
            pipe = pipeline("music-transcription", model=args.model, trust_remote_code=True, device=state.device)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    def transcribe(batch: dict) -> dict:
        try:
            results = pipe(batch["audio"], batch_size=args.batch_size, return_midi=False)
            rows = [(result["notes"], None) for result in results]
        except ValueError:  # a file that cannot be read: then one file at a time, so that only it is left out
            rows = []
            for audio in batch["audio"]:
                try:
                    samples = pipe.load_audio(audio)  # only a read error is the file's; others still stop the run
                except ValueError as err:
                    rows.append((None, str(err)))
                    continue
                result = pipe(samples, sampling_rate=pipe.feature_extractor.sampling_rate, batch_size=args.batch_size,
                              return_midi=False)
                rows.append((result["notes"], None))
        return [{"path": audio["path"], "notes": notes, "error": error} for audio, (notes, error) in zip(batch["audio"], rows)]

    part = out.with_name(f".{out.name}.part{state.process_index}")
    cut = ends_inside_a_line(part)  # by an interruption
    with state.split_between_processes(list(range(len(dataset)))) as indices:
        share, failed = dataset.select(indices), 0
        with open(part, "a") as f, tqdm(total=len(share), unit="file", desc=f"process {state.process_index}") as bar:
            f.write("\n" if cut else "")
            for batch in share.iter(batch_size=args.files_per_map_batch):
                for row in transcribe(batch):
                    f.write(json.dumps(row) + "\n")
                    failed += row["error"] is not None
                f.flush()  # what an interruption leaves is kept by the next run
                bar.update(len(batch["audio"]))
        print(f"process {state.process_index}/{state.num_processes}: {len(share)} files"
              + (f" ({len(done)} kept from an interrupted run)" if done and state.is_main_process else "")
              + (f", {failed} not read (see their error in {args.out})" if failed else ""))
    state.wait_for_everyone()
    if not state.is_main_process:
        return 0  # the main process reports the whole corpus
    rows = read_parts(out)
    joined = out.with_name(f".{out.name}.tmp")
    with open(joined, "w") as f:
        for file in files:  # dataset order; every file has its row, kept or new
            f.write(json.dumps(rows[file]) + "\n")
    os.replace(joined, out)  # complete or absent: never half-written
    for path in part_files(out):
        path.unlink()
    failed = sum(rows[file]["error"] is not None for file in files)
    if state.num_processes > 1:
        print(f"all {state.num_processes} processes: {len(files)} files"
              + (f", {failed} not read (see their error in {args.out})" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
