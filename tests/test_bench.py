"""`make bench` plumbing that runs without the real checkpoint: `--model-dir` and row 8 (a long input end to end
per precision mode, compared with the first mode and with a reference run), on the tiny converted folder; and
benchmarks/profile_step.py, which needs no folder."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_isolated_script

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=900)


def test_row_8_end_to_end_on_cpu_against_a_reference(tiny_folder, shared, tmp_path):
    first = tmp_path / "first" / "results.json"
    first.parent.mkdir()
    common = ["--model-dir", str(tiny_folder), "--shared", str(shared), "--rows", "8", "--e2e-device", "cpu",
              "--e2e-seconds", "4"]
    done = bench(*common, "--e2e-modes", "float32,bfloat16", "--json", str(first))
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(first.read_text())["rows"]["8"]
    f32, bf16 = row["modes"]["float32"], row["modes"]["bfloat16"]
    assert f32["segments"] == bf16["segments"] == 2  # 4 s = two 2.048 s segments
    assert f32["segments_identical_to_first"] == 2 and f32["notes_equal_pct_to_first"] == 100.0
    assert "segments_identical_to_reference" not in f32
    reference = first.parent / "e2e_tokens_cpu_float32.json"
    ids = [json.loads((first.parent / f"e2e_tokens_cpu_{mode}.json").read_text())["segments"] for mode in ("float32", "bfloat16")]
    assert len(ids[0]) == len(ids[1]) == 2  # the second mode is counted against the first's ids, segment by segment
    assert bf16["segments_identical_to_first"] == sum(a == b for a, b in zip(*ids, strict=True))

    second = tmp_path / "second" / "results.json"
    second.parent.mkdir()
    # graphs: ignored on CPU; eos4: EOS looked for every 4 steps, the same ids
    done = bench(*common, "--e2e-modes", "float32+graphs+eos4", "--e2e-reference", str(reference), "--json", str(second))
    assert done.returncode == 0, done.stderr[-3000:]
    mode = json.loads(second.read_text())["rows"]["8"]["modes"]["float32+graphs+eos4"]
    assert mode["segments_identical_to_reference"] == mode["reference_segments"] == 2
    assert "8   4 s end to end, cpu float32+graphs+eos4" in json.loads(second.read_text())["table"]


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
    assert module._mode_options("autocast-float16+graphs+eos8") == ("autocast-float16", True, 8, False)
    assert module._mode_options("float32+graphs+sdpa") == ("float32", True, None, True)  # the model's default
    assert module._mode_options("bfloat16+eos1") == ("bfloat16", False, 1, False)
    for wrong in ("float32+compile", "float32+graphs+graphs", "float32+eos0", "float32+eos", "float32+sdpa+sdpa"):
        with pytest.raises(ValueError, match="suffix"):
            module._mode_options(wrong)


def test_sdpa_mode_packs_without_matmul_attention():
    """"+sdpa" decodes with SDPA attention: the model's `pack` is told not to use matmuls, only inside the mode,
    and an instance `pack` set before is put back."""
    module = load_bench()
    calls = []

    class Model:
        def pack(self, rows, onednn, matmul_attention, fuse=True):
            calls.append(matmul_attention)

    model = Model()
    with module._sdpa_decoding(model, True):
        model.pack(4, False, True, fuse=True)
    model.pack(4, False, True)
    assert calls == [False, True] and "pack" not in vars(model)
    own = model.pack = lambda rows, onednn, matmul_attention, fuse=True: calls.append(("own", matmul_attention))
    with module._sdpa_decoding(model, True):
        model.pack(4, False, True)
    assert model.pack is own and calls[-1] == ("own", False)


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


@pytest.fixture(scope="module")
def profile_runs(tmp_path_factory) -> tuple[Path, list[subprocess.CompletedProcess]]:
    """benchmarks/profile_step.py's runs of the two tests below, in one process: eager at position 40, a window
    across a key length, the compiled modes (Dynamo's eager backend), an unknown mode."""
    out = tmp_path_factory.mktemp("profile")
    common = ["--device", "cpu", "--rows", "2", "--steps", "3"]
    return out, run_isolated_script(PROFILE, [
        [*common, "--at", "40", "--out", str(out / "eager")],
        [*common, "--at", "32", "--out", str(out / "refused")],
        [*common, "--at", "40", "--out", str(out / "compiled"), "--modes", "compiled,compiled+graphs",
         "--compile-backend", "eager"],
        [*common, "--at", "40", "--out", str(out / "refused"), "--modes", "eager,fast"],
    ], out, hub_user=False)


def test_profile_step_runs_on_cpu(profile_runs):
    """benchmarks/profile_step.py (for the sessions with a GPU) on the CPU: per position, seconds per step and the
    bytes a step reads (the published config's weights, 2 rows' keys/values), and the profiler's table; a window
    that crosses a key length is refused in one line."""
    out, (done, refused, _, _) = profile_runs
    assert done.returncode == 0, done.stderr
    (line,) = json.loads((out / "eager" / "summary.json").read_text())
    assert (line["mode"], line["position"], line["keys"]) == ("eager", 40, 64) and line["ms_per_step"] > 0
    inner = 6 * 64
    weights = 8 * (6 * 512 * inner + 3 * 512 * 1024) + 512 * 1536  # q/k/v/out, cross q/out, wi_0/wi_1/wo; logits
    assert line["bytes_per_step"] == {"weights": 4 * weights, "cross_attention": 4 * 2 * 8 * 2 * 256 * inner,
                                      "self_attention": 4 * 2 * 8 * 2 * 64 * inner}
    assert "aten::bmm" in (out / "eager" / "profile_eager_40.txt").read_text()  # CPU attention runs as matmuls
    assert refused.returncode == 2 and "within positions 33..63" in refused.stderr.splitlines()[-1]


def test_profile_step_compiled_mode_on_cpu(profile_runs):
    """The compiled mode (for a GPU's inductor) through Dynamo's eager backend on the CPU: the step is compiled
    before the timed steps, runs its linears without oneDNN's packed layout (inductor cannot lower it) and reports the
    graphs it compiled; an unknown mode is refused in one line."""
    out, (_, _, done, refused) = profile_runs
    assert done.returncode == 0, done.stderr
    (line,) = json.loads((out / "compiled" / "summary.json").read_text())  # compiled+graphs: skipped off CUDA
    assert (line["mode"], line["compile_backend"]) == ("compiled", "eager") and line["compiled_graphs"] >= 1
    table = (out / "compiled" / "profile_compiled_40.txt").read_text()
    assert "aten::mm" in table and "mkldnn::_linear_pointwise" not in table
    assert refused.returncode == 2 and "unknown fast" in refused.stderr.splitlines()[-1]


STUDY = Path(__file__).resolve().parent.parent / "benchmarks" / "precision_study.py"


def test_precision_study_rounds_each_part_and_restores_the_model(tiny_folder):
    """benchmarks/precision_study.py on the tiny folder: every part's rounding runs inside generate() (the study
    fails a part that never ran), a rounded forward moves the logits by about half precision's step, and the model
    (weights, `_linear`, `torch.bmm`, no hooks) is as before afterwards; a malformed mode is refused, naming the item."""
    import numpy as np
    import torch
    from transformers import AutoModel, AutoProcessor

    spec = importlib.util.spec_from_file_location("precision_study", STUDY)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    model = AutoModel.from_pretrained(tiny_folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(tiny_folder, trust_remote_code=True)
    audio = np.random.default_rng(0).standard_normal(3 * 16000).astype(np.float32) * 0.1
    inputs = {"noise": processor(audio=audio, sampling_rate=16000, return_tensors="pt")}
    packable, bmm = study._packable_class(model), torch.bmm
    linear = packable._linear
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    modes = ["linears-float16+attention-bfloat16", "mlp-float16", "attention_inputs-float16", "kv-bfloat16"]
    results, float32 = study.compare(model, processor, inputs, modes, max_new_tokens=24)
    assert results["float32"]["noise"]["segments_identical"] == results["float32"]["noise"]["segments"] == 2
    assert all(results[mode]["noise"]["segments"] == 2 for mode in modes)
    gaps = study.margins(model, inputs, float32, ["linears-float16"])["linears-float16"]
    assert len(gaps) == 2 and all(0 < g["largest_error"] < 1e-2 for g in gaps)  # float16 keeps 11 significant bits
    assert packable._linear is linear and torch.bmm is bmm
    frames = model.encoder.continuous_inputs_projection
    assert not frames._forward_hooks and not frames._forward_pre_hooks
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    with pytest.raises(ValueError, match="found 'qkv-float16'"):
        study.parse_mode("linears-float16+qkv-float16")
    with pytest.raises(RuntimeError, match=r"\['kv'\] was never applied"):
        study._check_applied("kv-float16", study.Counter())


def test_row_5_floor_counts_the_bytes_a_decode_must_read():
    """Row 5's floor on a toy configuration, by hand: a step reads the decoder's weights once (3 steps: the longest
    segment), and a row at token t 256 cross-attention and t self-attention keys and values per layer; the decoder
    costs its FLOPs or its reads, whichever is longer, and the table shows the floor against what 6x needs."""
    module = load_bench()
    config = {"d_model": 4, "d_ff": 8, "num_heads": 2, "d_kv": 2, "num_layers": 1, "num_decoder_layers": 1,
              "vocab_size": 10, "input_depth": 4, "frames_per_segment": 256}
    weights = 3 * 4 * 4 + 4 * 4 + 4 * 4 + 4 * 4 + 3 * 4 * 8 + 4 * 10  # q/k/v, out, cross q, cross out, MLP; logits
    keys = (2 * 256 + 1 + 2) + (3 * 256 + 1 + 2 + 3)  # segments of 2 and 3 tokens
    rate = {"gflops_best": 2.0, "gflops_1thread_best": 1.0, "gflops_onednn_best": 0.0, "read_gbs_best": 1e-3}
    floor = module.dense_floor(config, rate, [2, 3])
    assert floor["gflops"] == 2.0 and floor["decoder_read_gb"] * 1e9 == 4 * (3 * weights + 2 * 4 * keys)
    assert floor["decoder_read_s"] > floor["decoder_compute_s"]  # reads dominate at 1 MB/s
    assert floor["floor_s"] == floor["encoder_s"] + floor["decoder_read_s"]
    assert floor["floor_serial_s"] == floor["floor_s"] + floor["decoder_compute_s"]

    port = {"generate_s": 2.0, "ru_maxrss_kb": 10**6}
    original = {"decode_s": 12.0, "device": "cpu", "jax": "0", "batch": 8, "segments_identical": 2, "segments_golden": 2}
    row = {"audio_s": 4.0, "ratio": 6.0, "port_s_per_s": 0.5, "original_s_per_s": 3.0, "port_float32": port,
           "original": original, "floor": {**floor, "needed_s": 2.0, "port_over_floor": 2.0 / floor["floor_s"]}}
    res = {"machine": {"cpu_count": 2, "python": "3", "loadavg_start": 0.0}, "quick": False, "reps": 1,
           "rows": {"5": row}}
    (line,) = [line for line in module.fmt_table(res).splitlines() if "floor here" in line]
    assert "6x needs 2.00 s" in line


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_row_original_is_compared_with_its_fastest_setting(tmp_path, monkeypatch, device):
    """Rows 5 / 7 without running anything (the processes faked): the original runs once per static batch size,
    where JAX runs on a GPU also with float32 matmuls at "highest" precision (its default rounds to TF32 there), and
    the ratio is taken against its fastest run; the port's compared mode (CPU: float32; GPU: float32+graphs,
    generate()'s CUDA defaults, after eager float32) runs a second time after the original, its best of the two
    processes compared and the segments equal between them counted. On the GPU, of golden case a: its frames are
    made first. The row is saved after each process, so a run cut short keeps what it measured."""
    module = load_bench()
    case = "b" if device == "cpu" else "a"
    decode_s = {(8, None): 40.0, (32, None): 30.0, (8, "highest"): 50.0, (32, "highest"): 45.0}
    port_seconds = iter([10.0, 9.0] if device == "cpu" else [30.0, 10.0, 9.0])  # GPU: eager first
    port_ids = iter(([] if device == "cpu" else [[[5, 6], [7]]]) + [[[5, 6], [7]], [[5, 6], [8]]])  # the last differs
    calls = []

    def fake_process(cmd, label, expect_json=True, env=None):
        calls.append((cmd, env))
        if "frames" in cmd:
            return 1.0, {"audio_s": 60.0, "segments": 2}
        if "--worker" in cmd:  # the port's generate()
            Path(cmd[cmd.index("--out") + 1]).write_text(json.dumps({"segments": next(port_ids)}))
            return 1.0, {"generate_s": next(port_seconds), "generated_per_segment": [3, 2], "segments": 2}
        batch, precision = int(cmd[cmd.index("--batch") + 1]), env["JAX_DEFAULT_MATMUL_PRECISION"]
        return 1.0, {"decode_s": decode_s[batch, precision], "batch": batch, "device": f"{device}:0", "jax": "0",
                     "segments_identical": 2, "segments_golden": 2}

    if device == "cpu":
        (tmp_path / "dense_b_60s.npy").write_bytes(b"")  # the frames, made earlier
    monkeypatch.setattr(module, "run_process", fake_process)
    out, saved = {}, []
    row = module.row_original(Path("model"), Path("shared"), tmp_path, 60.0, 2, device=device, original_batches=(8, 32),
                              case=case, out=out, save=lambda: saved.append(json.loads(json.dumps(out))))
    assert row is out and saved[-1] == row
    processes = len([cmd for cmd, _ in calls if "frames" not in cmd])
    assert len(saved) == processes  # after each process (the last one's: the complete row)
    partial = saved[-3]  # after the original's one before last
    assert len(partial["original_runs"]) == len(row["original_runs"]) - 1 and "ratio" not in partial
    frames = [cmd for cmd, _ in calls if "frames" in cmd]
    assert [cmd[cmd.index("--case") + 1] for cmd in frames] == ([] if device == "cpu" else ["a_brahms_string_orchestra"])
    assert row["case"] == case
    runs = [(run["batch"], run["matmul_precision"]) for run in row["original_runs"]]
    if device == "cpu":
        assert runs == [(8, "default"), (32, "default")]
    else:
        assert runs == [(8, "default"), (8, "highest"), (32, "default"), (32, "highest")]
    assert [env for cmd, env in calls if "--batch" in cmd] == [  # None unsets a variable of the caller's
        {"JAX_DEFAULT_MATMUL_PRECISION": "highest" if precision == "highest" else None} for _, precision in runs]
    assert row["original"]["decode_s"] == 30.0 and row["original"]["batch"] == 32
    compared = "float32" if device == "cpu" else "float32+graphs"
    ports = [cmd[cmd.index("--mode") + 1] for cmd, _ in calls if "--worker" in cmd and "port" in cmd]
    assert ports == ([compared] * 2 if device == "cpu" else ["float32", compared, compared])
    assert row["compared_mode"] == compared
    port = row[f"port_{compared}"]
    assert port["generate_s_per_process"] == [10.0, 9.0] and port["generate_s"] == 9.0
    assert port["segments_identical_between_processes"] == 1
    assert row["ratio"] == 30.0 / 9.0 and "--worker" in calls[-1][0]  # the port's second process comes last
    port["ru_maxrss_kb"] = 1
    table = module.fmt_table({"machine": {"cpu_count": 2, "python": "3", "loadavg_start": 0.0}, "quick": False,
                              "reps": 2, "rows": {"5" if device == "cpu" else "7": row}})
    assert f"(case {case} repeated)" in table
    assert "batch 32, matmul default" in table and "original, batch 8, matmul default" in table
    assert "original, batch 32, matmul default" not in table  # the compared run is not listed twice
    assert any("same ids: 1/2" in line and "10.00 s / 9.00 s" in line for line in table.splitlines())
    assert f"port {compared} generate()" in table
    if device == "cuda":  # eager float32 listed, as the others' reference, with its own ratio
        assert any("port float32 generate() (the others' reference)" in line and "30.00 s" in line and "1.00x" in line
                   for line in table.splitlines())


def test_row_7_compares_eager_float32_when_graphs_fail(tmp_path, monkeypatch):
    """Row 7 with the real list of GPU modes (float32+graphs among them, run once) when float32+graphs fails: the
    failure is recorded, the other modes still run, and eager float32 becomes the compared mode, run again after
    the original, instead of the row dying on the failed mode's missing time."""
    module = load_bench()
    seconds = {"float32": iter([20.0, 18.0])}
    modes_run = []

    def fake_process(cmd, label, expect_json=True, env=None):
        if "frames" in cmd:
            return 1.0, {"audio_s": 60.0, "segments": 2}
        if "--worker" in cmd:
            mode = cmd[cmd.index("--mode") + 1]
            modes_run.append(mode)
            if mode == "float32+graphs":
                raise module.WorkerFailed("capture failed")
            Path(cmd[cmd.index("--out") + 1]).write_text(json.dumps({"segments": [[5, 6], [7]]}))
            return 1.0, {"generate_s": next(seconds.get(mode, iter([5.0]))), "segments": 2}
        return 1.0, {"decode_s": 4.0, "batch": 8, "device": "cuda:0", "jax": "0", "segments_identical": 2,
                     "segments_golden": 2}

    monkeypatch.setattr(module, "run_process", fake_process)
    row = module.row_original(Path("model"), Path("shared"), tmp_path, 60.0, 2, device="cuda",
                              gpu_modes=module.GPU_MODES, case="a")
    assert modes_run == ["float32", *module.GPU_MODES, "float32"]  # float32+graphs once, eager again last
    assert row["port_float32+graphs"] == {"failed": "capture failed"}
    assert row["compared_mode"] == "float32" and row["port_float32"]["generate_s_per_process"] == [20.0, 18.0]
    assert row["ratio"] == 4.0 / 18.0


def test_threads_pin_every_process(tmp_path, monkeypatch):
    """--threads N pins each process to N cores (XLA sizes its thread pools by the cores it may use, not by its
    flags), and asks for no more cores than this process has."""
    module = load_bench()
    monkeypatch.setattr(module, "PINNED_CPUS", {min(os.sched_getaffinity(0))})
    probe = [sys.executable, "-c", "import json, os; print(json.dumps({'cpus': sorted(os.sched_getaffinity(0))}))"]
    _, js = module.run_process(probe, "affinity probe")
    assert js == {"cpus": [min(os.sched_getaffinity(0))]}
    monkeypatch.setenv("JAX_DEFAULT_MATMUL_PRECISION", "float32")  # the caller's own setting
    probe = [sys.executable, "-c", "import json, os; print(json.dumps({'set': 'JAX_DEFAULT_MATMUL_PRECISION' in os.environ}))"]
    assert module.run_process(probe, "env probe", env={"JAX_DEFAULT_MATMUL_PRECISION": None})[1] == {"set": False}
    for threads in ("999", "0"):
        done = bench("--threads", threads, "--rows", "4", "--json", str(tmp_path / "r.json"))
        assert done.returncode == 2 and done.stderr.strip().startswith(f"error: --threads {threads}: expected 1 to the")


def test_main_keeps_the_rows_measured_before_a_failure(tiny_folder, tmp_path, monkeypatch):
    """main() wires `save` into rows 5 and 7: when a process fails part-way (a device's time limit, a crash), the
    JSON already holds the processes measured before it, and the run exits 1 without a table."""
    module = load_bench()

    def fake_process(cmd, label, expect_json=True, env=None):
        if "import" in cmd:
            return 1.0, {"torch": "t", "transformers": "t", "torch_threads": 2}
        assert "cuda" in cmd, cmd  # nothing else runs a process here: row 7 is faked below
        return 1.0, {"cuda": True}

    def fake_row_original(*args, out, save, **kwargs):
        out["original_runs"] = [{"batch": 32, "decode_s": 0.4}]
        save()
        raise module.WorkerFailed("killed at the time limit")

    monkeypatch.setattr(module, "run_process", fake_process)
    monkeypatch.setattr(module, "row_original", fake_row_original)
    json_path = tmp_path / "r.json"
    assert module.main(["--model-dir", str(tiny_folder), "--rows", "7", "--json", str(json_path)]) == 1
    saved = json.loads(json_path.read_text())
    assert saved["rows"] == {"7": {"original_runs": [{"batch": 32, "decode_s": 0.4}]}}
    assert saved["complete"] is False and "table" not in saved
