"""The T5X reader and the strict mapping, on tiny checkpoints in the real on-disk format."""

import gzip
import json
import shutil

import msgpack
import numcodecs
import numpy as np
import pytest
import torch
import zarr

from convert_mt3.checkpoint import CheckpointError, read_checkpoint
from convert_mt3.config import ConfigError, derive_config, find_gin, parse_gin
from convert_mt3.mapping import MappingError, hf_name, t5x_to_state_dict, to_torch_layout

from t5x_writer import ext_array, tiny_arrays, write_t5x_checkpoint

GIN = """
from __gin__ import dynamic_registration
from mt3 import network
network.T5Config:
  vocab_size = 64
  emb_dim = 32
  num_heads = 4  # differs from the 2 x 8 the writer used? no: 4 x 4 = 16 below
  head_dim = 4
  mlp_dim = 48
  dropout_rate = 0.05
"""


@pytest.fixture
def arrays():
    return tiny_arrays()


@pytest.fixture
def ckpt(tmp_path, arrays):
    return write_t5x_checkpoint(tmp_path / "model" / "checkpoint_1000", arrays)


def test_reads_every_array_bit_exact(ckpt, arrays):
    result = read_checkpoint(ckpt)
    assert result.arrays.keys() == arrays.keys()
    for name, array in arrays.items():
        assert result.arrays[name].dtype == np.float32
        np.testing.assert_array_equal(result.arrays[name], array, err_msg=name)
    assert result.num_inline == sum(k.endswith("/scale") for k in arrays)
    assert result.num_zarr == len(arrays) - result.num_inline
    assert result.step == 1000


def test_optimizer_state_is_ignored(ckpt):
    assert not any("param_states" in k or k.endswith("/v") for k in read_checkpoint(ckpt).arrays)


@pytest.mark.parametrize("fill_value", [None, 0.5, "-Infinity"])
def test_multichunk_and_bfloat16_zarr(tmp_path, arrays, fill_value):
    """Chunks tile the array; with a fill_value, zarr v2's meaning of an absent chunk: it holds that value."""
    ckpt = write_t5x_checkpoint(tmp_path / "c", arrays)
    folder = ckpt / "target.decoder.logits_dense.kernel"
    meta = json.loads((folder / ".zarray").read_text())
    full = arrays["decoder/logits_dense/kernel"]  # (32, 64)
    bf16 = (full.view(np.uint32) >> 16).astype("<u2")  # truncate to bfloat16 bits
    for f in folder.iterdir():
        if f.name != ".zarray":
            f.unlink()
    for i in range(2):
        for j in range(2):
            block = bf16[i * 16:(i + 1) * 16, j * 32:(j + 1) * 32]
            (folder / f"{i}.{j}").write_bytes(gzip.compress(block.tobytes()))
    meta.update(chunks=[16, 32], dtype="bfloat16", fill_value=fill_value)
    (folder / ".zarray").write_text(json.dumps(meta))
    expected = (bf16.astype(np.uint32) << 16).view(np.float32)
    if fill_value is not None:
        (folder / "1.0").unlink()
        expected[16:, :32] = float(fill_value.replace("Infinity", "inf") if isinstance(fill_value, str) else fill_value)
    got = read_checkpoint(ckpt).arrays["decoder/logits_dense/kernel"]
    np.testing.assert_array_equal(got, expected)


def test_nested_chunk_keys(tmp_path, arrays):
    """dimension_separator "/": chunk (i, j) is the file i/j; a file where the folder i should be is named."""
    ckpt = write_t5x_checkpoint(tmp_path / "c", arrays)
    folder = ckpt / "target.decoder.logits_dense.kernel"
    shutil.rmtree(folder)
    full = arrays["decoder/logits_dense/kernel"]  # (32, 64)
    zarr.open_array(str(folder), mode="w", shape=full.shape, chunks=(16, 32), dtype=full.dtype, fill_value=None,
                    compressor=numcodecs.GZip(level=1), dimension_separator="/")[...] = full
    assert (folder / "1" / "1").is_file()
    np.testing.assert_array_equal(read_checkpoint(ckpt).arrays["decoder/logits_dense/kernel"], full)
    shutil.rmtree(folder / "1")
    (folder / "1").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"kernel/1/0: cannot be resolved \(Not a directory\)$"):
        read_checkpoint(ckpt)


