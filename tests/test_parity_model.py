"""Golden parity of the PyTorch MT3 model with the original Flax MT3 (../shared/golden, see its README.md).

Per golden case: encoder output and teacher-forced logits within stated tolerances, and `generate()` of all
segments as one batch reproducing the original greedy tokens exactly. bfloat16 / float16 agreement is printed,
and only a floor far below it asserted (half precision flips near-ties by design). Run with `-s` to see the
measured errors.
"""

import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GenerationMixin

from convert_mt3.mt3.modeling_mt3 import MT3ForConditionalGeneration

# Measured 5.1e-6 to 1.3e-5 (the three cases, CI's machine kinds): ~8x margin.
ENCODER_ATOL = 1e-4
# Measured 6.9e-5 to 9.2e-5 (the three cases, CI's machine kinds; float32 rounding over 16 layers): 2.7x margin. The golden logits
# reach 58-62 in magnitude, so this is also ~4e-6 relative to the largest.
LOGITS_ATOL = 2.5e-4


CASES = ["a_brahms_string_orchestra", "b_multi_instrument_drums_synth", "c_ragtime_piano_recording"]


@pytest.fixture(scope="module")
def case_data(shared: Path):
    cache = {}

    def load(name: str) -> dict:
        if name not in cache:
            folder = shared / "golden" / name
            if not folder.is_dir():
                pytest.fail(f"golden case {name} missing from {shared / 'golden'}")
            cache[name] = {
                "frames": torch.from_numpy(np.load(folder / "frames.npy")),
                "encoder_out": np.load(folder / "encoder_out.npy"),
                "logits": np.load(folder / "logits.npy"),
                "tokens": json.loads((folder / "tokens.json").read_text())["segments"],
            }
        return cache[name]

    return load


def test_converter_gate_uses_these_tolerances(capsys):
    """`--golden` refuses to write a folder that misses these tests' tolerances, and its help states them."""
    from convert_mt3.__main__ import parse_args
    from convert_mt3.parity import ENCODER_TOLERANCE, LOGITS_TOLERANCE

    assert (ENCODER_TOLERANCE, LOGITS_TOLERANCE) == (ENCODER_ATOL, LOGITS_ATOL)
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    stated = re.search(r"\(encoder ([0-9.e-]+), logits ([0-9.e-]+),", " ".join(capsys.readouterr().out.split()))
    assert stated and (float(stated[1]), float(stated[2])) == (ENCODER_ATOL, LOGITS_ATOL)


def test_golden_cases_present(golden_cases):
    assert sorted(p.name for p in golden_cases) == CASES


def padded_targets(tokens: list[int], length: int) -> list[int]:
    """Golden greedy output incl. EOS (1), then 0 padding, cut to `length`."""
    return (tokens + [1] + [0] * length)[:length]


@pytest.mark.parametrize("case", CASES)
def test_encoder_output(real_model, case_data, case):
    data = case_data(case)
    golden = data["encoder_out"]  # (2, 256, 512): segments 0 and 1
    with torch.no_grad():
        ours = real_model.get_encoder()(data["frames"][: len(golden)]).last_hidden_state.numpy()
    err = np.abs(ours - golden).max()
    print(f"\n[{case}] encoder max abs err {err:.3g} (max |golden| {np.abs(golden).max():.3g})")
    assert err <= ENCODER_ATOL


@pytest.mark.parametrize("case", CASES)
def test_teacher_forced_logits(real_model, case_data, case):
    data = case_data(case)
    golden = data["logits"]  # (2, 64, 1536)
    segments, length = golden.shape[:2]
    targets = torch.tensor([padded_targets(data["tokens"][i], length) for i in range(segments)])
    decoder_input_ids = torch.cat([torch.zeros(segments, 1, dtype=torch.long), targets[:, :-1]], dim=1)
    with torch.no_grad():
        ours = real_model(input_features=data["frames"][:segments], decoder_input_ids=decoder_input_ids).logits
    ours = ours.numpy()
    err = np.abs(ours - golden).max()
    rel = err / np.abs(golden).max()
    print(f"\n[{case}] logits max abs err {err:.3g}, relative to max |logit| {rel:.3g}")
    assert err <= LOGITS_ATOL
    assert np.array_equal(ours.argmax(-1), golden.argmax(-1))


def strip(sequence: torch.Tensor) -> list[int]:
    """Generated row -> ids after the start token, cut before the first EOS (as tokens.json stores them)."""
    ids = sequence[1:].tolist()
    return ids[: ids.index(1)] if 1 in ids else ids


