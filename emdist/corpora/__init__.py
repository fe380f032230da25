"""Corpora shipped inside the package (features and transcripts only)."""

from __future__ import annotations

from pathlib import Path

DIGITS = Path(__file__).resolve().parent / "digits"


def digits_dir(split: str) -> Path:
    """Path of the bundled digits data dir ``split`` (``train`` or ``test``)."""
    return DIGITS / split
