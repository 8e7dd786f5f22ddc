"""Helpers shared by the unit and integration tests (no tests here)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository root
