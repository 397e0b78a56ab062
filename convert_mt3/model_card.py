"""The converted folder's README.md (Hub model card), rendered from what the conversion measured."""

from __future__ import annotations

from string import Template
from typing import TYPE_CHECKING

from .mt3.feature_extraction_mt3 import DEFAULT_HOP_LENGTH, DEFAULT_SAMPLING_RATE
from .mt3.generation_mt3 import DRAFT_ROWS, DRAFT_TOKENS, EOS_CHECK_INTERVAL, SEGMENT_BATCH_SIZE

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

# $title (PyTorch / transformers port)

```python
$pipeline_usage
```

MT3 (Gardner et al., ICLR 2022) turns audio into MIDI $instruments: a
T5.1.1-style encoder-decoder reads $seconds s segments of log-mel frames and writes MIDI-like
events ($events). This folder is $variant_text of [magenta/mt3](https://github.com/magenta/mt3),
converted from its T5X/JAX format to PyTorch with convert-mt3 $version. It runs with `transformers` alone
(`trust_remote_code=True`); `pretty_midi` is needed for MIDI, which the pipeline and `batch_decode` return by
default (`return_midi=False` gives the notes only).

| | |
|---|---|
| source checkpoint | `$source_name`, T5X step $step |
| variant | $variant_row |
| arrays converted | $num_arrays ($num_zarr zarr arrays + $num_inline inline RMS-norm scales), all used, every parameter filled |
| parameters | $num_parameters |
| weights dtype | $dtype (safetensors) |
| reload check | folder reloaded with `AutoModel` + remote code; logits vs the source arrays' model: max abs error $reload_error |

## Usage

`pip install "transformers>=5.10.1,<6" torch soundfile soxr pretty_midi` (soundfile + soxr read and resample
audio files, pretty_midi writes MIDI). Any format libsndfile reads (wav, flac, ogg, mp3); stereo is mixed to mono.

The pipeline takes a file path, a 1-D array with `sampling_rate=`, a `{"array", "sampling_rate"}` dict (a
`datasets` Audio row, also decoded) or a list of those, and returns per input:

- `notes`: list of `{"program", "instrument", "is_drum", "pitch", "velocity", "start", "end"}` (GM program 0-127
  and its General MIDI name, "Drums" for drum notes; times in seconds), sorted by start time;
- `midi`: a `pretty_midi.PrettyMIDI` (`return_midi="bytes"`: the Standard MIDI File's bytes; `False`: none);
- `invalid_events`, `dropped_events`: counts from decoding, as the original reports them.

Options: `programs="0-7,32"`, `programs="piano,bass"` (GM families) or GM program names keeps only the notes of those instruments
and the drums, exactly as the unfiltered transcription has them (decoding is unchanged); `generate_kwargs={...}` goes to `generate()`.
A model object (cast or fine-tuned in memory) runs in the same pipeline with `model.transcription_pipeline(**options)`.

### Long audio, batching, devices

- Audio is cut into $seconds s segments whose spectrograms are computed 16 at a time while the model runs, so memory
  holds the input's samples and tokens, not its spectrogram: an hour is ~0.23 GB of 16 kHz float32 samples (a file
  is decoded whole first: ~1.3 GB for an hour of 44.1 kHz stereo). On a CUDA model they are computed on its GPU
  (in float64, as numpy does on CPU: within 5e-07 of it on an H200, 0.3-0.4 s for an hour on 2026-11-28, 0.9-1.4 s before).
- `batch_size=N` is the number of segments per `generate()` call, taken across inputs when you pass a list or a
  `datasets` column (`dataset.map(lambda b: {"notes": [r["notes"] for r in transcriber(b["audio"], return_midi=False)]}, batched=True)`;
  a column cast to `Audio(decode=False)` holds paths and bytes, which the pipeline reads itself, where a decoding
  `Audio()` column needs `torchcodec` installed);
  the default is `segment_batch_size` of `generation_config.json` ($pool). Inside one call at most
  that many segments decode together and a finished one makes room for the next. For long audio on CPU, 64 decoded
  600 s 17% faster than 32, for twice the decoding caches (1.6 against 0.8 GB).
- `device=0` / `"cuda"` / `"mps"` (default: the first GPU when there is one, else CPU). float32 is the trained
  precision and the only exact one; `dtype=torch.bfloat16` runs but is not exact (below). For many GPUs, give
  each process its share of the files (`accelerate`'s `PartialState().split_between_processes`).

$speed

### Limits

- Each $seconds s segment is decoded on its own (as in the original): $boundary, but the model never sees more
  than one segment of context, so notes near segment boundaries are less reliable; note times are on a 10 ms grid.
- Instrument leakage: the model picks a program for each note from the timbre it hears; on unusual timbres it
  often splits one instrument over several programs or puts it on a neighbouring one (e.g. strings on programs
  40-50, a synthesized bass an octave off). Filtering with `programs=` drops the other programs' notes; it does not make the
  model hear better.
- $training

### Without the pipeline (AutoModel + AutoProcessor)

```python
$usage
```

`processor(audio=[clip_a, clip_b], ...)` takes a list of clips: their segments are decoded together, and
`batch_decode(tokens, inputs)` then returns `notes` and `pretty_midi` as lists, one entry per clip.

`generate()` decodes all segments of the audio with greedy search (`generation_config.json`: start
id 0, EOS 1, `max_length` 1025: the start id and up to 1024 generated ids; a call's `max_length` or `max_new_tokens`
replaces it), as the original does, at most `segment_batch_size` segments at a
time ($pool): a finished segment makes room for the next, so memory does not
grow with the length of the audio. Other settings (beam search, scores, ...) use transformers'
own `generate()`. On CUDA each decode step is replayed as a CUDA graph (`cuda_graphs=False` for
eager launches: the same ids, four to seven times as long for a minute of audio on an H200), and
`eos_check_interval=k` looks for finished segments every k steps only (default $eos_check_interval).
`draft_tokens=k` (default $draft_tokens): once at most $draft_rows segments are left, each guesses its next k ids
from its own earlier ones and keeps those its predictions confirm: the same ids in fewer steps where a segment
loops through a few events (not with CUDA graphs); `draft_shift_ids` (the time shifts' first and last id) lets a
guessed loop move on in time.

Precision: use float32, which reproduces the original's tokens. Half precision runs (a model
cast with `.to(torch.bfloat16)`, or the mixed mode: float32 weights with
`torch.autocast(device, dtype=torch.bfloat16)` around `generate()`, half-precision matmuls with
the residual stream, norms and logits in float32) but changes notes: measured on CPU over the
three golden clips of convert-mt3, the mixed mode kept 77-96% of the float32 notes exactly,
the cast model 57-77%; on an H200, over an hour of audio, autocast float16 kept 95.9% of the
notes (its `generate()` 1.4x faster than float32's default), autocast bfloat16 79.6% (an earlier run).
No half mode tried keeps 99% of them: greedy decoding meets near-ties (in half of those clips' segments
the two highest logits come within 0.01 of each other), closer than float16 rounding moves the
logits (up to 0.06, or 0.013 with only the cached keys and values in float16).

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


PIPELINE_USAGE = '''from transformers import pipeline
transcriber = pipeline("music-transcription", model="$repo_id", trust_remote_code=True)$where
transcriber("song.wav")["midi"].write("song.mid")'''

# `make bench` rows 5 and 6 on the project's CI machine kind (2-core CPU VM, torch 2.13.0+cpu, transformers 5.24.0;
# see convert-mt3's README, 2026-11-26): the 60 s clip is golden case b repeated. GPU: an NVIDIA H200 (torch 2.11,
# transformers 5.17, jax 0.11.2 with CUDA; benchmarks/results_gpu_h200_79c9ef5.json, 2026-11-28).
SPEED = """### Speed and precision (measured with convert-mt3's `make bench`)

A 60 s dense multi-instrument clip (30 segments) on a 2-core CPU VM (torch 2.13, transformers 5.24, float32),
against the original JAX/Flax MT3 network (jax 0.10.2, its jitted greedy loop, batch 8; in six of the last seven runs
also batch 32, the faster of the two compared) decoding the same frames in the same run, twenty-five runs on 2026-11-26 to 29:

| | port | original | port's speed-up | identical segments | port peak memory |
|---|---|---|---|---|---|
| last run (an Intel Xeon VM of that kind) | 17.4 s (0.29 s per audio s) | 81.2 s (1.35 s per audio s) | 4.7x | 30/30 | 1.22 GB |
| twenty-five runs | 12.4-20.2 s | 45.8-90.1 s | 3.7-5.9x (median 4.4x) | 30/30 in every run | 1.22-1.26 GB (\\*) |

(\\*) the twenty-four runs after a fix that frees the decoding caches when `generate()` returns.

A string orchestra repeated to 60 s, one of whose segments loops to the 1024-id limit (in the original too): 21.7 s
against 118.1 s, 5.4x, and 23.6 s against 120.9 s, 5.1x, in a second run; the same ids in all 30 segments (4.9x in
one run before `draft_tokens`). With guesses that move time shifts on (`draft_shift_ids`), on another VM of the same
kind (an Intel Xeon, where the original ran 10-41% longer): 22.2 s against 163.1 s, 7.3x, 22.9 s against 133.3 s, 5.8x, and 25.2 s against
138.1 s, 5.5x.

An hour of audio took 17.6 and 19.7 minutes end to end in the two runs whose figures were kept, on such VMs (0.29 and
0.33 s per audio second; a third took ~20.6 minutes on a slower day), peak 3.05 GB with the whole
hour's spectrogram in memory (the pipeline computes it 16 segments at a time).

float32 is the trained precision and reproduces the original's notes exactly on the three reference recordings
(479, 468 and 97 notes). Half precision runs but changes notes (CPU, vs the port's float32): mixed mode (float32
weights, `torch.autocast(device, dtype=torch.bfloat16)` around `generate()`) keeps 77%, 96% and 89% of the notes,
`.to(torch.bfloat16)` 57%, 77% and 77%; on a CPU both are also slower than float32.

On one NVIDIA H200 (torch 2.11, 2026-11-28), float32 with CUDA graphs and `eos_check_interval=8` (the defaults on
CUDA): the hour's ids equal the CPU float32 run's in every segment, the clip's equal eager float32's:

| | float32 | autocast float16 | the original (Flax, jax 0.11.2 on the GPU, its fastest: batch 32, TF32 matmuls) |
|---|---|---|---|
| 60 s dense clip, `generate()` | 0.42-0.44 s (four runs) | 0.41 s (28/30 segments as float32) | 0.41 s (0.78 s in float32 matmuls; batch 8: 0.66 s) |
| one hour end to end (features, `generate()`, notes) | 7.4, 7.6 and 8.4 s (three runs), 10.2 GB GPU memory | 5.5 s (95.9% of the notes), 5.8 GB | not run |

On the clip the port's float32 is about as fast as the original at its fastest (0.95x, one run each), and 1.8x faster
than the original computing in float32 as the port does (the same ids in all 30 segments). Autocast bfloat16 kept
79.6% of the hour's notes in an earlier run. Use float32 to transcribe; float16 autocast where speed matters more
than the last notes."""


def usage_snippet(repo_id: str) -> str:
    return Template(USAGE).substitute(repo_id=repo_id)


def pipeline_snippet(repo_id: str, local: bool = False) -> str:
    """`local`: the id is a converted folder's name, which loads from the folder above it only."""
    where = "  # this folder's path, or its Hub id once pushed" if local else ""
    return Template(PIPELINE_USAGE).substitute(repo_id=repo_id, where=where)


def _parity_section(parity: dict) -> str:
    if not parity:
        return (
            "Not measured during this conversion (no golden outputs of the original were given; "
            "run `python -m convert_mt3 ... --golden DIR`)."
        )
    rows = [
        "Measured during conversion, in float32, against outputs of the original JAX/Flax MT3 "
        "(magenta/mt3) on real audio: the errors over the segments with golden encoder outputs and logits (0 and 1 of "
        "each case), the greedy tokens over every segment:",
        "",
        "| case | encoder output max abs error | teacher-forced logits max abs error (max abs logit) | greedy tokens identical |",
        "|---|---|---|---|",
    ]
    for case in parity["cases"]:
        rows.append(
            f"| {case['case']} | {case['encoder_max_abs_error']:.2e} | {case['logits_max_abs_error']:.2e} "
            f"({case['logits_max_abs']:.1f}) | {case['greedy_segments_identical']}/{case['greedy_segments']} segments |"
        )
    return "\n".join(rows)


TITLE = {
    "mt3": "MT3: multi-instrument music transcription",
    "ismir2021": "MT3 ismir2021: piano transcription",
    "custom": "MT3: music transcription",
}

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


# What the variant was trained on (the MT3 paper and the ismir2021 paper); a custom layout says nothing.
TRAINING = {
    "mt3": "Trained on instrumental music only (MAESTRO, Slakh2100, Cerberus4, GuitarSet, MusicNet, URMP): singing is "
           "outside its training data.",
    "ismir2021": "Trained on solo piano recordings (MAESTRO): other instruments are outside its training data.",
    "custom": "Training data: see the checkpoint's source.",
}


def _variant_phrases(result: ConversionResult) -> dict[str, str]:
    """The card's sentences that depend on the variant: segment length, events, ties, training data."""
    v = result.variant
    events = ["time shifts", *(["programs"] if v.program_granularity != "flat" else []),
              *(["velocities"] if v.num_velocity_bins > 1 else []), "pitches", "note on/off", *(["ties"] if v.use_ties else [])]
    boundary = ("a note held across a boundary is tied by the model's tie events" if v.use_ties else
                "without tie events, a note held across a boundary stays on until a later segment's offset ends it")
    seconds = v.frames_per_segment * DEFAULT_HOP_LENGTH / DEFAULT_SAMPLING_RATE
    return {
        "instruments": "for many instruments at once" if v.program_granularity != "flat" else "without instrument labels",
        "seconds": f"{seconds:g}",
        "events": ", ".join(events),
        "boundary": boundary,
        "training": TRAINING[v.name],
    }


def _per_device(defaults: dict[str, int]) -> str:
    """generate()'s defaults per device type as the card states them: {"cpu": 32, "cuda": 256} -> "32 on CPU,
    256 on CUDA"."""
    return ", ".join(f"{value} on {device.upper()}" for device, value in defaults.items())


def render_model_card(result: ConversionResult, version: str, repo_id: str | None = None) -> str:
    speed = SPEED if result.variant.name == "mt3" else SPEED + (
        "\n\n(These figures are the multi-instrument `mt3` checkpoint's, not this one's.)")
    return CARD.substitute(
        **_variant_phrases(result),
        title=TITLE[result.variant.name],
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
        pipeline_usage=pipeline_snippet(repo_id or result.out_dir.name, local=repo_id is None),
        speed=speed,
        parity=_parity_section(result.parity),
        pool=_per_device(SEGMENT_BATCH_SIZE),
        eos_check_interval=_per_device(EOS_CHECK_INTERVAL),
        draft_tokens=_per_device(DRAFT_TOKENS),
        draft_rows=DRAFT_ROWS,
    )


__all__ = ["pipeline_snippet", "render_model_card", "usage_snippet"]
