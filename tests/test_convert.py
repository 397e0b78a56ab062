"""`python -m convert_mt3` end to end on tiny T5X checkpoints, and every bad input it must refuse."""

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from convert_mt3.__main__ import main
from convert_mt3.output import MANIFEST

from t5x_writer import TINY_MT3 as TINY
from t5x_writer import TINY_MT3_GIN as GIN
from t5x_writer import tiny_arrays, write_t5x_checkpoint


@pytest.fixture(scope="module")
def arrays():
    return tiny_arrays(**TINY)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, arrays):
    """One successful conversion shared by the read-only tests below."""
    root = tmp_path_factory.mktemp("converted")
    mt3_ckpt = write_t5x_checkpoint(root / "model" / "checkpoint_1000", arrays, gin=GIN)
    assert main([str(mt3_ckpt), str(root / "out"), "--quiet"]) == 0
    return root / "out"


def torch_layout(path: str, array: np.ndarray) -> np.ndarray:
    """What the folder must hold for a T5X array: kernels (in, out) become (out, in)."""
    return array.T if path.endswith("/kernel") else array


def test_every_array_bit_exact_in_safetensors(converted, arrays):
    weights = load_file(converted / "model.safetensors")
    assert len(weights) == len(arrays)
    for path, array in arrays.items():
        name = ".".join(p.replace("layers_", "layers.") for p in path.split("/")[:-1]) + ".weight"
        assert weights[name].dtype == np.float32
        np.testing.assert_array_equal(weights[name], torch_layout(path, array), err_msg=path)


