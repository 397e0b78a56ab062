"""Notes -> training targets (the inverse of decoding): round trips on the golden cases and unit tests."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from convert_mt3.mt3.event_codec_mt3 import Event, build_codec
from convert_mt3.mt3.note_sequences_mt3 import MT3Note, sort_notes
from convert_mt3.mt3.tokenization_mt3 import MT3Tokenizer

TOL_TIME = 1e-6  # decoded times are start + steps / 100 in float64: equal up to rounding of the last bit
GRID = 100  # shift steps per second


def assert_same_notes(ours: list[MT3Note], expected: list[MT3Note], label: str) -> None:
    ours, expected = sort_notes(ours), sort_notes(expected)
    assert len(ours) == len(expected), f"{label}: {len(ours)} notes vs {len(expected)} expected"
    max_err = 0.0
    for a, b in zip(ours, expected):
        assert (a.program, a.is_drum, a.pitch, a.velocity) == (b.program, b.is_drum, b.pitch, b.velocity), (a, b)
        max_err = max(max_err, abs(a.start - b.start), abs(a.end - b.end))
    print(f"\n[{label}] {len(ours)}/{len(expected)} notes equal, max time difference {max_err:.2e} s")
    assert max_err <= TOL_TIME


def model_ids_text(tokenizer: MT3Tokenizer, row: list[int]) -> list[str]:
    return tokenizer.convert_ids_to_tokens(row)


@pytest.fixture(scope="module")
def tokenizer() -> MT3Tokenizer:
    return MT3Tokenizer()


def test_golden_round_trip(tokenizer, golden_cases):
    """golden tokens -> notes -> tokens -> notes gives the same notes (up to exact duplicates, which MT3's events
    cannot express: its training data drops them with trim_overlapping_notes)."""
    for case in golden_cases:
        tokens = json.loads((case / "tokens.json").read_text())
        notes, _, _ = tokenizer.decode_to_notes(tokens["segments"], tokens["input_times"], has_decoder_start=False)
        targets = tokenizer.encode_notes(notes, tokens["input_times"])
        assert len(targets) == len(tokens["segments"]) and all(row[-1] == tokenizer.eos_token_id for row in targets)
        again, invalid, dropped = tokenizer.decode_to_notes(targets, tokens["input_times"], has_decoder_start=False)
        assert (invalid, dropped) == (0, 0)
        duplicates = sum(count - 1 for count in Counter(notes).values())
        distinct = list(dict.fromkeys(notes))
        print(f"\n[{case.name}] {len(notes)} decoded notes, {duplicates} exact duplicates; "
              f"{sum(map(len, targets))} target ids vs {sum(map(len, tokens['segments']))} golden ids")
        assert_same_notes(again, distinct, case.name)


def quantised(notes: list[MT3Note], velocity_of, note_duration: float = 0.01) -> list[MT3Note]:
    """What MT3's events can say about notes: times on the 10 ms grid, at least 10 ms long, drums onset-only."""
    out = []
    for n in notes:
        start = round(n.start * GRID) / GRID
        end = start + note_duration if n.is_drum else max(round(n.end * GRID) / GRID, start + note_duration)
        out.append(MT3Note(n.program, n.is_drum, n.pitch, velocity_of(n.velocity), start, end))
    return out


def test_reference_midi_round_trip(tokenizer, shared):
    """case b's reference.mid -> targets -> notes equals the MIDI's notes quantised to 10 ms (velocity: one bin)."""
    from convert_mt3.mt3.midi_mt3 import midi_to_notes

    case = shared / "golden" / "b_multi_instrument_drums_synth"
    tokens = json.loads((case / "tokens.json").read_text())
    reference = midi_to_notes(case / "reference.mid")
    targets = tokenizer.encode_notes(reference, tokens["input_times"])
    notes, invalid, dropped = tokenizer.decode_to_notes(targets, tokens["input_times"], has_decoder_start=False)
    assert (invalid, dropped) == (0, 0)
    print(f"\n[reference.mid] {len(reference)} notes ({sum(n.is_drum for n in reference)} drums), "
          f"{len(targets)} segments, {sum(map(len, targets))} target ids")
    assert_same_notes(notes, quantised(reference, lambda v: 127), "reference.mid")


