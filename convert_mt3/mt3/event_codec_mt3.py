"""MT3's event vocabulary: events <-> codec indices <-> model ids.

Ported (rewritten, no TensorFlow / note_seq) from Magenta MT3 (github.com/magenta/mt3):
- `mt3/event_codec.py`: `EventRange`, `Event`, `Codec`;
- `mt3/vocabularies.py`: `build_codec`, `num_velocity_bins_from_codec`, `velocity_to_bin`, `bin_to_velocity`,
  `PROGRAM_GRANULARITIES`, `GenericTokenVocabulary` (3 special ids + extra ids, `decode_tf`), `num_embeddings`;
- `mt3/tasks.py` / the colab: `trim_eos` and the start-time rounding of `postprocess`.
"""

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

# MIDI value range (MIDI standard; note_seq MIN/MAX_MIDI_PITCH, MIN/MAX_MIDI_PROGRAM, MAX_MIDI_VELOCITY).
MIDI_MIN_VALUE = 0
MIDI_MAX_VALUE = 127

# Markers produced by `decode_model_ids` (MT3 vocabularies.DECODED_EOS_ID / DECODED_INVALID_ID).
DECODED_EOS_ID = -1
DECODED_INVALID_ID = -2

# GenericTokenVocabulary: 0 PAD, 1 EOS, 2 UNK come before the codec ids.
NUM_SPECIAL_TOKENS = 3

DEFAULT_STEPS_PER_SECOND = 100
DEFAULT_MAX_SHIFT_SECONDS = 10
DEFAULT_NUM_VELOCITY_BINS = 1
DEFAULT_NUM_EXTRA_IDS = 100
DEFAULT_VOCAB_SIZE_MULTIPLE = 128

# vocabularies.PROGRAM_GRANULARITIES: how program events are written into the targets.
PROGRAM_GRANULARITIES = ("flat", "midi_class", "full")


@dataclasses.dataclass(frozen=True)
class EventRange:
    """A named block of consecutive event values [min_value, max_value] (MT3 `event_codec.EventRange`)."""

    type: str
    min_value: int
    max_value: int


@dataclasses.dataclass(frozen=True)
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
        self._event_ranges = [EventRange("shift", 0, max_shift_steps), *event_ranges]
        names = [er.type for er in self._event_ranges]
        if len(names) != len(set(names)):
            raise ValueError(f"Expected unique event type names; found {names}.")
        empty = [er.type for er in self._event_ranges if not er.min_value <= er.max_value]
        if empty:
            raise ValueError(f"Expected min_value <= max_value in every event range; found otherwise for {empty}.")
        # every index's event, in index order, and each type's first index: decoding looks up every
        # generated token (~300,000 for an hour of audio) and the velocity range at every velocity event
        self._events = tuple(Event(er.type, value) for er in self._event_ranges
                             for value in range(er.min_value, er.max_value + 1))
        self._ranges: dict[str, tuple[int, EventRange]] = {}  # type -> (its first index, its range)
        offset = 0
        for er in self._event_ranges:
            self._ranges[er.type] = (offset, er)
            offset += er.max_value - er.min_value + 1

    @property
    def event_ranges(self) -> list[EventRange]:
        return list(self._event_ranges)

    @property
    def num_classes(self) -> int:
        return len(self._events)

    def encode_event(self, event: Event) -> int:
        """Event -> index; ValueError for an unknown type or an out-of-range value."""
        if event.type not in self._ranges:
            raise ValueError(f"Unknown event type: {event.type!r}; expected one of {', '.join(self._ranges)}")
        first, er = self._ranges[event.type]
        if not er.min_value <= event.value <= er.max_value:
            raise ValueError(
                f"Event value {event.value} is not within valid range "
                f"[{er.min_value}, {er.max_value}] for type {event.type}"
            )
        return first + event.value - er.min_value

    def event_type_range(self, event_type: str) -> tuple[int, int]:
        """[min_index, max_index] of an event type."""
        if event_type not in self._ranges:
            raise ValueError(f"Unknown event type: {event_type!r}; expected one of {', '.join(self._ranges)}")
        first, er = self._ranges[event_type]
        return first, first + er.max_value - er.min_value

    def decode_event_index(self, index: int) -> Event:
        """Index -> Event; ValueError if the index is outside every range (e.g. negative markers)."""
        if not 0 <= index < len(self._events):
            raise ValueError(f"Unknown event index: {index}")
        return self._events[index]


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


def num_embeddings(codec: Codec, num_extra_ids: int, multiple: int) -> int:
    """MT3 `vocabularies.num_embeddings`: (special + codec + extra ids) rounded up to a multiple (the logits)."""
    return multiple * math.ceil((NUM_SPECIAL_TOKENS + codec.num_classes + num_extra_ids) / multiple)


def num_velocity_bins_from_codec(codec: Codec) -> int:
    """The codec's velocity bins (its velocity range holds bin 0, note-off, and bins 1..n)."""
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


def map_program(program: int, granularity: str) -> int:
    """`PROGRAM_GRANULARITIES[granularity].program_map_fn`: flat -> 0, midi_class -> first of its class of 8."""
    if granularity == "flat":
        return 0
    if granularity == "midi_class":
        return 8 * (program // 8)
    return program


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


__all__ = [
    "DECODED_EOS_ID",
    "DECODED_INVALID_ID",
    "PROGRAM_GRANULARITIES",
    "Codec",
    "Event",
    "EventRange",
    "bin_to_velocity",
    "build_codec",
    "decode_model_ids",
    "map_program",
    "num_embeddings",
    "num_velocity_bins_from_codec",
    "round_down_start_time",
    "trim_eos",
    "velocity_to_bin",
]
