"""Transcribed notes as plain records (program, GM instrument name, drum flag, pitch, velocity, times) and their
JSON / CSV files, for users without MIDI tools."""

from __future__ import annotations

import csv
import io
import json
import numbers
from collections.abc import Iterable

from .event_codec_mt3 import MIDI_MAX_VALUE
from .note_sequences_mt3 import MT3Note

# General MIDI level 1 program names, program 0-127 (the names pretty_midi.program_to_instrument_name gives).
GM_PROGRAM_NAMES = (
    "Acoustic Grand Piano", "Bright Acoustic Piano", "Electric Grand Piano", "Honky-tonk Piano",
    "Electric Piano 1", "Electric Piano 2", "Harpsichord", "Clavinet",
    "Celesta", "Glockenspiel", "Music Box", "Vibraphone", "Marimba", "Xylophone", "Tubular Bells", "Dulcimer",
    "Drawbar Organ", "Percussive Organ", "Rock Organ", "Church Organ", "Reed Organ", "Accordion", "Harmonica",
    "Tango Accordion",
    "Acoustic Guitar (nylon)", "Acoustic Guitar (steel)", "Electric Guitar (jazz)", "Electric Guitar (clean)",
    "Electric Guitar (muted)", "Overdriven Guitar", "Distortion Guitar", "Guitar Harmonics",
    "Acoustic Bass", "Electric Bass (finger)", "Electric Bass (pick)", "Fretless Bass", "Slap Bass 1",
    "Slap Bass 2", "Synth Bass 1", "Synth Bass 2",
    "Violin", "Viola", "Cello", "Contrabass", "Tremolo Strings", "Pizzicato Strings", "Orchestral Harp", "Timpani",
    "String Ensemble 1", "String Ensemble 2", "Synth Strings 1", "Synth Strings 2", "Choir Aahs", "Voice Oohs",
    "Synth Choir", "Orchestra Hit",
    "Trumpet", "Trombone", "Tuba", "Muted Trumpet", "French Horn", "Brass Section", "Synth Brass 1", "Synth Brass 2",
    "Soprano Sax", "Alto Sax", "Tenor Sax", "Baritone Sax", "Oboe", "English Horn", "Bassoon", "Clarinet",
    "Piccolo", "Flute", "Recorder", "Pan Flute", "Blown bottle", "Shakuhachi", "Whistle", "Ocarina",
    "Lead 1 (square)", "Lead 2 (sawtooth)", "Lead 3 (calliope)", "Lead 4 chiff", "Lead 5 (charang)",
    "Lead 6 (voice)", "Lead 7 (fifths)", "Lead 8 (bass + lead)",
    "Pad 1 (new age)", "Pad 2 (warm)", "Pad 3 (polysynth)", "Pad 4 (choir)", "Pad 5 (bowed)", "Pad 6 (metallic)",
    "Pad 7 (halo)", "Pad 8 (sweep)",
    "FX 1 (rain)", "FX 2 (soundtrack)", "FX 3 (crystal)", "FX 4 (atmosphere)", "FX 5 (brightness)",
    "FX 6 (goblins)", "FX 7 (echoes)", "FX 8 (sci-fi)",
    "Sitar", "Banjo", "Shamisen", "Koto", "Kalimba", "Bagpipe", "Fiddle", "Shanai",
    "Tinkle Bell", "Agogo", "Steel Drums", "Woodblock", "Taiko Drum", "Melodic Tom", "Synth Drum", "Reverse Cymbal",
    "Guitar Fret Noise", "Breath Noise", "Seashore", "Bird Tweet", "Telephone Ring", "Helicopter", "Applause",
    "Gunshot",
)  # fmt: skip
# The 16 General MIDI families of 8 programs each, by the short names `--instruments` accepts.
GM_FAMILIES = (
    "piano", "chromatic_percussion", "organ", "guitar", "bass", "strings", "ensemble", "brass",
    "reed", "pipe", "synth_lead", "synth_pad", "synth_effects", "ethnic", "percussive", "sound_effects",
)  # fmt: skip
DRUMS_NAME = "Drums"
NOTE_FIELDS = ("program", "instrument", "is_drum", "pitch", "velocity", "start", "end")


