"""The `ldm fit` runs the exact-resume tests share (tests/test_resume.py, tests/test_resume_ddp.py): a shapes
experiment on tiny shards, with a loader worker, a shuffle buffer, 4 batches per epoch and 10 steps (8 batches for
stage 1), so a kill lands mid-epoch and the run crosses epochs after the resume; and what they record."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ldm.data.synthetic import write_shapes
from tests.processes import run_ldm
from tests.stage2 import ROOT, cli_args

TXT2IMG = ROOT / "experiments" / "shapes" / "txt2img_unet.yaml"
TXT2VID = ROOT / "experiments" / "shapes" / "txt2vid_dit.yaml"
AUTOENCODER = ROOT / "experiments" / "shapes" / "autoencoder.yaml"
STEPS, CHECKPOINT_EVERY = 10, 3
# stage 1: batches 0 and 1 step the autoencoder alone, from batch 2 (disc_start) the discriminator too, so
# 8 batches are 14 optimizer steps (Lightning's global_step); a checkpoint every 4 lands after batches 2, 4, 6
AE_BATCHES, AE_STEPS, AE_CHECKPOINT_EVERY = 8, 14, 4
TIMEOUT_S = 300


def write_resume_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The runs' shapes shards: 16 training samples in 4 shards of 5, 5, 5, 1 (each test module writes its own)."""
    root = tmp_path_factory.mktemp("shapes")
    write_shapes(root, train=16, val=2, test=0, size=32, samples_per_shard=5)
    return root


LOADER = ["--data.init_args.batch_size", "4", "--data.init_args.num_workers", "1", "--data.init_args.shuffle_buffer", "4",
          "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0"]


def _ldm_fit(args: list[str], expect_kill: bool, status: int = 0) -> str:
    """`ldm fit <args>` in a process group of its own; its output."""
    return run_ldm(["fit", *args], ROOT, TIMEOUT_S, {"OMP_NUM_THREADS": "1"},
                        killed=expect_kill, status=status)


def fit(shards: Path, out: Path, *options: str, ddp: bool = False, expect_kill: bool = False, status: int = 0,
        experiment: Path = TXT2IMG, backbone: str = "unet-tiny") -> str:
    """`ldm fit` of the tiny txt2img run (or ``experiment`` with the tiny ``backbone``) into ``out`` (logs,
    checkpoints, export); its output."""
    args = [*cli_args(experiment, shards, out), "--model.init_args.backbone", str(ROOT / f"configs/backbone/{backbone}.yaml"),
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
        return with_callbacks(out, maker, callbacks=callbacks)
    path = out.parent / f"{out.name}-crash.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"plugins": [maker]}}))
    return ["--config", str(path)]


def with_callbacks(out: Path, *added: dict[str, Any], callbacks: str = "stage2") -> list[str]:
    """Options adding callbacks (class_path dicts) to the experiment's own."""
    experiment = yaml.safe_load((ROOT / "configs" / "callbacks" / f"{callbacks}.yaml").read_text())
    path = out.parent / f"{out.name}-callbacks.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": [*experiment, *added]}}))
    return ["--config", str(path)]


def record_keys(folder: Path) -> dict[str, Any]:
    return {"class_path": "tests.tiny_modules.RecordKeys", "init_args": {"folder": str(folder)}}


def recorded(folder: Path) -> list[dict[str, Any]]:
    """The training batches RecordKeys wrote to ``folder``, every rank's, by step; a step run again after a
    resume replaces the killed run's record of it."""
    batches: dict[tuple[str, int], dict[str, Any]] = {}
    for path in sorted(folder.glob("keys-rank*.jsonl")):
        for record in map(json.loads, path.read_text().splitlines()):
            batches[path.name, record["step"]] = record
    return list(batches.values())


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


SIGNALLED = 7  # the step after which a signalled run stops: epoch 3's first of 2 batches per rank under DDP


def signalled_run(shards: Path, out: Path, name: str, ddp: bool, *options: str) -> Path:
    """A run told to stop by ``name`` (under DDP: sent to rank 1 alone) after step 7, its batches' keys recorded:
    every rank finishes the step, last.ckpt holds it (not the step-6 periodic one), nothing is exported, one
    line says where to resume. Returns a copy of that checkpoint."""
    stop = {"class_path": "tests.tiny_modules.SignalAt", "init_args": {"step": SIGNALLED, "name": name, "rank": int(ddp)}}
    log = fit(shards, out, *with_callbacks(out, stop, record_keys(out / "keys")), *options, ddp=ddp, status=1)
    last = out / "checkpoints" / "last.ckpt"
    assert f"ldm: error: stopped by {name} after step {SIGNALLED}; {last} holds it: resume with --ckpt_path {last}" in log
    assert "Traceback" not in log
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == SIGNALLED
    assert not (out / "export.safetensors").exists()
    return Path(shutil.copy(last, out.parent / "stopped.ckpt"))


