"""The greedy fast path of `MT3ForConditionalGeneration.generate` (`MT3GreedyPool`) on a tiny random model.

Reference: `GenerationMixin.generate`, transformers' own greedy search over the same model (the path `generate`
falls back to for everything else). Tokens must be identical, including the pad after EOS and the output width.
Golden tokens of the real model through the fast path are checked in tests/test_parity_model.py.
"""

import ast
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_modeling import frames, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    BatchFeature,
    GenerationConfig,
    GenerationMixin,
    LogitsProcessor,
    LogitsProcessorList,
    PrefixConstrainedLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
)
from transformers.cache_utils import Cache

from convert_mt3.mt3 import modeling_mt3
from convert_mt3.mt3.generation_mt3 import DRAFT_TOKENS, EOS_CHECK_INTERVAL, SEGMENT_BATCH_SIZE, MT3SlotCache
from convert_mt3.mt3.modeling_mt3 import MT3GreedyPool


def reference(model, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """HF greedy search, bypassing the fast path."""
    return GenerationMixin.generate(model, input_features=x, **kwargs)


# Half precision may flip a near-tie, and a flip changes the rest of its row, so half-precision ids are held to a share
# equal to the reference's: on these tiny models every id has agreed on CI's machine kind, and a decode that went wrong
# (cross-attention values zeroed, so the audio was ignored) agreed on 10-12%.
MIN_HALF_AGREEMENT = 0.75


def half_agreement(got: torch.Tensor, want: torch.Tensor, name: str) -> float:
    """Share of equal ids over the width both have (printed; run with -s), for half-precision runs."""
    assert got.dtype == torch.long and got.shape[0] == want.shape[0]
    width = min(got.shape[1], want.shape[1])
    share = (got[:, :width] == want[:, :width]).float().mean().item()
    print(f"\n{name}: {share:.1%} of ids equal (widths {got.shape[1]}, {want.shape[1]})")
    return share


def early_eos(model, x: torch.Tensor, past: int = 0) -> int:
    """A token that some rows produce early and others late or never (some row after `past` tokens): as EOS it ends
    rows at different steps."""
    free = reference(model, x, eos_token_id=None)[:, 1:]  # (batch, max_new_tokens)
    best, best_spread = None, 0
    for token in free[:, :8].unique().tolist():
        ends = [row.tolist().index(token) if token in row.tolist() else free.shape[1] for row in free]
        spread = len(set(ends))
        if spread > best_spread and min(ends) < free.shape[1] // 2 and max(ends) > past:
            best, best_spread = token, spread
    if best is None or best_spread < 3:
        message = "the seeded random model produced no usable early token"
        if free.device.type != "cpu":  # another device's arithmetic may give other ids: no fault of the code tested
            pytest.skip(f"{message} on {free.device.type}")
        pytest.fail(f"{message}: choose another seed")  # deterministic on CPU: a skip would hide the tests
    return best


@pytest.fixture(scope="module")
def model():
    return tiny_model(max_target_length=40)


@pytest.fixture
def count_fast(monkeypatch):
    """Counts calls of the fast path."""
    calls = []
    original = MT3GreedyPool.generate

    def counting(self, *args, **kwargs):
        calls.append(self.pool_size)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MT3GreedyPool, "generate", counting)
    return calls


@pytest.mark.parametrize("pool", [1, 3, 16])
def test_matches_hf_greedy_with_refill(model, count_fast, pool):
    x = frames(7, seed=3)  # 7 segments: pools 1 and 3 refill, 16 holds them all
    eos = early_eos(model, x)
    want = reference(model, x, eos_token_id=eos)
    got = model.generate(input_features=x, eos_token_id=eos, segment_batch_size=pool)
    assert count_fast == [pool]
    lengths = {int((row == eos).nonzero()[0]) if (row == eos).any() else row.shape[0] for row in want}
    assert len(lengths) >= 3, "rows should finish at different steps"
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    # default EOS (1): every row runs to max_new_tokens
    torch.testing.assert_close(model.generate(input_features=x, segment_batch_size=pool), reference(model, x))


@pytest.mark.parametrize("pool", [1, 3, 16])
@pytest.mark.parametrize("interval", [2, 5])
def test_eos_checked_every_k_steps_matches_hf_greedy(model, count_fast, pool, interval):
    """`eos_check_interval=k`: the host collects finished rows every k steps only; a row that ended stops and
    waits with its tokens and position unchanged, so the ids are still greedy search's, length limits included."""
    x = frames(7, seed=3)
    eos = early_eos(model, x)
    want = reference(model, x, eos_token_id=eos)
    got = model.generate(input_features=x, eos_token_id=eos, segment_batch_size=pool, eos_check_interval=interval)
    assert count_fast == [pool]
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    for limit in (1, 7):  # rows end on the length limit inside a k-step block
        torch.testing.assert_close(
            model.generate(input_features=x, eos_token_id=eos, max_new_tokens=limit, segment_batch_size=pool,
                           eos_check_interval=interval),
            reference(model, x, eos_token_id=eos, max_new_tokens=limit), atol=0, rtol=0,
        )


