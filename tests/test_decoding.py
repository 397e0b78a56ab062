"""Event codec, vocabulary layout and token -> note / MIDI decoding (golden parity + unit tests)."""

import csv
import io
import json
import sys

import numpy as np
import pytest
import torch
from transformers.generation import GenerateEncoderDecoderOutput

from convert_mt3.mt3.event_codec_mt3 import (
    DECODED_EOS_ID,
    DECODED_INVALID_ID,
    Codec,
    Event,
    EventRange,
    build_codec,
    decode_model_ids,
    round_down_start_time,
    trim_eos,
)
from convert_mt3.mt3.midi_mt3 import notes_to_pretty_midi
from convert_mt3.mt3.note_sequences_mt3 import MT3Note, sort_notes
from convert_mt3.mt3.run_length_encoding_mt3 import event_predictions_to_notes
from convert_mt3.mt3.tokenization_mt3 import MT3Tokenizer

pretty_midi = pytest.importorskip("pretty_midi")

TOL_TIME = 1e-6  # notes.csv times are compared to 1e-6 s (the port reproduces them bit for bit)
MIDI_TICK = 1 / 440  # 220 ticks per quarter at 120 qpm


def read_notes_csv(path) -> list[MT3Note]:
    with open(path) as f:
        return [
            MT3Note(
                int(r["program"]), bool(int(r["is_drum"])), int(r["pitch"]), int(r["velocity"]),
                float(r["start_time"]), float(r["end_time"]),
            )
            for r in csv.DictReader(f)
        ]


def assert_notes_equal(ours: list[MT3Note], golden: list[MT3Note], label: str) -> None:
    assert len(ours) == len(golden), f"{label}: {len(ours)} notes vs {len(golden)} golden"
    max_err, bit_exact = 0.0, 0
    for a, b in zip(ours, golden):
        assert (a.program, a.is_drum, a.pitch, a.velocity) == (b.program, b.is_drum, b.pitch, b.velocity)
        max_err = max(max_err, abs(a.start - b.start), abs(a.end - b.end))
        bit_exact += a.start == b.start and a.end == b.end
    print(f"\n[{label}] {len(ours)} notes equal; max time error {max_err:.3e} s; bit-exact times {bit_exact}/{len(ours)}")
    assert max_err <= TOL_TIME


def midi_summary(midi) -> list:
    return [
        (int(inst.program), bool(inst.is_drum), inst.name,
         sorted((n.pitch, n.velocity, round(n.start, 6), round(n.end, 6)) for n in inst.notes))
        for inst in midi.instruments
    ]


@pytest.fixture(scope="module")
def tokenizer() -> MT3Tokenizer:
    return MT3Tokenizer()


# -- golden parity ---------------------------------------------------------------------------------------------


def test_golden_tokens_to_notes(tokenizer, golden_cases):
    for case in golden_cases:
        tokens = json.loads((case / "tokens.json").read_text())
        meta = json.loads((case / "meta.json").read_text())
        golden = read_notes_csv(case / "notes.csv")

        # vocabulary decode == the original's decode_tf (+ _trim_eos)
        for raw, codec_ids in zip(tokens["segments"], tokens["segments_codec_ids"]):
            assert tokenizer.model_ids_to_codec_ids(raw + [1, 0, 0]).tolist() == codec_ids
        # start time rounding with the colab's float arithmetic
        rounded = [round_down_start_time(t, tokenizer.steps_per_second) for t in tokens["input_times"]]
        assert rounded == tokens["start_times_rounded"]

        notes, invalid, dropped = tokenizer.decode_to_notes(
            tokens["segments"], tokens["input_times"], has_decoder_start=False
        )
        print(f"\n[{case.name}] invalid events {invalid} (golden {meta['est_invalid_events']}), "
              f"dropped {dropped} (golden {meta['est_dropped_events']})")
        assert invalid == meta["est_invalid_events"]
        assert dropped == meta["est_dropped_events"]
        assert_notes_equal(sort_notes(notes), golden, case.name)
        assert len(golden) == meta["num_notes"]


