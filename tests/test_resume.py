"""Exact resume: a run SIGKILLed mid-epoch (or in the middle of a checkpoint save), or stopped by a signal, and
resumed from last.ckpt logs the same per-step losses, bit for bit on the CPU, as the run that was never
interrupted, and ends with the same weights; for stage 1 too (autoencoder and discriminator: two optimizers
stepped by hand, a GAN schedule, learning-rate schedules). The 2-process DDP runs are in test_resume_ddp.py
(a file of their own, so pytest-xdist runs the two halves side by side); the runs are in resume_runs.py.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from ldm.data.datamodule import WebDataModule
from ldm.data.stream import EpochLoader
from ldm.data.synthetic import write_shapes
from tests.resume_runs import (
    AE_BATCHES,
    SIGNALLED,
    TXT2VID,
    assert_resumed_exactly,
    crash_options,
    fit,
    fit_autoencoder,
    signalled_run,
    write_resume_shards,
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_resume_shards(tmp_path_factory)


@pytest.fixture(scope="module")
def uninterrupted(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    fit(shards, out)
    return out


@pytest.mark.parametrize("crash", ["mid-epoch", "during a checkpoint save"])
def test_a_run_killed_and_resumed_continues_exactly(crash: str, shards: Path, uninterrupted: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    if crash == "mid-epoch":  # step 7 of 10, the 3rd batch of epoch 1; last.ckpt holds step 6
        fit(shards, out, *crash_options(out, "KillAt", 7), expect_kill=True)
    else:  # killed half-way through writing step 9's checkpoint: last.ckpt must still be step 6's
        fit(shards, out, *crash_options(out, "KilledDuringSave", 9), expect_kill=True)
        assert (out / "checkpoints" / "last.ckpt.tmp").is_file()
    saved = 6
    last = out / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == saved
    assert not (out / "export.safetensors").exists()
    fit(shards, out, "--ckpt_path", str(last))
    assert_resumed_exactly(uninterrupted, out, saved)


def test_a_signalled_run_stops_after_its_step_with_a_checkpoint_and_resumes_exactly(
        shards: Path, uninterrupted: Path, tmp_path: Path) -> None:
    """SLURM's --signal (SIGUSR1): the run finishes its step and stops (see signalled_run), then resumes exactly."""
    out = tmp_path / "run"
    stopped = signalled_run(shards, out, "SIGUSR1", ddp=False)
    fit(shards, out, "--ckpt_path", str(stopped))
    assert_resumed_exactly(uninterrupted, out, SIGNALLED)


def test_a_bucketed_run_killed_and_resumed_continues_exactly(tmp_path: Path) -> None:
    """Mixed-aspect shards in aspect-ratio buckets: batches of one bucket each, some short, resume bit for bit."""
    shards, reference, out = tmp_path / "mixed", tmp_path / "reference", tmp_path / "run"
    write_shapes(shards, train=16, val=2, test=0, size=32, samples_per_shard=5, aspect="mixed")
    buckets = ["--data.init_args.buckets", "{max_ratio: 2.0, multiple: 8}"]
    fit(shards, reference, *buckets)
    fit(shards, out, *buckets, *crash_options(out, "KillAt", 7), expect_kill=True)
    last = out / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 6
    fit(shards, out, *buckets, "--ckpt_path", str(last))
    assert_resumed_exactly(reference, out, 6)


def test_a_video_run_killed_and_resumed_continues_exactly(tmp_path: Path) -> None:
    """Clips of 4 frames from random starts in 8-frame videos, through the video DiT: the temporal crops, the clip
    loader's position and the model all continue bit for bit."""
    shards, reference, out = tmp_path / "clips", tmp_path / "reference", tmp_path / "run"
    write_shapes(shards, train=16, val=2, test=0, size=32, samples_per_shard=5, frames=8)
    video = {"experiment": TXT2VID, "backbone": "video-dit-tiny"}
    clips = ["--data.init_args.formats", "[{class_path: ldm.data.video.VideoClips, init_args: {frames: 4}}]"]
    fit(shards, reference, *clips, **video)
    fit(shards, out, *clips, *crash_options(out, "KillAt", 7, "video"), expect_kill=True, **video)
    last = out / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 6
    fit(shards, out, *clips, "--ckpt_path", str(last), **video)
    assert_resumed_exactly(reference, out, 6)


def test_an_autoencoder_run_killed_and_resumed_continues_exactly(shards: Path, tmp_path: Path) -> None:
    """Stage 1: two optimizers stepped by hand (Lightning counts both in global_step), the GAN term's start,
    the discriminator's batch-norm statistics and both learning-rate schedules all continue exactly."""
    reference, out = tmp_path / "reference", tmp_path / "run"
    log = fit_autoencoder(shards, reference)
    assert "Using ModelCheckpoint with manual optimization" not in log  # its checkpoints are whole, Lightning's warning moot
    fit_autoencoder(shards, out, *crash_options(out, "KillAt", 10, "stage1"), expect_kill=True)  # after batch 5
    last = out / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 8 and saved["autoencoder_steps"] == 5  # after batch 4: 2 + 3 x 2 steps
    assert not (out / "export.safetensors").exists()
    fit_autoencoder(shards, out, "--ckpt_path", str(last))
    assert_resumed_exactly(reference, out, 5, AE_BATCHES)


@pytest.mark.parametrize("resampled", [False, True])
@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_state_resumes_the_stream_where_it_stopped(shards: Path, resampled: bool, workers: int) -> None:
    """Without a trainer: n batches, the state saved, a new loader restored from it yields the rest of the epoch
    and the next epoch exactly as the uninterrupted loader (finite and resampled streams, 0 or 2 workers)."""
    def loader() -> EpochLoader:
        data = WebDataModule(train=str(shards / "train" / "shard-*.tar"), batch_size=3, num_workers=workers,
                             resolution=16, shuffle_buffer=4, resampled=resampled, epoch_length=5 if resampled else None,
                             pin_memory=False)
        data.setup("fit")
        return data.train_dataloader()

    def keys(batches) -> list[list[str]]:
        return [list(batch["key"]) for batch in batches]

    reference = loader()
    expected = keys(reference) + keys(reference)  # epochs 0 and 1
    for stop in (1, 2, 4):
        interrupted = loader()
        seen = keys(itertools.islice(iter(interrupted), stop))
        state = interrupted.state_dict()
        resumed = loader()
        resumed.load_state_dict(state)
        assert seen + keys(resumed) + keys(resumed) == expected, stop
