"""Shared fixtures: the path to ../shared (golden data, real checkpoint) when CI provides it."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from t5x_writer import TINY_MT3, TINY_MT3_GIN, tiny_arrays, write_t5x_checkpoint

SHARED_ENV = "MT3_SHARED_DIR"


def shared_dir() -> Path | None:
    """`$MT3_SHARED_DIR` if it is set and exists, else None (tests needing it skip; fail where it is set)."""
    value = os.environ.get(SHARED_ENV)
    if value and Path(value).is_dir():
        return Path(value)
    return None


@pytest.fixture
def mt3_ckpt(tmp_path) -> Path:
    """A tiny checkpoint with MT3's vocabulary and mel depth in `tmp_path/model/checkpoint_1000`, config.gin above it."""
    return write_t5x_checkpoint(tmp_path / "model" / "checkpoint_1000", tiny_arrays(**TINY_MT3), gin=TINY_MT3_GIN)


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if path is None:
        if os.environ.get(SHARED_ENV):  # CI sets it: a wrong path must fail there, not skip every golden test
            pytest.fail(f"${SHARED_ENV}={os.environ[SHARED_ENV]} is not a folder")
        pytest.skip(f"${SHARED_ENV} not set: no golden data / real checkpoint here")
    return path


@pytest.fixture(scope="session")
def golden_cases(shared: Path) -> list[Path]:
    cases = sorted(p for p in (shared / "golden").iterdir() if p.is_dir())
    assert cases, f"{shared / 'golden'}: no case folders (tests looping over them would pass without a check)"
    return cases


@pytest.fixture(scope="session")
def real_folder(shared: Path, tmp_path_factory) -> Path:
    """The real MT3 checkpoint converted once per session (float32), as README's main command does: with
    `--golden`, which refuses a model that misses the golden outputs."""
    from convert_mt3.__main__ import main

    out = tmp_path_factory.mktemp("real") / "mt3"
    assert main([str(shared / "checkpoints" / "mt3"), str(out), "--quiet", "--golden", str(shared / "golden")]) == 0
    return out


@pytest.fixture(scope="session")
def real_model(real_folder: Path):
    """The converted real model as a user loads it (safetensors + from_pretrained), float32, eval mode."""
    from convert_mt3.mt3.modeling_mt3 import MT3ForConditionalGeneration

    return MT3ForConditionalGeneration.from_pretrained(real_folder).eval()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A converted folder of a tiny random MT3 (real vocabulary and mel depth, 2+2 layers of width 32), decoding at
    most 64 ids a segment."""
    from convert_mt3.__main__ import main

    from t5x_writer import tiny_arrays, write_t5x_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    arrays = tiny_arrays(d_model=32, heads=2, d_kv=8, d_ff=48, layers=2, decoder_layers=2, vocab=1536, input_depth=512)
    gin = "network.T5Config.num_heads = 2\nnetwork.T5Config.head_dim = 8\nnetwork.T5Config.dropout_rate = 0.0\n"
    ckpt = write_t5x_checkpoint(root / "model" / "checkpoint_1000", arrays, gin=gin)
    assert main([str(ckpt), str(root / "tiny"), "--quiet"]) == 0
    # The random model rarely writes EOS: 64 ids a segment, not MT3's 1024, as a user may set it in the folder.
    settings = json.loads((root / "tiny" / "generation_config.json").read_text())
    (root / "tiny" / "generation_config.json").write_text(json.dumps({**settings, "max_length": 1 + 64}))
    return root / "tiny"


def run_isolated(code: str, cwd: Path, timeout: int = 1200, hub_user: bool = True) -> subprocess.CompletedProcess:
    """Run Python `code` as a Hub user would (if `hub_user`): every import of convert_mt3 fails, HF_HUB_OFFLINE=1,
    own module cache."""
    env = dict(os.environ)
    if hub_user:
        code = "import sys\nsys.modules['convert_mt3'] = None\n" + code
        env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(cwd / "modules"))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


SCRIPT_RUNS = Path(__file__).parent / "script_runs.py"


def run_isolated_script(script: Path, argvs: list[list[str]], cwd: Path, timeout: int = 600,
                        hub_user: bool = True) -> list[subprocess.CompletedProcess]:
    """`script ARGV` for each argv, in turn in one process set up as `run_isolated`'s (`timeout` a run): torch's and
    transformers' imports (~10 s a process on CI) are paid once. Each run gets its own exit status, stdout and
    stderr. A run starts with what earlier runs left in the process: imported modules (so output at import, and
    warnings given once, go to the first run that causes them: put the runs whose stderr is checked first), log
    levels set by --quiet. A run that must start bare, or changes sys.modules, gets a process of its own."""
    with tempfile.TemporaryDirectory() as folder:
        runs, results = Path(folder) / "runs.json", Path(folder) / "results.json"
        runs.write_text(json.dumps(argvs))
        argv = [str(SCRIPT_RUNS), str(script), str(runs), str(results)]
        code = f"import runpy, sys\nsys.argv = {argv!r}\nrunpy.run_path({str(SCRIPT_RUNS)!r}, run_name='__main__')\n"
        process = run_isolated(code, cwd, timeout * len(argvs), hub_user)
        assert process.returncode == 0, process.stderr[-3000:]
        # the process's own stderr holds only the harness's lines: the runs wrote theirs to their own files
        assert all(line.startswith("run: ") for line in process.stderr.splitlines()), process.stderr[-3000:]
        outcomes = json.loads(results.read_text())
    return [subprocess.CompletedProcess([str(script), *argv], *outcome) for argv, outcome in zip(argvs, outcomes, strict=True)]