def test_golden_midi(tokenizer, golden_cases):
    for case in golden_cases:
        tokens = json.loads((case / "tokens.json").read_text())
        golden = read_notes_csv(case / "notes.csv")
        notes, _, _ = tokenizer.decode_to_notes(tokens["segments"], tokens["input_times"], has_decoder_start=False)
        midi = tokenizer.notes_to_midi(notes)

        # The PrettyMIDI object holds exactly the notes of notes.csv.
        in_midi = sorted(
            (inst.program if not inst.is_drum else 0, inst.is_drum, n.pitch, n.velocity, n.start, n.end)
            for inst in midi.instruments for n in inst.notes
        )
        assert in_midi == sorted(tuple(n) for n in golden)

        # Written file vs the original's transcription.mid (note_seq.sequence_proto_to_midi_file).
        buffer = io.BytesIO()
        midi.write(buffer)
        written = buffer.getvalue()
        reread = pretty_midi.PrettyMIDI(io.BytesIO(written))
        original = pretty_midi.PrettyMIDI(str(case / "transcription.mid"))
        same_bytes = written == (case / "transcription.mid").read_bytes()
        print(f"\n[{case.name}] MIDI: {len(reread.instruments)} tracks, same content as transcription.mid; "
              f"byte-identical: {same_bytes}")
        assert midi_summary(reread) == midi_summary(original)
        # tick quantisation only: times within half a tick of notes.csv
        reread_notes = sorted((n.pitch, n.start) for inst in reread.instruments for n in inst.notes)
        golden_notes = sorted((n.pitch, n.start) for n in golden)
        assert max(abs(a[1] - b[1]) for a, b in zip(reread_notes, golden_notes)) <= MIDI_TICK / 2 + 1e-9


# -- vocabulary layout --------------------------------------------------------------------------------------------


def test_layout_mt3():
    tok = MT3Tokenizer()  # num_velocity_bins=1
    # By hand from vocabularies.build_codec: shift 0..1000 (1001), pitch 128, velocity 0..1 (2), tie 1,
    # program 128, drum 128 -> 1388 codec ids; + 3 special = 1391; + 100 extra = 1491; next multiple of 128 = 1536.
    assert tok.codec.num_classes == 1001 + 128 + 2 + 1 + 128 + 128 == 1388
    assert tok.base_vocab_size == 1391
    assert tok.vocab_size == len(tok) == 1536
    codec = tok.codec
    assert codec.event_type_range("shift") == (0, 1000)
    assert codec.event_type_range("pitch") == (1001, 1128)
    assert codec.event_type_range("velocity") == (1129, 1130)
    assert codec.event_type_range("tie") == (1131, 1131)
    assert codec.event_type_range("program") == (1132, 1259)
    assert codec.event_type_range("drum") == (1260, 1387)
    assert tok.event_to_id(Event("tie", 0)) == 1134
    assert tok.event_to_id(Event("pitch", 60)) == 1064
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 1134, 1390, 1391, 1490, 1491, 1535]) == [
        "<pad>", "</s>", "<unk>", "<shift_0>", "<tie_0>", "<drum_127>",
        "<extra_id_99>", "<extra_id_0>", "<unused_0>", "<unused_44>",
    ]


def test_layout_ismir2021():
    tok = MT3Tokenizer(num_velocity_bins=127, use_ties=False)
    # velocity 0..127 (128 values): 1001 + 128 + 128 + 1 + 128 + 128 = 1514; + 3 = 1517; + 100 = 1617 -> 1664.
    assert tok.codec.num_classes == 1514
    assert tok.vocab_size == len(tok) == 1664
    assert tok.codec.event_type_range("velocity") == (1129, 1256)


def test_codec_round_trip():
    codec = build_codec(100, 10, 1)
    for index in range(codec.num_classes):
        event = codec.decode_event_index(index)
        assert codec.encode_event(event) == index
    with pytest.raises(ValueError):
        codec.encode_event(Event("pitch", 128))
    with pytest.raises(ValueError):
        codec.encode_event(Event("bogus", 0))
    for bad in (-1, -2, codec.num_classes):
        with pytest.raises(ValueError):
            codec.decode_event_index(bad)
    with pytest.raises(ValueError):
        Codec(10, 100, [EventRange("shift", 0, 1)])
    with pytest.raises(ValueError, match="min_value <= max_value"):  # its indices would overlap the next range's
        Codec(10, 100, [EventRange("pitch", 5, 3)])


def test_text_round_trip(tokenizer):
    ids = tokenizer("<program_33> <velocity_1> <pitch_60> <shift_50>", add_special_tokens=False)["input_ids"]
    assert ids == [tokenizer.event_to_id(e) for e in
                   (Event("program", 33), Event("velocity", 1), Event("pitch", 60), Event("shift", 50))]
    assert tokenizer.decode(ids) == "<program_33> <velocity_1> <pitch_60> <shift_50>"
    assert tokenizer.id_to_event(ids[2]) == Event("pitch", 60)
    assert tokenizer.id_to_event(1) is None and tokenizer.id_to_event(1500) is None


