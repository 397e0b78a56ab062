"""Which rounding of a half-precision run changes MT3's tokens: float16 / bfloat16 emulated in float32 on the CPU.

    MT3_SHARED_DIR=../shared python3 benchmarks/precision_study.py --model-dir converted/mt3 \
        --modes linears-float16+attention-float16,attention_inputs-float16,kv-float16 [--seconds 300] [--margins]

A half-precision kernel rounds values to 11 (float16) or 8 (bfloat16) significant bits where float32 keeps 24. Here
each value such a kernel would round is rounded (`x.to(half).float()`) and the arithmetic stays float32, so every
rounding can be switched on alone, on any machine, at about float32's speed (a CPU without half-precision
instructions runs real float16 products 4-6x slower). A mode is one or more PART-DTYPE joined by "+":

  linears           inputs, weights and outputs of every projection (the frames' input projection, attention
                    q/k/v/out, MLP); not the logits, which the mixed mode keeps in float32
  mlp               the same, for the gated MLP's projections only
  attention         inputs and outputs of the decoder's attention products (query, keys, weights, values; scores and
                    result), as a half-precision `bmm` gives them (the encoder's attention, SDPA, is not rounded)
  attention_inputs  their inputs only (a kernel that accumulates and returns float32)
  kv                the keys and values the decoder caches (self- and cross-attention) only

"linears-float16+attention-float16" is what `torch.autocast("cuda", dtype=torch.float16)` rounds in `generate()`'s
fast path; on the golden cases it gives the segments and notes that the H200 gave (benchmarks/README.md).
For each mode and golden case (or `--seconds` of row 3's audio, the cases concatenated and tiled): the segments
whose ids equal float32's and the notes equal to float32's (%). `--margins` also feeds the float32 ids of the golden
cases through float32 and through each mode: per segment the largest logit error, and the smallest gap between the
two highest float32 logits (a token flips where an error exceeds such a gap).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import GOLDEN_SAMPLE_RATE, LONG_CASES, _cut  # noqa: E402  (bench.py: standard library only at import)

PARTS = ("linears", "mlp", "attention", "attention_inputs", "kv")
HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_mode(mode: str) -> list[tuple[str, torch.dtype]]:
    """"linears-float16+kv-bfloat16" -> [("linears", torch.float16), ("kv", torch.bfloat16)]; "float32" -> []."""
    if mode == "float32":
        return []
    parts = []
    for item in mode.split("+"):
        part, _, dtype = item.rpartition("-")
        if part not in PARTS or dtype not in HALF:
            raise ValueError(f"mode {mode!r}: expected PART-DTYPE items joined by '+', PART one of {PARTS}, DTYPE one "
                             f"of {tuple(HALF)}; found {item!r}")
        parts.append((part, HALF[dtype]))
    return parts


def _packable_class(model) -> type:
    """The Hub code's `_Packable` (every projection goes through its `_linear`), from the loaded model's classes."""
    for cls in type(model.decoder.layers[0].self_attention).__mro__:
        if cls.__name__ == "_Packable":
            return cls
    raise TypeError("this model's attention is not a _Packable: the study needs the Hub code's layers")


@contextlib.contextmanager
def rounding(model, mode: str, counts: Counter | None = None):
    """Run `model` with the roundings of `mode` (see the module docstring); its weights and the patched functions are
    restored on exit. `counts` (part -> calls) shows that each part's rounding was applied."""
    packable, bmm = _packable_class(model), torch.bmm
    linear = packable._linear  # the class attribute, restored on exit
    saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (weight, its float32 values): the rounded only
    counts = Counter() if counts is None else counts
    decoder = {id(module) for module in model.decoder.modules()}
    hooks = []

    def rounded(dtype, tensors):
        return tuple(t.to(dtype).float() for t in tensors)

    def round_weight(weight, dtype):
        saved.setdefault(id(weight), (weight, weight.detach().clone()))
        weight.copy_(weight.to(dtype).float())

    try:
        for part, dtype in parse_mode(mode):
            if part in ("linears", "mlp"):
                groups = ("wi", "wo") if part == "mlp" else None
                with torch.no_grad():  # the weights of the projections `_linear` runs (not the embeddings, logits)
                    for module in model.modules():
                        for group, names in getattr(module, "fusable", {}).items():
                            for name in names if groups is None or group in groups else ():
                                round_weight(getattr(module, name).weight, dtype)
                    if part == "linears":  # and the frames' input projection, an nn.Linear of its own
                        frames = model.encoder.continuous_inputs_projection
                        round_weight(frames.weight, dtype)
                        hooks += [frames.register_forward_pre_hook(lambda m, args, dtype=dtype: rounded(dtype, args)),
                                  frames.register_forward_hook(lambda m, args, out, dtype=dtype: rounded(dtype, (out,))[0])]

                def half_linear(self, group, states, dtype=dtype, groups=groups, inner=packable._linear, part=part):
                    if groups is not None and group not in groups:
                        return inner(self, group, states)
                    counts[part] += 1
                    out = inner(self, group, *rounded(dtype, (states,)))
                    return rounded(dtype, out) if isinstance(out, tuple) else rounded(dtype, (out,))[0]

                packable._linear = half_linear
            elif part == "kv":

                def half_kv(self, group, states, dtype=dtype, inner=packable._linear):
                    out = inner(self, group, states)
                    if id(self) not in decoder:  # the encoder's keys and values are not cached
                        return out
                    if group == "qkv":  # (query, key, value): the key and value go to the cache
                        counts["kv"] += 1
                        return (out[0], *rounded(dtype, out[1:]))
                    if group == "kv":  # cross-attention keys and values, once per segment
                        counts["kv"] += 1
                        return rounded(dtype, out)
                    return out

                packable._linear = half_kv
            else:
                outputs = part == "attention"

                def half_bmm(a, b, dtype=dtype, outputs=outputs, inner=torch.bmm, part=part):
                    counts[part] += 1
                    out = inner(*rounded(dtype, (a, b)))
                    return rounded(dtype, (out,))[0] if outputs else out

                torch.bmm = half_bmm
        yield counts
    finally:
        packable._linear, torch.bmm = linear, bmm
        for hook in hooks:
            hook.remove()
        with torch.no_grad():
            for weight, original in saved.values():
                weight.copy_(original)


