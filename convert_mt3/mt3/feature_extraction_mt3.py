"""Feature extractor for MT3: 16 kHz mono audio -> per-segment log-mel spectrograms.

Reproduces the input pipeline of Magenta MT3 (github.com/magenta/mt3):
`colab/music_transcription_with_transformers.ipynb` (`InferenceModel._audio_to_frames`),
`t5.data.preprocessors.split_tokens_to_inputs_length`, `mt3/preprocessors.py` (`compute_spectrograms`),
`mt3/spectrograms.py` and `mt3/spectral_ops.py` (`compute_logmel`, `safe_log`).
"""

import os
import warnings

import numpy as np
from transformers.audio_utils import mel_filter_bank, spectrogram, window_function
from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor
from transformers.feature_extraction_utils import BatchFeature
from transformers.utils import TensorType, is_torch_available, logging

if is_torch_available():
    import torch


logger = logging.get_logger(__name__)

DEFAULT_SAMPLING_RATE = 16000
DEFAULT_HOP_LENGTH = 128
DEFAULT_N_FFT = 2048
DEFAULT_NUM_MEL_BINS = 512
DEFAULT_MEL_LO_HZ = 20.0
DEFAULT_MEL_HI_HZ = 7600.0
DEFAULT_FRAMES_PER_SEGMENT = 256
DEFAULT_LOG_FLOOR = 1e-5
DEFAULT_TORCH_SEGMENTS_PER_CHUNK = 16


class MT3BatchFeature(BatchFeature):
    """A `BatchFeature` whose `to()` moves and casts everything but what decoding reads on the host:
    `segment_start_times` stay float64 seconds (`inputs.to(device, torch.float16)` would move notes by up to tens of
    ms, and bfloat16 or MPS, which has no float64, would fail), and `segments_per_clip` stays where it is."""

    host_keys = ("segment_start_times", "segments_per_clip")

    def to(self, *args, **kwargs) -> "MT3BatchFeature":
        kept = {key: self.data.pop(key) for key in self.host_keys if key in self.data}
        try:
            super().to(*args, **kwargs)
        finally:
            self.data.update(kept)
        return self


def _check_device(device) -> None:
    """A `device=` the float64 torch path can run on, or a one-line ValueError (torch's own are an AssertionError
    for CUDA in a CPU-only build, a TypeError for float64 on MPS)."""
    if not is_torch_available():
        raise ValueError(f"device={device!r} needs torch, which is not installed; leave device=None.")
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r}: expected a torch device such as 'cpu' or 'cuda:0'.") from None
    if kind == "mps":
        raise ValueError("device='mps': the torch path computes in float64, which MPS lacks; leave device=None.")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available (torch {torch.__version__}); leave device=None.")


