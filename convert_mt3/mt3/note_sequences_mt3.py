"""Notes <-> note events: MT3's note encoding and decoding state machines, on one immutable note type.

Ported (rewritten, no note_seq / NoteSequence proto) from Magenta MT3 `mt3/note_sequences.py`:
encoding `trim_overlapping_notes`, `note_sequence_to_onsets_and_offsets_and_programs`, `NoteEncodingState`,
`note_event_data_to_events`, `note_encoding_state_to_events`; decoding `NoteDecodingState`, `decode_note_event`,
`begin_tied_pitches_section`, `flush_note_decoding_state`, `assign_instruments`.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from .event_codec_mt3 import Codec, Event, bin_to_velocity, num_velocity_bins_from_codec, velocity_to_bin

DEFAULT_VELOCITY = 100
DEFAULT_NOTE_DURATION = 0.01
DEFAULT_MIN_NOTE_DURATION = 0.01
DEFAULT_DRUM_INSTRUMENT = 9


class MT3Note(NamedTuple):
    """A note; times in seconds. Drums are onset-only in MT3: their `end` is `start` + a fixed duration."""

    program: int
    is_drum: bool
    pitch: int
    velocity: int
    start: float
    end: float


def as_note(note: Any) -> MT3Note:
    """An `MT3Note` of plain Python values from an MT3Note, a sequence of its six fields in order (a row of a numeric
    array too: whole floats are taken as integers), or a dict with them (a note record as the pipeline and
    `notes_to_json` give them; its other keys, such as `instrument`, are not read)."""
    if isinstance(note, Mapping):
        missing = [field for field in MT3Note._fields if field not in note]
        if missing:
            raise ValueError(f"Expected a note dict with the keys {', '.join(MT3Note._fields)}; missing {', '.join(missing)}")
        note = [note[field] for field in MT3Note._fields]
    try:
        length = None if isinstance(note, (str, bytes)) else len(note)
    except TypeError:  # no length, or a 0-d array
        length = None
    if length != len(MT3Note._fields):
        raise ValueError(
            f"Expected a note as MT3Note, a ({', '.join(MT3Note._fields)}) tuple or a dict with those keys; found "
            f"{type(note).__name__}" + (f" of {length} items" if length is not None else "")
        )
    values, wrong = [], []
    for field, value in zip(MT3Note._fields, note):
        try:
            values.append(_note_field(field, value))
        except (TypeError, ValueError):
            wrong.append(f"{field}={value!r:.40}")
    if wrong:
        raise ValueError(f"Expected whole numbers for program, pitch and velocity, True/False or 0/1 for is_drum and "
                         f"times in seconds; found {', '.join(wrong)}")
    return MT3Note(*values)


def _note_field(field: str, value: Any) -> int | bool | float:
    """One field as a plain Python value; TypeError / ValueError if it is not one."""
    if isinstance(value, (str, bytes)) or getattr(value, "ndim", 0) != 0:
        raise TypeError(field)
    if field == "is_drum":
        if value not in (0, 1):
            raise ValueError(field)
        return bool(value)
    number = float(value)
    if field in ("start", "end"):
        return number
    if isinstance(value, bool) or not number.is_integer():
        raise ValueError(field)
    return int(number)


def sort_notes(notes: Sequence[MT3Note]) -> list[MT3Note]:
    """Sorted by (start, pitch, program) (stable, so ties keep decoding order)."""
    return sorted(notes, key=lambda n: (n.start, n.pitch, n.program))


def assign_instruments(notes: Sequence[MT3Note], drum_instrument: int = DEFAULT_DRUM_INSTRUMENT) -> list[int]:
    """MT3 `note_sequences.assign_instruments`, returning the instrument of each note instead of writing it: ids by
    first appearance of each non-drum program, skipping the drum instrument; drums get `drum_instrument`."""
    program_instruments: dict[int, int] = {}
    instruments = []
    for note in notes:
        if note.is_drum:
            instruments.append(drum_instrument)
            continue
        if note.program not in program_instruments:
            count = len(program_instruments)
            program_instruments[note.program] = count if count < drum_instrument else count + 1
        instruments.append(program_instruments[note.program])
    return instruments


# ----------------------------------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------------------------------


class NoteEventData(NamedTuple):
    """MT3 `note_sequences.NoteEventData` for onsets/offsets with programs (velocity 0 = offset)."""

    pitch: int
    velocity: int
    program: int
    is_drum: bool


def trim_overlapping_notes(notes: Sequence[MT3Note]) -> list[MT3Note]:
    """MT3 `trim_overlapping_notes` (applied to training data: the events cannot express two overlapping notes of
    one pitch and program): a note ends where the next one of its (pitch, program, is_drum) starts; notes left
    with no length are dropped. Order is kept."""
    ends = [note.end for note in notes]
    channels: dict[tuple[int, int, bool], list[int]] = {}
    for index, note in enumerate(notes):
        channels.setdefault((note.pitch, note.program, note.is_drum), []).append(index)
    for indices in channels.values():
        indices.sort(key=lambda i: notes[i].start)
        for previous, following in zip(indices, indices[1:]):
            ends[previous] = min(ends[previous], notes[following].start)
    return [note._replace(end=end) for note, end in zip(notes, ends) if note.start < end]


def note_sequence_to_onsets_and_offsets_and_programs(
    notes: Sequence[MT3Note],
) -> tuple[list[float], list[NoteEventData]]:
    """Times and values of every offset (non-drum notes only) and onset, not yet sorted by time.

    Notes are ordered by (is_drum, program, pitch) and offsets come before onsets, so that the later stable sort
    by time puts an offset before an onset at the same time.
    """
    notes = sorted(notes, key=lambda n: (n.is_drum, n.program, n.pitch))
    times = [n.end for n in notes if not n.is_drum] + [n.start for n in notes]
    values = [NoteEventData(n.pitch, 0, n.program, False) for n in notes if not n.is_drum] + [
        NoteEventData(n.pitch, n.velocity, n.program, n.is_drum) for n in notes
    ]
    return times, values


@dataclasses.dataclass
class NoteEncodingState:
    """MT3 `note_sequences.NoteEncodingState`: velocity bin of every (pitch, program) seen (0 once it ended)."""

    active_pitches: dict[tuple[int, int], int] = dataclasses.field(default_factory=dict)


def note_event_data_to_events(state: NoteEncodingState, value: NoteEventData, num_velocity_bins: int) -> list[Event]:
    """MT3 `note_event_data_to_events` (programs and velocities): drums are velocity + drum, other notes
    program + velocity + pitch (velocity bin 0 = offset), recorded in `state` for the tie section."""
    velocity_bin = velocity_to_bin(value.velocity, num_velocity_bins)
    if value.is_drum:
        return [Event("velocity", velocity_bin), Event("drum", value.pitch)]
    state.active_pitches[(value.pitch, value.program)] = velocity_bin
    return [Event("program", value.program), Event("velocity", velocity_bin), Event("pitch", value.pitch)]


def note_encoding_state_to_events(state: NoteEncodingState) -> list[Event]:
    """MT3 `note_encoding_state_to_events`: program + pitch of every active note by (program, pitch), then tie."""
    events = []
    for pitch, program in sorted(state.active_pitches, key=lambda key: key[::-1]):
        if state.active_pitches[(pitch, program)]:
            events += [Event("program", program), Event("pitch", pitch)]
    events.append(Event("tie", 0))
    return events


# ----------------------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class NoteDecodingState:
    """MT3 `note_sequences.NoteDecodingState`, with a plain list of notes in place of the NoteSequence proto."""

    current_time: float = 0.0
    # velocity to apply to subsequent pitch events (zero for note-off)
    current_velocity: int = DEFAULT_VELOCITY
    # program to apply to subsequent pitch events
    current_program: int = 0
    # onset time and velocity for active (pitch, program)
    active_pitches: dict[tuple[int, int], tuple[float, int]] = dataclasses.field(default_factory=dict)
    # (pitch, program) continued from the previous segment
    tied_pitches: set[tuple[int, int]] = dataclasses.field(default_factory=set)
    # whether we are in the tie section at the beginning of a segment
    is_tie_section: bool = False
    # decoded notes in the order the original adds them to its NoteSequence
    notes: list[MT3Note] = dataclasses.field(default_factory=list)
    # fixed length of drum notes (note_sequences.DEFAULT_NOTE_DURATION)
    note_duration: float = DEFAULT_NOTE_DURATION
    # minimum note length enforced when adding notes (note_sequences.MIN_NOTE_DURATION)
    min_note_duration: float = DEFAULT_MIN_NOTE_DURATION

    def add_note(
        self, start: float, end: float, pitch: int, velocity: int, program: int = 0, is_drum: bool = False
    ) -> None:
        """`note_sequences._add_note_to_sequence`: enforce the minimum duration and append."""
        end = max(end, start + self.min_note_duration)
        self.notes.append(MT3Note(int(program), bool(is_drum), int(pitch), int(velocity), start, end))

    def end_note(self, key: tuple[int, int], end: float) -> None:
        """End the active note of (pitch, program) at `end`."""
        onset_time, onset_velocity = self.active_pitches.pop(key)
        self.add_note(onset_time, end, key[0], onset_velocity, key[1])


def decode_note_event(state: NoteDecodingState, time: float, event: Event, codec: Codec) -> None:
    """MT3 `note_sequences.decode_note_event`: apply one event at `time`; ValueError marks it invalid.

    As in the original, `current_time` is updated before validity checks, so an invalid event still moves it.
    """
    if time < state.current_time:
        raise ValueError(f"event time < current time, {time} < {state.current_time}")
    state.current_time = time
    if event.type == "pitch":
        key = (event.value, state.current_program)
        if state.is_tie_section:
            # "tied" pitch
            if key not in state.active_pitches:
                raise ValueError(f"inactive pitch/program in tie section: {key}")
            if key in state.tied_pitches:
                raise ValueError(f"pitch/program is already tied: {key}")
            state.tied_pitches.add(key)
        elif state.current_velocity == 0:
            # note offset
            if key not in state.active_pitches:
                raise ValueError(f"note-off for inactive pitch/program: {key}")
            state.end_note(key, time)
        else:
            # note onset; an already active pitch is ended first
            if key in state.active_pitches:
                state.end_note(key, time)
            state.active_pitches[key] = (time, state.current_velocity)
    elif event.type == "drum":
        # drum onset (drums have no offset)
        if state.current_velocity == 0:
            raise ValueError("velocity cannot be zero for drum event")
        state.add_note(time, time + state.note_duration, event.value, state.current_velocity, is_drum=True)
    elif event.type == "velocity":
        state.current_velocity = bin_to_velocity(event.value, num_velocity_bins_from_codec(codec))
    elif event.type == "program":
        state.current_program = event.value
    elif event.type == "tie":
        # end of tie section; end active notes that were not declared tied
        if not state.is_tie_section:
            raise ValueError("tie section end event when not in tie section")
        for key in list(state.active_pitches):
            if key not in state.tied_pitches:
                state.end_note(key, state.current_time)
        state.is_tie_section = False
    else:
        raise ValueError(f"unexpected event type: {event.type}")


def begin_tied_pitches_section(state: NoteDecodingState) -> None:
    """MT3 `note_sequences.begin_tied_pitches_section` (segment start with ties)."""
    state.tied_pitches = set()
    state.is_tie_section = True


def flush_note_decoding_state(state: NoteDecodingState) -> list[MT3Note]:
    """MT3 `note_sequences.flush_note_decoding_state`: end all active notes at the latest time."""
    for onset_time, _ in state.active_pitches.values():
        state.current_time = max(state.current_time, onset_time + state.min_note_duration)
    for key in list(state.active_pitches):
        state.end_note(key, state.current_time)
    return state.notes


__all__ = [
    "MT3Note",
    "NoteDecodingState",
    "NoteEncodingState",
    "NoteEventData",
    "as_note",
    "assign_instruments",
    "begin_tied_pitches_section",
    "decode_note_event",
    "flush_note_decoding_state",
    "note_encoding_state_to_events",
    "note_event_data_to_events",
    "note_sequence_to_onsets_and_offsets_and_programs",
    "sort_notes",
    "trim_overlapping_notes",
]
