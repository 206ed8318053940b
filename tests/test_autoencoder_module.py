"""Stage 1 as a system: the AutoencoderKL module's two optimizers and GAN schedule, checkpoints and
exported weights, every autoencoder experiment and VAE config through the CLI, bf16, and
tools/latent_stats.py."""

from __future__ import annotations

import itertools
import math
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from ldm.autoencoder.loss import AutoencoderLoss
from ldm.autoencoder.module import AutoencoderKL
from ldm.autoencoder.vae import VAE, estimate_latent_stats
from ldm.autoencoder.weights import load_vae_weights
from ldm.cli import build_cli as ldm_main
from ldm.cli import compose
from ldm.data.synthetic import write_shapes
from tools import latent_stats as latent_stats_tool

ROOT = Path(__file__).parents[1]
AUTOENCODER = "ldm.autoencoder.module.AutoencoderKL"
EXPERIMENTS = sorted(
    str(p.relative_to(ROOT))
    for p in (ROOT / "experiments").rglob("*.yaml")
    if compose(["--config", str(p)])["model"]["class_path"] == AUTOENCODER
)
SHAPES = "experiments/shapes/autoencoder.yaml"  # the one the module tests fit: no random crop or flip, no LPIPS
VAE_CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs" / "autoencoder").glob("*.yaml"))
BATCH, VAL_SAMPLES = 4, 12  # 32 px shapes: 3 validation batches
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")  # pytest's own argv is not ours


# ---- the module under a minimal Trainer ------------------------------------------------------------


def _module(disc_start: int) -> AutoencoderKL:
    torch.manual_seed(0)
    vae = VAE(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4, norm_groups=4)
    loss = AutoencoderLoss(perceptual_weight=0.0, disc_start=disc_start, disc_layers=2, disc_channels=8)
    return AutoencoderKL(vae, loss)


def _groups(module: AutoencoderKL) -> dict[str, list[torch.nn.Parameter]]:
    return {"autoencoder": [*module.vae.parameters(), module.loss.logvar], "discriminator": [*module.loss.discriminator.parameters()]}


class _Recorder(L.Callback):
    """Per optimizer step: which optimizer stepped and which parameter groups it changed; per batch: the logs."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, set[str]]] = []
        self.logs: list[dict[str, float]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: AutoencoderKL) -> None:
        groups = _groups(pl_module)
        for index, optimizer in enumerate(trainer.optimizers):
            before: dict[str, list[torch.Tensor]] = {}

            def snapshot(opt, args, kwargs, before=before) -> None:
                before.update({name: [p.detach().clone() for p in ps] for name, ps in groups.items()})

            def compare(opt, args, kwargs, before=before, index=index) -> None:
                changed = {n for n, ps in groups.items() if any(not torch.equal(p, b) for p, b in zip(ps, before[n]))}
                self.steps.append((index, changed))

            optimizer.register_step_pre_hook(snapshot)
            optimizer.register_step_post_hook(compare)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: AutoencoderKL, outputs, batch, batch_idx: int) -> None:
        self.logs.append({k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("train/")})


def _fit(module: AutoencoderKL, batches: int) -> _Recorder:
    images = torch.rand(batches * 2, 3, 16, 16) * 2 - 1
    loader = DataLoader([{"image": x} for x in images], batch_size=2)
    recorder = _Recorder()
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[recorder],
    )
    trainer.fit(module, loader)
    assert module.autoencoder_steps == batches
    return recorder


def test_discriminator_untouched_before_disc_start():
    module = _module(disc_start=1000)
    disc_before = [p.detach().clone() for p in module.loss.discriminator.parameters()]
    recorder = _fit(module, batches=3)
    assert recorder.steps == [(0, {"autoencoder"})] * 3  # only the autoencoder optimizer stepped
    assert all(torch.equal(p, b) for p, b in zip(module.loss.discriminator.parameters(), disc_before))
    for logs in recorder.logs:  # no GAN term and no discriminator loss before disc_start
        assert logs["train/g"] == 0 and logs["train/d_weight"] == 0 and "train/d" not in logs


def test_each_optimizer_steps_only_its_parameters_and_gan_starts_at_disc_start():
    recorder = _fit(_module(disc_start=2), batches=4)
    # batches 0, 1: the autoencoder alone; from disc_start on: autoencoder, then discriminator, each only its own
    assert recorder.steps == [(0, {"autoencoder"})] * 2 + [(0, {"autoencoder"}), (1, {"discriminator"})] * 2
    before, after = recorder.logs[:2], recorder.logs[2:]
    assert all(logs["train/g"] == 0 and logs["train/d_weight"] == 0 for logs in before)
    assert all(logs["train/g"] != 0 and logs["train/d_weight"] > 0 and logs["train/d"] > 0 for logs in after)


def test_each_learning_rate_schedule_follows_its_own_optimizers_steps(recwarn):
    """The autoencoder's schedule steps with every batch, a skipped (NaN) first step included; the
    discriminator's only from its first step (disc_start): no schedule runs ahead of its optimizer."""
    module = _module(disc_start=2)
    module.lr_scheduler = partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    images = torch.rand(6, 3, 16, 16) * 2 - 1
    images[0, 0, 0, 0] = float("nan")  # the first batch's step is skipped
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader([{"image": x} for x in images], batch_size=2))
    assert module.guard.skipped == 1
    assert [o.param_groups[0]["lr"] for o in trainer.optimizers] == [1e-3 * 0.5**3, 1e-3 * 0.5]  # 3 batches; 1 GAN step
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]  # torch's check of the order


