"""Randomly corrupted checkpoints: every run ends in a conversion or one error line, never a traceback or a leftover.

Each case copies a tiny checkpoint written in the real on-disk format, corrupts it one way (bytes flipped, a file
truncated, removed or replaced by a symlink / FIFO, a `.zarray` field or a msgpack spec altered) and runs
`python -m convert_mt3` on it as a whole process, with a 30 s limit; its peak memory comes from wait4.
CI runs a few cases; `make fuzz` runs 200 (MT3_FUZZ_CASES) and prints the counts.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import msgpack
import numpy as np
import pytest

from t5x_writer import TINY_MT3, TINY_MT3_GIN, tiny_arrays, write_t5x_checkpoint

CASES = int(os.environ.get("MT3_FUZZ_CASES", "6"))
SEED = int(os.environ.get("MT3_FUZZ_SEED", "0"))
TIME_LIMIT_S = 30
MEMORY_LIMIT_BYTES = 2e9
TINY = {**TINY_MT3, "layers": 1, "decoder_layers": 1}

ZARRAY_VALUES = {
    "shape": [[200_000, 200_000], [-1, 4], "32", [32], [0, 0], [32, 48, 1], None, [2**62, 2**62]],
    "chunks": [[0, 48], [1, 1], [2**40, 2**40], "all", [7, 5], None, [-3, 48]],
    "dtype": ["<f8", "|O", "|V8", 5, None, "<f4", "bfloat16"],
    "compressor": [None, {"id": "blosc"}, "gzip", {}, {"id": "zlib"}, [1]],
    "order": ["F", None, 3],
    "filters": [[{"id": "delta", "dtype": "<f4"}], "x"],
    "dimension_separator": ["/", "..", None, "."],
}


def _flip(file: Path, rng) -> str:
    data = bytearray(file.read_bytes())
    if not data:
        return "flip (empty file)"
    for _ in range(int(rng.integers(1, 9))):
        data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
    file.write_bytes(bytes(data))
    return "flip"


def _truncate(file: Path, rng) -> str:
    data = file.read_bytes()
    file.write_bytes(data[: int(rng.integers(len(data) + 1))] if data else b"")
    return "truncate"


def _remove(file: Path, rng) -> str:
    if rng.random() < 0.3 and file.parent.name.startswith("target."):
        shutil.rmtree(file.parent)
        return "remove folder"
    file.unlink()
    return "remove"


def _symlink(file: Path, rng, outside: Path) -> str:
    choices = ["/dev/zero", "/dev/urandom", "/etc/passwd", str(outside / "big.bin"), str(outside / "fifo"),
               "../checkpoint", file.name, "/nonexistent/path"]
    target = choices[int(rng.integers(len(choices)))]
    file.unlink()
    file.symlink_to(target)
    return f"symlink -> {target if not target.startswith(str(outside)) else Path(target).name}"


def _alter_zarray(file: Path, rng) -> str:
    meta = json.loads(file.read_text())
    if rng.random() < 0.15:
        file.write_text(["[]", "null", "{", '{"shape": 1}', "\x00" * 100][int(rng.integers(5))])
        return "zarray junk"
    field = sorted(ZARRAY_VALUES)[int(rng.integers(len(ZARRAY_VALUES)))]
    values = ZARRAY_VALUES[field]
    meta[field] = values[int(rng.integers(len(values)))]
    file.write_text(json.dumps(meta))
    return f"zarray {field}"


def _alter_spec(ckpt: Path, rng) -> str:
    tree = msgpack.unpackb((ckpt / "checkpoint").read_bytes(), strict_map_key=False)
    spec = tree["optimizer"]["target"]["decoder"]["logits_dense"]["kernel"]
    change = int(rng.integers(6))
    if change == 0:
        spec["kvstore"]["path"] = ["../../", "/dev/", "target.decoder.token_embedder.embedding/", 7][int(rng.integers(4))]
    elif change == 1:
        spec["metadata"]["shape"] = [[10**9, 10**9], "x", [-5], [32, 1536, 2]][int(rng.integers(4))]
    elif change == 2:
        spec["driver"] = "n5"
    elif change == 3:
        spec["kvstore"] = "gfile"
    elif change == 4:
        tree["optimizer"]["target"]["decoder"]["logits_dense"]["kernel"] = [1, 2, 3]
    else:
        tree["optimizer"]["state"]["step"] = {"not": "a step"}
    (ckpt / "checkpoint").write_bytes(msgpack.packb(tree))
    return f"spec change {change}"


def corrupt(ckpt: Path, rng, outside: Path) -> str:
    """Apply one random corruption to the checkpoint copy; returns what was done (for the counts)."""
    files = sorted(p for p in ckpt.rglob("*") if p.is_file())
    kind = int(rng.integers(6))
    if kind == 4:
        zarrays = sorted(ckpt.rglob(".zarray"))
        return _alter_zarray(zarrays[int(rng.integers(len(zarrays)))], rng)
    if kind == 5:
        return _alter_spec(ckpt, rng)
    # a third of the time the msgpack file, else any file (chunks and .zarray)
    file = ckpt / "checkpoint" if rng.random() < 0.33 else files[int(rng.integers(len(files)))]
    return [_flip, _truncate, _remove, lambda f, r: _symlink(f, r, outside)][kind](file, rng)


def run_limited(args: list[str], stderr_file: Path) -> tuple[int, float, float]:
    """(exit status, seconds, peak resident bytes) of a whole process, killed after TIME_LIMIT_S."""
    start = time.perf_counter()
    with open(stderr_file, "w") as err:
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > TIME_LIMIT_S:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.05)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, time.perf_counter() - start, usage.ru_maxrss * 1024.0


def tree_state(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.lstat().st_size) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    return write_t5x_checkpoint(root / "model" / "checkpoint_1000", tiny_arrays(**TINY), gin=TINY_MT3_GIN)


def test_corrupted_checkpoints_fail_cleanly(pristine, tmp_path):
    rng = np.random.default_rng(SEED)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big.bin").write_bytes(bytes(8 << 20))
    os.mkfifo(outside / "fifo")
    outcomes: Counter = Counter()
    kinds: Counter = Counter()
    worst_s = worst_rss = 0.0
    for case in range(CASES):
        work = tmp_path / f"case{case}"
        ckpt = work / "model" / "checkpoint_1000"
        shutil.copytree(pristine.parent, ckpt.parent, symlinks=True)  # with the config.gin beside it
        what = corrupt(ckpt, rng, outside)
        kinds[what.split(" ->")[0].split(" ")[0]] += 1
        before = tree_state(ckpt)
        code, seconds, rss = run_limited(
            [sys.executable, "-m", "convert_mt3", str(ckpt), str(work / "out"), "--quiet"], work / "stderr.txt"
        )
        err = (work / "stderr.txt").read_text().strip().splitlines()
        label = f"case {case} ({what}): exit {code}, {seconds:.1f} s, {rss / 1e9:.2f} GB, stderr {err[:3]}"
        assert code in (0, 1), label
        assert "Traceback" not in "\n".join(err), label
        if code == 1:
            assert len(err) == 1 and err[0].startswith("error: "), label
        else:
            assert err == [], label
        left = sorted(p.name for p in work.iterdir())
        assert left == (["model", "out", "stderr.txt"] if code == 0 else ["model", "stderr.txt"]), (label, left)
        assert tree_state(ckpt) == before, label  # the checkpoint is only ever read
        assert seconds < TIME_LIMIT_S and rss < MEMORY_LIMIT_BYTES, label
        outcomes["converted" if code == 0 else "refused"] += 1
        worst_s, worst_rss = max(worst_s, seconds), max(worst_rss, rss)
        shutil.rmtree(work)
    print(
        f"\nfuzz: {CASES} cases (seed {SEED}): {outcomes['converted']} converted, {outcomes['refused']} refused with one "
        f"error line, 0 tracebacks, 0 leftovers; slowest {worst_s:.1f} s, largest {worst_rss / 1e9:.2f} GB; "
        f"corruptions {dict(sorted(kinds.items()))}"
    )