@pytest.mark.parametrize("pool", [1, 3, 16])
@pytest.mark.parametrize("drafts", [1, 3, 6])
@pytest.mark.parametrize("shifts", [None, (3, 60)])
def test_drafts_give_greedy_ids(model, monkeypatch, pool, drafts, shifts):
    """`draft_tokens=k`: once at most `draft_rows` rows decode (here from the first step), each row also feeds k
    guessed ids and keeps those its own predictions confirm: greedy search's ids, EOS and length limits included,
    in fewer steps than ids where guesses hold; also with guessed time shifts (`draft_shift_ids`)."""
    x = frames(7, seed=3)
    eos = early_eos(model, x)
    aheads = []
    original = MT3GreedyPool._step

    def recording(self, cache, *args):
        aheads.append(cache.ahead)
        return original(self, cache, *args)

    monkeypatch.setattr(MT3GreedyPool, "_step", recording)
    config = model.generation_config
    for eos_ids, limit in (([eos], 40), ([eos], 7), ([eos], 1), ([], 40)):
        aheads.clear()
        got = MT3GreedyPool(model, pool, draft_tokens=drafts, draft_rows=16, draft_shift_ids=shifts).generate(
            x, limit, eos_ids, config.pad_token_id, config.decoder_start_token_id)
        want = reference(model, x, eos_token_id=eos_ids[0] if eos_ids else None, max_new_tokens=limit)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        assert drafts in aheads
    # without EOS every segment runs to the limit: 40 ids each, 7 segments through `pool` rows
    assert len(aheads) < 40 * -(-7 // pool), "no guess was ever confirmed"



@pytest.mark.parametrize("pool", [1, 2])
@pytest.mark.parametrize("drafts", [0, 4])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_segment_with_nan_features_leaves_the_next_in_its_row_alone(model, pool, drafts, bad):
    """A row's keys/values past its position are masked, but a masked value still gets weight 0, and 0 * NaN is
    NaN: the keys/values a NaN or inf segment left must not reach the segment that takes its row next."""
    x = frames(5, seed=3)
    x[0, 3, 5] = bad
    got = MT3GreedyPool(model, pool, draft_tokens=drafts, draft_rows=16).generate(
        x, 10, [], model.generation_config.pad_token_id, model.generation_config.decoder_start_token_id)
    want = reference(model, x[1:], eos_token_id=None, max_new_tokens=10)  # the clean segments decoded apart
    torch.testing.assert_close(got[1:], want, atol=0, rtol=0)


def test_draft_guesses_what_followed_the_last_ids():
    """`_draft` writes k guesses after each row's position: what followed the latest earlier occurrence of its last
    two ids (else of its last id), repeated with that period; from the row's start where neither occurred."""
    tokens = torch.tensor([
        [0, 5, 6, 7, 5, 6, 0, 0, 0, 0, 0, 0, 0],  # (5, 6) ended at 2: 7 5 6, then again
        [0, 3, 4, 9, 8, 4, 0, 0, 0, 0, 0, 0, 0],  # (8, 4) never before, 4 ended at 2: 9 8 4, then again
        [0, 1, 2, 3, 4, 5, 0, 0, 0, 0, 0, 0, 0],  # nothing repeats: the row from its start
        [0, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # (2, 2) ended at 2, one before the position: 2 2 2 2
        [0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # position 0
        [0, 5, 6, 1, 5, 6, 2, 5, 6, 0, 0, 0, 0],  # (5, 6) ended at 2 and at 5: the latest, 2 5 6, then again
    ])
    positions = torch.tensor([5, 5, 5, 3, 0, 8])
    before = tokens.clone()
    MT3GreedyPool._draft(tokens, positions, 4)
    assert tokens[:, 6:10].tolist()[:3] == [[7, 5, 6, 7], [9, 8, 4, 9], [0, 1, 2, 3]]
    assert tokens[3, 4:8].tolist() == [2, 2, 2, 2] and tokens[4, 1:5].tolist() == [0, 0, 0, 0]
    assert tokens[5, 9:13].tolist() == [2, 5, 6, 2]
    for row, position in enumerate(positions.tolist()):  # a row's ids up to its position stay as they were
        assert torch.equal(tokens[row, : position + 1], before[row, : position + 1])


def test_draft_moves_copied_time_shifts_on():
    """With `shift_ids` (here 10..20: time 0 to 10), a time shift is matched and copied as the time it advances:
    a loop through the same events at a steady pace is guessed at the times ahead, up to the last shift id. Ids
    after a row's position (19 here: junk of earlier steps) play no part."""
    tokens = torch.tensor([
        [0, 11, 5, 6, 13, 5, 6, 19, 0, 0, 0, 0, 0, 0, 0],  # (5, 6) ended at 3, then +2, 5, 6: at time 3, 15 and 17
        [0, 12, 5, 15, 5, 18, 5, 19, 0, 0, 0, 0, 0, 0, 0],  # (+3, 5) ended at 4: +3, 5 twice from time 8: past 10, 20
        [0, 11, 5, 12, 5, 13, 6, 19, 0, 0, 0, 0, 0, 0, 0],  # (+1, 6), 6 never before: the row from its start, moved on
        [0, 11, 5, 6, 13, 5, 7, 5, 8, 15, 5, 19, 0, 0, 0],  # (+2, 5) ended at 5 (as shifts 13 5, not 15 5): 7 5 8 +2
    ])
    positions = torch.tensor([6, 6, 6, 10])
    plain = tokens.clone()
    MT3GreedyPool._draft(plain, positions, 4)
    assert plain[0, 7:11].tolist() == [13, 5, 6, 13]  # without: the shift copied as it was
    before = tokens.clone()
    MT3GreedyPool._draft(tokens, positions, 4, (10, 20))
    assert tokens[:3, 7:11].tolist() == [[15, 5, 6, 17], [20, 5, 20, 5], [0, 14, 5, 15]]
    assert tokens[3, 11:15].tolist() == [7, 5, 8, 17]
    for row, position in enumerate(positions.tolist()):
        assert torch.equal(tokens[row, : position + 1], before[row, : position + 1])


def test_generate_passes_draft_shift_ids(model, monkeypatch, tmp_path):
    """`draft_shift_ids` reaches the pool from generation_config.json or generate(); absent (a model not made by
    the converter): None, plain guesses; ids outside the vocabulary: a ValueError naming the setting."""
    seen = []
    original = MT3GreedyPool._decode

    def recording(self, *args):
        seen.append(self.draft_shift_ids)
        return original(self, *args)

    monkeypatch.setattr(MT3GreedyPool, "_decode", recording)
    x = frames(2, seed=4)
    model.generate(input_features=x, max_new_tokens=4)
    model.generate(input_features=x, max_new_tokens=4, draft_shift_ids=[4, 50])
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps({**saved, "draft_shift_ids": [3, 60]}))
    loaded = type(model).from_pretrained(tmp_path).eval()
    loaded.generate(input_features=x, max_new_tokens=4)
    assert seen == [None, (4, 50), (3, 60)]
    with pytest.raises(ValueError, match=r"`draft_shift_ids` must be .* < 128 \(the vocabulary\); found \[3, 500\]"):
        model.generate(input_features=x, max_new_tokens=4, draft_shift_ids=[3, 500])


def test_draft_step_keeps_confirmed_guesses_up_to_eos_and_the_limit():
    """`_draft_step` with fixed predictions (a stub decoder; guesses written beforehand): a row keeps its leading
    confirmed guesses and the prediction after them, stops at an EOS among them even when later guesses were
    confirmed too, and at the length limit; a stopped row keeps its ids and position."""
    limit, ahead = 10, 2
    tokens = torch.zeros(5, limit + 2 + ahead, dtype=torch.long)
    positions = torch.tensor([3, 2, 8, 5, 0])
    guesses = [[1, 5], [4, 6], [3, 3], [8, 8], [2, 2]]  # what `_draft` would have written after each position
    predicted = torch.tensor([
        [1, 5, 7],  # EOS (1) predicted first, both guesses confirmed: keeps the EOS only
        [4, 1, 9],  # one guess confirmed, then EOS predicted: keeps 4, EOS
        [3, 3, 3],  # both confirmed, but 2 ids reach the limit: keeps 3, 3
        [8, 8, 8],  # stopped row: nothing
        [5, 2, 2],  # nothing confirmed: keeps the prediction 5
    ])
    for row, (position, guess) in enumerate(zip(positions.tolist(), guesses)):
        tokens[row, position + 1 : position + 1 + ahead] = torch.tensor(guess)
    class Decoder:  # hidden states: the fed ids; logits: one-hot `predicted`
        def __call__(self, ids, states, cache):
            return SimpleNamespace(last_hidden_state=ids[..., None].float())

        def logits(self, hidden):
            return torch.nn.functional.one_hot(predicted, 16).float()

    pool = MT3GreedyPool.__new__(MT3GreedyPool)  # only `model.decoder` and `_draft` are used
    pool.model = SimpleNamespace(decoder=Decoder())
    pool._draft, pool.draft_shift_ids = lambda *args: None, None  # the guesses above stay
    cache = SimpleNamespace(ahead=ahead, positions=positions.clone(), offsets=torch.arange(1 + ahead))
    active = torch.tensor([True, True, True, False, True])
    done = torch.zeros(5, dtype=torch.bool)
    pool._draft_step(cache, tokens, active, done, torch.tensor([1]), limit)
    assert cache.positions.tolist() == [4, 4, 10, 5, 1]
    assert done.tolist() == [True, True, True, False, False] and active.tolist() == [False, False, False, False, True]
    kept = [tokens[row, position + 1 : end + 1].tolist()
            for row, (position, end) in enumerate(zip(positions.tolist(), cache.positions.tolist()))]
    assert kept == [[1], [4, 1], [3, 3], [], [5]]


def test_eos_check_interval_at_the_last_position():
    """max_new_tokens = max_position_embeddings: a row that ends on the limit sits at a position the table lacks, so
    it may not wait for the host (checked every step then); the ids are greedy search's."""
    small = tiny_model(max_position_embeddings=16)
    x = frames(2)
    want = reference(small, x, max_new_tokens=16, eos_token_id=None)
    got = small.generate(input_features=x, max_new_tokens=16, eos_token_id=None, eos_check_interval=5)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize(("name", "defaults", "argument", "invalid"), [
    ("eos_check_interval", {"cpu": 1, "cuda": 8}, -2, 0),
    ("draft_tokens", {"cpu": 4, "cuda": 0, "mps": 0, "xpu": 0}, -1, -1),
])
def test_pool_setting_per_device(model, count_fast, monkeypatch, tmp_path, name, defaults, argument, invalid):
    """`eos_check_interval` and `draft_tokens` come from generation_config.json (per device type, saved there) or
    generate(); with logits processors, 1 and 0 (processors need each row's position and one id a step)."""
    seen = []
    original = MT3GreedyPool._decode

    def recording(self, *args):
        seen.append(args[argument])
        return original(self, *args)

    monkeypatch.setattr(MT3GreedyPool, "_decode", recording)
    x = frames(3, seed=9)
    default = getattr(model.generation_config, name)
    assert default == defaults == {"eos_check_interval": EOS_CHECK_INTERVAL, "draft_tokens": DRAFT_TOKENS}[name]
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())[name] == defaults
    model.generate(input_features=x, max_new_tokens=3)
    try:
        for setting in (4, {"cpu": 5, "cuda": 8}, None):  # None (a folder saved before the setting): the defaults
            setattr(model.generation_config, name, setting)
            model.generate(input_features=x, max_new_tokens=3)
        model.generate(input_features=x, max_new_tokens=3, **{name: 2})
        model.generate(input_features=x, max_new_tokens=3, logits_processor=[BanPrevious()])
    finally:
        setattr(model.generation_config, name, default)
    cpu = defaults["cpu"]
    assert seen == [cpu, 4, 5, cpu, 2, 1 if name == "eos_check_interval" else 0] and len(count_fast) == 6
    for wrong in (invalid, True):  # True is an int to isinstance
        with pytest.raises(ValueError, match=name):
            model.generate(input_features=x, max_new_tokens=3, **{name: wrong})


@pytest.mark.parametrize("use_onednn", [False, True])
@pytest.mark.parametrize("matmul_attention", [False, True])
def test_all_backends_match(model, use_onednn, matmul_attention):
    """nn.Linear's GEMM (bit-identical layers) or oneDNN's packed weights (last-bit rounding), with SDPA or
    matmul attention, give the same ids."""
    x = frames(5, seed=4)
    eos = early_eos(model, x)
    want = reference(model, x, eos_token_id=eos)
    pool = MT3GreedyPool(model, 2, use_onednn=use_onednn, matmul_attention=matmul_attention)
    torch.testing.assert_close(pool.generate(x, 40, [eos], 0, 0), want, atol=0, rtol=0)


@pytest.mark.parametrize(
    "limits", [dict(max_new_tokens=5), dict(max_new_tokens=1), dict(max_new_tokens=None, max_length=9)]
)
def test_length_limits(model, count_fast, limits):
    x = frames(5, seed=5)
    eos = early_eos(model, x)
    want = reference(model, x, eos_token_id=eos, **limits)
    got = model.generate(input_features=x, eos_token_id=eos, segment_batch_size=2, **limits)
    assert count_fast
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_special_tokens_and_output_format(model):
    x = frames(6, seed=6)
    eos = early_eos(model, x)
    kwargs = dict(eos_token_id=[eos, 1], pad_token_id=7, decoder_start_token_id=3)
    want = reference(model, x, **kwargs)
    got = model.generate(input_features=x, segment_batch_size=4, **kwargs)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert got[:, 0].eq(3).all()
    for row in got.tolist():
        if eos in row[1:]:
            end = row.index(eos, 1)
            assert all(token == 7 for token in row[end + 1 :])


def test_unusual_but_valid_calls_match_hf_greedy(model, count_fast):
    """A start id per segment goes to GenerationMixin (the pool has one); a limit that means "until EOS" does not
    size the pool's buffers (2**40 tried to allocate 61 TB); features given positionally next to
    `input_features=None` are used; segments of no frames are refused in words."""
    x = frames(7, seed=3)
    starts = [3, 4, 3, 4, 3, 4, 3]
    got = model.generate(input_features=x, decoder_start_token_id=starts, max_new_tokens=5)
    assert count_fast == [] and got[:, 0].tolist() == starts
    torch.testing.assert_close(got, reference(model, x, decoder_start_token_id=starts, max_new_tokens=5), atol=0, rtol=0)
    eos = sorted(set(reference(model, x, eos_token_id=None)[:, 4].tolist()))  # every row ends by its 4th token
    want = reference(model, x, eos_token_id=eos)  # (the model's default limit: 40)
    got = model.generate(input_features=x, eos_token_id=eos, max_new_tokens=2**40)
    assert len(count_fast) == 1 and got.shape[1] <= 5
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(model.generate(x, input_features=None, max_new_tokens=4),
                               model.generate(input_features=x, max_new_tokens=4), atol=0, rtol=0)
    # a float limit: GenerationMixin takes 5.0 as 5 (the pool's buffers need an int)
    torch.testing.assert_close(model.generate(input_features=x, max_new_tokens=5.0),
                               reference(model, x, max_new_tokens=5), atol=0, rtol=0)
    depth = x.shape[-1]
    with pytest.raises(ValueError, match=rf"segments of at least one frame; found input_features of shape \(2, 0, {depth}\)"):
        model.generate(input_features=torch.zeros(2, 0, depth), max_new_tokens=3)
    with pytest.raises(ValueError, match=rf"of shape \(segments, frames, {depth}\), found \(2, 3, {depth + 1}\)"):
        model.generate(input_features=torch.zeros(2, 3, depth + 1), max_new_tokens=3)



def test_what_seq2seq_trainer_passes_keeps_the_fast_path(model, count_fast):
    """Seq2SeqTrainer's predict_with_generate calls generate(**batch, synced_gpus=...): labels, which greedy ids do
    not depend on, and synced_gpus=False take the fast path; synced_gpus=True (DeepSpeed ZeRO-3, FSDP), where every
    process steps with the others, goes to GenerationMixin."""
    x = frames(3, seed=9)
    labels = torch.randint(0, 100, (3, 7))
    want = reference(model, x, max_new_tokens=6)
    torch.testing.assert_close(model.generate(input_features=x, labels=labels, synced_gpus=False, max_new_tokens=6),
                               want, atol=0, rtol=0)
    assert len(count_fast) == 1
    assert model._fast_greedy_settings(None, None, {"input_features": x, "synced_gpus": True}) is None


def test_a_callers_length_replaces_the_folders(model, count_fast, monkeypatch):
    """The folder's limit is `max_length` (the start + MT3's targets): a call's `max_length` replaces it on both
    paths, and a call's `max_new_tokens` does too, without GenerationMixin's "both are set" warning."""
    from transformers.generation import utils as generation_utils

    warned = []
    monkeypatch.setattr(generation_utils.logger, "warning", warned.append)
    monkeypatch.setattr(modeling_mt3.logger, "warning_once", warned.append)
    x = frames(3, seed=9)
    assert (model.generation_config.max_length, model.generation_config.max_new_tokens) == (41, None)
    full = model.generate(input_features=x)
    assert full.shape[1] == 41 and count_fast == [SEGMENT_BATCH_SIZE["cpu"]]  # no EOS from the random model
    torch.testing.assert_close(model.generate(input_features=x, max_length=6), full[:, :6], atol=0, rtol=0)
    assert model.generate(input_features=x, max_length=6, num_beams=2).shape[1] <= 6  # GenerationMixin
    torch.testing.assert_close(model.generate(input_features=x, max_new_tokens=3), full[:, :4], atol=0, rtol=0)
    assert model.generate(input_features=x, max_new_tokens=3, num_beams=2).shape[1] <= 4 and len(count_fast) == 3
    # in a GenerationConfig of the caller's too; max_length=None keeps the folder's
    torch.testing.assert_close(model.generate(input_features=x, generation_config=GenerationConfig(max_new_tokens=3)),
                               full[:, :4], atol=0, rtol=0)
    assert model.generate(input_features=x, generation_config=GenerationConfig(max_new_tokens=3), num_beams=2).shape[1] <= 4
    torch.testing.assert_close(model.generate(input_features=x, max_length=None), full, atol=0, rtol=0)
    assert model.generate(input_features=x, max_length=None, num_beams=2).shape[1] <= 41
    assert not [w for w in warned if "max_new_tokens" in w], warned


def test_seq2seq_trainer_predicts_with_the_folders_and_its_own_lengths(tmp_path):
    """Seq2SeqTrainer(predict_with_generate) decodes up to the folder's limit by default and to
    `generation_max_length` when set (its only length setting), and leaves the model's limit as it was (it writes
    the library's defaults, max_length 20 among them, into the model's generation config where they are unset)."""
    pytest.importorskip("accelerate")
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    model = tiny_model(max_target_length=40)
    x = frames(2, seed=5)
    data = [{"input_features": segment, "labels": torch.tensor([5, 6, 1])} for segment in x]
    args = Seq2SeqTrainingArguments(tmp_path, predict_with_generate=True, per_device_eval_batch_size=2, report_to=[],
                                    use_cpu=True)
    trainer = Seq2SeqTrainer(model=model, args=args,
                             data_collator=lambda rows: {key: torch.stack([row[key] for row in rows]) for key in rows[0]})
    want = reference(model, x)
    assert want.shape[1] == 41
    for _ in range(2):  # the second call sees the generation config as the first left it
        predictions = trainer.predict(data).predictions
        assert (predictions == want.numpy()).all()
    assert model.generation_config.max_length == 41
    trainer.args.generation_max_length = 6
    predictions = trainer.predict(data).predictions  # padded to the model's max_length by the trainer
    assert (predictions[:, :6] == want[:, :6].numpy()).all() and (predictions[:, 6:] == model.config.pad_token_id).all()


@pytest.mark.parametrize("layers", [(2, 3), (3, 1)])
def test_more_or_fewer_decoder_layers(layers):
    """GenerationMixin's cache has one layer per decoder layer (sized through `get_text_config(decoder=True)`):
    beam search and greedy search run with more decoder than encoder layers, greedy with the fast path's ids."""
    encoder_layers, decoder_layers = layers
    model = tiny_model(num_layers=encoder_layers, num_decoder_layers=decoder_layers, max_target_length=12)
    assert model.config.get_text_config(decoder=True).num_hidden_layers == decoder_layers
    assert model.config.num_hidden_layers == encoder_layers  # the config itself is unchanged
    x = frames(2, seed=4)
    torch.testing.assert_close(model.generate(input_features=x), reference(model, x), atol=0, rtol=0)
    assert model.generate(input_features=x, num_beams=2).shape[0] == 2  # (2, 3) ran out of cache layers


def test_generate_in_train_mode_warns(model, monkeypatch):
    warnings = []
    monkeypatch.setattr(modeling_mt3.logger, "warning_once", warnings.append)  # (once per process: not caplog)
    model.generate(input_features=frames(1), max_new_tokens=2)
    assert warnings == []
    model.train()
    try:
        model.generate(input_features=frames(1), max_new_tokens=2)
    finally:
        model.eval()
    assert len(warnings) == 1 and "train mode: dropout is active" in warnings[0]

class BanPrevious(LogitsProcessor):
    """Forbids repeating the previous token and, on even lengths, token 2: needs each row's own `input_ids`."""

    row_independent = True  # the fast path may run it

    def __init__(self):
        self.shapes = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.shapes.append(tuple(input_ids.shape))
        scores = scores.clone()
        scores.scatter_(1, input_ids[:, -1:], float("-inf"))
        if input_ids.shape[1] % 2 == 0:
            scores[:, 2] = float("-inf")
        return scores


@pytest.mark.parametrize("as_list", [False, True])
def test_logits_processor(model, count_fast, as_list):
    x = frames(7, seed=7)
    eos = early_eos(model, x)
    want = reference(model, x, eos_token_id=eos, logits_processor=LogitsProcessorList([BanPrevious()]))
    processor = BanPrevious()
    processors = [processor] if as_list else LogitsProcessorList([processor])
    got = model.generate(input_features=x, eos_token_id=eos, segment_batch_size=3, logits_processor=processors)
    assert count_fast
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    # rows admitted later are at other positions: processors get one rectangular group per length
    assert len({length for _, length in processor.shapes}) == max(length for _, length in processor.shapes)
    assert any(rows < 3 for rows, _ in processor.shapes)
    # an empty list changes nothing
    plain = model.generate(input_features=x, eos_token_id=eos, logits_processor=LogitsProcessorList())
    torch.testing.assert_close(plain, reference(model, x, eos_token_id=eos), atol=0, rtol=0)



class ToBfloat16(LogitsProcessor):
    """Returns the scores in bfloat16: GenerationMixin takes the argmax of whatever a processor returns."""

    row_independent = True

    def __call__(self, input_ids, scores):
        return scores.to(torch.bfloat16)


def test_logits_processor_may_change_the_dtype(model, count_fast):
    x = frames(7, seed=7)
    want = reference(model, x, logits_processor=LogitsProcessorList([ToBfloat16()]))
    got = model.generate(input_features=x, segment_batch_size=3, logits_processor=[ToBfloat16()])
    assert count_fast
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_processors_that_need_the_batch_go_to_hf(model, count_fast):
    """A processor that reads its batch index (each segment allowed one token of its own) or is not known to work row
    by row runs in GenerationMixin, where the batch is every segment in order; transformers' row-wise ones do not."""
    x = frames(4, seed=7)
    allowed = lambda batch_id, ids: [10 + batch_id]  # noqa: E731
    ban = BanPrevious()
    ban.row_independent = "yes"  # only True opts in
    for processor in (PrefixConstrainedLogitsProcessor(allowed, num_beams=1), ban):
        want = reference(model, x, max_new_tokens=5, logits_processor=LogitsProcessorList([processor]))
        got = model.generate(input_features=x, max_new_tokens=5, segment_batch_size=2, logits_processor=[processor])
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        if processor is not ban:
            assert got[:, 1:].tolist() == [[10 + segment] * 5 for segment in range(4)]
    assert not count_fast
    repeat = RepetitionPenaltyLogitsProcessor(1.5)
    got = model.generate(input_features=x, max_new_tokens=5, segment_batch_size=2, logits_processor=[repeat])
    want = reference(model, x, max_new_tokens=5, logits_processor=LogitsProcessorList([repeat]))
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert len(count_fast) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_beams=2, max_new_tokens=6),
        dict(do_sample=True, max_new_tokens=6),
        dict(return_dict_in_generate=True, output_scores=True, max_new_tokens=6),
        dict(use_cache=False, max_new_tokens=6),
        dict(repetition_penalty=1.5, max_new_tokens=6),
        dict(min_new_tokens=3, max_new_tokens=6),
        dict(attention_mask=torch.ones(2, 16, dtype=torch.long), max_new_tokens=6),
    ],
    ids=["beams", "sample", "dict", "no-cache", "repetition", "min-new", "frame-mask"],
)
def test_other_modes_fall_back_to_hf(model, monkeypatch, kwargs):
    def refuse(*args, **kwargs):
        raise AssertionError("fast path used")

    monkeypatch.setattr(MT3GreedyPool, "generate", refuse)
    x = frames(2, seed=8)
    if "min_new_tokens" in kwargs:  # as EOS, the id row 0 writes first: min_new_tokens must hold it back
        kwargs = {**kwargs, "eos_token_id": int(reference(model, x, eos_token_id=None, max_new_tokens=1)[0, 1])}
    torch.manual_seed(0)
    out = model.generate(input_features=x, **kwargs)
    torch.manual_seed(0)  # sampling: the same draws
    want = reference(model, x, **kwargs)
    if kwargs.get("return_dict_in_generate"):
        assert type(out) is type(want) and len(out.scores) == len(want.scores) == out.sequences.shape[1] - 1
        torch.testing.assert_close(out.scores, want.scores, atol=0, rtol=0)
        out, want = out.sequences, want.sequences
    torch.testing.assert_close(out, want, atol=0, rtol=0)  # every setting reached GenerationMixin
    assert out.shape[0] == 2 and out[:, 0].eq(0).all()
    if "min_new_tokens" in kwargs:
        assert out[0, 1] != kwargs["eos_token_id"]


