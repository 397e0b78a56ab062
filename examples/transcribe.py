"""Transcribe an audio file to MIDI with a converted MT3 model, using transformers' Auto classes only.

    python examples/transcribe.py MODEL AUDIO OUT.mid [--batch-size N] [--device cpu|cuda]
        [--dtype float32|bfloat16] [--plot ROLL.png] [--programs 0-7,32] [--quiet]

MODEL is a converted folder or a Hub id. AUDIO is any format libsndfile reads (wav, flac, ogg,
mp3); stereo is mixed to mono and resampled to the model's rate with soxr. Audio is processed
in chunks of `--batch-size` segments, so memory stays bounded however long the file is.
Needs: transformers, torch, soundfile, soxr, pretty_midi (and matplotlib for --plot).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModel, AutoProcessor, LogitsProcessor, LogitsProcessorList
from transformers.utils import logging as transformers_logging


class AllowedProgramsLogitsProcessor(LogitsProcessor):
    """Only let notes start on allowed instrument programs.

    MT3 writes a program event before the notes of an instrument and repeats it only when the
    program changes; notes before any program event belong to program 0. So: forbid the other
    program events, and while a row has not chosen a program (and 0 is not allowed), forbid
    note-on velocity events until it does. Note-offs, ties and drums are left alone.
    """

    def __init__(self, program_ids: list[int], allowed_ids: list[int], note_on_ids: list[int], zero_allowed: bool):
        self.forbidden = torch.tensor(sorted(set(program_ids) - set(allowed_ids)), dtype=torch.long)
        self.allowed = torch.tensor(allowed_ids, dtype=torch.long)
        self.note_on = torch.tensor(note_on_ids, dtype=torch.long)
        self.zero_allowed = zero_allowed

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores[:, self.forbidden.to(scores.device)] = -float("inf")
        if not self.zero_allowed:
            has_program = torch.isin(input_ids, self.allowed.to(input_ids.device)).any(dim=1)  # (rows,)
            rows = (~has_program).nonzero().squeeze(1)
            scores[rows.unsqueeze(1), self.note_on.to(scores.device)] = -float("inf")
        return scores


def parse_programs(text: str) -> set[int]:
    """'0-7,32' -> {0, ..., 7, 32} (General MIDI programs, 0-based)."""
    programs: set[int] = set()
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            low, _, high = part.partition("-")
            programs.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise ValueError(f"--programs {text!r}: expected numbers and ranges such as 0-7,32") from None
    if not programs or min(programs) < 0 or max(programs) > 127:
        raise ValueError(f"--programs {text!r}: expected programs between 0 and 127")
    return programs


def load_audio(path: Path, sampling_rate: int) -> np.ndarray:
    """Any libsndfile format -> mono float32 at `sampling_rate`."""
    import soundfile
    import soxr

    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)  # (n, channels)
    except (RuntimeError, OSError) as err:  # soundfile.LibsndfileError is a RuntimeError
        raise ValueError(f"{path}: cannot read audio ({str(err).strip().splitlines()[-1]})") from None
    mono = samples.mean(axis=1)
    if rate != sampling_rate and mono.size:
        mono = soxr.resample(mono, rate, sampling_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def plot_piano_roll(notes, path: Path) -> None:
    """One bar per note, coloured by program; drums as black ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(14, 6))
    colours = plt.get_cmap("tab20")
    programs = sorted({n.program for n in notes if not n.is_drum})
    for note in notes:
        if note.is_drum:
            ax.plot([note.start], [note.pitch], marker="|", color="black", markersize=6)
        else:
            colour = colours(programs.index(note.program) % 20)
            ax.broken_barh([(note.start, max(note.end - note.start, 0.01))], (note.pitch - 0.4, 0.8), color=colour)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours(i % 20)) for i in range(len(programs))]
    ax.legend(handles, [f"program {p}" for p in programs], loc="upper right", fontsize="small", ncol=2)
    ax.set(xlabel="time (s)", ylabel="MIDI pitch", title=f"{len(notes)} notes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def transcribe(args: argparse.Namespace) -> int:
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True, dtype=dtype).to(args.device).eval()
    extractor, tokenizer = processor.feature_extractor, processor.tokenizer

    logits_processor = LogitsProcessorList()
    if args.programs is not None:
        allowed = parse_programs(args.programs)
        logits_processor.append(
            AllowedProgramsLogitsProcessor(
                program_ids=tokenizer.convert_tokens_to_ids([f"<program_{p}>" for p in range(128)]),
                allowed_ids=tokenizer.convert_tokens_to_ids([f"<program_{p}>" for p in sorted(allowed)]),
                note_on_ids=tokenizer.convert_tokens_to_ids([f"<velocity_{v}>" for v in range(1, tokenizer.num_velocity_bins + 1)]),
                zero_allowed=0 in allowed,
            )
        )

    audio = load_audio(Path(args.audio), extractor.sampling_rate)
    segment_samples = extractor.frames_per_segment * extractor.hop_length
    chunk = args.batch_size * segment_samples
    rows: list[list[int]] = []
    start_times: list[float] = []
    with tqdm(total=len(audio) // segment_samples + 1, unit="segment", disable=args.quiet) as bar:
        for offset in range(0, len(audio), chunk):
            piece = audio[offset : offset + chunk]
            inputs = processor(audio=piece, sampling_rate=extractor.sampling_rate, return_tensors="pt")
            keep = len(inputs["input_features"])
            if offset + chunk < len(audio):
                # A chunk that is not the last is a whole number of segments; the extractor's end
                # padding would add one short segment that belongs to the next chunk.
                keep = chunk // segment_samples
            features = inputs["input_features"][:keep].to(args.device, dtype)
            with torch.inference_mode():
                tokens = model.generate(input_features=features, logits_processor=logits_processor)
            rows += tokens.cpu().tolist()
            start_times += (inputs["segment_start_times"][:keep] + offset / extractor.sampling_rate).tolist()
            bar.update(keep)

    result = processor.batch_decode(rows, segment_start_times=start_times, return_midi=True)
    result["pretty_midi"].write(str(args.out))
    if args.plot:
        plot_piano_roll(result["notes"], Path(args.plot))
    if not args.quiet:
        programs = sorted({("drums" if n.is_drum else n.program) for n in result["notes"]}, key=str)
        print(f"{args.out}: {len(result['notes'])} notes from {len(audio) / extractor.sampling_rate:.1f} s of audio; programs {programs}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Audio file -> MIDI with a converted MT3 model (Auto classes only).")
    parser.add_argument("model", metavar="MODEL", help="converted MT3 folder or Hub repo id")
    parser.add_argument("audio", metavar="AUDIO", help="audio file (wav, flac, ogg, mp3, ...)")
    parser.add_argument("out", metavar="OUT.mid", help="MIDI file to write")
    parser.add_argument("--batch-size", type=int, default=32, help="segments (2.048 s each) generated per batch (default 32)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device to run on (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype (default float32, exact)")
    parser.add_argument("--plot", metavar="ROLL.png", help="also draw a piano roll coloured by instrument")
    parser.add_argument("--programs", metavar="LIST", help="only allow these GM programs, e.g. 0-7,32 (drums stay allowed)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.quiet:
        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
    try:
        return transcribe(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