def _check_applied(mode: str, counts: Counter) -> None:
    """A part whose rounding never ran measured nothing (the Hub code took another path): fail, do not report."""
    missing = [part for part, _ in parse_mode(mode) if counts[part] == 0]
    if missing:
        raise RuntimeError(f"mode {mode}: the rounding of {missing} was never applied (attention must run as "
                           "torch.bmm, the projections through _Packable._linear)")


def compare(model, processor, inputs: dict, modes: list[str], **generate_kwargs) -> tuple[dict, dict]:
    """Per mode and input: segments with float32's ids, notes equal to float32's; and float32's generated ids per
    input (for `margins`)."""
    reference, out, float32 = {}, {}, {}
    for mode in ["float32", *modes]:
        for name, features in inputs.items():
            with rounding(model, mode) as counts, torch.inference_mode():
                tokens = model.generate(input_features=features["input_features"], **generate_kwargs)
            _check_applied(mode, counts)
            tokens = getattr(tokens, "sequences", tokens)
            float32.setdefault(name, tokens)
            ids = [_cut(row)[0] for row in tokens.tolist()]
            notes = Counter(processor.batch_decode(tokens, features, return_midi=False)["notes"])
            reference.setdefault(name, (ids, notes))
            ref_ids, ref_notes = reference[name]
            out.setdefault(mode, {})[name] = {
                "segments": len(ids), "segments_identical": sum(a == b for a, b in zip(ids, ref_ids)),
                "notes_float32": sum(ref_notes.values()), "notes_equal": sum((notes & ref_notes).values())}
    return out, float32


