"""MT3 event vocabulary, token -> note decoding and MIDI writing, with the `MT3Tokenizer` built on them.

Ported (rewritten, no TensorFlow / note_seq) from Magenta MT3 (github.com/magenta/mt3):
- `mt3/event_codec.py`: `EventRange`, `Event`, `Codec`;
- `mt3/vocabularies.py`: `build_codec`, `GenericTokenVocabulary` (3 special ids + extra ids), `decode_tf`,
  `bin_to_velocity`, `velocity_to_bin`, `num_embeddings`;
- `mt3/run_length_encoding.py`: `decode_events`;
- `mt3/note_sequences.py`: `NoteDecodingState`, `decode_note_event`, `begin_tied_pitches_section`,
  `flush_note_decoding_state`, `assign_instruments` (`NoteEncodingSpec` / `NoteEncodingWithTiesSpec` decoding);
- `mt3/metrics_utils.py`: `decode_and_combine_predictions`, `event_predictions_to_ns`;
- `colab/music_transcription_with_transformers.ipynb`: `_trim_eos` and the start-time rounding of `postprocess`;
- note_seq `midi_io.note_sequence_to_pretty_midi` for the MIDI file layout.
"""

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
from transformers.feature_extraction_utils import BatchFeature
from transformers.tokenization_python import BatchEncoding, PreTrainedTokenizer

# MIDI value range (MIDI standard; note_seq MIN/MAX_MIDI_PITCH, MIN/MAX_MIDI_PROGRAM, MAX_MIDI_VELOCITY).
MIDI_MIN_VALUE = 0
MIDI_MAX_VALUE = 127

# Markers produced by `decode_model_ids` (MT3 vocabularies.DECODED_EOS_ID / DECODED_INVALID_ID).
DECODED_EOS_ID = -1
DECODED_INVALID_ID = -2

DEFAULT_STEPS_PER_SECOND = 100
DEFAULT_MAX_SHIFT_SECONDS = 10
DEFAULT_NUM_VELOCITY_BINS = 1
DEFAULT_NUM_EXTRA_IDS = 100
DEFAULT_VOCAB_SIZE_MULTIPLE = 128
DEFAULT_VELOCITY = 100
DEFAULT_NOTE_DURATION = 0.01
DEFAULT_MIN_NOTE_DURATION = 0.01
DEFAULT_MIDI_TICKS_PER_QUARTER = 220
DEFAULT_MIDI_QPM = 120.0
DEFAULT_DRUM_INSTRUMENT = 9


# ----------------------------------------------------------------------------------------------------------------------
# Event codec (mt3/event_codec.py)
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EventRange:
    """A named block of consecutive event values [min_value, max_value] (MT3 `event_codec.EventRange`)."""

    type: str
    min_value: int
    max_value: int


@dataclasses.dataclass
class Event:
    """One event, e.g. Event("pitch", 60) (MT3 `event_codec.Event`)."""

    type: str
    value: int


class Codec:
    """Maps events to contiguous indices and back (MT3 `event_codec.Codec`).

    The 'shift' range always comes first and starts at index 0, so that shifts can be recognised by index alone.
    """

    def __init__(self, max_shift_steps: int, steps_per_second: float, event_ranges: list[EventRange]):
        self.steps_per_second = steps_per_second
        self._shift_range = EventRange(type="shift", min_value=0, max_value=max_shift_steps)
        self._event_ranges = [self._shift_range] + list(event_ranges)
        names = [er.type for er in self._event_ranges]
        if len(names) != len(set(names)):
            raise ValueError(f"Expected unique event type names; found {names}.")

    @property
    def event_ranges(self) -> list[EventRange]:
        return list(self._event_ranges)

    @property
    def num_classes(self) -> int:
        return sum(er.max_value - er.min_value + 1 for er in self._event_ranges)

    def is_shift_event_index(self, index: int) -> bool:
        return self._shift_range.min_value <= index <= self._shift_range.max_value

    @property
    def max_shift_steps(self) -> int:
        return self._shift_range.max_value

    def encode_event(self, event: Event) -> int:
        """Event -> index; ValueError for an unknown type or an out-of-range value."""
        offset = 0
        for er in self._event_ranges:
            if event.type == er.type:
                if not er.min_value <= event.value <= er.max_value:
                    raise ValueError(
                        f"Event value {event.value} is not within valid range "
                        f"[{er.min_value}, {er.max_value}] for type {event.type}"
                    )
                return offset + event.value - er.min_value
            offset += er.max_value - er.min_value + 1
        raise ValueError(f"Unknown event type: {event.type}")

    def event_type_range(self, event_type: str) -> tuple[int, int]:
        """[min_index, max_index] of an event type."""
        offset = 0
        for er in self._event_ranges:
            if event_type == er.type:
                return offset, offset + (er.max_value - er.min_value)
            offset += er.max_value - er.min_value + 1
        raise ValueError(f"Unknown event type: {event_type}")

    def decode_event_index(self, index: int) -> Event:
        """Index -> Event; ValueError if the index is outside every range (e.g. negative markers)."""
        offset = 0
        for er in self._event_ranges:
            if offset <= index <= offset + er.max_value - er.min_value:
                return Event(type=er.type, value=er.min_value + index - offset)
            offset += er.max_value - er.min_value + 1
        raise ValueError(f"Unknown event index: {index}")


