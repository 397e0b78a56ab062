"""Transcribe a corpus: a `datasets` audio column through the MT3 pipeline, split across processes with accelerate.

    accelerate launch --num_processes N examples/transcribe_corpus.py MODEL AUDIO_DIR OUT.jsonl   # N GPUs
    torchrun --standalone --nproc_per_node N examples/transcribe_corpus.py MODEL AUDIO_DIR OUT.jsonl --cpu
    python examples/transcribe_corpus.py MODEL AUDIO_DIR OUT.jsonl                               # one process

Each process takes its contiguous share of the dataset (`PartialState().split_between_processes`), runs
`Dataset.map(batched=True)` with the folder's own pipeline on its device (one GPU per process under accelerate),
and writes its rows; the main process then joins the shares in dataset order into OUT.jsonl: one line per file,
`{"path": ..., "notes": [...]}`, the same as one process writes. Needs: transformers, torch, datasets, accelerate,
soundfile, soxr. No import of convert_mt3: what a Hub user runs.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from accelerate import PartialState
from datasets import Audio, Dataset
from transformers import pipeline

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="converted MT3 folder or Hub repo id")
    parser.add_argument("audio_dir", help="folder of audio files (searched recursively)")
    parser.add_argument("out", help="JSON lines file to write")
    parser.add_argument("--batch-size", type=int, default=32, help="segments per generate call (default 32)")
    parser.add_argument("--files-per-map-batch", type=int, default=8, help="files handed to the pipeline at once")
    parser.add_argument("--cpu", action="store_true", help="CPU processes (gloo); needed for several CPU processes")
    args = parser.parse_args()

    state = PartialState(cpu=args.cpu)
    files = sorted(str(p) for p in Path(args.audio_dir).rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    # decode=False: the column holds {"path", "bytes"} and the pipeline reads the files itself (soundfile + soxr),
    # so no datasets audio backend is needed and each process decodes only its own share.
    dataset = Dataset.from_dict({"audio": files}).cast_column("audio", Audio(decode=False))
    pipe = pipeline("music-transcription", model=args.model, trust_remote_code=True, device=state.device)

    def transcribe(batch: dict) -> dict:
        results = pipe(batch["audio"], batch_size=args.batch_size, return_midi=False)
        return {"path": [a["path"] for a in batch["audio"]], "notes": [r["notes"] for r in results]}

    out = Path(args.out)
    part = out.with_name(f".{out.name}.part{state.process_index}")
    with state.split_between_processes(list(range(len(dataset)))) as indices:
        share = dataset.select(indices).map(
            transcribe, batched=True, batch_size=args.files_per_map_batch, remove_columns=["audio"]
        )
        with open(part, "w") as f:
            for row in share:
                f.write(json.dumps(row) + "\n")
        print(f"process {state.process_index}/{state.num_processes}: {len(share)} files")
    state.wait_for_everyone()
    if state.is_main_process:
        parts = [out.with_name(f".{out.name}.part{rank}") for rank in range(state.num_processes)]
        joined = out.with_name(f".{out.name}.tmp")
        with open(joined, "w") as f:
            for path in parts:
                f.write(path.read_text())
        os.replace(joined, out)  # complete or absent: never half-written
        for path in parts:
            path.unlink()


if __name__ == "__main__":
    main()