def test_decode_model_ids_and_trim():
    ids = [0, 2, 3, 1063, 1390, 1391, 1535, 1, 5, 0]
    decoded = decode_model_ids(ids, num_regular_ids=1388, num_special_ids=3, eos_id=1)
    assert decoded.tolist() == [-2, -2, 0, 1060, 1387, -2, -2, -1, -1, -1]
    assert trim_eos(decoded).tolist() == [-2, -2, 0, 1060, 1387, -2, -2]
    assert trim_eos([4, 5]).tolist() == [4, 5]
    assert DECODED_EOS_ID == -1 and DECODED_INVALID_ID == -2


# -- decoding semantics (note_sequences.decode_note_event & co) -------------------------------------------------


def seg(codec: Codec, *events: tuple[str, int]) -> list[int]:
    return [codec.encode_event(Event(t, v)) for t, v in events]


def decode(codec, segments, start_times, use_ties=True):
    preds = [{"est_tokens": s, "start_time": t} for s, t in zip(segments, start_times)]
    notes, invalid, dropped = event_predictions_to_notes(preds, codec, use_ties=use_ties)
    return sort_notes(notes), invalid, dropped


def test_note_on_off_and_velocity():
    codec = build_codec(100, 10, 1)
    s = seg(codec, ("tie", 0), ("shift", 50), ("program", 33), ("velocity", 1), ("pitch", 40),
            ("shift", 120), ("velocity", 0), ("pitch", 40))
    notes, invalid, dropped = decode(codec, [s], [0.0])
    assert notes == [MT3Note(33, False, 40, 127, 0.5, 1.2)]
    assert (invalid, dropped) == (0, 0)


def test_ties_carry_notes_across_segments():
    codec = build_codec(100, 10, 1)
    first = seg(codec, ("tie", 0), ("shift", 50), ("program", 0), ("velocity", 1), ("pitch", 60),
                ("pitch", 64))
    # second segment: only 60 is declared tied; 64 ends at the tie event (segment start), 60 ends at 2.5 s
    second = seg(codec, ("program", 0), ("pitch", 60), ("tie", 0), ("shift", 50), ("velocity", 0), ("pitch", 60))
    notes, invalid, _ = decode(codec, [first, second], [0.0, 2.0])
    assert notes == [MT3Note(0, False, 60, 127, 0.5, 2.5), MT3Note(0, False, 64, 127, 0.5, 2.0)]
    assert invalid == 0


def test_tie_section_errors_are_counted():
    codec = build_codec(100, 10, 1)
    # tied pitch that is not active, tied twice, tie outside the tie section
    s = seg(codec, ("program", 0), ("pitch", 70), ("tie", 0), ("tie", 0))
    _, invalid, _ = decode(codec, [s], [0.0])
    assert invalid == 2
    s2 = seg(codec, ("tie", 0), ("velocity", 1), ("pitch", 60))
    s3 = seg(codec, ("pitch", 60), ("pitch", 60), ("tie", 0))
    _, invalid, _ = decode(codec, [s2, s3], [0.0, 2.0])
    assert invalid == 1
    # without ties (ismir2021 spec), a tie event is always invalid
    _, invalid, _ = decode(codec, [seg(codec, ("tie", 0))], [0.0], use_ties=False)
    assert invalid == 1


def test_drums_are_onset_only():
    codec = build_codec(100, 10, 1)
    s = seg(codec, ("tie", 0), ("shift", 100), ("velocity", 1), ("drum", 36), ("program", 5), ("drum", 38),
            ("velocity", 0), ("drum", 42))
    notes, invalid, _ = decode(codec, [s], [0.0])
    assert notes == [MT3Note(0, True, 36, 127, 1.0, 1.01), MT3Note(0, True, 38, 127, 1.0, 1.01)]
    assert invalid == 1  # drum with velocity 0


def test_flush_ends_active_notes():
    codec = build_codec(100, 10, 1)
    s = seg(codec, ("tie", 0), ("velocity", 1), ("shift", 100), ("pitch", 60), ("shift", 300), ("pitch", 62))
    notes, _, _ = decode(codec, [s], [4.0])
    # both end at the latest event time (7.0); 62 would be zero-length: min duration 0.01 applies
    assert [(n.pitch, n.start, n.end) for n in notes] == [(60, 5.0, 7.01), (62, 7.0, 7.01)]