# ----------------------------------------------------------------------------------------------------------------------
# Vocabulary (mt3/vocabularies.py)
# ----------------------------------------------------------------------------------------------------------------------


def build_codec(steps_per_second: int, max_shift_seconds: int, num_velocity_bins: int) -> Codec:
    """MT3 `vocabularies.build_codec`: shift, pitch, velocity (bin 0 = note-off), tie, program, drum.

    The original always includes the tie, program and drum ranges, whatever the model (the piano-only ismir2021
    model simply never emits them); only `num_velocity_bins` and the shift settings change the layout.
    """
    event_ranges = [
        EventRange("pitch", MIDI_MIN_VALUE, MIDI_MAX_VALUE),
        EventRange("velocity", 0, num_velocity_bins),
        EventRange("tie", 0, 0),
        EventRange("program", MIDI_MIN_VALUE, MIDI_MAX_VALUE),
        EventRange("drum", MIDI_MIN_VALUE, MIDI_MAX_VALUE),
    ]
    return Codec(
        max_shift_steps=steps_per_second * max_shift_seconds,
        steps_per_second=steps_per_second,
        event_ranges=event_ranges,
    )


def num_velocity_bins_from_codec(codec: Codec) -> int:
    lo, hi = codec.event_type_range("velocity")
    return hi - lo


def velocity_to_bin(velocity: int, num_velocity_bins: int) -> int:
    """MIDI velocity -> bin (0 stays 0 = note-off)."""
    if velocity == 0:
        return 0
    return math.ceil(num_velocity_bins * velocity / MIDI_MAX_VALUE)


def bin_to_velocity(velocity_bin: int, num_velocity_bins: int) -> int:
    """Bin -> MIDI velocity (1 bin: 127)."""
    if velocity_bin == 0:
        return 0
    return int(MIDI_MAX_VALUE * velocity_bin / num_velocity_bins)