def test_folder_contents_and_config(converted):
    files = {p.name for p in converted.iterdir()}
    for name in [
        "model.safetensors", "config.json", "generation_config.json", "preprocessor_config.json",
        "tokenizer_config.json", "README.md", "configuration_mt3.py", "modeling_mt3.py",
        "feature_extraction_mt3.py", "tokenization_mt3.py", "processing_mt3.py",
    ]:
        assert name in files, name
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    config = json.loads((converted / "config.json").read_text())
    # sizes from shapes, head layout and dropout from config.gin
    assert config["model_type"] == "mt3"
    assert (config["d_model"], config["d_ff"], config["vocab_size"], config["input_depth"]) == (32, 48, 1536, 512)
    assert (config["num_layers"], config["num_decoder_layers"], config["num_heads"], config["d_kv"]) == (2, 2, 2, 8)
    assert config["dropout_rate"] == 0.0 and config["tie_word_embeddings"] is False
    # T5 fields of what MT3 does not have (a relative position bias, a classification head) are left out
    assert not {"relative_attention_num_buckets", "relative_attention_max_distance", "classifier_dropout"} & set(config)
    assert {config["auto_map"][name] for name in ("AutoModel", "AutoModelForSeq2SeqLM", "AutoModelForSpeechSeq2Seq")} == {
        "modeling_mt3.MT3ForConditionalGeneration"}
    generation = json.loads((converted / "generation_config.json").read_text())
    assert (generation["decoder_start_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (0, 1, 0)
    # the decoder start + 1024 targets, as `max_length`, which a caller's `max_length` replaces (Seq2SeqTrainer)
    assert (generation["max_length"], generation.get("max_new_tokens"), generation.get("do_sample", False)) == (1025, None, False)
    assert generation["draft_shift_ids"] == [3, 1003]  # mt3's time shifts: shift 0 to 1000 after 3 special ids
    # the processor warns about labels longer than the decoder's positions
    assert json.loads((converted / "tokenizer_config.json").read_text())["model_max_length"] == 1024
    for file in ["configuration_mt3.py", "modeling_mt3.py"]:  # copied verbatim
        assert (converted / file).read_bytes() == (Path("convert_mt3/mt3") / file).read_bytes()


def test_every_file_gets_the_umasks_permissions(converted):
    """The weights too: safetensors writes its file private (0600), which another user serving the folder could not
    read."""
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in converted.iterdir() if p.is_file()}
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_model_card(converted):
    card = (converted / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\nlibrary_name: transformers\n")
    for text in ["music-transcription", "audio-to-midi", "Gardner", "T5X step 1000", "AutoProcessor", "convert-mt3 0.1.0",
                 "reads 2.048 s segments", "(time shifts, programs, pitches, note on/off, ties)", "Slakh2100",
                 '"transformers>=5.10.1,<6"', "# this folder's path, or its Hub id once pushed"]:
        assert text in card, text
    assert "not this one's" not in card


def test_overrides_win_over_gin(mt3_ckpt, tmp_path):
    out = tmp_path / "out"
    assert main([str(mt3_ckpt), str(out), "--quiet", "--num-heads", "4", "--d-kv", "4", "--dtype", "bfloat16"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["num_heads"], config["d_kv"]) == (4, 4)
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}


def test_half_precision_arrays_are_widened_to_float32(tmp_path):
    """T5X may store arrays in float16 or bfloat16, inline or in zarr: the model gets them widened (exactly) to
    float32, its dtype, so that a half-precision export and the golden check run on one dtype throughout."""
    arrays = tiny_arrays(**TINY)
    for key in ("decoder/decoder_norm/scale", "encoder/layers_0/mlp/wi_0/kernel"):  # inline, zarr
        arrays[key] = arrays[key].astype(np.float16)
    ckpt = write_t5x_checkpoint(tmp_path / "model" / "checkpoint_1000", arrays, gin=GIN)
    for dtype in ("float32", "bfloat16", "float16"):
        assert main([str(ckpt), str(tmp_path / dtype), "--quiet", "--dtype", dtype]) == 0
    weights = load_file(tmp_path / "float32" / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {np.dtype(np.float32)}
    halves = load_file(tmp_path / "float16" / "model.safetensors")
    assert {w.dtype for w in halves.values()} == {np.dtype(np.float16)}
    assert all(np.array_equal(halves[k], weights[k].astype(np.float16)) for k in weights)
    np.testing.assert_array_equal(weights["decoder.decoder_norm.weight"], arrays["decoder/decoder_norm/scale"])


def test_head_split_attention_kernels(tmp_path):
    """T5X's attention kernels with explicit head axes ((d_model, heads, d_kv) in, (heads, d_kv, d_model) out) give
    the same folder weights as the 2-D ones."""
    arrays = tiny_arrays(**TINY)
    heads, d_kv = TINY["heads"], TINY["d_kv"]
    split = dict(arrays)
    for key, array in arrays.items():
        if "attention/" in key and key.endswith("/kernel"):
            out = key.endswith("/out/kernel")
            split[key] = array.reshape(heads, d_kv, -1) if out else array.reshape(array.shape[0], heads, d_kv)
    assert sum(a.ndim == 3 for a in split.values()) == 4 * (TINY["layers"] + 2 * TINY["decoder_layers"])
    for name, tree in (("flat", arrays), ("split", split)):
        ckpt = write_t5x_checkpoint(tmp_path / name / "checkpoint_1000", tree, gin=GIN)
        assert main([str(ckpt), str(tmp_path / f"out_{name}"), "--quiet"]) == 0
    flat, heads_split = (load_file(tmp_path / f"out_{name}" / "model.safetensors") for name in ("flat", "split"))
    assert flat.keys() == heads_split.keys() and all(np.array_equal(flat[k], heads_split[k]) for k in flat)


def test_reload_check_failures_write_nothing(mt3_ckpt, tmp_path, capsys, monkeypatch):
    """The folder is reloaded as a user would before it is moved in: a weight that changed on the way, or logits
    beyond the tolerance, stop the conversion with one line and nothing written."""
    from safetensors.numpy import save_file

    import convert_mt3.export as export

    write_folder = export.write_folder

    def corrupting(folder, *args):
        write_folder(folder, *args)
        weights = load_file(folder / "model.safetensors")
        weights["decoder.decoder_norm.weight"] = weights["decoder.decoder_norm.weight"] + 1
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})

    monkeypatch.setattr(export, "write_folder", corrupting)
    assert main([str(mt3_ckpt), str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("reloaded parameter decoder.decoder_norm.weight differs from the "
                                             "checkpoint array"), err
    monkeypatch.setattr(export, "write_folder", write_folder)
    monkeypatch.setitem(export.RELOAD_TOLERANCE, "float32", -1.0)  # no error can be below it
    assert main([str(mt3_ckpt), str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reloaded logits differ from the source model by 0 (> -1.0)" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nor staging folders


def test_overwrite(mt3_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert main([str(mt3_ckpt), str(out), "--quiet"]) == 1
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").exists()
    # --overwrite never deletes what convert-mt3 did not write (tests/test_safety.py has the other cases)
    assert main([str(mt3_ckpt), str(out), "--quiet", "--overwrite"]) == 1
    assert "no .convert-mt3.json" in capsys.readouterr().err and (out / "keep.txt").read_text() == "user data"
    (out / "keep.txt").unlink()
    out.chmod(0o700)  # a private folder stays private: replaced, it keeps its permissions
    assert main([str(mt3_ckpt), str(out), "--quiet", "--overwrite"]) == 0  # an empty folder is taken
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert main([str(mt3_ckpt), str(out), "--quiet", "--overwrite"]) == 0  # and so is a folder it wrote
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]  # no staging, backup or lock left
    # a file it wrote, edited since, is the user's now
    (out / "README.md").write_text("MY OWN NOTES")
    assert main([str(mt3_ckpt), str(out), "--quiet", "--overwrite"]) == 1
    assert "1 file changed since convert-mt3 wrote it (README.md)" in capsys.readouterr().err
    assert (out / "README.md").read_text() == "MY OWN NOTES"


def test_overwrite_sees_an_edit_that_keeps_the_size(mt3_ckpt, tmp_path, capsys):
    """The manifest holds each file's SHA-256 as well as its size; one of an older version (sizes only) is still
    honoured."""
    out = tmp_path / "out"
    assert main([str(mt3_ckpt), str(out), "--quiet"]) == 0
    card = (out / "README.md").read_bytes()
    edited = card.replace(b"MT3", b"MT4", 1)
    assert edited != card and len(edited) == len(card)
    (out / "README.md").write_bytes(edited)
    assert main([str(mt3_ckpt), str(out), "--quiet", "--overwrite"]) == 1
    assert "1 file changed since convert-mt3 wrote it (README.md)" in capsys.readouterr().err
    assert (out / "README.md").read_bytes() == edited
    manifest = json.loads((out / MANIFEST).read_text())
    assert set(manifest["files"]["README.md"]) == {"size", "sha256"}
    manifest["files"] = {name: entry["size"] for name, entry in manifest["files"].items()}  # an older manifest
    (out / MANIFEST).write_text(json.dumps(manifest))
    assert main([str(mt3_ckpt), str(out), "--quiet", "--overwrite"]) == 0  # same sizes: taken, as before
    assert (out / "README.md").read_bytes() == card
    (out / "config.json").unlink()
    os.mkfifo(out / "config.json")  # not a file it wrote: refused, without waiting for a writer
    assert main([str(mt3_ckpt), str(out), "--quiet", "--overwrite"]) == 1
    assert "1 file changed since convert-mt3 wrote it (config.json)" in capsys.readouterr().err


def test_out_dir_through_a_missing_folder_leaves_nothing(mt3_ckpt, tmp_path, capsys):
    """OUT_DIR = new/a/../out on a bad checkpoint: the folders made for it (new, new/a) are removed again, and a
    folder that was there before is kept."""
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "b").mkdir()
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert main([str(tmp_path / "nope"), str(tmp_path / "new" / "a" / ".." / "b" / "out"), "--quiet"]) == 1
    assert "no such checkpoint directory" in capsys.readouterr().err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    assert main([str(tmp_path / "nope"), str(tmp_path / "x" / "a" / ".." / "out"), "--quiet"]) == 1
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    assert main([str(mt3_ckpt), str(tmp_path / "x" / "a" / ".." / "out"), "--quiet"]) == 0
    assert (tmp_path / "x" / "out" / "model.safetensors").is_file()


def test_folders_made_for_the_lock_are_removed_when_it_fails(tmp_path, monkeypatch):
    """A lock file name too long for the file system: the folders made for it go again. A relative OUT_DIR makes
    its folders where the path says."""
    from convert_mt3.output import OutputError, out_dir_lock

    with pytest.raises(OutputError, match="cannot be written"):
        with out_dir_lock(tmp_path / "new" / ("x" * 250)):
            pass
    assert list(tmp_path.iterdir()) == []
    monkeypatch.chdir(tmp_path)
    with out_dir_lock(Path("new") / "a" / "out"):
        assert (tmp_path / "new" / "a" / ".out.lock").is_file()
    assert list(tmp_path.iterdir()) == []


def test_reload_check_reuses_one_remote_code_entry(mt3_ckpt, tmp_path):
    """The reload check loads the staging folder with trust_remote_code, which copies its code into
    HF_MODULES_CACHE under the folder's name: staging is named as OUT_DIR, so runs add no entry per run."""
    from transformers.utils import HF_MODULES_CACHE

    modules = Path(HF_MODULES_CACHE) / "transformers_modules"
    before = set(p.name for p in modules.iterdir()) if modules.is_dir() else set()
    for _ in range(2):
        assert main([str(mt3_ckpt), str(tmp_path / "mt3_reload_entry"), "--quiet", "--overwrite"]) == 0
    assert set(p.name for p in modules.iterdir()) - before <= {"mt3_reload_entry"}


def test_progress_and_quiet(mt3_ckpt, tmp_path):
    """tqdm progress on stderr by default; --quiet prints nothing at all."""
    cmd = [sys.executable, "-m", "convert_mt3", str(mt3_ckpt)]
    loud = subprocess.run(cmd + [str(tmp_path / "a")], capture_output=True, text=True)
    assert loud.returncode == 0, loud.stderr
    assert "reading arrays" in loud.stderr and "wrote" in loud.stdout
    assert f"head layout and variant macros from {(mt3_ckpt.parent / 'config.gin').resolve()}" in loud.stdout
    quiet = subprocess.run(cmd + [str(tmp_path / "b"), "--quiet"], capture_output=True, text=True)
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == "", quiet.stderr


# --- bad input: exit 1, one line naming the culprit, nothing written -----------------------------


def break_missing_folder(mt3_ckpt):
    shutil.rmtree(mt3_ckpt / "target.decoder.layers_0.mlp.wo.kernel")
    return "decoder/layers_0/mlp/wo/kernel"


def break_gzip(mt3_ckpt):
    chunk = mt3_ckpt / "target.encoder.layers_1.attention.value.kernel" / "0.0"
    chunk.write_bytes(chunk.read_bytes()[:50])
    return "target.encoder.layers_1.attention.value.kernel/0.0"


def break_zarray_axes(mt3_ckpt):
    meta_file = mt3_ckpt / "target.decoder.logits_dense.kernel" / ".zarray"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "shape": [1] * 100, "chunks": [1] * 100}))
    return "(chunks > 0, at most 8 axes)"


def break_zarray_shape(mt3_ckpt):
    meta_file = mt3_ckpt / "target.decoder.logits_dense.kernel" / ".zarray"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "shape": [32, 1535]}))
    return "target.decoder.logits_dense.kernel/.zarray"


