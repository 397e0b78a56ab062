"""examples/transcribe.py end to end: golden audio -> MIDI, in a process where convert_mt3 cannot be imported."""

import csv
import os
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pretty_midi
import pytest
import soundfile
import torch

from conftest import run_isolated, run_isolated_script

EXAMPLE = Path(__file__).parents[1] / "examples" / "transcribe.py"
# MIDI stores times in ticks (220 per quarter at 120 qpm = 440 per second): 1/440 s resolution.
MIDI_TIME_TOLERANCE = 1 / 440 + 1e-9


def run_example(args: list[str], cwd: Path, prelude: str = "") -> subprocess.CompletedProcess:
    """Run the example as a script with every import of convert_mt3 failing, offline."""
    return run_isolated(f"{prelude}import runpy\nsys.argv = {[str(EXAMPLE)] + args!r}\nrunpy.run_path({str(EXAMPLE)!r}, run_name='__main__')\n", cwd)


def midi_notes(path: Path) -> list[tuple]:
    midi = pretty_midi.PrettyMIDI(str(path))
    return sorted((i.program, i.is_drum, n.pitch, n.velocity, n.start, n.end) for i in midi.instruments for n in i.notes)


def golden_notes(case: Path) -> list[tuple]:
    with open(case / "notes.csv") as f:
        return [
            (int(r["program"]), bool(int(r["is_drum"])), int(r["pitch"]), int(r["velocity"]), float(r["start_time"]), float(r["end_time"]))
            for r in csv.DictReader(f)
        ]


def share_matched(mine: list[tuple], golden: list[tuple], tolerance: float) -> float:
    """Share of golden notes with an equal note in `mine` (times within `tolerance`), each used once."""
    pool = list(mine)
    matched = 0
    for note in golden:
        for i, other in enumerate(pool):
            if other[:4] == note[:4] and abs(other[4] - note[4]) <= tolerance and abs(other[5] - note[5]) <= tolerance:
                matched += 1
                del pool[i]
                break
    return matched / max(len(golden), 1)


GOLDEN_CASES = ["a_brahms_string_orchestra", "b_multi_instrument_drums_synth", "c_ragtime_piano_recording"]


@pytest.fixture(scope="module")
def golden_midi(shared, real_folder, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """The example run on each golden case's samples (one process for the three): each case's run and MIDI file."""
    root = tmp_path_factory.mktemp("golden_midi")
    for name in GOLDEN_CASES:
        soundfile.write(root / f"{name}.wav", np.load(shared / "golden" / name / "samples.npy"), 16000, subtype="FLOAT")
    runs = run_isolated_script(EXAMPLE, [[str(real_folder), f"{name}.wav", f"{name}.mid", "--quiet", "--batch-size", "8"]
                                         for name in GOLDEN_CASES], root)
    return {name: (run, root / f"{name}.mid") for name, run in zip(GOLDEN_CASES, runs, strict=True)}


@pytest.mark.parametrize("case_name", GOLDEN_CASES)
def test_example_reproduces_golden_notes(shared, golden_midi, case_name):
    case = shared / "golden" / case_name
    run, midi = golden_midi[case_name]
    assert run.returncode == 0, run.stderr[-3000:]
    mine, golden = midi_notes(midi), golden_notes(case)
    share = share_matched(mine, golden, MIDI_TIME_TOLERANCE)
    reference = Counter(midi_notes(case / "transcription.mid"))
    same_as_original_midi = sum((Counter(mine) & reference).values()) / max(len(golden), 1)
    print(f"{case_name}: {len(mine)} notes, {share:.1%} of notes.csv matched (times within 1/440 s), "
          f"{same_as_original_midi:.1%} identical to the original's transcription.mid")
    assert len(mine) == len(golden) and share == 1.0
    assert same_as_original_midi == 1.0


def test_example_options_and_bad_input(real_folder, tmp_path):
    """--programs keeps exactly the unfiltered run's notes of those programs (and drums), --plot draws, silence
    gives an empty MIDI, bad files one error line."""
    rng = np.random.default_rng(0)
    t = np.arange(3 * 44100) / 44100
    tone = 0.3 * np.sin(2 * np.pi * 440 * t) * (t % 0.5 < 0.25)
    stereo = np.stack([tone, tone + 0.01 * rng.standard_normal(t.size)], axis=1).astype(np.float32)
    soundfile.write(tmp_path / "tone.flac", stereo, 44100)
    soundfile.write(tmp_path / "silence.wav", np.zeros(16000 * 3, np.float32), 16000)
    soundfile.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    (tmp_path / "broken.ogg").write_bytes(b"OggS not really")
    broken, bad_programs, *transcribed = run_isolated_script(EXAMPLE, [  # first the runs whose stderr is checked
        [str(real_folder), "broken.ogg", "x.mid", "--quiet"],
        [str(real_folder), "tone.flac", "y.mid", "--programs", "7-x", "--quiet"],
        [str(real_folder), "tone.flac", "all.mid", "--quiet"],
        [str(real_folder), "tone.flac", "tone.mid", "--programs", "4", "--plot", "roll.png", "--quiet"],
        [str(real_folder), "silence.wav", "silence.mid", "--quiet"],
        [str(real_folder), "empty.wav", "empty.mid", "--quiet"],
    ], tmp_path)
    for result in transcribed:
        assert result.returncode == 0, result.stderr[-3000:]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "tone.mid").stat().st_mode & 0o777 == 0o666 & ~umask  # as `open` makes it, not private
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    unfiltered, kept = midi_notes(tmp_path / "all.mid"), midi_notes(tmp_path / "tone.mid")
    print(f"programs of the tone's {len(unfiltered)} notes: {sorted({int(n[0]) for n in unfiltered if not n[1]})}; "
          f"{len(kept)} kept by --programs 4")
    assert any(n[0] == 4 and not n[1] for n in kept) and len(kept) < len(unfiltered)  # program 4 and others
    assert kept == [n for n in unfiltered if n[1] or n[0] == 4]
    assert (tmp_path / "roll.png").stat().st_size > 1000
    assert midi_notes(tmp_path / "silence.mid") == [] and midi_notes(tmp_path / "empty.mid") == []

    assert broken.returncode == 1 and len(broken.stderr.strip().splitlines()) == 1
    assert broken.stderr.strip().startswith("error: broken.ogg: cannot read audio")
    assert bad_programs.returncode == 1 and bad_programs.stderr.strip().startswith("error: --programs '7-x'")
    assert not (tmp_path / "x.mid").exists() and not (tmp_path / "y.mid").exists()