def decode_model_ids(ids: Sequence[int], num_regular_ids: int, num_special_ids: int, eos_id: int) -> np.ndarray:
    """MT3 `GenericTokenVocabulary.decode_tf`: model ids -> codec ids.

    EOS and everything after it -> DECODED_EOS_ID; special ids and extra/padding ids -> DECODED_INVALID_ID;
    others -> id - num_special_ids.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)  # (length,)
    eos_and_after = np.cumsum(ids == eos_id) > 0
    valid = (ids >= num_special_ids) & (ids < num_special_ids + num_regular_ids)
    decoded = np.where(valid, ids - num_special_ids, DECODED_INVALID_ID)
    return np.where(eos_and_after, DECODED_EOS_ID, decoded).astype(np.int32)


def trim_eos(codec_ids: Sequence[int]) -> np.ndarray:
    """Colab `_trim_eos`: drop the first DECODED_EOS_ID and everything after it."""
    tokens = np.asarray(codec_ids, dtype=np.int32).reshape(-1)
    if DECODED_EOS_ID in tokens:
        tokens = tokens[: np.argmax(tokens == DECODED_EOS_ID)]
    return tokens


def round_down_start_time(start_time: float, steps_per_second: float) -> float:
    """Colab `postprocess`: round a segment start down to the shift grid, with the original float arithmetic."""
    start_time = float(start_time)
    start_time -= start_time % (1 / steps_per_second)
    return start_time


# ----------------------------------------------------------------------------------------------------------------------
# Note decoding (mt3/note_sequences.py, mt3/run_length_encoding.py, mt3/metrics_utils.py)
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DecodedNote:
    """A note as stored in the decoded NoteSequence (mutable: `assign_instruments` fills `instrument`)."""

    start_time: float
    end_time: float
    pitch: int
    velocity: int
    program: int = 0
    is_drum: bool = False
    instrument: int = 0


class MT3Note(NamedTuple):
    """A transcribed note; times in seconds."""

    program: int
    is_drum: bool
    pitch: int
    velocity: int
    start: float
    end: float


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
    notes: list[DecodedNote] = dataclasses.field(default_factory=list)
    total_time: float = 0.0
    # fixed length of drum notes (note_sequences.DEFAULT_NOTE_DURATION)
    note_duration: float = DEFAULT_NOTE_DURATION
    # minimum note length enforced when adding notes (note_sequences.MIN_NOTE_DURATION)
    min_note_duration: float = DEFAULT_MIN_NOTE_DURATION


def _add_note(
    state: NoteDecodingState,
    start_time: float,
    end_time: float,
    pitch: int,
    velocity: int,
    program: int = 0,
    is_drum: bool = False,
) -> None:
    """`note_sequences._add_note_to_sequence`: enforce the minimum duration and append."""
    end_time = max(end_time, start_time + state.min_note_duration)
    state.notes.append(
        DecodedNote(
            start_time=start_time,
            end_time=end_time,
            pitch=int(pitch),
            velocity=int(velocity),
            program=int(program),
            is_drum=bool(is_drum),
        )
    )
    state.total_time = max(state.total_time, end_time)


def decode_note_event(state: NoteDecodingState, time: float, event: Event, codec: Codec) -> None:
    """MT3 `note_sequences.decode_note_event`: apply one event at `time`; ValueError marks it invalid.

    As in the original, `current_time` is updated before validity checks, so an invalid event still moves it.
    """
    if time < state.current_time:
        raise ValueError(f"event time < current time, {time} < {state.current_time}")
    state.current_time = time
    if event.type == "pitch":
        pitch = event.value
        key = (pitch, state.current_program)
        if state.is_tie_section:
            # "tied" pitch
            if key not in state.active_pitches:
                raise ValueError(f"inactive pitch/program in tie section: {pitch}/{state.current_program}")
            if key in state.tied_pitches:
                raise ValueError(f"pitch/program is already tied: {pitch}/{state.current_program}")
            state.tied_pitches.add(key)
        elif state.current_velocity == 0:
            # note offset
            if key not in state.active_pitches:
                raise ValueError(f"note-off for inactive pitch/program: {pitch}/{state.current_program}")
            onset_time, onset_velocity = state.active_pitches.pop(key)
            _add_note(state, onset_time, time, pitch, onset_velocity, state.current_program)
        else:
            # note onset; an already active pitch is ended first
            if key in state.active_pitches:
                onset_time, onset_velocity = state.active_pitches.pop(key)
                _add_note(state, onset_time, time, pitch, onset_velocity, state.current_program)
            state.active_pitches[key] = (time, state.current_velocity)
    elif event.type == "drum":
        # drum onset (drums have no offset)
        if state.current_velocity == 0:
            raise ValueError("velocity cannot be zero for drum event")
        _add_note(state, time, time + state.note_duration, event.value, state.current_velocity, is_drum=True)
    elif event.type == "velocity":
        state.current_velocity = bin_to_velocity(event.value, num_velocity_bins_from_codec(codec))
    elif event.type == "program":
        state.current_program = event.value
    elif event.type == "tie":
        # end of tie section; end active notes that were not declared tied
        if not state.is_tie_section:
            raise ValueError("tie section end event when not in tie section")
        for pitch, program in list(state.active_pitches.keys()):
            if (pitch, program) not in state.tied_pitches:
                onset_time, onset_velocity = state.active_pitches.pop((pitch, program))
                _add_note(state, onset_time, state.current_time, pitch, onset_velocity, program)
        state.is_tie_section = False
    else:
        raise ValueError(f"unexpected event type: {event.type}")


def begin_tied_pitches_section(state: NoteDecodingState) -> None:
    """MT3 `note_sequences.begin_tied_pitches_section` (segment start with ties)."""
    state.tied_pitches = set()
    state.is_tie_section = True


def assign_instruments(notes: list[DecodedNote], drum_instrument: int = DEFAULT_DRUM_INSTRUMENT) -> None:
    """MT3 `note_sequences.assign_instruments`: instrument ids by first appearance of each program, skipping the
    drum instrument; drums get `drum_instrument`. Modifies `notes` in place."""
    program_instruments: dict[int, int] = {}
    for note in notes:
        if note.program not in program_instruments and not note.is_drum:
            num_instruments = len(program_instruments)
            note.instrument = num_instruments if num_instruments < drum_instrument else num_instruments + 1
            program_instruments[note.program] = note.instrument
        elif note.is_drum:
            note.instrument = drum_instrument
        else:
            note.instrument = program_instruments[note.program]


def flush_note_decoding_state(state: NoteDecodingState) -> list[DecodedNote]:
    """MT3 `note_sequences.flush_note_decoding_state`: end all active notes at the latest time, then assign
    instruments."""
    for onset_time, _ in state.active_pitches.values():
        state.current_time = max(state.current_time, onset_time + state.min_note_duration)
    for pitch, program in list(state.active_pitches.keys()):
        onset_time, onset_velocity = state.active_pitches.pop((pitch, program))
        _add_note(state, onset_time, state.current_time, pitch, onset_velocity, program)
    assign_instruments(state.notes)
    return state.notes


def decode_events(
    state: Any,
    tokens: Sequence[int],
    start_time: float,
    max_time: float | None,
    codec: Codec,
    decode_event_fn: Callable[[Any, float, Event, Codec], None],
) -> tuple[int, int]:
    """MT3 `run_length_encoding.decode_events`: decode one segment's codec ids into `state`.

    Shifts are absolute within the segment (the step counter restarts after every non-shift event). Returns
    (invalid_events, dropped_events): undecodable ids or events rejected by `decode_event_fn`, and the tokens from
    the first shift past `max_time` on.
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
                decode_event_fn(state, cur_time, event, codec)
            except ValueError:
                invalid_events += 1
                continue
    return invalid_events, dropped_events