def break_truncated_msgpack(mt3_ckpt):
    data = (mt3_ckpt / "checkpoint").read_bytes()
    (mt3_ckpt / "checkpoint").write_bytes(data[: len(data) // 2])
    return "checkpoint: truncated or corrupt msgpack"


def break_missing_msgpack(mt3_ckpt):
    (mt3_ckpt / "checkpoint").unlink()
    return "checkpoint: missing"


def break_escaping_spec(mt3_ckpt):
    import msgpack

    tree = msgpack.unpackb((mt3_ckpt / "checkpoint").read_bytes(), strict_map_key=False)
    tree["optimizer"]["target"]["encoder"]["continuous_inputs_projection"]["kernel"]["kvstore"]["path"] = "/etc/"
    (mt3_ckpt / "checkpoint").write_bytes(msgpack.packb(tree))
    return "encoder/continuous_inputs_projection/kernel: spec path '/etc/' leaves the checkpoint folder"


def break_nul_in_spec_path(mt3_ckpt):
    import msgpack

    tree = msgpack.unpackb((mt3_ckpt / "checkpoint").read_bytes(), strict_map_key=False)
    tree["optimizer"]["target"]["encoder"]["continuous_inputs_projection"]["kernel"]["kvstore"]["path"] = "target.a\0b/"
    (mt3_ckpt / "checkpoint").write_bytes(msgpack.packb(tree))
    return "encoder/continuous_inputs_projection/kernel: malformed tensorstore spec"


def break_escapes_in_a_key(mt3_ckpt):
    """A newline and a terminal escape in a parameter name: shown escaped, the error on one line."""
    import msgpack

    tree = msgpack.unpackb((mt3_ckpt / "checkpoint").read_bytes(), strict_map_key=False)
    decoder = tree["optimizer"]["target"]["decoder"]
    decoder["decoder_norm\n\x1b[31m"] = decoder.pop("decoder_norm")
    (mt3_ckpt / "checkpoint").write_bytes(msgpack.packb(tree))
    return "decoder/decoder_norm\\n\\x1b[31m/scale"


def break_missing_norm(mt3_ckpt):
    import msgpack

    tree = msgpack.unpackb((mt3_ckpt / "checkpoint").read_bytes(), strict_map_key=False)
    del tree["optimizer"]["target"]["decoder"]["layers_1"]["pre_cross_attention_layer_norm"]
    (mt3_ckpt / "checkpoint").write_bytes(msgpack.packb(tree))
    return "decoder.layers.1.pre_cross_attention_layer_norm.weight"


def break_dtype(mt3_ckpt):
    meta_file = mt3_ckpt / "target.decoder.token_embedder.embedding" / ".zarray"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "dtype": "|u1"}))
    return "unsupported dtype '|u1'"


