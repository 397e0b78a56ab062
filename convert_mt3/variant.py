"""Which published MT3 layout a checkpoint is: frames per segment, velocity bins, ties, program granularity.

The network is the same for both of magenta/mt3's checkpoints (`gin/model.gin`); what differs lives in
`gin/mt3.gin` and `gin/ismir2021.gin`, and it decides how the tokenizer and feature extractor must work. Values
come from, in rising priority: the layout whose vocabulary size (computed from its codec) equals the rows of the
checkpoint's token embedder; the `config.gin` T5X writes into the checkpoint folder's parent (or the folder itself); the CLI flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import GIN_MACRO, gin_literal, read_gin
from .mt3.event_codec_mt3 import (
    DEFAULT_MAX_SHIFT_SECONDS,
    DEFAULT_NUM_EXTRA_IDS,
    DEFAULT_STEPS_PER_SECOND,
    DEFAULT_VOCAB_SIZE_MULTIPLE,
    PROGRAM_GRANULARITIES,
    build_codec,
    num_embeddings,
)

# magenta/mt3 gin/mt3.gin and gin/ismir2021.gin (TASK_FEATURE_LENGTHS['inputs'], NUM_VELOCITY_BINS, USE_TIES,
# PROGRAM_GRANULARITY).
LAYOUTS: dict[str, dict[str, Any]] = {
    "mt3": {"frames_per_segment": 256, "num_velocity_bins": 1, "use_ties": True, "program_granularity": "full"},
    "ismir2021": {"frames_per_segment": 512, "num_velocity_bins": 127, "use_ties": False, "program_granularity": "flat"},
}
FIELDS = ("frames_per_segment", "num_velocity_bins", "use_ties", "program_granularity")
# gin macro -> field (TASK_FEATURE_LENGTHS is a dict: its 'inputs' entry)
GIN_MACROS = {
    "TASK_FEATURE_LENGTHS": "frames_per_segment",
    "NUM_VELOCITY_BINS": "num_velocity_bins",
    "USE_TIES": "use_ties",
    "PROGRAM_GRANULARITY": "program_granularity",
}
GIN_NAMES = {field: macro for macro, field in GIN_MACROS.items()}
MAX_VELOCITY_BINS = 127


class VariantError(ValueError):
    """The checkpoint's layout cannot be determined, or its parts disagree."""


@dataclass(frozen=True)
class Variant:
    name: str  # "mt3", "ismir2021" or "custom"
    frames_per_segment: int
    num_velocity_bins: int
    use_ties: bool
    program_granularity: str

    def tokenizer_kwargs(self) -> dict[str, Any]:
        return {
            "num_velocity_bins": self.num_velocity_bins,
            "use_ties": self.use_ties,
            "program_granularity": self.program_granularity,
        }


def vocab_size_of(num_velocity_bins: int) -> int:
    """Embedding rows MT3 gives a codec with this many velocity bins (vocabularies.num_embeddings)."""
    codec = build_codec(DEFAULT_STEPS_PER_SECOND, DEFAULT_MAX_SHIFT_SECONDS, num_velocity_bins)
    return num_embeddings(codec, DEFAULT_NUM_EXTRA_IDS, DEFAULT_VOCAB_SIZE_MULTIPLE)


def parse_variant_gin(path: Path) -> dict[str, Any]:
    """The layout macros of a gin file (e.g. `NUM_VELOCITY_BINS = 127`), as Variant fields."""
    values: dict[str, Any] = {}
    for line in read_gin(path):
        match = GIN_MACRO.match(line)
        if not match or match.group(1) not in GIN_MACROS:
            continue
        value = gin_literal(path, match.group(1), match.group(2), VariantError)
        if match.group(1) == "TASK_FEATURE_LENGTHS":
            if not isinstance(value, dict) or "inputs" not in value:
                raise VariantError(f"{path}: expected TASK_FEATURE_LENGTHS = {{'inputs': N, ...}}; found {match.group(2)}")
            value = value["inputs"]
        values[GIN_MACROS[match.group(1)]] = value
    return values


def derive_variant(
    vocab_size: int, gin: Path | None = None, overrides: dict[str, Any] | None = None, max_frames: int | None = None
) -> Variant:
    """The layout of a checkpoint whose token embedder has `vocab_size` rows (see module docstring); `max_frames`:
    the most frames a segment may have (the encoder's position table)."""
    known = {name: vocab_size_of(layout["num_velocity_bins"]) for name, layout in LAYOUTS.items()}
    matched = next((name for name, size in known.items() if size == vocab_size), None)
    from_gin = parse_variant_gin(gin) if gin else {}
    from_flags = {k: v for k, v in (overrides or {}).items() if k in FIELDS and v is not None}
    values = {**(LAYOUTS[matched] if matched else {}), **from_gin, **from_flags}
    sizes = ", ".join(f"{size} ({name})" for name, size in known.items())
    missing = [field for field in FIELDS if field not in values]
    if missing:
        raise VariantError(
            f"decoder/token_embedder/embedding has {vocab_size} rows, not a known MT3 vocabulary ({sizes}); "
            "for another layout pass --frames-per-segment, --num-velocity-bins, --use-ties or --no-use-ties and "
            "--program-granularity"
        )

    def check(field: str, valid: bool, expected: str) -> None:
        """A ValueError naming where the value came from (flag, config.gin) unless `valid`."""
        if not valid:
            source = f"--{field.replace('_', '-')}" if field in from_flags else (
                f"{gin}: {GIN_NAMES[field]}" if field in from_gin else f"the {matched} layout")
            raise VariantError(f"{source}: {field} {values[field]!r}: expected {expected}")

    bins, frames = values["num_velocity_bins"], values["frames_per_segment"]
    check("program_granularity", values["program_granularity"] in PROGRAM_GRANULARITIES,
          f"one of {PROGRAM_GRANULARITIES}")
    # MIDI velocities are 1..127: more bins could not differ (and the codec holds one entry per bin)
    check("num_velocity_bins", _is_int(bins) and 1 <= bins <= MAX_VELOCITY_BINS,
          f"an integer from 1 to {MAX_VELOCITY_BINS}")
    check("use_ties", isinstance(values["use_ties"], bool), "True or False")
    check("frames_per_segment", _is_int(frames) and 1 <= frames <= (max_frames or frames),
          f"an integer from 1 to {max_frames} (the encoder's positions)" if max_frames else "an integer >= 1")
    expected = vocab_size_of(bins)
    if expected != vocab_size:
        raise VariantError(
            f"{bins} velocity bins give a vocabulary of {expected}, but "
            f"decoder/token_embedder/embedding has {vocab_size} rows"
        )
    name = next((n for n, layout in LAYOUTS.items() if all(values[f] == layout[f] for f in FIELDS)), "custom")
    return Variant(name=name, **{field: values[field] for field in FIELDS})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


__all__ = ["LAYOUTS", "Variant", "VariantError", "derive_variant", "parse_variant_gin", "vocab_size_of"]