def test_example_refuses_bad_arguments_before_reading_audio(tmp_path):
    """Issue 12's edge cases: each one error line, exit 1, no traceback, before any model or audio is read
    (MODEL does not exist, so reaching the model would give another message)."""
    soundfile.write(tmp_path / "a.wav", np.zeros(1600, np.float32), 16000)
    (tmp_path / "outdir.mid").mkdir()
    for name in ("taken.mid", "taken.png"):  # files of the user's: never replaced without --overwrite
        (tmp_path / name).write_text("mine")
    cases = [
        (["a.wav", "missing/x.mid"], "OUT.mid missing/x.mid: folder"),
        (["a.wav", "outdir.mid"], "OUT.mid outdir.mid: is a directory"),
        (["a.wav", "x.mid", "--plot", "nowhere/roll.png"], "--plot nowhere/roll.png: folder"),
        (["a.wav", "x.mid", "--plot", "roll.xyz"], "--plot roll.xyz: matplotlib writes"),
        (["a.wav", "x.mid", "--plot", "roll"], "found 'no suffix'"),
        (["a.wav", "/proc/x.mid"], "OUT.mid /proc/x.mid: cannot be written"),
        (["missing.wav", "x.mid"], "missing.wav: no such file"),
        (["a.wav", "taken.mid"], "OUT.mid taken.mid: exists; --overwrite replaces it"),
        (["a.wav", "x.mid", "--plot", "taken.png"], "--plot taken.png: exists; --overwrite replaces it"),
        (["a.wav", "./a.wav", "--overwrite"], "OUT.mid ./a.wav: is the AUDIO file, which it would replace"),
    ]
    if not torch.cuda.is_available():
        cases.append((["a.wav", "x.mid", "--device", "cuda"], "--device cuda: CUDA is not available"))
    # then MODEL, when it can only be a local path: a missing folder, or a file
    (tmp_path / "model.txt").write_text("")
    cases += [([], f"MODEL {tmp_path / 'no-model'}: no such folder"), ([], "MODEL ./model.txt: is not a folder")]
    argvs = [["./model.txt" if "model.txt" in message else str(tmp_path / "no-model"), *(args or ["a.wav", "x.mid"]),
              "--quiet"] for args, message in cases]
    (tmp_path / "bert").mkdir()  # a model of another kind: transformers has no music-transcription task for it
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    cases.append(([], "MODEL ./bert: not an MT3 model (it defines no music-transcription pipeline)"))
    argvs.append(["./bert", "a.wav", "x.mid", "--quiet"])
    # a name that may be a Hub repo id and is no folder here: transformers' offline/connection error, and both said
    *results, result = run_isolated_script(EXAMPLE, [*argvs, ["nowhere/mt4", "a.wav", "x.mid", "--quiet"]], tmp_path)
    # matplotlib made unimportable, in a process of its own
    results.append(run_example([str(tmp_path / "no-model"), "a.wav", "x.mid", "--plot", "roll.png", "--quiet"], tmp_path,
                               "sys.modules['matplotlib'] = None\n"))
    for (_, message), run in zip([*cases, (None, "--plot needs matplotlib")], results, strict=True):
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 1 and len(lines) == 1 and message in lines[0], (run.args, run.stderr[-2000:])
    assert not (tmp_path / "x.mid").exists() and (tmp_path / "taken.mid").read_text() == "mine"
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("error: MODEL nowhere/mt4: no such folder, nor a loadable Hub repo id ("), lines
