"""Loss per noise level: bucket means against a direct computation, log-SNR buckets for flow matching, an update
that never reads the device from the host, and a tiny fit that logs the buckets and their picture to TensorBoard."""

from __future__ import annotations

import io
import math
import warnings
from functools import partial

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor
from torch.utils.data import DataLoader

from ldm.autoencoder.codec import LatentCodec
from ldm.autoencoder.vae import VAE
from ldm.backbones.unet import UNet
from ldm.diffusion.loss_by_noise import LOGSNR_MAX, LossByNoise
from ldm.diffusion.module import LatentDiffusion
from ldm.diffusion.objectives import DDPM, FlowMatching, Objective

BAR = (66, 111, 178)  # the picture's bar colour


def direct_buckets(objective: Objective, t: Tensor, buckets: int) -> Tensor:
    """Bucket indices written out: t * K // N for DDPM steps, else equal log-SNR ranges from LOGSNR_MAX down."""
    if isinstance(objective, DDPM):
        return t.long() * buckets // objective.num_timesteps
    logsnr = 2 * torch.log((1 - t.double()) / t.double())  # flow: alpha = 1 - t, sigma = t
    return ((LOGSNR_MAX - logsnr) / (2 * LOGSNR_MAX / buckets)).floor().clamp(0, buckets - 1).long()


def direct_means(objective: Objective, losses: Tensor, t: Tensor, buckets: int) -> dict[int, float]:
    """{bucket: mean loss} over the buckets that hold a sample."""
    k = direct_buckets(objective, t, buckets)
    return {b: losses[k == b].double().mean().item() for b in k.unique().tolist()}


@pytest.mark.parametrize(("objective", "buckets"), [(DDPM(), 8), (DDPM("v", "cosine", num_timesteps=300), 7),
                                                    (FlowMatching("uniform"), 10), (FlowMatching(shift=3.0), 7)],
                         ids=["ddpm-8", "ddpm300-7", "flow-uniform-10", "flow-shift3-7"])
def test_bucket_means_equal_a_direct_computation(objective: Objective, buckets: int) -> None:
    g = torch.Generator().manual_seed(0)
    ends = torch.tensor([0.0, objective.num_timesteps - 1.0]) if isinstance(objective, DDPM) else torch.tensor([1e-7, 1 - 1e-7])
    t = torch.cat([objective.sample_t(500, generator=g), ends])
    losses = torch.rand(len(t), generator=g) + t / t.max()
    metric = LossByNoise(objective, buckets)
    for chunk in range(0, len(t), 64):  # several steps
        metric.update(losses[chunk:chunk + 64], t[chunk:chunk + 64])
    means, counts = metric.compute()
    expected = direct_means(objective, losses, t, buckets)
    assert counts.tolist() == torch.bincount(direct_buckets(objective, t, buckets), minlength=buckets).tolist()
    assert {k: m for k, m in enumerate(means.tolist()) if counts[k]} == pytest.approx(expected, rel=1e-5)
    assert len(expected) >= 3 and {0, buckets - 1} <= set(expected)  # the ends hold what lies beyond the edges
    assert all(math.isnan(m) for k, m in enumerate(means.tolist()) if not counts[k])
    metric.reset()
    assert metric.counts.sum() == 0 and metric.sums.sum() == 0


def test_flow_buckets_follow_log_snr_and_ddpm_buckets_follow_t() -> None:
    logsnr = torch.tensor([30.0, 9.0, 5.0, 0.5, -0.5, -7.0, -30.0])
    t = torch.sigmoid(-logsnr / 2)  # flow matching: log-SNR = 2 log((1 - t) / t)
    assert LossByNoise(FlowMatching(), 10).bucket(t).tolist() == [0, 0, 2, 4, 5, 8, 9]  # 10..8, 8..6, ..., -8..-10
    assert LossByNoise(FlowMatching(shift=3.0), 5).bucket(t).tolist() == [0, 0, 1, 2, 2, 4, 4]
    assert LossByNoise(DDPM(), 10).bucket(torch.tensor([0.0, 99.0, 100.0, 550.0, 999.0])).tolist() == [0, 0, 1, 5, 9]
    assert LossByNoise(FlowMatching(), 4).bounds() == [10, 5, 0, -5, -10]
    assert LossByNoise(DDPM(), 4).bounds() == [0, 0.25, 0.5, 0.75, 1]


def test_bucket_count_is_checked() -> None:
    with pytest.raises(ValueError, match="loss_buckets must be at least 1, got 0"):
        LossByNoise(DDPM(), 0)


