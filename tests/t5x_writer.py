"""Write small T5X checkpoints in the real on-disk format, for tests.

Same layout as a T5X/MT3 checkpoint: a msgpack `checkpoint` file with `version`,
`optimizer/state` (step + Adafactor-like statistics) and `optimizer/target`, in which the
RMS-norm scales are inline flax ExtType arrays and every other parameter is a tensorstore
spec for a zarr v2 folder `target.<dotted path>` written by the zarr library (gzip level 1).
"""

from __future__ import annotations

from pathlib import Path

import msgpack
import numcodecs
import numpy as np
import zarr

# A tiny model with MT3's real vocabulary and mel depth, so the processor saved beside it fits it.
TINY_MT3 = dict(d_model=32, heads=2, d_kv=8, d_ff=48, layers=2, decoder_layers=2, vocab=1536, input_depth=512)
TINY_MT3_GIN = "network.T5Config.num_heads = 2\nnetwork.T5Config.head_dim = 8\nnetwork.T5Config.dropout_rate = 0.0\n"


def ext_array(array: np.ndarray) -> msgpack.ExtType:
    """flax.serialization's encoding of an ndarray (ExtType 1)."""
    payload = msgpack.packb((list(array.shape), array.dtype.name, array.tobytes()))
    return msgpack.ExtType(1, payload)


def tiny_arrays(
    *, d_model=32, heads=2, d_kv=8, d_ff=48, layers=2, decoder_layers=2, vocab=64, input_depth=16, seed=0
) -> dict[str, np.ndarray]:
    """Random parameters named as MT3's T5X tree names them; kernels are (in, out)."""
    rng = np.random.default_rng(seed)

    def rand(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    inner = heads * d_kv
    arrays = {
        "encoder/continuous_inputs_projection/kernel": rand(input_depth, d_model),
        "encoder/encoder_norm/scale": (1 + 0.1 * rand(d_model)).astype(np.float32),
        "decoder/token_embedder/embedding": rand(vocab, d_model),
        "decoder/decoder_norm/scale": (1 + 0.1 * rand(d_model)).astype(np.float32),
        "decoder/logits_dense/kernel": rand(d_model, vocab),
    }

    def block(prefix: str, attentions: list[str], norms: list[str]) -> None:
        for attention in attentions:
            for proj in ("query", "key", "value"):
                arrays[f"{prefix}/{attention}/{proj}/kernel"] = rand(d_model, inner)
            arrays[f"{prefix}/{attention}/out/kernel"] = rand(inner, d_model)
        arrays[f"{prefix}/mlp/wi_0/kernel"] = rand(d_model, d_ff)
        arrays[f"{prefix}/mlp/wi_1/kernel"] = rand(d_model, d_ff)
        arrays[f"{prefix}/mlp/wo/kernel"] = rand(d_ff, d_model)
        for norm in norms:
            arrays[f"{prefix}/{norm}/scale"] = (1 + 0.1 * rand(d_model)).astype(np.float32)

    for i in range(layers):
        block(f"encoder/layers_{i}", ["attention"], ["pre_attention_layer_norm", "pre_mlp_layer_norm"])
    for i in range(decoder_layers):
        block(
            f"decoder/layers_{i}",
            ["self_attention", "encoder_decoder_attention"],
            ["pre_self_attention_layer_norm", "pre_cross_attention_layer_norm", "pre_mlp_layer_norm"],
        )
    return arrays


def _nest(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def write_t5x_checkpoint(directory: Path, arrays: dict[str, np.ndarray], *, step: int = 1000, gin: str | None = None) -> Path:
    """Write `arrays` as T5X does: scales inline in msgpack, the rest as zarr folders."""
    directory.mkdir(parents=True, exist_ok=True)
    target: dict = {}
    state: dict = {}
    for path, array in arrays.items():
        if path.endswith("/scale"):
            _nest(target, path, ext_array(array))
        else:
            folder = "target." + path.replace("/", ".")
            z = zarr.open_array(
                str(directory / folder), mode="w", shape=array.shape, chunks=array.shape,
                dtype=array.dtype, compressor=numcodecs.GZip(level=1), fill_value=None,
                dimension_separator=".",
            )
            z[...] = array
            spec = {
                "driver": "zarr",
                "dtype": array.dtype.name,
                "kvstore": {"driver": "gfile", "path": folder + "/"},
                "metadata": {
                    "chunks": list(array.shape),
                    "compressor": {"id": "gzip", "level": 1},
                    "dtype": array.dtype.str,
                    "shape": list(array.shape),
                },
                "transform": {
                    "input_exclusive_max": [[n] for n in array.shape],
                    "input_inclusive_min": [0] * array.ndim,
                },
            }
            _nest(target, path, spec)
        # Adafactor-style statistics beside the target, as in a real checkpoint: must be ignored.
        _nest(state, f"param_states/{path}/v", ext_array(np.zeros(array.shape[-1:], np.float32)))
    state["step"] = ext_array(np.asarray(step, dtype=np.int32))
    tree = {"version": 3, "optimizer": {"state": state, "target": target}}
    (directory / "checkpoint").write_bytes(msgpack.packb(tree))
    if gin is not None:
        (directory.parent / "config.gin").write_text(gin)
    return directory