def break_compressor(mt3_ckpt):
    meta_file = mt3_ckpt / "target.decoder.token_embedder.embedding" / ".zarray"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "compressor": {"id": "zstd", "level": 3}}))
    return "unsupported compressor"


def break_empty_dir(mt3_ckpt):
    shutil.rmtree(mt3_ckpt)
    mt3_ckpt.mkdir()
    return "checkpoint: missing"


def break_not_a_dir(mt3_ckpt):
    shutil.rmtree(mt3_ckpt)
    mt3_ckpt.write_text("not a folder")
    return "not a directory"


def break_chunks_larger_than_the_array(mt3_ckpt):
    meta_file = mt3_ckpt / "target.decoder.token_embedder.embedding" / ".zarray"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "chunks": [2 * meta["shape"][0], meta["shape"][1]]}))
    return "chunks no larger than the array"


def append_to_gin(mt3_ckpt, lines: str) -> None:
    with open(mt3_ckpt.parent / "config.gin", "a") as gin:
        gin.write(lines)


def break_binary_gin(mt3_ckpt):
    (mt3_ckpt.parent / "config.gin").write_bytes(b"\xff\xfe\x00binary")
    return "config.gin: not a gin file (not UTF-8 text)"


def break_gin_value_type(mt3_ckpt):
    append_to_gin(mt3_ckpt, "network.T5Config.num_heads = 2.0\n")
    return "config.gin: T5Config.num_heads = 2.0: expected an integer"


