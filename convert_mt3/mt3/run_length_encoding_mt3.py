"""Notes <-> per-segment codec ids: the targets MT3 trains on, and the decoding of its predictions.

Ported (rewritten, no TensorFlow / seqio) from Magenta MT3:
- encoding, as its training tasks chain it (`mt3/tasks.py`): `preprocessors.tokenize_*_example`
  (`run_length_encoding.encode_and_index_events` with `NoteEncodingWithTiesSpec` or `NoteEncodingSpec`),
  `extract_target_sequence_with_indices` (tie section), `preprocessors.map_midi_programs`,
  `run_length_encode_shifts_fn`, `remove_redundant_state_changes_fn` (velocity, program);
- decoding: `run_length_encoding.decode_events`, `metrics_utils.decode_and_combine_predictions` /
  `event_predictions_to_ns`.

Segments are the feature extractor's: segment k holds the events from its origin step to the next segment's, times
counted from its origin: the last step at or before its start, as MT3's `encode_and_index_events` finds it. Decoding
rounds a start down with the colab's `start_time -= start_time % (1 / steps_per_second)`, which in floats is one step
lower for some starts (30.72 s, 61.44 s, ...: 215 of an hour's 1,758): there the targets' notes decode 10 ms early,
as MT3's own do; elsewhere decoding the targets gives back the notes.
"""

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .event_codec_mt3 import (
    PROGRAM_GRANULARITIES,
    Codec,
    Event,
    map_program,
    num_velocity_bins_from_codec,
)
from .note_sequences_mt3 import (
    DEFAULT_MIN_NOTE_DURATION,
    DEFAULT_NOTE_DURATION,
    DEFAULT_VELOCITY,
    MT3Note,
    NoteDecodingState,
    NoteEncodingState,
    begin_tied_pitches_section,
    decode_note_event,
    flush_note_decoding_state,
    note_encoding_state_to_events,
    note_event_data_to_events,
    note_sequence_to_onsets_and_offsets_and_programs,
    trim_overlapping_notes,
)

# remove_redundant_state_changes_fn(state_change_event_types=...) in tasks.py
STATE_CHANGE_EVENT_TYPES = ("velocity", "program")


def segment_start_steps(segment_start_times: Sequence[float], steps_per_second: int) -> list[int]:
    """Each segment's origin on the shift grid: the last step with `step / steps_per_second <= start`, compared in
    floats as `encode_and_index_events` compares a frame's time with each step's."""
    steps = []
    for start in segment_start_times:
        step = math.floor(start * steps_per_second)  # the product may round to either side of the step
        if step / steps_per_second > start:
            step -= 1
        elif (step + 1) / steps_per_second <= start:
            step += 1
        steps.append(step)
    return steps


def shift_events(steps: int, max_shift_steps: int) -> list[Event]:
    """`run_length_encode_shifts`: `steps` (from the segment start) as shifts of at most `max_shift_steps`."""
    return [Event("shift", min(max_shift_steps, steps - done)) for done in range(0, steps, max_shift_steps)]


def map_midi_programs(events: list[Event], granularity: str) -> list[Event]:
    """`preprocessors.map_midi_programs`: flat drops program events, midi_class maps them to their class."""
    if granularity == "flat":
        return [e for e in events if e.type != "program"]
    return [Event("program", map_program(e.value, granularity)) if e.type == "program" else e for e in events]


def remove_redundant_state_changes(events: list[Event]) -> list[Event]:
    """`remove_redundant_state_changes_fn`: drop a velocity or program event equal to the current one."""
    current: dict[str, int] = {}
    output = []
    for event in events:
        if event.type in STATE_CHANGE_EVENT_TYPES:
            if current.get(event.type) == event.value:
                continue
            current[event.type] = event.value
        output.append(event)
    return output


