"""OUT_DIR safety: what may be replaced, one writer at a time, and the atomic move into place.

The converter only ever deletes what it wrote itself. Every folder it writes carries a manifest
(`MANIFEST`) listing its files with their sizes and SHA-256; `--overwrite` replaces an existing OUT_DIR only
when it is empty or when every entry in it is listed in its manifest and unchanged. A lock file beside OUT_DIR
keeps a second conversion to the same folder out, and the checks are repeated under that lock just before the move.
Standard library only: `__main__` runs these checks before torch and transformers import.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MANIFEST = ".convert-mt3.json"


class OutputError(ValueError):
    """OUT_DIR cannot be used; the message says what was found there."""


def check_out_dir(out_dir: Path, checkpoint_dir: Path, overwrite: bool) -> None:
    """Refuse an OUT_DIR that would destroy or mix with data the converter does not own."""
    if out_dir.name in ("", ".."):  # the lock and staging folders are named after OUT_DIR, beside it
        raise OutputError(f"{out_dir}: give the folder by its own name, not as '..' or the root")
    if out_dir.is_symlink():
        raise OutputError(f"{out_dir}: is a symbolic link; give the folder's real path")
    target, source = out_dir.resolve(), checkpoint_dir.resolve()
    if target == source or target.is_relative_to(source):
        raise OutputError(f"{out_dir}: lies inside the checkpoint folder {source}; choose a folder outside it")
    if source.is_relative_to(target):
        raise OutputError(f"{out_dir}: contains the checkpoint folder {source}; choose a folder outside it")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a directory")
    if not out_dir.is_dir():
        return
    entries = sorted(p.name for p in out_dir.iterdir())
    if not entries:
        return
    if not overwrite:
        raise OutputError(f"{out_dir}: exists and is not empty; pass --overwrite to replace a folder convert-mt3 wrote")
    written = manifest_files(out_dir)
    if written is None:
        raise OutputError(
            f"{out_dir}: --overwrite replaces only a folder convert-mt3 wrote, and this one has no {MANIFEST} "
            f"(found {some_names(entries)}); remove it yourself or choose another OUT_DIR"
        )
    foreign = [name for name in entries if name not in written and name != MANIFEST]
    if foreign:
        raise OutputError(
            f"{out_dir}: holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} convert-mt3 did not write "
            f"({some_names(foreign)}); --overwrite would lose them, so nothing was replaced"
        )
    changed = [name for name in entries if name in written and not _as_written(out_dir / name, written[name])]
    if changed:
        raise OutputError(
            f"{out_dir}: {len(changed)} file{'' if len(changed) == 1 else 's'} changed since convert-mt3 wrote "
            f"{'it' if len(changed) == 1 else 'them'} ({some_names(changed)}); --overwrite would lose the changes, so "
            "nothing was replaced"
        )


def _as_written(path: Path, entry: tuple[int, str | None]) -> bool:
    """Whether `path` is still the plain file the manifest lists: the same size and, where the manifest has one
    (older manifests list sizes only), the same SHA-256. Checked on one open descriptor: no symlink is followed,
    and a FIFO put in its place is not waited on."""
    size, sha256 = entry
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:  # gone, a symlink, or unreadable
        return False
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size != size:
            return False
        return sha256 is None or _digest(file) == (size, sha256)


def _digest(file) -> tuple[int, str]:
    """(bytes read, SHA-256) of an open file, to its end."""
    digest, size = hashlib.sha256(), 0
    while block := file.read(1 << 20):
        digest.update(block)
        size += len(block)
    return size, digest.hexdigest()


def some_names(names: list[str], most: int = 3) -> str:
    """The first `most` names, and how many more."""
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def manifest_files(folder: Path) -> dict[str, tuple[int, str | None]] | None:
    """Name -> (size, SHA-256 or None) listed by `folder`'s manifest, or None when it has no readable manifest of
    ours. Manifests written before the hashes list sizes only."""
    file = folder / MANIFEST
    if file.is_symlink() or not file.is_file() or file.stat().st_size > 1 << 20:
        return None
    try:
        manifest = json.loads(file.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if manifest.get("written_by") != "convert-mt3" or not isinstance(files, dict):
        return None
    # Plain names only: a manifest must never point the removal outside its folder; an entry that is not a size,
    # or a size and a hash, matches no file.
    return {
        name: _entry(listed)
        for name, listed in files.items()
        if isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
    }


def _entry(listed) -> tuple[int, str | None]:
    """A manifest's entry for one file -> (size, SHA-256 or None); (-1, None) when it is malformed."""
    if type(listed) is int:
        return listed, None
    if isinstance(listed, dict) and type(listed.get("size")) is int and isinstance(listed.get("sha256"), str):
        return listed["size"], listed["sha256"]
    return -1, None