def test_streamer_falls_back(model, monkeypatch):
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.values = []

        def put(self, value):
            self.values.append(value)

        def end(self):
            pass

    monkeypatch.setattr(MT3GreedyPool, "generate", None)
    streamer = Collect()
    model.generate(input_features=frames(1), max_new_tokens=4, streamer=streamer)
    assert len(streamer.values) == 5  # start token, then 4 steps


def test_pool_size_settings(model, count_fast, tmp_path):
    x = frames(3, seed=9)
    default = model.generation_config.segment_batch_size
    assert default == SEGMENT_BATCH_SIZE  # per device type; saved in generation_config.json
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["segment_batch_size"] == SEGMENT_BATCH_SIZE
    model.generate(input_features=x, max_new_tokens=3)
    assert count_fast[-1] == SEGMENT_BATCH_SIZE["cpu"]
    model.generation_config.segment_batch_size = 2
    try:
        model.generate(input_features=x, max_new_tokens=3)
        assert count_fast[-1] == 2
        model.generate(input_features=x, max_new_tokens=3, segment_batch_size=1)
        assert count_fast[-1] == 1
    finally:
        model.generation_config.segment_batch_size = default
    for wrong in (0, True):
        with pytest.raises(ValueError, match="segment_batch_size"):
            model.generate(input_features=x, max_new_tokens=3, segment_batch_size=wrong)
    # what a user edits in generation_config.json is what a loaded model uses, and saves again
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps({**saved, "segment_batch_size": {"cpu": 3}}))
    loaded = type(model).from_pretrained(tmp_path)
    assert loaded.generation_config.segment_batch_size == {"cpu": 3} and loaded.default_segment_batch_size == 3
    loaded.generate(input_features=frames(5, seed=9), max_new_tokens=3)
    assert count_fast[-1] == 3
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "generation_config.json").read_text())["segment_batch_size"] == {"cpu": 3}