def tiny_model(objective: Objective | None = None) -> LatentDiffusion:
    """Unconditional, f=2 random codec, a two-level UNet without attention, no EMA."""
    torch.manual_seed(0)
    codec = LatentCodec(VAE(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4, norm_groups=4),
                        scale=1.0)
    backbone = partial(UNet, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(), num_heads=2,
                       norm_groups=8)
    return LatentDiffusion(backbone, codec, objective=objective, ema_decay=None)


def test_the_training_step_reads_nothing_from_the_device() -> None:
    """On the meta device (no data) any host read (item, bool, tolist, cpu, nonzero, masking) raises: the step's
    timesteps, loss and bucket update run there, so on a GPU they queue kernels and never wait for them."""
    model = tiny_model(FlowMatching()).to("meta")
    model.latents = lambda batch, generator=None: torch.randn(4, 4, 8, 8, device="meta")  # the codec is not our concern
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "You are trying to `self.log()`")  # no trainer here
        model.training_step({"image": torch.empty(4, 3, 16, 16, device="meta")}, 0)
    assert model.train_loss_by_t.update_count == 1 and model.train_loss_by_t.sums.device.type == "meta"
    with pytest.raises((RuntimeError, NotImplementedError)):  # what a host read there does
        model.train_loss_by_t.sums.tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("objective", [DDPM(), FlowMatching()], ids=["ddpm", "flow"])
def test_the_update_runs_under_cuda_sync_errors(objective: Objective) -> None:
    metric = LossByNoise(objective).cuda()
    t, losses = objective.sample_t(64, "cuda"), torch.rand(64, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        metric.update(losses, t)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    means, counts = metric.compute()
    assert counts.sum() == 64


@pytest.fixture(scope="module")
def fit(tmp_path_factory: pytest.TempPathFactory) -> tuple[LatentDiffusion, list, dict, EventAccumulator]:
    """Four training steps (buckets logged every 2) then one validation, recording what the training buckets saw."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = tiny_model()
    seen = []
    update = model.train_loss_by_t.update
    model.train_loss_by_t.update = lambda losses, t: (seen.append((losses.detach().clone(), t.clone())), update(losses, t))
    g = torch.Generator().manual_seed(1)
    train = [{"image": torch.rand(3, 3, 16, 16, generator=g) * 2 - 1} for _ in range(4)]
    val = {"image": torch.rand(6, 3, 16, 16, generator=g) * 2 - 1}
    logger = TensorBoardLogger(str(tmp_path_factory.mktemp("loss_by_t")), name="run")
    trainer = Trainer(accelerator="cpu", max_epochs=1, log_every_n_steps=2, num_sanity_val_steps=0, logger=logger,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(train, batch_size=None), DataLoader([val], batch_size=None))
    torch.set_num_threads(threads)
    return model, seen, val, EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0}).Reload()


def logged(events: EventAccumulator, prefix: str) -> dict[int, dict[int, float]]:
    """{step: {bucket: value}} of the scalars ``<prefix>/<bucket>``."""
    out: dict[int, dict[int, float]] = {}
    for tag in events.Tags()["scalars"]:
        if tag.startswith(prefix + "/"):
            for event in events.Scalars(tag):
                out.setdefault(event.step, {})[int(tag.rsplit("/", 1)[1])] = event.value
    return out


def test_a_fit_logs_each_interval_of_training_buckets_then_starts_afresh(fit: tuple) -> None:
    model, seen, _, events = fit
    assert len(seen) == 4
    expected = {}
    for step, steps in ((1, seen[:2]), (3, seen[2:])):  # Lightning writes the logs of batches 1 and 3 (every 2)
        losses, t = (torch.cat(parts) for parts in zip(*steps))
        expected[step] = direct_means(model.objective, losses, t, 10)
    assert logged(events, "train/loss_by_t") == {step: pytest.approx(means, rel=1e-5) for step, means in expected.items()}


def test_a_validation_logs_its_buckets_and_one_picture(fit: tuple) -> None:
    model, _, val, events = fit
    with torch.no_grad():  # validation's fixed draws: the generator seeded by seed + batch index
        losses, t = model.eval().timed_loss(val, torch.Generator().manual_seed(model.hparams.seed))
    assert logged(events, "val/loss_by_t") == {3: pytest.approx(direct_means(model.objective, losses, t, 10), rel=1e-5)}
    assert model.eval_loss_by_t.update_count == 0  # reset after logging
    (picture,) = events.Images("val/loss_by_t")
    image = np.asarray(Image.open(io.BytesIO(picture.encoded_image_string)).convert("RGB"))
    assert picture.step == 4 and image.shape  # at the optimizer step, as the sample grids; Lightning's scalars at 3 == (240, 532, 3)
    bar_columns = (image == BAR).all(-1).any(0).sum()  # columns holding a bar: 45 px for each bucket seen
    assert 40 * len(set(direct_buckets(model.objective, t, 10).tolist())) <= bar_columns <= 48 * 10
