"""An evaluation case: text around a hole, the reference middle, and optionally a test to run."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FimCase:
    id: str
    prefix: str
    suffix: str
    reference: str
    mode: str = "single"  # single | multi
    test: str | None = None  # code that checks the completed program (HumanEval)
    entry_point: str | None = None
    language: str = "python"
    path: str | None = None
    metric: str = "es"  # es | bleu (docstrings)
