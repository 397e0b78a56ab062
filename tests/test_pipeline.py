"""The folder's custom pipeline (pipeline_mt3.py): golden notes through `transformers.pipeline` as a Hub user runs
it, and every input form, option and bad input on a tiny random model."""

import copy
import csv
import json
import os
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile
import torch

from conftest import run_isolated

GOLDEN_CASES = ["a_brahms_string_orchestra", "b_multi_instrument_drums_synth", "c_ragtime_piano_recording"]
NOTE_KEY = ("program", "is_drum", "pitch", "velocity", "start", "end")


def golden_notes(case) -> list[tuple]:
    """notes.csv of the original MT3, exactly (times are Python float reprs)."""
    with open(case / "notes.csv") as f:
        return [
            (int(r["program"]), bool(int(r["is_drum"])), int(r["pitch"]), int(r["velocity"]), float(r["start_time"]), float(r["end_time"]))
            for r in csv.DictReader(f)
        ]


def as_tuples(notes: list[dict]) -> list[tuple]:
    return [tuple(note[key] for key in NOTE_KEY) for note in notes]


def write_golden_audio(shared, directory) -> dict:
    """Each case's audio exactly as fed to the original (samples.npy: already trimmed), as 16 kHz float WAV."""
    paths = {}
    for name in GOLDEN_CASES:
        paths[name] = directory / f"{name}.wav"
        soundfile.write(paths[name], np.load(shared / "golden" / name / "samples.npy"), 16000, subtype="FLOAT")
    return paths


PIPELINE_SCRIPT = """
import json, numpy as np
from transformers import pipeline
folder, out, cases = sys.argv[1], sys.argv[2], sys.argv[3:]
pipe = pipeline("music-transcription", model=folder, trust_remote_code=True)
results = {"class": type(pipe).__name__}
for case in cases:  # one file path per call
    results["path:" + case] = pipe(case + ".wav", return_midi=False)["notes"]
arrays = [np.load(case + ".npy") for case in cases]
inputs = [{"array": arrays[0], "sampling_rate": 16000}] + arrays[1:]  # the datasets dict form, then raw arrays
batched = pipe(inputs, sampling_rate=16000, batch_size=12, return_midi=False)
for case, result in zip(cases, batched):
    results["batch:" + case] = result["notes"]
json.dump(results, open(out, "w"))
"""


def test_pipeline_reproduces_golden_notes(shared, real_folder, tmp_path):
    """Offline, convert_mt3 unimportable, copied folder: each case as a file path, then all three as arrays in one
    list with batch_size=12 (segments of different inputs share generate calls): notes.csv exactly."""
    folder = tmp_path / "copied"
    shutil.copytree(real_folder, folder)
    write_golden_audio(shared, tmp_path)
    for name in GOLDEN_CASES:
        np.save(tmp_path / f"{name}.npy", np.load(shared / "golden" / name / "samples.npy"))
    argv = [str(folder), str(tmp_path / "out.json"), *GOLDEN_CASES]
    result = run_isolated(f"sys.argv = {['-'] + argv!r}\n" + PIPELINE_SCRIPT, tmp_path, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "out.json").read_text())
    assert results.pop("class") == "MT3TranscriptionPipeline"
    for name in GOLDEN_CASES:
        golden = golden_notes(shared / "golden" / name)
        for how in ("path", "batch"):
            mine = as_tuples(results[f"{how}:{name}"])
            print(f"{name} ({how}): {len(mine)} notes, {len(golden)} in notes.csv, identical: {mine == golden}")
            assert mine == golden


@pytest.fixture(scope="module")
def tiny_pipe(tiny_folder, tmp_path_factory, monkeypatch_module):
    from transformers import pipeline

    # A random model rarely writes EOS: 64 tokens per segment keep these tests fast.
    return pipeline(model=str(tiny_folder), trust_remote_code=True, device="cpu", generate_kwargs={"max_new_tokens": 64})


@pytest.fixture(scope="module")
def monkeypatch_module(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_MODULES_CACHE", str(tmp_path_factory.mktemp("modules")))
    mp.setenv("HF_HUB_OFFLINE", "1")
    yield mp
    mp.undo()


def tone(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 440 * t) * (t % 0.5 < 0.25)).astype(np.float32)


