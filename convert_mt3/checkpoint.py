"""T5X checkpoint folder -> flat dict of numpy arrays.

A T5X checkpoint is a msgpack file `checkpoint` holding the whole train state
(`optimizer/target` = parameters, `optimizer/state` = Adafactor statistics) plus one
zarr v2 folder per large array. In the msgpack tree each parameter leaf is either

* an inline array (flax's msgpack ExtType 1: `(shape, dtype name, raw bytes)`), which is
  how T5X stores small arrays such as the RMS-norm `scale` vectors, or
* a tensorstore spec `{"driver": "zarr", "kvstore": {"path": ...}, "metadata": {...}}`
  pointing at a zarr v2 folder (`.zarray` + gzip chunks); specs written with a
  tensorstore older than 0.1.14 hold `path` beside `kvstore`.

Only `optimizer/target` is read; the optimizer state is ignored. Nothing here imports
t5x, JAX, flax or TensorFlow: msgpack + zlib + numpy are enough. Every file is read as a
regular file inside the checkpoint folder and never past the size its metadata announces.
"""

from __future__ import annotations

import json
import os
import stat
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from tqdm.auto import tqdm

from .cli import first_line

MSGPACK_FILE = "checkpoint"
# flax.serialization's msgpack extension codes.
_EXT_NDARRAY = 1
_EXT_NPSCALAR = 3
# zarr v2 dtypes and compressors this reader accepts (what T5X writes).
SUPPORTED_DTYPES = {"<f4": np.dtype("<f4"), "<f2": np.dtype("<f2"), "bfloat16": "bfloat16"}
# zlib window bits per compressor: 16 + 15 = gzip header, 15 = zlib header.
SUPPORTED_COMPRESSORS = {"gzip": 31, "zlib": 15, None: None}
# zarr v2's JSON spellings of the non-finite fill values.
_NAMED_FILL_VALUES = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}
# Bounds on what is read before anything is allocated (the real MT3: an 0.9 MB msgpack file, 46 M parameters;
# T5X puts the large arrays in zarr folders, so its msgpack file holds small ones and the tree). msgpack's
# smallest objects become Python objects ~70x their size (an empty map: 1 byte -> a dict), so the bound on the file
# is what bounds the memory of its unpacked tree: 32 MB, ~2.4 GB at worst (empty maps, 73x).
MAX_MSGPACK_BYTES = 1 << 25
MAX_METADATA_BYTES = 1 << 16
MAX_ELEMENTS = 1 << 30  # all arrays together: 4 GB of float32
MAX_DIMENSIONS = 8  # axes of one array: T5X's are at most 3 (head-split attention kernels); numpy stops at 64


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file or array at fault."""


@dataclass
class T5XCheckpoint:
    """Parameters of a T5X checkpoint, keyed by their tree path (`encoder/layers_0/mlp/wi_0/kernel`)."""

    path: Path
    arrays: dict[str, np.ndarray]
    step: int | None
    num_inline: int  # leaves stored inside the msgpack file
    num_zarr: int  # leaves stored as zarr folders


@dataclass
class _ZarrLeaf:
    name: str  # tree path of the parameter
    folder: Path
    shape: tuple[int, ...]  # shape announced by the parameter tree and by `.zarray`
    chunks: tuple[int, ...] = ()
    dtype_name: str = ""
    codec_id: str | None = None
    separator: str = "."
    fill_value: float | None = None  # what a chunk absent from the folder holds; None: no value, an absent chunk is an error


def _read_regular(path: Path, root: Path, limit: int, too_big: str = " its metadata allows") -> bytes:
    """The bytes of `path`, a regular file inside `root`, refusing more than `limit` of them.

    Symlinks are followed only while they stay inside the checkpoint folder; devices, FIFOs and sockets are
    refused before a byte is read, so a crafted checkpoint can neither leak nor exhaust anything.
    """
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        raise
    except (OSError, RuntimeError) as err:  # symlink loops (RuntimeError before Python 3.13), a file as a folder
        reason = getattr(err, "strerror", None) or "symlink loop"
        raise CheckpointError(f"{path}: cannot be resolved ({reason})") from None
    if not real.is_relative_to(root):
        raise CheckpointError(f"{path}: resolves outside the checkpoint folder {root}")
    return read_bounded(real, limit, CheckpointError, path, f", more than the {limit:,}{too_big}")


def read_bounded(path: Path, limit: int, error: type[ValueError], name: Path, too_big: str) -> bytes:
    """The bytes of `path` itself (a symlink is not followed), a regular file of at most `limit` bytes, else
    `error` naming `name`: devices, FIFOs and sockets are refused before a byte is read. `too_big` ends the message
    for a larger file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # NONBLOCK: opening a FIFO must not hang
    except OSError as err:
        raise error(f"{name}: cannot be opened ({err.strerror or type(err).__name__})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{name}: not a regular file")
        if info.st_size > limit:
            raise error(f"{name}: {info.st_size:,} bytes{too_big}")
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise error(f"{name}: grew past {limit} bytes while being read")
    return data


