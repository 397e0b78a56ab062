"""Processor for MT3: pairs the log-mel feature extractor with the event tokenizer (audio in, notes / MIDI out)."""

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.tokenization_python import BatchEncoding
from transformers.utils import TensorType, logging

from .feature_extraction_mt3 import MT3BatchFeature, MT3FeatureExtractor, is_batch_of_clips
from .loss_mt3 import IGNORE_INDEX
from .midi_mt3 import midi_to_notes
from .note_sequences_mt3 import MT3Note, as_note
from .tokenization_mt3 import MT3Tokenizer

logger = logging.get_logger(__name__)


def pad_labels(rows: Sequence[Sequence[int]]) -> np.ndarray:
    """Target rows of different lengths -> (num_rows, longest) int64, padded with IGNORE_INDEX."""
    labels = np.full((len(rows), max((len(row) for row in rows), default=0)), IGNORE_INDEX, dtype=np.int64)
    for index, row in enumerate(rows):
        labels[index, : len(row)] = row
    return labels


def _float32_rows(rows: Any) -> torch.Tensor:
    """(frames, mel bins) as a float32 CPU tensor, from a tensor of any dtype (numpy has no bfloat16), an array or
    nested lists."""
    if isinstance(rows, torch.Tensor):
        return rows.to("cpu", torch.float32)
    return torch.from_numpy(np.asarray(rows, dtype=np.float32))


def _without_padding(row: np.ndarray) -> list[int]:
    """A label row without its trailing IGNORE_INDEX padding; ignored positions inside it stay where they are."""
    kept = np.flatnonzero(row != IGNORE_INDEX)
    return [int(i) for i in row[: kept[-1] + 1]] if kept.size else []


