"""Shared fixtures: the objectives every diffusion test runs over, no weight downloads, and a network guard."""

from __future__ import annotations

import socket

import pytest
import torch

from ldm.diffusion.objectives import Objective
from tests.tiny_models import OBJECTIVES


@pytest.fixture(params=list(OBJECTIVES), ids=list(OBJECTIVES))
def objective(request) -> Objective:
    return OBJECTIVES[request.param]()


# The longest files (seconds on 2 cores): with `pytest -n 2` (README's test command; pyproject adds --dist loadfile)
# each worker takes whole files in collection order, so these go first and overlap the many short files instead of trailing.
LONGEST_FIRST = ("test_latent_diffusion.py", "test_resume.py", "test_resume_ddp.py", "test_metrics.py", "test_latent_cache.py",
                 "test_quickstart.py", "test_multinode.py", "test_cli.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Collect the longest files first (a stable sort: each file's own order is kept)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session", autouse=True)
def no_downloads():
    """Pretrained weights are never downloaded: ldm.weights.pretrained honours LDM_OFFLINE (subprocesses inherit it).

    Session-wide, so module fixtures see it too; a test may lift it with its own ``monkeypatch``.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LDM_OFFLINE", "1")
        yield


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; several thrash a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
