"""Exact resume: a run SIGKILLed mid-epoch (or in the middle of a checkpoint save) and resumed from
last.ckpt logs the same per-step losses, bit for bit on the CPU, as the run that was never interrupted,
and ends with the same weights; the same under 2-process DDP, and for stage 1 (autoencoder and
discriminator: two optimizers stepped by hand, a GAN schedule, learning-rate schedules).

Each run is a real `ldm fit` subprocess of a shapes experiment on tiny shards: a loader worker, a
shuffle buffer, 4 batches per epoch and 10 steps (8 batches for stage 1), so the kill lands mid-epoch and
the run crosses epochs after the resume.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ldm.data.datamodule import WebDataModule
from ldm.data.stream import EpochLoader
from ldm.data.synthetic import write_shapes
from tests.processes import run_isolated
from tests.stage2 import ROOT, cli_args

TXT2IMG = ROOT / "experiments" / "shapes" / "txt2img_unet.yaml"
AUTOENCODER = ROOT / "experiments" / "shapes" / "autoencoder.yaml"
STEPS, CHECKPOINT_EVERY = 10, 3
# stage 1: batches 0 and 1 step the autoencoder alone, from batch 2 (disc_start) the discriminator too, so
# 8 batches are 14 optimizer steps (Lightning's global_step); a checkpoint every 4 lands after batches 2, 4, 6
AE_BATCHES, AE_STEPS, AE_CHECKPOINT_EVERY = 8, 14, 4
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_shapes(root, train=16, val=2, test=0, size=32, samples_per_shard=5)  # 4 shards of 5, 5, 5, 1
    return root


LOADER = ["--data.init_args.batch_size", "4", "--data.init_args.num_workers", "1", "--data.init_args.shuffle_buffer", "4",
          "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0"]


def _ldm_fit(args: list[str], expect_kill: bool, status: int = 0) -> str:
    """`ldm fit <args>` in a process group of its own; its output."""
    return run_isolated([sys.executable, "-m", "ldm.cli", "fit", *args], ROOT, TIMEOUT_S, {"OMP_NUM_THREADS": "1"},
                        killed=expect_kill, status=status)


def fit(shards: Path, out: Path, *options: str, ddp: bool = False, expect_kill: bool = False, status: int = 0) -> str:
    """`ldm fit` of the tiny txt2img run into ``out`` (logs, checkpoints, export); its output."""
    args = [*cli_args(TXT2IMG, shards, out), "--model.init_args.backbone", str(ROOT / "configs/backbone/unet-tiny.yaml"),
            *LOADER, "--trainer.max_steps", str(STEPS), "--checkpoint.every_n_train_steps", str(CHECKPOINT_EVERY), *options]
    if ddp:
        args += ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    return _ldm_fit(args, expect_kill, status)


def fit_autoencoder(shards: Path, out: Path, *options: str, expect_kill: bool = False) -> str:
    """`ldm fit` of the shapes autoencoder, its GAN term on from batch 2, into ``out`` (logs, checkpoints, export)."""
    data = [a for split in ("train", "val") for a in (f"--data.init_args.{split}", str(shards / split / "shard-*.tar"))]
    args = ["--config", str(AUTOENCODER), *LOADER, *data, "--model.init_args.loss.init_args.disc_start", "2",
            "--data.init_args.resolution", "32", "--data.init_args.pin_memory", "false",
            "--trainer.logger.init_args.save_dir", str(out / "runs"), "--trainer.logger.init_args.name", "test",
            "--trainer.default_root_dir", str(out), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1",
            "--trainer.max_steps", str(AE_STEPS), "--checkpoint.every_n_train_steps", str(AE_CHECKPOINT_EVERY),
            "--checkpoint.dirpath", str(out / "checkpoints"), "--export.path", str(out / "export.safetensors")]
    return _ldm_fit([*args, *options], expect_kill)


def crash_options(out: Path, kind: str, step: int, callbacks: str = "stage2", **init_args: Any) -> list[str]:
    """Options making the run SIGKILL itself (at the end of ``step`` or in the middle of its checkpoint save),
    or signal itself (SignalAt)."""
    maker = {"class_path": f"tests.tiny_modules.{kind}", "init_args": {"step": step, **init_args}}
    if kind != "KilledDuringSave":  # a callback, added to the experiment's own
        experiment = yaml.safe_load((ROOT / "configs" / "callbacks" / f"{callbacks}.yaml").read_text())
        trainer = {"callbacks": [*experiment, maker]}
    else:
        trainer = {"plugins": [maker]}
    path = out.parent / f"{out.name}-crash.yaml"
    path.write_text(yaml.safe_dump({"trainer": trainer}))
    return ["--config", str(path)]


def losses(out: Path) -> dict[int, float]:
    """step -> train/loss over every run (version) logged under ``out``."""
    found: dict[int, float] = {}
    for folder in sorted((out / "runs" / "test").glob("version_*")):
        events = EventAccumulator(str(folder)).Reload()
        found.update({e.step: e.value for e in events.Scalars("train/loss")})
    return found


def assert_resumed_exactly(reference: Path, resumed: Path, from_step: int, steps: int = STEPS) -> None:
    """The resumed run logged the reference's losses from ``from_step`` (logged steps: batches) on, and exported its weights."""
    expected, got = losses(reference), losses(resumed)
    assert sorted(expected) == list(range(steps))
    after = [s for s in range(from_step, steps)]
    assert [got[s] for s in after] == [expected[s] for s in after]  # bit for bit
    ours, theirs = load_file(resumed / "export.safetensors"), load_file(reference / "export.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


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


@pytest.mark.parametrize("name, ddp", [("SIGUSR1", False), ("SIGTERM", True)], ids=["sigusr1", "sigterm-ddp-rank1"])
def test_a_signalled_run_stops_after_its_step_with_a_checkpoint_and_resumes_exactly(
        name: str, ddp: bool, shards: Path, uninterrupted: Path, ddp_uninterrupted: Path, tmp_path: Path) -> None:
    """SLURM's --signal (SIGUSR1) or a spot instance's SIGTERM, here to rank 1 alone under DDP: every rank finishes
    step 7, last.ckpt holds it (not the step-6 periodic one), nothing is exported, one line says where to resume."""
    out = tmp_path / "run"
    log = fit(shards, out, *crash_options(out, "SignalAt", 7, name=name, rank=int(ddp)), ddp=ddp, status=1)
    last = out / "checkpoints" / "last.ckpt"
    assert f"ldm: error: stopped by {name} after step 7; {last} holds it: resume with --ckpt_path {last}" in log
    assert "Traceback" not in log
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 7
    assert not (out / "export.safetensors").exists()
    fit(shards, out, "--ckpt_path", str(last), ddp=ddp)
    assert_resumed_exactly(ddp_uninterrupted if ddp else uninterrupted, out, 7)


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