def break_gin_dropout(mt3_ckpt):
    append_to_gin(mt3_ckpt, "network.T5Config.dropout_rate = 5\n")
    return "config.gin: T5Config.dropout_rate = 5: expected a number from 0 to below 1"


def break_gin_negative_heads(mt3_ckpt):
    append_to_gin(mt3_ckpt, "network.T5Config.num_heads = -2\nnetwork.T5Config.head_dim = -8\n")
    return "config.gin: T5Config.num_heads = -2: expected an integer >= 1"


def break_gin_symlink(mt3_ckpt):
    gin = mt3_ckpt.parent / "config.gin"
    elsewhere = mt3_ckpt.parent.parent / "elsewhere.gin"
    gin.rename(elsewhere)
    gin.symlink_to(elsewhere)
    return "config.gin: is a symbolic link; expected T5X's config.gin as a regular file"


def break_gin_size(mt3_ckpt):
    with open(mt3_ckpt.parent / "config.gin", "a") as gin:
        gin.truncate(2 << 20)  # sparse: 2 MB of NUL, never read
    return f"config.gin: {2 << 20:,} bytes; expected a gin file of at most {1 << 20:,}"


def break_gin_velocity_bins(mt3_ckpt):
    append_to_gin(mt3_ckpt, "NUM_VELOCITY_BINS = 1000000000\n")
    return "config.gin: NUM_VELOCITY_BINS: num_velocity_bins 1000000000: expected an integer from 1 to 127"


