"""Tiny stand-ins for pretrained evaluation networks, a sampler written outside ldm, and crash makers: nameable by
class_path from YAML in CLI tests."""

from __future__ import annotations

import io
import json
import os
import signal
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from torch import Tensor, nn

from ldm.diffusion.samplers import AlphaSigma, Denoiser, Generators, Sampler
from ldm.metrics.fvd import I3D_MIN_FRAMES
from ldm.training.resume import AtomicCheckpointIO


class TinyFeatures(nn.Module):
    """A small random conv net standing in for Inception: (B, 3, H, W) -> {"pool3": (B, 8)}; counts the images it sees."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.images_seen = 0

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        self.images_seen += len(images)
        return {"pool3": self.net(images)}  # (B, 8)


class KillAt(Callback):
    """SIGKILLs the run (its whole process group: every rank and loader worker) when a training step ends."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.killpg(os.getpgid(0), signal.SIGKILL)


class SignalAt(Callback):
    """Sends signal ``name`` to its own process on ``rank`` when a training step ends, as a cluster tells a job to stop."""

    def __init__(self, step: int, name: str = "SIGTERM", rank: int = 0) -> None:
        self.step, self.name, self.rank = step, name, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), getattr(signal, self.name))


class RecordKeys(Callback):
    """Appends each training batch's sample keys, with its epoch and step, to ``<folder>/keys-rank<r>.jsonl``."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"keys-rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"epoch": trainer.current_epoch, "step": trainer.global_step, "keys": list(batch["key"])}) + "\n")


class KilledDuringSave(AtomicCheckpointIO):
    """Atomic checkpoint writing that SIGKILLs the run in the middle of the save at ``step``: the new file is
    half written to its temporary name and never renamed, as when a crash hits a save."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if checkpoint["global_step"] == self.step:
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            with open(f"{path}.tmp", "wb") as f:
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            os.killpg(os.getpgid(0), signal.SIGKILL)
        super().save_checkpoint(checkpoint, path, storage_options)


class TinyI3D(nn.Module):
    """I3D's call convention on a tiny random net: (B, 3, T, H, W) -> (B, 8) features (``return_features``) or class
    probabilities. Its temporal kernel spans ``I3D_MIN_FRAMES`` frames, so shorter clips fail as they do in I3D."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 8, (I3D_MIN_FRAMES, 3, 3), stride=(1, 2, 2))
        self.head = nn.Linear(8, 8)

    def forward(self, x: Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False) -> Tensor:
        if rescale:
            x = x.float() / 127.5 - 1
        if resize:  # I3D: each frame to 224 x 224; here 12 x 12
            x = F.interpolate(x, size=(x.shape[2], 12, 12), mode="trilinear", align_corners=False)
        features = self.head(torch.relu(self.conv(x)).mean((2, 3, 4)))  # (B, 8)
        return features if return_features else features.softmax(-1)


def scripted(module: nn.Module, path) -> nn.Module:
    """``module`` compiled to TorchScript and saved at ``path``, as i3d_torchscript.pt was."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates TorchScript; the real I3D is one
        torch.jit.script(module).save(str(path))
    return module


class OneJump(Sampler):
    """A sampler written outside ldm, as a user adds one: one class, no diffusers counterpart."""

    kind = "one_jump"

    def solve(self, denoise: Denoiser, x: Tensor, times: Tensor, alpha_sigma: AlphaSigma,
              generator: Generators = None) -> Tensor:
        return denoise(x, times[0].expand(x.shape[0]))[0]  # x0_hat at the noise end

    def evaluations(self) -> int:
        return 1