def test_bfloat16_inline_scale(tmp_path, arrays):
    """An RMS-norm scale stored inline in bfloat16 (flax writes the dtype name \"bfloat16\") is widened like a zarr one."""
    ckpt = write_t5x_checkpoint(tmp_path / "c", arrays)
    tree = msgpack.unpackb((ckpt / "checkpoint").read_bytes(), raw=False, strict_map_key=False)
    scale = arrays["encoder/encoder_norm/scale"]
    bits = (scale.view(np.uint32) >> 16).astype("<u2")
    payload = msgpack.packb((list(scale.shape), "bfloat16", bits.tobytes()))
    tree["optimizer"]["target"]["encoder"]["encoder_norm"]["scale"] = msgpack.ExtType(1, payload)
    (ckpt / "checkpoint").write_bytes(msgpack.packb(tree))
    got = read_checkpoint(ckpt).arrays["encoder/encoder_norm/scale"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, (bits.astype(np.uint32) << 16).view(np.float32))


def test_mapping_names_and_transposes(arrays):
    assert hf_name("encoder/layers_3/attention/query/kernel") == "encoder.layers.3.attention.query.weight"
    assert hf_name("decoder/token_embedder/embedding") == "decoder.token_embedder.weight"
    assert hf_name("decoder/layers_0/pre_mlp_layer_norm/scale") == "decoder.layers.0.pre_mlp_layer_norm.weight"
    kernel = arrays["encoder/layers_0/mlp/wi_0/kernel"]
    np.testing.assert_array_equal(to_torch_layout("encoder/layers_0/mlp/wi_0/kernel", kernel), kernel.T)
    # head-split attention kernels (some T5X versions) flatten to the 2-D layout
    q3 = np.arange(4 * 2 * 3, dtype=np.float32).reshape(4, 2, 3)
    np.testing.assert_array_equal(to_torch_layout("e/attention/query/kernel", q3), q3.reshape(4, 6).T)
    o3 = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_array_equal(to_torch_layout("e/attention/out/kernel", o3), o3.reshape(6, 4).T)


def test_mapping_is_strict(arrays):
    expected = {hf_name(k): torch.Size(to_torch_layout(k, v).shape) for k, v in arrays.items()}
    state = t5x_to_state_dict(arrays, expected)
    assert state.keys() == expected.keys()
    missing_norm = {k: v for k, v in arrays.items() if k != "encoder/layers_1/pre_mlp_layer_norm/scale"}
    with pytest.raises(MappingError, match="encoder.layers.1.pre_mlp_layer_norm.weight"):
        t5x_to_state_dict(missing_norm, expected)
    extra = {**arrays, "encoder/extra/kernel": np.zeros((2, 2), np.float32)}
    with pytest.raises(MappingError, match="encoder/extra/kernel"):
        t5x_to_state_dict(extra, expected)
    wrong = {**arrays, "decoder/logits_dense/kernel": np.zeros((32, 65), np.float32)}
    with pytest.raises(MappingError, match="shape mismatch"):
        t5x_to_state_dict(wrong, expected)


def test_config_from_shapes_and_gin(tmp_path, arrays):
    config = derive_config(arrays, None, {"num_heads": 2, "d_kv": 8})
    assert (config.d_model, config.d_ff, config.vocab_size, config.input_depth) == (32, 48, 64, 16)
    assert (config.num_layers, config.num_decoder_layers, config.num_heads, config.d_kv) == (2, 2, 2, 8)
    ckpt = write_t5x_checkpoint(tmp_path / "model" / "checkpoint_1000", arrays, gin=GIN)
    gin = find_gin(ckpt)
    assert gin == (tmp_path / "model" / "config.gin").resolve()
    deeper = write_t5x_checkpoint(tmp_path / "model" / "runs" / "checkpoint_1000", arrays)
    assert find_gin(deeper) is None  # two folders up: another model's, or anyone's (in /tmp), not this one's
    assert parse_gin(gin) == {"vocab_size": 64, "d_model": 32, "num_heads": 4, "d_kv": 4, "d_ff": 48, "dropout_rate": 0.05}
    config = derive_config(arrays, gin)
    assert (config.num_heads, config.d_kv, config.dropout_rate) == (4, 4, 0.05)
    assert derive_config(arrays, gin, {"num_heads": 2, "d_kv": 8}).num_heads == 2  # flags win