def write_manifest(folder: Path, version: str) -> None:
    """List every file of the finished folder (name, size, SHA-256), so a later --overwrite can tell it is the
    same, even after an edit that kept a file's size."""
    files = {}
    for path in sorted(folder.iterdir()):
        if path.name != MANIFEST:
            with open(path, "rb") as file:
                size, sha256 = _digest(file)
            files[path.name] = {"size": size, "sha256": sha256}
    manifest = {"written_by": "convert-mt3", "version": version, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


@contextmanager
def out_dir_lock(out_dir: Path) -> Iterator[None]:
    """Hold an advisory lock (`.NAME.lock` beside OUT_DIR) for the whole conversion; fail at once if held.

    Re-entrant within a process (the CLI takes it before reading, `convert()` again). The lock file is created
    here, marked as convert-mt3's, and removed while still held. One that exists is refused when another run holds
    it or when it lacks the mark (a file of the user's); one that a killed run left (marked, held by no one: SIGKILL,
    the OOM killer) is taken over, with a warning naming any staging folder that run left.
    """
    key = str(out_dir)
    if key in _HELD:
        yield
        return
    lock_file = out_dir.with_name(f".{out_dir.name}.lock")
    created: list[Path] = []  # folders made here, removed again if OUT_DIR is not written
    try:
        try:
            _make_folders(out_dir.parent, created)
            fd = _take_lock(out_dir, lock_file)
        except OSError as err:  # e.g. a file where a folder should be, or a name too long for the lock file
            raise OutputError(f"{out_dir}: cannot be written ({err.strerror or err})") from None
        try:
            _HELD.add(key)
            try:
                yield
            finally:
                _HELD.discard(key)
                lock_file.unlink(missing_ok=True)
        finally:
            os.close(fd)
    finally:
        if not out_dir.exists():
            for folder in reversed(created):  # innermost first
                try:
                    folder.rmdir()
                except OSError:
                    break


_HELD: set[str] = set()  # OUT_DIRs this process holds the lock of


def _make_folders(folder: Path, created: list[Path]) -> None:
    """`mkdir -p folder`, appending each folder it makes to `created`, outermost first: only those are removed
    again, whatever `..` the path walks through."""
    folder = folder.absolute()  # keeps the `..`
    current = Path(folder.anchor)
    for part in folder.parts[1:]:
        current = current / part
        if current.exists():
            continue
        try:
            current.mkdir()
        except FileExistsError:  # made meanwhile by someone else: not ours
            continue
        created.append(current)


LOCK_MARK = b"convert-mt3 lock\n"  # what a lock file of ours holds: only such a file is ever taken over


def _take_lock(out_dir: Path, lock_file: Path) -> int:
    """The lock file's descriptor, held: created now, or taken over from a run that was killed."""
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        return _take_over(out_dir, lock_file)
    locked = False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails only while another run checks it, at this instant
        locked = True
        os.write(fd, LOCK_MARK)
    except OSError as err:  # not locked: another run; not written: a full disk
        os.close(fd)
        lock_file.unlink(missing_ok=True)
        raise OutputError(f"{out_dir}: cannot be written ({err.strerror or err})" if locked
                          else _in_use(out_dir, lock_file)) from None
    return fd


def _take_over(out_dir: Path, lock_file: Path) -> int:
    """Hold an existing lock file if it is ours and nobody holds it (its run was killed); else refuse."""
    not_ours = (f"{out_dir}: {lock_file} exists and is not a lock of convert-mt3's; remove it if it is not yours, "
                "then run again")
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:  # its run just ended
        raise OutputError(_in_use(out_dir, lock_file)) from None
    except OSError:  # a symlink, or a file we may not write
        raise OutputError(not_ours) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > len(LOCK_MARK):
            raise OutputError(not_ours)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputError(_in_use(out_dir, lock_file)) from None
        try:  # held: the name must still be this file (a run that ends removes its lock while holding it)
            same = os.lstat(lock_file).st_ino == info.st_ino
        except FileNotFoundError:
            same = False
        if not same:
            raise OutputError(_in_use(out_dir, lock_file))
        if os.pread(fd, len(LOCK_MARK) + 1, 0) != LOCK_MARK:
            raise OutputError(not_ours)
    except BaseException:
        os.close(fd)
        raise
    left = sorted(p.name for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.tmp-"))  # no glob: "[" in names
    print(f"warning: took over {lock_file}, left by a convert-mt3 that was killed"
          + (f"; it also left {some_names(left)} beside {out_dir}: remove them" if left else ""), file=sys.stderr)
    return fd


def _in_use(out_dir: Path, lock_file: Path) -> str:
    return f"{out_dir}: another convert-mt3 is writing this folder ({lock_file} is locked); wait for it to finish"


def move_into_place(staging: Path, out_dir: Path, checkpoint_dir: Path, overwrite: bool) -> None:
    """Replace `out_dir` by `staging`: checks again (under the lock), renames, then removes the old folder's files."""
    check_out_dir(out_dir, checkpoint_dir, overwrite)
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    info = out_dir.stat()
    # a fresh empty folder of ours, which the rename replaces (a fixed name could be a folder of the user's)
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    written = manifest_files(out_dir) or {}  # empty folder: nothing to remove but the folder
    try:
        out_dir.rename(old)
    except OSError:
        old.rmdir()
        raise
    try:
        staging.rename(out_dir)
    except BaseException:
        old.rename(out_dir)  # the previous folder back at its name, untouched
        raise
    # The folder is replaced, not written into (atomic): it keeps the permissions it was given (a private folder
    # stays private) and, where the user may set it, its group. Set once moved: a folder without write permission
    # cannot be moved into another one.
    out_dir.chmod(stat.S_IMODE(info.st_mode))
    try:
        os.chown(out_dir, -1, info.st_gid)
    except OSError:
        pass  # a group this user is not in: the folder gets the user's, as any new folder would
    _remove_written(old, written)


def _remove_written(folder: Path, written: dict[str, tuple[int, str | None]]) -> None:
    """Delete the files a previous conversion listed and that are still as it wrote them (its manifest last),
    then the folder; anything else stays where it is (an edit made while this run converted included). The new
    folder is in place by now: what cannot be removed is a warning, not a failed run."""
    try:
        for name in [*sorted(written.keys() - {MANIFEST}), MANIFEST]:
            path = folder / name
            if name == MANIFEST or _as_written(path, written[name]):
                path.unlink(missing_ok=True)
    except OSError as err:  # a read-only folder or file: the rest stays, still listed by its manifest
        print(f"warning: the new folder is in place; the previous one stays at {folder} ({err.strerror or err})",
              file=sys.stderr)
        return
    try:
        folder.rmdir()
    except OSError:
        print(f"warning: kept the previous folder at {folder}: it holds files convert-mt3 did not write", file=sys.stderr)


__all__ = ["LOCK_MARK", "MANIFEST", "OutputError", "check_out_dir", "manifest_files", "move_into_place", "out_dir_lock", "some_names",
           "write_manifest"]