# ---- the experiments through the CLI ---------------------------------------------------------------


@pytest.fixture(scope="module")
def overlay(tmp_path_factory) -> str:
    """A YAML overlay putting data (32 px shapes, 4 per batch) and logs under a temporary folder."""
    root = tmp_path_factory.mktemp("autoencoder")
    write_shapes(root / "data", train=4 * BATCH, val=VAL_SAMPLES, test=BATCH, size=32, samples_per_shard=8)
    patterns = {split: str(root / "data" / split / "shard-*.tar") for split in ("train", "val", "test")}
    config = {
        "trainer": {
            "default_root_dir": str(root),
            "val_check_interval": 2,
            "limit_val_batches": 1,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(root / "runs")}},
        },
        "export": {"path": str(root / "autoencoder.safetensors")},
        "model": {"init_args": {"loss": {"init_args": {"lpips_random_init": True}}}},  # tests never download
        "data": {"init_args": {**patterns, "resolution": 32, "batch_size": BATCH, "eval_batch_size": BATCH, "num_workers": 0, "shuffle_buffer": 0, "pin_memory": False}},
    }
    path = root / "overlay.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def fitted(overlay, tmp_path_factory) -> tuple[AutoencoderKL, Path]:
    """The shapes experiment trained for 2 batches; its module and last.ckpt."""
    folder = tmp_path_factory.mktemp("fitted")
    cli = ldm_main(["fit", "--config", SHAPES, "--config", overlay, "--trainer.max_steps", "2",
                    "--checkpoint.dirpath", str(folder), *QUIET])
    return cli.model.eval(), folder / "last.ckpt"


