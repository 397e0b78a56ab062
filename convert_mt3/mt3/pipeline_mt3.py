"""`pipeline("music-transcription", model=..., trust_remote_code=True)`: audio in, notes (+ MIDI) out.

Registered in the folder's `config.json` under `custom_pipelines`, so `pipeline(model=..., trust_remote_code=True)`
also finds it. Each input is cut into segments (2.048 s for mt3, 4.096 s for ismir2021), yielded a few at a time,
so long audio needs memory for its samples and tokens only; with `batch_size=` segments of several inputs share one
`generate()` call.
"""

from __future__ import annotations

import io
import numbers
import os
import types

import numpy as np
import torch
from torch.utils.data import IterableDataset
from transformers.pipelines.base import ChunkPipeline

from .midi_mt3 import import_pretty_midi, last_line
from .note_sequences_mt3 import sort_notes
from .notes_mt3 import note_record, parse_programs

# Segments whose features are computed at once while an input is cut up (bounds memory: ~0.5 MB per segment).
SEGMENTS_PER_CHUNK = 16


def resample(samples: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """Mono float32 samples at `rate` -> `target_rate` with soxr (HQ), as `librosa.load` does."""
    if rate == target_rate or not samples.size:
        return np.ascontiguousarray(samples, dtype=np.float32)
    try:
        import soxr
    except ImportError:
        raise ImportError(f"Resampling {rate} Hz audio to {target_rate} Hz needs soxr: pip install soxr") from None
    length = -(-samples.shape[0] * target_rate // rate)  # librosa's ceil(n * target / rate)
    resampled = soxr.resample(samples, rate, target_rate, quality="HQ")
    return np.ascontiguousarray(np.pad(resampled, (0, max(0, length - len(resampled))))[:length], dtype=np.float32)


def read_audio(source: str | os.PathLike | bytes, sampling_rate: int) -> np.ndarray:
    """An audio file (path or its bytes; any format libsndfile reads) -> mono float32 at `sampling_rate`.

    Decodes with soundfile, mixes channels by averaging and resamples with soxr: the steps of transformers'
    `audio_utils.load_audio` soundfile backend and of `librosa.load`.
    """
    name = "audio bytes" if isinstance(source, bytes) else os.fspath(source)
    if not isinstance(source, bytes) and not os.path.isfile(source):
        raise ValueError(f"{name}: no such file" if not os.path.exists(source) else f"{name}: not a file")
    try:
        import soundfile
    except ImportError:
        raise ImportError("Reading audio files needs soundfile (and soxr to resample): pip install soundfile soxr") from None
    try:
        # Opened here, not by libsndfile: any file name the OS takes (libsndfile's needs UTF-8), and the OS's reason
        # when it cannot be opened ("Permission denied", where libsndfile says "System error")
        with io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb") as file:
            samples, rate = soundfile.read(file, dtype="float32", always_2d=True)
    except OSError as err:
        raise ValueError(f"{name}: cannot read audio ({err.strerror or last_line(err)})") from None
    except RuntimeError as err:  # soundfile.LibsndfileError: its error_string is libsndfile's reason
        raise ValueError(f"{name}: cannot read audio ({getattr(err, 'error_string', '') or last_line(err)})") from None
    if not np.isfinite(samples).all():  # float files may hold them; named here, where the file is known
        raise ValueError(f"{name}: the audio holds NaN or infinite samples")
    return resample(samples.mean(axis=1), rate, sampling_rate)  # (samples, channels) -> mono


def _check_cuda(device) -> None:
    """`device="cuda"` where torch has no CUDA: one ValueError, where transformers would move the model and torch
    raise an AssertionError ("Torch not compiled with CUDA enabled"). Numbers are left to transformers, which maps
    them to whichever accelerator is present."""
    if device is None or isinstance(device, int):
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        return  # transformers' own error names it
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}: CUDA is not available (torch {torch.__version__}); use device='cpu'")


def _agreed_rate(own: int | None, argument: int | None, source: str) -> int | None:
    """The sampling rate an input carries (a dict's, a decoder's) or else the `sampling_rate` argument; both given,
    they must agree."""
    if own is not None and argument is not None and own != argument:
        raise ValueError(
            f"sampling_rate={argument} differs from the audio {source}'s {own}: pass only one, or make them agree"
        )
    return own if own is not None else argument


class _Streamed(IterableDataset):
    """A generator of inputs as a torch dataset, which every transformers version's pipeline streams: before 5.14 a
    pipeline turned a generator into a list first (every input read before the first result, an IndexError when
    there was none)."""

    def __init__(self, inputs: types.GeneratorType):
        self.inputs = inputs

    def __iter__(self):
        return self.inputs


class MT3TranscriptionPipeline(ChunkPipeline):
    """Music transcription with MT3: audio -> `{"notes": [...], "midi": PrettyMIDI}` per input.

    Inputs: a file path, a 1-D array with `sampling_rate=`, a dict `{"array", "sampling_rate"}` (the `datasets`
    Audio format; `{"path"}` or `{"bytes"}` are read as files; a decoded row, torchcodec's `AudioDecoder`, is mixed to
    mono), or a list of those.

    Options (at construction or per call): `programs` (keep only the notes of these GM programs, "0-7,32",
    "piano,bass" or ints, and the drum notes; decoding is unchanged, so the kept notes are exactly the
    unfiltered transcription's), `return_midi` (True: a `pretty_midi.PrettyMIDI`; "bytes": a Standard MIDI File's
    bytes; False: notes only), `sampling_rate` (of array inputs), `generate_kwargs` (`max_new_tokens` also
    directly). `batch_size` counts segments
    (2.048 s each for mt3) per `generate()` call, across inputs; default the model's `segment_batch_size` for its device (generation_config.json).

    Each note is a dict: program, instrument (GM name, "Drums" for drums), is_drum, pitch, velocity, start, end (s).
    """

    # None: loaded from the model's folder where they are, so that a folder saved with the model only takes
    # `processor=` (transformers' processor-only mode) or `tokenizer=` + `feature_extractor=`
    _load_processor = None
    _load_image_processor = False
    _load_feature_extractor = None
    _load_tokenizer = None

    def __init__(self, *args, **kwargs):
        _check_cuda(kwargs.get("device"))
        super().__init__(*args, **kwargs)
        if self.tokenizer is None or self.feature_extractor is None:
            raise ValueError(
                "The music-transcription pipeline needs MT3's tokenizer and feature extractor, and they could not be "
                "loaded from the model's folder: pass processor= (AutoProcessor.from_pretrained of a folder that has "
                "them, which also says why one fails to load)"
            )
        if self._batch_size is None:
            self._batch_size = self.model.default_segment_batch_size

    def __call__(self, inputs, *args, **kwargs):
        if isinstance(inputs, types.GeneratorType):
            inputs = _Streamed(inputs)
        elif isinstance(inputs, list) and not inputs:  # a list gives a list (transformers' call reads inputs[0])
            return []
        return super().__call__(inputs, *args, **kwargs)

    def _sanitize_parameters(
        self, programs=None, return_midi=None, sampling_rate=None, generate_kwargs=None, max_new_tokens=None, **kwargs
    ):
        if kwargs:
            raise ValueError(f"Unexpected arguments for the music-transcription pipeline: {', '.join(sorted(kwargs))}")
        preprocess, forward, postprocess = {}, {}, {}
        if sampling_rate is not None:
            preprocess["sampling_rate"] = sampling_rate
        if programs is not None:
            postprocess["programs"] = parse_programs(programs)
        if generate_kwargs is not None or max_new_tokens is not None:
            given = dict(generate_kwargs or {})
            if max_new_tokens is not None:  # also a pipeline argument, as in the ASR pipeline
                if "max_new_tokens" in given:
                    raise ValueError("`max_new_tokens` is given both as an argument and in `generate_kwargs`")
                given["max_new_tokens"] = max_new_tokens
            # A call's generate options add to those the pipeline was built with (transformers would replace the
            # whole dict: a max_new_tokens cap set once was lost as soon as a call passed any other option).
            built = (getattr(self, "_forward_params", None) or {}).get("generate_kwargs") or {}
            forward["generate_kwargs"] = {**built, **given}
        if return_midi is not None:
            if return_midi not in (True, False, "bytes"):
                raise ValueError(f"return_midi={return_midi!r}: expected True, False or 'bytes'")
            # preprocess too: it checks that pretty_midi is there before any decoding, not after all of it
            preprocess["return_midi"] = postprocess["return_midi"] = return_midi
        return preprocess, forward, postprocess

    def load_audio(self, inputs, sampling_rate: int | None = None) -> np.ndarray:
        """Any accepted input -> mono float32 samples at the model's rate."""
        rate = self.feature_extractor.sampling_rate
        if isinstance(inputs, (str, os.PathLike, bytes)):
            return read_audio(inputs, rate)
        if isinstance(inputs, dict):
            if inputs.get("array") is None and inputs.get("raw") is not None:  # transformers' ASR pipeline's key
                inputs = {**inputs, "array": inputs["raw"]}
            if inputs.get("array") is None:
                source = inputs.get("bytes") or inputs.get("path")
                if source is None:
                    raise ValueError(f"Expected an audio dict with 'array' and 'sampling_rate' (or 'path' / 'bytes'); found keys {sorted(inputs)}")
                return read_audio(source, rate)
            inputs, sampling_rate = inputs["array"], _agreed_rate(inputs.get("sampling_rate"), sampling_rate, "dict")
        elif hasattr(inputs, "get_all_samples"):  # a decoded `datasets` Audio row: torchcodec's AudioDecoder
            decoded = inputs.get_all_samples()
            # (channels, samples) -> mono
            inputs, sampling_rate = decoded.data.mean(0), _agreed_rate(decoded.sample_rate, sampling_rate, "decoder")
        # a dict's samples may be a list (a top-level list is a batch of inputs)
        if not isinstance(inputs, (np.ndarray, torch.Tensor, list, tuple)):
            raise ValueError(
                "Expected a file path, a 1-D audio array, a dict with 'array' and 'sampling_rate' (or 'path' / "
                f"'bytes'), or a list of those; found {type(inputs).__name__}"
            )
        samples = self.feature_extractor._validate_audio(inputs)  # 1-D, finite, float32, or a ValueError
        if (
            not isinstance(sampling_rate, numbers.Real)
            or isinstance(sampling_rate, bool)
            or not sampling_rate > 0
            or not float(sampling_rate).is_integer()  # also inf
        ):
            raise ValueError(
                f"Expected a positive whole `sampling_rate` in Hz with an audio array (the model expects {rate} Hz); "
                f"found {sampling_rate!r}"
            )
        return resample(samples, int(sampling_rate), rate)

    def preprocess(self, inputs, sampling_rate: int | None = None, return_midi: bool | str = True):
        """Yield one item per segment: its features (1, frames, mel bins) and its first frame in the input."""
        if return_midi:
            import_pretty_midi()  # an ImportError now, not after the whole input is transcribed
        audio = self.load_audio(inputs, sampling_rate)
        extractor = self.feature_extractor
        extractor._warn_if_unscaled(audio)  # once per input, not once per chunk
        device = self._feature_device()
        frames_per_segment = extractor.frames_per_segment
        chunk = SEGMENTS_PER_CHUNK * frames_per_segment * extractor.hop_length
        for offset in range(0, len(audio), chunk):
            features, _ = extractor._extract_clip(
                audio[offset : offset + chunk], device, keep_on_device=device is not None, warn=False
            )
            # (segments, frames, mel bins), on the host: transformers' collate pads a batch into a CPU tensor, one
            # row at a time, so one copy of the chunk here beats a device-to-host copy per segment there
            features = torch.as_tensor(features).cpu()
            last = offset + chunk >= len(audio)
            # A chunk that is not the last is a whole number of segments; the extractor's end padding adds one
            # short segment that belongs to the next chunk.
            keep = len(features) if last else SEGMENTS_PER_CHUNK
            for index in range(keep):
                yield {
                    "input_features": features[index : index + 1],
                    "start_frame": torch.tensor([offset // extractor.hop_length + index * frames_per_segment]),
                    "is_last": last and index == keep - 1,
                }
        if not len(audio):  # no segment: one placeholder row so that the input still gets its (empty) result
            yield {
                "input_features": torch.zeros(1, frames_per_segment, extractor.feature_size),
                "start_frame": torch.tensor([-1]),
                "is_last": True,
            }

    def _feature_device(self) -> str | None:
        """Where the log-mel frames are computed: on the model's CUDA device (the extractor's float64 torch.stft
        path), since numpy on one core took ~27 s per hour of audio here, longer than a GPU decodes it; with numpy
        elsewhere (CPU; MPS has no float64) and in DataLoader workers (`num_workers`), which must not use CUDA."""
        if self.device.type != "cuda" or torch.utils.data.get_worker_info() is not None:
            return None
        return str(self.device)

    def _forward(self, model_inputs, generate_kwargs=None):
        start_frame = model_inputs["start_frame"]  # (rows,); -1 = placeholder of an empty input
        features = model_inputs["input_features"].to(self.model.dtype)  # (rows, frames, mel bins)
        real = (start_frame >= 0).cpu()
        tokens = torch.zeros(len(start_frame), 1, dtype=torch.long)  # (rows, 1 + longest); placeholders ignored
        if real.any():
            generated = self.model.generate(input_features=features[real.to(features.device)], **(generate_kwargs or {}))
            generated = getattr(generated, "sequences", generated).cpu()  # return_dict_in_generate: a ModelOutput
            if len(generated) != int(real.sum()):
                raise ValueError(
                    f"generate() returned {len(generated)} rows for {int(real.sum())} segments: the pipeline gives one "
                    "transcription per input (num_return_sequences must be 1); for several, call model.generate and "
                    "processor.batch_decode"
                )
            tokens = tokens.new_zeros(len(start_frame), generated.shape[1])
            tokens[real] = generated
        return {"tokens": tokens, "start_frame": start_frame, "is_last": model_inputs["is_last"]}

    def postprocess(self, model_outputs, return_midi: bool | str = True, programs: set[int] | None = None) -> dict:
        """One input's segments (in order) -> its notes as records, event counts and, with `return_midi`, its MIDI
        (a `pretty_midi.PrettyMIDI`, or the file's bytes with "bytes")."""
        rows, start_times = [], []
        for output in model_outputs:
            frame = int(output["start_frame"][0])
            if frame >= 0:
                rows.append(output["tokens"][0].tolist())
                # frame index / frames per second: the colab's segment start times, bit for bit
                start_times.append(frame / self.feature_extractor.frames_per_second)
        notes, invalid_events, dropped_events = self.tokenizer.decode_to_notes(rows, start_times)  # decoding order
        if programs is not None:
            # After decoding, not during: forbidding the other programs' events made the model write those
            # instruments' notes without a program event, so they were read as the allowed program's.
            notes = [note for note in notes if note.is_drum or note.program in programs]
        result = {
            "notes": [note_record(note) for note in sort_notes(notes)],
            "invalid_events": invalid_events,
            "dropped_events": dropped_events,
        }
        if return_midi:
            midi = self.tokenizer.notes_to_midi(notes)
            if return_midi == "bytes":
                buffer = io.BytesIO()
                midi.write(buffer)
                midi = buffer.getvalue()
            result["midi"] = midi
        return result


__all__ = ["MT3TranscriptionPipeline", "read_audio", "resample"]
