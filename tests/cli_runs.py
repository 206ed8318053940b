"""What tests that run experiments through the `ldm` CLI share: their marks, and tiny 16 px shapes shards."""

from __future__ import annotations

from pathlib import Path

import pytest

from ldm.data.synthetic import write_shapes

CLI_MARKS = [  # a module's `pytestmark`
    pytest.mark.filterwarnings("ignore:LightningCLI's args parameter"),  # pytest's own argv is not ours
    pytest.mark.usefixtures("one_thread"),  # tiny models run fastest on one thread
]
TINY_SIZE = 16  # px: the side of the tiny shapes


def tiny_shapes(tmp_path_factory: pytest.TempPathFactory, test: int = 0) -> Path:
    """A folder of synthetic shapes shards at 16 px: 4 train and 2 val samples, and `test` test samples."""
    root = tmp_path_factory.mktemp("shapes")
    write_shapes(root, train=4, val=2, test=test, size=TINY_SIZE)
    return root