def break_nan_scale(mt3_ckpt):
    arrays = tiny_arrays(**TINY)
    arrays["decoder/decoder_norm/scale"][3] = np.nan
    shutil.rmtree(mt3_ckpt)
    write_t5x_checkpoint(mt3_ckpt, arrays, gin=GIN)
    return "1 array(s) holding NaN or infinite values: decoder/decoder_norm/scale (1 of 32)"


def break_gin_use_ties(mt3_ckpt):
    append_to_gin(mt3_ckpt, "USE_TIES = 'no'\n")
    return "use_ties 'no': expected True or False"


def break_1d_kernel(mt3_ckpt):
    arrays = tiny_arrays(**TINY)
    key = "encoder/layers_0/mlp/wi_0/kernel"
    arrays[key] = arrays[key][:, 0].copy()
    shutil.rmtree(mt3_ckpt)
    write_t5x_checkpoint(mt3_ckpt, arrays, gin=GIN)
    return f"checkpoint array {key} has shape [{TINY['d_model']}]; expected 2 dimensions"


BREAKERS = [
    break_missing_folder, break_gzip, break_zarray_shape, break_truncated_msgpack, break_missing_msgpack,
    break_escaping_spec, break_missing_norm, break_dtype, break_compressor, break_empty_dir, break_not_a_dir,
    break_chunks_larger_than_the_array, break_binary_gin, break_gin_value_type, break_gin_use_ties, break_1d_kernel,
    break_gin_dropout, break_gin_negative_heads, break_gin_symlink, break_gin_size, break_gin_velocity_bins,
    break_nan_scale, break_nul_in_spec_path, break_escapes_in_a_key, break_zarray_axes,
]


@pytest.mark.parametrize("breaker", BREAKERS, ids=[b.__name__[6:] for b in BREAKERS])
def test_bad_checkpoint_is_refused_cleanly(breaker, mt3_ckpt, tmp_path, capsys):
    expected = breaker(mt3_ckpt)
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main([str(mt3_ckpt), str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if "reading arrays" not in line]  # the progress bar, if it started
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert expected in err[0], err[0]
    assert "Traceback" not in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no OUT_DIR, no staging folder


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def npz_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, array)
    return buffer.getvalue()