def margins(model, inputs: dict, float32: dict, modes: list[str]) -> dict:
    """float32's ids (`float32`, per input, from `compare`) teacher-forced through float32 and each mode (the decoder's attention as matmuls, as in
    `generate()`, so that `bmm` rounds): per segment, the largest logit error and the smallest top-2 gap of float32's
    logits."""
    out = {mode: [] for mode in modes}
    for name, features in inputs.items():
        frames, tokens = features["input_features"], float32[name]
        model.pack(rows=1, onednn=False, matmul_attention=True, fuse=False)
        try:
            for segment, row in enumerate(tokens.tolist()):
                generated = _cut(row)[1]
                prefix = torch.tensor([row[:generated]])  # the start id and every generated id but the last
                logits = {}
                for mode in ["float32", *modes]:
                    with rounding(model, mode) as counts, torch.inference_mode():
                        logits[mode] = model(input_features=frames[segment : segment + 1],
                                             decoder_input_ids=prefix).logits[0]
                    _check_applied(mode, counts)
                top2 = logits["float32"].topk(2, dim=-1).values
                gap = float((top2[:, 0] - top2[:, 1]).min())
                for mode in modes:
                    error = float((logits[mode] - logits["float32"]).abs().max())
                    flips = int((logits[mode].argmax(-1) != logits["float32"].argmax(-1)).sum())
                    out[mode].append({"smallest_gap": gap, "largest_error": error, "flipped_positions": flips})
        finally:
            model.unpack()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="a converted folder")
    parser.add_argument("--shared", default=os.environ.get("MT3_SHARED_DIR", "../shared"))
    parser.add_argument("--modes", default="linears-float16+attention-float16,attention_inputs-float16,kv-float16")
    parser.add_argument("--seconds", type=float, default=None, help="row 3's audio of this length, not the cases")
    parser.add_argument("--margins", action="store_true")
    args = parser.parse_args()
    modes = args.modes.split(",")
    for mode in modes:
        parse_mode(mode)
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(args.model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(args.model_dir, trust_remote_code=True)
    audio = {case: np.load(Path(args.shared) / "golden" / case / "samples.npy") for case in LONG_CASES}
    if args.seconds:
        one = np.concatenate(list(audio.values()))
        n = int(args.seconds * GOLDEN_SAMPLE_RATE)
        audio = {f"{args.seconds:g} s": np.tile(one, -(-n // len(one)))[:n]}
    inputs = {name: processor(audio=x, sampling_rate=GOLDEN_SAMPLE_RATE, return_tensors="pt") for name, x in audio.items()}
    results, float32 = compare(model, processor, inputs, modes)
    for mode, cases in results.items():
        for name, r in cases.items():
            print(f"{mode:40s} {name[:12]:12s} segments {r['segments_identical']}/{r['segments']}  notes "
                  f"{r['notes_equal']}/{r['notes_float32']} = {100 * r['notes_equal'] / max(1, r['notes_float32']):.1f}%")
    if args.margins:
        for mode, segments in margins(model, inputs, float32, modes).items():
            errors = [s["largest_error"] for s in segments]
            gaps = [s["smallest_gap"] for s in segments]
            if mode == modes[0]:
                print(f"float32's smallest top-2 logit gap per segment: median {np.median(gaps):.4f}, min "
                      f"{min(gaps):.4f}, below 0.01 in {sum(g < 0.01 for g in gaps)}/{len(gaps)} segments")
            print(f"{mode:40s} largest logit error per segment: median {np.median(errors):.4f}, max {max(errors):.4f}; "
                  f"segments whose smallest float32 top-2 gap is below that max: "
                  f"{sum(g < max(errors) for g in gaps)}/{len(gaps)}; positions flipped: "
                  f"{sum(s['flipped_positions'] for s in segments)}")


if __name__ == "__main__":
    main()
