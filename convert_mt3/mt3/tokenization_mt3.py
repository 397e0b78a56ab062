"""`MT3Tokenizer`: MT3's event vocabulary as a transformers tokenizer; notes <-> model ids of each segment.

The stages live in sibling files: `event_codec_mt3.py` (events, codec, vocabulary layout), `note_sequences_mt3.py`
(notes and the note state machines), `run_length_encoding_mt3.py` (segments of events), `midi_mt3.py` (MIDI).
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
from transformers.feature_extraction_utils import BatchFeature
from transformers.tokenization_python import BatchEncoding, PreTrainedTokenizer
from transformers.utils import logging

from .event_codec_mt3 import (
    DEFAULT_MAX_SHIFT_SECONDS,
    DEFAULT_NUM_EXTRA_IDS,
    DEFAULT_NUM_VELOCITY_BINS,
    DEFAULT_STEPS_PER_SECOND,
    DEFAULT_VOCAB_SIZE_MULTIPLE,
    MIDI_MAX_VALUE,
    NUM_SPECIAL_TOKENS,
    PROGRAM_GRANULARITIES,
    Event,
    build_codec,
    decode_model_ids,
    num_embeddings,
    round_down_start_time,
    trim_eos,
)
from .midi_mt3 import DEFAULT_MIDI_QPM, DEFAULT_MIDI_TICKS_PER_QUARTER, notes_to_pretty_midi
from .note_sequences_mt3 import (
    DEFAULT_MIN_NOTE_DURATION,
    DEFAULT_NOTE_DURATION,
    DEFAULT_VELOCITY,
    MT3Note,
    as_note,
    sort_notes,
)
from .run_length_encoding_mt3 import encode_notes, event_predictions_to_notes

logger = logging.get_logger(__name__)


def _host_array(value: Any) -> Any:
    """A torch tensor (on any device) as a numpy array; anything else as it is."""
    return value.detach().cpu().numpy() if hasattr(value, "detach") else value


def _to_int_rows(token_ids: Any) -> list[np.ndarray]:
    """Generate() output (tensor / array / nested lists) -> list of 1-D int64 rows."""
    token_ids = _host_array(token_ids)
    if isinstance(token_ids, np.ndarray):
        if token_ids.ndim == 1:
            token_ids = token_ids[None]
        if token_ids.ndim != 2:
            raise ValueError(f"Expected token ids of shape (num_segments, length); found shape {token_ids.shape}.")
        return [row.astype(np.int64) for row in token_ids]
    rows = list(token_ids)
    if rows and np.isscalar(rows[0]):
        rows = [rows]
    return [np.asarray(_host_array(row), dtype=np.int64).reshape(-1) for row in rows]  # rows may be tensors


def _to_counts(segments_per_clip: Any) -> list[int]:
    """Segments per clip (tensor on any device / array / list) -> a list of ints."""
    return [int(count) for count in np.asarray(_host_array(segments_per_clip)).reshape(-1)]


def _to_start_times(segment_start_times: Any) -> np.ndarray:
    """Segment start times (tensor / array / list) -> 1-D float64 seconds."""
    dtype = getattr(segment_start_times, "dtype", None)
    if dtype is not None and (dtype.is_floating_point if hasattr(dtype, "is_floating_point")
                              else np.issubdtype(dtype, np.floating)) and dtype.itemsize < 8:
        # float32 puts 10.24 s just below itself, so rounding down to the 10 ms grid moves a segment's notes a step
        # early (golden case a, 20 s: 60 of its 479 notes); float16 is ~0.06 s apart at an hour
        raise ValueError(
            f"segment_start_times are {dtype}; expected float64 seconds as the processor returns them: cast "
            "`input_features` only (the processor output's `to()` does that)"
        )
    return np.asarray(_host_array(segment_start_times), dtype=np.float64).reshape(-1)


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
        use_ties (`bool`, *optional*, defaults to `True`): each segment starts with a tie section (mt3: True,
            ismir2021: False).
        program_granularity (`str`, *optional*, defaults to `"full"`): how targets write programs: "full",
            "midi_class" (first program of its class of 8) or "flat" (no program events; mt3: full, ismir2021: flat).
        default_velocity (`int`, *optional*, defaults to 100): velocity before any velocity event.
        note_duration (`float`, *optional*, defaults to 0.01): length of drum notes, seconds.
        min_note_duration (`float`, *optional*, defaults to 0.01): minimum note length, seconds.
        midi_ticks_per_quarter (`int`, *optional*, defaults to 220): resolution of written MIDI.
        midi_qpm (`float`, *optional*, defaults to 120.0): tempo of written MIDI.
        decoder_start_token_id (`int`, *optional*, defaults to 0): first token of every generate() row.
    """

    model_input_names = ["input_ids", "attention_mask"]
    # Remote code: a saved tokenizer names its class for AutoTokenizer (also when loaded through AutoProcessor).
    _auto_class = "AutoTokenizer"
    vocab_files_names: dict[str, str] = {}

    def __init__(
        self,
        steps_per_second: int = DEFAULT_STEPS_PER_SECOND,
        max_shift_seconds: int = DEFAULT_MAX_SHIFT_SECONDS,
        num_velocity_bins: int = DEFAULT_NUM_VELOCITY_BINS,
        num_extra_ids: int = DEFAULT_NUM_EXTRA_IDS,
        vocab_size_multiple: int = DEFAULT_VOCAB_SIZE_MULTIPLE,
        use_ties: bool = True,
        program_granularity: str = "full",
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
        if not 1 <= num_velocity_bins <= MIDI_MAX_VALUE:
            raise ValueError(f"Expected num_velocity_bins from 1 to {MIDI_MAX_VALUE}; found {num_velocity_bins}.")
        if num_extra_ids < 0 or vocab_size_multiple < 1:
            raise ValueError(
                f"Expected num_extra_ids >= 0 and vocab_size_multiple >= 1; found {num_extra_ids}, {vocab_size_multiple}."
            )
        if program_granularity not in PROGRAM_GRANULARITIES:
            raise ValueError(
                f"Expected program_granularity in {PROGRAM_GRANULARITIES}; found {program_granularity!r}."
            )
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
        self.program_granularity = program_granularity
        self.default_velocity = default_velocity
        self.note_duration = note_duration
        self.min_note_duration = min_note_duration
        self.midi_ticks_per_quarter = midi_ticks_per_quarter
        self.midi_qpm = midi_qpm
        self.decoder_start_token_id = decoder_start_token_id
        self.codec = build_codec(steps_per_second, max_shift_seconds, num_velocity_bins)
        # GenericTokenVocabulary: the special ids come first, in this order.
        self._special_token_strings = [str(pad_token), str(eos_token), str(unk_token)]
        self._unk_string = str(unk_token)  # what an unknown token or id maps to
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
            program_granularity=program_granularity,
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
        return NUM_SPECIAL_TOKENS

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
        return num_embeddings(self.codec, self.num_extra_ids, self.vocab_size_multiple)

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
        return self._vocab.get(token, self._vocab[self._unk_string])

    def _convert_id_to_token(self, index: int) -> str:
        return self._ids_to_tokens.get(int(index), self._unk_string)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return " ".join(tokens)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        """Nothing to write: the vocabulary derives from the settings in tokenizer_config.json."""
        return ()

    # -- events <-> model ids ----------------------------------------------------------------------------------

    def event_to_id(self, event: Event) -> int:
        """Event -> model id (codec index + number of special ids)."""
        return self.codec.encode_event(event) + self.num_special_tokens

    def event_type_ids(self, event_type: str) -> list[int]:
        """[first, last] model ids of one event type (e.g. "shift"); ValueError for an unknown type."""
        return [index + self.num_special_tokens for index in self.codec.event_type_range(event_type)]

    def id_to_event(self, token_id: int) -> Event | None:
        """Model id -> Event, or None for special / extra / unused ids."""
        codec_ids = decode_model_ids([token_id], self.num_regular_tokens, self.num_special_tokens, eos_id=-1)
        return None if codec_ids[0] < 0 else self.codec.decode_event_index(int(codec_ids[0]))

    def model_ids_to_codec_ids(self, token_ids: Sequence[int]) -> np.ndarray:
        """One generated row (without the decoder start token) -> codec ids cut before EOS (decode_tf + _trim_eos)."""
        decoded = decode_model_ids(token_ids, self.num_regular_tokens, self.num_special_tokens, self.eos_token_id)
        return trim_eos(decoded)

    # -- notes to training targets ------------------------------------------------------------------------------

    def encode_notes(self, notes: Sequence[MT3Note], segment_start_times: Sequence[float]) -> list[list[int]]:
        """Notes of one clip -> the targets of each of its segments as model ids, each ending with EOS.

        The inverse of [`~MT3Tokenizer.decode_to_notes`], as MT3 builds its training targets (tie section with
        `use_ties`, velocity bins, drums onset-only, programs by `program_granularity`). `segment_start_times`:
        seconds, from the feature extractor output for the same audio (`segment_start_times`). A note that starts
        before the first segment (a crop of a longer recording) is in that segment's tie section, which decoding
        drops: it does not come back.
        """
        checked = []
        for note in notes:
            note = as_note(note)
            midi_values = 0 <= note.pitch <= MIDI_MAX_VALUE and 0 <= note.program <= MIDI_MAX_VALUE
            if not (midi_values and 1 <= note.velocity <= MIDI_MAX_VALUE) or not (
                -np.inf < note.start < note.end < np.inf
            ):
                raise ValueError(
                    f"Expected notes with pitch and program 0..127, velocity 1..127 and finite times, start < end; "
                    f"found {note}."
                )
            checked.append(note)
        segments = encode_notes(
            checked,
            _to_start_times(segment_start_times),
            self.codec,
            use_ties=self.use_ties,
            program_granularity=self.program_granularity,
        )
        return [[i + self.num_special_tokens for i in segment] + [self.eos_token_id] for segment in segments]

    # -- decoding to notes and MIDI ----------------------------------------------------------------------------

    def decode_to_notes(
        self,
        token_ids: Any,
        segment_start_times: Sequence[float],
        has_decoder_start: bool = True,
        check_eos: bool = True,
    ) -> tuple[list[MT3Note], int, int]:
        """Generated rows, one per segment, -> (notes in decoding order, invalid events, dropped events).

        `token_ids`: (num_segments, length) model ids as returned by `generate()`; with `has_decoder_start` the
        first column (the decoder start token) is removed. `segment_start_times`: seconds, from the feature
        extractor (`segment_start_times`), rounded down to the shift grid here as the colab does. With
        `has_decoder_start` and `check_eos`, rows without EOS (cut by generate()'s length limit) get a warning.
        """
        rows = _to_int_rows(token_ids)
        start_times = _to_start_times(segment_start_times)
        if len(rows) != len(start_times):
            raise ValueError(
                f"Expected one row of token ids per segment: found {len(rows)} rows for {len(start_times)} "
                "segment start times."
            )
        if has_decoder_start and check_eos:
            self._warn_if_cut(rows)
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

    def _warn_if_cut(self, rows: list[np.ndarray], clip_of_row: list[int] | None = None) -> None:
        """One warning for the generated rows that end without EOS: generate() stopped them at its length limit
        (the folder's `max_length`, or a `max_length` / `max_new_tokens` passed), so a segment's last notes may be
        missing. `clip_of_row` names the clips they belong to."""
        if self.eos_token_id is None:
            return
        cut = [index for index, row in enumerate(rows) if not (row == self.eos_token_id).any()]
        if cut:
            where = f" (clips {sorted({clip_of_row[i] for i in cut})})" if clip_of_row is not None else ""
            logger.warning(
                f"{len(cut)} of {len(rows)} segments{where} end without EOS (cut by the length limit, max_length "
                "or max_new_tokens?): notes at their "
                "ends may be missing."
            )

    def notes_to_midi(self, notes: Sequence[MT3Note]):
        """Notes -> `pretty_midi.PrettyMIDI` laid out like note_seq's `note_sequence_to_pretty_midi`."""
        return notes_to_pretty_midi(notes, ticks_per_quarter=self.midi_ticks_per_quarter, qpm=self.midi_qpm)

    def batch_decode(
        self,
        token_ids: Any,
        feature_extractor_output: BatchFeature | dict | None = None,
        return_midi: bool = False,
        segment_start_times: Sequence[float] | None = None,
        has_decoder_start: bool = True,
        segments_per_clip: Sequence[int] | None = None,
        **kwargs,
    ) -> BatchEncoding | list[str]:
        """Decode the generate() output for the segments of one clip, or of a batch of clips, into notes (and MIDI).

        Args:
            token_ids: (num_segments, length) ids from `model.generate()`: decoder start token, events, EOS, padding.
            feature_extractor_output: the [`MT3FeatureExtractor`] output for the same audio (its
                `segment_start_times` are used, and its `segments_per_clip` when it was given a list of clips).
                Without it and without `segment_start_times`, falls back to the usual text decoding of
                [`PreTrainedTokenizer.batch_decode`].
            return_midi: also return a `pretty_midi.PrettyMIDI` under `"pretty_midi"`.
            segment_start_times: alternative to `feature_extractor_output`.
            has_decoder_start: whether each row starts with the decoder start token (True for generate()).
            segments_per_clip: alternative to `feature_extractor_output`'s: how many of the rows, in order, belong
                to each clip.

        Returns:
            [`BatchEncoding`] with `notes` (list of [`MT3Note`] sorted by (start, pitch, program)),
            `invalid_events`, `dropped_events` and, with `return_midi`, `pretty_midi`; for a batch of clips each of
            them is a list with one entry per clip.
        """
        token_ids = getattr(token_ids, "sequences", token_ids)  # generate(..., return_dict_in_generate=True)
        if feature_extractor_output is None and segment_start_times is None:
            if segments_per_clip is not None:
                raise ValueError("Expected `segment_start_times` (or the processor's output) with `segments_per_clip`.")
            return super().batch_decode(token_ids, **kwargs)
        if feature_extractor_output is not None:
            if not hasattr(feature_extractor_output, "keys"):
                raise ValueError(
                    "Expected `feature_extractor_output` to be the processor's output (with `segment_start_times`); "
                    f"found a {type(feature_extractor_output).__name__}: pass start times as `segment_start_times=`."
                )
            if segment_start_times is None:
                if "segment_start_times" not in feature_extractor_output:
                    raise ValueError(
                        "Expected `feature_extractor_output` to hold `segment_start_times`; found keys "
                        f"{sorted(feature_extractor_output.keys())}."
                    )
                segment_start_times = feature_extractor_output["segment_start_times"]
            if segments_per_clip is None:
                segments_per_clip = feature_extractor_output.get("segments_per_clip")
        rows, start_times = _to_int_rows(token_ids), _to_start_times(segment_start_times)
        batched = segments_per_clip is not None
        if batched:
            counts = _to_counts(segments_per_clip)
            if not counts or min(counts) < 0 or not sum(counts) == len(rows) == len(start_times):
                raise ValueError(
                    f"Expected segments_per_clip to count the {len(rows)} rows of token ids and their "
                    f"{len(start_times)} segment start times, clip by clip; found {counts}."
                )
            ends = np.cumsum(counts)
            parts = [(rows[end - count : end], start_times[end - count : end]) for count, end in zip(counts, ends)]
        else:
            # One clip's segments start strictly later each; several clips' each start from 0 (clips of one segment
            # too: [0, 0]), and decoded as one clip their notes would overlap.
            back = np.flatnonzero(np.diff(start_times) <= 0)
            if back.size:
                raise ValueError(
                    f"Expected one clip's segment start times, increasing; found segment {back[0] + 1} starting at "
                    f"{start_times[back[0] + 1]} s, after {start_times[back[0]]} s (several clips?): pass the "
                    "processor's output, or `segments_per_clip`."
                )
            parts = [(rows, start_times)]  # decode_to_notes checks that they match
        if has_decoder_start:  # one warning for the whole call
            clip_of_row = [clip for clip, (part, _) in enumerate(parts) for _ in part]
            self._warn_if_cut(rows, clip_of_row if batched else None)
        clips = [self._decode_clip(part, times, has_decoder_start, return_midi) for part, times in parts]
        if not batched:
            return BatchEncoding(clips[0])
        return BatchEncoding({key: [clip[key] for clip in clips] for key in clips[0]})

    def _decode_clip(self, token_ids, segment_start_times, has_decoder_start: bool, return_midi: bool) -> dict:
        """One clip's rows -> its notes (sorted), event counts and, with `return_midi`, its `pretty_midi` (the
        caller has warned about rows without EOS)."""
        notes, invalid_events, dropped_events = self.decode_to_notes(
            token_ids, segment_start_times, has_decoder_start=has_decoder_start, check_eos=False
        )
        output = {
            "notes": sort_notes(notes),
            "invalid_events": invalid_events,
            "dropped_events": dropped_events,
        }
        if return_midi:
            output["pretty_midi"] = self.notes_to_midi(notes)
        return output


__all__ = ["MT3Tokenizer"]