GENERATE_PATHS = {
    # MT3GreedyPool over the model's layers, generation_config.segment_batch_size rows (CPU float32: matmul attention)
    "fast-default": lambda model, x: model.generate(input_features=x),
    # more segments than rows: refill and per-row positions
    "fast-pool4": lambda model, x: model.generate(input_features=x, segment_batch_size=4),
    # the same scheduler with SDPA attention, as it runs in half precision and on GPUs
    "fast-sdpa": lambda model, x: sys.modules[type(model).__module__].MT3GreedyPool(model, 16, matmul_attention=False).generate(
        x, model.generation_config.max_length - 1, [1], 0, 0  # the folder's limit: decoder start + new ids
    ),
    # GenerationMixin's greedy search, all segments as one batch
    "hf": lambda model, x: GenerationMixin.generate(model, input_features=x),
}


# The default fast path and GenerationMixin on every case; the refill (pool4) and SDPA variants of the same scheduler
# on the shortest (8 segments of 14-68 tokens: rows refill), as test_fast_generate checks them against GenerationMixin
# on tiny models (on cases a and b they took 513 s of a 2,436 s full local run on 2 cores, 2026-11-29).
GENERATE_RUNS = [(case, path) for case in CASES for path in GENERATE_PATHS
                 if path in ("fast-default", "hf") or case == CASES[2]]


@pytest.mark.parametrize("case, path", GENERATE_RUNS)
def test_generate_matches_golden_tokens(real_model, case_data, case, path):
    data = case_data(case)
    frames = data["frames"]  # (segments, 256, 512)
    start = time.perf_counter()
    with torch.no_grad():
        sequences = GENERATE_PATHS[path](real_model, frames)
    seconds = time.perf_counter() - start
    ours = [strip(row) for row in sequences]
    print(
        f"\n[{case}] generate float32 ({path}): {len(frames)} segments, {sequences.shape[1] - 1} steps, "
        f"{sum(len(t) + 1 for t in ours)} tokens in {seconds:.2f} s; segments identical to the golden ids "
        f"{sum(got == want for got, want in zip(ours, data['tokens']))}/{len(data['tokens'])}"
    )
    assert len(ours) == len(data["tokens"])
    for i, (got, want) in enumerate(zip(ours, data["tokens"])):
        first = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        assert got == want, f"segment {i}: {len(got)} vs {len(want)} tokens, first difference at {first}"
    # padding after EOS, width = 1 + longest, as GenerationMixin returns them
    assert sequences.shape[1] == 1 + max(len(t) + 1 for t in data["tokens"])


# Case a in bfloat16 decodes ~800 steps (~20 s on 2 cores): left out to keep this file short; float16 is slow on CPU.
HALF_RUNS = [(torch.bfloat16, CASES[1]), (torch.bfloat16, CASES[2]), (torch.float16, CASES[2])]
# Tokens at the same position as the golden ones, at the least: measured on a 2-core Intel Xeon VM (2026-11-28)
# bfloat16 73.8% (case b) and 87.7% (case c), float16 99.4% (case c). A floor, not a target: below it the cast
# model is broken, not merely rounding differently (a segment that flips once differs from there on).
HALF_FLOOR = {torch.bfloat16: 0.4, torch.float16: 0.8}


@pytest.fixture(scope="module")
def half_model(real_model):
    """The real model cast to a half dtype, one copy per dtype (float16 is slow on CPU: one short case only)."""
    models = {}

    def get(dtype: torch.dtype) -> MT3ForConditionalGeneration:
        if dtype not in models:
            model = MT3ForConditionalGeneration(real_model.config)
            model.load_state_dict(real_model.state_dict())
            models[dtype] = model.to(dtype).eval()
        return models[dtype]

    return get


@pytest.mark.parametrize(("dtype", "case"), HALF_RUNS, ids=[f"{str(d)[6:]}-{c[0]}" for d, c in HALF_RUNS])
def test_half_precision_agreement(half_model, case_data, dtype, case):
    """Share of segments / tokens identical to the float32 original: reported, and held above `HALF_FLOOR`."""
    data = case_data(case)
    start = time.perf_counter()
    with torch.no_grad():
        sequences = half_model(dtype).generate(input_features=data["frames"].to(dtype))
    seconds = time.perf_counter() - start
    ours = [strip(row) for row in sequences]
    assert len(ours) == len(data["tokens"])
    steps = sequences.shape[1] - 1
    same_segments = sum(got == want for got, want in zip(ours, data["tokens"]))
    same_tokens = sum(sum(a == b for a, b in zip(got, want)) for got, want in zip(ours, data["tokens"]))
    total = sum(len(want) for want in data["tokens"])
    print(
        f"\n[{case}] {dtype}: identical segments {same_segments}/{len(ours)}, "
        f"tokens at the same position {same_tokens}/{total} ({same_tokens / total:.1%}), "
        f"{steps} steps in {seconds:.1f} s"
    )
    assert same_tokens / total >= HALF_FLOOR[dtype]