def note_record(note: MT3Note) -> dict:
    """One note as a JSON-ready dict; `instrument` is the GM program name ("Drums" for drum notes)."""
    return {
        "program": int(note.program),
        "instrument": DRUMS_NAME if note.is_drum else GM_PROGRAM_NAMES[note.program],
        "is_drum": bool(note.is_drum),
        "pitch": int(note.pitch),
        "velocity": int(note.velocity),
        "start": float(note.start),
        "end": float(note.end),
    }


def notes_to_json(records: Iterable[dict]) -> str:
    """Records -> a JSON list (floats written exactly: Python's repr round-trips)."""
    return json.dumps({"notes": list(records)}, indent=1) + "\n"


def notes_to_csv(records: Iterable[dict]) -> str:
    """Records -> CSV with a header row `program,instrument,is_drum,pitch,velocity,start,end` (is_drum as 0/1)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(NOTE_FIELDS)
    for record in records:
        writer.writerow([int(record[key]) if key == "is_drum" else record[key] for key in NOTE_FIELDS])
    return buffer.getvalue()


def parse_programs(spec: int | str | Iterable[int | str]) -> set[int]:
    """GM programs (0-based) from "0-7,32", families ("piano,bass"), GM program names (`GM_PROGRAM_NAMES`, as the
    notes' instrument field has them: "Acoustic Grand Piano"), a mix of these, one int, or an iterable of ints
    (numpy's too) / such strings. Drums are kept by the filters whatever this says: "drums" (the instrument field
    of drum notes) adds no program, and alone keeps the drums only."""
    if getattr(spec, "ndim", None) == 0:  # a 0-d array or tensor
        spec = spec.item()
    if isinstance(spec, str):
        parts = spec.split(",")
    elif isinstance(spec, numbers.Integral):
        parts = [spec]
    elif isinstance(spec, Iterable):
        parts = list(spec)
    else:
        raise ValueError(f"programs {spec!r}: expected GM programs such as 0-7,32, a list of ints, or family names")
    programs: set[int] = set()
    drums = False
    for part in parts:
        if isinstance(part, numbers.Integral) and not isinstance(part, bool):
            programs.add(int(part))
            continue
        if not isinstance(part, str):
            raise ValueError(f"programs {spec!r}: expected ints or strings; found {type(part).__name__} {part!r}")
        text = part.strip()
        family = text.lower().replace(" ", "_").replace("-", "_")
        if family == DRUMS_NAME.lower():
            drums = True
            continue
        if family in GM_FAMILIES:
            first = 8 * GM_FAMILIES.index(family)
            programs.update(range(first, first + 8))
            continue
        named = [program for program, name in enumerate(GM_PROGRAM_NAMES) if name.lower() == text.lower()]
        if named:
            programs.update(named)
            continue
        low, dash, high = text.partition("-")
        if not text:
            continue
        if not (low.isdigit() and (high.isdigit() or not dash)) or (dash and int(high) < int(low)):
            raise ValueError(
                f"programs {spec!r}: expected GM programs and ranges such as 0-7,32, GM program names or instrument "
                f"families ({', '.join(GM_FAMILIES)}); found {text!r}"
            )
        programs.update(range(int(low), int(high or low) + 1))
    if not programs and not drums:
        raise ValueError(f"programs {spec!r}: expected at least one GM program (0-127) or family")
    if programs and (min(programs) < 0 or max(programs) > MIDI_MAX_VALUE):
        raise ValueError(f"programs {spec!r}: expected programs between 0 and {MIDI_MAX_VALUE}")
    return programs


__all__ = ["GM_FAMILIES", "GM_PROGRAM_NAMES", "NOTE_FIELDS", "note_record", "notes_to_csv", "notes_to_json", "parse_programs"]
