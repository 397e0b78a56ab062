"""Fast tests of the PyTorch MT3 model on a tiny random config (no checkpoint needed)."""

import numpy as np
import pytest
import torch
from transformers.modeling_outputs import Seq2SeqLMOutput

from convert_mt3.mt3.configuration_mt3 import MT3Config
from convert_mt3.mt3.modeling_mt3 import MT3ForConditionalGeneration, mt3_sinusoid_table

FRAMES = 16

# Model outputs name the KV cache `cache` in newer transformers 5.x and `past_key_values` before (the model builds
# them positionally, so it works with both).
CACHE_FIELD = "cache" if "cache" in Seq2SeqLMOutput.__dataclass_fields__ else "past_key_values"


def tiny_config(**overrides) -> MT3Config:
    values = dict(
        vocab_size=128,
        d_model=64,
        d_kv=16,
        num_heads=4,
        d_ff=128,
        num_layers=2,
        input_depth=32,
        max_position_embeddings=256,
        max_target_length=24,
    )
    values.update(overrides)
    return MT3Config(**values)


def tiny_model(seed: int = 0, **overrides) -> MT3ForConditionalGeneration:
    torch.manual_seed(seed)
    return MT3ForConditionalGeneration(tiny_config(**overrides)).eval()


def frames(batch: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, FRAMES, 32, generator=generator)  # (batch, frames, input_depth)


def reference_sinusoid(max_len: int, features: int) -> np.ndarray:
    """MT3 `layers.sinusoidal` written out element by element in float64."""
    half = features // 2
    table = np.zeros((max_len, features))
    for pos in range(max_len):
        for i in range(half):
            freq = np.exp(-np.log(10000.0) * i / (half - 1))
            table[pos, i] = np.sin(pos * freq)
            table[pos, half + i] = np.cos(pos * freq)
    return table.astype(np.float32)


def expected_keys(num_layers: int, num_decoder_layers: int) -> set[str]:
    keys = {"encoder.continuous_inputs_projection.weight", "encoder.encoder_norm.weight"}
    for i in range(num_layers):
        p = f"encoder.layers.{i}."
        keys |= {p + "pre_attention_layer_norm.weight", p + "pre_mlp_layer_norm.weight"}
        keys |= {p + f"attention.{n}.weight" for n in ("query", "key", "value", "out")}
        keys |= {p + f"mlp.{n}.weight" for n in ("wi_0", "wi_1", "wo")}
    keys |= {"decoder.token_embedder.weight", "decoder.decoder_norm.weight", "decoder.logits_dense.weight"}
    for i in range(num_decoder_layers):
        p = f"decoder.layers.{i}."
        for norm in ("pre_self_attention_layer_norm", "pre_cross_attention_layer_norm", "pre_mlp_layer_norm"):
            keys.add(p + norm + ".weight")
        for attn in ("self_attention", "encoder_decoder_attention"):
            keys |= {p + f"{attn}.{n}.weight" for n in ("query", "key", "value", "out")}
        keys |= {p + f"mlp.{n}.weight" for n in ("wi_0", "wi_1", "wo")}
    return keys


def test_sinusoid_formula_matches_mt3():
    # MT3's published size, then a small one checked element by element.
    table = mt3_sinusoid_table(2048, 512).numpy()
    assert table.dtype == np.float32 and table.shape == (2048, 512)
    position = np.arange(2048)[:, None]
    div_term = np.exp(np.arange(256) * (-np.log(10000.0) / 255))
    np.testing.assert_array_equal(table[:, :256], np.sin(position * div_term).astype(np.float32))
    np.testing.assert_array_equal(table[:, 256:], np.cos(position * div_term).astype(np.float32))
    np.testing.assert_allclose(mt3_sinusoid_table(40, 64).numpy(), reference_sinusoid(40, 64), atol=1e-6)


def test_state_dict_keys_and_shapes():
    config = tiny_config()
    model = MT3ForConditionalGeneration(config)
    state = model.state_dict()
    assert set(state) == expected_keys(2, 2)
    inner = config.num_heads * config.d_kv
    assert state["encoder.continuous_inputs_projection.weight"].shape == (64, 32)
    assert state["encoder.layers.0.attention.query.weight"].shape == (inner, 64)
    assert state["encoder.layers.0.attention.out.weight"].shape == (64, inner)
    assert state["decoder.layers.1.mlp.wi_0.weight"].shape == (128, 64)
    assert state["decoder.layers.1.mlp.wo.weight"].shape == (64, 128)
    assert state["decoder.token_embedder.weight"].shape == (128, 64)
    assert state["decoder.logits_dense.weight"].shape == (128, 64)
    assert state["decoder.logits_dense.weight"].data_ptr() != state["decoder.token_embedder.weight"].data_ptr()


def test_real_model_size():
    # 189 tensors / 45,896,704 parameters, as in the T5X checkpoint; built on the meta device (no memory).
    with torch.device("meta"):
        model = MT3ForConditionalGeneration(MT3Config())
    state = model.state_dict()
    assert len(state) == 189
    assert set(state) == expected_keys(8, 8)
    assert sum(p.numel() for p in model.parameters()) == 45_896_704