def test_settings_outside_the_allow_list_fall_back(model, monkeypatch):
    """The fast path is entered by an allow-list: a setting it has never heard of (as a future transformers field
    would be) sends generate() to GenerationMixin, and the result is still greedy search's."""
    monkeypatch.setattr(MT3GreedyPool, "generate", None)  # calling it would raise TypeError
    x = frames(2, seed=12)
    model.generation_config.some_future_setting = True
    try:
        got = model.generate(input_features=x, max_new_tokens=5)
    finally:
        del model.generation_config.some_future_setting
    torch.testing.assert_close(got, reference(model, x, max_new_tokens=5), atol=0, rtol=0)


def test_position_limit_raises_like_the_model():
    model = tiny_model(max_position_embeddings=16)  # 16 frames fit, 20 decoder positions do not
    x = frames(2)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        reference(model, x, max_new_tokens=20, eos_token_id=None)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(input_features=x, max_new_tokens=20, eos_token_id=None)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(input_features=torch.zeros(1, 17, 32))


def test_bfloat16_runs(model):
    half = tiny_model(max_target_length=40).to(torch.bfloat16)
    x = frames(5, seed=10).to(torch.bfloat16)
    got = half.generate(input_features=x, segment_batch_size=2)
    want = reference(half, x)
    # the fast path keeps T5LayerNorm's half-precision order; GEMM rounding may differ, so a share, not all
    assert half_agreement(got, want, "bfloat16 fast vs HF") >= MIN_HALF_AGREEMENT


