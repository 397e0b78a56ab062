"""MT3Processor: save/load round trips (direct and through AutoProcessor remote code) and audio -> notes."""

import io
import json
import os
import re
import tempfile

import numpy as np
import pytest
import torch

from convert_mt3.mt3.feature_extraction_mt3 import MT3FeatureExtractor
from convert_mt3.mt3.note_sequences_mt3 import MT3Note
from convert_mt3.mt3.notes_mt3 import note_record
from convert_mt3.mt3.processing_mt3 import MT3Processor
from convert_mt3.mt3.tokenization_mt3 import MT3Tokenizer

from test_decoding import assert_notes_equal, read_notes_csv

pretty_midi = pytest.importorskip("pretty_midi")


@pytest.fixture(scope="module")
def processor() -> MT3Processor:
    return MT3Processor(MT3FeatureExtractor(), MT3Tokenizer())


def as_generate_output(segments: list[list[int]], eos_id: int = 1, pad_id: int = 0, start_id: int = 0) -> torch.Tensor:
    """What `generate()` returns for a batch: decoder start, tokens, EOS, then padding to the longest row."""
    width = max(len(s) for s in segments) + 2
    rows = [[start_id] + s + [eos_id] + [pad_id] * (width - len(s) - 2) for s in segments]
    return torch.tensor(rows, dtype=torch.long)


def test_save_load_round_trip(processor):
    with tempfile.TemporaryDirectory() as tmp:
        processor.save_pretrained(tmp)
        loaded = MT3Processor.from_pretrained(tmp)
    assert loaded.feature_extractor.to_dict() == processor.feature_extractor.to_dict()
    settings = ("steps_per_second", "max_shift_seconds", "num_velocity_bins", "num_extra_ids", "vocab_size_multiple",
                "use_ties", "default_velocity", "note_duration", "min_note_duration", "midi_ticks_per_quarter",
                "midi_qpm", "decoder_start_token_id")
    assert {k: getattr(loaded.tokenizer, k) for k in settings} == {k: getattr(processor.tokenizer, k) for k in settings}
    assert (loaded.tokenizer.pad_token_id, loaded.tokenizer.eos_token_id, loaded.tokenizer.unk_token_id) == (0, 1, 2)
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert loaded.model_input_names == ["input_features"]


def test_non_default_settings_survive_round_trip():
    processor = MT3Processor(MT3FeatureExtractor(frames_per_segment=512), MT3Tokenizer(num_velocity_bins=127, use_ties=False))
    with tempfile.TemporaryDirectory() as tmp:
        processor.save_pretrained(tmp)
        loaded = MT3Processor.from_pretrained(tmp)
    assert loaded.feature_extractor.frames_per_segment == 512
    assert loaded.tokenizer.num_velocity_bins == 127 and loaded.tokenizer.use_ties is False
    assert loaded.tokenizer.vocab_size == 1664


