"""Shared fixtures: the path to ../shared (golden data, real checkpoint) when CI provides it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from t5x_writer import TINY_MT3, TINY_MT3_GIN, tiny_arrays, write_t5x_checkpoint

SHARED_ENV = "MT3_SHARED_DIR"


def shared_dir() -> Path | None:
    """`$MT3_SHARED_DIR` if it is set and exists, else None (tests needing it skip)."""
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
        pytest.skip(f"${SHARED_ENV} not set or missing: no golden data / real checkpoint here")
    return path


@pytest.fixture(scope="session")
def golden_cases(shared: Path) -> list[Path]:
    return sorted(p for p in (shared / "golden").iterdir() if p.is_dir())


@pytest.fixture(scope="session")
def real_folder(shared: Path, tmp_path_factory) -> Path:
    """The real MT3 checkpoint converted once per session (float32)."""
    from convert_mt3.__main__ import main

    out = tmp_path_factory.mktemp("real") / "mt3"
    assert main([str(shared / "checkpoints" / "mt3"), str(out), "--quiet"]) == 0
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
    (root / "tiny" / "generation_config.json").write_text(json.dumps({**settings, "max_new_tokens": 64}))
    return root / "tiny"


def run_isolated(code: str, cwd: Path, timeout: int = 1200) -> subprocess.CompletedProcess:
    """Run Python `code` as a Hub user would: every import of convert_mt3 fails, HF_HUB_OFFLINE=1, own module cache."""
    code = "import sys\nsys.modules['convert_mt3'] = None\n" + code
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(cwd / "modules")}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# Runs a script as __main__ once per argv. sys.stdout/sys.stderr become stand-ins writing to the current run's
# buffers, so what binds them in one run (logging handlers, tqdm) writes to whichever run is in progress.
_SCRIPT_RUNS = """
import io, json, runpy, sys, traceback


class Current(io.TextIOBase):
    def __init__(self):
        self.text = io.StringIO()

    def writable(self):
        return True

    def write(self, text):
        return self.text.write(text)


real_stdout = sys.stdout
sys.stdout, sys.stderr = Current(), Current()
results = []
for argv in ARGVS:
    sys.stdout.text, sys.stderr.text = io.StringIO(), io.StringIO()
    sys.argv = [SCRIPT, *argv]
    try:
        runpy.run_path(SCRIPT, run_name="__main__")
        status = 0
    except SystemExit as stop:  # as the interpreter maps it to an exit status
        status = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
        if not isinstance(stop.code, int | None):
            print(stop.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        status = 1
    results.append([status, sys.stdout.text.getvalue(), sys.stderr.text.getvalue()])
real_stdout.write("\\n" + MARK + json.dumps(results))
"""
_MARK = "results of the runs: "


def run_isolated_script(script: Path, argvs: list[list[str]], cwd: Path, timeout: int = 1200,
                        hub_user: bool = True) -> list[subprocess.CompletedProcess]:
    """`script ARGV` for each argv, all in one process (as `run_isolated` runs code if `hub_user`): torch's and
    transformers' imports (~10 s a process on CI) are paid once. Each run gets its own exit status, stdout and
    stderr; a run starts with the modules earlier runs imported, so a run that changes sys.modules gets a process of
    its own."""
    code = f"ARGVS, SCRIPT, MARK = {argvs!r}, {str(script)!r}, {_MARK!r}\n" + _SCRIPT_RUNS
    process = (run_isolated(code, cwd, timeout) if hub_user else
               subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout))
    assert process.returncode == 0 and _MARK in process.stdout, process.stderr[-3000:]
    runs = json.loads(process.stdout.rsplit(_MARK, 1)[1])
    return [subprocess.CompletedProcess([str(script), *argv], *run) for argv, run in zip(argvs, runs, strict=True)]
