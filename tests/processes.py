"""Run a command, or the ldm CLI, in a session of its own (every rank and loader worker), killing the whole
session on timeout."""

from __future__ import annotations

import atexit
import importlib.util
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# `ldm` runs fork from a server that imported ldm.cli once per test process: a fresh interpreter spends about 10 s
# (2 AVX2 cores) importing Lightning, torchmetrics and torchvision before it reads its first option.
_LDM_SERVER = multiprocessing.get_context("forkserver")
_LDM_SERVER.set_forkserver_preload(["ldm.cli"])


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


def run_ldm(args: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None,
            killed: bool = False, status: int = 0) -> str:
    """`python -m ldm.cli <args>` as run_isolated runs a command (a process and session of its own, its exit
    status and output), without the interpreter's start-up; a DDP run's other ranks start as Lightning starts them."""
    return run_main("ldm.cli", ["ldm", *args], cwd, timeout, env, killed, status)


def run_main(module: str, argv: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None,
             killed: bool = False, status: int = 0) -> str:
    """`python -m <module>` with ``sys.argv`` ``argv`` (its ``main()``), as run_ldm runs ldm: forked from the server
    that imported ldm.cli."""
    with tempfile.NamedTemporaryFile("r", suffix=".log") as log:
        proc = _LDM_SERVER.Process(target=_main_process, args=(module, argv, str(cwd), {**os.environ, **(env or {})},
                                                               log.name))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.join()
            pytest.fail(f"{' '.join(argv[:4])} ... did not finish in {timeout} s (hung?)\n{log.read()[-3000:]}")
        text = log.read()
    assert proc.exitcode == (-signal.SIGKILL if killed else status), text[-3000:]
    return text


def _main_process(module: str, argv: list[str], cwd: str, env: dict[str, str], log: str) -> None:
    """The forked process: what `python -m <module> <argv[1:]>` would be, output to ``log``."""
    os.setsid()
    multiprocessing.set_start_method("fork", force=True)  # the interpreter's default (loader workers), not the server's
    os.chdir(cwd)
    sys.path.insert(0, cwd)  # as `python -m` puts the working directory first
    os.environ.clear()
    os.environ.update(env)
    if "OMP_NUM_THREADS" in env:  # read at import in a fresh interpreter: the server imported torch without it
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    output = os.open(log, os.O_WRONLY | os.O_TRUNC)
    os.dup2(output, 1)
    os.dup2(output, 2)
    import __main__

    __main__.__spec__ = importlib.util.find_spec(module)  # Lightning starts DDP ranks as `python -m <main> <argv>`
    sys.argv = argv
    main = importlib.import_module(module).main

    try:
        main()
    finally:  # a forked process ends in os._exit: run what interpreter exit would
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
