"""Row 8's features on a GPU by chunk size (`torch_segments_per_chunk`): one hour of the tiled golden audio, each
size's frames compared with the first's. Usage: features_chunks.py MODEL_DIR SHARED_DIR [SIZES]"""

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench import _long_audio  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1]))
from convert_mt3.mt3.feature_extraction_mt3 import MT3FeatureExtractor  # noqa: E402

model_dir, shared = sys.argv[1], sys.argv[2]
sizes = [int(s) for s in (sys.argv[3] if len(sys.argv) > 3 else "16,64,256").split(",")]
audio = _long_audio(np, shared, 3600.0)
extractor = MT3FeatureExtractor.from_pretrained(model_dir)
first = None
for size in sizes:
    extractor.torch_segments_per_chunk = size
    extractor(audio[: 16000 * 60], sampling_rate=16000, return_tensors="pt", device="cuda")  # warm-up
    times = []
    for _ in range(2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        frames = extractor(audio, sampling_rate=16000, return_tensors="pt", device="cuda")["input_features"]
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    first = frames if first is None else first
    print(f"chunk {size}: {min(times):.3f} s (best of 2: {', '.join(f'{t:.3f}' for t in times)}), "
          f"{tuple(frames.shape)} on {frames.device}, equal to chunk {sizes[0]}: {torch.equal(frames, first)}",
          flush=True)