def test_steps_run_in_inference_mode_and_ids_stay_ordinary(model, monkeypatch):
    """Decode steps run in inference mode (cheaper dispatch), except under autocast (whose weight casts are cached
    outside it only), never with gradients; the ids returned are an ordinary tensor, which the caller may change in
    place. A caller's own inference mode around autocast stays."""
    seen = []
    step = MT3GreedyPool._step

    def recording(self, *args):
        seen.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return step(self, *args)

    monkeypatch.setattr(MT3GreedyPool, "_step", recording)
    x = frames(3, seed=12)
    got = model.generate(input_features=x, segment_batch_size=2)
    assert seen and set(seen) == {(True, False)}
    assert not got.is_inference()
    got[0, 0] = 7  # an inference tensor refuses this outside inference mode
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.generate(input_features=x, segment_batch_size=2, max_new_tokens=4)
    assert seen and set(seen) == {(False, False)}
    seen.clear()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.generate(input_features=x, segment_batch_size=2, max_new_tokens=4)
    assert seen and set(seen) == {(True, False)}


def test_cache_grows_past_first_capacity():
    """More than 64 steps: the self-attention cache doubles while rows are running."""
    model = tiny_model(max_target_length=150)
    x = frames(3, seed=11)
    torch.testing.assert_close(model.generate(input_features=x, segment_batch_size=2), reference(model, x))


