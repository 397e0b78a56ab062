"""Nothing lost, nothing let in: OUT_DIR handling, bounded reads inside the checkpoint, clean edges.

Each test is one row of issue 12's table, named for the behaviour it now has.
"""

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import msgpack
import numpy as np
import pytest

from convert_mt3 import checkpoint as checkpoint_module
from convert_mt3 import export
from convert_mt3.__main__ import main
from convert_mt3.checkpoint import CheckpointError, read_checkpoint
from convert_mt3.output import LOCK_MARK, MANIFEST

CHUNK = "target.encoder.layers_0.mlp.wi_0.kernel"  # (32, 48) float32, one chunk "0.0"
SECRET = "root:x:0:0:SECRET-CONTENT-THAT-MUST-NOT-LEAK"


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry below `root` (itself included): file bytes, symlink targets, folders: what 'untouched' means."""
    digest = {}
    for path in sorted([root, *root.rglob("*")]):
        key = str(path.relative_to(root))
        if path.is_symlink():
            digest[key] = "link:" + os.readlink(path)
        elif path.is_dir():
            digest[key] = "dir"
        else:
            digest[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if "reading arrays" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# --- --overwrite replaces only what this tool wrote --------------------------------------------


def test_overwrite_refuses_the_checkpoint_itself(mt3_ckpt, capsys):
    before = tree_digest(mt3_ckpt.parent)
    assert main([str(mt3_ckpt), str(mt3_ckpt), "--quiet", "--overwrite"]) == 1
    assert "inside the checkpoint folder" in one_error_line(capsys)
    assert tree_digest(mt3_ckpt.parent) == before


def test_out_dir_inside_the_checkpoint_is_refused(mt3_ckpt, capsys):
    before = tree_digest(mt3_ckpt)
    assert main([str(mt3_ckpt), str(mt3_ckpt / "converted"), "--quiet"]) == 1
    assert "inside the checkpoint folder" in one_error_line(capsys)
    assert tree_digest(mt3_ckpt) == before


@pytest.mark.parametrize("where", ["parent", "user_folder", "cwd"])
def test_overwrite_leaves_user_folders_untouched(where, mt3_ckpt, tmp_path, monkeypatch, capsys):
    user = tmp_path / "user"
    (user / "photos").mkdir(parents=True)
    (user / "notes.txt").write_text("my notes")
    (user / "photos" / "a.jpg").write_bytes(b"\xff\xd8 jpeg")
    out = {"parent": str(mt3_ckpt.parent), "user_folder": str(user), "cwd": "."}[where]
    if where == "cwd":
        monkeypatch.chdir(user)
    before = tree_digest(tmp_path)
    assert main([str(mt3_ckpt), out, "--quiet", "--overwrite"]) == 1
    error = one_error_line(capsys)
    assert ("contains the checkpoint folder" if where == "parent" else f"no {MANIFEST}") in error, error
    assert tree_digest(tmp_path) == before


def test_overwrite_replaces_a_converted_folder(mt3_ckpt, tmp_path):
    out = tmp_path / "out"
    assert main([str(mt3_ckpt), str(out), "--quiet"]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["written_by"] == "convert-mt3"
    assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {MANIFEST}
    (out / "model.safetensors").unlink()  # a file it wrote, gone: nothing of the user's to lose
    assert main([str(mt3_ckpt), str(out), "--quiet", "--overwrite"]) == 0
    assert (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]  # no staging, backup or lock left
    (out / "README.md").write_text("edited card")  # a file it wrote, edited since: the user's now (test_convert)
    assert main([str(mt3_ckpt), str(out), "--quiet", "--overwrite"]) == 1
    assert (out / "README.md").read_text() == "edited card"


def test_overwrite_that_cannot_remove_the_old_files_still_succeeds(mt3_ckpt, tmp_path, monkeypatch, capsys):
    """A previous folder whose files cannot be deleted (read-only): the new folder is in place, so the run
    succeeds and says where the previous one stays, its manifest kept beside what remains."""
    out = tmp_path / "out"
    assert main([str(mt3_ckpt), str(out), "--quiet"]) == 0
    unlink = Path.unlink

    def read_only(path, *args, **kwargs):
        if path.name == "config.json" and path.parent.name.startswith(".out.old-"):
            raise PermissionError(1, "Operation not permitted")
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", read_only)
    mine = tmp_path / f".out.old-{os.getpid()}"  # a folder of the user's, named as a fixed name once was
    mine.mkdir()
    assert main([str(mt3_ckpt), str(out), "--quiet", "--overwrite"]) == 0
    assert mine.is_dir() and not any(mine.iterdir())
    (old,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.old-") and p != mine]
    assert capsys.readouterr().err == (f"warning: the new folder is in place; the previous one stays at {old} "
                                       "(Operation not permitted)\n")
    assert (old / "config.json").is_file() and (old / MANIFEST).is_file()
    assert (out / MANIFEST).is_file() and not (tmp_path / ".out.lock").exists()


def test_a_folder_that_cannot_move_in_puts_the_previous_one_back(mt3_ckpt, tmp_path, monkeypatch, capsys):
    """The new folder cannot take OUT_DIR's name (as for a user who is not root when OUT_DIR was read-only: its
    mode was set on the new folder before the move): the previous folder is back at its name, nothing left."""
    out = tmp_path / "out"
    assert main([str(mt3_ckpt), str(out), "--quiet"]) == 0
    before = tree_digest(tmp_path)
    rename = Path.rename

    def staging_refused(path, target):
        if path.parent.name.startswith(".out.tmp-"):
            raise PermissionError(13, "Permission denied")
        return rename(path, target)

    monkeypatch.setattr(Path, "rename", staging_refused)
    assert main([str(mt3_ckpt), str(out), "--quiet", "--overwrite"]) == 1
    assert "Permission denied" in one_error_line(capsys)
    assert tree_digest(tmp_path) == before


def test_an_edit_made_while_converting_is_kept(mt3_ckpt, tmp_path, monkeypatch, capsys):
    """A file of the previous folder edited after the last check: the new folder takes OUT_DIR's name, the
    edited file stays in the previous folder beside it (it was deleted with the files convert-mt3 wrote)."""
    out = tmp_path / "out"
    assert main([str(mt3_ckpt), str(out), "--quiet"]) == 0
    rename = Path.rename

    def user_edits_then_rename(path, target):
        if path == out:  # checked under the lock just before: the edit comes after
            (out / "README.md").write_text("edited just now")
        return rename(path, target)

    monkeypatch.setattr(Path, "rename", user_edits_then_rename)
    assert main([str(mt3_ckpt), str(out), "--quiet", "--overwrite"]) == 0
    (old,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.old-")]
    assert capsys.readouterr().err == f"warning: kept the previous folder at {old}: it holds files convert-mt3 did not write\n"
    assert [p.name for p in old.iterdir()] == ["README.md"] and (old / "README.md").read_text() == "edited just now"
    assert (out / MANIFEST).is_file() and (out / "README.md").read_text() != "edited just now"


def test_overwrite_refuses_a_converted_folder_holding_user_files(mt3_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(mt3_ckpt), str(out), "--quiet"]) == 0
    (out / "my_results.csv").write_text("precious")
    before = tree_digest(tmp_path)
    assert main([str(mt3_ckpt), str(out), "--quiet", "--overwrite"]) == 1
    assert "1 entry convert-mt3 did not write (my_results.csv)" in one_error_line(capsys)
    assert tree_digest(tmp_path) == before


def test_files_created_in_out_dir_during_conversion_survive(mt3_ckpt, tmp_path, monkeypatch, capsys):
    """The replaceability check is repeated under the lock just before the move."""
    out = tmp_path / "out"
    verify = export.verify_folder

    def verify_then_user_writes(*args, **kwargs):
        out.mkdir(exist_ok=True)
        (out / "new_user_file.txt").write_text("written while converting")
        return verify(*args, **kwargs)

    monkeypatch.setattr(export, "verify_folder", verify_then_user_writes)
    assert main([str(mt3_ckpt), str(out), "--quiet"]) == 1
    assert "not empty" in one_error_line(capsys)
    assert [p.name for p in out.iterdir()] == ["new_user_file.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]



@pytest.mark.parametrize("overwrite", [False, True])
def test_a_signal_while_the_folder_moves_into_place_waits_for_it(mt3_ckpt, tmp_path, monkeypatch, capsys, overwrite):
    """Ctrl-C while OUT_DIR moves into place: the move and the removal of what it leaves end first, then the run
    stops saying the folder is written (it said "nothing written", and left the staging or the old folder)."""
    out = tmp_path / "out"
    if overwrite:
        assert main([str(mt3_ckpt), str(out), "--quiet"]) == 0
    move = export.move_into_place

    def interrupted_move(*args):
        os.kill(os.getpid(), signal.SIGINT)  # handled at once, inside the move: it must wait
        time.sleep(0.05)
        move(*args)

    monkeypatch.setattr(export, "move_into_place", interrupted_move)
    arguments = [str(mt3_ckpt), str(out), "--quiet"] + (["--overwrite"] if overwrite else [])
    assert main(arguments) == 130
    assert capsys.readouterr().err.splitlines() == [f"interrupted; {out} is written (complete)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]  # no staging, old folder or lock
    assert (out / MANIFEST).is_file() and (out / "model.safetensors").is_file()


def test_a_full_disk_while_the_weights_are_written_is_one_line(mt3_ckpt, tmp_path, monkeypatch, capsys):
    """safetensors reports its I/O errors as SafetensorError, not OSError: still one line, nothing left."""
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(export, "write_folder", full)
    assert main([str(mt3_ckpt), str(tmp_path / "out"), "--quiet"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: {tmp_path / 'out'}: cannot be written (Error while serializing: I/O error: No space left on device "
        "(os error 28))"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_lock_that_cannot_be_written_is_not_called_busy(tmp_path, monkeypatch):
    """A full disk can let the lock file be made and not written: that is not another run holding it."""
    from convert_mt3 import output

    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(output.os, "write", full)
    try:
        with pytest.raises(output.OutputError, match=r"out: cannot be written \(No space left on device\)"):
            output._take_lock(tmp_path / "out", tmp_path / ".out.lock")
    finally:
        monkeypatch.undo()
    assert not (tmp_path / ".out.lock").exists()

def test_second_conversion_to_the_same_out_dir_fails_at_once(mt3_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    lock_file = tmp_path / ".out.lock"
    with open(lock_file, "w") as held:  # what a running conversion holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        start = time.perf_counter()
        assert main([str(mt3_ckpt), str(out), "--quiet"]) == 1
        seconds = time.perf_counter() - start
    assert "another convert-mt3 is writing this folder" in one_error_line(capsys)
    assert seconds < 1.0 and not out.exists()
    # not held and not marked as convert-mt3's: a file of the user's with that name is neither taken over nor removed
    lock_file.write_text("my notes")
    assert main([str(mt3_ckpt), str(out), "--quiet"]) == 1
    assert "exists and is not a lock of convert-mt3's" in one_error_line(capsys)
    assert lock_file.read_text() == "my notes" and not out.exists()
    lock_file.unlink()


def convert_until_locked(mt3_ckpt: Path, out: Path) -> subprocess.Popen:
    """A conversion to `out` in its own process, returned once it holds the lock (the file created, then marked)."""
    process = subprocess.Popen([sys.executable, "-m", "convert_mt3", str(mt3_ckpt), str(out), "--quiet"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock_file, deadline = out.with_name(f".{out.name}.lock"), time.monotonic() + 30
    while not (lock_file.exists() and lock_file.read_bytes() == LOCK_MARK):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    return process


def test_a_lock_left_by_a_killed_run_is_taken_over(mt3_ckpt, tmp_path, capsys):
    """SIGKILL or the OOM killer leave the lock file (and perhaps a staging folder): the next run takes the lock
    over and names what the killed run left, which it does not delete."""
    out = tmp_path / "out"
    process = convert_until_locked(mt3_ckpt, out)
    process.kill()
    assert process.wait(timeout=30) == -signal.SIGKILL
    staging = tmp_path / ".out.tmp-left"  # what a kill during the writing leaves, made here at a fixed moment
    staging.mkdir()
    assert main([str(mt3_ckpt), str(out), "--quiet"]) == 0
    assert capsys.readouterr().err == (f"warning: took over {tmp_path / '.out.lock'}, left by a convert-mt3 that was killed; it "
                                       f"also left .out.tmp-left beside {out}: remove them\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp-left", "model", "out"]


def test_out_dir_named_by_dot_dot_is_refused_before_writing(mt3_ckpt, tmp_path, capsys):
    (tmp_path / "zz").mkdir()
    assert main([str(mt3_ckpt), str(tmp_path / "zz" / "new" / ".."), "--quiet"]) == 1
    assert "give the folder by its own name" in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "zz"] and not any((tmp_path / "zz").iterdir())


def test_out_dir_symlink_is_refused_before_writing(mt3_ckpt, tmp_path, capsys):
    target = tmp_path / "real_out"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    link = tmp_path / "out"
    link.symlink_to(target)
    before = tree_digest(tmp_path)
    assert main([str(mt3_ckpt), str(link), "--quiet", "--overwrite"]) == 1
    assert "is a symbolic link" in one_error_line(capsys)
    assert tree_digest(tmp_path) == before


# --- reads that stay inside and stay bounded ---------------------------------------------------


def replace_chunk_by_link(mt3_ckpt: Path, target: Path) -> Path:
    chunk = mt3_ckpt / CHUNK / "0.0"
    chunk.unlink()
    chunk.symlink_to(target)
    return chunk


def test_chunk_symlink_to_dev_zero_is_refused_at_once(mt3_ckpt, capsys):
    replace_chunk_by_link(mt3_ckpt, Path("/dev/zero"))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="resolves outside the checkpoint folder"):
        read_checkpoint(mt3_ckpt)
    assert time.perf_counter() - start < 5


def test_chunk_symlink_to_an_outside_file_is_refused(mt3_ckpt, tmp_path):
    """Right size and no compressor: without the check, the outside bytes would become a weight."""
    outside = tmp_path / "outside.bin"
    outside.write_bytes(np.full((32, 48), 7.0, np.float32).tobytes())
    meta_file = mt3_ckpt / CHUNK / ".zarray"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "compressor": None}))
    replace_chunk_by_link(mt3_ckpt, outside)
    with pytest.raises(CheckpointError, match="resolves outside the checkpoint folder"):
        read_checkpoint(mt3_ckpt)


def test_error_never_prints_file_content(mt3_ckpt, tmp_path, capsys):
    secret = tmp_path / "passwd"
    secret.write_text(SECRET * 20)
    replace_chunk_by_link(mt3_ckpt, secret)
    assert main([str(mt3_ckpt), str(tmp_path / "out"), "--quiet"]) == 1
    assert "SECRET" not in one_error_line(capsys)
    # the same bytes inside the folder, as a (corrupt) chunk: named, not shown
    chunk = mt3_ckpt / CHUNK / "0.0"
    chunk.unlink()
    chunk.write_text(SECRET * 20)
    assert main([str(mt3_ckpt), str(tmp_path / "out"), "--quiet"]) == 1
    error = one_error_line(capsys)
    assert "SECRET" not in error and "0.0" in error


def test_fifo_and_directory_chunks_are_refused(mt3_ckpt):
    chunk = mt3_ckpt / CHUNK / "0.0"
    chunk.unlink()
    os.mkfifo(chunk)  # opening it for reading would block forever without O_NONBLOCK
    with pytest.raises(CheckpointError, match="0.0: not a regular file"):
        read_checkpoint(mt3_ckpt)
    chunk.unlink()
    chunk.mkdir()
    with pytest.raises(CheckpointError, match="0.0: not a regular file"):
        read_checkpoint(mt3_ckpt)


def test_symlink_inside_the_checkpoint_is_followed(mt3_ckpt):
    """Links that stay inside the folder are fine (some checkpoint copies deduplicate files that way)."""
    chunk = mt3_ckpt / CHUNK / "0.0"
    blob = mt3_ckpt / "blob"
    chunk.rename(blob)
    chunk.symlink_to(Path("..") / "blob")
    assert read_checkpoint(mt3_ckpt).arrays["encoder/layers_0/mlp/wi_0/kernel"].shape == (32, 48)


def test_chunk_that_inflates_past_its_size_is_refused(mt3_ckpt):
    """A small gzip bomb: 2 MB of zeros where the .zarray announces 32 x 48 floats (6 KB)."""
    bomb = zlib.compressobj(1, zlib.DEFLATED, 31)
    (mt3_ckpt / CHUNK / "0.0").write_bytes(bomb.compress(bytes(2_000_000)) + bomb.flush())
    with pytest.raises(CheckpointError, match="inflates past the 6144 bytes its .zarray announces"):
        read_checkpoint(mt3_ckpt)


def test_chunk_file_larger_than_announced_is_not_read(mt3_ckpt):
    (mt3_ckpt / CHUNK / "0.0").write_bytes(bytes(1_000_000))
    with pytest.raises(CheckpointError, match="1,000,000 bytes, more than the 10,336 its metadata allows"):
        read_checkpoint(mt3_ckpt)


def test_huge_zarray_shape_is_refused_before_allocating(mt3_ckpt, capsys):
    shape = [200_000, 200_000]
    meta_file = mt3_ckpt / CHUNK / ".zarray"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "shape": shape}))
    tree = msgpack.unpackb((mt3_ckpt / "checkpoint").read_bytes(), strict_map_key=False)
    tree["optimizer"]["target"]["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]["metadata"]["shape"] = shape
    (mt3_ckpt / "checkpoint").write_bytes(msgpack.packb(tree))
    assert main([str(mt3_ckpt), str(mt3_ckpt.parent / "out"), "--quiet"]) == 1
    error = one_error_line(capsys)
    assert "more than the 1,073,741,824 a checkpoint may hold" in error and "[200000, 200000]" in error


def test_msgpack_larger_than_the_bound_is_not_read(mt3_ckpt, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "MAX_MSGPACK_BYTES", 1000)
    with pytest.raises(CheckpointError, match=r"checkpoint: .* bytes, more than the 1,000 a T5X parameter tree may take \(MT3's: 0.9 MB\)$"):
        read_checkpoint(mt3_ckpt)


def test_msgpack_symlinked_outside_is_refused(mt3_ckpt, tmp_path):
    moved = tmp_path / "elsewhere"
    (mt3_ckpt / "checkpoint").rename(moved)
    (mt3_ckpt / "checkpoint").symlink_to(moved)
    with pytest.raises(CheckpointError, match="checkpoint: resolves outside the checkpoint folder"):
        read_checkpoint(mt3_ckpt)


# --- clean edges -------------------------------------------------------------------------------


def test_signals_wait_where_raising_would_break_the_interpreter(monkeypatch):
    """A signal raised inside importlib's lock handling could leave the import lock held (CI saw a SIGTERM conversion
    hang), one raised inside torch's import aborted the process (pybind11): in importlib, threading or a finalizer the
    signal is sent again 10 ms later; inside `hold()` it waits for the block's end; elsewhere it raises at once."""
    import types

    from convert_mt3 import cli

    sent = []

    class Now:  # threading.Timer, run at once
        def __init__(self, delay, function, args):
            self.delay, self.call = delay, lambda: function(*args)

        def start(self):
            sent.append(self.delay)
            self.call()

    monkeypatch.setattr(cli.threading, "Timer", Now)
    monkeypatch.setattr(cli.os, "kill", lambda pid, signum: sent.append((pid, signum)))

    def frame(filename: str, name: str = "f"):
        return types.SimpleNamespace(f_code=types.SimpleNamespace(co_filename=filename, co_name=name))

    interrupts = cli.Interrupts()
    for inside in (frame("<frozen importlib._bootstrap>", "cb"), frame(cli.threading.__file__), frame("x.py", "__del__")):
        interrupts.handle(signal.SIGTERM, inside)
        assert sent == [0.01, (os.getpid(), signal.SIGTERM)]
        sent.clear()
    with pytest.raises(cli.Terminated):
        interrupts.handle(signal.SIGTERM, frame("/somewhere/torch/__init__.py"))
    with pytest.raises(KeyboardInterrupt) as raised:
        interrupts.handle(signal.SIGINT, None)
    assert not isinstance(raised.value, cli.Terminated)
    reached = []
    with pytest.raises(cli.Terminated):
        with interrupts.hold():
            interrupts.handle(signal.SIGTERM, frame("/somewhere/torch/__init__.py"))  # waits
            reached.append("end of the block")
    assert reached == ["end of the block"] and sent == [] and interrupts.pending is None
    with interrupts.hold():  # nothing pending: nothing raised
        pass


@pytest.mark.parametrize("signum, status, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_or_kill_prints_one_line_and_leaves_nothing(mt3_ckpt, tmp_path, signum, status, word):
    """Ctrl-C, and SIGTERM (`kill`, `timeout`, a scheduler) alike: no lock file, staging folder or OUT_DIR left."""
    out = tmp_path / "out"
    process = convert_until_locked(mt3_ckpt, out)  # a kill from now on used to leave the lock behind
    time.sleep(0.5)  # inside the imports / conversion
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == status, stderr
    assert stderr.strip() == f"{word}; nothing written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("peak, warned", [(0.9, False), (3.9, False), (100.0, True), (32767.0, True)])
def test_unscaled_audio_gets_one_warning(peak, warned, caplog):
    from convert_mt3.mt3.feature_extraction_mt3 import MT3FeatureExtractor

    samples = np.sin(np.linspace(0, 100, 16000)).astype(np.float32) * peak
    with caplog.at_level("WARNING"):
        MT3FeatureExtractor()(samples, sampling_rate=16000)
    messages = [r.getMessage() for r in caplog.records if "peaks at" in r.getMessage()]
    assert len(messages) == int(warned), messages
    if warned:
        assert "int16 samples / 32768" in messages[0]

