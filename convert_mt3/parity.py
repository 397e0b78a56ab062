"""Measure a converted model against outputs of the original JAX MT3 (a `golden` folder).

Each case folder holds what the original computed (see its README): `frames.npy` (encoder
inputs), `encoder_out.npy` and `logits.npy` for segments 0 and 1, and `tokens.json` (greedy
tokens). The figures land in the model card, so they are measured, never typed in.
"""

from __future__ import annotations

import json
import tokenize
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .cli import first_line

# What `--golden` requires of a conversion: the tolerances of tests/test_parity_model.py (measured: encoder
# <= 1.3e-5, logits <= 9.2e-5 on the three golden cases) and every greedy segment identical.
ENCODER_TOLERANCE = 1e-4
LOGITS_TOLERANCE = 2.5e-4


class GoldenError(ValueError):
    """A golden folder that lacks the files a parity measurement needs."""


def _load(case: Path, name: str) -> Any:
    path = case / name
    if not path.is_file():
        raise GoldenError(f"{path}: missing golden file")
    try:
        loaded = json.loads(path.read_text()) if name.endswith(".json") else np.load(path, allow_pickle=False)
    # not JSON / not an .npy of numbers; numpy parses a header with Python's tokenizer (SyntaxError, TokenError)
    except (ValueError, OSError, EOFError, SyntaxError, RecursionError, tokenize.TokenError) as err:
        raise GoldenError(f"{path}: unreadable golden file ({first_line(err)})") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):  # np.load reads a zip of arrays (np.savez) whatever the name
        loaded.close()
        raise GoldenError(f"{path}: expected one .npy array; found an .npz archive")
    return loaded


def _check_array(case: Path, name: str, array: np.ndarray, shape: tuple[int | None, ...], what: str) -> None:
    """A GoldenError naming the file unless `array` is numeric with `shape` (None: any size >= 1)."""
    found = tuple(array.shape)
    fits = len(found) == len(shape) and all(n >= 1 and m in (None, n) for n, m in zip(found, shape))
    if not fits or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        expected = ", ".join("N" if m is None else str(m) for m in shape)
        raise GoldenError(f"{case / name}: expected {what} of shape ({expected}); found {array.dtype} {list(found)}")


def _check_tokens(case: Path, tokens: Any, count: int, vocab_size: int) -> list[list[int]]:
    """tokens.json's rows for the first `count` segments, or a GoldenError naming the file."""
    rows = tokens.get("segments") if isinstance(tokens, dict) else None
    if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
        raise GoldenError(f"{case / 'tokens.json'}: expected {{\"segments\": [[ids, ...], ...]}}")
    if len(rows) < count:
        raise GoldenError(f"{case / 'tokens.json'}: expected ids for at least the {count} segments of frames.npy; "
                          f"found {len(rows)} rows")
    for row in rows[:count]:
        bad = [i for i in row if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size]
        if bad:
            raise GoldenError(f"{case / 'tokens.json'}: expected ids from 0 to {vocab_size - 1}; found {bad[0]!r}")
    return rows[:count]


