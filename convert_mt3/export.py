"""Checkpoint -> model -> verified `save_pretrained` folder, built beside OUT_DIR and moved in at the end.

    read_checkpoint -> derive_config -> t5x_to_state_dict -> MT3ForConditionalGeneration
      -> temporary folder (safetensors, configs, processor, Hub code, card)
      -> reload with trust_remote_code and compare -> manifest -> move into OUT_DIR (locked; see output.py)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers.initialization import no_init_weights

from . import __version__
from .checkpoint import T5XCheckpoint, read_checkpoint
from .cli import DTYPES as DTYPE_NAMES
from .cli import first_line
from .config import derive_config, find_gin
from .mapping import t5x_to_state_dict
from .model_card import render_model_card
from .mt3.configuration_mt3 import MT3Config
from .mt3.feature_extraction_mt3 import MT3FeatureExtractor
from .mt3.modeling_mt3 import MT3ForConditionalGeneration
from .mt3.processing_mt3 import MT3Processor
from .mt3.tokenization_mt3 import MT3Tokenizer
from .output import check_out_dir, move_into_place, out_dir_lock, write_manifest
from .parity import measure_golden_parity, parity_failures
from .variant import Variant, derive_variant

HUB_CODE_DIR = Path(__file__).parent / "mt3"
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
# Reloaded folder vs in-memory model on the check input: same weights and code, so float32
# agrees to rounding; half precisions are compared with the float32 source model.
RELOAD_TOLERANCE = {"float32": 1e-5, "bfloat16": 0.5, "float16": 0.05}
AUTO_MAP = {
    "AutoConfig": "configuration_mt3.MT3Config",
    "AutoModel": "modeling_mt3.MT3ForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_mt3.MT3ForConditionalGeneration",
    # audio in, tokens out: where transformers registers Pop2Piano and Whisper
    "AutoModelForSpeechSeq2Seq": "modeling_mt3.MT3ForConditionalGeneration",
}
# What `Pipeline.save_pretrained` writes for a pipeline registered with `PIPELINE_REGISTRY.register_pipeline`:
# `pipeline(model=...)` reads it to find the task and its class in the folder's remote code.
CUSTOM_PIPELINES = {
    "music-transcription": {"impl": "pipeline_mt3.MT3TranscriptionPipeline", "pt": ["AutoModel"], "type": "audio"},
}


class ExportError(ValueError):
    """The output folder cannot be written, or the written folder fails its check."""


@dataclass
class ConversionResult:
    out_dir: Path
    source: Path
    step: int | None
    num_arrays: int
    num_inline: int
    num_zarr: int
    num_parameters: int
    dtype: str
    reload_max_abs_error: float
    variant: Variant
    gin: Path | None  # the config.gin read, None: none found (the published MT3 layout)
    parity: dict[str, Any] = field(default_factory=dict)


def build_model(checkpoint: T5XCheckpoint, config: MT3Config) -> MT3ForConditionalGeneration:
    """An MT3 model holding exactly the checkpoint's arrays (strict: all used, all filled)."""
    with no_init_weights():  # every parameter is overwritten below; skip random init
        model = MT3ForConditionalGeneration(config)
    expected = {name: tensor.shape for name, tensor in model.state_dict().items()}
    model.load_state_dict(t5x_to_state_dict(checkpoint.arrays, expected), strict=True, assign=True)
    return model.eval()


def check_input(config: MT3Config, frames: int = 16, tokens: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, seeded input for comparing two copies of a model (small: it only has to catch mistakes)."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1, frames, config.input_depth, generator=generator)
    decoder_ids = torch.randint(0, config.vocab_size, (1, tokens), generator=generator)
    return features, decoder_ids


@torch.no_grad()
def logits_of(model: torch.nn.Module, features: torch.Tensor, decoder_ids: torch.Tensor) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    return model(input_features=features.to(dtype), decoder_input_ids=decoder_ids).logits.float()


def verify_folder(folder: Path, reference: MT3ForConditionalGeneration, dtype: str) -> float:
    """Reload `folder` the way a user does (Auto classes, remote code) and compare with `reference`."""
    from transformers import AutoModel, AutoProcessor

    reloaded = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=DTYPES[dtype]).eval()
    if type(reloaded).__name__ != "MT3ForConditionalGeneration":
        raise ExportError(f"{folder}: AutoModel loaded {type(reloaded).__name__}, expected MT3ForConditionalGeneration")
    AutoProcessor.from_pretrained(folder, trust_remote_code=True)  # must resolve, else a broken upload
    source = reference.state_dict()
    for name, tensor in reloaded.state_dict().items():
        if not torch.equal(tensor, source[name].to(tensor.dtype)):
            raise ExportError(f"{folder}: reloaded parameter {name} differs from the checkpoint array")
    features, decoder_ids = check_input(reference.config)
    error = (logits_of(reloaded, features, decoder_ids) - logits_of(reference, features, decoder_ids)).abs().max().item()
    if not error <= RELOAD_TOLERANCE[dtype]:
        raise ExportError(f"{folder}: reloaded logits differ from the source model by {error:.3g} (> {RELOAD_TOLERANCE[dtype]})")
    return error


def _hub_code_files() -> list[Path]:
    return sorted(p for p in HUB_CODE_DIR.glob("*.py") if p.name != "__init__.py")