def test_gin_as_t5x_writes_it(tmp_path):
    """MT3's gin/model.gin binds the vocabulary size to a configurable and T5X writes macros: references are skipped
    (the shapes give them), macros are read from the file."""
    gin = tmp_path / "config.gin"
    gin.write_text(
        "DROPOUT_RATE = 0.1\nnetwork.Transformer.config = @network.T5Config()\nnetwork.T5Config:\n"
        "  vocab_size = @vocabularies.num_embeddings()\n  dtype = 'float32'\n  num_heads = 6\n"
        "  dropout_rate = %DROPOUT_RATE\n  head_dim = %UNDEFINED\n"
    )
    assert parse_gin(gin) == {"num_heads": 6, "dropout_rate": 0.1}


def test_config_disagreements_are_errors(tmp_path, arrays):
    with pytest.raises(ConfigError, match="num_heads \\* d_kv"):
        derive_config(arrays, None, {"num_heads": 3, "d_kv": 8})
    with pytest.raises(ConfigError, match="--d-model 999999999: the checkpoint arrays give 32"):
        derive_config(arrays, None, {"d_model": 999999999})  # not a model of that width first
    assert derive_config(arrays, None, {"d_model": 32, "num_heads": 2, "d_kv": 8}).d_model == 32
    gin = tmp_path / "config.gin"
    gin.write_text("network.T5Config.emb_dim = 512\n")
    with pytest.raises(ConfigError, match="emb_dim|d_model"):
        derive_config(arrays, gin)
    for value in ["-" * 3000 + "1", "{[1]: 2}"]:  # a recursion error and a TypeError inside literal_eval: one line too
        gin.write_text(f"network.T5Config.num_heads = {value}\n")
        with pytest.raises(ConfigError, match=r"config.gin: cannot read T5Config.num_heads = (-{77}\.\.\.|\{\[1\]: 2\})$"):
            derive_config(arrays, gin)


def test_one_of_heads_and_head_size_gives_the_other(arrays):
    """The 2-D kernels fix num_heads * d_kv (16 here): given one, the other is the width's quotient."""
    assert (derive_config(arrays, None, {"num_heads": 4}).d_kv, derive_config(arrays, None, {"d_kv": 2}).num_heads) == (4, 8)
    with pytest.raises(ConfigError, match="num_heads \\* d_kv = 3 \\* 64 != 16"):
        derive_config(arrays, None, {"num_heads": 3})  # no quotient: MT3's default size, then the width check


def test_published_defaults_without_gin():
    arrays = tiny_arrays(d_model=32, heads=6, d_kv=64)
    config = derive_config(arrays, None)
    assert (config.num_heads, config.d_kv) == (6, 64)


# --- bad input: one CheckpointError naming the file or array -------------------------------------------


def test_missing_zarr_folder(ckpt):
    import shutil

    shutil.rmtree(ckpt / "target.encoder.layers_0.mlp.wo.kernel")
    with pytest.raises(CheckpointError, match="encoder/layers_0/mlp/wo/kernel.*missing"):
        read_checkpoint(ckpt)


def test_corrupt_gzip_chunk(ckpt):
    chunk = ckpt / "target.decoder.layers_1.mlp.wi_1.kernel" / "0.0"
    chunk.write_bytes(chunk.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="0.0.*decoder/layers_1/mlp/wi_1/kernel"):
        read_checkpoint(ckpt)
    chunk.write_bytes(b"\x1f\x8b not gzip at all")
    with pytest.raises(CheckpointError, match="corrupt gzip"):
        read_checkpoint(ckpt)