def _inflate(data: bytes, codec_id: str, size: int, file: Path, name: str) -> bytes:
    """Decompress one chunk, stopping as soon as it would exceed the `size` bytes its `.zarray` announces."""
    inflater = zlib.decompressobj(SUPPORTED_COMPRESSORS[codec_id])
    try:
        out = inflater.decompress(data, size + 1)
    except zlib.error:
        raise CheckpointError(f"{file}: corrupt {codec_id} chunk of {name}") from None
    if len(out) > size or inflater.unconsumed_tail:
        raise CheckpointError(f"{file}: chunk of {name} inflates past the {size} bytes its .zarray announces")
    if not inflater.eof:
        raise CheckpointError(f"{file}: truncated compressed chunk of {name}")
    if inflater.unused_data:
        raise CheckpointError(f"{file}: chunk of {name} has trailing bytes after its compressed stream")
    return out


def _decode_ext(ext: msgpack.ExtType) -> Any:
    """flax ExtType -> numpy (ndarray: msgpack of (shape, dtype name, buffer))."""
    code, data = ext
    if code == _EXT_NDARRAY:
        shape, dtype, buffer = msgpack.unpackb(data)
        if dtype == "bfloat16":
            return _widen_bfloat16(np.frombuffer(buffer, dtype="<u2")).reshape(shape)
        return np.frombuffer(buffer, dtype=np.dtype(dtype)).reshape(shape).copy()  # writable
    if code == _EXT_NPSCALAR:
        dtype, buffer = msgpack.unpackb(data)
        return np.frombuffer(buffer, dtype=np.dtype(dtype))[0]
    return ext


_DECODE_ERRORS = (ValueError, TypeError, IndexError, RecursionError, msgpack.UnpackException)


def _inline_array(file: Path, name: str, ext: msgpack.ExtType) -> Any:
    """One inline leaf of `optimizer/target`, decoded only now: the optimizer state's leaves, which are never
    used, are never decoded (a dtype numpy lacks there must not fail the checkpoint)."""
    try:
        return _decode_ext(ext)
    except _DECODE_ERRORS as err:
        raise CheckpointError(f"{file}: inline parameter {name} cannot be decoded ({type(err).__name__}: {first_line(err)[:200]})") from None


def _load_tree(directory: Path) -> dict:
    file = directory / MSGPACK_FILE
    try:
        data = _read_regular(file, directory, MAX_MSGPACK_BYTES, " a T5X parameter tree may take (MT3's: 0.9 MB)")
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing; expected the T5X msgpack `{MSGPACK_FILE}` file in {directory}") from None
    try:
        tree = msgpack.unpackb(data, raw=False, strict_map_key=False)  # inline arrays stay ExtType until used
    except _DECODE_ERRORS as err:
        raise CheckpointError(f"{file}: truncated or corrupt msgpack ({type(err).__name__})") from None
    if not isinstance(tree, dict) or not isinstance(tree.get("optimizer"), dict) or "target" not in tree["optimizer"]:
        raise CheckpointError(f"{file}: no `optimizer/target` parameter tree (is this a T5X checkpoint?)")
    return tree


