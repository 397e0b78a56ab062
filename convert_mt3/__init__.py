"""convert-mt3: Magenta MT3 T5X checkpoints -> Hugging Face transformers folders."""

__version__ = "0.1.0"
