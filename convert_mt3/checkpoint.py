"""T5X checkpoint folder -> flat dict of numpy arrays.

A T5X checkpoint is a msgpack file `checkpoint` holding the whole train state
(`optimizer/target` = parameters, `optimizer/state` = Adafactor statistics) plus one
zarr v2 folder per large array. In the msgpack tree each parameter leaf is either

* an inline array (flax's msgpack ExtType 1: `(shape, dtype name, raw bytes)`), which is
  how T5X stores small arrays such as the RMS-norm `scale` vectors, or
* a tensorstore spec `{"driver": "zarr", "kvstore": {"path": ...}, "metadata": {...}}`
  pointing at a zarr v2 folder (`.zarray` + gzip chunks).

Only `optimizer/target` is read; the optimizer state is ignored. Nothing here imports
t5x, JAX, flax or TensorFlow: msgpack + numcodecs + numpy are enough.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import msgpack
import numcodecs
import numpy as np
from tqdm.auto import tqdm

MSGPACK_FILE = "checkpoint"
# flax.serialization's msgpack extension codes.
_EXT_NDARRAY = 1
_EXT_NPSCALAR = 3
# zarr v2 dtypes and compressors this reader accepts (what T5X writes).
SUPPORTED_DTYPES = {"<f4": np.dtype("<f4"), "<f2": np.dtype("<f2"), "bfloat16": "bfloat16"}
SUPPORTED_COMPRESSORS = ("gzip", "zlib", None)


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
    shape: tuple[int, ...]  # shape announced by the parameter tree


def _decode_ext(code: int, data: bytes) -> Any:
    """flax ExtType -> numpy (ndarray: msgpack of (shape, dtype name, buffer))."""
    if code == _EXT_NDARRAY:
        shape, dtype, buffer = msgpack.unpackb(data)
        return np.frombuffer(buffer, dtype=np.dtype(dtype)).reshape(shape).copy()  # writable
    if code == _EXT_NPSCALAR:
        dtype, buffer = msgpack.unpackb(data)
        return np.frombuffer(buffer, dtype=np.dtype(dtype))[0]
    return msgpack.ExtType(code, data)


def _load_tree(directory: Path) -> dict:
    file = directory / MSGPACK_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; expected the T5X msgpack `{MSGPACK_FILE}` file in {directory}")
    try:
        tree = msgpack.unpackb(file.read_bytes(), ext_hook=_decode_ext, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as err:
        raise CheckpointError(f"{file}: truncated or corrupt msgpack ({type(err).__name__}: {err})") from None
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


def _zarr_leaf(directory: Path, name: str, spec: dict) -> _ZarrLeaf:
    if spec.get("driver") != "zarr":
        raise CheckpointError(f"{name}: unsupported tensorstore driver {spec.get('driver')!r}; expected 'zarr'")
    rel = str(spec["kvstore"].get("path", ""))
    folder = (directory / rel).resolve()
    if folder == directory or not folder.is_relative_to(directory):
        raise CheckpointError(f"{name}: spec path {rel!r} leaves the checkpoint folder {directory}")
    if not folder.is_dir():
        raise CheckpointError(f"{name}: zarr folder {folder} is missing")
    shape = tuple(spec.get("metadata", {}).get("shape", ()))
    return _ZarrLeaf(name, folder, shape)


def _read_zarr(leaf: _ZarrLeaf) -> np.ndarray:
    """Read one zarr v2 array chunk by chunk, checking every chunk is present and whole."""
    meta_file = leaf.folder / ".zarray"
    try:
        meta = json.loads(meta_file.read_text())
        shape, chunks = tuple(meta["shape"]), tuple(meta["chunks"])
        dtype_name, compressor, order = meta["dtype"], meta["compressor"], meta.get("order", "C")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{meta_file}: unreadable zarr metadata ({type(err).__name__}: {err})") from None
    if leaf.shape and shape != leaf.shape:
        raise CheckpointError(f"{meta_file}: shape {list(shape)} disagrees with the parameter tree's {list(leaf.shape)} for {leaf.name}")
    if dtype_name not in SUPPORTED_DTYPES:
        raise CheckpointError(f"{meta_file}: unsupported dtype {dtype_name!r}; expected one of {sorted(SUPPORTED_DTYPES)}")
    codec_id = compressor.get("id") if isinstance(compressor, dict) else compressor
    if codec_id not in SUPPORTED_COMPRESSORS or meta.get("filters") or order != "C":
        raise CheckpointError(f"{meta_file}: unsupported compressor/filters/order ({codec_id!r}, {meta.get('filters')!r}, {order!r}); expected gzip or zlib, no filters, C order")
    codec = numcodecs.get_codec(compressor) if compressor else None
    # bfloat16 has no numpy dtype: read its raw 16 bits and widen to float32 below.
    raw_dtype = np.dtype("<u2") if dtype_name == "bfloat16" else SUPPORTED_DTYPES[dtype_name]
    separator = meta.get("dimension_separator", ".")

    out = np.empty(shape, dtype=raw_dtype)
    grid = [range(-(-n // c)) for n, c in zip(shape, chunks)]  # chunks per axis (ceil)
    for index in product(*grid):
        key = separator.join(map(str, index)) if shape else "0"
        chunk_file = leaf.folder / key
        try:
            data = chunk_file.read_bytes()
            if codec is not None:
                data = codec.decode(data)
        except FileNotFoundError:
            raise CheckpointError(f"{chunk_file}: chunk missing from zarr array {leaf.name}") from None
        except Exception as err:  # numcodecs raises zlib.error, EOFError, RuntimeError, ...
            raise CheckpointError(f"{chunk_file}: corrupt {codec_id} chunk of {leaf.name} ({type(err).__name__}: {err})") from None
        expected = int(np.prod(chunks)) * raw_dtype.itemsize
        if len(data) != expected:
            raise CheckpointError(f"{chunk_file}: chunk of {leaf.name} holds {len(data)} bytes, expected {expected} for chunk shape {list(chunks)}")
        block = np.frombuffer(data, dtype=raw_dtype).reshape(chunks)
        region = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, chunks, shape))
        out[region] = block[tuple(slice(0, s.stop - s.start) for s in region)]
    if dtype_name == "bfloat16":
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out


def _step(tree: dict) -> int | None:
    step = tree["optimizer"].get("state", {}).get("step")
    return None if step is None else int(np.asarray(step).reshape(-1)[0])


def read_checkpoint(directory: str | os.PathLike, *, quiet: bool = True, workers: int | None = None) -> T5XCheckpoint:
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
    for name, node in _leaves(tree["optimizer"]["target"]):
        if isinstance(node, np.ndarray):
            arrays[name] = node
        elif _is_spec(node):
            zarr_leaves.append(_zarr_leaf(directory, name, node))
        else:
            raise CheckpointError(f"{directory / MSGPACK_FILE}: parameter {name} is neither an inline array nor a tensorstore spec ({type(node).__name__})")
    num_inline = len(arrays)
    if not arrays and not zarr_leaves:
        raise CheckpointError(f"{directory / MSGPACK_FILE}: `optimizer/target` holds no parameters")

    # gunzip releases the GIL: decode folders on all cores.
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(_read_zarr, zarr_leaves)
        for leaf, array in tqdm(zip(zarr_leaves, results), total=len(zarr_leaves), desc="reading arrays", unit="array", disable=quiet):
            arrays[leaf.name] = array
    return T5XCheckpoint(directory, dict(sorted(arrays.items())), _step(tree), num_inline, len(zarr_leaves))


__all__ = ["CheckpointError", "T5XCheckpoint", "read_checkpoint"]
