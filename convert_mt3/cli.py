"""What the command-line tools share: usage and other errors in one line, signals, the weight dtypes they offer."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

DTYPES = ("float32", "bfloat16", "float16")  # --dtype of both tools: float32 first, the trained precision


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, a job scheduler): cleaned up as Ctrl-C is, so no lock or temporary file stays."""


class Interrupts:
    """SIGINT / SIGTERM as KeyboardInterrupt / Terminated in the main thread, where raising them cannot break the
    interpreter. Inside `hold()` (torch's and transformers' imports, where a raise aborted the process in pybind11
    code or surfaced as another error) a signal waits for the end of the block; in importlib between taking and
    releasing its module locks (a conversion interrupted there hung), in threading's locks and in finalizers, the
    same signal is sent again 10 ms later."""

    NOT_INTERRUPTIBLE = ("<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>", threading.__file__)

    def __init__(self):
        self.holding = False
        self.pending: int | None = None
        self.written = False  # the output is in place: an interrupt from now on must not say "nothing written"

    @staticmethod
    def error(signum: int) -> KeyboardInterrupt:
        return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    def handle(self, signum: int, frame) -> None:
        if self.holding:
            self.pending = signum
            return
        if frame is not None and (frame.f_code.co_filename in self.NOT_INTERRUPTIBLE or frame.f_code.co_name == "__del__"):
            again = threading.Timer(0.01, os.kill, (os.getpid(), signum))
            again.daemon = True
            again.start()
            return
        raise self.error(signum)

    @contextmanager
    def hold(self) -> Iterator[None]:
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.pending is not None:
            signum, self.pending = self.pending, None
            raise self.error(signum)

    @contextmanager
    def installed(self) -> Iterator[None]:
        """SIGINT and SIGTERM go to `handle` while the block runs, then the previous handlers come back. Only the
        main thread may set handlers: called from another (or from tests), the block runs without them."""
        signals = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
        previous = {signum: signal.signal(signum, self.handle) for signum in signals}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                if handler is not None:  # None: set outside Python, cannot be put back
                    signal.signal(signum, handler)

    @staticmethod
    def report(interrupt: KeyboardInterrupt) -> tuple[str, int]:
        """What a tool says and exits with: ("terminated", 143) for SIGTERM, ("interrupted", 130) for Ctrl-C."""
        if isinstance(interrupt, Terminated):
            return "terminated", 128 + signal.SIGTERM
        return "interrupted", 128 + signal.SIGINT

    @contextmanager
    def commit(self) -> Iterator[None]:
        """Moving an output into place: a signal waits for the end of the block, after which it is written."""
        with self.hold():
            yield
            self.written = True


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