def test_sinusoid_buffer_values_and_not_saved(tmp_path):
    model = tiny_model()
    expected = torch.from_numpy(reference_sinusoid(256, 64))
    for stack in (model.encoder, model.decoder):
        torch.testing.assert_close(stack.position_embedding.table, expected, atol=1e-6, rtol=0)
    assert not any("position_embedding" in key for key in model.state_dict())

    model.save_pretrained(tmp_path)
    loaded = MT3ForConditionalGeneration.from_pretrained(tmp_path)
    for stack in (loaded.encoder, loaded.decoder):
        table = stack.position_embedding.table
        assert table.device.type == "cpu"
        torch.testing.assert_close(table, mt3_sinusoid_table(256, 64), atol=0, rtol=0)


def test_forward_shapes():
    model = tiny_model()
    x = frames(3)
    decoder_input_ids = torch.randint(0, 128, (3, 7))
    out = model(
        input_features=x, decoder_input_ids=decoder_input_ids, output_hidden_states=True, output_attentions=True
    )
    assert out.logits.shape == (3, 7, 128)
    assert out.encoder_last_hidden_state.shape == (3, FRAMES, 64)
    assert len(out.encoder_hidden_states) == 3 and len(out.decoder_hidden_states) == 3
    assert out.encoder_attentions[0].shape == (3, 4, FRAMES, FRAMES)
    assert out.decoder_attentions[0].shape == (3, 4, 7, 7)
    assert out.cross_attentions[0].shape == (3, 4, 7, FRAMES)
    # causal: no weight on later tokens
    assert torch.all(out.decoder_attentions[0].triu(1) == 0)
    # the frames are checked where they enter, in the same words as generate()'s
    ids = decoder_input_ids[:1]
    with pytest.raises(ValueError, match=r"input_features` of shape \(segments, frames, 32\), found \(1, 16, 31\)"):
        model(input_features=torch.zeros(1, FRAMES, 31), decoder_input_ids=ids)
    with pytest.raises(ValueError, match=r"segments of at least one frame; found input_features of shape \(1, 0, 32\)"):
        model(input_features=torch.zeros(1, 0, 32), decoder_input_ids=ids)  # (attention over no frame: NaN)
    with pytest.raises(ValueError, match=r"found a dict with keys \['input_features'\]: .* `model\(\*\*inputs\)`"):
        model({"input_features": x[:1]}, decoder_input_ids=ids)


def test_sdpa_matches_eager():
    model = tiny_model()
    x = frames(2)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        model.config._attn_implementation = "sdpa"
        sdpa = model(input_features=x, decoder_input_ids=ids).logits
        model.config._attn_implementation = "eager"
        eager = model(input_features=x, decoder_input_ids=ids).logits
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)