def test_ismir2021_piano_round_trip():
    """Synthetic piano with velocities through the ismir2021 layout (127 bins, no ties, flat programs, 4.096 s
    segments): notes held across segment boundaries survive without ties, velocities are kept exactly."""
    tokenizer = MT3Tokenizer(num_velocity_bins=127, use_ties=False, program_granularity="flat")
    rng = np.random.default_rng(0)
    notes = []
    for pitch in rng.choice(np.arange(21, 109), 40, replace=False):
        start = float(rng.uniform(0, 11))
        notes.append(MT3Note(0, False, int(pitch), int(rng.integers(1, 128)), start, start + float(rng.uniform(0.02, 5))))
    start_times = np.arange(3) * 512 / 125  # 512-frame segments
    targets = tokenizer.encode_notes(notes, start_times)
    texts = [" ".join(model_ids_text(tokenizer, row)) for row in targets]
    assert not any("<tie_0>" in t or "<program_" in t for t in texts)
    decoded, invalid, dropped = tokenizer.decode_to_notes(targets, start_times, has_decoder_start=False)
    assert (invalid, dropped) == (0, 0)
    assert_same_notes(decoded, quantised(notes, lambda v: v), "ismir2021 piano")


def test_targets_layout():
    """Hand-checked targets: tie section, absolute shifts per segment, redundant state changes removed, drums."""
    tokenizer = MT3Tokenizer()
    notes = [
        MT3Note(33, False, 40, 100, 0.5, 3.0),  # held across the 2.048 s boundary
        MT3Note(33, False, 43, 90, 0.5, 0.7),
        MT3Note(0, True, 36, 80, 0.5, 0.6),
    ]
    first, second = tokenizer.encode_notes(notes, [0.0, 2.048])
    assert model_ids_text(tokenizer, first) == [
        "<tie_0>", "<shift_50>", "<program_33>", "<velocity_1>", "<pitch_40>", "<pitch_43>", "<drum_36>",
        "<shift_70>", "<velocity_0>", "<pitch_43>", "</s>",
    ]
    # segment 2's origin is step 204 (the last at or before 2.048 s); 3.0 s is 96 steps later
    assert model_ids_text(tokenizer, second) == [
        "<program_33>", "<pitch_40>", "<tie_0>", "<shift_96>", "<velocity_0>", "<pitch_40>", "</s>",
    ]
    # midi_class maps program 33 to 32; a shift longer than 10 s is split
    coarse = MT3Tokenizer(program_granularity="midi_class")
    (row,) = coarse.encode_notes([MT3Note(33, False, 40, 100, 12.0, 12.5)], [0.0])
    assert model_ids_text(coarse, row)[:4] == ["<tie_0>", "<shift_1000>", "<shift_200>", "<program_32>"]


def test_a_segment_starting_on_the_grid_counts_from_its_start():
    """Segment 15 starts at 30.72 s, on the 10 ms grid: its targets count from step 3072, as MT3's
    encode_and_index_events compares each step's time with the frame's (float 30.72 % 0.01 is ~0.01, so the
    colab's rounding, which the targets used, made it 3071 and every time in the segment one step late: 215 of an
    hour's 1,758 segments). Decoding keeps the colab's rounding, so there the notes come back 10 ms early, as
    MT3's own decoding of such targets gives them."""
    tokenizer = MT3Tokenizer()
    starts = [k * 2.048 for k in range(16)]
    assert starts[15] == 30.72 and 30.72 % 0.01 > 0.0099
    targets = tokenizer.encode_notes([MT3Note(0, False, 60, 100, 30.75, 30.9)], starts)
    assert model_ids_text(tokenizer, targets[15]) == [
        "<tie_0>", "<shift_3>", "<program_0>", "<velocity_1>", "<pitch_60>", "<shift_18>", "<velocity_0>", "<pitch_60>",
        "</s>",
    ]
    decoded = tokenizer.batch_decode([[0, *row] for row in targets], segment_start_times=starts)["notes"]
    assert [(n.start, n.end) for n in decoded] == [(pytest.approx(30.74), pytest.approx(30.89))]