@torch.no_grad()
def measure_case(model: torch.nn.Module, case: Path) -> dict[str, Any]:
    """Max abs errors of encoder output and teacher-forced logits (the segments the golden run kept them for);
    greedy tokens of every segment."""
    config = model.config
    frames, encoder_out, logits = _load(case, "frames.npy"), _load(case, "encoder_out.npy"), _load(case, "logits.npy")
    _check_array(case, "frames.npy", frames, (None, None, config.input_depth), "(segments, frames, mel bins)")
    if frames.shape[1] > config.max_position_embeddings:
        raise GoldenError(f"{case / 'frames.npy'}: expected at most {config.max_position_embeddings} frames a segment "
                          f"(the model's positions); found {frames.shape[1]}")
    count, length = encoder_out.shape[0] if encoder_out.ndim else 0, frames.shape[1]
    _check_array(case, "encoder_out.npy", encoder_out, (min(count, len(frames)), length, config.d_model),
                 "(segments <= those of frames.npy, their frames, d_model)")
    _check_array(case, "logits.npy", logits, (count, None, config.vocab_size), "(segments, positions, vocabulary)")
    golden_tokens = _check_tokens(case, _load(case, "tokens.json"), len(frames), config.vocab_size)
    positions = logits.shape[1]
    dtype = next(model.parameters()).dtype
    all_features = torch.from_numpy(frames).to(dtype)  # (segments, frames, mel bins)
    features = all_features[:count]  # the segments with golden encoder outputs and logits

    encoder_outputs = model.get_encoder()(input_features=features)
    encoded = encoder_outputs.last_hidden_state.float()
    # Teacher forcing as the golden run did: [0] + tokens[:63], tokens = greedy ids, EOS, then 0s.
    targets = np.zeros((count, positions), dtype=np.int64)
    for row, tokens in enumerate(golden_tokens[:count]):
        ids = (list(tokens) + [model.config.eos_token_id])[:positions]
        targets[row, : len(ids)] = ids
    decoder_ids = model.prepare_decoder_input_ids_from_labels(torch.from_numpy(targets))  # [start] + targets[:-1]
    out = model(encoder_outputs=encoder_outputs, decoder_input_ids=decoder_ids).logits.float()

    generated = model.generate(input_features=all_features).tolist()  # every segment
    identical = 0
    for row, tokens in enumerate(golden_tokens):
        ids = generated[row][1:]  # drop the decoder start id
        ids = ids[: ids.index(model.config.eos_token_id)] if model.config.eos_token_id in ids else ids
        identical += ids == list(tokens)
    return {
        "case": case.name,
        "segments": count,
        "encoder_max_abs_error": float(np.abs(encoded.numpy() - encoder_out).max()),
        "logits_max_abs_error": float(np.abs(out.numpy() - logits).max()),
        "logits_max_abs": float(np.abs(logits).max()),
        "greedy_segments_identical": int(identical),
        "greedy_segments": len(golden_tokens),
    }


def measure_golden_parity(model: torch.nn.Module, golden_dir: Path, *, quiet: bool = True) -> dict[str, Any]:
    """Figures for every case folder under `golden_dir` (float32 model expected)."""
    cases = sorted(p for p in Path(golden_dir).iterdir() if p.is_dir()) if Path(golden_dir).is_dir() else []
    if not cases:
        raise GoldenError(f"{golden_dir}: no golden case folders found")
    results = [measure_case(model, case) for case in tqdm(cases, desc="golden parity", unit="case", disable=quiet)]
    return {
        "cases": results,
        # np.max, not max(): a NaN error must not be dropped
        "encoder_max_abs_error": float(np.max([r["encoder_max_abs_error"] for r in results])),
        "logits_max_abs_error": float(np.max([r["logits_max_abs_error"] for r in results])),
        "greedy_segments_identical": sum(r["greedy_segments_identical"] for r in results),
        "greedy_segments": sum(r["greedy_segments"] for r in results),
    }


def parity_failures(parity: dict[str, Any]) -> list[str]:
    """What of `measure_golden_parity`'s figures misses the tolerances above; empty when parity holds."""
    failures = []
    if not parity["encoder_max_abs_error"] <= ENCODER_TOLERANCE:  # NaN fails too
        failures.append(f"encoder max abs error {parity['encoder_max_abs_error']:.2e} > {ENCODER_TOLERANCE:.0e}")
    if not parity["logits_max_abs_error"] <= LOGITS_TOLERANCE:
        failures.append(f"logits max abs error {parity['logits_max_abs_error']:.2e} > {LOGITS_TOLERANCE:.1e}")
    if parity["greedy_segments_identical"] != parity["greedy_segments"]:
        failures.append(f"greedy tokens identical in {parity['greedy_segments_identical']} of "
                        f"{parity['greedy_segments']} segments, expected all")
    return failures


__all__ = ["ENCODER_TOLERANCE", "LOGITS_TOLERANCE", "GoldenError", "measure_case", "measure_golden_parity",
           "parity_failures"]