def _images(seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize(
    "experiment, vae",
    [pytest.param(e, None, id=Path(e).stem) for e in EXPERIMENTS]
    + [pytest.param(SHAPES, v, id=Path(v).stem) for v in VAE_CONFIGS],  # kl-f8 (84M): ~5 s at 32 px
)
def test_experiment_fast_dev_run(experiment, vae, overlay, tmp_path):
    swap = ["--model.vae", vae] if vae else []
    cli = ldm_main(["fit", "--config", experiment, "--config", overlay, *swap, "--trainer.fast_dev_run", "1",
                    "--data.init_args.batch_size", "2", "--trainer.default_root_dir", str(tmp_path),
                    "--model.loss.init_args.disc_start", "0", *QUIET])  # GAN on: every loss term runs
    metrics = cli.trainer.callback_metrics
    assert cli.model.autoencoder_steps == 1 and "train/d" in metrics and "val/psnr" in metrics
    assert all(math.isfinite(v.item()) for v in metrics.values())


def test_bf16_mixed_fit_logs_finite_losses(overlay, tmp_path):
    cli = ldm_main(["fit", "--config", SHAPES, "--config", overlay, "--trainer.precision", "bf16-mixed",
                    "--model.loss.init_args.disc_start", "0", "--trainer.max_steps", "4",  # 2 batches x 2 optimizers
                    "--trainer.log_every_n_steps", "1", "--trainer.logger.init_args.save_dir", str(tmp_path),
                    "--checkpoint.dirpath", str(tmp_path / "checkpoints"), *QUIET])
    assert cli.model.autoencoder_steps == 2
    events = EventAccumulator(cli.trainer.logger.log_dir).Reload()
    tags = [t for t in events.Tags()["scalars"] if t.startswith(("train/", "val/"))]
    assert {"train/total", "train/nll", "train/g", "train/d", "train/d_weight", "val/psnr"} <= set(tags)
    values = [e.value for t in tags for e in events.Scalars(t)]
    assert len(values) > len(tags) and all(math.isfinite(v) for v in values)
    assert all(e.value > 0 for e in events.Scalars("train/d_weight"))  # the adaptive GAN weight was computed


def test_checkpoint_round_trip_and_resume(fitted, overlay):
    model, ckpt = fitted
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert checkpoint["autoencoder_steps"] == model.autoencoder_steps == 2
    fresh, _ = latent_stats_tool.build([SHAPES, overlay])
    fresh.eval()
    x = _images()
    with torch.no_grad():
        assert not torch.equal(fresh.vae(x, sample=False)[0], model.vae(x, sample=False)[0])
        fresh.load_state_dict(checkpoint["state_dict"])
        assert torch.equal(fresh.vae(x, sample=False)[0], model.vae(x, sample=False)[0])
    # resuming restores the GAN schedule's counter: 2 restored + 1 new batch
    cli = ldm_main(["fit", "--config", SHAPES, "--config", overlay, "--ckpt_path", str(ckpt),
                    "--trainer.max_steps", "3", "--checkpoint.dirpath", str(ckpt.parent / "resumed"),
                    "--export.path", str(ckpt.parent / "resumed" / "export.safetensors"), *QUIET])
    assert cli.model.autoencoder_steps == 3


def _estimate(model: AutoencoderKL, loader, batches: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = (b["image"] for b in itertools.islice(loader, batches))
    return estimate_latent_stats(model.vae, images, torch.Generator().manual_seed(seed))


def test_fit_ends_by_exporting_the_vae_with_seeded_latent_statistics(fitted, overlay):
    model, ckpt = fitted
    export = Path(yaml.safe_load(Path(overlay).read_text())["export"]["path"])
    exported = load_file(export)
    assert bool(exported["latent_stats_estimated"]) and bool(model.vae.latent_stats_estimated)
    for name, value in model.vae.state_dict().items():  # the export is the fitted VAE, statistics included
        assert torch.equal(exported[name], value), name
    # the statistics are those of posterior samples of the training batches from the callback's own seed 0
    # (the overlay's data has no shuffle and no random crop, so the order is every epoch's)
    fresh, data = latent_stats_tool.build([SHAPES, overlay])
    data.setup("fit")
    mean, std = _estimate(model, data.train_dataloader(), batches=50, seed=0)
    torch.testing.assert_close(exported["latent_mean"], mean)
    torch.testing.assert_close(exported["latent_std"], std)
    # the checkpoint written as the fit ends (after the estimate) holds the same VAE as the export
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(saved[f"vae.{name}"], value) for name, value in exported.items())
    load_vae_weights(fresh.vae, export)
    with torch.no_grad():
        assert torch.equal(fresh.vae.eval()(_images(), sample=False)[0], model.vae(_images(), sample=False)[0])


def test_latent_stats_tool_writes_a_new_export_and_nothing_else(fitted, overlay, tmp_path, capsys):
    _, ckpt = fitted
    out = tmp_path / "shapes" / "vae.safetensors"
    ckpt_bytes = ckpt.read_bytes()
    args = ["--config", SHAPES, "--config", overlay, "--ckpt_path", str(ckpt), "--out", str(out),
            "--batches", "2", "--split", "val", "--seed", "3"]
    latent_stats_tool.main(args)
    assert "over up to 2 val batches" in capsys.readouterr().out
    assert ckpt.read_bytes() == ckpt_bytes
    with pytest.raises(SystemExit):  # an existing export is never overwritten
        latent_stats_tool.main(args)

    # by hand: the same model, the first 2 validation batches and the same seed for the posterior samples
    model, data = latent_stats_tool.build([SHAPES, overlay])
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])
    model.eval()
    data.setup("validate")
    estimates = [_estimate(model, data.val_dataloader(), batches, seed) for batches, seed in ((2, 3), (1, 3), (3, 3), (2, 4))]
    mean, std = estimates[0]
    assert all(not torch.allclose(mean, other[0]) for other in estimates[1:])  # 2 batches, seed 3: no other
    exported = load_file(out)
    assert bool(exported["latent_stats_estimated"])
    torch.testing.assert_close(exported["latent_mean"], mean)
    torch.testing.assert_close(exported["latent_std"], std)
