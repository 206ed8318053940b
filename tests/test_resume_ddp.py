"""Exact and elastic resume under 2-process DDP: a DDP run SIGKILLed mid-epoch, or stopped by a SIGTERM to
rank 1 alone, resumes bit for bit on 2 processes; its checkpoint also resumes on 1 process with the rest of the
epoch's samples once (the runs: resume_runs.py)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.resume_runs import (
    SIGNALLED,
    assert_resumed_exactly,
    crash_options,
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


@pytest.fixture(scope="module")
def ddp_uninterrupted(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp-uninterrupted")
    fit(shards, out, ddp=True)
    return out


def test_a_ddp_run_killed_and_resumed_continues_exactly(shards: Path, ddp_uninterrupted: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    fit(shards, out, *crash_options(out, "KillAt", 5), ddp=True, expect_kill=True)
    last = out / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 3
    fit(shards, out, "--ckpt_path", str(last), ddp=True)
    assert_resumed_exactly(ddp_uninterrupted, out, 3)


@pytest.fixture(scope="module")
def ddp_signalled(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("ddp-signalled") / "run"
    return out, signalled_run(shards, out, "SIGTERM", ddp=True)


def test_a_sigterm_to_one_ddp_rank_stops_every_rank_after_its_step_and_resumes_exactly(
        shards: Path, ddp_uninterrupted: Path, ddp_signalled: tuple[Path, Path]) -> None:
    """A spot instance's SIGTERM, here to rank 1 alone: every rank finishes step 7 and stops (see signalled_run)."""
    out, stopped = ddp_signalled
    fit(shards, out, "--ckpt_path", str(stopped), ddp=True)
    assert_resumed_exactly(ddp_uninterrupted, out, SIGNALLED)


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
