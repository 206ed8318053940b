"""Exact and elastic resume under 2-process DDP: a DDP run SIGKILLed mid-epoch resumes bit for bit on 2 processes,
and, stopped by a SIGTERM to rank 1 alone, again; its checkpoint also resumes on 1 process with the rest of the
epoch's samples once (the runs: resume_runs.py)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.resume_runs import (
    SIGNALLED,
    assert_resumed_exactly,
    fit,
    losses,
    record_keys,
    recorded,
    signalled_run,
    with_callbacks,
    write_resume_shards,
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_resume_shards(tmp_path_factory)


KILLED_CHECKPOINT = 3  # the periodic checkpoint (every 3 steps) before the kill after step 5


@pytest.fixture(scope="module")
def ddp_uninterrupted(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp-uninterrupted")
    fit(shards, out, ddp=True)
    return out


@pytest.fixture(scope="module")
def ddp_signalled(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A DDP run SIGKILLed at the end of step 5 (its last.ckpt: step 3's), resumed, and stopped by a SIGTERM to
    rank 1 alone after step 7 (see signalled_run); its batches' keys recorded throughout. Returns the run folder
    and a copy of the step-7 checkpoint."""
    out = tmp_path_factory.mktemp("ddp-signalled") / "run"
    kill = {"class_path": "tests.tiny_modules.KillAt", "init_args": {"step": 5}}
    fit(shards, out, *with_callbacks(out, kill, record_keys(out / "keys")), ddp=True, expect_kill=True)
    last = out / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == KILLED_CHECKPOINT
    return out, signalled_run(shards, out, "SIGTERM", True, "--ckpt_path", str(last))


def test_a_ddp_run_killed_then_signalled_resumes_exactly_each_time(
        shards: Path, ddp_uninterrupted: Path, ddp_signalled: tuple[Path, Path]) -> None:
    """kill -9 of every rank mid-epoch, then a spot instance's SIGTERM to rank 1 alone: the first resume repeats
    steps 3 to 7 bit for bit, every rank finishes step 7 and stops, and the second resume runs to the end."""
    out, stopped = ddp_signalled
    fit(shards, out, "--ckpt_path", str(stopped), ddp=True)
    assert_resumed_exactly(ddp_uninterrupted, out, KILLED_CHECKPOINT)  # each run's logged steps replace the last's


def test_a_ddp_checkpoint_resumes_on_one_process_with_the_rest_of_its_epoch(
        shards: Path, ddp_signalled: tuple[Path, Path], tmp_path: Path) -> None:
    """Elastic resume, 2 ranks -> 1: the samples the interrupted epoch had left are trained once on the single
    rank (none repeated, none lost), then the epochs go on at the new size (4 batches, not the resumed epoch's 3);
    steps and weights continue."""
    stopped_run, stopped = ddp_signalled
    out, steps = tmp_path / "run", 15
    log = fit(shards, out, *with_callbacks(out, record_keys(out / "keys")), "--ckpt_path", str(stopped),
              "--trainer.max_steps", str(steps))
    assert "resuming a checkpoint of 2 ranks on 1" in log
    before, after = recorded(stopped_run / "keys"), recorded(out / "keys")
    epoch = before[-1]["epoch"]
    everything = Counter(k for b in before if b["epoch"] == 0 for k in b["keys"])
    assert len(everything) == 16 and set(everything.values()) == {1}
    interrupted = Counter(k for b in before + after if b["epoch"] == epoch for k in b["keys"])
    assert interrupted == everything  # the rest of the epoch on one rank: none repeated, none lost
    assert [b["step"] for b in after] == list(range(SIGNALLED + 1, steps + 1))
    by_epoch = [[len(b["keys"]) for b in after if b["epoch"] == e] for e in (epoch, epoch + 1)]
    assert by_epoch == [[4, 4], [4, 4, 4, 4]]  # the resumed epoch's share, then whole epochs on one rank
    assert Counter(k for b in after if b["epoch"] == epoch + 1 for k in b["keys"]) == everything
    assert sorted(losses(out)) == list(range(SIGNALLED, steps)) and (out / "export.safetensors").is_file()