def encode_notes(
    notes: Sequence[MT3Note],
    segment_start_times: Sequence[float],
    codec: Codec,
    use_ties: bool = True,
    program_granularity: str = "full",
) -> list[list[int]]:
    """Notes -> the codec ids of each segment's targets (without EOS).

    Each segment: with `use_ties`, the tie section (program + pitch of every note sounding at its start, then
    `tie`); then its events in time order, each time preceded by the shifts from the segment start (trailing shifts
    trimmed). Overlapping notes of one pitch and program are trimmed first, as MT3 does for training. The last
    segment takes every remaining event, as the original's last chunk does.
    """
    if program_granularity not in PROGRAM_GRANULARITIES:
        raise ValueError(f"Expected program_granularity in {PROGRAM_GRANULARITIES}; found {program_granularity!r}.")
    num_velocity_bins = num_velocity_bins_from_codec(codec)
    max_shift_steps = codec.event_type_range("shift")[1]
    times, values = note_sequence_to_onsets_and_offsets_and_programs(trim_overlapping_notes(notes))
    order = np.argsort(np.asarray(times, dtype=np.float64), kind="stable")
    # encode_and_index_events: sorted by exact time, then rounded (Python round) to the shift grid
    steps = [round(times[i] * codec.steps_per_second) for i in order]
    values = [values[i] for i in order]
    starts = segment_start_steps(segment_start_times, codec.steps_per_second)

    state = NoteEncodingState()
    index = 0
    segments = []
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else math.inf
        while index < len(steps) and steps[index] < start:  # before the first segment: state only
            note_event_data_to_events(state, values[index], num_velocity_bins)
            index += 1
        events = note_encoding_state_to_events(state) if use_ties else []
        current_step = start
        while index < len(steps) and steps[index] < end:
            if steps[index] > current_step:
                current_step = steps[index]
                events += shift_events(current_step - start, max_shift_steps)
            events += note_event_data_to_events(state, values[index], num_velocity_bins)
            index += 1
        events = remove_redundant_state_changes(map_midi_programs(events, program_granularity))
        segments.append([codec.encode_event(e) for e in events])
    return segments


def decode_events(
    state: NoteDecodingState, tokens: Sequence[int], start_time: float, max_time: float | None, codec: Codec
) -> tuple[int, int]:
    """MT3 `run_length_encoding.decode_events` with `decode_note_event`: one segment's codec ids into `state`.

    Shifts are absolute within the segment (the step counter restarts after every non-shift event). Returns
    (invalid_events, dropped_events): undecodable ids or events rejected by `decode_note_event`, and the tokens
    from the first shift past `max_time` on.
    """
    invalid_events = 0
    dropped_events = 0
    cur_steps = 0
    cur_time = start_time
    for token_idx, token in enumerate(tokens):
        try:
            event = codec.decode_event_index(int(token))
        except ValueError:
            invalid_events += 1
            continue
        if event.type == "shift":
            cur_steps += event.value
            cur_time = start_time + cur_steps / codec.steps_per_second
            # `max_time and ...` as in the original: a max_time of 0.0 disables the check.
            if max_time and cur_time > max_time:
                dropped_events = len(tokens) - token_idx
                break
        else:
            cur_steps = 0
            try:
                decode_note_event(state, cur_time, event, codec)
            except ValueError:
                invalid_events += 1
    return invalid_events, dropped_events


def event_predictions_to_notes(
    predictions: Sequence[dict[str, Any]],
    codec: Codec,
    use_ties: bool = True,
    default_velocity: int = DEFAULT_VELOCITY,
    note_duration: float = DEFAULT_NOTE_DURATION,
    min_note_duration: float = DEFAULT_MIN_NOTE_DURATION,
) -> tuple[list[MT3Note], int, int]:
    """MT3 `metrics_utils.event_predictions_to_ns` with `NoteEncodingWithTiesSpec` (use_ties=True) or
    `NoteEncodingSpec` (use_ties=False). `predictions`: [{"est_tokens": codec ids, "start_time": seconds}].

    Segments are decoded in start-time order into one state; each may not decode past the next one's start.
    Returns (notes in the original NoteSequence order, invalid event count, dropped event count).
    """
    ordered = sorted(predictions, key=lambda pred: pred["start_time"])
    state = NoteDecodingState(
        current_velocity=default_velocity, note_duration=note_duration, min_note_duration=min_note_duration
    )
    total_invalid = total_dropped = 0
    for index, pred in enumerate(ordered):
        if use_ties:
            begin_tied_pitches_section(state)
        max_time = ordered[index + 1]["start_time"] if index + 1 < len(ordered) else None
        invalid, dropped = decode_events(state, pred["est_tokens"], pred["start_time"], max_time, codec)
        total_invalid += invalid
        total_dropped += dropped
    return flush_note_decoding_state(state), total_invalid, total_dropped


__all__ = [
    "decode_events",
    "encode_notes",
    "event_predictions_to_notes",
    "map_midi_programs",
    "remove_redundant_state_changes",
    "segment_start_steps",
    "shift_events",
]