def test_missing_chunk_file(ckpt):
    (ckpt / "target.decoder.token_embedder.embedding" / "0.0").unlink()
    with pytest.raises(CheckpointError, match="chunk missing.*decoder/token_embedder/embedding.*fill_value is null"):
        read_checkpoint(ckpt)  # T5X's fill_value null: no value for it, so never zeros
    meta_file = ckpt / "target.decoder.token_embedder.embedding" / ".zarray"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "fill_value": "zero"}))
    with pytest.raises(CheckpointError, match=r"embedding/\.zarray: unsupported fill_value 'zero'"):
        read_checkpoint(ckpt)


def test_zarray_shape_disagrees_with_tree(ckpt):
    meta_file = ckpt / "target.encoder.layers_0.attention.key.kernel" / ".zarray"
    meta = json.loads(meta_file.read_text())
    meta["shape"] = [32, 8]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"\.zarray: shape \[32, 8\] disagrees"):
        read_checkpoint(ckpt)


def test_zarray_shape_disagrees_with_data(ckpt):
    """.zarray and tree agree, but the chunk holds a different number of values."""
    folder = ckpt / "target.encoder.layers_0.attention.key.kernel"
    (folder / "0.0").write_bytes(gzip.compress(np.zeros((32, 8), np.float32).tobytes()))
    with pytest.raises(CheckpointError, match="holds 1024 bytes, expected 2048"):
        read_checkpoint(ckpt)


@pytest.mark.parametrize("cut", [0, 100, -10])
def test_truncated_msgpack(ckpt, cut):
    file = ckpt / "checkpoint"
    data = file.read_bytes()
    file.write_bytes(data[:cut] if cut else b"")
    with pytest.raises(CheckpointError, match="checkpoint: (truncated or corrupt msgpack|no `optimizer/target`)"):
        read_checkpoint(ckpt)


def test_missing_msgpack(ckpt):
    (ckpt / "checkpoint").unlink()
    with pytest.raises(CheckpointError, match="checkpoint: missing"):
        read_checkpoint(ckpt)


def test_spec_path_escaping_checkpoint(ckpt, tmp_path):
    tree = msgpack.unpackb((ckpt / "checkpoint").read_bytes(), strict_map_key=False)
    tree["optimizer"]["target"]["decoder"]["logits_dense"]["kernel"]["kvstore"]["path"] = "../../outside/"
    (tmp_path / "outside").mkdir()
    (ckpt / "checkpoint").write_bytes(msgpack.packb(tree))
    with pytest.raises(CheckpointError, match="decoder/logits_dense/kernel: spec path '../../outside/' leaves"):
        read_checkpoint(ckpt)


def test_specs_of_tensorstore_before_0_1_14(ckpt, arrays):
    """T5X's gcs specs from tensorstore < 0.1.14 hold the path beside the kvstore (T5X's own reader takes both)."""
    tree = msgpack.unpackb((ckpt / "checkpoint").read_bytes(), strict_map_key=False)
    spec = tree["optimizer"]["target"]["decoder"]["logits_dense"]["kernel"]
    spec["path"] = spec["kvstore"].pop("path")
    spec["kvstore"] = {"driver": "gcs", "bucket": "t5x-dummy-bucket"}
    (ckpt / "checkpoint").write_bytes(msgpack.packb(tree))
    got = read_checkpoint(ckpt).arrays["decoder/logits_dense/kernel"]
    np.testing.assert_array_equal(got, arrays["decoder/logits_dense/kernel"])