def test_repeated_onset_and_bad_offsets():
    codec = build_codec(100, 10, 1)
    s = seg(codec, ("tie", 0), ("velocity", 1), ("pitch", 60), ("shift", 10), ("pitch", 60), ("shift", 20),
            ("velocity", 0), ("pitch", 60), ("pitch", 61))
    notes, invalid, _ = decode(codec, [s], [0.0])
    assert [(n.pitch, n.start, n.end) for n in notes] == [(60, 0.0, 0.1), (60, 0.1, 0.2)]
    assert invalid == 1  # note-off for inactive pitch 61


def test_invalid_ids_time_order_and_dropped_events():
    codec = build_codec(100, 10, 1)
    # -2 marks (special / extra ids) are invalid; shifts are absolute within a segment, so a smaller shift after
    # an event goes back in time: that event is invalid (it raises before touching the state)
    first = [-2] + seg(codec, ("tie", 0), ("shift", 100), ("velocity", 1), ("drum", 36), ("shift", 50),
                       ("drum", 40), ("shift", 150), ("drum", 41))
    notes, invalid, dropped = decode(codec, [first], [0.0])
    assert (invalid, dropped) == (2, 0)  # the -2 and the drum at 0.5 s
    assert [(n.pitch, n.start) for n in notes] == [(36, 1.0), (41, 1.5)]
    # a shift past the next segment's start drops that token and all after it
    third = seg(codec, ("tie", 0), ("shift", 300), ("velocity", 1), ("drum", 36))
    fourth = seg(codec, ("tie", 0))
    notes, invalid, dropped = decode(codec, [third, fourth], [0.0, 2.0])
    assert (len(notes), invalid, dropped) == (0, 0, 3)


def test_batch_decode_api(tokenizer):
    codec = tokenizer.codec
    events = seg(codec, ("tie", 0), ("shift", 10), ("program", 40), ("velocity", 1), ("pitch", 60),
                 ("shift", 20), ("velocity", 0), ("pitch", 60))
    row = [0] + [i + 3 for i in events] + [1, 0, 0]
    out = tokenizer.batch_decode(np.array([row, [0, 1] + [0] * (len(row) - 2)]),
                                 segment_start_times=[0.0, 2.048], return_midi=True)
    assert out["notes"] == [MT3Note(40, False, 60, 127, 0.1, 0.2)]
    assert (out["invalid_events"], out["dropped_events"]) == (0, 0)
    assert [(i.program, len(i.notes)) for i in out["pretty_midi"].instruments] == [(40, 1)]
    dict_output = GenerateEncoderDecoderOutput(sequences=torch.tensor([row, [0, 1] + [0] * (len(row) - 2)]))
    assert tokenizer.batch_decode(dict_output, segment_start_times=[0.0, 2.048])["notes"] == out["notes"]
    with pytest.raises(ValueError, match="one row of token ids per segment"):
        tokenizer.batch_decode([row], segment_start_times=[0.0, 2.0])
    with pytest.raises(ValueError, match="decoder start"):
        tokenizer.batch_decode([row[1:]], segment_start_times=[0.0])
    # without start times it is the usual text decoding
    assert tokenizer.batch_decode([[1064, 1134]]) == ["<pitch_60> <tie_0>"]


def test_midi_writer_drums_and_names():
    notes = [MT3Note(0, True, 36, 127, 0.5, 0.51), MT3Note(33, False, 40, 127, 0.0, 1.0),
             MT3Note(0, False, 60, 127, 0.2, 0.4)]
    midi = notes_to_pretty_midi(notes)
    # instrument ids by first appearance of a non-drum program (33 -> 0, 0 -> 1), drums -> 9
    assert [(i.program, i.is_drum, i.name) for i in midi.instruments] == [
        (33, False, ""), (0, False, "Acoustic Grand Piano"), (0, True, "Drums")]
    buffer = io.BytesIO()
    midi.write(buffer)
    reread = pretty_midi.PrettyMIDI(io.BytesIO(buffer.getvalue()))
    assert sorted((i.is_drum, n.pitch) for i in reread.instruments for n in i.notes) == [
        (False, 40), (False, 60), (True, 36)]
    empty = notes_to_pretty_midi([])
    assert [len(i.notes) for i in empty.instruments] == [0]


def test_midi_writer_needs_pretty_midi(monkeypatch):
    monkeypatch.setitem(sys.modules, "pretty_midi", None)
    with pytest.raises(ImportError, match="pip install pretty_midi"):
        notes_to_pretty_midi([])
