"""mt3-transcribe: many files -> MIDI / JSON / CSV, resume, one error line per bad file, arguments refused early."""

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pretty_midi
import pytest
import soundfile
import torch

from convert_mt3 import transcribe
from convert_mt3.transcribe import main

from test_pipeline import GOLDEN_CASES, golden_notes, write_golden_audio

ROOT = Path(__file__).parents[1]


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`mt3-transcribe ARGS` as its own process (this checkout's package), offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(cwd / "modules"), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", "import sys; from convert_mt3.transcribe import main; sys.exit(main())", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)


def read_csv_notes(path: Path) -> list[tuple]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert rows == [] or list(rows[0]) == ["program", "instrument", "is_drum", "pitch", "velocity", "start", "end"]
    return [
        (int(r["program"]), bool(int(r["is_drum"])), int(r["pitch"]), int(r["velocity"]), float(r["start"]), float(r["end"]))
        for r in rows
    ]


def read_json_notes(path: Path) -> list[tuple]:
    notes = json.loads(path.read_text())["notes"]
    for note in notes:
        expected = "Drums" if note["is_drum"] else pretty_midi.program_to_instrument_name(note["program"])
        assert note["instrument"] == expected
    return [(n["program"], n["is_drum"], n["pitch"], n["velocity"], n["start"], n["end"]) for n in notes]


def test_console_script_declared():
    assert 'mt3-transcribe = "convert_mt3.transcribe:main"' in (ROOT / "pyproject.toml").read_text()


def test_folder_of_golden_audio_with_a_broken_file(shared, real_folder, tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    write_golden_audio(shared, audio)
    (audio / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really")
    out = tmp_path / "out"
    args = [str(real_folder), str(audio), "-o", str(out), "--format", "midi,json,csv", "--batch-size", "16"]
    first = run_cli(args, tmp_path)
    errors = [line for line in first.stderr.splitlines() if line.startswith("error:")]
    print(first.stderr.strip().splitlines()[-1])
    assert first.returncode == 1 and "Traceback" not in first.stderr
    assert len(errors) == 1 and "broken.wav: cannot read audio" in errors[0]
    assert "3 transcribed, 0 skipped (outputs exist), 1 failed" in first.stderr
    for name in GOLDEN_CASES:
        golden = golden_notes(shared / "golden" / name)
        assert read_json_notes(out / f"{name}.json") == golden
        assert read_csv_notes(out / f"{name}.csv") == golden
        print(f"{name}: {len(golden)}/{len(golden)} golden notes in the JSON and the CSV")
        assert (out / f"{name}.mid").read_bytes() == (shared / "golden" / name / "transcription.mid").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.{s}" for n in GOLDEN_CASES for s in ("mid", "json", "csv"))

    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    second = run_cli(args, tmp_path)
    assert second.returncode == 1 and "0 transcribed, 3 skipped (outputs exist), 1 failed" in second.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_many_files_on_tiny_model(tiny_folder, tmp_path, monkeypatch, capsys):
    """Folders (recursive, sub-folders kept) and globs expanded; a missing file and an empty glob one line each;
    --instruments reaches the pipeline; a file is skipped only when all its outputs exist."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    loaded = []  # the tiny random model writes drums only, so the notes cannot show the filter: its pipeline does
    load_pipeline = transcribe.load_pipeline
    monkeypatch.setattr(transcribe, "load_pipeline", lambda *args: loaded.append(load_pipeline(*args)) or loaded[-1])
    t = np.arange(40000) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    (tmp_path / "set" / "sub").mkdir(parents=True)
    soundfile.write(tmp_path / "set" / "one.wav", tone, 16000)
    soundfile.write(tmp_path / "set" / "sub" / "two.flac", tone[::-1].copy(), 16000)
    soundfile.write(tmp_path / "three.wav", tone, 16000)
    (tmp_path / "set" / "notes.txt").write_text("not audio, ignored")
    (tmp_path / "three.mid").write_bytes(b"MThd")  # not audio: the glob leaves it (it would claim out/three.*)
    code = main([str(tiny_folder), "set", "thr*", "none*.wav", "missing.wav", "-o", "out", "--format", "json,csv",
                 "--instruments", "strings", "--batch-size", "3", "--quiet"])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 1
    assert lines[0] == "error: none*.wav: no audio file matches this pattern"
    assert [line for line in lines[:-1] if "missing.wav" in line] == ["error: missing.wav: no such file"]
    assert "3 transcribed, 0 skipped (outputs exist), 2 failed" in lines[-1]
    written = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert written == ["one.csv", "one.json", "sub/two.csv", "sub/two.json", "three.csv", "three.json"]
    assert [pipe._postprocess_params["programs"] for pipe in loaded] == [set(range(40, 48))]  # GM strings
    assert "2 failed (none*.wav, missing.wav)" in lines[-1]
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "out").rglob("*.json")} == {0o666 & ~umask}
    (tmp_path / "out" / "three.csv").unlink()  # half done: transcribed again
    assert main([str(tiny_folder), "set", "three.wav", "-o", "out", "--format", "json,csv", "--quiet"]) == 0
    assert (tmp_path / "out" / "three.csv").exists()
    assert main([str(tiny_folder), "three.wav", "-o", "half", "--format", "json", "--dtype", "bfloat16", "--quiet"]) == 0
    assert loaded[-1].model.dtype == torch.bfloat16 and (tmp_path / "half" / "three.json").exists()


def test_outputs_already_there_or_unwritable(tiny_folder, tmp_path, monkeypatch, capsys):
    """Without --overwrite an output file already there is never replaced (the missing ones are written); an output
    that cannot be written is one error line naming the input and the output, and the other files carry on; with
    --quiet, only error lines (the folder's own code logs outside transformers' logger); inputs that are no files
    fail before the model is loaded, and leave no OUT_DIR."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    tone = (0.3 * np.sin(np.arange(20000) / 10)).astype(np.float32)
    for name in ("a", "b"):
        soundfile.write(tmp_path / f"{name}.wav", tone, 16000)
    (tmp_path / "out" / "b.json").mkdir(parents=True)  # a folder where b's output goes
    (tmp_path / "out" / "a.mid").write_text("MY OWN FILE")
    assert main([str(tiny_folder), "a.wav", "b.wav", "-o", "out", "--format", "midi,json", "--quiet"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("error: b.wav: cannot write out/b.json (Is a directory)"), lines
    assert lines[1:] == ["mt3-transcribe: 1 transcribed, 0 skipped (outputs exist), 1 failed (b.wav); outputs in out"]
    assert (tmp_path / "out" / "a.mid").read_text() == "MY OWN FILE" and (tmp_path / "out" / "a.json").is_file()
    assert (tmp_path / "out" / "b.mid").is_file() and sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "a.json", "a.mid", "b.json", "b.mid"]  # no temporary file left
    folder_logger = logging.getLogger(f"transformers_modules.{tiny_folder.name}.tokenization_mt3")
    try:
        assert not folder_logger.isEnabledFor(logging.WARNING)  # e.g. "segments end without EOS", under --quiet
    finally:
        logging.getLogger("transformers_modules").setLevel(logging.NOTSET)

    monkeypatch.setattr("convert_mt3.transcribe.load_pipeline", lambda *args: pytest.fail("the model was loaded"))
    assert main([str(tiny_folder), "missing.wav", "-o", "new", "--quiet"]) == 1
    assert capsys.readouterr().err.splitlines() == [  # the summary names no folder, as none was made
        "error: missing.wav: no such file", "mt3-transcribe: 0 transcribed, 0 skipped (outputs exist), 1 failed (missing.wav)"]
    assert not (tmp_path / "new").exists()


def test_a_file_with_nan_samples_fails_alone(tiny_folder, tmp_path, monkeypatch, capsys):
    """NaN samples in one float WAV: one error line naming it, the other files transcribed."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    tone = (0.3 * np.sin(np.arange(20000) / 10)).astype(np.float32)
    soundfile.write(tmp_path / "good.wav", tone, 16000, subtype="FLOAT")
    bad = tone.copy()
    bad[100] = np.nan
    name = "nan\n\x1b[31m.wav"  # a name with a newline and a terminal escape: shown escaped, on one line
    soundfile.write(tmp_path / name, bad, 16000, subtype="FLOAT")
    assert main([str(tiny_folder), name, "good.wav", "-o", "out", "--format", "json", "--quiet"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "error: nan\\n\\x1b[31m.wav: the audio holds NaN or infinite samples"
    assert "1 transcribed, 0 skipped (outputs exist), 1 failed (nan\\n\\x1b[31m.wav)" in lines[-1]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["good.json"]


def test_the_model_out_of_memory_is_one_line(tiny_folder, tmp_path, monkeypatch, capsys):
    """generate() fails (CUDA out of memory on the second file): one line, the first file's output kept (it was a
    traceback)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    tone = (0.3 * np.sin(np.arange(16000) / 10)).astype(np.float32)  # 1 s: one segment, one generate() call
    for name in ("a", "b"):
        soundfile.write(tmp_path / f"{name}.wav", tone, 16000)
    load_pipeline = transcribe.load_pipeline

    def second_call_fails(*args):
        pipe = load_pipeline(*args)
        generate, calls = pipe.model.generate, []

        def generating(*inputs, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nGPU 0 has ...")
            return generate(*inputs, **kwargs)

        pipe.model.generate = generating
        return pipe

    monkeypatch.setattr(transcribe, "load_pipeline", second_call_fails)
    assert main([str(tiny_folder), "a.wav", "b.wav", "-o", "out", "--format", "json", "--batch-size", "1",
                 "--quiet"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: CUDA out of memory. Tried to allocate 2.00 GiB; the outputs written so far are complete, a rerun "
        "skips them (a smaller --batch-size needs less memory)"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.json"]


def test_files_are_read_as_the_pipeline_goes(tiny_folder, tmp_path, monkeypatch, capsys):
    """A file is read once the ones before it are written, on every transformers version (5.10-5.13 turned a
    generator input into a list: all files read first, nothing written before the last); no file to read at all is
    one error line, not the pipeline's IndexError."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    tone = (0.3 * np.sin(np.arange(16000) / 10)).astype(np.float32)  # 1 s: one segment
    names = ["a", "b", "c"]
    for name in names:
        soundfile.write(tmp_path / f"{name}.wav", tone, 16000)
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really")
    written_before = []  # per file read: the outputs already written
    load_pipeline = transcribe.load_pipeline

    def recording(*args):
        pipe = load_pipeline(*args)
        load_audio = pipe.load_audio

        def reading(inputs, *rest):
            if isinstance(inputs, str):  # a path, read by mt3-transcribe (preprocess passes the samples on again)
                written_before.append(sorted(p.stem for p in (tmp_path / "out").glob("*.json")))
            return load_audio(inputs, *rest)

        pipe.load_audio = reading
        return pipe

    monkeypatch.setattr(transcribe, "load_pipeline", recording)
    assert main([str(tiny_folder), *(f"{name}.wav" for name in names), "-o", "out", "--format", "json",
                 "--batch-size", "1", "--quiet"]) == 0
    assert written_before == [[], ["a"], ["a", "b"]]
    assert main([str(tiny_folder), "broken.wav", "-o", "out", "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: broken.wav: cannot read audio") and len(err) == 2, err


def test_a_folder_of_another_model_and_ctrl_c(tmp_path, monkeypatch, capsys):
    """A model folder without the MT3 pipeline: one line, and no output folder left behind; Ctrl-C: one line, 130."""
    from transformers import T5Config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    T5Config(num_layers=1, d_model=8, d_ff=8, num_heads=1, d_kv=8, vocab_size=16).save_pretrained(tmp_path / "t5")
    soundfile.write(tmp_path / "a.wav", np.zeros(1000, np.float32), 16000)
    assert main([str(tmp_path / "t5"), "a.wav", "-o", "out", "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 't5'}: cannot load the MT3 pipeline"), err
    assert not (tmp_path / "out").exists()

    def interrupted(args, interrupts):
        raise KeyboardInterrupt

    monkeypatch.setattr("convert_mt3.transcribe.run", interrupted)
    assert main([str(tmp_path / "t5"), "a.wav", "-o", "out"]) == 130
    assert capsys.readouterr().err == "interrupted; nothing written\n"  # no folder out: none named
    (tmp_path / "out").mkdir()
    assert main([str(tmp_path / "t5"), "a.wav", "-o", "out"]) == 130
    assert capsys.readouterr().err == "interrupted; the outputs written so far are complete, in out\n"


@pytest.mark.parametrize("signum, status, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_a_signal_while_torch_imports_is_one_line(tiny_folder, tmp_path, signum, status, word):
    """Ctrl-C or SIGTERM while torch and transformers import: it waits for the imports' end (raised inside them it
    could abort the process or surface as another error), then one line, nothing written."""
    soundfile.write(tmp_path / "a.wav", np.zeros(16000, np.float32), 16000)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": str(ROOT)}
    code = "import sys; from convert_mt3.transcribe import main; print('ready', flush=True); sys.exit(main())"
    command = [sys.executable, "-c", code, str(tiny_folder), "a.wav", "-o", "out", "--quiet"]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "ready\n"
    time.sleep(0.3)  # main() has set its handlers; torch's import takes longer than this
    process.send_signal(signum)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == status, stderr
    assert stderr.strip().splitlines() == [f"{word}; nothing written"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav"]


def test_sigterm_leaves_whole_outputs_only(tiny_folder, tmp_path):
    """`kill` (SIGTERM) while files are written: status 143, one line, the outputs written so far whole and no
    temporary file (the default action killed the process where it stood)."""
    tone = (0.3 * np.sin(np.arange(16000) / 10)).astype(np.float32)
    for index in range(40):
        soundfile.write(tmp_path / f"{index:02d}.wav", tone, 16000)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", "import sys; from convert_mt3.transcribe import main; sys.exit(main())",
               str(tiny_folder), ".", "-o", "out", "--format", "midi,json", "--batch-size", "1", "--quiet"]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not list((tmp_path / "out").glob("*.json")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines() == ["terminated; the outputs written so far are complete, in out"]
    outputs = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert outputs and all(not name.startswith(".") for name in outputs), outputs
    for name in outputs:
        path = tmp_path / "out" / name
        if name.endswith(".json"):
            json.loads(path.read_text())
        else:
            pretty_midi.PrettyMIDI(str(path))
    assert len(outputs) < 80  # stopped before the end


@pytest.mark.parametrize(
    "args, message",
    [
        (["-o", "afile"], "-o afile: exists and is not a directory"),
        (["-o", "nowhere/out"], "-o nowhere/out: parent folder nowhere does not exist"),
        (["-o", "/proc/out"], "-o /proc/out: cannot be written"),  # not after the model loaded
        (["-o", "out", "--format", "midi,wav"], "--format 'midi,wav': expected"),
        (["-o", "out", "--programs", "7-x"], "--programs '7-x': expected GM programs"),
        (["-o", "out", "--instruments", "kazoo"], "--instruments 'kazoo': expected GM programs"),
    ]
    + ([] if torch.cuda.is_available() else [(["-o", "out", "--device", "cuda"], "--device cuda: not available")]),
)
def test_bad_arguments_refused_before_model_and_audio(tmp_path, monkeypatch, capsys, args, message):
    """A bad option: one line, status 2 (as argparse's own errors; 1 is a file or the model failing)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    assert main(["no-such-model", "a.wav", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("model", "message"), [
    ("./missing", "MODEL ./missing: no such folder"),
    ("afile", "MODEL afile: is not a folder"),  # made absolute below
    ("~/missing-mt3", "MODEL ~/missing-mt3: no such folder"),  # transformers does not expand ~, nor is this done here
    ("a/b/c", "MODEL a/b/c: no such folder"),
    ("audio", "MODEL audio: no config.json in this folder, so no converted MT3 model"),  # else all skipped: status 0
])
def test_a_model_that_is_no_folder_nor_repo_id_is_named(tmp_path, monkeypatch, capsys, model, message):
    """A MODEL that cannot be a Hub repo id must be a folder: refused in words before any loading (transformers would
    answer with its repo-id naming rules)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    (tmp_path / "audio").mkdir()
    if model == "afile":
        model, message = str(tmp_path / "afile"), f"MODEL {tmp_path / 'afile'}: is not a folder"
    monkeypatch.setattr("convert_mt3.transcribe.load_pipeline", lambda *a: pytest.fail("loaded a model"))
    assert main([model, "a.wav", "-o", "out"]) == 1
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_a_missing_folder_tried_as_repo_id_is_named(tmp_path, monkeypatch, capsys):
    """"nowhere/mt4" may be a Hub repo id, so transformers tries the Hub (offline here) and speaks of the Hub only:
    the error says that no such folder exists either."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read at import: no tries to connect
    monkeypatch.chdir(tmp_path)
    soundfile.write(tmp_path / "a.wav", np.zeros(1600, np.float32), 16000)
    assert main(["nowhere/mt4", "a.wav", "-o", "out", "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: MODEL nowhere/mt4: no such folder, nor a loadable Hub repo id ("), err


def test_subprocess_error_has_no_traceback(tmp_path):
    result = run_cli(["no-such-model", "a.wav", "-o", str(tmp_path / "x" / "y")], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [[], ["m", "a.wav", "-o", "out", "--batch-size", "0"], ["m", "a.wav", "-o", "o", "--dtype", "x"]])
def test_usage_errors_are_one_line(args, capsys):
    """argparse's own errors (missing arguments, a bad choice) too: one line naming what is wrong, status 2."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and err[0].endswith("(see mt3-transcribe --help)"), err


def test_a_file_whose_outputs_are_taken_is_reported_once(tmp_path):
    """`a.wav 'mixed/*.wav' mixed`: mixed/a.wav comes twice (the glob, the folder), and both would write out/a.*,
    which a.wav claimed first: one error for it, not one per mention."""
    files = [(tmp_path / "a.wav", Path("a")), (tmp_path / "mixed" / "a.wav", Path("a")),
             (tmp_path / "mixed" / "a.wav", Path("a")), (tmp_path / "a.wav", Path("a"))]
    jobs, errors = transcribe.plan_jobs(files, Path("out"), ["midi"])
    assert [job.source for job in jobs] == [tmp_path / "a.wav"]
    assert errors == [(str(tmp_path / "mixed" / "a.wav"), f"its outputs {Path('out') / 'a'}.* are already those of "
                                                          f"{(tmp_path / 'a.wav').resolve()}")]


def test_the_same_file_under_two_names_is_transcribed_once(tmp_path):
    """`src src/sub`: src/sub/a.wav is `sub/a` through src and `a` through src/sub: one job, under its first name."""
    source = tmp_path / "src" / "sub" / "a.wav"
    jobs, errors = transcribe.plan_jobs([(source, Path("sub/a")), (source, Path("a"))], Path("out"), ["json"])
    assert [(job.source, job.outputs["json"]) for job in jobs] == [(source, Path("out") / "sub/a.json")] and errors == []


def test_paths_that_cannot_be_looked_at_fail_alone(tmp_path, monkeypatch):
    """A name too long for the OS, and a folder inside a folder input that cannot be read: an error line each,
    naming them with the OS's reason; the other inputs are expanded (these raised OSError for the whole run, or
    were passed over in silence)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "set" / "locked").mkdir(parents=True)
    for name in ("a.wav", "set/b.wav", "set/locked/c.wav"):
        soundfile.write(tmp_path / name, np.zeros(100, np.float32), 16000)
    scandir = os.scandir

    def refusing(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)  # as a folder of mode 000 is for a user who is not root
    long = "x" * 300 + ".wav"
    files, errors = transcribe.expand_inputs([long, "a.wav", "set"])
    assert files == [(Path("a.wav"), Path("a")), (Path("set/b.wav"), Path("b"))]
    assert errors == [(long, "File name too long"), (os.path.join("set", "locked"), "cannot be read (Permission denied)")]


def test_outputs_with_long_names_are_written(tmp_path):
    """The temporary file has a short name of its own: an output whose name is near the OS's limit (255 bytes) is
    written (a temporary name made from it was too long)."""
    path = tmp_path / ("y" * 250 + ".json")
    transcribe.write_atomic(path, lambda temporary: Path(temporary).write_text("{}"))
    assert path.read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
