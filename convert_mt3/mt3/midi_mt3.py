"""Notes <-> MIDI with pretty_midi (optional: imported only when MIDI is written or read).

The writer lays tracks out like note_seq's `midi_io.note_sequence_to_pretty_midi` applied to MT3's decoded
NoteSequence (the original's `transcription.mid`).
"""

import io
import os
from collections.abc import Sequence

from .note_sequences_mt3 import DEFAULT_DRUM_INSTRUMENT, MT3Note, assign_instruments, sort_notes
from .notes_mt3 import DRUMS_NAME

DEFAULT_MIDI_TICKS_PER_QUARTER = 220
DEFAULT_MIDI_QPM = 120.0


def import_pretty_midi():
    """pretty_midi, or an ImportError that says how to get it (it is optional, as in Pop2Piano)."""
    try:
        import pretty_midi
    except ImportError as error:
        raise ImportError(
            "Writing or reading MIDI needs pretty_midi: pip install pretty_midi (or return_midi=False: notes only)"
        ) from error
    return pretty_midi


def notes_to_pretty_midi(
    notes: Sequence[MT3Note],
    ticks_per_quarter: int = DEFAULT_MIDI_TICKS_PER_QUARTER,
    qpm: float = DEFAULT_MIDI_QPM,
    drum_instrument: int = DEFAULT_DRUM_INSTRUMENT,
):
    """Notes -> `pretty_midi.PrettyMIDI`, one track per (instrument, program, is_drum) in sorted order.

    Instrument ids come from `assign_instruments` over `notes` in the given (decoding) order; drums are written on
    the drum channel. The first track (instrument 0) always exists and is unnamed, the others are named, as in
    note_seq. Notes are written as they are (drums already last `note_duration`).
    """
    pretty_midi = import_pretty_midi()
    midi = pretty_midi.PrettyMIDI(resolution=ticks_per_quarter, initial_tempo=qpm)
    first_instrument = pretty_midi.Instrument(0)
    midi.instruments.append(first_instrument)
    grouped: dict[tuple[int, int, bool], list] = {}
    for note, instrument_id in zip(notes, assign_instruments(notes, drum_instrument)):
        grouped.setdefault((instrument_id, note.program, bool(note.is_drum)), []).append(
            pretty_midi.Note(velocity=note.velocity, pitch=note.pitch, start=note.start, end=note.end)
        )
    for instrument_id, program, is_drum in sorted(grouped):
        if instrument_id > 0:
            # note_seq names every track but the first: "Drums" or the General MIDI program name.
            name = DRUMS_NAME if is_drum else pretty_midi.program_to_instrument_name(program)
            instrument = pretty_midi.Instrument(program, is_drum=is_drum, name=name)
            midi.instruments.append(instrument)
        else:
            instrument = first_instrument
            instrument.is_drum = is_drum
        instrument.program = program
        instrument.notes = grouped[(instrument_id, program, is_drum)]
    return midi


def last_line(error: BaseException) -> str:
    """The last line of an error's message (libsndfile's and mido's say the cause last), or its class name."""
    return (str(error).strip().splitlines() or [type(error).__name__])[-1]


def midi_to_notes(midi) -> list[MT3Note]:
    """A MIDI file's notes (pretty_midi's reading: tempo map applied, no sustain pedal), sorted by (start, pitch, program).

    `midi`: a path, the file's bytes, a binary file object, or a `pretty_midi.PrettyMIDI`."""
    pretty_midi = import_pretty_midi()
    if not isinstance(midi, pretty_midi.PrettyMIDI):
        if isinstance(midi, (bytes, bytearray)):
            source, name = io.BytesIO(midi), f"MIDI bytes ({len(midi)})"
        elif isinstance(midi, (str, os.PathLike)):
            source, name = os.fspath(midi), os.fspath(midi)
        elif hasattr(midi, "read"):
            source, name = midi, getattr(midi, "name", "MIDI file object")
        else:
            raise ValueError(
                f"Expected a MIDI file's path, its bytes, a file object or a pretty_midi.PrettyMIDI; found "
                f"{type(midi).__name__}"
            )
        try:
            midi = pretty_midi.PrettyMIDI(source)
        except Exception as error:  # mido / pretty_midi raise many types for a bad file, some without a message
            raise ValueError(f"{name}: cannot be read as MIDI ({last_line(error)})") from None
    notes = [
        MT3Note(int(inst.program), bool(inst.is_drum), int(n.pitch), int(n.velocity), float(n.start), float(n.end))
        for inst in midi.instruments
        for n in inst.notes
    ]
    return sort_notes(notes)


__all__ = ["import_pretty_midi", "last_line", "midi_to_notes", "notes_to_pretty_midi"]
