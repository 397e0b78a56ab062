"""Where a batched decode step's time goes, on one device: a tool for the sessions that get a GPU.

    python3 benchmarks/profile_step.py --device cuda --rows 256 --at 100,1000 --modes eager,graphs --out DIR

A randomly initialised MT3 of the published configuration (`MT3Config()`: no weights to carry, and a step's kernels
and shapes do not depend on the values) decodes `--rows` segments of random frames through `MT3GreedyPool`, with an
EOS id that never occurs, so every row stays until the end. All rows start together, so they share one position:
`--at P` times and profiles the steps from position P (the self-attention then reads P + 1 keys, rounded up to the
cache's bucket) for `--steps` steps. For each (mode, P) it writes `profile_MODE_P.txt` (torch.profiler's table,
by device time on CUDA), `trace_MODE_P.json` (Chrome trace) and one line of `summary.json`: seconds per step, and
the bytes a step must read (decoder weights, cross- and self-attention keys/values, at the model's dtype: under
`--autocast` the keys/values take half that) over that time.

Modes: `eager`, `graphs` (the step replayed as CUDA graphs, generate()'s CUDA default), and `compiled` /
`compiled+graphs`: the same step through `torch.compile` (`--compile-backend`, inductor by default: it fuses the
norms, residual adds and GELU into fewer kernels), an experiment that `generate()` does not offer. It asks whether
fewer kernels a step would reach what 3x the original needs on a GPU (README, "GPU"); compilation happens before
the timed steps (the summary counts the graphs compiled), and the linears run without oneDNN's packed layout,
which inductor cannot lower.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import decoder_weights  # noqa: E402  (bench.py: standard library only at import)

from convert_mt3.mt3.configuration_mt3 import MT3Config  # noqa: E402
from convert_mt3.mt3.generation_mt3 import MT3GreedyPool, MT3SlotCache  # noqa: E402
from convert_mt3.mt3.modeling_mt3 import MT3ForConditionalGeneration  # noqa: E402

FRAMES = 256  # encoder frames per segment


def step_bytes(config: MT3Config, rows: int, keys: int, element: int) -> dict[str, int]:
    """Bytes one decode step reads at least: the decoder's weights once, and every row's cross-attention
    keys/values (FRAMES each) and self-attention keys/values (`keys` each), in every layer."""
    inner, layers = config.num_heads * config.d_kv, config.num_decoder_layers
    return {
        "weights": decoder_weights(config.to_dict()) * element,
        "cross_attention": rows * layers * 2 * FRAMES * inner * element,
        "self_attention": rows * layers * 2 * keys * inner * element,
    }


def profile_steps(model, features, mode: str, at: int, steps: int, device: torch.device,
                  compile_backend: str = "inductor") -> tuple[float, str, object]:
    """Decode until every row is at position `at`, then time and profile `steps` steps: (seconds per step, the
    profiler's table, the profiler)."""
    compiled = mode.startswith("compiled")
    pool = MT3GreedyPool(model, features.shape[0], cuda_graphs=mode.endswith("graphs"),
                         use_onednn=False if compiled else None)
    cuda = device.type == "cuda"
    profiler = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
    state = {"step": 0, "start": 0.0, "seconds": None}
    reserve = MT3SlotCache.reserve

    def counting_reserve(cache, positions):  # called once before every step, graphs or not
        if state["step"] in (at, at + steps):
            if cuda:
                torch.cuda.synchronize(device)
            if state["step"] == at:
                profiler.start()
                state["start"] = time.perf_counter()
            else:
                state["seconds"] = (time.perf_counter() - state["start"]) / steps
                profiler.stop()
        state["step"] += 1
        return reserve(cache, positions)

    MT3SlotCache.reserve = counting_reserve
    if compiled:  # the instance's step only: other pools keep the class's
        torch._dynamo.reset()  # this run compiles, and counts, its own graphs
        torch._dynamo.utils.counters.clear()
        # one graph per key length until the lengths turn symbolic: more than the default limit of 8, past which
        # Dynamo would run the step eagerly without a word
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        pool._step = torch.compile(pool._step, backend=compile_backend)
    try:
        # one more step than profiled, so that the last profiled one ends before `reserve` stops the profiler
        pool.generate(features, at + steps + 1, [-1], 0, 0)
    finally:
        MT3SlotCache.reserve = reserve
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=60)
    return state["seconds"], table, profiler


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", type=int, default=256, help="segments decoded at once (the pool's rows)")
    p.add_argument("--at", default="100,1000", help="positions at which to profile, comma-separated")
    p.add_argument("--steps", type=int, default=20, help="steps profiled at each position")
    p.add_argument("--modes", default="eager,graphs",
                   help="eager, graphs, compiled, compiled+graphs (the graphs modes are skipped off CUDA)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled modes")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="model cast")
    p.add_argument("--autocast", choices=["bfloat16", "float16"], help="decode under torch.autocast (mixed mode)")
    p.add_argument("--out", required=True, help="folder for the tables, traces and summary.json")
    args = p.parse_args(argv)

    modes = args.modes.split(",")
    unknown = set(modes) - {"eager", "graphs", "compiled", "compiled+graphs"}
    if unknown:
        p.error(f"--modes: unknown {', '.join(sorted(unknown))} (eager, graphs, compiled, compiled+graphs)")
    positions = {}  # per mode: (position, keys read there)
    for mode in modes:
        bucket = MT3GreedyPool.key_bucket(args.rows, mode.endswith("graphs"))
        for at in (int(a) for a in args.at.split(",")):
            keys = MT3SlotCache.keys_for(at, bucket)
            first = keys - bucket  # the first position of this key length: graphs capture there
            if not first < at <= at + args.steps <= keys:
                p.error(f"--at {at} --steps {args.steps}: in mode {mode}, profile within positions {first + 1}.."
                        f"{keys - 1} (one key length of {bucket} positions, after its first step)")
            positions.setdefault(mode, []).append((at, keys))
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = MT3Config()
    model = MT3ForConditionalGeneration(config).eval().to(device, getattr(torch, args.dtype))
    features = torch.randn(args.rows, FRAMES, config.input_depth, device=device)
    element = torch.finfo(getattr(torch, args.dtype)).bits // 8
    summary = []
    for mode in modes:
        if mode.endswith("graphs") and device.type != "cuda":
            continue
        for at, keys in positions[mode]:
            with torch.autocast(device.type, getattr(torch, args.autocast or "float32"), enabled=bool(args.autocast)):
                seconds, table, profiler = profile_steps(model, features, mode, at, args.steps, device,
                                                         args.compile_backend)
            needed = step_bytes(config, args.rows, keys, element)
            line = {"mode": mode, "rows": args.rows, "position": at, "keys": keys, "dtype": args.dtype,
                    "autocast": args.autocast,
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "ms_per_step": round(seconds * 1e3, 3), "bytes_per_step": needed,
                    "GB_per_s": round(sum(needed.values()) / seconds / 1e9, 1)}
            if mode.startswith("compiled"):
                line.update(compile_backend=args.compile_backend,
                            compiled_graphs=torch._dynamo.utils.counters["stats"]["unique_graphs"])
            summary.append(line)
            (out / f"profile_{mode}_{at}.txt").write_text(table)
            profiler.export_chrome_trace(str(out / f"trace_{mode}_{at}.json"))
            print(json.dumps(line), flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