def decode_and_combine_predictions(
    predictions: Sequence[dict[str, Any]],
    init_state_fn: Callable[[], Any],
    begin_segment_fn: Callable[[Any], None],
    decode_tokens_fn: Callable[[Any, Sequence[int], float, float | None], tuple[int, int]],
    flush_state_fn: Callable[[Any], Any],
) -> tuple[Any, int, int]:
    """MT3 `metrics_utils.decode_and_combine_predictions`: decode segments in start-time order with one shared
    state; each segment may not decode past the next segment's start."""
    sorted_predictions = sorted(predictions, key=lambda pred: pred["start_time"])
    state = init_state_fn()
    total_invalid_events = 0
    total_dropped_events = 0
    for pred_idx, pred in enumerate(sorted_predictions):
        begin_segment_fn(state)
        max_decode_time = None
        if pred_idx < len(sorted_predictions) - 1:
            max_decode_time = sorted_predictions[pred_idx + 1]["start_time"]
        invalid_events, dropped_events = decode_tokens_fn(
            state, pred["est_tokens"], pred["start_time"], max_decode_time
        )
        total_invalid_events += invalid_events
        total_dropped_events += dropped_events
    return flush_state_fn(state), total_invalid_events, total_dropped_events


def event_predictions_to_notes(
    predictions: Sequence[dict[str, Any]],
    codec: Codec,
    use_ties: bool = True,
    default_velocity: int = DEFAULT_VELOCITY,
    note_duration: float = DEFAULT_NOTE_DURATION,
    min_note_duration: float = DEFAULT_MIN_NOTE_DURATION,
) -> tuple[list[DecodedNote], int, int]:
    """MT3 `metrics_utils.event_predictions_to_ns` with `NoteEncodingWithTiesSpec` (use_ties=True) or
    `NoteEncodingSpec` (use_ties=False). `predictions`: [{"est_tokens": codec ids, "start_time": seconds}].

    Returns (notes in the original NoteSequence order, invalid event count, dropped event count).
    """

    def init_state() -> NoteDecodingState:
        return NoteDecodingState(
            current_velocity=default_velocity, note_duration=note_duration, min_note_duration=min_note_duration
        )

    def decode_tokens(state, tokens, start_time, max_time):
        return decode_events(state, tokens, start_time, max_time, codec, decode_note_event)

    return decode_and_combine_predictions(
        predictions=predictions,
        init_state_fn=init_state,
        begin_segment_fn=begin_tied_pitches_section if use_ties else (lambda state: None),
        decode_tokens_fn=decode_tokens,
        flush_state_fn=flush_note_decoding_state,
    )


