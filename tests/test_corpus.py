"""examples/transcribe_corpus.py: datasets + accelerate recipe; 2 CPU processes give what one process gives."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile
import torch

from conftest import run_isolated_script

RECIPE = Path(__file__).parents[1] / "examples" / "transcribe_corpus.py"


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(cwd / "modules"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)


def test_two_processes_equal_one(tiny_folder, tmp_path):
    audio = tmp_path / "corpus"
    (audio / "sub").mkdir(parents=True)
    for i, (name, rate) in enumerate([("a.wav", 16000), ("b.flac", 22050), ("sub/c.wav", 16000), ("d.wav", 16000), ("e.ogg", 16000)]):
        samples = 0.3 * np.sin(2 * np.pi * (220 + 110 * i) * np.arange(int(1.5 * rate)) / rate)
        soundfile.write(audio / name, samples.astype(np.float32), rate)
    (audio / "f.ogg").write_bytes(b"OggS not really")  # in the second process's share
    args = [str(RECIPE), str(tiny_folder), str(audio)]
    single = run([sys.executable, *args, str(tmp_path / "one.jsonl"), "--files-per-map-batch", "2"], tmp_path)
    assert single.returncode == 1, single.stderr[-3000:]
    # torchrun, as `accelerate launch --multi_gpu` does for GPUs (accelerate's own multi-CPU launch needs mpirun);
    # without CUDA the recipe makes them CPU processes itself (accelerate would set up one process in each)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cpu = ["--cpu"] if torch.cuda.is_available() else []
    double = run([*launch, *args, str(tmp_path / "two.jsonl"), "--files-per-map-batch", "2", *cpu], tmp_path)
    # the main process's status counts the other's failure (torchrun reports the main process as failed)
    assert double.returncode == 1, double.stderr[-3000:]
    assert "process 0/2: 3 files" in double.stdout and "process 1/2: 3 files, 1 not read" in double.stdout
    assert "all 2 processes: 6 files, 1 not read (see their error in" in double.stdout, double.stdout
    one = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    print(f"{len(one)} files, {sum(len(r['notes'] or []) for r in one)} notes; 2 processes identical: {one == two}")
    assert [Path(r["path"]).name for r in one] == ["a.wav", "b.flac", "d.wav", "e.ogg", "f.ogg", "c.wav"]
    assert sum(len(r["notes"] or []) for r in one) > 0 and one[4]["notes"] is None
    assert two == one
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # shares joined and removed


def test_unreadable_files_are_reported_and_bad_paths_refused(tiny_folder, tmp_path):
    """A file that cannot be read gets its error in its line and the others are transcribed; a bad OUT, AUDIO_DIR
    or MODEL is refused in one line before any work, writing nothing."""
    audio = tmp_path / "corpus"
    audio.mkdir()
    for name in ("a.wav", "c.aiff"):  # any suffix of a format libsndfile reads; a folder named like one is no file
        soundfile.write(audio / name, (0.3 * np.sin(np.arange(24000) / 10)).astype(np.float32), 16000)
    (audio / "b.ogg").write_bytes(b"OggS not really")
    (audio / "folder.wav").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "taken.jsonl").write_text("a file of the user's\n")
    refused = [
        ([str(tiny_folder), str(audio), "corpus"], "OUT corpus: is a directory"),
        ([str(tiny_folder), str(audio), "taken.jsonl"], "OUT taken.jsonl: exists; --overwrite replaces it"),
        ([str(tiny_folder), str(audio), "nowhere/x.jsonl"], "OUT nowhere/x.jsonl: folder"),
        ([str(tiny_folder), "missing", "x.jsonl"], "AUDIO_DIR missing: no such folder"),
        ([str(tiny_folder), "empty", "x.jsonl"], "AUDIO_DIR empty: no .aif, .aifc, .aiff, .au, .caf, .flac, .mp3, .oga, .ogg, .opus, .w64, .wav files"),
        ([str(tmp_path / "no-model"), str(audio), "x.jsonl"], "no-model: no such folder"),
        ([str(tiny_folder), str(audio), str(audio / "a.wav"), "--overwrite"], "a.wav: is one of AUDIO_DIR's audio files, which it would replace"),
        ([str(tiny_folder), str(audio), "x.jsonl", "--files-per-map-batch", "0"], "--files-per-map-batch must be at least 1"),
        ([str(tmp_path / "bert"), str(audio), "x.jsonl"], "bert: not an MT3 model"),
    ]
    (tmp_path / "bert").mkdir()  # a model of another kind: transformers has no music-transcription task for it
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    *results, result = run_isolated_script(  # the refusals first: their stderr is checked
        RECIPE, [*(args for args, _ in refused), [str(tiny_folder), str(audio), "out.jsonl", "--files-per-map-batch", "3"]],
        tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]  # the results written, the failure in the status
    assert "process 0/1: 3 files, 1 not read (see their error in out.jsonl)" in result.stdout, result.stdout
    rows = {Path(r["path"]).name: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert sorted(rows) == ["a.wav", "b.ogg", "c.aiff"]
    assert rows["b.ogg"]["notes"] is None and ": cannot read audio" in rows["b.ogg"]["error"]
    assert all(isinstance(rows[name]["notes"], list) and rows[name]["error"] is None for name in ("a.wav", "c.aiff"))
    for (args, message), result in zip(refused, results, strict=True):
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (
            args, result.stderr[-2000:])
    assert not (tmp_path / "x.jsonl").exists()
    assert (tmp_path / "taken.jsonl").read_text() == "a file of the user's\n"


def test_an_interrupted_run_is_resumed(tiny_folder, tmp_path):
    """The shares' files an interrupted run left: the same command again keeps their transcribed files (not done
    again), tries a failed one again, takes no line that was cut short, writes every file's row in order and removes
    the shares' files."""
    audio = tmp_path / "corpus"
    audio.mkdir()
    for i, name in enumerate(("a.wav", "b.wav", "c.wav")):
        soundfile.write(audio / name, (0.3 * np.sin(np.arange(24000) / (5 + i))).astype(np.float32), 16000)
    paths = sorted(str(p) for p in audio.iterdir())
    kept = {"path": paths[0], "notes": [{"pitch": 60, "start": 0.5}], "error": None}  # no model writes this one
    failed = {"path": paths[1], "notes": None, "error": "not read"}
    (tmp_path / ".out.jsonl.part1").write_text(json.dumps(kept) + "\n" + json.dumps(failed) + "\n")
    (tmp_path / ".out.jsonl.part0").write_text(json.dumps({"path": paths[2], "notes": [], "error": None})[:-9])
    result = run([sys.executable, str(RECIPE), str(tiny_folder), str(audio), "out.jsonl"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process 0/1: 2 files (1 kept from an interrupted run)" in result.stdout, result.stdout
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [row["path"] for row in rows] == paths and rows[0] == kept
    assert all(row["error"] is None and isinstance(row["notes"], list) for row in rows[1:]), rows
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
