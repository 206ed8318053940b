"""Multi-node DDP on one machine: two torchrun "nodes" of two CPU processes each (gloo), each launched by
configs/cluster/torchrun.sh as on a cluster. A run has every rank SIGKILLed after a mid-epoch checkpoint, then
is launched again by the same script (`--ckpt_path last`) and stopped by a SIGTERM to one node's torchrun: every
training sample is read once per epoch over the 4 ranks, the ranks step in step, global rank 0 alone writes
checkpoints, the relaunch repeats the steps that the killed run took after its checkpoint bit for bit on every
rank (their batches and losses), and the SIGTERM stops all four ranks after the same step with last.ckpt.
Also: configs/cluster/slurm.sbatch's `srun ldm fit` line composes, with the SLURM variables its header sets.

The model is tests/ddp_data_probe.py's caption recorder with random noise in its loss, each rank seeded apart
(so the resume needs every rank's own RNG state); the data, 22 samples in 3 uneven shards: 3 batches of 2 or 1
per rank and epoch. last.ckpt of step 4 (epoch 1, batch 1) survives the kill at the end of step 7 (epoch 2,
batch 1): steps 4 to 6, across an epoch's end, run twice. Two launches of 4 ranks, each rank importing Lightning
(about 9 s of CPU): about 25 s each on 2 idle cores.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from ldm.cli import compose
from ldm.training.preemption import SIGNALS, Preemption
from ldm.training.resume import AtomicCheckpointIO
from tests.ddp_data_probe import CaptionRecorder
from tests.processes import run_isolated
from tests.shardutil import write_shards

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN, SBATCH = ROOT / "configs" / "cluster" / "torchrun.sh", ROOT / "configs" / "cluster" / "slurm.sbatch"
NODES, PROCS = 2, 2
TRAIN_COUNTS, VAL_COUNT = [9, 5, 8], 4  # 6, 6, 5, 5 training samples per rank: 3 batches each, some of 1
STEPS, CHECKPOINT_EVERY, KILL_AT = 10, 4, 7  # epochs of 3 steps; neither launch reaches STEPS
TIMEOUT_S = 240  # a rank left waiting in a collective hangs: a timeout is a failure


class StepRecorder(CaptionRecorder):
    """The caption recorder with noise in its loss, appending each step (its epoch, captions and loss) to
    `<out>/steps-rank<r>.jsonl` as it goes: a killed run keeps its lines."""

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        noise = torch.randn(len(batch["caption"]))  # per sample, from this rank's generator
        loss = super().training_step(batch, batch_idx) + (self.weight * noise).mean()  # a random gradient term
        record = {"epoch": self.current_epoch, "captions": list(batch["caption"]), "loss": loss.item()}
        with open(self.out / f"steps-rank{self.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": self.global_step, **record}) + "\n")
        return loss


class TorchrunStopAt(Callback):
    """Sends SIGTERM to this rank's torchrun (as a preemption notice to a node would) when step ``step`` ends on
    ``rank``, and goes on once torchrun has forwarded it to this process and ldm's Preemption has taken it, so the
    stop comes at this step. (Waiting for the signal itself is unreliable: a process-directed signal may land on
    any thread; Python runs its handler on the main thread, which sleeps here.)"""

    def __init__(self, step: int, rank: int) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step != self.step or trainer.global_rank != self.rank:
            return
        preemption = next(c for c in trainer.callbacks if isinstance(c, Preemption))
        os.kill(os.getppid(), signal.SIGTERM)  # torchrun started this worker
        deadline = time.monotonic() + 60
        while preemption.received is None:
            if time.monotonic() > deadline:
                raise RuntimeError("torchrun did not forward SIGTERM to its workers within 60 s")
            time.sleep(0.05)


class RecordingCheckpointIO(AtomicCheckpointIO):
    """Atomic checkpoint writing that appends which global rank wrote which file at which step to ``record``."""

    def __init__(self, record: str) -> None:
        super().__init__()
        self.record = record

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        with open(self.record, "a") as f:
            f.write(json.dumps({"rank": int(os.environ["RANK"]), "file": os.path.basename(path),
                                "step": checkpoint["global_step"]}) + "\n")


def free_port() -> int:
    """A TCP port free on this machine now (torchrun's rendezvous store listens on it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, probe: str, *options: str, status: int = 0) -> str:
    """configs/cluster/torchrun.sh on both "nodes" of this machine at once, fitting the step recorder on the
    shards in ``out`` into ``out`` (its records in ``out/probe``); fails unless both end with ``status``."""
    (out / probe).mkdir(parents=True)
    args = [
        # no --seed_everything: LightningCLI draws a seed in each process (torchrun starts them apart), so every rank
        # draws its own noise; weights start equal all the same (DDP broadcasts rank 0's)
        "--model.class_path", f"{__name__}.StepRecorder", "--model.init_args.out", str(out / probe),
        "--data.class_path", "ldm.data.datamodule.WebDataModule",
        "--data.init_args.train", str(out / "train" / f"shard-{{0000..{len(TRAIN_COUNTS) - 1:04d}}}.tar"),
        "--data.init_args.val", str(out / "val" / "shard-0000.tar"), "--data.init_args.batch_size", "2",
        "--data.init_args.num_workers", "0", "--data.init_args.resolution", "8", "--data.init_args.shuffle_buffer", "4",
        "--data.init_args.pin_memory", "false",
        "--trainer.accelerator", "cpu", "--trainer.max_steps", str(STEPS), "--trainer.logger", "false",
        "--trainer.num_sanity_val_steps", "0", "--trainer.default_root_dir", str(out),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.plugins", json.dumps({"class_path": f"{__name__}.RecordingCheckpointIO",
                                         "init_args": {"record": str(out / "writers.jsonl")}}),
        "--checkpoint.every_n_train_steps", str(CHECKPOINT_EVERY),
        *options,
    ]
    env = {"NNODES": str(NODES), "NPROC_PER_NODE": str(PROCS), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "CHECKPOINTS": str(out / "checkpoints"), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # this interpreter's torchrun
    both = 'NODE_RANK=1 bash "$0" "$@" & NODE_RANK=0 bash "$0" "$@"; zero=$?; wait $!; one=$?; exit $((zero | one))'
    return run_isolated(["bash", "-c", both, str(TORCHRUN), *args], ROOT, TIMEOUT_S, env, status=status)


def steps(probe: Path, rank: int) -> dict[int, dict[str, Any]]:
    """step -> what ``rank`` recorded of it (epoch, captions, loss) in one launch."""
    lines = (probe / f"steps-rank{rank}.jsonl").read_text().splitlines()
    return {record.pop("step"): record for record in map(json.loads, lines)}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run whose every rank is SIGKILLed at the end of step KILL_AT (its records in `killed/`), launched again by
    the same script (`resumed/`) and stopped by a SIGTERM to node 1's torchrun at the end of step KILL_AT again
    (its output in `resumed/torchrun.log`)."""
    out = tmp_path_factory.mktemp("run")
    write_shards(out / "train", TRAIN_COUNTS, (16, 8))
    write_shards(out / "val", [VAL_COUNT], (16, 8))  # the recorder validates (a collective): a val loop each epoch
    kill = json.dumps([{"class_path": "tests.tiny_modules.KillAt", "init_args": {"step": KILL_AT}}])
    log = launch(out, "killed", "--trainer.callbacks", kill, status=1)  # torchrun: its workers failed
    assert len(re.findall(r"^\s*exitcode\s*: -9 ", log, re.MULTILINE)) == NODES * PROCS  # each rank, in its own session
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == CHECKPOINT_EVERY
    stop = json.dumps([{"class_path": f"{__name__}.TorchrunStopAt", "init_args": {"step": KILL_AT, "rank": 3}}])  # node 1
    log = launch(out, "resumed", "--trainer.callbacks", stop, status=1)
    (out / "resumed" / "torchrun.log").write_text(log)
    return out


def test_every_sample_is_read_once_per_epoch_over_the_four_ranks_in_step(run: Path) -> None:
    killed = [steps(run / "killed", r) for r in range(NODES * PROCS)]  # epochs 0 and 1 whole
    for epoch in (0, 1):
        batches = [[s["captions"] for s in rank.values() if s["epoch"] == epoch] for rank in killed]
        assert [len(rank) for rank in batches] == [3] * NODES * PROCS  # one batch count for every rank
        seen = Counter(c for rank in batches for b in rank for c in b)
        assert seen == Counter(f"sample {n}" for n in range(sum(TRAIN_COUNTS)))


def test_global_rank_zero_alone_writes_checkpoints(run: Path) -> None:
    """Every rank takes part in a save (random states are gathered), but one file is written, by global rank 0
    (not the first process of each node): the periodic one of the killed launch, the preempted one of the next."""
    writes = [json.loads(line) for line in (run / "writers.jsonl").read_text().splitlines()]
    assert writes == [{"rank": 0, "file": "last.ckpt", "step": s} for s in (CHECKPOINT_EVERY, KILL_AT)]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]  # no .tmp left behind


def test_a_run_killed_on_both_nodes_resumes_exactly_with_ckpt_path_last(run: Path) -> None:
    again = range(CHECKPOINT_EVERY, KILL_AT)  # steps 4 to 6, across the end of epoch 1
    for rank in range(NODES * PROCS):
        killed, resumed = steps(run / "killed", rank), steps(run / "resumed", rank)
        assert sorted(killed) == list(range(KILL_AT))
        assert sorted(resumed) == list(again)  # from last.ckpt, not from scratch; and stopped at the same step
        assert [resumed[s] for s in again] == [killed[s] for s in again]  # the same batches, losses bit for bit


def test_a_sigterm_to_one_nodes_torchrun_stops_every_rank_after_the_same_step_with_a_checkpoint(run: Path) -> None:
    """torchrun forwards SIGTERM to its workers (workers of a session of their own: a signal to torchrun's process
    group misses them); ldm's Preemption stops the ranks of both nodes after the same step, with last.ckpt."""
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == KILL_AT
    log = (run / "resumed" / "torchrun.log").read_text()
    assert f"after step {KILL_AT}; {last} holds it: resume with --ckpt_path {last}" in log
    assert {s for r in range(NODES * PROCS) for s in steps(run / "resumed", r)} == set(range(CHECKPOINT_EVERY, KILL_AT))


def sbatch_options(script: str) -> dict[str, str]:
    """The `#SBATCH --name=value` options of a batch script's header."""
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", script, re.MULTILINE))


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_the_slurm_script_runs_one_ldm_task_per_gpu_resumable_and_signalled_in_time(tmp_path: Path) -> None:
    """slurm.sbatch run by bash as SLURM would (its header's variables set, `srun` a stand-in that records its
    arguments): its `ldm fit` command composes with the header's topology, a fixed checkpoint folder per job
    and `--ckpt_path last`; the header asks for a signal that ldm's Preemption handles, sent to the tasks."""
    header = sbatch_options(SBATCH.read_text())
    nodes, tasks = int(header["nodes"]), int(header["ntasks-per-node"])
    assert int(header["gpus-per-node"]) == tasks  # Lightning's SLURMEnvironment: a task per device
    name, when = re.fullmatch(r"(\w+)@(\d+)", header["signal"]).groups()  # no "B:": every task, not the batch shell
    assert f"SIG{name.removeprefix('SIG')}" in SIGNALS and int(when) >= 60
    assert "requeue" in header and header.get("open-mode") == "append"
    (tmp_path / "bin").mkdir()
    srun = tmp_path / "bin" / "srun"
    srun.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    srun.chmod(0o755)
    env = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": str(nodes), "SLURM_NTASKS_PER_NODE": str(tasks),
           "SRUN_ARGS": str(tmp_path / "args"), "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    experiment = ["--config", str(ROOT / "experiments" / "cifar10" / "dit_gpu.yaml"),
                  "--config", str(ROOT / "configs" / "trainer" / "ddp.yaml")]
    run_isolated(["bash", str(SBATCH), *experiment], ROOT, 30, env)
    command = (tmp_path / "args").read_text().splitlines()
    assert command[:2] == ["ldm", "fit"] and command[-2:] == ["--ckpt_path", "last"]
    composed = compose(command[2:-2])
    trainer = composed["trainer"]
    assert (trainer["num_nodes"], int(trainer["devices"]), trainer["strategy"]) == (nodes, tasks, "ddp")  # devices: "8"
    assert composed["checkpoint"]["dirpath"] == "runs/slurm-4242/checkpoints"  # the same after a requeue
    assert composed["model"]["init_args"]["backbone"]["class_path"] == "ldm.backbones.dit.DiT"  # the experiment's
