"""Fine-tune a converted MT3 model on a recording and its MIDI, using transformers' Auto classes only.

    python examples/finetune.py MODEL AUDIO MIDI OUT_DIR [--steps N] [--lr X] [--batch-size N]
        [--device cpu|cuda] [--seed N] [--freeze-encoder] [--eval [both|after]] [--quiet]

The audio is cut into the model's segments and the MIDI's notes become each segment's targets exactly as MT3
built its training targets (`processor(audio=..., midi=...)` -> `labels`). Training is a plain AdamW loop over
random batches of segments with MT3's loss (cross entropy + z-loss, `model(**batch).loss`); `--freeze-encoder`
trains the decoder only, on encoder outputs computed once (several times faster on a CPU). OUT_DIR gets the
fine-tuned weights with the processor files and remote code of MODEL, so it loads like any converted folder; it
is built beside OUT_DIR and moved in at the end. With `--eval`, the note F1 of the model before and after
(`--eval after`: after only, saving one transcription of the clip) against the MIDI as the targets express it
is printed (onsets within 50 ms, same pitch, drums apart from pitched notes, programs ignored); the "after"
figure comes from OUT_DIR reloaded with the Auto classes.
Needs: transformers, torch, soundfile, soxr, pretty_midi.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import shutil
import stat
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModel, AutoProcessor
from transformers.utils import logging as transformers_logging

sys.path.insert(0, str(Path(__file__).parent))
from transcribe import check_model, loading  # noqa: E402  (the sibling example's checks)

ONSET_TOLERANCE = 0.05  # seconds (mir_eval's default onset tolerance)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json")
# Not copied: the card (rewritten) and convert-mt3's manifest of the files it wrote, which would let a later
# `python -m convert_mt3 ... --overwrite` treat the fine-tuned folder as its own and replace it.
NOT_COPIED = ("README.md", ".convert-mt3.json")


def note_f1(estimated: list, reference: list) -> float:
    """Onset F1: a note matches an unused reference note of the same pitch and drum-ness within ONSET_TOLERANCE."""
    unused = list(reference)
    matched = 0
    for note in sorted(estimated, key=lambda n: n.start):
        for i, ref in enumerate(unused):
            if (ref.pitch, ref.is_drum) == (note.pitch, note.is_drum) and abs(ref.start - note.start) <= ONSET_TOLERANCE:
                matched += 1
                del unused[i]
                break
    if not estimated or not reference:
        return 0.0
    precision, recall = matched / len(estimated), matched / len(reference)
    return 0.0 if matched == 0 else 2 * precision * recall / (precision + recall)


@torch.no_grad()
def transcribe_notes(model, processor, features: torch.Tensor, start_times, device: str) -> list:
    """The notes `model` transcribes from `features` (generate() decodes a pool of segments at a time)."""
    model.eval()
    rows = model.generate(input_features=features.to(device)).cpu()
    return processor.batch_decode(rows, segment_start_times=start_times, return_midi=False)["notes"]


def source_files(model: str) -> Path:
    """The folder holding MODEL's processor files and remote code (the Hub snapshot for a repo id)."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, ignore_patterns=["*.safetensors", "*.bin"]))