class MT3Processor(ProcessorMixin):
    r"""
    Constructs an MT3 processor from an [`MT3FeatureExtractor`] and an [`MT3Tokenizer`].

    `processor(audio=..., sampling_rate=16000, return_tensors="pt")` gives the encoder inputs of every segment
    (`input_features`, ready for `model.generate(input_features=...)`) and their `segment_start_times`;
    `processor.batch_decode(generated_ids, inputs, return_midi=True)` turns the generated rows back into notes and
    a `pretty_midi.PrettyMIDI`, exactly as MT3's colab does. For training, `processor(audio=..., midi="x.mid")` (or
    `notes=`: a list of (program, is_drum, pitch, velocity, start, end) tuples, or of note dicts as the pipeline and
    `batch_decode` give them) also returns each segment's targets as `labels`, and `processor.collate` batches
    segments for a DataLoader or `Trainer`.

    Args:
        feature_extractor ([`MT3FeatureExtractor`]): turns audio into per-segment log-mel spectrograms.
        tokenizer ([`MT3Tokenizer`]): decodes generated event tokens into notes.
    """

    _auto_class = "AutoProcessor"  # remote code: a saved processor names its class (see MT3Tokenizer)

    def __init__(self, feature_extractor, tokenizer):
        super().__init__(feature_extractor, tokenizer)

    def __call__(
        self,
        audio: np.ndarray | list[float] | None = None,
        sampling_rate: int | None = None,
        return_tensors: str | TensorType | None = None,
        notes: Sequence[MT3Note] | None = None,
        midi: str | os.PathLike | bytes | None = None,  # or a binary file object, or a pretty_midi.PrettyMIDI
        **kwargs,
    ) -> BatchFeature:
        """Audio of one clip, or a list of clips -> `input_features` (num_segments, frames, mel bins) and
        `segment_start_times` (and `segments_per_clip` for a list).

        With `notes` (the clip's notes, times in seconds) or `midi` (a MIDI file of them, read with pretty_midi: its
        path, bytes, a file object or a `pretty_midi.PrettyMIDI`), also `labels` (num_segments, longest): each
        segment's targets as model ids ending with EOS, padded with -100 ([`MT3Tokenizer.encode_notes`]). See
        [`MT3FeatureExtractor.__call__`]; extra kwargs (e.g. `device`) go to the feature extractor.
        """
        if audio is None:
            raise ValueError("Expected `audio` (a mono clip as a 1-D array, or a list of them); found None.")
        if notes is not None and midi is not None:
            raise ValueError("Expected `notes` or `midi`, not both.")
        if notes is None and midi is None:
            return self.feature_extractor(audio, sampling_rate=sampling_rate, return_tensors=return_tensors, **kwargs)
        if isinstance(notes, (str, bytes, os.PathLike)):
            raise ValueError(f"Expected `notes` as a list of notes; found {type(notes).__name__}: for a MIDI file, "
                             "pass `midi=`.")
        if is_batch_of_clips(audio):
            raise ValueError(
                f"Expected one clip with `notes` or `midi`; found a list of {len(audio)} clips: call the processor "
                "once per clip for labels."
            )
        inputs = self.feature_extractor(audio, sampling_rate=sampling_rate, **kwargs)
        notes = midi_to_notes(midi) if midi is not None else [as_note(note) for note in notes]
        duration = len(audio) / self.feature_extractor.sampling_rate  # a 1-D array or list: the extractor checked
        late = sum(1 for note in notes if note.start >= duration)
        if late:
            # MT3's preprocessing puts events after the last frame into the last segment: most likely the wrong file
            logger.warning(
                f"{late} of {len(notes)} notes start after the audio ends ({duration:.2f} s) and go into the last "
                "segment's labels, as in MT3's preprocessing: check that the notes/MIDI belong to this audio."
            )
        targets = self.tokenizer.encode_notes(notes, inputs["segment_start_times"])
        limit = self.tokenizer.model_max_length
        too_long = [index for index, row in enumerate(targets) if len(row) > limit]
        if too_long:
            # MT3's training skips such segments (t5x's handle_too_long); the model takes them up to its position
            # table (max_position_embeddings, 2048) and raises beyond it
            logger.warning(
                f"{len(too_long)} of {len(targets)} segments have more than {limit} target ids (the model's target "
                f"length; segment {too_long[0]} has {len(targets[too_long[0]])}): MT3's training skips such segments, "
                "and the model raises on those longer than its position table. Drop their rows before training."
            )
        return MT3BatchFeature({**inputs, "labels": pad_labels(targets)}, tensor_type=return_tensors)

    def collate(self, examples: Sequence[dict], model=None) -> BatchFeature:
        """Data collator: segments {"input_features": (frames, mel bins), "labels": ids} -> a batch of torch
        tensors, labels padded with -100 (ready for `model(**batch)`); segments without labels (prediction) give
        `input_features` only. With `model` (as `DataCollatorForSeq2Seq(model=...)`), also the `decoder_input_ids`
        it makes from the labels: Trainer's label smoothing and `compute_loss_func` take the labels out of the batch
        before the forward pass (`data_collator=functools.partial(processor.collate, model=model)`)."""
        if not examples:
            raise ValueError("Expected at least one segment to collate; found none.")
        batch = {"input_features": torch.stack([_float32_rows(example["input_features"]) for example in examples])}
        labelled = sum(example.get("labels") is not None for example in examples)
        if labelled not in (0, len(examples)):
            raise ValueError(
                f"Expected labels on every segment or on none; found them on {labelled} of {len(examples)}."
            )
        if labelled:
            labels = [_without_padding(np.asarray(example["labels"]).reshape(-1)) for example in examples]
            batch["labels"] = torch.from_numpy(pad_labels(labels))
            if model is not None:
                batch["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        return BatchFeature(batch)

    def batch_decode(
        self,
        token_ids,
        feature_extractor_output: BatchFeature | dict | None = None,
        return_midi: bool = True,
        **kwargs,
    ) -> BatchEncoding:
        """Generated ids of one clip's segments -> notes (+ MIDI); for the processor's output of a list of clips,
        a list of each per clip. See [`MT3Tokenizer.batch_decode`]."""
        if feature_extractor_output is None and kwargs.get("segment_start_times") is None:
            # the tokenizer would fall back to text decoding, which is not what the processor is asked for
            raise ValueError(
                "Expected the processor's output for the same audio (its `segment_start_times`) as the second "
                "argument: processor.batch_decode(ids, inputs)"
            )
        return self.tokenizer.batch_decode(
            token_ids, feature_extractor_output=feature_extractor_output, return_midi=return_midi, **kwargs
        )

    def decode(self, *args, **kwargs):
        """Same as [`MT3Processor.batch_decode`]: every row is one segment of the same clip."""
        return self.batch_decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return list(self.feature_extractor.model_input_names)

    def save_pretrained(self, save_directory, **kwargs):
        """ProcessorMixin's, after refusing a file of that name with an error that says so."""
        if os.path.isfile(save_directory):
            raise ValueError(f"Expected a directory to save the processor to; found a file: {save_directory}")
        os.makedirs(save_directory, exist_ok=True)
        return super().save_pretrained(save_directory, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load both parts with this module's own classes, so that loading works without any auto-class
        registration, and the same way when this file runs as remote code."""
        kwargs.pop("trust_remote_code", None)
        feature_extractor = MT3FeatureExtractor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        tokenizer = MT3Tokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls(feature_extractor=feature_extractor, tokenizer=tokenizer)


__all__ = ["MT3Processor"]
