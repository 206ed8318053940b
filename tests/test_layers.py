"""The house's shape: ldm's packages import one way (pyproject's import-linter contract), and light modules stay light.

Both run in a fresh interpreter: import-linter configures logging for its own output (disabling loggers
made before it), and an import check must not see what earlier tests imported.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

from tests.stage2 import ROOT


def test_packages_import_one_way():
    """No package imports from a higher layer, and no two packages import each other (see pyproject.toml)."""
    run = subprocess.run([shutil.which("lint-imports"), "--no-cache", "pyproject.toml"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0 and "0 broken" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]


def test_a_dataclass_import_does_not_load_open_clip():
    """Package __init__s import nothing eagerly: guidance needs only the Conditioning dataclass."""
    probe = "import sys, ldm.diffusion.guidance; print('open_clip' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
