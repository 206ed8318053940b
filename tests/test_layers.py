"""The house's shape: ldm's packages import one way (pyproject's import-linter contract), and light modules stay light."""

from __future__ import annotations

import subprocess
import sys

from importlinter.cli import lint_imports

from tests.stage2 import ROOT


def test_packages_import_one_way(monkeypatch, capsys):
    """No package imports from a higher layer, and no two packages import each other (see pyproject.toml)."""
    monkeypatch.chdir(ROOT)
    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    assert code == 0, capsys.readouterr().out[-3000:]


def test_a_dataclass_import_does_not_load_open_clip():
    """Package __init__s import nothing eagerly: guidance needs only the Conditioning dataclass."""
    probe = "import sys, ldm.diffusion.guidance; print('open_clip' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