def test_one_parameter_read_twice_is_refused(ckpt):
    """A key holding "/" spells another parameter's path, and two specs may name one folder: either would put one
    array in two places (the later read silently winning), so both are refused."""
    pristine = (ckpt / "checkpoint").read_bytes()
    tree = msgpack.unpackb(pristine, strict_map_key=False)
    decoder = tree["optimizer"]["target"]["decoder"]
    decoder["logits_dense/kernel"] = decoder["layers_0"]["mlp"]["wi_0"]["kernel"]
    (ckpt / "checkpoint").write_bytes(msgpack.packb(tree))
    with pytest.raises(CheckpointError, match="checkpoint: parameter path decoder/logits_dense/kernel appears twice"):
        read_checkpoint(ckpt)
    tree = msgpack.unpackb(pristine, strict_map_key=False)
    mlp = tree["optimizer"]["target"]["decoder"]["layers_0"]["mlp"]
    mlp["wi_1"]["kernel"]["kvstore"]["path"] = mlp["wi_0"]["kernel"]["kvstore"]["path"]
    (ckpt / "checkpoint").write_bytes(msgpack.packb(tree))
    with pytest.raises(CheckpointError, match=r"wi_0\.kernel: the zarr folder of both decoder/layers_0/mlp/wi_0/kernel "
                                              "and decoder/layers_0/mlp/wi_1/kernel"):
        read_checkpoint(ckpt)


def test_a_tree_nested_deeper_than_python_recurses(ckpt):
    """msgpack unpacks ~1020 levels (its packer writes 511): more than Python's recursion limit walks."""
    deep = b"\x81\xa1a" * 1010 + b"\x80"  # {"a": {"a": ... {}}}, written by hand
    (ckpt / "checkpoint").write_bytes(b"\x81" + msgpack.packb("optimizer") + b"\x81" + msgpack.packb("target") + deep)
    with pytest.raises(CheckpointError, match="checkpoint: `optimizer/target` is nested too deeply"):
        read_checkpoint(ckpt)


def test_unsupported_dtype_and_compressor(ckpt):
    meta_file = ckpt / "target.decoder.logits_dense.kernel" / ".zarray"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "dtype": "<i8"}))
    with pytest.raises(CheckpointError, match="unsupported dtype '<i8'"):
        read_checkpoint(ckpt)
    meta_file.write_text(json.dumps({**meta, "compressor": {"id": "blosc", "cname": "lz4"}}))
    with pytest.raises(CheckpointError, match="unsupported compressor.*blosc"):
        read_checkpoint(ckpt)


def test_empty_directory_and_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint: missing"):
        read_checkpoint(tmp_path)
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        read_checkpoint(file)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        read_checkpoint(tmp_path / "nope")


def test_inline_array_round_trip():
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    from convert_mt3.checkpoint import _decode_ext

    np.testing.assert_array_equal(_decode_ext(ext_array(array)), array)


def test_an_inline_dtype_numpy_lacks(ckpt):
    """Only `optimizer/target` is decoded: such a leaf in the optimizer state is ignored, in the parameters it is
    named (it was 'truncated or corrupt msgpack' for the whole file either way)."""
    tree = msgpack.unpackb((ckpt / "checkpoint").read_bytes(), strict_map_key=False)
    float8 = msgpack.ExtType(1, msgpack.packb(([4], "float8_e4m3fn", bytes(4))))
    tree["optimizer"]["state"]["param_states"] = {"decoder": {"v": float8}}
    (ckpt / "checkpoint").write_bytes(msgpack.packb(tree))
    assert read_checkpoint(ckpt).step == 1000
    tree["optimizer"]["target"]["encoder"]["encoder_norm"]["scale"] = float8
    (ckpt / "checkpoint").write_bytes(msgpack.packb(tree))
    with pytest.raises(CheckpointError, match=r"checkpoint: inline parameter encoder/encoder_norm/scale cannot be "
                                              r"decoded \(TypeError: data type 'float8_e4m3fn' not understood\)$"):
        read_checkpoint(ckpt)


def test_real_checkpoint_all_arrays(shared):
    """The real MT3 checkpoint: 147 zarr folders + 42 inline scales, nothing else, all finite."""
    result = read_checkpoint(shared / "checkpoints" / "mt3")
    n_params = sum(a.size for a in result.arrays.values())
    print(f"real checkpoint: {len(result.arrays)} arrays ({result.num_zarr} zarr + {result.num_inline} inline), {n_params:,} parameters, step {result.step}")
    assert (len(result.arrays), result.num_zarr, result.num_inline) == (189, 147, 42)
    assert sum(k.endswith("/scale") for k in result.arrays) == 42
    assert n_params == 45_896_704 and result.step == 1_000_000
    assert all(np.isfinite(a).all() for a in result.arrays.values())
