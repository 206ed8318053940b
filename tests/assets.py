"""Real files from the shared assets folder (``../shared/assets`` from the project root), when this machine has it."""

from __future__ import annotations

from pathlib import Path

import pytest

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"


def asset(relative: str, without: str) -> Path:
    """The asset at ``relative``, or skip the test; ``without`` names the test covering the same path with no file."""
    path = ASSETS / relative
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared assets folder is not on this machine); {without} runs the same "
                    "code path without it")
    return path