def test_slot_cache_writes_at_each_steps_positions():
    """Keys/values go to every row's position at the start of each step, also when two steps run without `reserve`
    in between (a CUDA graph's capture runs the step once more after its warm-up run, and its replays compute the
    write positions again only if the capture did: `begin_step` forgets the last step's)."""
    cache = MT3SlotCache(1, 2, torch.device("cpu"), 64)
    cache.reserve([0, 5])
    cache.positions[1] = 5
    layer = cache.self_attention_cache.layers[0]
    for step in range(2):
        cache.begin_step()
        states = torch.full((2, 3, 1, 4), float(step + 1))  # (rows, heads, 1, d_kv)
        keys, values = layer.update(states, -states)
        cache.positions += 1
    for row, first in enumerate((0, 5)):
        assert keys[row, :, first : first + 2, 0].tolist() == [[1.0, 2.0]] * 3
        assert values[row, :, first : first + 2, 0].tolist() == [[-1.0, -2.0]] * 3
    assert int(keys.count_nonzero()) == 2 * 2 * 3 * 4  # nothing written anywhere else


HUB_CODE = sorted(path.name for path in Path(modeling_mt3.__file__).parent.glob("*.py"))


@pytest.mark.parametrize("module", HUB_CODE)
def test_hub_code_imports_only_torch_numpy_transformers(module):
    """Every import in the Hub code, at any depth (AST), is torch, numpy, transformers, the standard library or a
    sibling; the optional audio and MIDI packages only inside the functions that need them (an ImportError there
    names the package)."""
    tree = ast.parse((Path(modeling_mt3.__file__).parent / module).read_text())
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:  # (level > 0: a sibling)
            names = [node.module]
        else:
            continue
        allowed = {"numpy", "torch", "transformers"} | set(sys.stdlib_module_names)
        if id(node) not in top_level:
            allowed |= {"pretty_midi", "soundfile", "soxr"}
        for name in names:
            assert name.split(".")[0] in allowed, f"{module}:{node.lineno} imports {name}"