def sort_notes(notes: Sequence[DecodedNote | MT3Note]) -> list[MT3Note]:
    """Public records sorted by (start, pitch, program) (stable, so ties keep decoding order)."""
    records = [
        n
        if isinstance(n, MT3Note)
        else MT3Note(n.program, n.is_drum, n.pitch, n.velocity, float(n.start_time), float(n.end_time))
        for n in notes
    ]
    return sorted(records, key=lambda n: (n.start, n.pitch, n.program))


def notes_to_pretty_midi(
    notes: Sequence[DecodedNote | MT3Note],
    ticks_per_quarter: int = DEFAULT_MIDI_TICKS_PER_QUARTER,
    qpm: float = DEFAULT_MIDI_QPM,
    drum_instrument: int = DEFAULT_DRUM_INSTRUMENT,
):
    """NoteSequence-free version of note_seq `note_sequence_to_pretty_midi` for decoded notes.

    One `pretty_midi.Instrument` per (instrument id, program, is_drum) in sorted order, instrument ids assigned
    like `assign_instruments` from the order of `notes`; drums have is_drum=True (written on the drum channel).
    The first (instrument 0) track always exists and is unnamed, the others are named, as in note_seq. Notes are written as they are (no length
    changes: drums already last `note_duration`, zero-length notes cannot occur after `min_note_duration`).
    """
    try:
        import pretty_midi
    except ImportError as error:
        raise ImportError("Writing MIDI needs pretty_midi: pip install pretty_midi") from error

    decoded = [
        n
        if isinstance(n, DecodedNote)
        else DecodedNote(n.start, n.end, n.pitch, n.velocity, n.program, bool(n.is_drum))
        for n in notes
    ]
    decoded = [dataclasses.replace(n) for n in decoded]  # do not touch the caller's notes
    assign_instruments(decoded, drum_instrument)

    midi = pretty_midi.PrettyMIDI(resolution=ticks_per_quarter, initial_tempo=qpm)
    first_instrument = pretty_midi.Instrument(0)
    midi.instruments.append(first_instrument)
    grouped: dict[tuple[int, int, bool], list] = {}
    for n in decoded:
        grouped.setdefault((n.instrument, n.program, n.is_drum), []).append(
            pretty_midi.Note(velocity=n.velocity, pitch=n.pitch, start=n.start_time, end=n.end_time)
        )
    for instrument_id, program, is_drum in sorted(grouped):
        if instrument_id > 0:
            # note_seq names every track but the first: "Drums" or the General MIDI program name.
            name = "Drums" if is_drum else pretty_midi.program_to_instrument_name(program)
            instrument = pretty_midi.Instrument(program, is_drum=is_drum, name=name)
            midi.instruments.append(instrument)
        else:
            instrument = first_instrument
            instrument.is_drum = is_drum
        instrument.program = program
        instrument.notes = grouped[(instrument_id, program, is_drum)]
    return midi


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------------


def _to_int_rows(token_ids: Any) -> list[np.ndarray]:
    """Generate() output (tensor / array / nested lists) -> list of 1-D int64 rows."""
    if hasattr(token_ids, "detach"):
        token_ids = token_ids.detach().cpu().numpy()
    if isinstance(token_ids, np.ndarray):
        if token_ids.ndim == 1:
            token_ids = token_ids[None]
        if token_ids.ndim != 2:
            raise ValueError(f"Expected token ids of shape (num_segments, length); found shape {token_ids.shape}.")
        return [row.astype(np.int64) for row in token_ids]
    rows = list(token_ids)
    if rows and np.isscalar(rows[0]):
        rows = [rows]
    return [np.asarray(row, dtype=np.int64).reshape(-1) for row in rows]