def test_auto_classes_with_remote_code(processor):
    """The classes name their Auto classes themselves: a saved processor holds its code and loads with
    trust_remote_code, each part through its own Auto class."""
    from transformers import AutoFeatureExtractor, AutoProcessor, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        processor.save_pretrained(tmp)
        files = set(os.listdir(tmp))
        assert {"processing_mt3.py", "feature_extraction_mt3.py", "tokenization_mt3.py"} <= files
        auto = AutoProcessor.from_pretrained(tmp, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(tmp, trust_remote_code=True)
        extractor = AutoFeatureExtractor.from_pretrained(tmp, trust_remote_code=True)
    assert type(auto).__name__ == "MT3Processor"
    assert type(tokenizer).__name__ == "MT3Tokenizer" and len(tokenizer) == 1536
    assert type(extractor).__name__ == "MT3FeatureExtractor"
    samples = np.random.default_rng(0).standard_normal(5000).astype(np.float32) * 0.1
    assert np.array_equal(auto(audio=samples, sampling_rate=16000)["input_features"],
                          processor(audio=samples, sampling_rate=16000)["input_features"])


def test_golden_audio_to_notes(processor, golden_cases):
    for case in golden_cases:
        samples = np.load(case / "samples.npy")
        tokens = json.loads((case / "tokens.json").read_text())
        meta = json.loads((case / "meta.json").read_text())
        inputs = processor(audio=samples, sampling_rate=16000, return_tensors="pt")
        assert tuple(inputs["input_features"].shape) == (meta["num_segments"], 256, 512)
        assert inputs["input_features"].dtype == torch.float32

        generated = as_generate_output(tokens["segments"])
        out = processor.batch_decode(generated, inputs, return_midi=True)
        assert_notes_equal(out["notes"], read_notes_csv(case / "notes.csv"), f"{case.name} via processor")
        assert out["invalid_events"] == meta["est_invalid_events"]
        assert out["dropped_events"] == meta["est_dropped_events"]
        buffer = io.BytesIO()
        out["pretty_midi"].write(buffer)
        assert buffer.getvalue() == (case / "transcription.mid").read_bytes()


def test_casting_the_inputs_keeps_the_segment_times(processor, golden_cases):
    """`inputs.to(device, dtype)` (the usual step before generate()) casts `input_features` and leaves the segment
    start times float64 on the host, so decoding places notes exactly; start times cast by hand are refused."""
    case = golden_cases[0]
    inputs = processor(audio=np.load(case / "samples.npy"), sampling_rate=16000, return_tensors="pt")
    times = inputs["segment_start_times"].clone()
    assert inputs.to("cpu", torch.float16) is inputs and inputs.to(torch.bfloat16) is inputs
    assert inputs["input_features"].dtype == torch.bfloat16 and list(inputs)[0] == "input_features"
    assert inputs["segment_start_times"].dtype == torch.float64 and torch.equal(inputs["segment_start_times"], times)
    generated = as_generate_output(json.loads((case / "tokens.json").read_text())["segments"])
    out = processor.batch_decode(generated, inputs, return_midi=False)
    assert_notes_equal(out["notes"], read_notes_csv(case / "notes.csv"), f"{case.name} after inputs.to(bfloat16)")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        with pytest.raises(ValueError, match=f"segment_start_times are {dtype}; expected float64"):
            processor.batch_decode(generated, {"segment_start_times": times.to(dtype)})
    for dtype in (np.float32, np.float16):  # float32 alone moves notes of this case a 10 ms step early
        with pytest.raises(ValueError, match=f"segment_start_times are {np.dtype(dtype)}; expected float64"):
            processor.batch_decode(generated, segment_start_times=times.numpy().astype(dtype))
    assert processor.batch_decode(generated, segment_start_times=times.tolist(), return_midi=False) == out


def test_empty_audio_gives_empty_midi(processor):
    inputs = processor(audio=np.zeros(0, dtype=np.float32), sampling_rate=16000, return_tensors="pt")
    assert tuple(inputs["input_features"].shape) == (0, 256, 512)
    out = processor.batch_decode(torch.zeros((0, 1), dtype=torch.long), inputs)
    assert out["notes"] == [] and out["invalid_events"] == 0
    buffer = io.BytesIO()
    out["pretty_midi"].write(buffer)
    reread = pretty_midi.PrettyMIDI(io.BytesIO(buffer.getvalue()))
    assert sum(len(i.notes) for i in reread.instruments) == 0


def test_silence_gives_empty_midi(processor):
    inputs = processor(audio=np.zeros(3 * 16000, dtype=np.float32), sampling_rate=16000, return_tensors="np")
    num_segments = inputs["input_features"].shape[0]
    assert num_segments == 2
    # a model that answers EOS straight away on every segment
    out = processor.batch_decode(as_generate_output([[]] * num_segments), inputs, return_midi=True)
    assert out["notes"] == [] and (out["invalid_events"], out["dropped_events"]) == (0, 0)
    assert sum(len(i.notes) for i in out["pretty_midi"].instruments) == 0


def test_processor_input_errors(processor):
    with pytest.raises(ValueError, match=r"Expected `audio` \(a mono clip as a 1-D array, or a list of them\); found None"):
        processor(sampling_rate=16000)
    with pytest.raises(ValueError, match="22050"):
        processor(audio=np.zeros(100, dtype=np.float32), sampling_rate=22050)
    inputs = processor(audio=np.zeros(100, dtype=np.float32), sampling_rate=16000)
    with pytest.raises(ValueError, match="per segment"):
        processor.batch_decode(torch.zeros((3, 4), dtype=torch.long), inputs)


def test_decode_alias(processor):
    inputs = processor(audio=np.zeros(100, dtype=np.float32), sampling_rate=16000)
    out = processor.decode(as_generate_output([[]]), inputs, return_midi=False)
    assert out["notes"] == [] and "pretty_midi" not in out


def test_notes_after_the_audio_are_reported(processor, caplog):
    """Labels from notes that start after the audio ends (a MIDI that belongs to another file, most likely) go into
    the last segment, as in MT3's preprocessing, with one warning that counts them."""
    audio = np.zeros(16000 * 3, np.float32)
    inside = [MT3Note(0, False, 60, 100, 0.5, 1.0)]
    with caplog.at_level("WARNING"):
        processor(audio=audio, sampling_rate=16000, notes=inside)
        assert not [r for r in caplog.records if "after the audio ends" in r.getMessage()]
        processor(audio=audio, sampling_rate=16000, notes=inside + [MT3Note(0, False, 62, 100, 5.0, 5.5)])
    messages = [r.getMessage() for r in caplog.records if "after the audio ends" in r.getMessage()]
    assert len(messages) == 1 and messages[0].startswith("1 of 2 notes start after the audio ends (3.00 s)")
    # notes as an iterator and audio as a tensor that requires grad, as the feature extractor takes them
    labels = processor(audio=audio, sampling_rate=16000, notes=inside)["labels"]
    tensor = torch.zeros(16000 * 3, requires_grad=True)
    np.testing.assert_array_equal(processor(audio=tensor, sampling_rate=16000, notes=iter(inside))["labels"], labels)


def test_targets_longer_than_the_model_are_reported(caplog):
    """A segment whose targets exceed the tokenizer's `model_max_length` (the converter sets the model's target length,
    1024) is reported with one warning naming the first such segment: MT3's training skips those, and the model
    has no positions for them."""
    processor = MT3Processor(MT3FeatureExtractor(), MT3Tokenizer(model_max_length=12))
    audio = np.zeros(16000 * 3, np.float32)  # segments at 0 and 2.048 s
    few = [MT3Note(0, False, 60, 100, 0.5, 1.0)]
    many = few + [MT3Note(0, False, 62 + i, 100, 2.1 + 0.1 * i, 2.9) for i in range(5)]
    with caplog.at_level("WARNING"):
        processor(audio=audio, sampling_rate=16000, notes=few)
        assert not [r for r in caplog.records if "target ids" in r.getMessage()]
        labels = processor(audio=audio, sampling_rate=16000, notes=many)["labels"]
    messages = [r.getMessage() for r in caplog.records if "target ids" in r.getMessage()]
    longest = int((labels[1] != -100).sum())
    assert longest > 12 and int((labels[0] != -100).sum()) <= 12
    assert messages == [messages[0]] and messages[0].startswith(f"1 of 2 segments have more than 12 target ids (the "
                                                                f"model's target length; segment 1 has {longest})")


def test_batch_decode_needs_the_segment_times(processor):
    """Without the processor's output the tokenizer would decode to text: the processor says what it needs."""
    with pytest.raises(ValueError, match="processor.batch_decode\\(ids, inputs\\)"):
        processor.batch_decode(as_generate_output([[]]))
    assert processor.batch_decode(as_generate_output([[]]), segment_start_times=[0.0], return_midi=False)["notes"] == []
    with pytest.raises(ValueError, match="found a Tensor: pass start times as `segment_start_times=`"):
        processor.batch_decode(as_generate_output([[]]), torch.tensor([0.0]))  # the times where the output goes


def test_collate_keeps_ignored_positions_inside_a_row(processor):
    """Only the trailing padding is re-padded: a label masked inside a row (e.g. its tie section) stays in place."""
    features = np.zeros((256, 512), np.float32)
    masked = np.array([5, 6, -100, -100, 9, 1, -100, -100])
    batch = processor.collate([{"input_features": features, "labels": masked},
                               {"input_features": features, "labels": np.array([7, 1])}])
    assert batch["labels"].tolist() == [[5, 6, -100, -100, 9, 1], [7, 1, -100, -100, -100, -100]]


def test_collate_with_the_model_feeds_trainers_that_take_the_labels_out(processor, tmp_path):
    """Trainer's label smoothing pops `labels` before the forward pass: `collate(..., model=model)` adds the model's
    own `decoder_input_ids` (as DataCollatorForSeq2Seq(model=...) does), so training runs, with the loss the labels
    give; without them the forward pass says what to pass."""
    pytest.importorskip("accelerate")
    from functools import partial

    from test_modeling import frames, tiny_model
    from transformers import Trainer, TrainingArguments

    model = tiny_model()
    x = frames(2, seed=6)
    rows = [{"input_features": x[0], "labels": np.array([5, 6, 7, 1])}, {"input_features": x[1], "labels": np.array([9, 1])}]
    batch = processor.collate(rows, model=model)
    assert batch["decoder_input_ids"].tolist() == [[0, 5, 6, 7], [0, 9, 1, 0]]  # start, labels[:-1]; -100 -> pad
    with torch.no_grad():
        assert torch.equal(model(**batch).loss, model(input_features=batch["input_features"], labels=batch["labels"]).loss)
    args = TrainingArguments(tmp_path, label_smoothing_factor=0.1, per_device_train_batch_size=2, max_steps=1,
                             report_to=[], use_cpu=True, save_strategy="no")
    with pytest.raises(ValueError, match=r"collate with `processor.collate\(\.\.\., model=model\)`"):
        Trainer(model=model, args=args, train_dataset=rows, data_collator=processor.collate).train()
    trained = Trainer(model=model, args=args, train_dataset=rows, data_collator=partial(processor.collate, model=model))
    assert trained.train().training_loss > 0


def test_collate_takes_rows_of_any_float_type_and_refuses_none(processor):
    """Rows as bfloat16/float16 tensors (numpy has none for bfloat16), float64 arrays or lists give the same float32
    batch; an empty list is a ValueError saying so."""
    rows = torch.linspace(-3, 3, 4 * 512).reshape(4, 512).to(torch.bfloat16)  # exact in every type below
    expected = rows.float()
    for form in (rows, rows.half(), rows.double().numpy(), rows.float().tolist()):
        batch = processor.collate([{"input_features": form}, {"input_features": form}])
        assert batch["input_features"].dtype == torch.float32 and torch.equal(batch["input_features"][1], expected)
    with pytest.raises(ValueError, match="at least one segment"):
        processor.collate([])


def test_a_list_of_clips_decodes_to_one_result_per_clip(processor, golden_cases):
    """The golden cases as one batch (plus an empty clip): `batch_decode` splits the rows by `segments_per_clip` and
    gives each clip the original's notes and MIDI file, as one call per clip does."""
    clips = [np.load(case / "samples.npy") for case in golden_cases]
    inputs = processor(audio=[clips[0], np.zeros(0, np.float32), *clips[1:]], sampling_rate=16000, return_tensors="pt")
    segments = [json.loads((case / "tokens.json").read_text())["segments"] for case in golden_cases]
    assert inputs["segments_per_clip"].tolist() == [len(segments[0]), 0, *map(len, segments[1:])]
    out = processor.batch_decode(as_generate_output([row for rows in segments for row in rows]), inputs)
    assert len(out["notes"]) == len(out["pretty_midi"]) == len(golden_cases) + 1 and out["notes"][1] == []
    for case, notes, midi, invalid in zip(golden_cases, out["notes"][:1] + out["notes"][2:],
                                          out["pretty_midi"][:1] + out["pretty_midi"][2:],
                                          out["invalid_events"][:1] + out["invalid_events"][2:]):
        assert_notes_equal(notes, read_notes_csv(case / "notes.csv"), f"{case.name} in a batch")
        assert invalid == json.loads((case / "meta.json").read_text())["est_invalid_events"]
        buffer = io.BytesIO()
        midi.write(buffer)
        assert buffer.getvalue() == (case / "transcription.mid").read_bytes()


def test_a_list_of_clips_without_golden_data(processor):
    """Per-clip results without ../shared: a silent clip's segment answered with one note lands in its own clip, at
    its clip's time; counts that do not add up to the rows are refused; labels take one clip at a time."""
    inputs = processor(audio=[np.zeros(40000, np.float32), np.zeros(100, np.float32)], sampling_rate=16000)
    assert inputs["segments_per_clip"].tolist() == [2, 1]
    note = MT3Note(program=33, is_drum=False, pitch=40, velocity=127, start=0.5, end=1.0)
    row = processor.tokenizer.encode_notes([note], [0.0])[0][:-1]  # its events, without the EOS
    out = processor.batch_decode(as_generate_output([[], [], row]), inputs, return_midi=True)
    assert out["notes"] == [[], [note]] and out["invalid_events"] == [0, 0] and len(out["pretty_midi"]) == 2
    out = processor.batch_decode(as_generate_output([row, [], []]), inputs, return_midi=False)
    assert out["notes"] == [[note], []] and "pretty_midi" not in out
    with pytest.raises(ValueError, match=r"count the 2 rows.*\[2, 1\]"):
        processor.batch_decode(as_generate_output([[], []]), inputs)
    as_tensors = processor(audio=[np.zeros(40000, np.float32), np.zeros(100, np.float32)], sampling_rate=16000,
                           return_tensors="pt")
    assert as_tensors["segments_per_clip"].dtype == torch.int64
    out = processor.batch_decode(as_generate_output([[], [], row]), as_tensors, return_midi=False)
    assert out["notes"] == [[], [note]]
    # the start times alone: the counts must come with them, or decoding refuses clips it would merge
    times = inputs["segment_start_times"]
    out = processor.batch_decode(as_generate_output([[], [], row]), segment_start_times=times, segments_per_clip=[2, 1])
    assert out["notes"] == [[], [note]]
    with pytest.raises(ValueError, match=r"segment 2 starting at 0.0 s, after 2.048 s \(several clips\?\)"):
        processor.batch_decode(as_generate_output([[], [], row]), segment_start_times=times)
    # clips of one segment each start at 0 too: [0, 0] does not go back, yet is two clips
    short = processor(audio=[np.zeros(100, np.float32)] * 2, sampling_rate=16000)
    with pytest.raises(ValueError, match=r"segment 1 starting at 0.0 s, after 0.0 s \(several clips\?\)"):
        processor.batch_decode(as_generate_output([row, row]), segment_start_times=short["segment_start_times"])
    out = processor.batch_decode(as_generate_output([row, row]), short, return_midi=False)
    assert out["notes"] == [[note], [note]]
    # rows as a list of tensors (several generate() calls' rows), as a CUDA model's would be: each row to the host
    assert processor.batch_decode(list(as_generate_output([row, row])), short, return_midi=False) == out
    with pytest.raises(ValueError, match="`segment_start_times`.*with `segments_per_clip`"):
        processor.tokenizer.batch_decode(as_generate_output([[]]), segments_per_clip=[1])
    with pytest.raises(ValueError, match="one clip with `notes` or `midi`; found a list of 2 clips"):
        processor(audio=[np.zeros(100, np.float32)] * 2, sampling_rate=16000, notes=[])


def test_labels_from_midi_bytes_file_or_object_and_unlabelled_collate(processor, tmp_path):
    """`midi=` takes a path, the file's bytes, a file object or a PrettyMIDI, with the same labels; bad bytes are
    refused without their content in the message. `collate` of segments without labels gives features only."""
    notes = [MT3Note(33, False, 40, 100, 0.5, 1.0), MT3Note(0, True, 36, 100, 2.5, 2.6)]
    midi = processor.tokenizer.notes_to_midi(notes)
    midi.write(str(tmp_path / "x.mid"))
    audio = np.zeros(16000 * 3, np.float32)
    expected = processor(audio=audio, sampling_rate=16000, notes=notes)["labels"]
    with open(tmp_path / "x.mid", "rb") as file:
        for source in (tmp_path / "x.mid", (tmp_path / "x.mid").read_bytes(), file, midi):
            np.testing.assert_array_equal(processor(audio=audio, sampling_rate=16000, midi=source)["labels"], expected)
    with pytest.raises(ValueError) as error:
        processor(audio=audio, sampling_rate=16000, midi=b"MThd" + b"SECRET" * 100)
    assert str(error.value).startswith("MIDI bytes (604): cannot be read as MIDI") and "SECRET" not in str(error.value)
    with pytest.raises(ValueError, match=r"^MIDI bytes \(3\): cannot be read as MIDI \(\w+"):  # never an empty reason
        processor(audio=audio, sampling_rate=16000, midi=b"xyz")
    with pytest.raises(ValueError, match="Expected a MIDI file's path, its bytes, a file object or a pretty_midi"):
        processor(audio=audio, sampling_rate=16000, midi=3)
    segment = {"input_features": np.zeros((256, 512), np.float32)}
    batch = processor.collate([segment, segment])
    assert list(batch) == ["input_features"] and tuple(batch["input_features"].shape) == (2, 256, 512)
    with pytest.raises(ValueError, match="labels on every segment or on none; found them on 1 of 2"):
        processor.collate([segment, {**segment, "labels": [5, 1]}])
    assert list(processor.collate([{**segment, "labels": None}, segment])) == ["input_features"]  # a datasets row


def test_notes_as_tuples_or_the_pipelines_dicts(processor):
    """`notes=` takes plain tuples and the note dicts the pipeline returns (a corrected transcription to train on),
    with the same labels as MT3Notes; anything else is refused in words, naming what is wrong."""
    notes = [MT3Note(33, False, 40, 100, 0.5, 1.0), MT3Note(0, True, 36, 100, 2.5, 2.6)]
    audio = np.zeros(16000 * 3, np.float32)
    expected = processor(audio=audio, sampling_rate=16000, notes=notes)["labels"]
    assert (expected != -100).sum() > 6
    records = [note_record(note) for note in notes]  # as the pipeline gives them, with an `instrument` name
    numeric = np.array([list(note) for note in notes], dtype=np.float64)  # (notes, 6): a table's rows, floats
    for given in ([tuple(note) for note in notes], records, [np.array(note, dtype=object) for note in notes], numeric,
                  torch.from_numpy(numeric), [(np.int64(p), np.bool_(d), *rest) for p, d, *rest in notes]):
        np.testing.assert_array_equal(processor(audio=audio, sampling_rate=16000, notes=given)["labels"], expected)
    for bad, message in [
        ("song.mid", "found str: for a MIDI file, pass `midi=`"),
        ([{"program": 0}], "missing is_drum, pitch, velocity, start, end"),
        ([(0, False, 60, 100, 0.5)], "found tuple of 5 items"),
        ([5], "found int"),
        ([(0.5, False, 60, 100, 0.5, 1.0)], "found program=0.5"),
        ([{**records[0], "start": "0.5"}], "found start='0.5'"),
        ([(0, "False", 60, 100, 0.5, 1.0)], "found is_drum='False'"),
        ([(0, np.array([0, 1]), 60, 100, 0.5, 1.0)], "found is_drum=array([0, 1])"),
        ([np.float64(3.0)], "found float64"),
        ([(0, False, 200, 100, 0.5, 1.0)], "pitch and program 0..127"),
        ([(128, False, 60, 100, 0.5, 1.0)], "pitch and program 0..127"),
        ([(0, False, 60, 100, 0.5, float("inf"))], "finite times, start < end"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            processor(audio=audio, sampling_rate=16000, notes=bad)


def test_inputs_that_are_not_samples_are_named(processor, caplog):
    """A file name or a dict given to the processor, or a sampling rate given as text, is refused in words; rows
    that end without EOS (cut by the length limit) get a warning when decoded."""
    with pytest.raises(ValueError, match="found str. The feature extractor does not read files"):
        processor(audio="song.wav", sampling_rate=16000)
    with pytest.raises(ValueError, match="samples \\(a 1-D float array\\); found a dict with keys \\['array'\\]"):
        processor(audio={"array": [0.0]}, sampling_rate=16000)
    for rate in (np.int64(16000), torch.tensor(16000), 16000.0):  # numbers of other types still pass
        assert processor(audio=np.zeros(100, np.float32), sampling_rate=rate)["input_features"].shape[0] == 1
    samples = torch.linspace(-0.5, 0.5, 4000)
    expected = processor(audio=samples.numpy(), sampling_rate=16000)["input_features"]
    for dtype in (torch.bfloat16, torch.float16, torch.float64):  # numpy has no bfloat16: converted, not refused
        found = processor(audio=samples.to(dtype), sampling_rate=16000)["input_features"]
        # the samples' own values: those of float32 samples rounded to that type
        rounded = processor(audio=samples.to(dtype).float().numpy(), sampling_rate=16000)["input_features"]
        np.testing.assert_array_equal(found, rounded)
    np.testing.assert_array_equal(processor(audio=samples.double(), sampling_rate=16000)["input_features"], expected)
    with pytest.raises(ValueError, match="sampling_rate in Hz as a number; found str '16000'"):
        processor(audio=np.zeros(100, np.float32), sampling_rate="16000")
    inputs = processor(audio=np.zeros(40000, np.float32), sampling_rate=16000)
    cut = torch.tensor([[0, 1, 0], [0, 5, 6]])  # the second row reached the length limit
    with caplog.at_level("WARNING"):
        processor.batch_decode(cut, inputs, return_midi=False)
    assert any("1 of 2 segments end without EOS" in record.getMessage() for record in caplog.records)
    caplog.clear()
    inputs = processor(audio=[np.zeros(40000, np.float32), np.zeros(100, np.float32)], sampling_rate=16000)
    with caplog.at_level("WARNING"):
        processor.batch_decode(torch.tensor([[0, 5, 6], [0, 1, 0], [0, 5, 6]]), inputs, return_midi=False)
    cut_messages = [record.getMessage() for record in caplog.records if "without EOS" in record.getMessage()]
    assert cut_messages == ["2 of 3 segments (clips [0, 1]) end without EOS (cut by the length limit, "
                            "max_length or max_new_tokens?): notes at their "
                            "ends may be missing."]
