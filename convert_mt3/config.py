"""MT3Config from a checkpoint: sizes from array shapes, head layout from `config.gin`.

A 2-D attention kernel (d_model, heads * d_kv) cannot say how its 384 columns split into
heads, so `num_heads`/`head_dim` come from the `config.gin` T5X writes into the model folder
(the checkpoint folder's parent, or the checkpoint folder itself), else from the published MT3
values. Every value can be set by a CLI flag, which wins over gin; neither may contradict the shapes.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import read_bounded
from .cli import first_line
from .mt3.configuration_mt3 import MT3Config

GIN_FILE = "config.gin"
GIN_SEARCH_DEPTH = 1  # the checkpoint folder and its parent (T5X: model_dir/config.gin, model_dir/checkpoint_N/)
MAX_GIN_BYTES = 1 << 20  # T5X's config.gin for MT3: ~20 KB
# gin `network.T5Config` name -> MT3Config field
GIN_FIELDS = {
    "vocab_size": "vocab_size",
    "emb_dim": "d_model",
    "num_heads": "num_heads",
    "head_dim": "d_kv",
    "mlp_dim": "d_ff",
    "num_encoder_layers": "num_layers",
    "num_decoder_layers": "num_decoder_layers",
    "dropout_rate": "dropout_rate",
}
_GIN_LINE = re.compile(r"^\s*(?:network\.)?T5Config\.(\w+)\s*=\s*(.+?)\s*$")
_GIN_BLOCK = re.compile(r"^\s*(?:network\.)?T5Config\s*:\s*$")
_GIN_ITEM = re.compile(r"^\s+(\w+)\s*=\s*(.+?)\s*$")
GIN_MACRO = re.compile(r"^\s*([A-Z_][A-Z0-9_]*)\s*=\s*(.+?)\s*$")


class ConfigError(ValueError):
    """Checkpoint shapes, gin file and overrides disagree."""


def find_gin(checkpoint_dir: Path) -> Path | None:
    """The `config.gin` in the checkpoint folder, else in its parent (T5X's model_dir); no further up, where a
    gin file of another model (or anyone's, in /tmp) would silently change the layout."""
    for folder in [checkpoint_dir, *checkpoint_dir.resolve().parents][: GIN_SEARCH_DEPTH + 1]:
        if (folder / GIN_FILE).is_file():
            return folder / GIN_FILE
    return None


def read_gin(path: Path) -> list[str]:
    """The lines of a gin file, comments cut: a regular file itself (no symbolic link followed), of at most
    MAX_GIN_BYTES."""
    if path.is_symlink():
        raise ConfigError(f"{path}: is a symbolic link; expected T5X's config.gin as a regular file")
    data = read_bounded(path, MAX_GIN_BYTES, ConfigError, path, f"; expected a gin file of at most {MAX_GIN_BYTES:,}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a gin file (not UTF-8 text)") from None
    return [line.split("#", 1)[0].rstrip() for line in text.splitlines()]


def gin_literal(path: Path, name: str, text: str, error: type[ValueError]) -> Any:
    """The Python literal a gin binding holds, else `error` naming the file and binding (the value cut short)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):  # a deep or huge value: one line too
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise error(f"{path}: cannot read {name} = {shown}") from None


def parse_gin(path: Path) -> dict[str, Any]:
    """`network.T5Config` bindings as MT3Config fields; both `T5Config.x = v` and block form.

    A `%MACRO` value is read from the file's `MACRO = value` line; a reference to a configurable (T5X's own
    `vocab_size = @vocabularies.num_embeddings()`) is skipped: the arrays' shapes give those values.
    """
    lines = read_gin(path)
    macros = {match.group(1): match.group(2) for match in map(GIN_MACRO.match, lines) if match}
    values: dict[str, Any] = {}
    in_block = False
    for line in lines:
        match = _GIN_LINE.match(line)
        if _GIN_BLOCK.match(line):
            in_block = True
            continue
        if in_block:
            item = _GIN_ITEM.match(line)
            if item:
                match = item
            elif line.strip():
                in_block = False
        if not match or match.group(1) not in GIN_FIELDS:
            continue
        value = match.group(2)
        if value.startswith("%"):
            value = macros.get(value[1:], "@")  # an undefined macro is gin's error, not ours: skipped
        if value.startswith("@"):
            continue
        parsed = gin_literal(path, f"T5Config.{match.group(1)}", value, ConfigError)
        field = GIN_FIELDS[match.group(1)]
        if field == "dropout_rate":
            valid, kind = isinstance(parsed, (int, float)) and 0 <= parsed < 1, "a number from 0 to below 1"
        else:
            valid, kind = isinstance(parsed, int) and parsed >= 1, "an integer >= 1"
        if isinstance(parsed, bool) or not valid:
            raise ConfigError(f"{path}: T5Config.{match.group(1)} = {match.group(2)}: expected {kind}")
        values[field] = parsed
    return values


def _count_layers(arrays: dict[str, np.ndarray], stack: str) -> int:
    return len({key.split("/")[1] for key in arrays if key.startswith(f"{stack}/layers_")})


def _shape(arrays: dict[str, np.ndarray], key: str, dims: tuple[int, ...] = (2,)) -> tuple[int, ...]:
    """The shape of `arrays[key]`, which must have one of `dims` dimensions."""
    if key not in arrays:
        raise ConfigError(f"checkpoint has no array {key}; cannot derive the model size")
    shape = arrays[key].shape
    if len(shape) not in dims:
        raise ConfigError(f"checkpoint array {key} has shape {list(shape)}; expected {' or '.join(map(str, dims))} dimensions")
    return shape


def shape_values(arrays: dict[str, np.ndarray]) -> dict[str, int]:
    """The sizes the arrays themselves fix."""
    vocab_size, d_model = _shape(arrays, "decoder/token_embedder/embedding")
    query = _shape(arrays, "encoder/layers_0/attention/query/kernel", dims=(2, 3))
    values = {
        "vocab_size": vocab_size,
        "d_model": d_model,
        "input_depth": _shape(arrays, "encoder/continuous_inputs_projection/kernel")[0],
        "d_ff": _shape(arrays, "encoder/layers_0/mlp/wi_0/kernel")[1],
        "num_layers": _count_layers(arrays, "encoder"),
        "num_decoder_layers": _count_layers(arrays, "decoder"),
    }
    if len(query) == 3:  # (d_model, heads, d_kv): the heads are explicit
        values["num_heads"], values["d_kv"] = query[1], query[2]
    return values


def derive_config(arrays: dict[str, np.ndarray], gin: Path | None = None, overrides: dict[str, Any] | None = None) -> MT3Config:
    """Shapes, then gin, then overrides; published MT3 defaults for anything still unset."""
    from_shapes = shape_values(arrays)
    from_gin = parse_gin(gin) if gin else {}
    for field, value in from_gin.items():
        if field in from_shapes and from_shapes[field] != value:
            raise ConfigError(f"{gin}: T5Config {field} = {value} but the checkpoint arrays give {from_shapes[field]}")
    for field, value in (overrides or {}).items():  # refused before a model of the wrong size is allocated
        if value is not None and field in from_shapes and from_shapes[field] != value:
            raise ConfigError(f"--{field.replace('_', '-')} {value}: the checkpoint arrays give {from_shapes[field]}")
    values = {**from_gin, **from_shapes, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    inner = int(np.prod(_shape(arrays, "encoder/layers_0/attention/query/kernel", dims=(2, 3))[1:]))
    for given, other in (("num_heads", "d_kv"), ("d_kv", "num_heads")):  # one of the two: the width gives the other
        size = values.get(given)
        if other not in values and type(size) is int and size > 0 and inner % size == 0:
            values[other] = inner // size
    try:
        config = MT3Config(**values)
    except Exception as err:  # transformers' strict config checks raise their own error classes
        raise ConfigError(f"invalid model configuration: {first_line(err)}") from None
    if config.num_heads * config.d_kv != inner:
        raise ConfigError(f"num_heads * d_kv = {config.num_heads} * {config.d_kv} != {inner}, the attention width of encoder/layers_0/attention/query/kernel")
    return config


__all__ = ["ConfigError", "derive_config", "find_gin", "parse_gin", "read_gin", "shape_values"]
