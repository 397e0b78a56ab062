"""MT3 on a CUDA device; every test skips without one, so CI (CPU only) never needs a GPU.

On a GPU machine: `pytest --noconftest tests/test_cuda.py` (conftest's T5X writer needs zarr, which a GPU image may
lack). The fast generate() must give GenerationMixin's greedy ids there too, eager and with CUDA graphs, and every
precision mode must run. With MT3_SHARED_DIR (golden samples and tokens) and MT3_MODEL_DIR (a converted folder; without
it, conftest converts the real checkpoint), float32 must reproduce the golden tokens of every case from the processor's features, as on CPU.
"""

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from test_fast_generate import early_eos, reference
from test_modeling import frames, tiny_model
from test_parity_model import strip

from convert_mt3.mt3.generation_mt3 import MT3GreedyPool, _StepGraphs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def model():
    return tiny_model(max_target_length=150).cuda()


@pytest.fixture
def captures(monkeypatch) -> list[int]:
    """Counts the CUDA graphs captured (the real capture runs)."""
    seen = []
    capture = _StepGraphs._capture

    def counting(self, step):
        seen.append(1)
        return capture(self, step)

    monkeypatch.setattr(_StepGraphs, "_capture", counting)
    return seen


@pytest.mark.parametrize(
    ("pool", "graphs", "interval"), [(16, False, 1), (3, False, 1), (3, True, 1), (7, True, 1), (3, True, 4), (16, True, 8)]
)
def test_fast_generate_matches_hf_greedy(model, captures, pool, graphs, interval):
    """Refill (pool < 9 segments), idle rows leaving, graphs per shape, EOS looked for every `interval` steps."""
    x = frames(9, seed=16).cuda()
    eos = early_eos(model, x)
    want = reference(model, x, eos_token_id=eos)
    got = model.generate(input_features=x, eos_token_id=eos, segment_batch_size=pool, cuda_graphs=graphs,
                         eos_check_interval=interval)
    assert got.device == x.device
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert bool(captures) == graphs


def test_graphs_across_storage_growth(captures):
    """Rows past 256 positions grow the self-attention storage while graphs exist (bucket 128 at few rows): the
    graphs are dropped and recaptured on the new storage, and the ids stay GenerationMixin's."""
    long_model = tiny_model(max_target_length=300, max_position_embeddings=512).cuda()
    x = frames(9, seed=16).cuda()
    eos = early_eos(long_model, x, past=256)
    want = reference(long_model, x, eos_token_id=eos)
    got = long_model.generate(input_features=x, eos_token_id=eos, segment_batch_size=3)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert captures and got.shape[1] > 257


def test_graphs_are_the_cuda_default(model, captures, monkeypatch):
    """On unless the generation config or the call turns them off; logits processors keep the eager step. The
    host looks for finished segments every 8 steps on CUDA by default."""
    from transformers import LogitsProcessorList, MinLengthLogitsProcessor

    x = frames(4, seed=3).cuda()
    eager = model.generate(input_features=x, cuda_graphs=False)
    assert not captures
    torch.testing.assert_close(model.generate(input_features=x), eager, atol=0, rtol=0)
    assert captures
    captures.clear()
    processors = LogitsProcessorList([MinLengthLogitsProcessor(0, eos_token_id=1, device="cuda")])
    model.generate(input_features=x, logits_processor=processors)
    config = copy.deepcopy(model.generation_config)
    config.cuda_graphs = False
    model.generate(input_features=x, generation_config=config)
    assert not captures
    original_init, intervals = MT3GreedyPool.__init__, []

    def recording_init(self, *args, **kwargs):
        intervals.append(kwargs["eos_check_interval"])
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(MT3GreedyPool, "__init__", recording_init)
    torch.testing.assert_close(model.generate(input_features=x), eager, atol=0, rtol=0)
    assert intervals == [8]


