"""examples/finetune.py end to end on a tiny converted model, in a process where convert_mt3 cannot be imported."""

import os
import sys
from pathlib import Path

import numpy as np
import pretty_midi
import pytest
import soundfile
from safetensors.numpy import load_file

from convert_mt3.__main__ import main

from conftest import run_isolated_script
from t5x_writer import tiny_arrays, write_t5x_checkpoint

EXAMPLES = Path(__file__).parents[1] / "examples"
TINY = dict(d_model=32, heads=2, d_kv=8, d_ff=48, layers=2, decoder_layers=2, vocab=1536, input_depth=512)
GIN = "network.T5Config.num_heads = 2\nnetwork.T5Config.head_dim = 8\n"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    ckpt = write_t5x_checkpoint(root / "model" / "checkpoint_1000", tiny_arrays(**TINY), gin=GIN)
    assert main([str(ckpt), str(root / "mt3"), "--quiet"]) == 0
    return root / "mt3"


def test_finetune_runs_and_saves_a_loadable_folder(tiny_folder, tmp_path):
    rng = np.random.default_rng(0)
    soundfile.write(tmp_path / "clip.wav", (0.1 * rng.standard_normal(3 * 16000)).astype(np.float32), 16000)
    midi = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(0)
    piano.notes = [pretty_midi.Note(90, 60 + i, 0.4 * i, 0.4 * i + 1.5) for i in range(6)]
    drums = pretty_midi.Instrument(0, is_drum=True)
    drums.notes = [pretty_midi.Note(100, 36, 0.5 * i, 0.5 * i + 0.1) for i in range(5)]
    midi.instruments = [piano, drums]
    midi.write(str(tmp_path / "clip.mid"))

    soundfile.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    refused = [  # missing inputs and MODEL, and audio without samples: one line each, before any training
        ([str(tiny_folder), "nope.wav", "clip.mid"], "AUDIO nope.wav: no such file"),
        ([str(tiny_folder), "clip.wav", "nope.mid"], "MIDI nope.mid: no such file"),
        ([str(tmp_path / "no-model"), "clip.wav", "clip.mid"], f"MODEL {tmp_path / 'no-model'}: no such folder"),
        ([str(tiny_folder), "empty.wav", "clip.mid"], "AUDIO empty.wav: no samples to train on"),
    ]
    *results, unmakeable, result, overwrite = run_isolated_script(EXAMPLES / "finetune.py", [
        *([*args, "new", "--steps", "1", "--quiet"] for args, _ in refused),  # first: their stderr is checked
        [str(tiny_folder), "clip.wav", "clip.mid", "clip.wav/new", "--steps", "1", "--quiet"],
        [str(tiny_folder), "clip.wav", "clip.mid", "out", "--steps", "3", "--lr", "1e-2", "--quiet"],
        [str(tiny_folder), "clip.wav", "clip.mid", "out", "--steps", "1", "--quiet"],  # "out" is there now
    ], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "preprocessor_config.json",
            "modeling_mt3.py", "run_length_encoding_mt3.py", "README.md"} <= {p.name for p in out.iterdir()}
    assert (tiny_folder / ".convert-mt3.json").is_file() and not (out / ".convert-mt3.json").exists()  # not ours
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # as a folder made by mkdir, not tempfile's private one
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # safetensors alone writes 0600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    before, after = load_file(tiny_folder / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys() and any(not np.array_equal(before[k], after[k]) for k in before)

    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(out, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    inputs = processor(audio=np.zeros(16000, np.float32), sampling_rate=16000, return_tensors="pt")
    tokens = model.generate(input_features=inputs["input_features"], max_new_tokens=8)
    assert "notes" in processor.batch_decode(tokens, inputs)

    # refuses to overwrite a folder that is not empty, in one line
    assert overwrite.returncode == 1 and overwrite.stderr.strip().startswith("error:")
    assert "not an empty folder" in overwrite.stderr
    for (_, message), refusal in zip(refused, results, strict=True):
        assert refusal.returncode == 1 and refusal.stderr.strip().splitlines() == [f"error: {message}"], refusal.stderr[-2000:]
    assert not (tmp_path / "new").exists()
    # an OUT_DIR that cannot be made is refused before training, not after it
    assert unmakeable.returncode == 1 and unmakeable.stderr.strip().splitlines() == [
        f"error: clip.wav/new: {tmp_path / 'clip.wav'} is not a folder"], unmakeable.stderr[-2000:]


def test_segments_with_targets_too_long_are_left_out(tiny_folder, tmp_path):
    """A note held for hours (its tie section repeats in every later segment) makes segments whose targets exceed
    the model's 1024 ids; they are left out of training, with a line that says so, instead of failing mid-run."""
    soundfile.write(tmp_path / "clip.wav", np.zeros(4 * 16000, np.float32), 16000)
    midi = pretty_midi.PrettyMIDI()
    # 700 notes of 8 programs starting in the first 1.5 s, held for a minute: 1552 and 1425 target ids in the two
    # segments (the second ties them all)
    midi.instruments = [pretty_midi.Instrument(8 * k) for k in range(8)]
    for i in range(700):
        midi.instruments[i // 88].notes.append(pretty_midi.Note(90, 21 + i % 88, 0.01 * (i % 150), 60.0))
    midi.write(str(tmp_path / "long.mid"))
    # a third segment, after the notes end: short targets, kept
    soundfile.write(tmp_path / "clip6.wav", np.zeros(6 * 16000, np.float32), 16000)
    for note in midi.instruments[0].notes:
        note.end = 4.5
    midi.write(str(tmp_path / "shorter.mid"))
    too_long, kept = run_isolated_script(EXAMPLES / "finetune.py", [
        [str(tiny_folder), "clip.wav", "long.mid", "out", "--steps", "2", "--batch-size", "2"],
        [str(tiny_folder), "clip6.wav", "shorter.mid", "out", "--steps", "2", "--batch-size", "2"],
    ], tmp_path)
    assert too_long.returncode == 1 and too_long.stderr.strip().splitlines()[-1] == (
        "error: MIDI long.mid: every segment's targets are longer than the model's 1024 ids"), too_long.stderr[-2000:]
    assert kept.returncode == 0, kept.stderr[-3000:]
    assert "2 of 3 segments left out of training: targets over 1024 ids" in kept.stdout, kept.stdout[-2000:]


def test_note_f1():
    sys.path.insert(0, str(EXAMPLES))
    from finetune import note_f1

    from convert_mt3.mt3.note_sequences_mt3 import MT3Note

    reference = [MT3Note(0, False, 60, 100, 1.0, 2.0), MT3Note(0, False, 64, 100, 1.0, 2.0), MT3Note(0, True, 36, 100, 1.5, 1.51)]
    assert note_f1(reference, reference) == 1.0
    # program ignored, onset within 50 ms; wrong pitch and a pitched note on a drum pitch do not match
    estimated = [MT3Note(33, False, 60, 127, 1.04, 1.5), MT3Note(0, False, 65, 100, 1.0, 2.0), MT3Note(0, False, 36, 100, 1.5, 1.6)]
    assert note_f1(estimated, reference) == 2 * (1 / 3) * (1 / 3) / (2 / 3)
    assert note_f1([], reference) == 0.0 and note_f1([MT3Note(0, False, 60, 100, 1.06, 2.0)], reference) == 0.0
