"""The converted folder's README.md (Hub model card), rendered from what the conversion measured."""

from __future__ import annotations

from string import Template
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .export import ConversionResult

CARD = Template(
    """---
license: apache-2.0
library_name: transformers
tags:
- music-transcription
- audio-to-midi
- midi
- mt3
- t5
---

# MT3: multi-instrument music transcription (PyTorch / transformers port)

MT3 (Gardner et al., ICLR 2022) turns audio into MIDI for many instruments at once: a
T5.1.1-style encoder-decoder reads 2.048 s segments of log-mel frames and writes MIDI-like
events (time shifts, programs, pitches, note on/off, ties). This folder is $variant_text of [magenta/mt3](https://github.com/magenta/mt3),
converted from its T5X/JAX format to PyTorch with convert-mt3 $version. It runs with `transformers` alone
(`trust_remote_code=True`); `pretty_midi` is needed only to write MIDI.

| | |
|---|---|
| source checkpoint | `$source_name`, T5X step $step |
| variant | $variant_row |
| arrays converted | $num_arrays ($num_zarr zarr arrays + $num_inline inline RMS-norm scales), all used, every parameter filled |
| parameters | $num_parameters |
| weights dtype | $dtype (safetensors) |
| reload check | folder reloaded with `AutoModel` + remote code; logits vs the source arrays' model: max abs error $reload_error |

## Usage

```python
$usage
```

`generate()` decodes all segments of the audio with greedy search (`generation_config.json`: start
id 0, EOS 1, up to 1024 tokens), as the original does, at most `segment_batch_size` segments at a
time (32 on CPU, 256 on CUDA): a finished segment makes room for the next, so memory does not
grow with the length of the audio. Other settings (beam search, scores, ...) use transformers'
own `generate()`.

Precision: use float32, which reproduces the original's tokens. Half precision runs (a model
cast with `.to(torch.bfloat16)`, or the mixed mode: float32 weights with
`torch.autocast(device, dtype=torch.bfloat16)` around `generate()`, half-precision matmuls with
the residual stream, norms and logits in float32) but changes notes: measured on CPU over the
three golden clips of convert-mt3, the mixed mode kept 70-88% of the float32 notes exactly,
the cast model 57-79%. GPU speed and agreement are not measured yet.

## Parity with the original

$parity

## Citation

```bibtex
@inproceedings{gardner2022mtthree,
  title     = {{MT3}: Multi-Task Multitrack Music Transcription},
  author    = {Gardner, Josh and Simon, Ian and Manilow, Ethan and Hawthorne, Curtis and Engel, Jesse},
  booktitle = {International Conference on Learning Representations},
  year      = {2022},
  url       = {https://openreview.net/forum?id=iMSjopcOn0p}
}
```

## Licence

The weights and the model design are the work of the MT3 authors (Google Magenta), released
under the Apache License 2.0 in [magenta/mt3](https://github.com/magenta/mt3); this
conversion keeps that licence. The decoding code follows MT3's `event_codec.py`,
`vocabularies.py` and `note_sequences.py` (Apache-2.0, The MT3 Authors).
"""
)

USAGE = '''import numpy as np
from transformers import AutoModel, AutoProcessor

processor = AutoProcessor.from_pretrained("$repo_id", trust_remote_code=True)
model = AutoModel.from_pretrained("$repo_id", trust_remote_code=True)
audio = np.zeros(3 * 16000, dtype=np.float32)  # your mono audio as float samples at 16 kHz
inputs = processor(audio=audio, sampling_rate=16000, return_tensors="pt")
tokens = model.generate(input_features=inputs["input_features"])
result = processor.batch_decode(tokens, inputs, return_midi=True)  # notes, pretty_midi
result["pretty_midi"].write("transcription.mid")'''


def usage_snippet(repo_id: str) -> str:
    return Template(USAGE).substitute(repo_id=repo_id)


def _parity_section(parity: dict) -> str:
    if not parity:
        return (
            "Not measured during this conversion (no golden outputs of the original were given; "
            "run `python -m convert_mt3 ... --golden DIR`)."
        )
    rows = [
        "Measured during conversion, in float32, against outputs of the original JAX/Flax MT3 "
        "(magenta/mt3) on real audio; segments 0 and 1 of each case:",
        "",
        "| case | encoder output max abs error | teacher-forced logits max abs error (max abs logit) | greedy tokens identical |",
        "|---|---|---|---|",
    ]
    for case in parity["cases"]:
        rows.append(
            f"| {case['case']} | {case['encoder_max_abs_error']:.2e} | {case['logits_max_abs_error']:.2e} "
            f"({case['logits_max_abs']:.1f}) | {case['greedy_segments_identical']}/{case['segments']} segments |"
        )
    return "\n".join(rows)


VARIANT_TEXT = {
    "mt3": "the multi-instrument `mt3` checkpoint",
    "ismir2021": "the piano `ismir2021` checkpoint (Hawthorne et al., ISMIR 2021: piano notes with velocities)",
    "custom": "an MT3 checkpoint with a custom layout",
}


def _variant_row(result: ConversionResult) -> str:
    v = result.variant
    return (
        f"`{v.name}`: {v.frames_per_segment}-frame segments, {v.num_velocity_bins} velocity bin(s), "
        f"ties {'on' if v.use_ties else 'off'}, program granularity `{v.program_granularity}`"
    )


def render_model_card(result: ConversionResult, version: str, repo_id: str | None = None) -> str:
    return CARD.substitute(
        version=version,
        source_name=result.source.name,
        variant_text=VARIANT_TEXT[result.variant.name],
        variant_row=_variant_row(result),
        step=result.step if result.step is not None else "unknown",
        num_arrays=result.num_arrays,
        num_zarr=result.num_zarr,
        num_inline=result.num_inline,
        num_parameters=f"{result.num_parameters:,}",
        dtype=result.dtype,
        reload_error=f"{result.reload_max_abs_error:.1e}",
        usage=usage_snippet(repo_id or result.out_dir.name),
        parity=_parity_section(result.parity),
    )


__all__ = ["render_model_card", "usage_snippet"]