def test_decoding_attends_by_matmuls_where_measured_faster(model, monkeypatch):
    """On CUDA the decode attends through matmuls in float32 (SDPA's float32 kernel for a boolean mask took 90% of
    a 256-row step on an H200) and in half precision above 64 rows; the ids are checked by the tests above."""
    seen = []
    pack = model.pack

    def recording(rows, onednn, matmul, fuse=True):
        seen.append(matmul)
        pack(rows, onednn, matmul, fuse)

    monkeypatch.setattr(model, "pack", recording)
    x = frames(2, seed=3).cuda()
    model.generate(input_features=x)
    with torch.autocast("cuda", dtype=torch.float16):
        model.generate(input_features=x)
    assert seen == [True, False]
    assert MT3GreedyPool.attends_by_matmuls("cuda", torch.float16, False, 65)
    assert not MT3GreedyPool.attends_by_matmuls("cuda", torch.bfloat16, False, 64)


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("mode", ["autocast-bfloat16", "autocast-float16", "bfloat16", "float16"])
def test_half_precision_runs(model, captures, mode, graphs):
    """torch.autocast around generate() and a cast model both decode; agreement with float32 is printed (measured
    on the real model per golden case by `make bench`, row 6)."""
    x = frames(9, seed=16).cuda()
    want = model.generate(input_features=x, cuda_graphs=False)
    dtype = getattr(torch, mode.split("-")[-1])
    if mode.startswith("autocast"):
        with torch.autocast("cuda", dtype=dtype):
            got = model.generate(input_features=x, cuda_graphs=graphs)
    else:
        got = copy.deepcopy(model).to(dtype).generate(input_features=x.to(dtype), cuda_graphs=graphs)
    assert got.dtype == torch.long and got.device == x.device and got.shape[0] == 9 and got[:, 0].eq(0).all()
    assert int(got.max()) < model.config.vocab_size and bool(captures) == graphs
    same = sum(strip(a) == strip(b) for a, b in zip(got, want))
    print(f"\n{mode} graphs={graphs}: {same}/9 segments equal float32's")


def test_features_on_cuda_match_numpy():
    """The feature extractor's torch path on the GPU (float64 STFT), as `make bench` row 8 runs it."""
    from test_features import TOL_TORCH_VS_NUMPY

    from convert_mt3.mt3.feature_extraction_mt3 import MT3FeatureExtractor

    samples = np.random.default_rng(0).standard_normal(32768 * 3 + 1000).astype(np.float32) * 0.1
    extractor = MT3FeatureExtractor()
    on_gpu = extractor(samples, sampling_rate=16000, device="cuda")["input_features"]
    error = np.abs(on_gpu - extractor(samples, sampling_rate=16000)["input_features"]).max()
    print(f"\nfeatures, torch on CUDA vs numpy: max abs error {error:.2e}")
    assert error <= TOL_TORCH_VS_NUMPY
    kept = extractor(samples, sampling_rate=16000, device="cuda", return_tensors="pt")["input_features"]
    assert kept.device.type == "cuda" and np.array_equal(kept.cpu().numpy(), on_gpu)  # stays on the GPU, same values


@pytest.fixture(scope="module")
def real(request):
    """(model on CUDA, processor, golden case folders) from MT3_MODEL_DIR and MT3_SHARED_DIR; without MT3_MODEL_DIR,
    the real checkpoint converted by conftest's fixture, where conftest is loaded (not under --noconftest)."""
    model_dir, shared = os.environ.get("MT3_MODEL_DIR"), os.environ.get("MT3_SHARED_DIR")
    if shared and not model_dir:
        try:
            model_dir = str(request.getfixturevalue("real_folder"))
        except pytest.FixtureLookupError:
            pass
    if not (model_dir and shared and Path(model_dir, "model.safetensors").is_file() and Path(shared, "golden").is_dir()):
        pytest.skip("MT3_MODEL_DIR (a converted folder) and MT3_SHARED_DIR (golden data) not both set")
    from convert_mt3.mt3.modeling_mt3 import MT3ForConditionalGeneration
    from convert_mt3.mt3.processing_mt3 import MT3Processor

    model = MT3ForConditionalGeneration.from_pretrained(model_dir).cuda().eval()
    cases = sorted(p for p in Path(shared, "golden").iterdir() if (p / "samples.npy").is_file())
    return model, MT3Processor.from_pretrained(model_dir), cases


@pytest.mark.parametrize("graphs", [False, True])
def test_real_model_golden_tokens(real, captures, graphs):
    """float32 on CUDA, through the fast path: every golden segment's ids, and the same ids as GenerationMixin."""
    model, processor, cases = real
    for case in cases:
        samples = np.load(case / "samples.npy")
        golden = json.loads((case / "tokens.json").read_text())["segments"]
        x = processor(audio=samples, sampling_rate=processor.feature_extractor.sampling_rate,
                      return_tensors="pt")["input_features"].cuda()
        got = model.generate(input_features=x, cuda_graphs=graphs)
        same = sum(strip(row) == ids for row, ids in zip(got, golden))
        print(f"\n{case.name}, CUDA float32 graphs={graphs}: {same}/{len(golden)} segments equal the golden tokens")
        assert same == len(golden) == len(got) and bool(captures) == graphs
        if not graphs:
            torch.testing.assert_close(got, reference(model, x), atol=0, rtol=0)
