"""The variant (mt3 / ismir2021 layout) from the checkpoint: vocabulary size, config.gin, flags."""

import io
import json

import pytest

from convert_mt3.__main__ import main
from convert_mt3.variant import LAYOUTS, VariantError, derive_variant, vocab_size_of

from t5x_writer import tiny_arrays, write_t5x_checkpoint

TINY = dict(d_model=32, heads=2, d_kv=8, d_ff=48, layers=2, decoder_layers=2, input_depth=512)
HEADS_GIN = "network.T5Config.num_heads = 2\nnetwork.T5Config.head_dim = 8\n"
# what T5X writes into the model folder of an ismir2021 run (macros of gin/ismir2021.gin)
ISMIR2021_GIN = HEADS_GIN + (
    "TASK_FEATURE_LENGTHS = {'inputs': 512, 'targets': 1024}\nNUM_VELOCITY_BINS = 127\n"
    "PROGRAM_GRANULARITY = 'flat'  # piano only\nUSE_TIES = False\n"
)


def convert(tmp_path, vocab: int, gin: str | None, *flags: str, name: str = "out"):
    """Write a tiny checkpoint with `vocab` embedding rows (a config.gin above it when given) and convert it."""
    ckpt = write_t5x_checkpoint(tmp_path / "model" / "checkpoint_1000", tiny_arrays(vocab=vocab, **TINY), gin=gin)
    out = tmp_path / name
    return main([str(ckpt), str(out), "--quiet", "--num-heads", "2", "--d-kv", "8", *flags]), out


def layout_of(folder) -> dict:
    tokenizer = json.loads((folder / "tokenizer_config.json").read_text())
    extractor = json.loads((folder / "preprocessor_config.json").read_text())
    return {
        "frames_per_segment": extractor["frames_per_segment"],
        "num_velocity_bins": tokenizer["num_velocity_bins"],
        "use_ties": tokenizer["use_ties"],
        "program_granularity": tokenizer["program_granularity"],
    }


def test_known_vocabulary_sizes_are_computed():
    assert {name: vocab_size_of(layout["num_velocity_bins"]) for name, layout in LAYOUTS.items()} == {
        "mt3": 1536, "ismir2021": 1664}


@pytest.mark.parametrize("gin", [None, ISMIR2021_GIN], ids=["vocabulary-size", "config.gin"])
def test_ismir2021_checkpoint_converts_to_a_piano_folder(tmp_path, gin):
    status, out = convert(tmp_path, 1664, gin)
    assert status == 0
    assert layout_of(out) == LAYOUTS["ismir2021"] == {
        "frames_per_segment": 512, "num_velocity_bins": 127, "use_ties": False, "program_granularity": "flat"}
    card = (out / "README.md").read_text()
    assert "`ismir2021`" in card
    assert "# MT3 ismir2021: piano transcription" in card and "multi-instrument" not in card.split("\n## ")[0]
    # the variant's own facts: 512 frames of 128 samples at 16 kHz, velocities, no programs or ties, piano data
    assert "reads 4.096 s segments" in card and "2.048" not in card.split("### Speed")[0]
    assert "(time shifts, velocities, pitches, note on/off)" in card and "tie events, a note held" in card
    assert "solo piano recordings (MAESTRO)" in card and "not this one's" in card

    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert processor.feature_extractor.frames_per_segment == 512
    inputs = processor(audio=[0.0] * (512 * 128 + 1), sampling_rate=16000)
    assert inputs["input_features"].shape == (2, 512, 512)  # 512-frame segments
    # hand-written tokens with velocities -> notes and MIDI with those velocities
    tokenizer = processor.tokenizer
    text = ("<velocity_80> <pitch_60> <velocity_33> <pitch_64> <shift_50> <velocity_0> <pitch_60> <shift_70> "
            "<pitch_64>")
    row = [0] + tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    result = processor.batch_decode([row], segment_start_times=[0.0], return_midi=True)
    assert [(n.pitch, n.velocity, n.start, n.end) for n in result["notes"]] == [(60, 80, 0.0, 0.5), (64, 33, 0.0, 0.7)]
    buffer = io.BytesIO()
    result["pretty_midi"].write(buffer)
    import pretty_midi

    reread = pretty_midi.PrettyMIDI(io.BytesIO(buffer.getvalue()))
    assert sorted((n.pitch, n.velocity) for i in reread.instruments for n in i.notes) == [(60, 80), (64, 33)]


def test_mt3_vocabulary_gives_the_mt3_layout(tmp_path):
    status, out = convert(tmp_path, 1536, HEADS_GIN)
    assert status == 0 and layout_of(out) == LAYOUTS["mt3"]
    assert "`mt3`" in (out / "README.md").read_text()


def test_unknown_vocabulary_is_refused_in_one_line(tmp_path, capsys):
    status, out = convert(tmp_path, 1600, HEADS_GIN)
    err = capsys.readouterr().err
    assert status == 1 and not out.exists()
    assert err.count("\n") == 1 and "1600" in err and "1536 (mt3), 1664 (ismir2021)" in err
    print(f"\n[unknown vocabulary] {err.strip()}")


def test_flags_and_gin_precedence(tmp_path):
    # flags win over the vocabulary size and gin; the vocabulary must still fit the velocity bins
    status, out = convert(tmp_path, 1664, None, "--num-velocity-bins", "100", "--use-ties", "--frames-per-segment", "128")
    assert status == 0
    assert layout_of(out) == {"frames_per_segment": 128, "num_velocity_bins": 100, "use_ties": True,
                              "program_granularity": "flat"}
    gin = tmp_path / "config.gin"
    gin.write_text("NUM_VELOCITY_BINS = 100\nPROGRAM_GRANULARITY = 'midi_class'\n")
    variant = derive_variant(1664, gin)
    assert (variant.name, variant.num_velocity_bins, variant.program_granularity, variant.frames_per_segment) == (
        "custom", 100, "midi_class", 512)
    assert derive_variant(1664, gin, {"num_velocity_bins": 127, "program_granularity": "flat"}).name == "ismir2021"
    with pytest.raises(VariantError, match="1 velocity bins give a vocabulary of 1536"):
        derive_variant(1664, None, {"num_velocity_bins": 1})
    with pytest.raises(VariantError, match="^--program-granularity: program_granularity 'coarse': expected one of"):
        derive_variant(1536, None, {"program_granularity": "coarse"})
    # bounded before the codec is built (it holds one entry per bin): a billion bins would take minutes and GBs
    for bins in (0, 128, 10**9):
        with pytest.raises(VariantError, match=f"^--num-velocity-bins: num_velocity_bins {bins}: expected an integer "
                                               "from 1 to 127$"):
            derive_variant(1664, None, {"num_velocity_bins": bins})
    gin.write_text("NUM_VELOCITY_BINS = 1000000000\n")
    with pytest.raises(VariantError, match=f"^{gin}: NUM_VELOCITY_BINS: num_velocity_bins 1000000000: expected"):
        derive_variant(1664, gin)
    with pytest.raises(VariantError, match="^--frames-per-segment: frames_per_segment 2049: expected an integer from "
                                           "1 to 2048 \\(the encoder's positions\\)$"):
        derive_variant(1536, None, {"frames_per_segment": 2049}, max_frames=2048)
    assert derive_variant(1536, None, {"frames_per_segment": 2048}, max_frames=2048).frames_per_segment == 2048
    gin.write_text("TASK_FEATURE_LENGTHS = 512\n")
    with pytest.raises(VariantError, match="TASK_FEATURE_LENGTHS"):
        derive_variant(1536, gin)