def test_task_inferred_and_input_forms(tiny_pipe, tmp_path):
    """File (stereo, 44.1 kHz), dict, raw array, empty audio: batched across inputs = one by one."""
    assert tiny_pipe.task == "music-transcription"
    stereo = np.stack([tone(2.5, 44100), 0.5 * tone(2.5, 44100)], axis=1)
    soundfile.write(tmp_path / "stereo.flac", stereo, 44100)
    mono16k = tone(2.5, 16000)
    inputs = [str(tmp_path / "stereo.flac"), {"array": mono16k, "sampling_rate": 16000}, np.zeros(0, np.float32), mono16k]
    one_by_one = [tiny_pipe(x, sampling_rate=16000, batch_size=1, return_midi=False) for x in inputs]
    batched = tiny_pipe(inputs, sampling_rate=16000, batch_size=3, return_midi=False)
    assert batched == one_by_one
    assert batched[2]["notes"] == [] and batched[1] == batched[3]
    assert tiny_pipe([], batch_size=3) == []  # transformers' own call would read inputs[0]
    assert len(batched[1]["notes"]) > 0  # the random model writes notes: a real comparison
    note = batched[0]["notes"][0]
    assert set(note) == {"program", "instrument", "is_drum", "pitch", "velocity", "start", "end"}
    # the file's samples as librosa.load gives them: the channels averaged, then soxr HQ to 16 kHz, ceil(n x 16/44.1)
    import soxr

    written, _ = soundfile.read(tmp_path / "stereo.flac", dtype="float32")  # (samples, 2), 16-bit FLAC's values
    length = -(-len(written) * 16000 // 44100)
    expected = soxr.resample(written.mean(axis=1), 44100, 16000, quality="HQ")
    expected = np.pad(expected, (0, max(0, length - len(expected))))[:length]
    np.testing.assert_array_equal(tiny_pipe.load_audio(str(tmp_path / "stereo.flac")), expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_cuda_device_without_cuda_is_one_error(tiny_folder, monkeypatch_module):
    """device="cuda" where torch has no CUDA: one ValueError naming it (torch raised an AssertionError when the
    pipeline moved the model)."""
    from transformers import pipeline

    for device in ("cuda", torch.device("cuda:1")):
        with pytest.raises(ValueError, match=rf"device='{torch.device(device)}': CUDA is not available \(torch .*\); "
                                             "use device='cpu'"):
            pipeline(model=str(tiny_folder), trust_remote_code=True, device=device)


def test_options(tiny_pipe):
    audio = {"array": tone(2.5, 16000), "sampling_rate": 16000}
    free = tiny_pipe(audio)
    assert free["midi"].__class__.__name__ == "PrettyMIDI"
    assert sorted(n.pitch for i in free["midi"].instruments for n in i.notes) == sorted(n["pitch"] for n in free["notes"])
    short = tiny_pipe(audio, max_new_tokens=8, return_midi=False)
    assert short == tiny_pipe(audio, generate_kwargs={"max_new_tokens": 8}, return_midi=False)
    assert short["notes"] != free["notes"]  # it reaches generate() (64 tokens by the fixture)
    midi_bytes = tiny_pipe(audio, return_midi="bytes")["midi"]
    assert isinstance(midi_bytes, bytes) and midi_bytes.startswith(b"MThd")
    assert "midi" not in tiny_pipe(audio, return_midi=False)
    with pytest.raises(ValueError, match="returned 4 rows for 2 segments.*num_return_sequences must be 1"):
        tiny_pipe(audio, generate_kwargs={"num_beams": 2, "num_return_sequences": 2, "max_new_tokens": 8})


def test_missing_pretty_midi_is_reported_before_decoding(tiny_pipe, monkeypatch):
    """MIDI is asked for by default, and pretty_midi is optional: without it, the pipeline says so before the
    first generate() call, not after transcribing every input; notes alone still work."""
    generate, calls = tiny_pipe.model.generate, []
    monkeypatch.setattr(tiny_pipe.model, "generate", lambda *args, **kwargs: calls.append(1) or generate(*args, **kwargs))
    monkeypatch.setitem(sys.modules, "pretty_midi", None)  # what `import pretty_midi` finds when it is not installed
    audio = {"array": tone(2.5, 16000), "sampling_rate": 16000}
    for return_midi in ({}, {"return_midi": True}, {"return_midi": "bytes"}):
        with pytest.raises(ImportError, match="needs pretty_midi: pip install pretty_midi"):
            tiny_pipe(audio, **return_midi)
    assert calls == []
    assert "midi" not in tiny_pipe(audio, return_midi=False) and calls  # generate() runs when no MIDI is asked


def test_asr_pipeline_conventions(tiny_pipe):
    """transformers' ASR pipeline's input dict key "raw", and generate() asked for a dict output, give the same
    notes as the plain forms."""
    audio = tone(2.5, 16000)
    plain = tiny_pipe({"array": audio, "sampling_rate": 16000}, return_midi=False)
    assert tiny_pipe({"raw": audio, "sampling_rate": 16000}, return_midi=False) == plain
    as_dict = tiny_pipe(audio, sampling_rate=16000, return_midi=False, generate_kwargs={"return_dict_in_generate": True})
    assert as_dict == plain and len(plain["notes"]) > 0


def test_a_calls_generate_kwargs_add_to_the_pipelines(tiny_pipe, monkeypatch):
    """Built with max_new_tokens=64 (the fixture): a call's generate_kwargs or max_new_tokens add to it, or
    override it, instead of replacing the whole dict (the cap was lost, as it is in transformers' ASR pipeline)."""
    generate, seen = tiny_pipe.model.generate, []
    monkeypatch.setattr(tiny_pipe.model, "generate",
                        lambda *args, **kwargs: seen.append({k: kwargs[k] for k in ("max_new_tokens", "num_beams") if k in kwargs})
                        or generate(*args, **kwargs))
    audio = {"array": tone(1.0, 16000), "sampling_rate": 16000}
    tiny_pipe(audio, return_midi=False, generate_kwargs={"num_beams": 1})
    tiny_pipe(audio, return_midi=False, max_new_tokens=8)
    tiny_pipe(audio, return_midi=False)
    assert seen == [{"max_new_tokens": 64, "num_beams": 1}, {"max_new_tokens": 8}, {"max_new_tokens": 64}]


def test_the_speech_recognition_pipeline_points_to_music_transcription(tiny_folder, monkeypatch_module):
    """A Whisper user's first try: transformers' ASR pipeline takes the model as CTC and calls its forward pass
    without decoder ids, which says what to use instead."""
    from transformers import pipeline

    asr = pipeline("automatic-speech-recognition", model=str(tiny_folder), trust_remote_code=True, device="cpu")
    with pytest.raises(ValueError, match=r'call `generate\(\)` or pipeline\("music-transcription", ...\)'):
        asr(tone(2.5, 16000))


def test_programs_keep_the_unfiltered_notes(tiny_pipe):
    """programs= leaves decoding alone and keeps exactly the unfiltered transcription's notes of those programs, and
    its drums (the random model writes drums only, so the model's output is built from known notes)."""
    notes = [(0, False, 60, 100, 0.10, 0.50), (33, False, 40, 100, 0.20, 1.30), (41, False, 67, 100, 0.30, 2.60),
             (0, True, 36, 100, 0.40, 0.41), (33, False, 43, 100, 2.20, 2.90)]
    tokenizer, start_times = tiny_pipe.tokenizer, [0.0, 2.048]
    rows = [[0] + row for row in tokenizer.encode_notes(notes, start_times)]
    width = max(map(len, rows))
    outputs = [{"tokens": torch.tensor([row + [0] * (width - len(row))]), "start_frame": torch.tensor([i * 256]),
                "is_last": i == 1} for i, row in enumerate(rows)]
    free = tiny_pipe.postprocess(outputs)
    assert len({n["program"] for n in free["notes"] if not n["is_drum"]}) == 3  # what the filters choose from
    for spec, kept in [("33", {33}), ("bass", set(range(32, 40))), ([0, 41], {0, 41}), (41, {41}),
                       ([np.int64(0)], {0}), (np.array(41), {41}), ("electric bass (finger), Viola", {33, 41}),
                       ("Drums", set()), ("drums, 33", {33})]:  # the drum notes' instrument name
        _, forward, postprocess = tiny_pipe._sanitize_parameters(programs=spec)
        assert forward == {}
        result = tiny_pipe.postprocess(outputs, **postprocess)
        assert result["notes"] == [n for n in free["notes"] if n["is_drum"] or n["program"] in kept]
        in_midi = sorted((i.is_drum, n.pitch) for i in result["midi"].instruments for n in i.notes)
        assert in_midi == sorted((n["is_drum"], n["pitch"]) for n in result["notes"])


def test_saved_model_and_processor_make_a_working_folder(tiny_folder, tmp_path, monkeypatch_module):
    """What a user saves (AutoModel + AutoProcessor, e.g. after fine-tuning) loads again with every Auto class and the
    pipeline that its config.json names; and a model in memory (here cast to bfloat16) runs in that pipeline."""
    from transformers import AutoModel, AutoProcessor, AutoTokenizer, pipeline

    model = AutoModel.from_pretrained(str(tiny_folder), trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(str(tiny_folder), trust_remote_code=True)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    processor.save_pretrained(saved)
    assert (saved / "pipeline_mt3.py").is_file() and (saved / "notes_mt3.py").is_file()
    assert type(AutoTokenizer.from_pretrained(str(saved), trust_remote_code=True)).__name__ == "MT3Tokenizer"
    audio = {"array": tone(2.5, 16000), "sampling_rate": 16000}
    kwargs = {"generate_kwargs": {"max_new_tokens": 16}, "return_midi": False}
    want = pipeline("music-transcription", model=str(tiny_folder), trust_remote_code=True, device="cpu")(audio, **kwargs)
    got = pipeline("music-transcription", model=str(saved), trust_remote_code=True, device="cpu")(audio, **kwargs)
    assert got == want
    assert model.transcription_pipeline()(audio, **kwargs) == want
    # bfloat16 on CPU through GenerationMixin (use_cache=False): oneDNN's bf16 linear needs instructions CI may lack
    half = model.to(torch.bfloat16).transcription_pipeline(processor, generate_kwargs={"use_cache": False, "max_new_tokens": 8})
    assert half.model.dtype == torch.bfloat16 and isinstance(half(audio, return_midi=False)["notes"], list)
    with pytest.raises(ValueError, match="pass `processor=`"):
        built = copy.deepcopy(model.config)
        built.name_or_path = ""  # as a model built from a config, not loaded: no processor to find
        type(model)(built).transcription_pipeline()

    # the same from the package's own classes (no remote code at load): the saved folder still holds all its code
    from convert_mt3.mt3.modeling_mt3 import MT3ForConditionalGeneration
    from convert_mt3.mt3.processing_mt3 import MT3Processor

    local = tmp_path / "local"
    MT3ForConditionalGeneration.from_pretrained(tiny_folder).save_pretrained(local)
    MT3Processor.from_pretrained(tiny_folder).save_pretrained(local)
    reloaded = pipeline("music-transcription", model=str(local), trust_remote_code=True, device="cpu")(audio, **kwargs)
    assert reloaded == want

    # a folder with the model only: the processor comes as `processor=`, or as its two parts, or the error says so
    model_only = tmp_path / "model_only"
    AutoModel.from_pretrained(str(tiny_folder), trust_remote_code=True).save_pretrained(model_only)
    assert not (model_only / "tokenizer_config.json").exists()
    for parts in ({"processor": processor},
                  {"tokenizer": processor.tokenizer, "feature_extractor": processor.feature_extractor}):
        pipe = pipeline("music-transcription", model=str(model_only), trust_remote_code=True, device="cpu", **parts)
        assert pipe(audio, **kwargs) == want
    with pytest.raises(ValueError, match="needs MT3's tokenizer and feature extractor.*pass processor="):
        pipeline("music-transcription", model=str(model_only), trust_remote_code=True, device="cpu")


def test_decoded_datasets_audio_row(tiny_pipe):
    """A `datasets` Audio column decodes to torchcodec AudioDecoders (get_all_samples() -> data (channels, samples),
    sample_rate): mixed to mono like a file. Faked here (torchcodec is not a dependency)."""
    stereo = torch.from_numpy(np.stack([tone(2.5, 16000), 0.5 * tone(2.5, 16000)]))

    class Decoder:
        def get_all_samples(self):
            return SimpleNamespace(data=stereo, sample_rate=16000)

    kwargs = {"return_midi": False, "generate_kwargs": {"max_new_tokens": 16}}
    want = tiny_pipe({"array": stereo.mean(0).numpy(), "sampling_rate": 16000}, **kwargs)
    assert tiny_pipe(Decoder(), **kwargs) == want
    assert tiny_pipe({"array": stereo.mean(0).tolist(), "sampling_rate": 16000}, **kwargs) == want  # samples as a list


def test_dtype_argument(tiny_folder, monkeypatch_module):
    """torch_dtype= reaches the model. Run through GenerationMixin (use_cache=False leaves the fast path, whose
    bfloat16 linear needs AVX-512 / AVX-NE-CONVERT on CPU, which CI machines may lack)."""
    from transformers import pipeline

    pipe = pipeline("music-transcription", model=str(tiny_folder), trust_remote_code=True, device="cpu", torch_dtype=torch.bfloat16)
    assert pipe.model.dtype == torch.bfloat16
    audio, settings = tone(1.0, 16000), {"use_cache": False, "max_new_tokens": 64}
    result = pipe({"array": audio, "sampling_rate": 16000}, generate_kwargs=settings)
    # the notes of the same bfloat16 model called directly
    inputs = pipe.feature_extractor(audio, sampling_rate=16000, return_tensors="pt")
    ids = pipe.model.generate(input_features=inputs["input_features"].to(torch.bfloat16), **settings)
    notes = pipe.tokenizer.batch_decode(ids, inputs, return_midi=False)["notes"]
    assert notes and as_tuples(result["notes"]) == [tuple(note) for note in notes]


def test_a_generator_of_inputs_streams(tiny_pipe):
    """A generator is read as results are asked for, on every transformers version (before 5.14 the base pipeline
    made a list of it first); an empty one gives no results."""
    read = []

    def inputs():
        for i in range(2):
            read.append(i)
            yield {"array": tone(1.0, 16000), "sampling_rate": 16000}

    results = tiny_pipe(inputs(), return_midi=False, max_new_tokens=8)
    assert read == []  # nothing read yet
    assert len(list(results)) == 2 and read == [0, 1]
    assert list(tiny_pipe(x for x in [])) == []


def test_long_audio_is_cut_lazily_and_exactly(tiny_pipe):
    """preprocess yields segments a chunk at a time; features and start frames equal the whole-clip extractor's."""
    from transformers.pipelines.base import ChunkPipeline

    assert isinstance(tiny_pipe, ChunkPipeline)
    extractor = tiny_pipe.feature_extractor
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(41 * 32768 + 5000)).astype(np.float32)  # 41 segments + a partial one
    whole = extractor(audio, sampling_rate=16000, return_tensors="pt")
    items = list(tiny_pipe.preprocess({"array": audio, "sampling_rate": 16000}))
    assert len(items) == len(whole["input_features"]) == 42
    assert [i["is_last"] for i in items] == [False] * 41 + [True]
    assert torch.equal(torch.cat([i["input_features"] for i in items]), whole["input_features"])
    starts = [int(i["start_frame"][0]) / extractor.frames_per_second for i in items]
    assert starts == whole["segment_start_times"].tolist()


def test_unscaled_long_audio_is_warned_once(tiny_pipe, caplog):
    """Integer-sized samples over several 16-segment chunks: one warning for the input (it was one per chunk,
    ~110 for an hour)."""
    audio = (1000.0 * tone(100.0, 16000)).astype(np.float32)  # 49 segments: 4 chunks
    with caplog.at_level("WARNING"):
        assert len(list(tiny_pipe.preprocess({"array": audio, "sampling_rate": 16000}))) == 49
    assert len([r for r in caplog.records if "peaks at" in r.getMessage()]) == 1


@pytest.mark.parametrize(
    "inputs, kwargs, message",
    [
        ("missing.wav", {}, "missing.wav: no such file"),
        ("broken.ogg", {}, "broken.ogg: cannot read audio"),
        (np.zeros((100, 2), np.float32), {"sampling_rate": 16000}, "found shape (100, 2) (mix the channels to mono first, e.g. audio.mean(axis=1); several clips go in a list)"),
        ((np.zeros(100, np.float32),) * 2, {"sampling_rate": 16000}, "found a tuple of 2 sequences (several clips go in a list)"),
        (np.zeros((2, 100), np.float32), {"sampling_rate": 16000}, "audio.mean(axis=0)"),
        (np.array(0.5, np.float32), {"sampling_rate": 16000}, "found shape ()."),  # 0-d: no axis to suggest
        (np.zeros(100, np.float32), {}, "sampling_rate"),
        (np.zeros(100, np.float32), {"sampling_rate": 0}, "positive whole `sampling_rate`"),
        (np.zeros(100, np.float32), {"sampling_rate": "44100"}, "found '44100'"),
        (np.zeros(100, np.float32), {"sampling_rate": 44100.5}, "found 44100.5"),
        (np.zeros(100, np.float32), {"sampling_rate": float("inf")}, "found inf"),
        (np.zeros(100, np.int16), {"sampling_rate": 16000}, "floating-point samples"),
        (5, {}, "found int"),
        (np.zeros(100, np.float32), {"sampling_rate": 16000, "max_new_tokens": 4, "generate_kwargs": {"max_new_tokens": 4}},
         "both as an argument"),
        ({"foo": 1}, {}, "found keys ['foo']"),
        ({"array": np.zeros(100, np.float32), "sampling_rate": 16000}, {"sampling_rate": 44100},
         "sampling_rate=44100 differs from the audio dict's 16000: pass only one"),
        (np.zeros(100, np.float32), {"sampling_rate": 16000, "programs": "7-x"}, "programs '7-x'"),
        (np.zeros(100, np.float32), {"sampling_rate": 16000, "programs": ""}, "at least one GM program"),
        (np.zeros(100, np.float32), {"sampling_rate": 16000, "programs": [1.5]}, "expected ints or strings"),
        (np.zeros(100, np.float32), {"sampling_rate": 16000, "programs": "7-3"}, "found '7-3'"),
        (np.zeros(100, np.float32), {"sampling_rate": 16000, "programs": "3-"}, "found '3-'"),
        (np.zeros(100, np.float32), {"sampling_rate": 16000, "return_midi": "yes"}, "return_midi='yes'"),
    ],
)
def test_bad_inputs(tiny_pipe, tmp_path, monkeypatch, inputs, kwargs, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.ogg").write_bytes(b"OggS not really")
    with pytest.raises(ValueError) as error:
        tiny_pipe(inputs, **kwargs)
    assert message in str(error.value)


@pytest.mark.skipif(sys.platform == "win32", reason="file names as bytes")
def test_files_are_opened_by_python(tiny_pipe, tmp_path, monkeypatch):
    """A file name that is no UTF-8 (Latin-1 "café.wav" on Linux) is read (libsndfile takes only UTF-8 names);
    one that is no audio says libsndfile's reason alone (not the file object it was given); a file that cannot be
    opened says the OS's reason (libsndfile said "System error")."""
    samples = (0.3 * np.sin(np.arange(8000) / 7)).astype(np.float32)
    good = tmp_path / "good.wav"
    soundfile.write(good, samples, 16000)
    latin = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9.wav")
    shutil.copy(good, latin)
    np.testing.assert_array_equal(tiny_pipe.load_audio(latin), tiny_pipe.load_audio(str(good)))
    (tmp_path / "notes.wav").write_text("not audio")
    with pytest.raises(ValueError, match=r"notes.wav: cannot read audio \(Format not recognised.\)$"):
        tiny_pipe.load_audio(str(tmp_path / "notes.wav"))

    def refused(file, mode="r", *args, **kwargs):
        raise PermissionError(13, "Permission denied", file)

    monkeypatch.setattr("builtins.open", refused)  # as a file of mode 000 is for a user who is not root
    with pytest.raises(ValueError, match=r"good.wav: cannot read audio \(Permission denied\)$"):
        tiny_pipe.load_audio(str(good))


def test_features_on_the_models_cuda_device(tiny_pipe, monkeypatch):
    """A CUDA model gets its frames from the extractor's torch path on its device (numpy on one core would take
    longer than the GPU's decode); CPU models, and DataLoader workers (which must not use CUDA), keep numpy.
    The device is faked (no GPU here): the wiring is checked, the torch path itself runs on CPU."""
    assert tiny_pipe._feature_device() is None  # a CPU model
    monkeypatch.setattr(tiny_pipe, "device", torch.device("cuda", 0))
    assert tiny_pipe._feature_device() == "cuda:0"
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    assert tiny_pipe._feature_device() is None
    monkeypatch.undo()

    extractor_class = type(tiny_pipe.feature_extractor)

    original, devices = extractor_class._extract_clip, []

    def recording(self, audio, device, *args, **kwargs):
        devices.append(device)
        return original(self, audio, device, *args, **kwargs)

    monkeypatch.setattr(extractor_class, "_extract_clip", recording)
    monkeypatch.setattr(type(tiny_pipe), "_feature_device", lambda self: "cpu")  # stands for the CUDA device
    result = tiny_pipe({"array": tone(40.0, 16000), "sampling_rate": 16000}, return_midi=False)
    assert devices == ["cpu", "cpu"]  # 20 segments: two chunks of at most 16, both through the torch path
    assert isinstance(result["notes"], list)