def check_out_dir(out_dir: Path, probe: bool = False) -> None:
    """OUT_DIR must be new or an empty folder; with `probe`, the nearest existing folder on its path must take a new
    folder (one is made there and removed), so that an unwritable OUT_DIR is refused before training, not after."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"{out_dir}: exists and is not an empty folder")
    if not probe:
        return
    existing = next(folder for folder in out_dir.absolute().parents if folder.exists())
    if not existing.is_dir():
        raise ValueError(f"{out_dir}: {existing} is not a folder")
    trial = existing / f".{out_dir.name}.{secrets.token_hex(4)}.tmp"
    try:
        trial.mkdir()
    except OSError as err:
        raise ValueError(f"{out_dir}: cannot be written ({err.strerror or err})") from None
    trial.rmdir()


def save_folder(model, source: Path, out_dir: Path, note: str) -> None:
    """Fine-tuned weights + MODEL's other files (processor, code) into a folder beside OUT_DIR, then moved in."""
    out_dir = out_dir.absolute()
    check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # made with the umask's permissions, as OUT_DIR would be (tempfile's folders are private)
    staging = out_dir.parent / f".{out_dir.name}.{secrets.token_hex(4)}.tmp"
    staging.mkdir()
    try:
        for file in source.iterdir():
            if file.is_file() and file.name not in WEIGHT_FILES + NOT_COPIED:
                shutil.copyfile(file, staging / file.name)
        model.save_pretrained(staging, safe_serialization=True)
        (staging / "README.md").write_text(note)
        # safetensors writes its file private (0600): the weights get the umask's permissions, as the README did
        mode = stat.S_IMODE((staging / "README.md").stat().st_mode)
        for weights in staging.glob("*.safetensors"):
            weights.chmod(mode)
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def finetune(args: argparse.Namespace) -> int:
    check_out_dir(Path(args.out_dir), probe=True)  # before hours of training, not after
    for name, path in (("AUDIO", args.audio), ("MIDI", args.midi)):
        if not Path(path).is_file():
            raise ValueError(f"{name} {path}: no such file")
    check_model(args.model)
    torch.manual_seed(args.seed)
    with loading(args.model):
        processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
        model = AutoModel.from_pretrained(args.model, trust_remote_code=True, dtype=torch.float32).to(args.device)
    audio = model.transcription_pipeline(processor).load_audio(args.audio)  # read as transcription reads it
    if not len(audio):
        raise ValueError(f"AUDIO {args.audio}: no samples to train on")
    inputs = processor(audio=audio, sampling_rate=processor.feature_extractor.sampling_rate, midi=args.midi, return_tensors="pt")
    features, labels, start_times = inputs["input_features"], inputs["labels"], inputs["segment_start_times"]
    reference = processor.batch_decode(labels.tolist(), segment_start_times=start_times, has_decoder_start=False, return_midi=False)["notes"]
    log = (lambda text: None) if args.quiet else print
    log(f"{len(features)} segments, {int((labels != -100).sum())} target tokens, {len(reference)} reference notes")
    # Segments whose targets are longer than the model takes (the processor warned) are left out of training, as
    # MT3's own training skips them; the evaluation still covers every segment.
    ends = torch.where(labels != -100, torch.arange(1, labels.shape[1] + 1), 0).amax(1)  # (segments,) target length
    limit = processor.tokenizer.model_max_length
    kept = (ends <= limit).nonzero()[:, 0]
    if not len(kept):
        raise ValueError(f"MIDI {args.midi}: every segment's targets are longer than the model's {limit} ids")
    if len(kept) < len(features):
        log(f"{len(features) - len(kept)} of {len(features)} segments left out of training: targets over {limit} ids")
    train_features, train_labels = features[kept], labels[kept, : int(ends[kept].max())]

    if args.eval == "both":
        before = note_f1(transcribe_notes(model, processor, features, start_times, args.device), reference)
        log(f"note F1 before fine-tuning: {before:.3f}")

    encoded = None
    if args.freeze_encoder:
        model.get_encoder().requires_grad_(False)
        with torch.no_grad():  # (segments, frames, d_model), eval mode: no dropout in the frozen encoder
            encoded = model.eval().get_encoder()(train_features.to(args.device)).last_hidden_state
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    order: list[int] = []
    losses = []
    started = time.perf_counter()
    model.train()
    with tqdm(range(args.steps), unit="step", disable=args.quiet) as bar:
        for step in bar:
            if len(order) < args.batch_size:
                order += torch.randperm(len(train_features), generator=generator).tolist()
            picked, order = order[: args.batch_size], order[args.batch_size :]
            batch = processor.collate([{"input_features": train_features[i], "labels": train_labels[i]} for i in picked])
            batch = {k: v.to(args.device) for k, v in batch.items()}
            if encoded is not None:
                batch = {"encoder_outputs": (encoded[picked],), "labels": batch["labels"]}
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if not args.quiet and (step + 1) % max(1, args.steps // 10) == 0:
                tqdm.write(f"step {step + 1}: loss {np.mean(losses[-max(1, args.steps // 10):]):.4f}")
    seconds = time.perf_counter() - started
    window = max(1, min(10, len(losses) // 2))
    first, last = float(np.mean(losses[:window])), float(np.mean(losses[-window:]))
    log(f"{args.steps} steps in {seconds:.0f} s: mean loss of the first {window} steps {first:.4f}, last {window} {last:.4f}")

    note = (
        f"# MT3 fine-tuned with convert-mt3's examples/finetune.py\n\nFrom `{args.model}`, {args.steps} AdamW steps "
        f"(lr {args.lr}, batches of {args.batch_size} segments{', encoder frozen' if args.freeze_encoder else ''}) on `{Path(args.audio).name}` + `{Path(args.midi).name}`; "
        f"training loss {first:.4f} (first {window} steps) -> {last:.4f} (last {window}).\n"
    )
    save_folder(model.cpu(), source_files(args.model), Path(args.out_dir), note)
    log(f"saved {args.out_dir}")
    if args.eval:
        processor = AutoProcessor.from_pretrained(args.out_dir, trust_remote_code=True)
        reloaded = AutoModel.from_pretrained(args.out_dir, trust_remote_code=True).to(args.device)
        after = note_f1(transcribe_notes(reloaded, processor, features, start_times, args.device), reference)
        log(f"note F1 after fine-tuning (OUT_DIR reloaded with the Auto classes): {after:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fine-tune a converted MT3 model on audio + MIDI (Auto classes only).")
    parser.add_argument("model", metavar="MODEL", help="converted MT3 folder or Hub repo id")
    parser.add_argument("audio", metavar="AUDIO", help="audio file (wav, flac, ogg, mp3, ...)")
    parser.add_argument("midi", metavar="MIDI", help="MIDI file of the notes played in AUDIO (same time line)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write the fine-tuned model to (new or empty)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    parser.add_argument("--batch-size", type=int, default=4, help="segments per step (default 4)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device to train on (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batch order and dropout (default 0)")
    parser.add_argument("--freeze-encoder", action="store_true", help="train the decoder only (encoder outputs computed once)")
    parser.add_argument(
        "--eval", nargs="?", const="both", choices=["both", "after"], help="print the note F1 against the MIDI before and after fine-tuning (or after only)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar or log")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.lr <= 0:
        parser.error("--steps and --batch-size must be at least 1, --lr positive")
    if args.quiet:
        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
        logging.getLogger("transformers_modules").setLevel(logging.ERROR)  # the folder's own code logs there
    try:
        return finetune(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