class MT3FeatureExtractor(SequenceFeatureExtractor):
    r"""
    Constructs an MT3 feature extractor.

    The audio is padded and cut into `hop_length`-sample frames exactly like the MT3 colab, grouped into segments of
    `frames_per_segment` frames (the last one shorter), and every segment gets its own log-mel spectrogram:
    `tf.signal.stft(frame_length=n_fft, frame_step=hop_length, fft_length=n_fft, periodic Hann, pad_end=True)`
    magnitude, TF's HTK `linear_to_mel_weight_matrix`, then `safe_log` (values <= 0 become `log_floor`). The last
    segment is zero-padded to `frames_per_segment` frames in the log domain (what seqio's feature converter does).

    Args:
        feature_size (`int`, *optional*, defaults to 512):
            Number of mel bins (MT3 `SpectrogramConfig.num_mel_bins`), the encoder input depth.
        sampling_rate (`int`, *optional*, defaults to 16000):
            Sampling rate the audio must already have; MT3 does not resample.
        hop_length (`int`, *optional*, defaults to 128):
            Samples per input frame and STFT hop (MT3 `hop_width`).
        n_fft (`int`, *optional*, defaults to 2048):
            STFT frame and FFT length (MT3 `FFT_SIZE`).
        mel_lo_hz (`float`, *optional*, defaults to 20.0):
            Lower edge of the mel filter bank (MT3 `MEL_LO_HZ`).
        mel_hi_hz (`float`, *optional*, defaults to 7600.0):
            Upper edge of the mel filter bank (DDSP `compute_logmel` default `hi_hz`).
        frames_per_segment (`int`, *optional*, defaults to 256):
            Encoder input length in frames (MT3 `inputs_length`).
        log_floor (`float`, *optional*, defaults to 1e-5):
            Value used for non-positive mel energies before the log (`safe_log` eps).
        padding_value (`float`, *optional*, defaults to 0.0):
            Log-domain value of padded frames in the last segment.
        torch_segments_per_chunk (`int`, *optional*, defaults to 16):
            Segments transformed at once by the torch path (bounds its memory on long audio).
        max_expected_peak (`float`, *optional*, defaults to 4.0):
            A clip whose absolute peak exceeds this gets a warning: most likely integer samples passed unscaled.
    """

    model_input_names = ["input_features"]
    _auto_class = "AutoFeatureExtractor"  # remote code: a saved extractor names its class (see MT3Tokenizer)

    def __init__(
        self,
        feature_size: int = DEFAULT_NUM_MEL_BINS,
        sampling_rate: int = DEFAULT_SAMPLING_RATE,
        hop_length: int = DEFAULT_HOP_LENGTH,
        n_fft: int = DEFAULT_N_FFT,
        mel_lo_hz: float = DEFAULT_MEL_LO_HZ,
        mel_hi_hz: float = DEFAULT_MEL_HI_HZ,
        frames_per_segment: int = DEFAULT_FRAMES_PER_SEGMENT,
        log_floor: float = DEFAULT_LOG_FLOOR,
        padding_value: float = 0.0,
        torch_segments_per_chunk: int = DEFAULT_TORCH_SEGMENTS_PER_CHUNK,
        max_expected_peak: float = 4.0,
        return_attention_mask: bool = False,
        **kwargs,
    ):
        super().__init__(
            feature_size=feature_size,
            sampling_rate=sampling_rate,
            padding_value=padding_value,
            return_attention_mask=return_attention_mask,
            **kwargs,
        )
        if hop_length <= 0 or n_fft < hop_length:
            raise ValueError(f"Expected 0 < hop_length <= n_fft, found hop_length={hop_length}, n_fft={n_fft}.")
        if frames_per_segment <= 0:
            raise ValueError(f"Expected frames_per_segment > 0, found {frames_per_segment}.")
        if log_floor <= 0:
            raise ValueError(f"Expected log_floor > 0, found {log_floor}.")
        if not 0 <= mel_lo_hz < mel_hi_hz <= sampling_rate / 2:
            raise ValueError(f"Expected 0 <= mel_lo_hz < mel_hi_hz <= sampling_rate / 2 (Nyquist), found mel_lo_hz="
                             f"{mel_lo_hz}, mel_hi_hz={mel_hi_hz}, sampling_rate={sampling_rate}.")
        self.hop_length = hop_length
        self.n_fft = n_fft
        self.mel_lo_hz = mel_lo_hz
        self.mel_hi_hz = mel_hi_hz
        self.frames_per_segment = frames_per_segment
        self.log_floor = log_floor
        self.torch_segments_per_chunk = torch_segments_per_chunk
        self.max_expected_peak = max_expected_peak
        # Periodic Hann = tf.signal.hann_window(periodic=True).
        self.window = window_function(n_fft, "hann", periodic=True)  # (n_fft,) float64
        # TF's linear_to_mel_weight_matrix: HTK mel scale, triangles in mel space, DC bin zeroed (its mel weight is
        # 0 anyway since mel(0) < mel(mel_lo_hz)). Agrees with TF's float64 construction to ~1e-13. Some of the
        # lowest filters hold no FFT bin at all (narrower than one bin) and stay all-zero, as in the original;
        # those mel bins always come out as log(log_floor).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.mel_filters = mel_filter_bank(
                num_frequency_bins=n_fft // 2 + 1,
                num_mel_filters=feature_size,
                min_frequency=mel_lo_hz,
                max_frequency=mel_hi_hz,
                sampling_rate=sampling_rate,
                norm=None,
                mel_scale="htk",
                triangularize_in_mel_space=True,
            )  # (n_fft // 2 + 1, feature_size) float64

    @property
    def frames_per_second(self) -> float:
        """Input frames per second (MT3 `SpectrogramConfig.frames_per_second`)."""
        return self.sampling_rate / self.hop_length

    def _validate_audio(self, audio) -> np.ndarray:
        """Turn the input into a finite 1-D float32 array or raise a ValueError saying what was found (also the
        pipeline's check of array inputs, before it resamples them)."""
        if is_torch_available() and isinstance(audio, torch.Tensor):
            audio = audio.detach().cpu()
            audio = (audio.float() if audio.is_floating_point() else audio).numpy()  # numpy has no bfloat16
        if isinstance(audio, (str, bytes, os.PathLike)):
            raise ValueError(
                f"Expected audio samples (a 1-D float array); found {type(audio).__name__}. The feature extractor "
                "does not read files: read them first (e.g. soundfile.read), or give files to the pipeline."
            )
        if isinstance(audio, dict) or np.isscalar(audio) or audio is None:
            found = f"a dict with keys {sorted(audio)}" if isinstance(audio, dict) else type(audio).__name__
            raise ValueError(f"Expected audio samples (a 1-D float array); found {found}.")
        if is_batch_of_clips(audio):
            raise ValueError(
                f"Expected one mono clip (a 1-D array or a list of floats); found a {type(audio).__name__} of "
                f"{len(audio)} sequences (several clips go in a list)."
            )
        given = type(audio).__name__
        try:
            audio = np.asarray(audio)
        except ValueError:  # numpy's "inhomogeneous shape" text, several lines
            raise ValueError(f"Expected audio samples (a 1-D float array); found a ragged {given}.") from None
        if audio.dtype.kind in "US":
            raise ValueError(
                f"Expected audio samples (a 1-D float array); found a {given} of strings. The feature extractor does "
                "not read files: give them to the pipeline, several as a list."
            )
        if audio.dtype.kind == "O":  # a generator, None among the samples, ...
            found = given if audio.ndim == 0 else f"a {given} holding non-numbers"
            raise ValueError(f"Expected audio samples (a 1-D float array); found {found}.")
        if audio.ndim != 1:
            channels = int(np.argmin(audio.shape)) if audio.ndim == 2 else None  # the shorter axis
            hint = (f" (mix the channels to mono first, e.g. audio.mean(axis={channels}); several clips go in a list)"
                    if channels is not None else "")
            raise ValueError(f"Expected mono audio as a 1-D array (num_samples,); found shape {audio.shape}{hint}.")
        if audio.size and not np.issubdtype(audio.dtype, np.floating):
            hint = " (int16 samples / 32768, int32 / 2147483648)" if audio.dtype.kind in "iu" else ""
            raise ValueError(f"Expected floating-point samples (about [-1, 1]){hint}; found dtype {audio.dtype}.")
        audio = audio.astype(np.float32, copy=False)  # TF computes the original on float32 samples
        if not np.all(np.isfinite(audio)):
            raise ValueError("Expected finite audio samples; found NaN or infinite values.")
        return audio

    def _warn_if_unscaled(self, audio: np.ndarray) -> None:
        peak = float(np.abs(audio).max()) if audio.size else 0.0
        if peak > self.max_expected_peak:
            # Unscaled integer samples transcribe as hundreds of spurious notes, with no error.
            logger.warning(
                f"The audio peaks at {peak:.4g}, far outside the [-1, 1] MT3 was trained on: integer samples must be "
                "scaled first (int16 samples / 32768, int32 / 2147483648), as audio libraries do when reading floats."
            )

    def _segment_bounds(self, num_samples: int) -> list[tuple[int, int]]:
        """[(first_frame, num_frames)] per segment, after the colab's padding of the waveform."""
        if num_samples == 0:
            return []
        # Colab `_audio_to_frames`: pad by `hop - len % hop`, i.e. a full extra frame if already a multiple.
        num_frames = (num_samples + self.hop_length - num_samples % self.hop_length) // self.hop_length
        return [
            (start, min(self.frames_per_segment, num_frames - start))
            for start in range(0, num_frames, self.frames_per_segment)
        ]

    def _safe_log(self, mel: np.ndarray) -> np.ndarray:
        """`spectral_ops.safe_log`: log(x), with x <= 0 replaced by log_floor (x in (0, floor) is kept)."""
        return np.log(np.where(mel <= 0.0, self.log_floor, mel))

    def _np_extract_segment(self, samples: np.ndarray) -> np.ndarray:
        """Log-mel of one segment's samples (num_frames * hop,) -> (num_frames, num_mel_bins) float32."""
        # pad_end=True: zeros after the segment so that frame k covers samples [k*hop, k*hop + n_fft).
        waveform = np.pad(samples.astype(np.float64), (0, self.n_fft - self.hop_length))
        mel = spectrogram(
            waveform,
            self.window,
            frame_length=self.n_fft,
            hop_length=self.hop_length,
            fft_length=self.n_fft,
            power=1.0,
            center=False,
            mel_filters=self.mel_filters,
            mel_floor=0.0,  # no floor here: safe_log below keeps values in (0, log_floor)
            dtype=np.float64,  # the mel energies; transformers holds the FFT itself in complex64
        )  # (num_mel_bins, num_frames) float64
        return self._safe_log(mel.T).astype(np.float32)

    def _torch_extract_segments(
        self, samples: np.ndarray, bounds: list[tuple[int, int]], device: str
    ) -> "torch.Tensor":
        """Same as `_np_extract_segment` for every segment, with torch.stft (float64) on `device`,
        `torch_segments_per_chunk` segments at a time: (segments, frames_per_segment, num_mel_bins) float32 there."""
        hop, n_fft = self.hop_length, self.n_fft
        seg_len = self.frames_per_segment * hop + n_fft - hop
        window = torch.from_numpy(self.window).to(device=device, dtype=torch.float64)
        mel_filters = torch.from_numpy(self.mel_filters).to(device=device, dtype=torch.float64)
        waveform = torch.from_numpy(samples).to(device)  # float32 samples, widened per segment as numpy does
        out = torch.full(
            (len(bounds), self.frames_per_segment, self.feature_size), self.padding_value, dtype=torch.float32,
            device=device,
        )
        chunk = int(self.torch_segments_per_chunk)  # checked here: it is an attribute a user may set
        if chunk < 1:
            raise ValueError(f"Expected torch_segments_per_chunk >= 1, found {self.torch_segments_per_chunk}.")
        for first in range(0, len(bounds), chunk):
            part = bounds[first : first + chunk]
            batch = torch.zeros((len(part), seg_len), dtype=torch.float64, device=device)  # zeros = pad_end padding
            for row, (start, num_frames) in enumerate(part):
                batch[row, : num_frames * hop] = waveform[start * hop : (start + num_frames) * hop]
            stft = torch.stft(
                batch,
                n_fft=n_fft,
                hop_length=hop,
                win_length=n_fft,
                window=window,
                center=False,
                return_complex=True,
            )  # (chunk, n_fft // 2 + 1, frames_per_segment) complex128
            mel = torch.matmul(stft.abs().transpose(1, 2), mel_filters)  # (chunk, frames, num_mel_bins)
            log_mel = torch.log(torch.where(mel <= 0.0, torch.full_like(mel, self.log_floor), mel)).to(torch.float32)
            for row, (_, num_frames) in enumerate(part):
                out[first + row, :num_frames] = log_mel[row, :num_frames]
        return out

    def __call__(
        self,
        audio: np.ndarray | list[float] | list[np.ndarray],
        sampling_rate: int | None = None,
        return_tensors: str | TensorType | None = None,
        device: str | None = None,
        **kwargs,
    ) -> BatchFeature:
        """
        Compute MT3 encoder inputs for one mono clip, or for a batch of clips.

        Args:
            audio (`np.ndarray`, `torch.Tensor`, `list[float]`, or a list of those): mono samples at `sampling_rate`
                Hz, shape (num_samples,); a list of clips gives their segments one after the other.
            sampling_rate (`int`, *optional*): sampling rate of `audio`; must equal the extractor's (no resampling).
            return_tensors (`str` or [`~utils.TensorType`], *optional*): "pt" or "np".
            device (`str`, *optional*): if given, compute with torch.stft on this device (float64) instead of numpy;
                with `return_tensors="pt"` the features stay there (an hour's 0.9 GB is not copied back and forth).

        Returns:
            [`MT3BatchFeature`] with `input_features` (num_segments, frames_per_segment, feature_size) float32 and
            `segment_start_times` (num_segments,) float64: start of each segment in its clip, in seconds, computed
            like the colab's `input_times` (frame index / frames per second); for a list of clips also
            `segments_per_clip` (num_clips,) int64, which `batch_decode` uses to give each clip its own notes. Its
            `to(device, dtype)` moves and casts `input_features` only. (An empty list is one clip without samples.)
        """
        if kwargs:  # what other feature extractors take (padding, return_attention_mask, ...) has no use here
            logger.warning_once(f"{self.__class__.__name__}() ignores the arguments {sorted(kwargs)}")
        if isinstance(sampling_rate, (str, bytes, bool)):
            raise ValueError(
                f"Expected sampling_rate in Hz as a number; found {type(sampling_rate).__name__} {sampling_rate!r}."
            )
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ValueError(
                f"The model corresponding to this feature extractor: {self.__class__.__name__} was trained using a"
                f" sampling rate of {self.sampling_rate}. Please make sure that the provided `audio` input was"
                f" sampled with {self.sampling_rate} and not {sampling_rate}."
            )
        if sampling_rate is None:
            logger.warning_once(
                f"It is strongly recommended to pass the `sampling_rate` argument to `{self.__class__.__name__}()`. "
                "Failing to do so can result in silent errors that might be hard to debug."
            )
        if device is not None:
            _check_device(device)
        keep_on_device = device is not None and return_tensors == "pt"  # TensorType.PYTORCH equals "pt"
        batch = is_batch_of_clips(audio)
        clips = []
        for index, clip in enumerate(audio if batch else [audio]):
            try:
                clips.append(self._extract_clip(clip, device, keep_on_device))
            except ValueError as err:
                raise ValueError(f"clip {index}: {err}" if batch else str(err)) from None
        join = torch.cat if keep_on_device else np.concatenate
        data = {
            "input_features": join([features for features, _ in clips]),
            "segment_start_times": np.concatenate([times for _, times in clips]),
        }
        if batch:
            data["segments_per_clip"] = np.array([len(times) for _, times in clips], dtype=np.int64)
        return MT3BatchFeature(data, tensor_type=return_tensors)

    def _extract_clip(self, audio, device: str | None, keep_on_device: bool, warn: bool = True) -> tuple:
        """One clip -> (features (num_segments, frames_per_segment, feature_size) float32, numpy or a torch tensor
        on `device` with `keep_on_device`; segment start times (num_segments,) float64 seconds). `warn=False`: the
        caller checked the peak of the whole audio (the pipeline, which extracts it a chunk at a time)."""
        samples = self._validate_audio(audio)
        if warn:
            self._warn_if_unscaled(samples)
        bounds = self._segment_bounds(samples.shape[0])
        # The colab pads the waveform with zeros up to the last frame (at least one extra frame).
        total_samples = (bounds[-1][0] + bounds[-1][1]) * self.hop_length if bounds else 0
        samples = np.pad(samples, (0, total_samples - samples.shape[0]))

        if device is not None:
            features = self._torch_extract_segments(samples, bounds, device)
            if not keep_on_device:
                features = features.cpu().numpy()
        else:
            features = np.full(
                (len(bounds), self.frames_per_segment, self.feature_size), self.padding_value, dtype=np.float32
            )  # (num_segments, frames_per_segment, num_mel_bins)
            for index, (start, num_frames) in enumerate(bounds):
                segment = samples[start * self.hop_length : (start + num_frames) * self.hop_length]
                features[index, :num_frames] = self._np_extract_segment(segment)

        # Same float arithmetic as the colab: np.arange(num_frames) / frames_per_second.
        start_times = np.array([start / self.frames_per_second for start, _ in bounds], dtype=np.float64)
        return features, start_times

    def to_dict(self) -> dict:
        """Serializable settings only (the window and the mel matrix are rebuilt from them)."""
        output = super().to_dict()
        output.pop("window", None)
        output.pop("mel_filters", None)
        return output


def is_batch_of_clips(audio) -> bool:
    """Whether `audio` is a list of clips rather than one clip (a list of floats)."""
    first = audio[0] if isinstance(audio, (list, tuple)) and len(audio) > 0 else None
    return first is not None and not (np.isscalar(first) or getattr(first, "ndim", None) == 0)  # 0-d: a sample


__all__ = ["MT3BatchFeature", "MT3FeatureExtractor"]