def test_one_encoder_output_for_many_decoder_rows():
    """The decoder broadcasts one encoder output over a batch of token rows in either attention, as SDPA does."""
    model = tiny_model()
    states = model.encoder(frames(1)).last_hidden_state  # (1, frames, d_model)
    ids = torch.randint(0, 128, (3, 5))
    with torch.no_grad():
        model.config._attn_implementation = "sdpa"
        sdpa = model.decoder(ids, states).last_hidden_state
        model.config._attn_implementation = "eager"
        eager = model.decoder(ids, states, output_attentions=True)
    torch.testing.assert_close(eager.last_hidden_state, sdpa, atol=1e-5, rtol=1e-5)
    assert eager.cross_attentions[0].shape == (3, model.config.num_heads, 5, states.shape[1])


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_all_ones_masks_change_nothing(implementation):
    model = tiny_model()
    model.config._attn_implementation = implementation
    x = frames(2)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        plain = model(input_features=x, decoder_input_ids=ids).logits
        masked = model(
            input_features=x,
            attention_mask=torch.ones(2, FRAMES, dtype=torch.long),
            decoder_input_ids=ids,
            decoder_attention_mask=torch.ones(2, 9, dtype=torch.long),
        ).logits
        # a padded decoder position changes later logits only where it is attended to
        pad = torch.ones(2, 9, dtype=torch.long)
        pad[1, 3] = 0
        padded = model(input_features=x, decoder_input_ids=ids, decoder_attention_mask=pad).logits
    torch.testing.assert_close(masked, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[0], plain[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[1, :3], plain[1, :3], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(padded[1, 4:], plain[1, 4:])


def test_incremental_forward_matches_full():
    model = tiny_model()
    x = frames(2)
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        full = model(input_features=x, decoder_input_ids=ids).logits
        encoder_outputs = model.get_encoder()(x)
        out = model(encoder_outputs=encoder_outputs, decoder_input_ids=ids[:, :2], use_cache=True)
        steps = [out.logits]
        cache = getattr(out, CACHE_FIELD)
        # two tokens at once on top of a cache (explicit causal mask), then single steps
        out = model(encoder_outputs=encoder_outputs, decoder_input_ids=ids[:, 2:4], cache=cache, use_cache=True)
        steps.append(out.logits)
        for t in range(4, 6):
            # `past_key_values` is accepted as an alias of `cache`
            step = ids[:, t : t + 1]
            out = model(encoder_outputs=encoder_outputs, decoder_input_ids=step, past_key_values=getattr(out, CACHE_FIELD))
            steps.append(out.logits)
    assert getattr(out, CACHE_FIELD).get_seq_length() == 6
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_generation_config_defaults(tmp_path):
    model = MT3ForConditionalGeneration(tiny_config(max_target_length=1024))
    gc = model.generation_config
    assert (gc.decoder_start_token_id, gc.eos_token_id, gc.pad_token_id) == (0, 1, 0)
    assert (gc.max_length, gc.max_new_tokens, gc.num_beams, gc.do_sample) == (1025, None, 1, False)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "generation_config.json").is_file()
    assert MT3ForConditionalGeneration.from_pretrained(tmp_path).generation_config.max_length == 1025


def pick_early_eos(model: MT3ForConditionalGeneration, x: torch.Tensor) -> int:
    """A token that some, but not all, rows produce early: as EOS it ends rows at different steps."""
    free = model.generate(input_features=x, eos_token_id=None)[:, 1:]  # (batch, max_new_tokens)
    for token in free[0, :6].tolist():
        rows_with_it = [token in row[:12].tolist() for row in free]
        if not all(rows_with_it):
            return token
    pytest.fail("the seeded random model produced no usable early token: choose another seed")  # deterministic


def test_cached_and_uncached_generation_agree():
    model = tiny_model()
    x = frames(4)
    eos = pick_early_eos(model, x)
    cached = model.generate(input_features=x, eos_token_id=eos, use_cache=True)
    uncached = model.generate(input_features=x, eos_token_id=eos, use_cache=False)
    assert cached.shape[0] == 4 and cached[:, 0].eq(0).all()
    torch.testing.assert_close(cached, uncached, atol=0, rtol=0)
    # and with the model's own EOS (1), up to max_new_tokens
    torch.testing.assert_close(model.generate(input_features=x), model.generate(input_features=x, use_cache=False))


def test_beam_search_and_static_cache():
    model = tiny_model()
    x = frames(2)
    beams = model.generate(input_features=x, num_beams=3, max_new_tokens=6)
    assert beams.shape == (2, 7) and beams[:, 0].eq(0).all()
    with pytest.raises(ValueError, match="DynamicCache"):
        model.generate(input_features=x, cache_implementation="static", max_new_tokens=3)


def test_batch_equals_one_by_one():
    model = tiny_model()
    x = frames(4)
    eos = pick_early_eos(model, x)
    batch = model.generate(input_features=x, eos_token_id=eos)
    lengths = set()
    for i in range(4):
        single = model.generate(input_features=x[i : i + 1], eos_token_id=eos)[0]
        lengths.add(single.shape[0])
        # the batch pads finished rows with pad (0) after EOS
        assert torch.equal(batch[i, : single.shape[0]], single)
        assert batch[i, single.shape[0] :].eq(0).all()
    assert len(lengths) > 1, "rows should end at different steps for this test to mean something"


def test_save_load_round_trip(tmp_path):
    model = tiny_model()
    x = frames(2)
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        before = model(input_features=x, decoder_input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = MT3ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.tie_word_embeddings is False
    with torch.no_grad():
        after = loaded(input_features=x, decoder_input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    torch.testing.assert_close(loaded.generate(input_features=x), model.generate(input_features=x))


def test_remote_code_round_trip(tmp_path):
    """The Hub files load through the Auto classes with trust_remote_code, as users will."""
    from transformers import AutoConfig, AutoModel

    model = tiny_model()
    model.config.register_for_auto_class()
    model.register_for_auto_class("AutoModel")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "modeling_mt3.py").is_file() and (tmp_path / "configuration_mt3.py").is_file()
    config = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(config).__name__ == "MT3Config"
    loaded = AutoModel.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(loaded).__name__ == "MT3ForConditionalGeneration"
    x = frames(2)
    torch.testing.assert_close(loaded.generate(input_features=x), model.generate(input_features=x))


def test_labels_loss_and_backward():
    model = tiny_model()
    model.train()
    labels = torch.randint(2, 128, (3, 8))
    labels[0, 5:] = -100
    out = model(input_features=frames(3), labels=labels)
    assert out.loss is not None and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # decoder inputs are the labels shifted right behind decoder_start_token_id (0), -100 -> pad (0)
    shifted = model._shift_right(labels)
    assert shifted[:, 0].eq(0).all() and torch.equal(shifted[1, 1:], labels[1, :-1])
    assert shifted[0, 6:].eq(0).all()


def test_encoder_ignores_nothing_by_default():
    # MT3 does not mask zero-padded frames: the padding changes the encoding of the real frames.
    model = tiny_model()
    x = frames(1)
    padded = x.clone()
    padded[:, 10:] = 0.0
    with torch.no_grad():
        a = model.get_encoder()(x).last_hidden_state
        b = model.get_encoder()(padded).last_hidden_state
    assert not torch.allclose(a[:, :10], b[:, :10])
