"""Processor for MT3: pairs the log-mel feature extractor with the event tokenizer (audio in, notes / MIDI out)."""

import os

import numpy as np
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.tokenization_python import BatchEncoding
from transformers.utils import TensorType

from .feature_extraction_mt3 import MT3FeatureExtractor
from .tokenization_mt3 import MT3Tokenizer


class MT3Processor(ProcessorMixin):
    r"""
    Constructs an MT3 processor from an [`MT3FeatureExtractor`] and an [`MT3Tokenizer`].

    `processor(audio=..., sampling_rate=16000, return_tensors="pt")` gives the encoder inputs of every segment
    (`input_features`, ready for `model.generate(input_features=...)`) and their `segment_start_times`;
    `processor.batch_decode(generated_ids, inputs, return_midi=True)` turns the generated rows back into notes and
    a `pretty_midi.PrettyMIDI`, exactly as MT3's colab does.

    Args:
        feature_extractor ([`MT3FeatureExtractor`]): turns audio into per-segment log-mel spectrograms.
        tokenizer ([`MT3Tokenizer`]): decodes generated event tokens into notes.
    """

    def __init__(self, feature_extractor, tokenizer):
        super().__init__(feature_extractor, tokenizer)

    def __call__(
        self,
        audio: np.ndarray | list[float] | None = None,
        sampling_rate: int | None = None,
        return_tensors: str | TensorType | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Audio of one clip -> `input_features` (num_segments, frames, mel bins) and `segment_start_times`.

        See [`MT3FeatureExtractor.__call__`]; extra kwargs (e.g. `device`) go to the feature extractor.
        """
        if audio is None:
            raise ValueError("Expected `audio` (one mono clip as a 1-D array); found None.")
        return self.feature_extractor(audio, sampling_rate=sampling_rate, return_tensors=return_tensors, **kwargs)

    def batch_decode(
        self,
        token_ids,
        feature_extractor_output: BatchFeature | dict | None = None,
        return_midi: bool = True,
        **kwargs,
    ) -> BatchEncoding:
        """Generated ids of one clip's segments -> notes (+ MIDI); see [`MT3Tokenizer.batch_decode`]."""
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
