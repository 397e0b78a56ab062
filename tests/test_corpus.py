"""examples/transcribe_corpus.py: datasets + accelerate recipe; 2 CPU processes give what one process gives."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile

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
    args = [str(RECIPE), str(tiny_folder), str(audio)]
    single = run([sys.executable, *args, str(tmp_path / "one.jsonl"), "--files-per-map-batch", "2"], tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    # torchrun, as `accelerate launch --multi_gpu` does for GPUs (accelerate's own multi-CPU launch needs mpirun).
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    double = run([*launch, *args, str(tmp_path / "two.jsonl"), "--files-per-map-batch", "2", "--cpu"], tmp_path)
    assert double.returncode == 0, double.stderr[-3000:]
    assert "process 0/2: 3 files" in double.stdout and "process 1/2: 2 files" in double.stdout, double.stdout
    one = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    print(f"{len(one)} files, {sum(len(r['notes']) for r in one)} notes; 2 processes identical: {one == two}")
    assert [Path(r["path"]).name for r in one] == ["a.wav", "b.flac", "d.wav", "e.ogg", "c.wav"]
    assert sum(len(r["notes"]) for r in one) > 0
    assert two == one
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # shares joined and removed