def test_bad_golden_folder_and_flags_are_named(mt3_ckpt, tmp_path, capsys):
    """Golden files of the wrong form, shape or range are named in one line (no traceback from deep in the model);
    a size flag below 1, a dropout rate of 1 or more or an infinite epsilon is refused by the argument parser,
    naming the flag."""
    case = tmp_path / "golden" / "case"
    case.mkdir(parents=True)
    d_model, vocab = TINY["d_model"], TINY["vocab"]
    good = {"frames.npy": np.zeros((2, 4, 512), np.float32), "encoder_out.npy": np.zeros((1, 4, d_model), np.float32),
            "logits.npy": np.zeros((1, 3, vocab), np.float32), "tokens.json": {"segments": [[5, 6], [7]]}}
    frames_shape = "expected (segments, frames, mel bins) of shape (N, N, 512)"
    for name, bad, message in [
        ("tokens.json", {}, 'expected {"segments": [[ids, ...], ...]}'),
        ("tokens.json", {"segments": [5, 6]}, 'expected {"segments": [[ids, ...], ...]}'),
        ("tokens.json", {"segments": [[99999], [5]]}, "expected ids from 0 to 1535; found 99999"),
        ("tokens.json", {"segments": [[5], [-5]]}, "found -5"),
        ("tokens.json", {"segments": [["a"], [5]]}, "found 'a'"),
        ("tokens.json", {"segments": [[5]]}, "expected ids for at least the 2 segments of frames.npy; found 1 rows"),
        ("frames.npy", np.zeros(4, np.float32), f"{frames_shape}; found float32 [4]"),
        ("frames.npy", np.zeros((2, 4, 7), np.float32), f"{frames_shape}; found float32 [2, 4, 7]"),
        ("encoder_out.npy", np.zeros((1, 5, d_model), np.float32), f"of shape (1, 4, {d_model}); found float32 [1, 5"),
        ("encoder_out.npy", np.zeros((3, 4, d_model), np.float32), "<= those of frames.npy"),
        ("encoder_out.npy", np.zeros((0, 4, d_model), np.float32), "found float32 [0, 4"),
        ("logits.npy", np.zeros(vocab, np.float32), f"(segments, positions, vocabulary) of shape (1, N, {vocab})"),
        ("logits.npy", np.zeros((1, 3, 7), np.float32), "found float32 [1, 3, 7]"),
        ("logits.npy", np.zeros((1, 3, vocab), bool), "found bool"),
        ("frames.npy", np.zeros((2, 4, 512), np.complex64), f"{frames_shape}; found complex64"),
        ("frames.npy", np.zeros((2, 2049, 512), np.float32), "expected at most 2048 frames a segment"),
        ("frames.npy", npz_bytes(good["frames.npy"]), "expected one .npy array; found an .npz archive"),
        ("logits.npy", npy_bytes(good["logits.npy"]).replace(b"}", b" ", 1), "unreadable golden file"),
        ("tokens.json", b"[" * 100_000, "unreadable golden file (maximum recursion depth"),
    ]:
        for file, value in {**good, name: bad}.items():
            if isinstance(value, bytes):
                (case / file).write_bytes(value)
            elif file.endswith(".json"):
                (case / file).write_text(json.dumps(value))
            else:
                np.save(case / file, value)
        assert main([str(mt3_ckpt), str(tmp_path / "out"), "--quiet", "--golden", str(tmp_path / "golden")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {case / name}: ") and message in err[0], (name, err)
        assert not (tmp_path / "out").exists()
    # Well-formed golden files that the model does not reproduce (zeros): refused, nothing written.
    for file, value in good.items():
        (case / file).write_text(json.dumps(value)) if file.endswith(".json") else np.save(case / file, value)
    assert main([str(mt3_ckpt), str(tmp_path / "out"), "--quiet", "--golden", str(tmp_path / "golden")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --golden {tmp_path / 'golden'}: the model misses the "
                                               "original's outputs (encoder max abs error "), err
    assert " > 1e-04; logits max abs error " in err[0] and err[0].endswith("); nothing written"), err
    assert not (tmp_path / "out").exists()
    for flag, value, message in [("--num-heads", "-2", "expected an integer >= 1, found '-2'"),
                                 ("--max-position-embeddings", "x", "expected an integer from 1 to 65536, found 'x'"),
                                 ("--max-position-embeddings", "1000000000",
                                  "expected an integer from 1 to 65536, found '1000000000'"),
                                 ("--dropout-rate", "2", "expected a number from 0 to below 1, found '2'"),
                                 ("--layer-norm-epsilon", "inf", "expected a finite number > 0, found 'inf'")]:
        with pytest.raises(SystemExit) as exit_:
            main([str(mt3_ckpt), str(tmp_path / "out"), flag, value])
        err = capsys.readouterr().err.splitlines()
        assert exit_.value.code == 2 and err == [f"error: argument {flag}: {message} (see python -m convert_mt3 --help)"]


def test_parity_failures():
    """--golden's verdict: the parity tests' tolerances, and every greedy segment identical."""
    from convert_mt3.parity import parity_failures

    held = {"encoder_max_abs_error": 1e-4, "logits_max_abs_error": 2.5e-4, "greedy_segments_identical": 6,
            "greedy_segments": 6}
    assert parity_failures(held) == []
    assert parity_failures({**held, "encoder_max_abs_error": 1.5e-4}) == ["encoder max abs error 1.50e-04 > 1e-04"]
    assert parity_failures({**held, "logits_max_abs_error": 3e-4}) == ["logits max abs error 3.00e-04 > 2.5e-04"]
    assert parity_failures({**held, "logits_max_abs_error": float("nan")}) == ["logits max abs error nan > 2.5e-04"]
    assert parity_failures({**held, "greedy_segments_identical": 5}) == [
        "greedy tokens identical in 5 of 6 segments, expected all"]


def test_unwritable_out_dir(mt3_ckpt, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main([str(mt3_ckpt), str(blocker / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "cannot be written" in err and len(err.splitlines()) == 1


def test_subprocess_error_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "convert_mt3", str(tmp_path / "nope"), str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {tmp_path / 'nope'}: no such checkpoint directory"


def read_checkpoint_independently(folder: Path) -> dict[str, np.ndarray]:
    """The checkpoint's parameters read without convert_mt3's reader: msgpack with flax's ndarray extension (code 1:
    msgpack of (shape, dtype name, bytes)) for the inline arrays, zarr for the tensorstore specs' folders."""
    import msgpack
    import zarr

    def ext_hook(code: int, data: bytes):
        if code != 1:
            return msgpack.ExtType(code, data)
        shape, dtype, buffer = msgpack.unpackb(data)
        return np.frombuffer(buffer, dtype=dtype).reshape(shape)

    tree = msgpack.unpackb((folder / "checkpoint").read_bytes(), ext_hook=ext_hook)["optimizer"]["target"]
    arrays = {}

    def walk(node: dict, path: tuple[str, ...]) -> None:
        for key, value in node.items():
            if isinstance(value, np.ndarray):
                arrays["/".join(path + (key,))] = value
            elif "kvstore" in value:  # a tensorstore spec
                arrays["/".join(path + (key,))] = zarr.open_array(str(folder / value["kvstore"]["path"]), mode="r")[...]
            else:
                walk(value, path + (key,))

    walk(tree, ())
    return arrays


def test_real_checkpoint_converts(shared, tmp_path):
    """The real MT3 checkpoint: 189/189 arrays bit-exact in the folder, against the arrays as msgpack and zarr
    read them (not convert_mt3's reader)."""
    start = time.perf_counter()
    out = tmp_path / "mt3"
    assert main([str(shared / "checkpoints" / "mt3"), str(out), "--quiet"]) == 0
    seconds = time.perf_counter() - start
    source = read_checkpoint_independently(shared / "checkpoints" / "mt3")
    assert sum(path.endswith("/scale") for path in source) == 42  # the inline RMS-norm scales
    weights = load_file(out / "model.safetensors")
    exact = 0
    for path, array in source.items():
        name = ".".join(p.replace("layers_", "layers.") for p in path.split("/")[:-1]) + ".weight"
        exact += np.array_equal(weights[name], torch_layout(path, array))
    n_params = sum(w.size for w in weights.values())
    print(f"real checkpoint: {exact}/{len(source)} arrays bit-exact, {n_params:,} parameters, converted in {seconds:.1f} s")
    assert exact == len(source) == len(weights) == 189
    assert n_params == 45_896_704
