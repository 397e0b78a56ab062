"""`make bench`: whole-process timings of convert-mt3, printed as one table of ratios from one run.

    MT3_SHARED_DIR=../shared python3 benchmarks/bench.py [--quick] [--rows 1,2,3,4] [--reps N]

Every figure comes from a separate process (`python benchmarks/bench.py --worker NAME ...`, which
prints one JSON line); the parent times each process's wall clock and collects the JSON. The parent
imports only the standard library, so its own start-up never shows in a figure.

Rows (see benchmarks/README.md):
  1. conversion wall vs floor (import torch+transformers) + (plain msgpack/gunzip/safetensors read)
  2. transcription of golden case a (20 s): naive (no cache, one segment at a time) and the
     default generate() in float32 and bfloat16, seconds of compute per audio second
  3. a 300 s input: seconds per audio second and peak resident memory
  4. compute floor: FLOPs of the generated tokens / measured matmul rate, vs the fast path
  5. a 60 s dense clip (case b repeated; --dense-case): the port's generate() vs the ORIGINAL network
     (shared/tools/original_mt3.py, jax[cpu] + flax: the `bench` extra) on the same frames
  6. precision modes (autocast bfloat16, .to(bfloat16)) vs float32: segments and notes per golden case
  7. row 5 on CUDA, only when a GPU is present
  8. a long input (default 1 hour, the row-3 audio) end to end (features, generate, decode) on
     --e2e-device (default CUDA, when present) in each precision mode: seconds, segments identical to
     float32 on that device and to --e2e-reference (the tokens of a CPU float32 run), notes equal
Every row also goes to benchmarks/results.json (--json), with the load average of every process.
--model-dir DIR measures an already converted folder instead of converting (row 1 needs the checkpoint):
for a machine the checkpoint cannot travel to.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The golden samples' rate (shared/golden/README.md), given to the processor with them; the model's own audio
# constants (rate, hop, frames per segment) are read from the converted folder.
GOLDEN_SAMPLE_RATE = 16000
BOS, EOS = 0, 1
MAIN_CASE = "a_brahms_string_orchestra"
LONG_CASES = ("a_brahms_string_orchestra", "b_multi_instrument_drums_synth", "c_ragtime_piano_recording")
# The original (magenta/mt3, XLA CPU, 2 cores): 1.05 s of compute per audio second on case a
# (shared/golden/README.md, "Speed of the original"; median of 3 warm runs, compile excluded).
ORIGINAL_S_PER_S = 1.05
TARGET_CONVERSION_RATIO = 1.25
TARGET_LONG_S_PER_S = 0.105
TARGET_LONG_RSS_GB = 2.0


# --------------------------------------------------------------------------------------------- workers
# Each worker runs in its own process and prints exactly one JSON line on stdout.


def _emit(result: dict) -> None:
    import resource

    result["ru_maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
    print(json.dumps(result), flush=True)


def worker_import(args: argparse.Namespace) -> None:
    """The import part of the conversion floor: a process that only imports torch and transformers."""
    t0 = time.perf_counter()
    import torch
    import transformers

    _emit({"import_s": time.perf_counter() - t0, "torch": torch.__version__,
           "transformers": transformers.__version__, "torch_threads": torch.get_num_threads()})


def worker_import_reload(args: argparse.Namespace) -> None:
    """Not part of the floor: the imports the converter's reload check needs (issue 6: the folder is reloaded
    with AutoModel/AutoProcessor and remote code before it is moved into place). `import transformers` alone is
    lazy; these pull in its modeling, generation and processing stacks."""
    t0 = time.perf_counter()
    import torch  # noqa: F401
    from transformers import AutoModel, AutoProcessor, GenerationMixin, PreTrainedModel  # noqa: F401

    _emit({"import_s": time.perf_counter() - t0})


def worker_read(args: argparse.Namespace) -> None:
    """The I/O part of the conversion floor: msgpack load, gunzip every zarr chunk, np.frombuffer,
    `safetensors.numpy.save_file` of all arrays. Single-threaded, no validation, no torch."""
    import zlib

    import msgpack
    import numpy as np
    from safetensors.numpy import save_file

    directory = Path(args.checkpoint)
    t0 = time.perf_counter()

    def ext_hook(code, data):  # flax ExtType 1 = ndarray (shape, dtype name, raw bytes)
        if code == 1:
            shape, dtype, buffer = msgpack.unpackb(data)
            return np.frombuffer(buffer, dtype=np.dtype(dtype)).reshape(shape)
        return msgpack.ExtType(code, data)

    tree = msgpack.unpackb((directory / "checkpoint").read_bytes(), ext_hook=ext_hook, raw=False, strict_map_key=False)
    t_msgpack = time.perf_counter()

    arrays: dict[str, np.ndarray] = {}
    num_inline = 0
    stack = [("", tree["optimizer"]["target"])]
    while stack:
        prefix, node = stack.pop()
        if isinstance(node, np.ndarray):
            arrays[prefix] = node
            num_inline += 1
        elif isinstance(node, dict) and "driver" in node:  # tensorstore spec -> zarr v2 folder, one chunk
            folder = directory / node["kvstore"]["path"]
            meta = json.loads((folder / ".zarray").read_text())
            chunk = folder / ("0" if not meta["shape"] else ".".join("0" for _ in meta["shape"]))
            if not chunk.exists():
                chunk = folder / "0"
            data = zlib.decompress(chunk.read_bytes(), 47)  # wbits 32+15: gzip or zlib header
            arrays[prefix] = np.frombuffer(data, dtype=np.dtype(meta["dtype"])).reshape(meta["shape"])
        elif isinstance(node, dict):
            stack.extend((f"{prefix}/{k}" if prefix else str(k), v) for k, v in node.items())
    t_gunzip = time.perf_counter()

    save_file(arrays, args.out)
    t_save = time.perf_counter()
    _emit({"num_arrays": len(arrays), "num_inline": num_inline,
           "bytes": sum(a.nbytes for a in arrays.values()),
           "msgpack_s": t_msgpack - t0, "gunzip_s": t_gunzip - t_msgpack, "save_s": t_save - t_gunzip,
           "total_s": t_save - t0})


def _load(model_dir: str, dtype_name: str):
    """Model + processor from a converted folder with the Auto classes; timed."""
    t0 = time.perf_counter()
    import torch
    from transformers import AutoModel, AutoProcessor
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    t_import = time.perf_counter()
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    if dtype != torch.float32:
        model = model.to(dtype)
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    t_load = time.perf_counter()
    return torch, model, processor, dtype, {"import_s": t_import - t0, "load_s": t_load - t_import}


def _sequences(out):
    return out.sequences if hasattr(out, "sequences") else out  # generate() may return a ModelOutput


def _cut(row: list[int]) -> tuple[list[int], int]:
    """Generated row -> (ids after the decoder start, cut before the first EOS), tokens generated incl. EOS."""
    ids = row[1:] if row and row[0] == BOS else row
    if EOS in ids:
        end = ids.index(EOS)
        return ids[:end], end + 1
    return ids, len(ids)


def _run_once(torch, model, processor, dtype, samples, mode: str, max_segments: int | None) -> dict:
    """features -> generate -> notes, each stage timed; `mode` naive = no cache, one segment per call."""
    t0 = time.perf_counter()
    inputs = processor(audio=samples, sampling_rate=GOLDEN_SAMPLE_RATE, return_tensors="pt")
    features = inputs["input_features"]
    starts = inputs["segment_start_times"]
    if max_segments is not None:
        features, starts = features[:max_segments], starts[:max_segments]
    features = features.to(dtype)
    t1 = time.perf_counter()
    if mode == "naive":
        rows = [_sequences(model.generate(input_features=seg[None], use_cache=False))[0] for seg in features]
        width = max(len(r) for r in rows)
        tokens = torch.zeros(len(rows), width, dtype=rows[0].dtype)  # pad 0 after EOS, as generate() does
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = r
    else:
        tokens = _sequences(model.generate(input_features=features))
    t2 = time.perf_counter()
    result = processor.batch_decode(tokens, {"segment_start_times": starts}, return_midi=True)
    t3 = time.perf_counter()
    return {"features_s": t1 - t0, "generate_s": t2 - t1, "decode_s": t3 - t2, "compute_s": t3 - t0,
            "tokens": tokens, "num_notes": len(result["notes"]), "num_segments": len(features)}


def _token_stats(tokens, golden: list[list[int]] | None) -> dict:
    rows = tokens.tolist()
    cut = [_cut(r) for r in rows]
    stats = {"generated_per_segment": [n for _, n in cut], "generated_tokens": sum(n for _, n in cut),
             "generate_width": len(rows[0]) if rows else 0}
    if golden is not None:
        same = [ids == golden[i] for i, (ids, _) in enumerate(cut)]
        stats.update(golden_match=sum(same), golden_compared=len(same))
    return stats


def _warm_up(torch, model, features) -> None:
    """One short generate() so that first-call costs (allocator, lazy init) stay out of the timed runs."""
    model.generate(input_features=features[:1], max_new_tokens=4)


def worker_transcribe(args: argparse.Namespace) -> None:
    """Row 2: golden case, model loaded once, `--reps` timed runs of features + generate + decode."""
    import numpy as np

    torch, model, processor, dtype, load = _load(args.model, args.dtype)
    case = Path(args.shared) / "golden" / args.case
    samples = np.load(case / "samples.npy")
    golden = json.loads((case / "tokens.json").read_text())["segments"]
    inputs = processor(audio=samples, sampling_rate=GOLDEN_SAMPLE_RATE, return_tensors="pt")
    _warm_up(torch, model, inputs["input_features"].to(dtype))
    runs = [_run_once(torch, model, processor, dtype, samples, args.mode, args.max_segments) for _ in range(args.reps)]
    stats = _token_stats(runs[-1]["tokens"], golden)
    total_segments = int(inputs["input_features"].shape[0])
    _emit({
        "case": args.case, "mode": args.mode, "dtype": args.dtype, "torch_threads": torch.get_num_threads(),
        **load, "audio_s": len(samples) / GOLDEN_SAMPLE_RATE, "total_segments": total_segments,
        "golden_generated_per_segment": [len(g) + 1 for g in golden],  # + EOS
        "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in runs], **stats,
    })


def _long_audio(np, shared: str, seconds: float):
    """Rows 3 and 8: the three golden cases concatenated and tiled to `seconds` of 16 kHz samples."""
    one = np.concatenate([np.load(Path(shared) / "golden" / c / "samples.npy") for c in LONG_CASES])
    n = int(seconds * GOLDEN_SAMPLE_RATE)
    return np.tile(one, -(-n // len(one)))[:n].astype(np.float32)


def worker_long(args: argparse.Namespace) -> None:
    """Row 3: the three golden cases concatenated and repeated to `--seconds`; one run, peak RSS."""
    import resource

    import numpy as np

    torch, model, processor, dtype, load = _load(args.model, "float32")
    samples = _long_audio(np, args.shared, args.seconds)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run = _run_once(torch, model, processor, dtype, samples, "fast", None)
    stats = _token_stats(run.pop("tokens"), None)
    _emit({"torch_threads": torch.get_num_threads(), **load, "audio_s": len(samples) / GOLDEN_SAMPLE_RATE,
           "ru_maxrss_after_load_kb": rss_loaded, "runs": [run], **stats})


def worker_matmul(args: argparse.Namespace) -> None:
    """Rows 4 and 5: float32 (256x512) @ (512x1024), GFLOP/s on all threads (the rate of the floor) and on one; and
    the rate at which a sum reads 512 MB of float32 from memory (row 5's floor: far beyond any cache, as the
    decoder's weights and keys/values are).

    Many short rounds (~20 matmuls each), best taken: on a shared VM a long round is almost always hit
    by another process, and two OpenMP threads then wait on each other."""
    import torch

    a, b = torch.randn(256, 512), torch.randn(512, 1024)
    out = torch.empty(256, 1024)
    flop = 2 * 256 * 512 * 1024
    inner, rounds = 20, 40

    def rates(matmul) -> list[float]:
        for _ in range(20):
            matmul()
        found = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(inner):
                matmul()
            found.append(flop * inner / (time.perf_counter() - t0) / 1e9)
        return found

    threads = torch.get_num_threads()
    all_threads = rates(lambda: torch.matmul(a, b, out=out))
    # The same product as the fast path runs its linears: oneDNN on a weight packed once (often 2x MKL here).
    onednn = []
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), 256)
        linear = torch.ops.mkldnn._linear_pointwise.default
        onednn = rates(lambda: linear(a, packed, None, "none", [], ""))
    torch.set_num_threads(1)
    one_thread = rates(lambda: torch.matmul(a, b, out=out))
    torch.set_num_threads(threads)
    memory = torch.ones(2**27)  # 512 MB
    reads = []
    for _ in range(12):
        t0 = time.perf_counter()
        memory.sum()
        reads.append(memory.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    _emit({"gflops_best": max(all_threads), "gflops_median": statistics.median(all_threads),
           "gflops_1thread_best": max(one_thread), "gflops_1thread_median": statistics.median(one_thread),
           "gflops_onednn_best": max(onednn, default=0.0),
           "read_gbs_best": max(reads), "read_gbs_median": statistics.median(reads), "read_rounds": len(reads),
           "torch_threads": threads, "rounds": rounds, "matmuls_per_round": inner})


# rows 5 / 7: the golden case repeated to --dense-seconds, by its letter; b (drums, bass, synths) unless said
DENSE_CASES = {name[0]: name for name in LONG_CASES}
PRECISION_MODES = ("float32", "autocast-bfloat16", "bfloat16")
# row 6 on CUDA: also float16, and each mode with CUDA graphs
GPU_PRECISION_MODES = ("float32", "float32+graphs", "autocast-bfloat16", "autocast-bfloat16+graphs", "autocast-float16",
                       "autocast-float16+graphs", "bfloat16+graphs", "float16+graphs")


def worker_frames(args: argparse.Namespace) -> None:
    """Rows 5 / 7's input: golden case `--case` repeated to `--seconds`, through the processor, saved as (segments,
    256, 512)."""
    import numpy as np
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    one = np.load(Path(args.shared) / "golden" / args.case / "samples.npy")
    n = int(args.seconds * GOLDEN_SAMPLE_RATE)
    samples = np.tile(one, -(-n // len(one)))[:n].astype(np.float32)
    features = processor(audio=samples, sampling_rate=GOLDEN_SAMPLE_RATE, return_tensors="np")["input_features"]
    np.save(args.out, features.astype(np.float32))
    _emit({"audio_s": len(samples) / GOLDEN_SAMPLE_RATE, "segments": int(features.shape[0])})


def _generate_mode(torch, model, features, mode: str, device: str, pool: int | None = None):
    """generate() of all segments in a precision mode: float32, bfloat16 / float16 (a cast copy of the model),
    unless the model already has that dtype, or autocast-bfloat16 / autocast-float16 (float32 weights,
    `torch.autocast` around generate: the mixed mode);
    a "+graphs" suffix passes `cuda_graphs=True` (else False: eager), "+eosN" `eos_check_interval=N`, "+sdpa" decodes
    with SDPA attention (`_sdpa_decoding`); `pool`: segment_batch_size (default: generation_config's)."""
    mode, graphs, interval, sdpa = _mode_options(mode)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(mode.split("-")[-1], torch.float32)
    kwargs = {} if pool is None else {"segment_batch_size": pool}
    kwargs["cuda_graphs"] = graphs  # without "+graphs": eager, though graphs are generate()'s CUDA default
    if interval is not None:  # else generation_config's, per device type (8 on CUDA, 1 on CPU)
        kwargs["eos_check_interval"] = interval
    if mode.startswith("autocast"):
        with torch.autocast(device, dtype=dtype), _sdpa_decoding(model, sdpa):
            return _sequences(model.generate(input_features=features, **kwargs))
    if dtype != torch.float32 and model.dtype != dtype:
        model = copy.deepcopy(model).to(dtype)  # a cast copy: the float32 model stays exact for the next mode
    with _sdpa_decoding(model, sdpa):
        return _sequences(model.generate(input_features=features.to(dtype), **kwargs))


@contextlib.contextmanager
def _sdpa_decoding(model, enabled: bool):
    """"+sdpa": the fast path's attention through SDPA, not as matmuls, as generate() decoded on CUDA until
    2026-11-27 (its `pack` told not to run attention as matmuls): the two compared in one run."""
    if not enabled:
        yield
        return
    own = vars(model).get("pack")  # an instance attribute set before this, restored after
    pack = model.pack
    model.pack = lambda rows, onednn, matmul_attention, fuse=True: pack(rows, onednn, False, fuse)
    try:
        yield
    finally:
        if own is None:
            del model.pack
        else:
            model.pack = own


def _mode_options(mode: str) -> tuple[str, bool, int | None, bool]:
    """"autocast-bfloat16+graphs+eos8" -> ("autocast-bfloat16", True, 8, False): the precision, whether CUDA graphs
    are asked, the steps between the host's looks for finished segments (None without "+eosN": the model's
    default), and whether attention runs through SDPA ("+sdpa")."""
    precision, *extras = mode.split("+")
    graphs, interval, sdpa = False, None, False
    for extra in extras:
        if extra == "graphs" and not graphs:
            graphs = True
        elif extra.startswith("eos") and extra[3:].isdigit() and int(extra[3:]) >= 1 and interval is None:
            interval = int(extra[3:])
        elif extra == "sdpa" and not sdpa:
            sdpa = True
        else:
            raise ValueError(f"mode {mode!r}: the suffixes are '+graphs', '+eosN' (N >= 1) and '+sdpa', each at "
                             "most once")
    return precision, graphs, interval, sdpa


def _device_timing(torch, device: str):
    """(sync, info): `sync()` waits for the device's queued work before a clock is read; `info()` names the GPU and
    its peak memory for the JSON line (empty on CPU)."""
    if not device.startswith("cuda"):
        return (lambda: None), dict
    return torch.cuda.synchronize, lambda: {"cuda_device": torch.cuda.get_device_name(),
                                            "cuda_peak_gb": torch.cuda.max_memory_allocated() / 1e9}


def worker_port(args: argparse.Namespace) -> None:
    """Row 5 / 7: the port's generate() on saved frames, best of `--reps` after a warm-up; writes its tokens in
    tokens.json's format (`--out`), so the original can be compared with them."""
    import numpy as np

    torch, model, _, _, load = _load(args.model, "float32")
    model = model.to(args.device)
    features = torch.from_numpy(np.load(args.frames)).to(args.device)
    _generate_mode(torch, model, features[:1], args.mode, args.device)  # warm-up
    sync, device_info = _device_timing(torch, args.device)
    best = float("inf")
    for _ in range(args.reps):
        sync()
        t0 = time.perf_counter()
        tokens = _generate_mode(torch, model, features, args.mode, args.device, args.pool)
        sync()
        best = min(best, time.perf_counter() - t0)
    cuts = [_cut(row) for row in tokens.tolist()]  # (ids, tokens generated incl. EOS) per segment
    rows, generated = [ids for ids, _ in cuts], [count for _, count in cuts]
    Path(args.out).write_text(json.dumps({"segments": rows}))
    _emit({**load, "mode": args.mode, "device": args.device, "pool": args.pool, "segments": len(rows), "generate_s": best,
           "tokens": sum(generated), "generated_per_segment": generated, "torch_threads": torch.get_num_threads(),
           **device_info()})


def worker_precision(args: argparse.Namespace) -> None:
    """Row 6: per golden case and precision mode on `--device`, segments with ids identical to float32 and to the
    golden tokens, and notes equal to float32's (%). The seconds include each mode's first-call costs."""
    from collections import Counter

    import numpy as np

    torch, model, processor, _, load = _load(args.model, "float32")
    model = model.to(args.device)
    sync, device_info = _device_timing(torch, args.device)
    out = {}
    for case in LONG_CASES:
        folder = Path(args.shared) / "golden" / case
        golden = json.loads((folder / "tokens.json").read_text())["segments"]
        inputs = processor(audio=np.load(folder / "samples.npy"), sampling_rate=GOLDEN_SAMPLE_RATE, return_tensors="pt")
        reference = None
        for mode in args.modes.split(","):
            sync()
            t0 = time.perf_counter()
            try:
                tokens = _generate_mode(torch, model, inputs["input_features"].to(args.device), mode, args.device)
            except Exception as error:  # a "+graphs" / "+eosN" mode: recorded, the others still run
                out.setdefault(case, {})[mode] = _experimental_failed(mode, error)
                continue
            sync()
            seconds = time.perf_counter() - t0
            tokens = tokens.cpu()
            rows = [_cut(row)[0] for row in tokens.tolist()]
            notes = Counter(processor.batch_decode(tokens, inputs, return_midi=False)["notes"])
            if reference is None:
                reference = rows, notes
            same = sum(a == b for a, b in zip(rows, reference[0]))
            equal_notes = sum((notes & reference[1]).values())
            out.setdefault(case, {})[mode] = {
                "segments": len(rows), "segments_identical": same, "notes": sum(notes.values()),
                "segments_identical_to_golden": sum(a == b for a, b in zip(rows, golden)),
                "notes_float32": sum(reference[1].values()), "notes_equal": equal_notes,
                "notes_equal_pct": 100.0 * equal_notes / max(1, sum(reference[1].values())), "generate_s": seconds}
    _emit({**load, "device": args.device, "cases": out, **device_info()})


def worker_end_to_end(args: argparse.Namespace) -> None:
    """Row 8: `--seconds` of the row-3 audio on `--device` in precision `--mode`, after a warm-up: features
    (processor; on CUDA its torch path on the GPU, as a GPU user would run it: numpy on one CPU core took ~27 s for
    the hour on 2 cores here) -> generate() -> notes, timed as one; writes the ids (cut at EOS) and notes to
    `--out`."""
    import numpy as np

    torch, model, processor, _, load = _load(args.model, "float32")
    cast = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(_mode_options(args.mode)[0])
    model = model.to(args.device, cast)  # a cast mode's cast happens here, outside the timed run

    def generate(features):
        return _generate_mode(torch, model, features.to(args.device), args.mode, args.device)

    samples = _long_audio(np, args.shared, args.seconds)
    sync, device_info = _device_timing(torch, args.device)
    features_on = {"device": args.device} if args.device.startswith("cuda") else {}
    extractor = processor.feature_extractor
    segment = extractor.frames_per_segment * extractor.hop_length * GOLDEN_SAMPLE_RATE // extractor.sampling_rate
    generate(processor(audio=samples[: 4 * segment], sampling_rate=GOLDEN_SAMPLE_RATE, return_tensors="pt",
                       **features_on)["input_features"])
    sync()
    t0 = time.perf_counter()
    inputs = processor(audio=samples, sampling_rate=GOLDEN_SAMPLE_RATE, return_tensors="pt", **features_on)
    sync()  # the frames stay on the GPU: their kernels may still be queued
    t1 = time.perf_counter()
    tokens = generate(inputs["input_features"]).cpu()
    sync()
    t2 = time.perf_counter()
    notes = processor.batch_decode(tokens, inputs, return_midi=False)["notes"]
    t3 = time.perf_counter()
    cut = [_cut(row) for row in tokens.tolist()]
    Path(args.out).write_text(json.dumps({"segments": [ids for ids, _ in cut], "notes": [list(n) for n in notes]}))
    _emit({**load, "mode": args.mode, "device": args.device, "audio_s": len(samples) / GOLDEN_SAMPLE_RATE,
           "segments": len(cut), "tokens": sum(n for _, n in cut), "notes": len(notes),
           "features_device": features_on.get("device", "cpu (numpy)"),
           "features_s": t1 - t0, "generate_s": t2 - t1, "decode_s": t3 - t2, "end_to_end_s": t3 - t0,
           "torch_threads": torch.get_num_threads(), **device_info()})


def worker_cuda(args: argparse.Namespace) -> None:
    """Whether the GPU section (row 7) can run here."""
    import torch

    _emit({"cuda": torch.cuda.is_available()})


WORKERS = {"import": worker_import, "import_reload": worker_import_reload, "read": worker_read, "transcribe": worker_transcribe,
           "long": worker_long, "matmul": worker_matmul, "frames": worker_frames, "port": worker_port,
           "precision": worker_precision, "cuda": worker_cuda, "end_to_end": worker_end_to_end}


# --------------------------------------------------------------------------------------------- parent


class WorkerFailed(RuntimeError):
    pass


THREAD_ENV: dict[str, str] = {}  # --threads N: torch's thread count (OpenMP, MKL)
# --threads N: every process pinned to N cores. XLA's CPU client sizes its pools by the cores it may run on, not by
# its flags (jax 0.10: a jitted matmul used 1.9 cores with the single-thread flag set, 1.0 pinned to one core).
PINNED_CPUS: set[int] | None = None
LOADAVG: list[dict] = []  # the 1-minute load average at the start and end of every process: other agents share the cores
MODULES_CACHE: Path | None = None  # set in main(): a private HF_MODULES_CACHE inside the temporary folder


def run_process(cmd: list[str], label: str, expect_json: bool = True, env: dict[str, str] | None = None
                ) -> tuple[float, dict | None]:
    """Run one whole process (`env`: variables set in its environment, None to unset one); (wall seconds, its JSON
    line or None). Raises WorkerFailed on a non-zero exit or on a worker that printed no JSON line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONUNBUFFERED": "1", **THREAD_ENV,
           **(env or {})}
    env = {name: value for name, value in env.items() if value is not None}
    if MODULES_CACHE is not None:
        # transformers copies a local folder's remote code to HF_MODULES_CACHE/transformers_modules/<folder name>;
        # shared with other processes loading another folder named `mt3`, it could run their copy of the code.
        env["HF_MODULES_CACHE"] = str(MODULES_CACHE)
    print(f"  [{time.strftime('%H:%M:%S')}] {label} ...", file=sys.stderr, flush=True)
    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    pin = (lambda: os.sched_setaffinity(0, PINNED_CPUS)) if PINNED_CPUS else None
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, preexec_fn=pin)
    wall = time.perf_counter() - t0
    LOADAVG.append({"process": label, "loadavg_1min_start": load_start, "loadavg_1min_end": os.getloadavg()[0],
                    "wall_s": wall})
    if proc.returncode != 0:
        raise WorkerFailed(f"{label}: exit status {proc.returncode}\n{proc.stderr[-4000:]}{proc.stdout[-2000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if expect_json and not lines:
        raise WorkerFailed(f"{label}: printed no JSON line\n{proc.stderr[-4000:]}{proc.stdout[-2000:]}")
    print(f"  [{time.strftime('%H:%M:%S')}] {label}: {wall:.2f} s", file=sys.stderr, flush=True)
    return wall, (json.loads(lines[-1]) if lines else None)


def worker_cmd(name: str, *extra: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", name, *extra]


def _median(values: list[float]) -> float:
    return statistics.median(values)


def row_conversion(checkpoint: Path, out_dir: Path, reps: int, first_wall: float, tmp: Path) -> dict:
    convert = [sys.executable, "-m", "convert_mt3", str(checkpoint), str(out_dir), "--quiet", "--overwrite"]
    conv = [first_wall] + [run_process(convert, f"row 1: convert #{i + 2}", expect_json=False)[0] for i in range(reps - 1)]
    imports, reload_imports, reads, read_json = [], [], [], []
    for i in range(reps):
        wall, _ = run_process(worker_cmd("import"), f"row 1: import torch, transformers #{i + 1}")
        imports.append(wall)
        wall, _ = run_process(worker_cmd("import_reload"), f"row 1: imports of the reload check #{i + 1}")
        reload_imports.append(wall)
        wall, js = run_process(worker_cmd("read", "--checkpoint", str(checkpoint), "--out", str(tmp / "plain.safetensors")),
                               f"row 1: plain read #{i + 1}")
        reads.append(wall)
        read_json.append(js)
    floor = _median(imports) + _median(reads)
    with_reload = _median(reload_imports) + _median(reads)
    return {"convert_wall_s": conv, "import_wall_s": imports, "import_reload_wall_s": reload_imports,
            "read_wall_s": reads, "read_inproc": read_json, "convert_median_s": _median(conv), "floor_s": floor,
            "ratio": _median(conv) / floor, "floor_with_reload_imports_s": with_reload,
            "ratio_with_reload_imports": _median(conv) / with_reload}


def summarize_transcription(wall: float, js: dict, config: dict) -> dict:
    compute = [r["compute_s"] for r in js["runs"]]
    generate = [r["generate_s"] for r in js["runs"]]
    seg_run = js["runs"][0]["num_segments"]
    scale = 1.0
    if seg_run < js["total_segments"]:
        # Only the first segments ran (--quick): scale by the naive path's FLOPs of the golden token counts,
        # all segments over the segments that ran (compute-bound; see naive_flops).
        g = js["golden_generated_per_segment"]
        scale = naive_flops(config, g) / naive_flops(config, g[:seg_run])
    s_per_s = _median(compute) * scale / js["audio_s"]
    return {**js, "process_wall_s": wall, "compute_min_s": min(compute), "compute_median_s": _median(compute),
            "generate_median_s": _median(generate), "extrapolation_factor": scale,
            "extrapolated": scale != 1.0, "s_per_audio_s": s_per_s, "s_per_audio_s_min": min(compute) * scale / js["audio_s"],
            "speedup_vs_original": ORIGINAL_S_PER_S / s_per_s}


def row_transcription(model_dir: Path, shared: Path, reps: int, quick: bool) -> dict:
    config = model_sizes(model_dir)
    common = ["--model", str(model_dir), "--shared", str(shared), "--case", MAIN_CASE]
    out = {}
    naive = common + ["--mode", "naive", "--dtype", "float32", "--reps", "1"] + (["--max-segments", "2"] if quick else [])
    wall, js = run_process(worker_cmd("transcribe", *naive), "row 2: naive (no cache, one segment per call)" + (" [2 segments]" if quick else ""))
    out["naive_float32"] = summarize_transcription(wall, js, config)
    for dtype in ("float32", "bfloat16"):
        args = common + ["--mode", "fast", "--dtype", dtype, "--reps", str(reps)]
        wall, js = run_process(worker_cmd("transcribe", *args), f"row 2: generate() {dtype} x{reps}")
        out[f"fast_{dtype}"] = summarize_transcription(wall, js, config)
    return out


def row_long(model_dir: Path, shared: Path, seconds: float) -> dict:
    wall, js = run_process(worker_cmd("long", "--model", str(model_dir), "--shared", str(shared), "--seconds", str(seconds)),
                           f"row 3: {seconds:.0f} s input, generate() float32")
    run = js["runs"][0]
    return {**js, "process_wall_s": wall, "compute_s": run["compute_s"], "s_per_audio_s": run["compute_s"] / js["audio_s"],
            "peak_rss_gb": js["ru_maxrss_kb"] * 1024 / 1e9}  # ru_maxrss is in KiB; GB = 1e9 bytes


ORIGINAL_TOOL = "tools/original_mt3.py"  # in the shared folder: magenta/mt3's Flax network, jitted greedy loop
TARGET_DENSE_RATIO = 6.0


def _experimental_failed(mode: str, error: Exception) -> dict:
    """A "+graphs", "+eosN" or "+sdpa" mode that failed is recorded, and the other modes still run (CUDA graphs
    failed in every mode on the first GPU run); a failing plain precision mode stops the bench."""
    if mode != _mode_options(mode)[0]:
        print(f"  {mode} failed (recorded in the JSON)", file=sys.stderr, flush=True)
        return {"failed": str(error)[-3000:]}
    raise error


def _same_segments(a: Path, b: Path) -> int:
    """Segments with identical ids in two token files of the same frames (tokens.json's format)."""
    first, second = (json.loads(f.read_text())["segments"] for f in (a, b))
    if len(first) != len(second):
        raise WorkerFailed(f"{a.name} has {len(first)} segments, {b.name} {len(second)}: not the same frames")
    return sum(x == y for x, y in zip(first, second))


def row_original(model_dir: Path, shared: Path, tmp: Path, seconds: float, reps: int, device: str = "cpu",
                 pools: tuple[int, ...] = (), gpu_modes: tuple[str, ...] = (), original_batches: tuple[int, ...] = (8,),
                 case: str = "b", out: dict | None = None, save=lambda: None) -> dict:
    """Rows 5 / 7: the port's generate() and the original network on the same frames, in this run; the original is
    given the port's float32 tokens (eager on CUDA) as its `--golden`, so `segments_identical` counts segments where
    both agree.

    The original runs once per static batch size (a batch of 8 decodes 30 segments in four loops one after the
    other, one of 32 in one) and, where JAX runs on a GPU, also with JAX_DEFAULT_MATMUL_PRECISION=highest: JAX's
    default float32 matmul there rounds its inputs (TF32 on an H100/H200), the port's does not; the ratio is taken
    against its fastest run. The port is compared in `generate()`'s float32 defaults for the device (`compared`:
    plain float32 on CPU; on CUDA "float32+graphs", CUDA graphs and EOS looked for every 8 steps, since a "float32"
    mode there is eager, the reference the other modes' ids are counted against; eager float32 is compared when
    the graphs mode fails, which is recorded as any "+graphs" mode is). That mode runs again after the
    original's runs, and its best of both processes is compared: the VM's speed drifts during a run, and the second
    process shows by how much (its ids should equal the first's; the count is recorded, not enforced, since GPUs
    need not repeat bitwise). Into `out` (returned), `save()` after each process: a run cut short (a device's time
    limit) keeps what it measured."""
    frames = tmp / f"dense_{case}_{seconds:.0f}s.npy"
    if not frames.exists():
        run_process(worker_cmd("frames", "--model", str(model_dir), "--shared", str(shared), "--case",
                               DENSE_CASES[case], "--seconds", str(seconds), "--out", str(frames)),
                    f"dense {seconds:.0f} s clip: features")
    compared = "float32" if device == "cpu" else "float32+graphs"
    out = {} if out is None else out
    runs = []  # the original's
    out.update(case=case, compared_mode=compared, original_runs=runs)
    modes = ("float32",) if device == "cpu" else tuple(dict.fromkeys(("float32", compared, *gpu_modes)))
    for mode in modes:
        tokens = tmp / f"port_{device}_{mode}.json"
        try:
            wall, js = run_process(worker_cmd("port", "--model", str(model_dir), "--frames", str(frames), "--device",
                                              device, "--mode", mode, "--reps", str(reps), "--out", str(tokens)),
                                   f"port generate() {device} {mode}, {seconds:.0f} s clip, best of {reps}")
        except WorkerFailed as error:
            out[f"port_{mode}"] = _experimental_failed(mode, error)
            save()
            continue
        out[f"port_{mode}"] = {**js, "process_wall_s": wall, "tokens_file": tokens.name}
        if mode != "float32":
            out[f"port_{mode}"]["segments_identical_to_float32"] = _same_segments(tmp / f"port_{device}_float32.json",
                                                                                  tokens)
        save()
    for pool in pools:
        label = f"port generate() {device} float32 segment_batch_size={pool}, {seconds:.0f} s clip, best of {reps}"
        wall, js = run_process(worker_cmd("port", "--model", str(model_dir), "--frames", str(frames), "--device", device,
                                          "--mode", "float32", "--pool", str(pool), "--reps", str(reps),
                                          "--out", str(tmp / f"port_{device}_pool{pool}.json")), label)
        same = _same_segments(tmp / f"port_{device}_float32.json", tmp / f"port_{device}_pool{pool}.json")
        out[f"port_float32_pool{pool}"] = {**js, "process_wall_s": wall, "segments_identical_to_default": same}
        save()
    for batch in original_batches:
        for precision in (None, "highest"):  # "highest" only where JAX runs on a GPU: XLA's CPU float32 is float32
            if precision and str(runs[-1]["device"]).lower().startswith("cpu"):
                break
            wall, js = run_process(
                [sys.executable, str(shared / ORIGINAL_TOOL), str(model_dir), str(frames), "--batch", str(batch),
                 "--repeat", str(reps), "--golden", str(tmp / f"port_{device}_float32.json")],
                f"original MT3 (flax), batch {batch}, matmul precision {precision or 'default'}, {seconds:.0f} s clip, "
                f"best of {reps}", env={"JAX_DEFAULT_MATMUL_PRECISION": precision})  # None: JAX's default, unset
            runs.append({**js, "process_wall_s": wall, "matmul_precision": precision or "default"})
            save()
    if "failed" in out[f"port_{compared}"]:
        compared = out["compared_mode"] = "float32"
    port = out[f"port_{compared}"]
    again = tmp / f"port_{device}_{compared}_again.json"
    wall, js = run_process(worker_cmd("port", "--model", str(model_dir), "--frames", str(frames), "--device", device,
                                      "--mode", compared, "--reps", str(reps), "--out", str(again)),
                           f"port generate() {device} {compared} again, after the original, best of {reps}")
    port.update(generate_s_per_process=[port["generate_s"], js["generate_s"]],
                generate_s=min(port["generate_s"], js["generate_s"]), process_wall_s_again=wall,
                segments_identical_between_processes=_same_segments(tmp / f"port_{device}_{compared}.json", again))
    best = min(runs, key=lambda run: run["decode_s"])
    out.update(original=best, audio_s=seconds, ratio=best["decode_s"] / port["generate_s"],
               port_s_per_s=port["generate_s"] / seconds, original_s_per_s=best["decode_s"] / seconds)
    save()
    return out


DEFAULT_ROWS = "1,2,3,4,5,6,7,8"
# row 7's modes besides float32 (eager, the reference of the others' ids) and float32+graphs (generate()'s CUDA
# defaults, the mode compared with the original): EOS looked for every step, autocast
GPU_MODES = ("float32+graphs", "float32+graphs+eos1", "autocast-bfloat16", "autocast-float16",
             "autocast-bfloat16+graphs", "autocast-float16+graphs")
E2E_MODES = ("float32", "autocast-bfloat16", "autocast-float16", "bfloat16", "float16", "float32+graphs",
             "float32+graphs+eos1", "autocast-bfloat16+graphs", "autocast-float16+graphs", "bfloat16+graphs")


def row_end_to_end(model_dir: Path, shared: Path, seconds: float, device: str, modes: tuple[str, ...],
                   reference: Path | None, save_dir: Path, out: dict, save) -> None:
    """Row 8 into `out`: one process per precision mode, `save()` after each; ids and notes compared with float32
    on `device` (the first mode) and, with `reference` (ids of a CPU float32 run of the same input, as this row
    saves them), with it."""
    from collections import Counter

    out.update(audio_s=seconds, device=device, modes={})
    base = None
    ref_rows = json.loads(reference.read_text())["segments"] if reference else None
    if reference:
        out["reference"] = str(reference)
    for mode in modes:
        tokens = save_dir / f"e2e_tokens_{device.replace(':', '')}_{mode}.json"
        try:
            wall, js = run_process(worker_cmd("end_to_end", "--model", str(model_dir), "--shared", str(shared),
                                              "--seconds", str(seconds), "--device", device, "--mode", mode,
                                              "--out", str(tokens)),
                                   f"row 8: {seconds:.0f} s end to end, {device} {mode}")
        except WorkerFailed as error:
            out["modes"][mode] = _experimental_failed(mode, error)
            save()
            continue
        got = json.loads(tokens.read_text())
        rows, notes = got["segments"], Counter(tuple(n) for n in got["notes"])
        if base is None:
            base = rows, notes
        entry = {**js, "process_wall_s": wall, "tokens_file": str(tokens),
                 "segments_identical_to_first": sum(a == b for a, b in zip(rows, base[0])),
                 "notes_equal_pct_to_first": 100.0 * sum((notes & base[1]).values()) / max(1, sum(base[1].values()))}
        if ref_rows is not None:
            entry["segments_identical_to_reference"] = sum(a == b for a, b in zip(rows, ref_rows))
            entry["reference_segments"] = len(ref_rows)
        out["modes"][mode] = entry
        save()


FLOP_FORMULA = (
    "per generated token at self-attention length t (1..n, n incl. EOS): "
    "L_dec*[2*(3*d*inner + inner*d + d*inner + inner*d + 3*d*d_ff) + 4*inner*t + 4*inner*F] + 2*d*V; "
    "per segment: F*2*depth*d + L_enc*F*[2*(4*d*inner + 3*d*d_ff) + 4*inner*F] (encoder) "
    "+ L_dec*2*2*F*d*inner (cross-attention keys/values); F = frames per segment, inner = heads*d_kv"
)


def model_sizes(model_dir: Path) -> dict:
    """The converted folder's config.json, with the feature extractor's `frames_per_segment` (the encoder's length)."""
    preprocessor = json.loads((model_dir / "preprocessor_config.json").read_text())
    return {**json.loads((model_dir / "config.json").read_text()), "frames_per_segment": preprocessor["frames_per_segment"]}


def decoder_weights(config: dict) -> int:
    """Parameters a decode step multiplies every row by: per layer q/k/v/out, cross-attention q/out and wi_0/wi_1/wo
    (the cross-attention keys/values are projected once per segment); and the logits."""
    d, dff, inner = config["d_model"], config["d_ff"], config["num_heads"] * config["d_kv"]
    return config["num_decoder_layers"] * (3 * d * inner + inner * d + d * inner + inner * d + 3 * d * dff) + d * config["vocab_size"]


def model_flops(config: dict, generated_per_segment: list[int]) -> dict:
    d, dff = config["d_model"], config["d_ff"]
    inner = config["num_heads"] * config["d_kv"]
    L_enc, L_dec, depth = config["num_layers"], config["num_decoder_layers"], config["input_depth"]
    F = config["frames_per_segment"]
    per_token_fixed = 2 * decoder_weights(config) + L_dec * 4 * inner * F
    tokens = sum(generated_per_segment)
    decoder = sum(n * per_token_fixed + L_dec * 4 * inner * n * (n + 1) / 2 for n in generated_per_segment)
    per_segment = F * 2 * depth * d + L_enc * F * (2 * (4 * d * inner + 3 * d * dff) + 4 * inner * F) + L_dec * 4 * F * d * inner
    segments = len(generated_per_segment) * per_segment
    return {"tokens": tokens, "segments": len(generated_per_segment), "per_token_fixed_flop": per_token_fixed,
            "per_segment_flop": per_segment, "decoder_gflop": decoder / 1e9, "encoder_gflop": segments / 1e9,
            "total_gflop": (decoder + segments) / 1e9}


def naive_flops(config: dict, generated_per_segment: list[int]) -> float:
    """FLOPs of generate(use_cache=False) one segment per call: step t (1..n) re-runs the decoder and the
    logits over all t positions, projects cross-attention keys/values of the segment's frames again, and does
    t x t self-attention; plus the encoder once per segment. Used only to extrapolate --quick's naive row."""
    d, inner = config["d_model"], config["num_heads"] * config["d_kv"]
    L_dec, F = config["num_decoder_layers"], config["frames_per_segment"]
    per_position = 2 * decoder_weights(config) + L_dec * 4 * inner * F
    per_step = L_dec * 4 * F * d * inner
    encoder = model_flops(config, [0])["per_segment_flop"] - per_step
    total = 0.0
    for n in generated_per_segment:
        total += encoder + sum(per_step + t * per_position + L_dec * 4 * inner * t * t for t in range(1, n + 1))
    return total


def floor_gflops(rate: dict) -> float:
    """The fastest float32 product measured (oneDNN, which the fast path uses, is usually the fastest; on a contended
    VM two OpenMP threads can fall below one thread's rate, and then the one-thread rate is the truer floor)."""
    return max(rate["gflops_best"], rate["gflops_1thread_best"], rate.get("gflops_onednn_best", 0.0))


def row_floor(config: dict, rate: dict, runs: dict[str, dict]) -> dict:
    gflops = floor_gflops(rate)
    out = {"matmul": rate, "floor_gflops": gflops, "formula": FLOP_FORMULA, "runs": {}}
    for name, run in runs.items():
        fl = model_flops(config, run["generated_per_segment"])
        floor_s = fl["total_gflop"] / gflops
        compute = run.get("compute_median_s", run.get("compute_s"))
        generate = run.get("generate_median_s", run["runs"][0]["generate_s"])
        out["runs"][name] = {**fl, "floor_s": floor_s, "floor_tokens_only_s": fl["decoder_gflop"] / gflops,
                             "compute_s": compute, "ratio_compute": compute / floor_s, "ratio_generate": generate / floor_s}
    return out


def dense_floor(config: dict, rate: dict, generated_per_segment: list[int]) -> dict:
    """Row 5: a lower bound on the port's float32 generate() of these tokens on this machine, from rates measured in
    the same run. The encoder and cross-attention keys/values at the best GEMM rate; the decoder at that rate or
    reading what it must at the measured memory read rate, whichever takes longer. A decode step reads the decoder's
    weights once (there are at least as many steps as the longest segment has tokens), and a row at token t its
    segment's cross-attention keys/values (one per frame) and t self-attention keys/values, in every layer."""
    gflops, read = floor_gflops(rate), rate["read_gbs_best"]
    flops = model_flops(config, generated_per_segment)
    inner, layers = config["num_heads"] * config["d_kv"], config["num_decoder_layers"]
    frames = config["frames_per_segment"]
    positions = sum(n * frames + n * (n + 1) // 2 for n in generated_per_segment)  # keys read per layer (and values)
    decoder_bytes = 4 * (max(generated_per_segment) * decoder_weights(config) + layers * 2 * inner * positions)
    encoder_s, compute_s = flops["encoder_gflop"] / gflops, flops["decoder_gflop"] / gflops
    read_s = decoder_bytes / 1e9 / read
    return {"gflops": gflops, "read_gbs": read, "encoder_s": encoder_s, "decoder_compute_s": compute_s,
            "decoder_read_gb": decoder_bytes / 1e9, "decoder_read_s": read_s,
            "floor_s": encoder_s + max(compute_s, read_s), "floor_serial_s": encoder_s + compute_s + read_s}


# --------------------------------------------------------------------------------------------- table


def hub_code_sha256(folder: Path) -> str:
    """One hash of the Hub code files in `folder` (`*_mt3.py`, by name and content)."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*_mt3.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def cpu_model() -> str:
    """The CPU's name (Linux: /proc/cpuinfo's first "model name"): VMs of one kind run on different CPUs, whose
    ratios differ."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def fmt_table(res: dict) -> str:
    lines = []
    m = res["machine"]
    lines.append(f"convert-mt3 benchmark  |  {m.get('cpu_model', '?')}  os.cpu_count()={m['cpu_count']}  torch threads={m.get('torch_threads', '?')}  "
                 f"torch {m.get('torch', '?')}  transformers {m.get('transformers', '?')}  python {m['python']}  "
                 f"{'QUICK' if res['quick'] else 'full'} run, {res['reps']} rep(s)  Hub code sha256 {m.get('hub_code_sha256', '?')}")
    if res.get("pinned_cpus"):
        lines.append(f"--threads: every process pinned to cores {res['pinned_cpus']}")
    if m.get("hub_code_matches_checkout") is False:
        lines.append("WARNING: the measured folder's Hub code differs from this checkout's convert_mt3/mt3/ (convert again to "
                     "measure the checkout)")
    lines.append(f"load average (1 min) at start / end: {m['loadavg_start']:.2f} / {m.get('loadavg_end', float('nan')):.2f}"
                 f"  (above {m['cpu_count']} = other processes shared the cores; compare ratios within this table)")
    if res.get("threads_env"):
        lines.append(f"--threads: every process ran with {res['threads_env']}")
    head = f"{'row':<4}{'measure':<58}{'value':>19}  {'reference':<22}{'ratio':>9}  {'target':<10}"
    lines += [head, "-" * len(head)]

    def add(row, what, value, ref="", ratio="", target=""):
        lines.append(f"{row:<4}{what:<58}{value:>19}  {ref:<22}{ratio:>9}  {target:<10}".rstrip())

    r1 = res["rows"].get("1")
    if r1:
        add("1", "convert real checkpoint, process wall (median)", f"{r1['convert_median_s']:.2f} s",
            f"floor {r1['floor_s']:.2f} s", f"{r1['ratio']:.2f}x", f"<= {TARGET_CONVERSION_RATIO}x")
        add("", "  floor: import torch+transformers (median)", f"{_median(r1['import_wall_s']):.2f} s")
        add("", "  floor: plain msgpack+gunzip+safetensors (med.)", f"{_median(r1['read_wall_s']):.2f} s")
        add("", "  not in the floor: imports of the reload check", f"{_median(r1['import_reload_wall_s']):.2f} s",
            "(AutoModel, PreTrainedModel, GenerationMixin, AutoProcessor)")
        add("", "  vs those imports + plain read", f"{r1['convert_median_s']:.2f} s",
            f"{r1['floor_with_reload_imports_s']:.2f} s", f"{r1['ratio_with_reload_imports']:.2f}x")
    r2 = res["rows"].get("2")
    if r2:
        labels = {"naive_float32": "naive: no cache, 1 segment/call, float32",
                  "fast_float32": "generate(), all segments, float32",
                  "fast_bfloat16": "generate(), all segments, bfloat16"}
        for key, label in labels.items():
            r = r2[key]
            est = " (est.)" if r["extrapolated"] else ""
            add("2", f"case a 20 s: {label}", f"{r['s_per_audio_s']:.3f} s/s{est}",
                f"original {ORIGINAL_S_PER_S} s/s", f"{r['speedup_vs_original']:.2f}x", "")
            add("", f"  golden-identical segments (load {r['load_s']:.2f} s, process {r['process_wall_s']:.0f} s)",
                f"{r['golden_match']}/{r['golden_compared']}")
            if r["extrapolated"]:
                add("", f"  ran {r['runs'][0]['num_segments']} of {r['total_segments']} segments; x{r['extrapolation_factor']:.1f} by naive FLOPs",
                    f"{r['compute_median_s']:.1f} s")
    r3 = res["rows"].get("3")
    if r3:
        add("3", f"{r3['audio_s']:.0f} s input (a+b+c repeated): generate() f32", f"{r3['s_per_audio_s']:.3f} s/s",
            f"target {TARGET_LONG_S_PER_S} s/s", f"{r3['s_per_audio_s'] / TARGET_LONG_S_PER_S:.2f}x", "<= 1x")
        add("", "  peak resident memory (ru_maxrss; GB = 1e9 bytes)", f"{r3['peak_rss_gb']:.2f} GB", f"target {TARGET_LONG_RSS_GB} GB",
            f"{r3['peak_rss_gb'] / TARGET_LONG_RSS_GB:.2f}x", "<= 1x")
    r4 = res["rows"].get("4")
    if r4:
        mm = r4["matmul"]
        add("4", f"matmul f32 256x512 @ 512x1024, {mm['torch_threads']} threads (best)", f"{mm['gflops_best']:.0f} GFLOP/s",
            "README: ~210 GFLOP/s", "", "")
        add("", f"  same, median of {mm['rounds']} rounds / 1 thread best", f"{mm['gflops_median']:.0f} / {mm['gflops_1thread_best']:.0f}")
        add("", "  same through oneDNN, packed weight (best)", f"{mm.get('gflops_onednn_best', 0):.0f} GFLOP/s",
            f"floor uses {r4['floor_gflops']:.0f}")
        for name, f in r4["runs"].items():
            add("", f"  {name}: {f['tokens']} tok, {f['total_gflop']:.0f} GFLOP -> floor", f"{f['floor_s']:.2f} s",
                f"compute {f['compute_s']:.2f} s", f"{f['ratio_compute']:.1f}x", "")
    for row, label in (("5", "cpu"), ("7", "cuda")):
        r = res["rows"].get(row)
        if not r:
            continue
        compared = r.get("compared_mode", "float32")  # results saved before 2026-11-28 compared plain float32
        o, p = r["original"], r[f"port_{compared}"]
        add(row, f"{r['audio_s']:.0f} s dense clip (case {r.get('case', 'b')} repeated), {label}: port {compared} "
                 "generate()",
            f"{p['generate_s']:.2f} s", f"original {o['decode_s']:.2f} s", f"{r['ratio']:.2f}x",
            f">= {TARGET_DENSE_RATIO:.0f}x" if row == "5" else ">= 3x")
        add("", f"  s per audio s: port / original ({o['device']}, jax {o['jax']}, batch {o['batch']}, "
                f"matmul {o.get('matmul_precision', 'default')})", f"{r['port_s_per_s']:.4f} / {r['original_s_per_s']:.4f}")
        if "generate_s_per_process" in p:
            add("", f"  port {compared}, two processes (before / after the original; same ids: "
                    f"{p.get('segments_identical_between_processes', '?')}/{p['segments']})",
                " / ".join(f"{t:.2f} s" for t in p["generate_s_per_process"]))
        for run in r.get("original_runs", []):
            if (run["batch"], run["matmul_precision"]) != (o["batch"], o.get("matmul_precision")):
                add("", f"  original, batch {run['batch']}, matmul {run['matmul_precision']} (segments = port's: "
                    f"{run['segments_identical']}/{run['segments_golden']})", f"{run['decode_s']:.2f} s")
        add("", "  segments with identical tokens, port vs original", f"{o['segments_identical']}/{o['segments_golden']}")
        add("", "  port peak resident memory (ru_maxrss)", f"{p['ru_maxrss_kb'] * 1024 / 1e9:.2f} GB")
        f = r.get("floor")
        if f:
            add("", "  floor here: encoder + max(decoder FLOPs, bytes read)", f"{f['floor_s']:.2f} s",
                f"{TARGET_DENSE_RATIO:.0f}x needs {f['needed_s']:.2f} s", f"{f['port_over_floor']:.2f}x")
            add("", f"  rates: {f['gflops']:.0f} GFLOP/s, read {f['read_gbs']:.1f} GB/s; decoder reads",
                f"{f['decoder_read_gb']:.1f} GB", f"serial {f['floor_serial_s']:.2f} s")
        for mode in (key[5:] for key, v in r.items() if key.startswith("port_") and isinstance(v, dict)):
            if mode != compared and "pool" not in mode:
                m = r[f"port_{mode}"]
                if "failed" in m:
                    add("", f"  port {mode} generate()", "FAILED (see the JSON)")
                    continue
                same = ("the others' reference" if mode == "float32" else
                        f"segments = f32's: {m['segments_identical_to_float32']}/{m['segments']}")
                add("", f"  port {mode} generate() ({same})", f"{m['generate_s']:.2f} s", "",
                    f"{o['decode_s'] / m['generate_s']:.2f}x")
        for key, v in r.items():
            if key.startswith("port_float32_pool"):
                add("", f"  port f32, segment_batch_size={v['pool']} (segments = default's: "
                    f"{v['segments_identical_to_default']}/{v['segments']})", f"{v['generate_s']:.2f} s", "",
                    f"{o['decode_s'] / v['generate_s']:.2f}x")
    r6 = res["rows"].get("6")
    if r6:
        for case, modes in r6["cases"].items():
            for mode, m in modes.items():
                if "failed" in m:
                    add("6", f"{case[:20]} {r6.get('device', 'cpu')} {mode}", "FAILED (see the JSON)")
                elif mode == "float32":
                    add("6", f"{case[:20]} {r6.get('device', 'cpu')} float32: segments = golden",
                        f"{m['segments_identical_to_golden']}/{m['segments']}", "", f"{m['generate_s']:.1f} s")
                else:
                    add("6", f"{case[:20]} {mode}: ids = f32 / notes = f32",
                        f"{m['segments_identical']}/{m['segments']}  {m['notes_equal_pct']:.1f}%",
                        f"golden {m['segments_identical_to_golden']}/{m['segments']}", f"{m['generate_s']:.1f} s")
    r8 = res["rows"].get("8")
    if r8:
        first = next(iter(r8["modes"]))
        for mode, m in r8["modes"].items():
            if "failed" in m:
                add("8", f"{r8['audio_s']:.0f} s end to end, {r8['device']} {mode}", "FAILED (see the JSON)")
                continue
            ref = (f"ref {m['segments_identical_to_reference']}/{m['reference_segments']}"
                   if "segments_identical_to_reference" in m else "")
            float32 = _mode_options(mode)[0] == "float32"  # with or without graphs
            target = ("<= 8 s" if float32 else "<= 4 s") if r8["device"].startswith("cuda") else ""
            add("8", f"{r8['audio_s']:.0f} s end to end, {r8['device']} {mode}", f"{m['end_to_end_s']:.2f} s",
                f"generate {m['generate_s']:.2f} s", "", target)
            add("", f"  vs {first}: segments identical / notes equal; {ref}",
                f"{m['segments_identical_to_first']}/{m['segments']}  {m['notes_equal_pct_to_first']:.1f}%")
    lines.append("")
    lines.append("row 5/7 ratio = original decode s / port generate s (higher is better); row 6: vs float32 of the port "
                 "and the golden tokens, last column = generate() seconds in that mode, first call included.")
    lines.append("ratios: row 1 = convert / floor; row 2 = speed-up over the original (1.05 s/s, higher is better); "
                 "row 3 = measured / target; row 4 = measured compute (features+generate+decode) / FLOP floor.")
    if r4:
        lines.append("FLOPs: " + r4["formula"])
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="naive path on 2 segments, extrapolated; 1 repetition")
    p.add_argument("--rows", default=DEFAULT_ROWS,
                   help="comma-separated rows to run (default all; 7 runs only with CUDA, 8 with CUDA or --e2e-device)")
    p.add_argument("--reps", type=int, help="repetitions of rows 1, 2, 5 and 7 (default 3, 1 with --quick)")
    p.add_argument("--long-seconds", type=float, default=300.0, help="length of the row-3 input (default 300)")
    p.add_argument("--dense-seconds", type=float, default=60.0, help="length of the row-5/7 clip (default 60)")
    p.add_argument("--dense-case", choices=sorted(DENSE_CASES), default="b",
                   help="rows 5 and 7: the golden case repeated to --dense-seconds (default b: drums, bass, synths)")
    p.add_argument("--pools", default="16",
                   help="row 5: segment_batch_size values timed besides the default (comma-separated, default 16)")
    p.add_argument("--threads", type=int,
                   help="run every process (port and original) on N threads, pinned to N cores (OMP_NUM_THREADS; "
                        "XLA follows the pinning): on a VM shared with other jobs, 1 avoids OpenMP threads waiting on "
                        "each other")
    p.add_argument("--original-batches", default="8,32",
                   help="rows 5 and 7: static batch sizes the original runs with, the ratio taken against its fastest "
                        "(default %(default)s: the colab's 8, and the 60 s clip's 30 segments in one batch)")
    p.add_argument("--gpu-modes", default=",".join(GPU_MODES),
                   help="row 7's modes besides float32 (eager) and float32+graphs (compared with the original; "
                        "default: all of %(default)s)")
    p.add_argument("--e2e-device", help="device of row 8 (default cuda, and row 8 is skipped without CUDA; cpu to run it here)")
    p.add_argument("--e2e-seconds", type=float, default=3600.0, help="length of the row-8 input (default 3600)")
    p.add_argument("--e2e-modes", default=",".join(E2E_MODES),
                   help="row 8's precision modes, float32 first (default: all of %(default)s)")
    p.add_argument("--e2e-reference", help="row 8: ids of a CPU float32 run of the same input (an e2e_tokens_cpu_float32.json)")
    p.add_argument("--model-dir", help="measure this converted folder instead of converting the checkpoint (no row 1)")
    p.add_argument("--json", default=str(REPO / "benchmarks" / "results.json"),
                   help="where to write every row as JSON (default benchmarks/results.json)")
    p.add_argument("--shared", default=os.environ.get("MT3_SHARED_DIR", str(REPO.parent / "shared")),
                   help="shared folder with checkpoints/mt3 and golden/ (default $MT3_SHARED_DIR or ../shared)")
    # worker mode
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--case", default=MAIN_CASE, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="fast", help=argparse.SUPPRESS)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help=argparse.SUPPRESS)
    p.add_argument("--max-segments", type=int, help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=300.0, help=argparse.SUPPRESS)
    p.add_argument("--frames", help=argparse.SUPPRESS)
    p.add_argument("--pool", type=int, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--modes", default=",".join(PRECISION_MODES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.reps is None:
        args.reps = 1 if args.quick else 3
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        WORKERS[args.worker](args)
        # Like `python -m convert_mt3`, skip the interpreter's module teardown, so row 1 compares like with like.
        sys.stdout.flush()
        os._exit(0)

    # SIGTERM -> SystemExit: subprocess.run kills the running worker and the temporary folder is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows = {r.strip() for r in args.rows.split(",") if r.strip()}
    if not rows <= {"1", "2", "3", "4", "5", "6", "7", "8"}:
        print(f"error: --rows takes 1 to 8; found {args.rows!r}", file=sys.stderr)
        return 2
    shared = Path(args.shared).resolve()
    checkpoint = shared / "checkpoints" / "mt3"
    given = Path(args.model_dir).resolve() if args.model_dir else None
    if given is not None:
        if not (given / "config.json").is_file():
            print(f"error: --model-dir {given}: no config.json; expected a folder convert-mt3 wrote", file=sys.stderr)
            return 2
        if args.rows == DEFAULT_ROWS:
            rows.discard("1")  # the default rows: all that a converted folder can measure
        elif "1" in rows:
            print("error: row 1 times the conversion, which needs the checkpoint: leave out --model-dir", file=sys.stderr)
            return 2
    elif not checkpoint.is_dir():
        print(f"error: {checkpoint}: no checkpoint; set MT3_SHARED_DIR or --shared, or give --model-dir", file=sys.stderr)
        return 2
    reference = Path(args.e2e_reference).resolve() if args.e2e_reference else None
    if reference is not None and not reference.is_file():
        print(f"error: --e2e-reference {reference}: no such file", file=sys.stderr)
        return 2

    batches = [b.strip() for b in args.original_batches.split(",") if b.strip()]
    if not batches or not all(b.isdigit() and int(b) >= 1 for b in batches):
        print(f"error: --original-batches {args.original_batches!r}: expected batch sizes >= 1, e.g. 8,32",
              file=sys.stderr)
        return 2
    original_batches = tuple(int(b) for b in batches)
    if args.threads is not None:
        global PINNED_CPUS
        available = sorted(os.sched_getaffinity(0))
        if not 1 <= args.threads <= len(available):
            print(f"error: --threads {args.threads}: expected 1 to the {len(available)} cores this process may run on",
                  file=sys.stderr)
            return 2
        PINNED_CPUS = set(available[: args.threads])
        THREAD_ENV.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    res = {"quick": args.quick, "reps": args.reps, "complete": False, "rows": {}, "threads_env": dict(THREAD_ENV),
           "pinned_cpus": sorted(PINNED_CPUS) if PINNED_CPUS else None,
           "machine": {"cpu_count": os.cpu_count(), "cpu_model": cpu_model(), "python": platform.python_version(),
                       "platform": platform.platform(),
                       "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                       "loadavg_start": os.getloadavg()[0]}}
    def save() -> None:
        """The rows so far, so that a run stopped part-way (a device's time limit) keeps them; the end adds the table."""
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))

    try:
        with tempfile.TemporaryDirectory(prefix="mt3-bench-") as tmp_name:
            tmp = Path(tmp_name)
            global MODULES_CACHE
            MODULES_CACHE = tmp / "hf_modules"
            model_dir = given or tmp / "mt3"
            if given is None:
                # Convert once (a few seconds); it is row 1's first sample and gives rows 2-4 their model and config.
                convert = [sys.executable, "-m", "convert_mt3", str(checkpoint), str(model_dir), "--quiet", "--overwrite"]
                first_wall, _ = run_process(convert, "convert (row 1 sample #1)", expect_json=False)
            res["machine"]["model_dir"] = str(model_dir)
            # Which model code was measured: the folder's own copy of convert_mt3/mt3/, as it was when converted (the
            # workers load that copy, not the checkout's).
            measured = hub_code_sha256(model_dir)
            res["machine"]["hub_code_sha256"] = measured
            res["machine"]["hub_code_matches_checkout"] = measured == hub_code_sha256(REPO / "convert_mt3" / "mt3")
            _, info = run_process(worker_cmd("import"), "versions / torch threads")
            res["machine"].update({k: info[k] for k in ("torch", "transformers", "torch_threads")})

            if "1" in rows:
                res["rows"]["1"] = row_conversion(checkpoint, model_dir, args.reps, first_wall, tmp)
            if "2" in rows:
                res["rows"]["2"] = row_transcription(model_dir, shared, args.reps, args.quick)
            if "3" in rows:
                res["rows"]["3"] = row_long(model_dir, shared, args.long_seconds)
            config = model_sizes(model_dir)
            if "4" in rows:
                _, rate = run_process(worker_cmd("matmul"), "row 4: matmul and memory read rates")
                runs = {}
                r2, r3 = res["rows"].get("2"), res["rows"].get("3")
                if r2:
                    runs["case a, generate() f32"] = r2["fast_float32"]
                    runs["case a, generate() bf16"] = r2["fast_bfloat16"]
                if r3:
                    runs[f"{r3['audio_s']:.0f} s, generate() f32"] = r3
                if not runs:  # no measured run: the floor of case a's golden tokens alone
                    golden = json.loads((shared / "golden" / MAIN_CASE / "tokens.json").read_text())["segments"]
                    runs["case a, golden tokens (no run)"] = {"generated_per_segment": [len(g) + 1 for g in golden],
                                                              "compute_s": float("nan"), "runs": [{"generate_s": float("nan")}]}
                res["rows"]["4"] = row_floor(config, rate, runs)
            if "5" in rows:
                pools = tuple(int(p) for p in args.pools.split(",") if p.strip())
                r5 = res["rows"]["5"] = {}
                row_original(model_dir, shared, tmp, args.dense_seconds, args.reps, pools=pools,
                             original_batches=original_batches, case=args.dense_case, out=r5, save=save)
                if "4" not in rows:
                    _, rate = run_process(worker_cmd("matmul"), "row 5 floor: matmul and memory read rates")
                port = r5["port_float32"]
                r5["floor"] = {**dense_floor(config, rate, port["generated_per_segment"]),
                               "needed_s": r5["original"]["decode_s"] / TARGET_DENSE_RATIO}
                r5["floor"]["port_over_floor"] = port["generate_s"] / r5["floor"]["floor_s"]
            save()
            needs_cuda = "6" in rows or "7" in rows or ("8" in rows and not args.e2e_device)
            cuda = needs_cuda and run_process(worker_cmd("cuda"), "CUDA present?")[1]["cuda"]
            if "6" in rows:  # on the GPU where there is one, in its modes
                device, modes = ("cuda", GPU_PRECISION_MODES) if cuda else ("cpu", PRECISION_MODES)
                _, res["rows"]["6"] = run_process(
                    worker_cmd("precision", "--model", str(model_dir), "--shared", str(shared), "--device", device,
                               "--modes", ",".join(modes)),
                    f"row 6: precision modes on the golden cases, {device}")
                save()
            if "7" in rows and cuda:
                gpu_modes = tuple(m.strip() for m in args.gpu_modes.split(",") if m.strip())
                res["rows"]["7"] = {}
                row_original(model_dir, shared, tmp, args.dense_seconds, args.reps, device="cuda", gpu_modes=gpu_modes,
                             original_batches=original_batches, case=args.dense_case, out=res["rows"]["7"], save=save)
            if "8" in rows:
                device = args.e2e_device or ("cuda" if cuda else None)
                if device:
                    modes = tuple(m.strip() for m in args.e2e_modes.split(",") if m.strip())
                    res["rows"]["8"] = {}
                    row_end_to_end(model_dir, shared, args.e2e_seconds, device, modes, reference,
                                   Path(args.json).resolve().parent, res["rows"]["8"], save)
    except WorkerFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    res["machine"]["loadavg_end"] = os.getloadavg()[0]
    res["complete"] = True
    res["loadavg_per_process"] = LOADAVG
    table = fmt_table(res)
    print(table)
    print()
    print(json.dumps(res, indent=1, default=str))
    Path(args.json).write_text(json.dumps({**res, "table": table}, indent=1, default=str))
    print(f"rows written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
