"""What the command-line tools share: usage errors in one line."""

from __future__ import annotations

import argparse
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage error as one `error: ...` line (exit status 2) instead of the whole usage banner
    above it: the banner of `python -m convert_mt3` is 15 lines and hid the one that says what is wrong."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")
