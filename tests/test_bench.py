"""`make bench` plumbing that runs without the real checkpoint: `--model-dir` and row 8 (a long input end to end
per precision mode, compared with the first mode and with a reference run), on the tiny converted folder; and
benchmarks/profile_step.py, which needs no folder."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=900)


def test_row_8_end_to_end_on_cpu_against_a_reference(tiny_folder, shared, tmp_path):
    first = tmp_path / "first" / "results.json"
    first.parent.mkdir()
    common = ["--model-dir", str(tiny_folder), "--shared", str(shared), "--rows", "8", "--e2e-device", "cpu",
              "--e2e-seconds", "4"]
    done = bench(*common, "--e2e-modes", "float32,bfloat16,float32+graphs+eos4", "--json", str(first))
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(first.read_text())["rows"]["8"]
    f32, bf16 = row["modes"]["float32"], row["modes"]["bfloat16"]
    assert f32["segments"] == bf16["segments"] == 2  # 4 s = two 2.048 s segments
    assert f32["segments_identical_to_first"] == 2 and f32["notes_equal_pct_to_first"] == 100.0
    assert 0 <= bf16["segments_identical_to_first"] <= 2 and "segments_identical_to_reference" not in f32
    assert row["modes"]["float32+graphs+eos4"]["segments_identical_to_first"] == 2  # graphs: ignored on CPU; eos4: same ids
    reference = first.parent / "e2e_tokens_cpu_float32.json"
    assert json.loads(reference.read_text())["segments"] and (first.parent / "e2e_tokens_cpu_bfloat16.json").exists()

    second = tmp_path / "second" / "results.json"
    second.parent.mkdir()
    done = bench(*common, "--e2e-modes", "float32", "--e2e-reference", str(reference), "--json", str(second))
    assert done.returncode == 0, done.stderr[-3000:]
    f32 = json.loads(second.read_text())["rows"]["8"]["modes"]["float32"]
    assert f32["segments_identical_to_reference"] == f32["reference_segments"] == 2
    assert "8   4 s end to end, cpu float32" in json.loads(second.read_text())["table"]


def test_model_dir_cannot_time_the_conversion(tiny_folder, tmp_path):
    done = bench("--model-dir", str(tiny_folder), "--rows", "1", "--json", str(tmp_path / "r.json"))
    assert done.returncode == 2
    assert done.stderr.strip() == "error: row 1 times the conversion, which needs the checkpoint: leave out --model-dir"
    done = bench("--model-dir", str(tmp_path), "--rows", "3", "--json", str(tmp_path / "r.json"))
    assert done.returncode == 2 and "no config.json" in done.stderr and not (tmp_path / "r.json").exists()


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_only_the_experimental_graph_modes_may_fail():
    """A failing "+graphs" or "+eosN" mode (experimental) is recorded and the bench goes on; any other failure
    stops it, as does an unknown mode suffix."""
    module = load_bench()
    error = module.WorkerFailed("capture failed")
    assert module._experimental_failed("autocast-bfloat16+graphs", error) == {"failed": "capture failed"}
    with pytest.raises(module.WorkerFailed):
        module._experimental_failed("autocast-bfloat16", error)
    assert module._experimental_failed("float32+eos8", error) == {"failed": "capture failed"}
    assert module._mode_options("autocast-float16+graphs+eos8") == ("autocast-float16", True, 8)
    assert module._mode_options("bfloat16") == ("bfloat16", False, 1)
    for wrong in ("float32+compile", "float32+graphs+graphs", "float32+eos0", "float32+eos"):
        with pytest.raises(ValueError, match="suffix"):
            module._mode_options(wrong)


def test_row_8_targets_follow_the_precision_with_or_without_graphs():
    """On CUDA, row 8's target is <= 8 s for float32 (eager or "+graphs") and <= 4 s for the half modes."""
    module = load_bench()
    mode = {"end_to_end_s": 5.0, "generate_s": 4.0, "segments": 2, "segments_identical_to_first": 2,
            "notes_equal_pct_to_first": 100.0}
    modes = ("float32", "float32+graphs", "autocast-bfloat16+graphs")
    res = {"machine": {"cpu_count": 16, "python": "3", "loadavg_start": 0.0}, "quick": False, "reps": 1,
           "rows": {"8": {"audio_s": 3600, "device": "cuda", "modes": dict.fromkeys(modes, mode)}}}
    lines = [line for line in module.fmt_table(res).splitlines() if line.startswith("8 ")]
    assert len(lines) == 3
    assert [line.rstrip().endswith(target) for line, target in zip(lines, ("<= 8 s", "<= 8 s", "<= 4 s"))] == [True] * 3


PROFILE = Path(__file__).resolve().parent.parent / "benchmarks" / "profile_step.py"


def test_profile_step_runs_on_cpu(tmp_path):
    """benchmarks/profile_step.py (for the sessions with a GPU) on the CPU: per position, seconds per step and the
    bytes a step reads (the published config's weights, 2 rows' keys/values), and the profiler's table; a window
    that crosses a key length is refused in one line."""
    run = [sys.executable, str(PROFILE), "--device", "cpu", "--rows", "2", "--steps", "3", "--out", str(tmp_path)]
    done = subprocess.run([*run, "--at", "40"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (line,) = json.loads((tmp_path / "summary.json").read_text())
    assert (line["mode"], line["position"], line["keys"]) == ("eager", 40, 64) and line["ms_per_step"] > 0
    inner = 6 * 64
    weights = 8 * (6 * 512 * inner + 3 * 512 * 1024) + 512 * 1536  # q/k/v/out, cross q/out, wi_0/wi_1/wo; logits
    assert line["bytes_per_step"] == {"weights": 4 * weights, "cross_attention": 4 * 2 * 8 * 2 * 256 * inner,
                                      "self_attention": 4 * 2 * 8 * 2 * 64 * inner}
    assert "aten::bmm" in (tmp_path / "profile_eager_40.txt").read_text()  # CPU attention runs as matmuls
    refused = subprocess.run([*run, "--at", "32"], capture_output=True, text=True)
    assert refused.returncode == 2 and "within positions 33..63" in refused.stderr.splitlines()[-1]


def test_profile_step_compiled_mode_on_cpu(tmp_path):
    """The compiled mode (for a GPU's inductor) through Dynamo's eager backend on the CPU: the step is compiled
    before the timed steps, runs its linears without oneDNN's packed layout (inductor cannot lower it) and reports the
    graphs it compiled; an unknown mode is refused in one line."""
    run = [sys.executable, str(PROFILE), "--device", "cpu", "--rows", "2", "--steps", "3", "--at", "40",
           "--out", str(tmp_path)]
    done = subprocess.run([*run, "--modes", "compiled,compiled+graphs", "--compile-backend", "eager"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (line,) = json.loads((tmp_path / "summary.json").read_text())  # compiled+graphs: skipped off CUDA
    assert (line["mode"], line["compile_backend"]) == ("compiled", "eager") and line["compiled_graphs"] >= 1
    table = (tmp_path / "profile_compiled_40.txt").read_text()
    assert "aten::mm" in table and "mkldnn::_linear_pointwise" not in table
    refused = subprocess.run([*run, "--modes", "eager,fast"], capture_output=True, text=True)
    assert refused.returncode == 2 and "unknown fast" in refused.stderr.splitlines()[-1]
