"""Run a multi-process command (DDP launches) in its own session, killing every rank on timeout."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest


def run_isolated(command: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None,
                 killed: bool = False, status: int = 0) -> str:
    """The command's output; fails the test on an exit status other than ``status`` (with ``killed``: unless
    SIGKILL ended it) or when it outlives `timeout` (a hang)."""
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, **(env or {})})
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole session: every rank and loader worker
        log, _ = proc.communicate()
        pytest.fail(f"{' '.join(command[:4])} ... did not finish in {timeout} s (hung?)\n{log[-3000:]}")
    assert proc.returncode == (-signal.SIGKILL if killed else status), log[-3000:]
    return log