def test_notes_from_before_the_clip_and_after_the_last_event():
    """A note that starts before the first segment (a crop of a longer recording) is in its tie section, as MT3's
    targets for a crop inside a track have it, and decoding drops it there (the first segment has no notes to
    continue); a segment after the last event has an empty tie section (MT3's own targets would repeat the state
    before that event: README, Fine-tuning)."""
    tokenizer = MT3Tokenizer()
    first, second = tokenizer.encode_notes([MT3Note(0, False, 60, 100, -0.5, 0.3)], [0.0, 2.048])
    assert model_ids_text(tokenizer, first) == [
        "<program_0>", "<pitch_60>", "<tie_0>", "<shift_30>", "<velocity_0>", "<pitch_60>", "</s>",
    ]
    assert model_ids_text(tokenizer, second) == ["<tie_0>", "</s>"]
    decoded = tokenizer.batch_decode([[0, *first], [0, *second]], segment_start_times=[0.0, 2.048])
    assert decoded["notes"] == [] and decoded["invalid_events"] == 2


def test_encode_rejects_bad_notes(tokenizer):
    with pytest.raises(ValueError, match="velocity 1..127"):
        tokenizer.encode_notes([MT3Note(0, False, 60, 0, 0.0, 1.0)], [0.0])
    with pytest.raises(ValueError, match="start < end"):
        tokenizer.encode_notes([MT3Note(0, False, 60, 100, 1.0, 1.0)], [0.0])
    with pytest.raises(ValueError, match="pitch and program 0..127"):  # refused at the edge, naming the note
        tokenizer.encode_notes([MT3Note(0, False, 130, 100, 0.0, 1.0)], [0.0])
    with pytest.raises(ValueError, match="program_granularity"):
        MT3Tokenizer(program_granularity="coarse")
    assert build_codec(100, 10, 1).encode_event(Event("shift", 1000)) == 1000


def test_processor_labels_and_collate(shared):
    """processor(audio=..., midi=PATH) gives input_features + labels (-100 padded); collate batches segments."""
    from convert_mt3.mt3.feature_extraction_mt3 import MT3FeatureExtractor
    from convert_mt3.mt3.midi_mt3 import midi_to_notes
    from convert_mt3.mt3.processing_mt3 import MT3Processor

    case = shared / "golden" / "b_multi_instrument_drums_synth"
    processor = MT3Processor(MT3FeatureExtractor(), MT3Tokenizer())
    samples = np.load(case / "samples.npy")[: 3 * 32768]
    inputs = processor(audio=samples, sampling_rate=16000, midi=case / "reference.mid", return_tensors="pt")
    assert tuple(inputs["input_features"].shape) == (4, 256, 512)  # 3 full segments + the colab's extra frame
    expected = processor.tokenizer.encode_notes(midi_to_notes(case / "reference.mid"), inputs["segment_start_times"])
    labels = inputs["labels"]
    assert labels.shape == (4, max(map(len, expected)))
    for row, target in zip(labels.tolist(), expected):
        assert row == target + [-100] * (labels.shape[1] - len(target))
    with pytest.raises(ValueError, match="not both"):
        processor(audio=samples, notes=[], midi=case / "reference.mid")
    batch = processor.collate([{"input_features": inputs["input_features"][i], "labels": labels[i]} for i in (3, 0)])
    assert tuple(batch["input_features"].shape) == (2, 256, 512) and batch["labels"].dtype == torch.int64
    assert batch["labels"][1].tolist() == expected[0] + [-100] * (batch["labels"].shape[1] - len(expected[0]))
