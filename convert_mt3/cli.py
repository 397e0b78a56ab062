"""What the command-line tools share: usage and other errors in one line, the weight dtypes they offer."""

from __future__ import annotations

import argparse
from typing import NoReturn

DTYPES = ("float32", "bfloat16", "float16")  # --dtype of both tools: float32 first, the trained precision


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, a job scheduler): cleaned up as Ctrl-C is, so no lock or temporary file stays."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage error as one `error: ...` line (exit status 2) instead of the whole usage banner
    above it: the banner of `python -m convert_mt3` is 15 lines and hid the one that says what is wrong."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def printable(text: str) -> str:
    """`text` on one line, newlines and terminal escapes shown escaped: the names in it come from the user's disk
    or a checkpoint."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line (numpy, safetensors and HTTP errors span several), or its
    class name when it has none; a KeyError's without the quotes its str() adds."""
    text = str(err.args[0]) if isinstance(err, KeyError) and len(err.args) == 1 else str(err)
    return (text.strip().splitlines() or [type(err).__name__])[0]
