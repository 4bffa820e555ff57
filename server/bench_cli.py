"""`localcoder bench`."""

from __future__ import annotations

import argparse

from localcoder.cli import not_implemented


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


run = not_implemented("bench", "issue #3")