def test_generate_without_features_says_what_it_needs(model):
    with pytest.raises(ValueError, match="needs `input_features`"):
        model.generate()
    with pytest.raises(ValueError, match="needs `input_features`.*found `input_ids`"):
        model.generate(input_ids=torch.zeros(1, 1, dtype=torch.long))


def test_features_must_be_a_tensor(model):
    """The processor's default (numpy) output gives one clear error, not an AttributeError deep in the encoder."""
    with pytest.raises(ValueError, match='found ndarray: call the processor with return_tensors="pt"'):
        model.generate(input_features=frames(2).numpy())
    inputs = BatchFeature({"input_features": frames(2), "segment_start_times": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"found a BatchFeature with keys \['input_features', 'segment_start_times'\]: "
                                         r"pass its entries as keywords, `generate\(\*\*inputs\)`"):
        model.generate(inputs)  # positionally, as for a tensor
    assert torch.equal(model.generate(**inputs, max_new_tokens=2), model.generate(frames(2), max_new_tokens=2))


def test_no_segments_give_the_asked_output_type(model):
    """Audio of length 0: no row, in the type asked for, the start id first; settings are checked as usual."""
    empty = torch.zeros(0, *frames(1).shape[1:])
    ids = model.generate(input_features=empty, decoder_start_token_id=5)
    assert ids.shape == (0, 1) and ids.dtype == torch.long
    out = model.generate(input_features=empty, return_dict_in_generate=True)
    assert type(out).__name__ == "GenerateEncoderDecoderOutput" and out.sequences.shape == (0, 1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(input_features=empty, max_new_tokens=0)


def test_processor_output_goes_straight_in(model, count_fast):
    """`model.generate(**processor(audio=...))`: the segment start times it also holds (and, for a list of clips,
    the segments per clip) are accepted and unused."""
    x = frames(3, seed=5)
    inputs = {"input_features": x, "segment_start_times": torch.tensor([0.0, 2.048, 0.0])}
    torch.testing.assert_close(model.generate(**inputs), model.generate(input_features=x), atol=0, rtol=0)
    inputs["segments_per_clip"] = torch.tensor([2, 1])
    torch.testing.assert_close(model.generate(**inputs), model.generate(input_features=x), atol=0, rtol=0)
    assert len(count_fast) == 4


@pytest.fixture
def slot_caches(monkeypatch):
    """Records every `MT3SlotCache` made (`caches`) and, at each step's `reserve`, its rows in use and the rows of
    its storage (`steps`), and its self-attention row groups (`groups`)."""
    record = SimpleNamespace(caches=[], steps=[], groups=[])
    original_init, original_reserve = MT3SlotCache.__init__, MT3SlotCache.reserve

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        record.caches.append(self)

    def reserve(self, positions):
        original_reserve(self, positions)
        storage = [layer.storage[0].shape[0] for layer in self.slot_layers if layer.is_initialized]
        record.steps.append((self.rows, max(storage, default=0)))
        record.groups.append(self.groups)

    monkeypatch.setattr(MT3SlotCache, "__init__", init)
    monkeypatch.setattr(MT3SlotCache, "reserve", reserve)
    return record


def test_slot_cache_is_a_transformers_cache_bounded_by_the_pool(model, slot_caches):
    """The scheduler's cache is a transformers `Cache` whose rows never exceed the pool: memory does not grow
    with the number of segments; finished rows leave once nothing waits; the storage is freed at the end."""
    caches, steps = slot_caches.caches, slot_caches.steps
    x = frames(9, seed=16)
    eos = early_eos(model, x)
    got = model.generate(input_features=x, eos_token_id=eos, segment_batch_size=3)
    torch.testing.assert_close(got, reference(model, x, eos_token_id=eos), atol=0, rtol=0)
    (cache,) = caches
    assert isinstance(cache, Cache)
    assert max(stored for _, stored in steps) == 3
    assert [rows for rows, _ in steps][-1] < 3  # the last segments decode without idle rows
    assert all(layer.storage is None for layer in cache.slot_layers)
    assert cache.capacity <= 2 * max(MT3SlotCache.bucket, got.shape[1])


@pytest.mark.parametrize("group_rows", [1, 2, 4])
def test_self_attention_in_row_groups_matches_hf_greedy(slot_caches, monkeypatch, group_rows):
    """Rows refilled at different steps sit at different positions: self-attention in groups of rows, each over
    its own longest row (`MT3SlotCache.groups`, the CPU default), gives HF greedy's ids."""
    monkeypatch.setattr(MT3SlotCache, "group_merge", 0)  # a group wherever lengths differ
    long_model = tiny_model(max_target_length=150)  # positions past two buckets of 32
    x = frames(14, seed=16)
    eos = early_eos(long_model, x)
    got = MT3GreedyPool(long_model, 8, group_rows=group_rows).generate(x, 150, [eos], 0, 0)
    torch.testing.assert_close(got, reference(long_model, x, eos_token_id=eos), atol=0, rtol=0)
    grouped = [groups for groups in slot_caches.groups if groups is not None]
    assert grouped, "no step ran in groups"
    for groups in grouped:  # runs of whole rows, shorter than the longest where they can be
        assert groups[0][0] == 0 and all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
        assert len({length for _, _, length in groups}) > 1
    assert MT3GreedyPool(long_model, 8).group_rows == 4  # CPU default


def test_row_groups_merge_where_a_split_saves_little(monkeypatch):
    """Groups of `group_rows` rows, each over its longest row's keys (bucket multiples); neighbours merge where the
    merged group reads at most `group_merge` more row-positions, since every group costs its own ops."""
    cache = MT3SlotCache(1, 12, torch.device("cpu"), 1024, group_rows=4)
    positions = [0, 1, 2, 3, 40, 41, 42, 43, 500, 1, 2, 3]
    cache.reserve(positions)
    assert cache.length == 512
    assert cache.groups == [(0, 8, 64), (8, 12, 512)]  # 4 rows x 32 keys more: merged; 8 x 448 more: not
    monkeypatch.setattr(MT3SlotCache, "group_merge", 0)
    cache.reserve(positions)
    assert cache.groups == [(0, 4, 32), (4, 8, 64), (8, 12, 512)]
    cache.reserve([40] * 12)
    assert cache.groups is None  # one length: one group
    assert MT3SlotCache(1, 12, torch.device("cpu"), 1024).groups is None
    with pytest.raises(ValueError, match="1024 positions"):  # position 1024 is past the table
        cache.reserve([1024] + [0] * 11)


class FakeGraph:
    """Stands in for a CUDA graph on CPU: replays the step it was captured from, with the tensors of that moment
    (a real graph replays its recorded kernels on their recorded addresses and shapes), after checking that the
    cache still has the captured rows, key length and storage."""

    def __init__(self, step, cache: MT3SlotCache):
        self.step, self.cache = step, cache
        self.shape = self.current_shape()

    def current_shape(self):
        storage = [layer.storage[0].data_ptr() for layer in self.cache.slot_layers if layer.is_initialized]
        return self.cache.rows, self.cache.length, self.cache.positions.data_ptr(), storage

    def replay(self):
        assert self.current_shape() == self.shape, "replayed a graph of another shape or storage"
        self.step()


@pytest.mark.parametrize(("pool", "interval"), [(3, 1), (7, 1), (3, 4)])
def test_cuda_graph_schedule_matches_hf_greedy(model, monkeypatch, slot_caches, pool, interval):
    """The schedule used with CUDA graphs (idle rows kept until the busy ones fit in a power of two, each step
    replayed from a graph per shape, graphs dropped when the cache grows) gives HF greedy's ids. The graphs are
    faked on CPU (`FakeGraph`); real capture is only exercised on a GPU. Few rows read keys in multiples of 128
    (`MT3GreedyPool.key_bucket`), so fewer shapes are captured."""
    from convert_mt3.mt3.generation_mt3 import _StepGraphs

    captured, lengths = [], []

    def capture(self, step):  # runs the step once, as the real capture does before recording it
        step()
        cache = slot_caches.caches[-1]
        captured.append(FakeGraph(step, cache))
        lengths.append((cache.length, cache.capacity))
        return captured[-1]

    monkeypatch.setattr(_StepGraphs, "_capture", capture)
    # > 256 steps: the storage grows while graphs exist
    long_model = tiny_model(max_target_length=300, max_position_embeddings=512)
    for m, limit in ((model, 40), (long_model, 300)):
        x = frames(9, seed=16)
        eos = early_eos(m, x, past=256 if m is long_model else 0)
        want = reference(m, x, eos_token_id=eos)
        pool_ = MT3GreedyPool(m, pool, cuda_graphs=True, eos_check_interval=interval, draft_tokens=4, draft_rows=16)
        got = pool_.generate(x, limit, [eos], 0, 0)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    # drafts are off with graphs (a graph replays one number of inputs a row)
    assert {cache.ahead for cache in slot_caches.caches} == {0}
    rows_seen = [rows for rows, _ in slot_caches.steps]
    assert captured and len(captured) < len(rows_seen)  # most steps are replays
    assert set(rows_seen) <= {pool, 4, 2, 1}  # idle rows leave in powers of two
    assert {cache.bucket for cache in slot_caches.caches} == {128}
    assert all(length % 128 == 0 for length, _ in lengths) and max(capacity for _, capacity in lengths) > 256
    # on CPU, generate() ignores the setting, and it does not leave the fast path
    count = len(captured)
    x = frames(4, seed=2)
    torch.testing.assert_close(model.generate(input_features=x, cuda_graphs=True), reference(model, x))
    assert len(captured) == count


class RecordOps(TorchDispatchMode):
    """Records every ATen op dispatched, with whether an index op got a boolean mask (which needs a host sync)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        if name in ("aten.index", "aten.index_put", "aten.index_put_"):
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
                name += " (boolean mask)"
        if name == "aten._to_copy" and "device" in kwargs:
            name += " (to a device)"
        self.ops.append(name)
        return func(*args, **kwargs)


def test_decode_step_needs_no_host_sync(model, monkeypatch):
    """What a CUDA graph cannot capture, seen on CPU: the decode step dispatches no op that waits for the device
    (nonzero, item, boolean-mask indexing, copies between devices) and makes no tensor from Python data."""
    recorder = RecordOps()
    original = MT3GreedyPool._step

    def recorded(self, *args):
        with recorder:
            return original(self, *args)

    monkeypatch.setattr(MT3GreedyPool, "_step", recorded)
    x = frames(5, seed=7)
    MT3GreedyPool(model, 2).generate(x, 40, [early_eos(model, x)], 0, 0)  # rows refill, then leave
    syncing = {"aten.nonzero", "aten._local_scalar_dense", "aten.masked_select", "aten.lift_fresh", "aten.unique",
               "aten.is_nonzero", "aten.equal", "aten._unique2", "aten.repeat_interleave"}
    found = {op for op in recorder.ops if op in syncing or "(" in op}
    assert recorder.ops and "aten.argmax" in recorder.ops and not found, found


def test_segments_are_encoded_ahead_in_batches(model, monkeypatch):
    """The refill admits segments one or two at a time; encoding ahead, the encoder still runs `encoder_batch` of
    them per call."""
    batches = []
    original = type(model.encoder).forward

    def counting(self, *args, **kwargs):
        batches.append((args[0] if args else kwargs["input_features"]).shape[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model.encoder), "forward", counting)
    x = frames(9, seed=16)
    eos = early_eos(model, x)
    want = reference(model, x, eos_token_id=eos)
    batches.clear()
    pool = MT3GreedyPool(model, 2)
    pool.encoder_batch, pool.encode_ahead = 4, True  # a GPU's setting, smaller
    torch.testing.assert_close(pool.generate(x, 40, [eos], 0, 0), want, atol=0, rtol=0)
    assert batches == [4, 4, 1]
    batches.clear()
    pool.encoder_batch, pool.encode_ahead = 2, False  # the CPU's: admitted segments only, 2 per call at most
    torch.testing.assert_close(pool.generate(x, 40, [eos], 0, 0), want, atol=0, rtol=0)
    assert len(batches) > 5 and batches[0] == 2 and max(batches) == 2 and sum(batches) == 9


def test_cuda_graphs_need_one_cuda_device(model, monkeypatch):
    """Graphs (the CUDA default) only for a model whole on one CUDA device, not one spread or offloaded by a
    device_map; never on CPU."""
    assert not model._can_capture()
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda", 0)))
    assert model._can_capture()
    monkeypatch.setattr(model, "hf_device_map", {"": 0}, raising=False)
    assert model._can_capture()
    monkeypatch.setattr(model, "hf_device_map", {"encoder": 0, "decoder": "cpu"}, raising=False)
    assert not model._can_capture()
