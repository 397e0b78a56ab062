"""T5X parameter paths -> MT3ForConditionalGeneration state-dict names, strictly.

The model keeps the T5X module names, so the mapping is a rename rule, not a table:

    encoder/layers_3/attention/query/kernel  ->  encoder.layers.3.attention.query.weight  (transposed)
    decoder/layers_0/pre_mlp_layer_norm/scale ->  decoder.layers.0.pre_mlp_layer_norm.weight
    decoder/token_embedder/embedding          ->  decoder.token_embedder.weight

Transposes: flax `DenseGeneral` stores kernels as (in_features, out_features) and computes
`x @ kernel`; `torch.nn.Linear` stores (out_features, in_features) and computes
`x @ weight.T`, so every `kernel` is transposed. An `Embed` table is (vocab, d_model) in both.
Attention kernels saved by some T5X versions keep the head axes, (d_model, heads, d_kv) for
query/key/value and (heads, d_kv, d_model) for out; they are flattened to 2-D first.
"""

from __future__ import annotations

import re

import numpy as np
import torch

_LAYER = re.compile(r"^layers_(\d+)$")


class MappingError(ValueError):
    """Checkpoint arrays and model parameters do not correspond one to one."""


def hf_name(t5x_path: str) -> str:
    """`encoder/layers_0/mlp/wi_0/kernel` -> `encoder.layers.0.mlp.wi_0.weight`."""
    *modules, leaf = t5x_path.split("/")
    if leaf not in ("kernel", "scale", "embedding"):
        raise MappingError(f"{t5x_path}: unknown parameter kind {leaf!r}; expected kernel, scale or embedding")
    parts = []
    for module in modules:
        match = _LAYER.match(module)
        parts += ["layers", match.group(1)] if match else [module]
    return ".".join(parts + ["weight"])


def to_torch_layout(t5x_path: str, array: np.ndarray) -> np.ndarray:
    """Rearrange one T5X array into the layout of its torch parameter (see module docstring)."""
    if not t5x_path.endswith("/kernel"):
        return array  # RMS-norm scale (d,) and Embed table (vocab, d) are stored as torch stores them
    if array.ndim == 3:  # attention kernel with explicit head axes
        is_out = t5x_path.endswith("/out/kernel")
        array = array.reshape(-1, array.shape[-1]) if is_out else array.reshape(array.shape[0], -1)
    if array.ndim != 2:
        raise MappingError(f"{t5x_path}: kernel of shape {list(array.shape)}; expected 2-D (in, out)")
    return array.T  # (in, out) -> (out, in)


def t5x_to_state_dict(arrays: dict[str, np.ndarray], expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Map every checkpoint array onto exactly one model parameter, checking names and shapes.

    `expected` is the model's `{name: shape}`. Any array without a parameter, parameter without
    an array (a norm scale left at its initial value, say), shape mismatch or NaN/infinite value is an error
    that lists all of them, so nothing is silently dropped or left at initialisation. Half-precision arrays
    are widened (exactly) to float32, the model's dtype: MT3 was trained in float32.
    """
    state: dict[str, torch.Tensor] = {}
    source_of: dict[str, str] = {}
    unused, mismatched, nonfinite = [], [], []
    for path, array in arrays.items():
        name = hf_name(path)
        if name in source_of:
            raise MappingError(f"{path} and {source_of[name]} both map to {name}")
        if name not in expected:
            unused.append(path)
            continue
        source_of[name] = path
        array = to_torch_layout(path, array)
        if tuple(array.shape) != tuple(expected[name]):
            mismatched.append(f"{path} {list(array.shape)} vs {name} {list(expected[name])}")
            continue
        if not np.isfinite(array).all():
            nonfinite.append(f"{path} ({array.size - int(np.isfinite(array).sum())} of {array.size})")
        state[name] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    missing = [name for name in expected if name not in source_of]
    problems = []
    if missing:
        problems.append(f"{len(missing)} model parameter(s) with no checkpoint array: {', '.join(missing)}")
    if unused:
        problems.append(f"{len(unused)} checkpoint array(s) with no model parameter: {', '.join(unused)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {'; '.join(mismatched)}")
    if nonfinite:
        problems.append(f"{len(nonfinite)} array(s) holding NaN or infinite values: {', '.join(nonfinite)}")
    if problems:
        raise MappingError("checkpoint does not match the model: " + " | ".join(problems))
    return state


__all__ = ["MappingError", "hf_name", "to_torch_layout", "t5x_to_state_dict"]