def write_folder(folder: Path, model: MT3ForConditionalGeneration, dtype: str, variant: Variant) -> None:
    """save_pretrained of model, processor (set up for the checkpoint's variant) and remote code into `folder`."""
    model.config.auto_map = dict(AUTO_MAP)
    model.config.custom_pipelines = dict(CUSTOM_PIPELINES)
    # model_max_length: the longest targets the decoder has positions for (EOS included); the processor warns above it
    tokenizer = MT3Tokenizer(**variant.tokenizer_kwargs(), model_max_length=model.config.max_target_length)
    # the time shifts' ids, which drafts move on in time when they guess a loop (generation_mt3.MT3GreedyPool._draft)
    model.generation_config.draft_shift_ids = tokenizer.event_type_ids("shift")
    model.to(DTYPES[dtype]).save_pretrained(folder, safe_serialization=True)
    feature_extractor = MT3FeatureExtractor(
        feature_size=model.config.input_depth, frames_per_segment=variant.frames_per_segment
    )
    MT3Processor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(folder)
    feature_extractor.save_pretrained(folder)  # also preprocessor_config.json, which AutoFeatureExtractor reads first
    for file in _hub_code_files():  # verbatim, so the folder runs with transformers alone
        shutil.copyfile(file, folder / file.name)
    # safetensors writes its file private (0600, through a temporary file): the weights get the permissions every
    # other file here got from the umask, so that a folder shared with or served to other users loads
    mode = stat.S_IMODE((folder / "config.json").stat().st_mode)
    for weights in folder.glob("*.safetensors"):
        weights.chmod(mode)


def convert(
    checkpoint: T5XCheckpoint | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    quiet: bool = False,
    golden_dir: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    variant_overrides: dict[str, Any] | None = None,
    repo_id: str | None = None,
    commit: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
) -> ConversionResult:
    """Convert a T5X MT3 checkpoint (a folder, or one already read) into a verified folder at `out_dir`.

    An existing `out_dir` is replaced (with `overwrite`) only if convert-mt3 wrote it; see `output.py`. `commit`:
    a context the move into place and the removal of what it leaves run in (the CLI defers signals there, so that
    an interrupted run is either not written or written whole, with nothing left beside it).
    """
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    out_dir = Path(out_dir).absolute()
    source = checkpoint.path if isinstance(checkpoint, T5XCheckpoint) else Path(checkpoint)
    check_out_dir(out_dir, source, overwrite)
    with out_dir_lock(out_dir):
        if not isinstance(checkpoint, T5XCheckpoint):
            checkpoint = read_checkpoint(checkpoint, quiet=quiet)
        return _convert_locked(
            checkpoint, out_dir, dtype, overwrite, quiet, golden_dir, overrides, variant_overrides, repo_id, commit
        )


def _convert_locked(
    checkpoint: T5XCheckpoint,
    out_dir: Path,
    dtype: str,
    overwrite: bool,
    quiet: bool,
    golden_dir: str | os.PathLike | None,
    overrides: dict[str, Any] | None,
    variant_overrides: dict[str, Any] | None,
    repo_id: str | None,
    commit: Callable[[], contextlib.AbstractContextManager[None]],
) -> ConversionResult:
    gin = find_gin(checkpoint.path)
    config = derive_config(checkpoint.arrays, gin, overrides)
    variant = derive_variant(config.vocab_size, gin, variant_overrides, config.max_position_embeddings)
    model = build_model(checkpoint, config)
    num_parameters = sum(p.numel() for p in model.parameters())
    parity = measure_golden_parity(model, Path(golden_dir), quiet=quiet) if golden_dir else {}
    failures = parity_failures(parity) if parity else []
    if failures:  # a model that misses the original's outputs is not written, nor pushed
        raise ExportError(f"--golden {golden_dir}: the model misses the original's outputs ({'; '.join(failures)}); "
                          "nothing written")

    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging_root = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as err:
        raise ExportError(f"{out_dir}: cannot be written ({err.strerror or err})") from None
    # Named as OUT_DIR: transformers caches a local folder's remote code under HF_MODULES_CACHE/<folder name>/<code
    # hash>, so the reload check then shares the entry a later load of OUT_DIR uses instead of adding one per run.
    staging = staging_root / out_dir.name
    try:
        staging.mkdir()
        reference = model
        if dtype != "float32":  # keep a float32 copy to compare the half-precision folder with
            reference = build_model(checkpoint, config)
        write_folder(staging, model, dtype, variant)
        result = ConversionResult(
            out_dir=out_dir,
            source=checkpoint.path,
            step=checkpoint.step,
            num_arrays=len(checkpoint.arrays),
            num_inline=checkpoint.num_inline,
            num_zarr=checkpoint.num_zarr,
            num_parameters=num_parameters,
            dtype=dtype,
            reload_max_abs_error=verify_folder(staging, reference, dtype),
            variant=variant,
            gin=gin,
            parity=parity,
        )
        (staging / "README.md").write_text(render_model_card(result, __version__, repo_id))
        write_manifest(staging, __version__)
        with commit():
            move_into_place(staging, out_dir, checkpoint.path, overwrite)
            shutil.rmtree(staging_root, ignore_errors=True)
    except OSError as err:
        # a file elsewhere (transformers' module cache, which the reload check writes) is named: another disk
        elsewhere = f"{err.filename}: " if err.filename and not _beside(Path(err.filename), out_dir) else ""
        raise ExportError(f"{out_dir}: cannot be written ({elsewhere}{err.strerror or err})") from None
    except SafetensorError as err:  # its I/O errors (a full disk) are not OSErrors
        raise ExportError(f"{out_dir}: cannot be written ({first_line(err)})") from None
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    return result


def _beside(path: Path, out_dir: Path) -> bool:
    """Whether `path` is in OUT_DIR or in a folder this run names after it beside it (staging, previous)."""
    try:
        top = path.absolute().relative_to(out_dir.parent).parts[0]
    except (ValueError, IndexError):
        return False
    return top == out_dir.name or top.startswith(f".{out_dir.name}.")


__all__ = ["ConversionResult", "ExportError", "build_model", "convert", "verify_folder", "write_folder"]