class MT3Tokenizer(PreTrainedTokenizer):
    r"""
    MT3 event tokenizer. The vocabulary is derived from the codec settings (no vocab file):

    `num_special_tokens` ids (0 PAD, 1 EOS, 2 UNK), then the codec events (shift 0..steps_per_second *
    max_shift_seconds, pitch 0..127, velocity 0..num_velocity_bins, tie, program 0..127, drum 0..127), then
    `num_extra_ids` extra ids, then unused ids up to a multiple of `vocab_size_multiple` (the model's logits).

    Token strings are `<{type}_{value}>` (e.g. `<shift_12>`, `<pitch_60>`, `<tie_0>`), `<pad>`, `</s>`, `<unk>`,
    `<extra_id_{i}>` (T5 order: extra_id_0 is the highest extra id) and `<unused_{i}>`.

    Decoding model outputs to notes ([`~MT3Tokenizer.batch_decode`] with `feature_extractor_output`) follows MT3's
    `event_predictions_to_ns` exactly, with ties (`use_ties=True`, the multi-instrument model) or without
    (`use_ties=False`, the ismir2021 piano model).

    Args:
        steps_per_second (`int`, *optional*, defaults to 100): time resolution of shift events.
        max_shift_seconds (`int`, *optional*, defaults to 10): longest shift.
        num_velocity_bins (`int`, *optional*, defaults to 1): velocity bins (1 for mt3, 127 for ismir2021).
        num_extra_ids (`int`, *optional*, defaults to 100): T5 extra ids after the regular ids.
        vocab_size_multiple (`int`, *optional*, defaults to 128): embedding rows are padded to a multiple of this.
        use_ties (`bool`, *optional*, defaults to `True`): each segment starts with a tie section.
        default_velocity (`int`, *optional*, defaults to 100): velocity before any velocity event.
        note_duration (`float`, *optional*, defaults to 0.01): length of drum notes, seconds.
        min_note_duration (`float`, *optional*, defaults to 0.01): minimum note length, seconds.
        midi_ticks_per_quarter (`int`, *optional*, defaults to 220): resolution of written MIDI.
        midi_qpm (`float`, *optional*, defaults to 120.0): tempo of written MIDI.
        decoder_start_token_id (`int`, *optional*, defaults to 0): first token of every generate() row.
    """

    model_input_names = ["input_ids", "attention_mask"]
    vocab_files_names: dict[str, str] = {}

    def __init__(
        self,
        steps_per_second: int = DEFAULT_STEPS_PER_SECOND,
        max_shift_seconds: int = DEFAULT_MAX_SHIFT_SECONDS,
        num_velocity_bins: int = DEFAULT_NUM_VELOCITY_BINS,
        num_extra_ids: int = DEFAULT_NUM_EXTRA_IDS,
        vocab_size_multiple: int = DEFAULT_VOCAB_SIZE_MULTIPLE,
        use_ties: bool = True,
        default_velocity: int = DEFAULT_VELOCITY,
        note_duration: float = DEFAULT_NOTE_DURATION,
        min_note_duration: float = DEFAULT_MIN_NOTE_DURATION,
        midi_ticks_per_quarter: int = DEFAULT_MIDI_TICKS_PER_QUARTER,
        midi_qpm: float = DEFAULT_MIDI_QPM,
        decoder_start_token_id: int = 0,
        pad_token: str = "<pad>",
        eos_token: str = "</s>",
        unk_token: str = "<unk>",
        **kwargs,
    ):
        if num_velocity_bins < 1:
            raise ValueError(f"Expected num_velocity_bins >= 1; found {num_velocity_bins}.")
        if steps_per_second < 1 or max_shift_seconds < 1:
            raise ValueError(
                f"Expected steps_per_second >= 1 and max_shift_seconds >= 1; found {steps_per_second}, "
                f"{max_shift_seconds}."
            )
        self.steps_per_second = steps_per_second
        self.max_shift_seconds = max_shift_seconds
        self.num_velocity_bins = num_velocity_bins
        self.num_extra_ids = num_extra_ids
        self.vocab_size_multiple = vocab_size_multiple
        self.use_ties = use_ties
        self.default_velocity = default_velocity
        self.note_duration = note_duration
        self.min_note_duration = min_note_duration
        self.midi_ticks_per_quarter = midi_ticks_per_quarter
        self.midi_qpm = midi_qpm
        self.decoder_start_token_id = decoder_start_token_id
        self.codec = build_codec(steps_per_second, max_shift_seconds, num_velocity_bins)
        # GenericTokenVocabulary: the special ids come first, in this order.
        self._special_token_strings = [str(pad_token), str(eos_token), str(unk_token)]
        self._vocab = self._build_vocab()
        self._ids_to_tokens = {index: token for token, index in self._vocab.items()}
        super().__init__(
            pad_token=pad_token,
            eos_token=eos_token,
            unk_token=unk_token,
            steps_per_second=steps_per_second,
            max_shift_seconds=max_shift_seconds,
            num_velocity_bins=num_velocity_bins,
            num_extra_ids=num_extra_ids,
            vocab_size_multiple=vocab_size_multiple,
            use_ties=use_ties,
            default_velocity=default_velocity,
            note_duration=note_duration,
            min_note_duration=min_note_duration,
            midi_ticks_per_quarter=midi_ticks_per_quarter,
            midi_qpm=midi_qpm,
            decoder_start_token_id=decoder_start_token_id,
            **kwargs,
        )

    # -- vocabulary layout ---------------------------------------------------------------------------------------

    @property
    def num_special_tokens(self) -> int:
        """PAD, EOS, UNK (GenericTokenVocabulary._num_special_tokens)."""
        return len(self._special_token_strings)

    @property
    def num_regular_tokens(self) -> int:
        """Codec events (GenericTokenVocabulary._num_regular_tokens)."""
        return self.codec.num_classes

    @property
    def base_vocab_size(self) -> int:
        """Special + regular ids; ids at or above this decode as invalid."""
        return self.num_special_tokens + self.num_regular_tokens

    @property
    def vocab_size(self) -> int:
        """Rows of the model's embedding / logits: (base + extra ids) rounded up (vocabularies.num_embeddings)."""
        size = self.base_vocab_size + self.num_extra_ids
        return self.vocab_size_multiple * math.ceil(size / self.vocab_size_multiple)

    def _build_vocab(self) -> dict[str, int]:
        vocab = {token: index for index, token in enumerate(self._special_token_strings)}
        for er in self.codec.event_ranges:
            for value in range(er.min_value, er.max_value + 1):
                vocab[f"<{er.type}_{value}>"] = self.num_special_tokens + self.codec.encode_event(Event(er.type, value))
        top = self.base_vocab_size + self.num_extra_ids
        for i in range(self.num_extra_ids):
            vocab[f"<extra_id_{i}>"] = top - 1 - i
        for index in range(top, self.vocab_size):
            vocab[f"<unused_{index - top}>"] = index
        assert len(vocab) == self.vocab_size, "vocabulary layout has holes or duplicates"
        return vocab

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        """Token strings are whitespace separated, e.g. "<program_0> <pitch_60>"."""
        return text.split()

    def _convert_token_to_id(self, token: str) -> int:
        return self._vocab.get(token, self._vocab[self._special_token_strings[2]])

    def _convert_id_to_token(self, index: int) -> str:
        return self._ids_to_tokens.get(int(index), self._special_token_strings[2])

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return " ".join(tokens)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        """Nothing to write: the vocabulary derives from the settings in tokenizer_config.json."""
        return ()

    # -- events <-> model ids ----------------------------------------------------------------------------------

    def event_to_id(self, event: Event) -> int:
        """Event -> model id (codec index + number of special ids)."""
        return self.codec.encode_event(event) + self.num_special_tokens

    def id_to_event(self, token_id: int) -> Event | None:
        """Model id -> Event, or None for special / extra / unused ids."""
        codec_ids = decode_model_ids([token_id], self.num_regular_tokens, self.num_special_tokens, eos_id=-1)
        return None if codec_ids[0] < 0 else self.codec.decode_event_index(int(codec_ids[0]))

    def model_ids_to_codec_ids(self, token_ids: Sequence[int]) -> np.ndarray:
        """One generated row (without the decoder start token) -> codec ids cut before EOS (decode_tf + _trim_eos)."""
        decoded = decode_model_ids(token_ids, self.num_regular_tokens, self.num_special_tokens, self.eos_token_id)
        return trim_eos(decoded)

    # -- decoding to notes and MIDI ----------------------------------------------------------------------------

    def decode_to_notes(
        self,
        token_ids: Any,
        segment_start_times: Sequence[float],
        has_decoder_start: bool = True,
    ) -> tuple[list[DecodedNote], int, int]:
        """Generated rows, one per segment, -> (notes in decoding order, invalid events, dropped events).

        `token_ids`: (num_segments, length) model ids as returned by `generate()`; with `has_decoder_start` the
        first column (the decoder start token) is removed. `segment_start_times`: seconds, from the feature
        extractor (`segment_start_times`), rounded down to the shift grid here as the colab does.
        """
        rows = _to_int_rows(token_ids)
        if hasattr(segment_start_times, "detach"):
            segment_start_times = segment_start_times.detach().cpu().numpy()
        start_times = np.asarray(segment_start_times, dtype=np.float64).reshape(-1)
        if len(rows) != len(start_times):
            raise ValueError(
                f"Expected one row of token ids per segment: found {len(rows)} rows for {len(start_times)} "
                "segment start times."
            )
        predictions = []
        for row, start_time in zip(rows, start_times):
            if has_decoder_start:
                if row.size and row[0] != self.decoder_start_token_id:
                    raise ValueError(
                        f"Expected each row to begin with the decoder start token {self.decoder_start_token_id} "
                        f"(generate() output); found {int(row[0])}. Pass has_decoder_start=False for raw tokens."
                    )
                row = row[1:]
            predictions.append(
                {
                    "est_tokens": self.model_ids_to_codec_ids(row),
                    "start_time": round_down_start_time(float(start_time), self.steps_per_second),
                }
            )
        return event_predictions_to_notes(
            predictions,
            self.codec,
            use_ties=self.use_ties,
            default_velocity=self.default_velocity,
            note_duration=self.note_duration,
            min_note_duration=self.min_note_duration,
        )

    def notes_to_midi(self, notes: Sequence[DecodedNote | MT3Note]):
        """Notes -> `pretty_midi.PrettyMIDI` laid out like note_seq's `note_sequence_to_pretty_midi`."""
        return notes_to_pretty_midi(notes, ticks_per_quarter=self.midi_ticks_per_quarter, qpm=self.midi_qpm)

    def batch_decode(
        self,
        token_ids: Any,
        feature_extractor_output: BatchFeature | dict | None = None,
        return_midi: bool = False,
        segment_start_times: Sequence[float] | None = None,
        has_decoder_start: bool = True,
        **kwargs,
    ) -> BatchEncoding | list[str]:
        """Decode the generate() output for the segments of one clip into notes (and MIDI).

        Args:
            token_ids: (num_segments, length) ids from `model.generate()`: decoder start token, events, EOS, padding.
            feature_extractor_output: the [`MT3FeatureExtractor`] output for the same clip (its
                `segment_start_times` are used). Without it and without `segment_start_times`, falls back to
                the usual text decoding of [`PreTrainedTokenizer.batch_decode`].
            return_midi: also return a `pretty_midi.PrettyMIDI` under `"pretty_midi"`.
            segment_start_times: alternative to `feature_extractor_output`.
            has_decoder_start: whether each row starts with the decoder start token (True for generate()).

        Returns:
            [`BatchEncoding`] with `notes` (list of [`MT3Note`] sorted by (start, pitch, program)),
            `invalid_events`, `dropped_events` and, with `return_midi`, `pretty_midi`.
        """
        if feature_extractor_output is None and segment_start_times is None:
            return super().batch_decode(token_ids, **kwargs)
        if segment_start_times is None:
            if "segment_start_times" not in feature_extractor_output:
                raise ValueError(
                    "Expected `feature_extractor_output` to hold `segment_start_times`; found keys "
                    f"{sorted(feature_extractor_output.keys())}."
                )
            segment_start_times = feature_extractor_output["segment_start_times"]
        notes, invalid_events, dropped_events = self.decode_to_notes(
            token_ids, segment_start_times, has_decoder_start=has_decoder_start
        )
        output = {
            "notes": sort_notes(notes),
            "invalid_events": invalid_events,
            "dropped_events": dropped_events,
        }
        if return_midi:
            output["pretty_midi"] = self.notes_to_midi(notes)
        return BatchEncoding(output)


__all__ = [
    "Codec",
    "DecodedNote",
    "Event",
    "EventRange",
    "MT3Note",
    "MT3Tokenizer",
    "NoteDecodingState",
    "assign_instruments",
    "begin_tied_pitches_section",
    "bin_to_velocity",
    "build_codec",
    "decode_and_combine_predictions",
    "decode_events",
    "decode_model_ids",
    "decode_note_event",
    "event_predictions_to_notes",
    "flush_note_decoding_state",
    "notes_to_pretty_midi",
    "round_down_start_time",
    "sort_notes",
    "trim_eos",
    "velocity_to_bin",
]
