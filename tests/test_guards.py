"""Runs that meet NaN/inf, and configurations that cannot work: skipped, stopped or refused with a message
naming the step, the option or the file."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader

from ldm.cli import build_cli
from ldm.training.nonfinite import NonFiniteGuard, NonFiniteTraining
from tests.stage2 import ROOT, cli_args, write_stage2_shards
from tests.tiny_models import assert_same_state, image_batches, state, tiny_autoencoder, tiny_model

pytestmark = [pytest.mark.filterwarnings("ignore:LightningCLI's args parameter"), pytest.mark.usefixtures("one_thread")]


def _trainer(tmp_path: Path, steps: int, **options) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=steps, logger=False, default_root_dir=tmp_path,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **options)


class _Snapshot(L.Callback):
    """The module's whole state (weights, EMA, buffers), every optimizer's state and the logged loss, just
    before and just after training batch ``index``."""

    def __init__(self, index: int) -> None:
        self.index, self.taken = index, {}

    def _take(self, trainer: L.Trainer, model: L.LightningModule) -> dict:
        moments = {f"{n}.{i}.{k}": v.clone() for n, optimizer in enumerate(trainer.optimizers)
                   for i, s in optimizer.state_dict()["state"].items() for k, v in s.items()}
        return {"module": state(model), "optimizers": moments, "loss": trainer.callback_metrics.get("train/loss")}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.index:
            self.taken["before"] = self._take(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.index:
            self.taken["after"] = self._take(trainer, pl_module)

    def assert_untouched(self) -> None:
        """The skipped batch changed no weight, EMA weight, buffer or optimizer moment."""
        before, after = self.taken["before"], self.taken["after"]
        assert_same_state(before["module"], after["module"])
        assert before["optimizers"].keys() == after["optimizers"].keys()
        assert all(torch.equal(before["optimizers"][k], after["optimizers"][k]) for k in before["optimizers"])


class _InfGradient(L.Callback):
    """Makes a backbone gradient inf in training batch ``index``; the loss stays finite."""

    def __init__(self, index: int) -> None:
        self.index, self.hook = index, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.index:
            self.hook = next(pl_module.backbone.parameters()).register_hook(lambda g: torch.full_like(g, float("inf")))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.index:
            self.hook.remove()


PRECISIONS = {  # the guard's three ways to skip: drop the gradients, the fused kernel's found_inf, the GradScaler
    "host check": lambda: dict(fused=False),
    "fused AdamW, on the device": lambda: dict(fused=True),
    "fp16 with a GradScaler": lambda: dict(fused=True, plugins=[MixedPrecision("16-mixed", "cpu")]),  # CPU scaler
}


@pytest.mark.parametrize("fault", ["NaN pixel", "inf gradient, finite loss"])
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_a_non_finite_step_is_skipped_leaving_weights_optimizer_and_ema_untouched(fault: str, precision: str,
                                                                                   tmp_path: Path) -> None:
    options = PRECISIONS[precision]()
    model, snapshot = tiny_model().train(), _Snapshot(1)
    model.optimizer = partial(torch.optim.AdamW, fused=options.pop("fused"))
    trainer = _trainer(tmp_path, 3, **options)
    trainer.callbacks.append(snapshot)
    if fault == "NaN pixel":
        batches = image_batches(3, nan_at=1)
    else:
        batches = image_batches(3)
        trainer.callbacks.append(_InfGradient(1))
    trainer.fit(model, DataLoader(batches, batch_size=None))
    snapshot.assert_untouched()
    assert torch.isfinite(snapshot.taken["after"]["loss"]) == (fault != "NaN pixel")
    assert model.guard.skipped == 1 and trainer.callback_metrics["train/nonfinite_steps"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert trainer.global_step == 3 and int(model.ema.num_updates) == 2  # the other two steps trained
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    assert scaler is None or scaler.get_scale() == 2.0**15  # the scaler saw the inf too: it halved its scale once


def test_the_in_a_row_count_restarts_after_a_finite_step() -> None:
    """Non-finite steps interrupted by finite ones never stop a run, however many; a run of them does."""
    guard, weight = NonFiniteGuard(max_consecutive=3), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    pattern = [False, False, True] * 2 + [False] * 3  # finite?; the host reads the run after steps 2, 5 and 8
    with pytest.raises(NonFiniteTraining, match="3 optimizer steps in a row, up to step 8"):
        for step, finite in enumerate(pattern):
            weight.grad = torch.full((2,), 1.0 if finite else float("nan"))
            guard.check(step, torch.tensor(1.0), optimizer)
            optimizer.step()
    assert step == 8 and guard.skipped == 7 and torch.equal(weight, torch.full((2,), -0.2))  # the 2 finite steps


def test_a_run_of_nan_steps_stops_naming_the_step_and_the_last_finite_loss(tmp_path: Path) -> None:
    model = tiny_model().train()
    model.guard.max_consecutive = 3
    trainer = _trainer(tmp_path, 20)
    # steps 2.. are NaN; the host reads the run every 3 steps (no sync in between), so it stops at step 5
    with pytest.raises(NonFiniteTraining, match=r"4 optimizer steps in a row, up to step 5, had a non-finite loss or "
                                                r"gradient .* the last finite loss was [\d.e+-]+ at step 1\. Likely causes"):
        trainer.fit(model, DataLoader(image_batches(2) + [image_batches(1, nan_at=0)[0]] * 5, batch_size=None))
    assert model.guard.skipped == 4
    assert all(torch.isfinite(p).all() for p in [*model.backbone.parameters(), *model.ema.parameters()])


def _poison_diffusion() -> L.LightningModule:
    model = tiny_model()
    with torch.no_grad():
        for weights in (model.backbone, model.ema.module):  # the trained and the EMA weights (which export)
            next(weights.parameters()).view(-1)[0] = float("inf")
    return model


def _poison_autoencoder() -> L.LightningModule:
    model = tiny_autoencoder()
    with torch.no_grad():
        model.vae.decoder.conv_out.weight.view(-1)[0] = float("nan")
    return model


@pytest.mark.parametrize("poisoned, where", [(_poison_diffusion, "backbone"), (_poison_autoencoder, "vae.decoder")],
                         ids=["latent diffusion", "autoencoder"])
def test_a_checkpoint_or_export_with_non_finite_weights_is_refused(poisoned, where: str, tmp_path: Path) -> None:
    model = poisoned()
    with pytest.raises(NonFiniteTraining, match=f"refusing to write a checkpoint: non-finite values in .*{where}"):
        model.on_save_checkpoint({"state_dict": model.state_dict()})
    with pytest.raises(NonFiniteTraining, match="refusing to write .*export.safetensors"):
        model.export(str(tmp_path / "export.safetensors"))
    assert not (tmp_path / "export.safetensors").exists()


@pytest.mark.parametrize("fused", [False, True], ids=["host check", "fused Adam, on the device"])
def test_the_autoencoder_skips_a_nan_batch_leaving_both_optimizers_untouched(fused: bool, tmp_path: Path) -> None:
    adam = partial(torch.optim.Adam, fused=fused)
    model, snapshot = tiny_autoencoder(optimizer=adam, disc_optimizer=adam), _Snapshot(1)
    trainer = _trainer(tmp_path, 6)
    trainer.callbacks.append(snapshot)
    trainer.fit(model, DataLoader(image_batches(3, nan_at=1), batch_size=None))
    snapshot.assert_untouched()  # the VAE, discriminator and both Adams' moments
    assert model.guard.skipped == 2  # the autoencoder's and the discriminator's step of the NaN batch
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_training_step_never_waits_for_the_host() -> None:
    """Loss, guard, fused AdamW step and EMA update: no tensor is read on the host (item, bool, int, float, tolist),
    so on a GPU no step waits for the device (the guard's own read comes every max_nonfinite_steps steps)."""
    model = tiny_model().train()
    model.guard.max_consecutive = 1000
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
    batches = image_batches(3, nan_at=1)
    reads = []
    with pytest.MonkeyPatch.context() as patch:
        for name in ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            patch.setattr(torch.Tensor, name, lambda self, *a, _name=name, _f=original, **k: reads.append(_name) or _f(self, *a, **k))
        for step, batch in enumerate(batches):
            loss = model.diffusion_loss(batch).mean()
            loss.backward()
            finite = model.guard.check(step, loss, optimizer)
            optimizer.step()
            model.ema.update(model.backbone, finite)
            optimizer.zero_grad()
    assert reads == []
    assert int(model.guard.skipped) == 1 and int(model.ema.num_updates) == 2


# --- configurations refused before training ---------------------------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_stage2_shards(tmp_path_factory.mktemp("shapes"))


def test_a_resolution_the_model_cannot_take_is_refused_naming_the_option(shards: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["ldm"])
    args = [*cli_args(ROOT / "experiments/shapes/txt2img_unet.yaml", shards, tmp_path), "--data.init_args.resolution", "36"]
    with pytest.raises(ValueError, match=r"data.init_args.resolution 36 is not a multiple of 8.*use 32 or 40"):
        build_cli(["fit", *args])  # f=4 autoencoder x a UNet of 2 levels


def test_a_checkpoint_of_another_module_is_refused_naming_both(shards: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["ldm"])
    autoencoder = ["--config", str(ROOT / "experiments/shapes/autoencoder.yaml"), "--trainer.max_steps", "1",
                   "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(tmp_path),
                   "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--checkpoint.dirpath", str(tmp_path / "ae"), "--export.path",
                   str(tmp_path / "ae.safetensors"), "--data.init_args.num_workers", "0", "--data.init_args.resolution", "32",
                   *(a for split in ("train", "val") for a in (f"--data.init_args.{split}", str(shards / split / "shard-*.tar")))]
    build_cli(["fit", *autoencoder])
    args = cli_args(ROOT / "experiments/shapes/txt2img_unet.yaml", shards, tmp_path / "stage2")
    with pytest.raises(SystemExit):
        build_cli(["fit", *args, "--ckpt_path", str(tmp_path / "ae" / "last.ckpt")])
    err = capsys.readouterr().err
    assert "was written by ldm.autoencoder.module.AutoencoderKL, but this config builds " \
           "ldm.diffusion.module.LatentDiffusion" in err
