"""Half precision runs: `torch.autocast("cpu", bfloat16)` around generate() (the documented mixed mode), a model cast
with `.to(bfloat16)` / `.to(float16)`, and `from_pretrained(dtype=...)`, on the tiny model and the real one, through the fast path and
through GenerationMixin. On the tiny models these assert that most ids agree with float32 or GenerationMixin
(`MIN_HALF_AGREEMENT`, since half precision may flip near-ties); the real model's agreement is printed here and
measured per golden case by `make bench` (precision row).
"""

import json

import numpy as np
import pytest
import torch
from test_fast_generate import MIN_HALF_AGREEMENT, half_agreement, reference
from test_modeling import frames, tiny_model

from convert_mt3.mt3.modeling_mt3 import MT3ForConditionalGeneration


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(max_target_length=30)


@pytest.mark.parametrize("path", ["fast", "hf-beams"])
def test_autocast_cpu_bfloat16_tiny(tiny, path):
    x = frames(5, seed=13)
    kwargs = {} if path == "fast" else {"num_beams": 2, "max_new_tokens": 8}
    want = tiny.generate(input_features=x, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = tiny.generate(input_features=x, segment_batch_size=2, **kwargs)
    assert got.shape[0] == 5 and half_agreement(got, want, f"autocast bf16 ({path}) vs float32") >= MIN_HALF_AGREEMENT


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_model_tiny(dtype):
    model = tiny_model(max_target_length=30).to(dtype)
    x = frames(5, seed=14).to(dtype)
    got = model.generate(input_features=x, segment_batch_size=2)
    want = reference(model, x)
    assert got.shape[0] == 5 and half_agreement(got, want, f"{dtype} fast vs GenerationMixin") >= MIN_HALF_AGREEMENT


def test_from_pretrained_dtype(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    model = MT3ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert model.decoder.logits_dense.weight.dtype == torch.bfloat16
    x = frames(2, seed=15)
    got = model.generate(input_features=x, max_new_tokens=4)
    assert got.shape == (2, 5)
    assert half_agreement(got, tiny.generate(input_features=x, max_new_tokens=4), "from_pretrained(dtype=bfloat16) vs float32") >= MIN_HALF_AGREEMENT


def test_real_model_half_precision(real_model, shared):
    """Two segments of golden case c, 48 steps: autocast bf16 (mixed), `.to(bfloat16)` and `.to(float16)` run."""
    x = torch.from_numpy(np.load(shared / "golden" / "c_ragtime_piano_recording" / "frames.npy"))[:2]
    golden = json.loads((shared / "golden" / "c_ragtime_piano_recording" / "tokens.json").read_text())["segments"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = real_model.generate(input_features=x, max_new_tokens=48)
    results = {"autocast bf16": mixed}
    for dtype in (torch.bfloat16, torch.float16):
        half = MT3ForConditionalGeneration(real_model.config)
        half.load_state_dict(real_model.state_dict())
        half = half.to(dtype).eval()
        results[f".to({dtype})"] = half.generate(input_features=x.to(dtype), max_new_tokens=48)
    for name, ids in results.items():
        assert ids.dtype == torch.long and ids.shape[0] == 2 and ids[:, 0].eq(0).all()
        same = sum(row[1:].tolist()[: len(g[:48])] == g[:48] for row, g in zip(ids, golden))
        print(f"\nreal model, {name}: {same}/2 segments' first 48 ids equal the golden ones")
