"""A run that diverges with finite weights (latents that overflow, NaN validation or test metrics) ends in the
non-finite guard's one message, naming the step and the likely causes, and writes no file with the values."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import StackDataset

from ldm.autoencoder.loss import AutoencoderLoss
from ldm.autoencoder.module import AutoencoderKL
from ldm.autoencoder.vae import VAE
from ldm.callbacks.export import ExportWeights
from ldm.callbacks.finite_metrics import FiniteMetrics
from ldm.callbacks.latent_stats import LatentStatistics
from ldm.callbacks.report import EvaluationReport
from ldm.cli import main
from ldm.data import batch as B
from ldm.training.nonfinite import LIKELY_CAUSES, NonFiniteTraining, assert_finite_state
from ldm.training.resume import Checkpoint
from tests.cli_runs import CLI_MARKS, TINY_SIZE, tiny_shapes

pytestmark = CLI_MARKS


def _autoencoder(lr: float = 1e-3) -> AutoencoderKL:
    """A tiny autoencoder; at lr 1e6 one step leaves finite weights (about 1e6) whose latents overflow (NaN)."""
    torch.manual_seed(0)
    vae = VAE(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4, norm_groups=4)
    return AutoencoderKL(vae, AutoencoderLoss(perceptual_weight=0.0, disc_layers=1, disc_channels=8),
                         optimizer=partial(torch.optim.Adam, lr=lr))


def _data() -> L.LightningDataModule:
    images = StackDataset(**{B.IMAGE: torch.rand(4, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1})
    return L.LightningDataModule.from_datasets(images, images, images, batch_size=2)


def _trainer(tmp_path: Path, callbacks: list[L.Callback], max_steps: int = 2, **options) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, default_root_dir=tmp_path, callbacks=callbacks,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **options)


def _checkpoints(folder: Path) -> Checkpoint:
    """Writes last.ckpt at the end of training and a checkpoint after every validation."""
    return Checkpoint(dirpath=folder, filename="{step}", save_last=True, save_top_k=-1, save_on_train_epoch_end=False)


def test_non_finite_latent_statistics_end_the_fit_naming_the_step_and_nothing_is_written(tmp_path: Path) -> None:
    model, export = _autoencoder(lr=1e6), tmp_path / "export.safetensors"
    trainer = _trainer(tmp_path, [_checkpoints(tmp_path / "ckpt"), LatentStatistics(batches=2), ExportWeights(str(export))],
                       limit_val_batches=0)
    with pytest.raises(NonFiniteTraining) as stopped:
        trainer.fit(model, _data())
    message = str(stopped.value)
    assert message.startswith("at step 2 the latent statistics are not finite (mean [nan") and LIKELY_CAUSES in message
    assert "\n" not in message
    assert all(torch.isfinite(p).all() for p in model.parameters())  # only the latents overflow
    assert not bool(model.vae.latent_stats_estimated)  # nothing stored
    assert not export.exists() and not (tmp_path / "ckpt").exists()  # neither the export nor last.ckpt


def test_a_non_finite_validation_metric_ends_the_fit_before_its_checkpoint(tmp_path: Path) -> None:
    """Listed after the checkpoint callback, the check still runs first (Lightning runs checkpoints last)."""
    trainer = _trainer(tmp_path, [_checkpoints(tmp_path / "ckpt"), FiniteMetrics()], val_check_interval=2,
                       limit_val_batches=1)
    with pytest.raises(NonFiniteTraining, match=r"^at step 2 the val metrics \{.*'val/psnr': nan.*\} are not finite\. "
                                                r"Likely causes: a learning rate too high") as stopped:
        trainer.fit(_autoencoder(lr=1e6), _data())
    assert LIKELY_CAUSES in str(stopped.value)
    assert not (tmp_path / "ckpt").exists()


def test_finite_validation_metrics_pass_and_are_checkpointed(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, [_checkpoints(tmp_path / "ckpt"), FiniteMetrics()], val_check_interval=2,
                       limit_val_batches=1)
    trainer.fit(_autoencoder(), _data())
    assert torch.isfinite(trainer.callback_metrics["val/psnr"]) and (tmp_path / "ckpt" / "step=2.ckpt").is_file()


def test_a_non_finite_test_metric_ends_the_run_before_the_report(tmp_path: Path) -> None:
    model, data = _autoencoder(lr=1e6), _data()
    _trainer(tmp_path, [], max_steps=1, limit_val_batches=0, enable_checkpointing=False).fit(model, data)
    trainer = _trainer(tmp_path, [FiniteMetrics(), EvaluationReport()], limit_test_batches=1)
    with pytest.raises(NonFiniteTraining, match=r"^at step 0 the test metrics \{.*'test/psnr': nan"):
        trainer.test(model, data)
    assert not list(tmp_path.rglob("report.json"))


def test_a_refused_export_names_the_step_and_the_likely_causes() -> None:
    with pytest.raises(NonFiniteTraining) as refused:
        assert_finite_state({"w": torch.ones(2), "latent_std": torch.tensor([1.0, float("inf")])}, "a.safetensors", step=7)
    assert str(refused.value) == f"refusing to write a.safetensors: non-finite values in ['latent_std'] at step 7. " \
                                 f"Likely causes: {LIKELY_CAUSES}."


def test_ldm_fit_at_a_huge_learning_rate_ends_in_one_line(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`ldm fit` of the shapes autoencoder at lr 1e6: its weights stay finite (the guard skips the NaN steps), its
    latents overflow; the fit ends in one line naming the step (``SystemExit`` with it: status 1, no traceback)
    and writes no export and no last.ckpt."""
    monkeypatch.setattr(sys, "argv", ["ldm"])
    shapes = tiny_shapes(tmp_path_factory)
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({
        "trainer": {"max_steps": 3, "limit_val_batches": 0, "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path), "callbacks": [  # the experiment's latent statistics alone
                        {"class_path": "ldm.callbacks.latent_stats.LatentStatistics", "init_args": {"batches": 1}}],
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(tmp_path)}}},
        "export": {"path": str(tmp_path / "autoencoder.safetensors")},
        "checkpoint": {"dirpath": str(tmp_path / "checkpoints")},
        "data": {"init_args": {**{split: str(shapes / split / "shard-*.tar") for split in ("train", "val")},
                               "resolution": TINY_SIZE, "batch_size": 2, "num_workers": 0}},
    }))
    with pytest.raises(SystemExit) as ended:
        main(["fit", "--config", "experiments/shapes/autoencoder.yaml", "--config", str(overlay),
              "--model.init_args.optimizer.init_args.lr", "1e6"])
    line = ended.value.code
    assert isinstance(line, str) and "\n" not in line
    assert line.startswith("ldm: error: at step 3 the latent statistics are not finite") and LIKELY_CAUSES in line
    assert not (tmp_path / "autoencoder.safetensors").exists() and not (tmp_path / "checkpoints").exists()