def _is_spec(node: Any) -> bool:
    return isinstance(node, dict) and "driver" in node and "kvstore" in node


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Depth-first (path, leaf) pairs; tensorstore specs count as leaves."""
    if isinstance(node, dict) and not _is_spec(node):
        for key, child in node.items():
            yield from _leaves(child, f"{prefix}/{key}" if prefix else str(key))
    else:
        yield prefix, node


def _shape(value: Any) -> tuple[int, ...] | None:
    """A list of non-negative ints as a shape, else None."""
    if not isinstance(value, (list, tuple)) or not all(type(n) is int and n >= 0 for n in value):
        return None
    return tuple(value)


def _zarr_leaf(directory: Path, name: str, spec: dict) -> _ZarrLeaf:
    """The zarr folder a tensorstore spec names, with its `.zarray` read and validated (no chunk read yet)."""
    if spec.get("driver") != "zarr":
        raise CheckpointError(f"{name}: unsupported tensorstore driver {spec.get('driver')!r}; expected 'zarr'")
    kvstore, metadata = spec.get("kvstore"), spec.get("metadata", {})
    rel = kvstore.get("path") if isinstance(kvstore, dict) else None
    if rel is None:  # tensorstore < 0.1.14 (T5X's gcs specs): the path beside the kvstore, not in it
        rel = spec.get("path")
    tree_shape = _shape(metadata.get("shape", [])) if isinstance(metadata, dict) else None
    if not isinstance(rel, str) or "\0" in rel or tree_shape is None:  # a NUL byte: no path the OS takes
        raise CheckpointError(f"{name}: malformed tensorstore spec (expected kvstore.path or path, and metadata.shape)")
    folder = (directory / rel).resolve()
    if folder == directory or not folder.is_relative_to(directory):
        raise CheckpointError(f"{name}: spec path {rel!r} leaves the checkpoint folder {directory}")
    if not folder.is_dir():
        raise CheckpointError(f"{name}: zarr folder {folder} is missing")

    meta_file = folder / ".zarray"
    try:
        text = _read_regular(meta_file, directory, MAX_METADATA_BYTES)
    except FileNotFoundError:
        raise CheckpointError(f"{meta_file}: missing zarr metadata of {name}") from None
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"{meta_file}: unreadable zarr metadata ({type(err).__name__})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_file}: unreadable zarr metadata (expected a JSON object)")
    shape, chunks = _shape(meta.get("shape")), _shape(meta.get("chunks"))
    if shape is None or chunks is None or len(chunks) != len(shape) or 0 in chunks or len(shape) > MAX_DIMENSIONS:
        raise CheckpointError(f"{meta_file}: shape {meta.get('shape')!r} / chunks {meta.get('chunks')!r} are not equal-length lists of sizes (chunks > 0, at most {MAX_DIMENSIONS} axes)")
    if tree_shape and shape != tree_shape:
        raise CheckpointError(f"{meta_file}: shape {list(shape)} disagrees with the parameter tree's {list(tree_shape)} for {name}")
    if max(shape, default=0) > MAX_ELEMENTS or any(c > max(n, 1) for c, n in zip(chunks, shape)):
        # a chunk is decoded whole: one larger than its array would allocate more than the array announces
        raise CheckpointError(f"{meta_file}: shape {list(shape)} / chunks {list(chunks)}: expected sizes of at most "
                              f"{MAX_ELEMENTS:,} and chunks no larger than the array")
    dtype_name, compressor, order = meta.get("dtype"), meta.get("compressor"), meta.get("order", "C")
    if not isinstance(dtype_name, str) or dtype_name not in SUPPORTED_DTYPES:
        raise CheckpointError(f"{meta_file}: unsupported dtype {dtype_name!r}; expected one of {sorted(SUPPORTED_DTYPES)}")
    codec_id = compressor.get("id") if isinstance(compressor, dict) else compressor
    if not (codec_id is None or isinstance(codec_id, str)) or codec_id not in SUPPORTED_COMPRESSORS or meta.get("filters") or order != "C":
        raise CheckpointError(f"{meta_file}: unsupported compressor/filters/order ({codec_id!r}, {meta.get('filters')!r}, {order!r}); expected gzip or zlib, no filters, C order")
    separator = meta.get("dimension_separator") or "."  # absent or null: zarr v2's default
    if separator not in (".", "/"):
        raise CheckpointError(f"{meta_file}: unsupported dimension_separator {separator!r}; expected '.' or '/'")
    fill_value = meta.get("fill_value")
    if fill_value in _NAMED_FILL_VALUES:
        fill_value = _NAMED_FILL_VALUES[fill_value]
    elif not (fill_value is None or type(fill_value) in (int, float)):
        raise CheckpointError(f"{meta_file}: unsupported fill_value {fill_value!r}; expected null, a number, 'NaN', 'Infinity' or '-Infinity'")
    return _ZarrLeaf(name, folder, shape, chunks, dtype_name, codec_id, separator, fill_value)


def _read_zarr(leaf: _ZarrLeaf, root: Path) -> np.ndarray:
    """Read one validated zarr v2 array chunk by chunk, checking every chunk is whole.

    An absent chunk holds the array's fill_value, as zarr v2 defines it. T5X writes `fill_value: null`, which
    gives an absent chunk no value: for its arrays that is an error (an incomplete copy), never zeros.
    """
    shape, chunks = leaf.shape, leaf.chunks
    # bfloat16 has no numpy dtype: read its raw 16 bits and widen to float32 below.
    raw_dtype = np.dtype("<u2") if leaf.dtype_name == "bfloat16" else SUPPORTED_DTYPES[leaf.dtype_name]
    chunk_bytes = int(np.prod(chunks, dtype=np.int64)) * raw_dtype.itemsize
    # deflate never grows data by more than ~0.1% plus headers: anything larger is not a chunk of this array
    stored_limit = chunk_bytes if leaf.codec_id is None else chunk_bytes + chunk_bytes // 64 + 4096

    out = np.empty(shape, dtype=raw_dtype)
    grid = [range(-(-n // c)) for n, c in zip(shape, chunks)]  # chunks per axis (ceil)
    for index in product(*grid):
        key = leaf.separator.join(map(str, index)) if shape else "0"
        chunk_file = leaf.folder / key
        region = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, chunks, shape))
        try:
            data = _read_regular(chunk_file, root, stored_limit)
        except FileNotFoundError:
            if leaf.fill_value is None:
                raise CheckpointError(f"{chunk_file}: chunk missing from zarr array {leaf.name} (its fill_value is null, "
                                      "so an absent chunk has no value: an incomplete copy?)") from None
            out[region] = _fill_bits(leaf.fill_value) if leaf.dtype_name == "bfloat16" else leaf.fill_value
            continue
        if leaf.codec_id is not None:
            data = _inflate(data, leaf.codec_id, chunk_bytes, chunk_file, leaf.name)
        if len(data) != chunk_bytes:
            raise CheckpointError(f"{chunk_file}: chunk of {leaf.name} holds {len(data)} bytes, expected {chunk_bytes} for chunk shape {list(chunks)}")
        block = np.frombuffer(data, dtype=raw_dtype).reshape(chunks)
        out[region] = block[tuple(slice(0, s.stop - s.start) for s in region)]
    return _widen_bfloat16(out) if leaf.dtype_name == "bfloat16" else out


def _widen_bfloat16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 (its 16 bits, which numpy has no dtype for) -> the same values in float32, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _fill_bits(value: float) -> np.uint16:
    """A fill value as the 16 bits of its bfloat16 (the float32's top half: exact for 0, +-inf, NaN and bfloat16s)."""
    return np.uint16(np.array(value, dtype=np.float32).view(np.uint32) >> 16)


def _step(tree: dict) -> int | None:
    state = tree["optimizer"].get("state")
    step = state.get("step") if isinstance(state, dict) else None
    if isinstance(step, msgpack.ExtType):
        try:
            step = _decode_ext(step)
        except _DECODE_ERRORS:
            return None  # the step is only reported
    if isinstance(step, np.ndarray) and step.size == 1 and np.issubdtype(step.dtype, np.integer):
        return int(step.reshape(-1)[0])
    return step if type(step) is int else None


def read_checkpoint(directory: str | os.PathLike, *, quiet: bool = True) -> T5XCheckpoint:
    """Read every parameter of `optimizer/target` (inline msgpack arrays and zarr folders)."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory; expected a T5X checkpoint folder")
    directory = directory.resolve()
    tree = _load_tree(directory)

    arrays: dict[str, np.ndarray] = {}
    zarr_leaves: list[_ZarrLeaf] = []
    msgpack_file = directory / MSGPACK_FILE
    try:
        leaves = list(_leaves(tree["optimizer"]["target"]))
    except RecursionError:  # msgpack unpacks deeper trees than Python's recursion limit walks
        raise CheckpointError(f"{msgpack_file}: `optimizer/target` is nested too deeply for a parameter tree") from None
    seen: set[str] = set()
    for name, node in leaves:
        if name in seen:  # a key holding "/" spells another parameter's path: the later one would silently win
            raise CheckpointError(f"{msgpack_file}: parameter path {name} appears twice in `optimizer/target`")
        seen.add(name)
        if isinstance(node, msgpack.ExtType):
            node = _inline_array(msgpack_file, name, node)
        if isinstance(node, np.ndarray):
            if node.dtype not in (np.float32, np.float16):
                raise CheckpointError(f"{msgpack_file}: inline parameter {name} has dtype {node.dtype}; expected float32 or float16")
            arrays[name] = node
        elif _is_spec(node):
            zarr_leaves.append(_zarr_leaf(directory, name, node))
        else:
            raise CheckpointError(f"{msgpack_file}: parameter {name} is neither an inline array nor a tensorstore spec ({type(node).__name__})")
    num_inline = len(arrays)
    folders: dict[Path, str] = {}
    for leaf in zarr_leaves:
        if leaf.folder in folders:
            raise CheckpointError(f"{leaf.folder}: the zarr folder of both {folders[leaf.folder]} and {leaf.name}")
        folders[leaf.folder] = leaf.name
    if not arrays and not zarr_leaves:
        raise CheckpointError(f"{msgpack_file}: `optimizer/target` holds no parameters")
    # Every shape is known now: refuse an absurd total before allocating anything.
    total = sum(int(np.prod(leaf.shape, dtype=np.float64)) for leaf in zarr_leaves)
    if total > MAX_ELEMENTS:
        biggest = max(zarr_leaves, key=lambda leaf: np.prod(leaf.shape, dtype=np.float64))
        raise CheckpointError(f"{biggest.folder / '.zarray'}: the arrays announce {total:,} elements in all, more than the {MAX_ELEMENTS:,} a checkpoint may hold (largest: {biggest.name} {list(biggest.shape)})")

    # gunzip releases the GIL: decode folders on all cores.
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        results = pool.map(_read_zarr, zarr_leaves, [directory] * len(zarr_leaves))
        for leaf, array in tqdm(zip(zarr_leaves, results), total=len(zarr_leaves), desc="reading arrays", unit="array", disable=quiet):
            arrays[leaf.name] = array
    return T5XCheckpoint(directory, dict(sorted(arrays.items())), _step(tree), num_inline, len(zarr_leaves))


__all__ = ["CheckpointError", "T5XCheckpoint", "read_checkpoint"]
