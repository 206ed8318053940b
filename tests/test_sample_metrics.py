"""Evaluation callbacks: SampleMetrics (its metric list: FID against the exact feature statistics, KID, CLIP
score, PSNR / SSIM / LPIPS, precision and recall by name, a metric defined here (the rest of the ADM suite:
tests/test_eval_suite.py); the reference cache, seeds that make FID independent of the
world size; per-frame FID and KID and FVD of a video run), the names shared with EvaluationReport and
tools/evaluate.py, and TrainingMonitor.

CLI runs use the shapes experiments on tiny 16 px shards with a tiny feature extractor
(tests/tiny_modules.py) in place of Inception and a random-init OpenCLIP model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import SingleDeviceStrategy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ldm.autoencoder.module import AutoencoderKL
from ldm.callbacks import sample_metrics as sample_metrics_module
from ldm.callbacks.monitor import TrainingMonitor
from ldm.callbacks.sample_metrics import SampleMetrics
from ldm.cli import LdmCLI, build_cli
from ldm.conditioning.open_clip import OpenCLIP
from ldm.data import batch as B
from ldm.metrics.base import DistributionMetric
from ldm.metrics.clip_score import CLIPScore
from ldm.metrics.features import FeatureExtractors
from ldm.metrics.fid import FID, KID, frechet_distance, kid
from ldm.metrics.paired import LPIPS, PSNR, SSIM
from ldm.metrics.statistics import FeatureSet
from tests.cli_runs import CLI_MARKS, TINY_SIZE, tiny_shapes
from tests.processes import run_ldm
from tests.stage2 import write_clip_shards
from tests.tiny_modules import TinyFeatures, TinyI3D, scripted
from tools import evaluate, sampler_table

ROOT = Path(__file__).resolve().parents[1]
AUTOENCODER = ROOT / "experiments" / "shapes" / "autoencoder.yaml"
CLASS2IMG = ROOT / "experiments" / "shapes" / "class2img_unet.yaml"
TXT2VID = ROOT / "experiments" / "shapes" / "txt2vid_dit.yaml"
TINY_UNET = ROOT / "configs" / "backbone" / "unet-tiny.yaml"
RESOLUTION, TEST_SAMPLES = TINY_SIZE, 5  # in batches of 2: 2 + 2 + 1 on one rank; 3 and 2 samples on two ranks
TINY_CLIP = {"clip": {"random_init": True, "text_cfg": {"width": 32, "layers": 1, "heads": 2}, "vision_cfg": {"width": 32, "layers": 1, "head_width": 16, "image_size": 32, "patch_size": 16}}}
DDP_TIMEOUT_S = 240
pytestmark = CLI_MARKS


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_shapes(tmp_path_factory, test=TEST_SAMPLES)


class MeanGap(DistributionMetric):
    """A metric defined outside ldm: the squared distance between the two sets' mean features (FID without
    the covariance term); it plugs in by its class path, reading the pool3 features FID and KID share."""

    names = ("mean_gap",)
    label = "mean gap"

    def compute(self, generated: FeatureSet, reference: FeatureSet) -> dict[str, float]:
        return {"mean_gap": float((generated.mu_sigma()[0] - reference.mu_sigma()[0]).square().sum())}


def metric(class_path: str, **init_args: Any) -> dict[str, Any]:
    """A SampleMetrics ``metrics`` entry."""
    return {"class_path": class_path, "init_args": init_args}


FID_ENTRY = metric("ldm.metrics.fid.FID")


def metrics_callback(cache: Path, **init_args: Any) -> dict[str, Any]:
    """SampleMetrics with the tiny extractor, as a trainer.callbacks entry."""
    extractor = {"class_path": "tests.tiny_modules.TinyFeatures"}
    init_args = {"feature_extractor": extractor, "cache_dir": str(cache), **init_args}
    return {"class_path": "ldm.callbacks.sample_metrics.SampleMetrics", "init_args": init_args}


def cli_args(experiment: Path, shards: Path, out: Path, callbacks: list[dict], model: dict | None = None) -> list[str]:
    """The experiment on the tiny shards with these callbacks only, no logger, everything under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    callbacks = [*callbacks, {"class_path": "ldm.callbacks.report.EvaluationReport"}]
    overlay = {"trainer": {"logger": False, "callbacks": callbacks}}
    if model:
        overlay["model"] = {"init_args": model}
    (out / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    patterns = {split: str(shards / split / "shard-*.tar") for split in ("train", "val", "test")}
    data = [arg for split, pattern in patterns.items() for arg in (f"--data.init_args.{split}", pattern)]
    return [
        "--config", str(experiment), "--config", str(out / "overlay.yaml"), *data,
        "--data.init_args.resolution", str(RESOLUTION), "--data.init_args.batch_size", "2",
        "--data.init_args.eval_batch_size", "2", "--data.init_args.num_workers", "0",
        "--data.init_args.pin_memory", "false",
        "--trainer.default_root_dir", str(out), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--checkpoint.dirpath", str(out / "checkpoints"),
        "--export.path", str(out / "export.safetensors"),
    ]


def run(command: str, args: list[str]) -> LdmCLI:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["ldm"])  # LightningCLI must not see pytest's own arguments
        return build_cli([command, *args])


def sample_metrics(cli: LdmCLI) -> SampleMetrics:
    return next(c for c in cli.trainer.callbacks if isinstance(c, SampleMetrics))


def report(out: Path) -> dict[str, Any]:
    return json.loads((out / "report.json").read_text())


# --- stage 1: rFID through `ldm test`, the reference cache, CLIP score and the report -----------------
def test_autoencoder_test_run_logs_rfid_and_clip_score_caches_the_reference_and_reports(shards: Path, tmp_path: Path,
                                                                                        offline: None) -> None:
    fit_args = cli_args(AUTOENCODER, shards, tmp_path / "fit", [])
    run("fit", [*fit_args, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"])
    ckpt = tmp_path / "fit" / "checkpoints" / "last.ckpt"
    callbacks = [metrics_callback(tmp_path / "cache", metrics=[FID_ENTRY, metric("ldm.metrics.clip_score.CLIPScore", **TINY_CLIP)])]

    first = run("test", [*cli_args(AUTOENCODER, shards, tmp_path / "first", callbacks), "--ckpt_path", str(ckpt)])
    assert sample_metrics(first).extractor.images_seen == 2 * TEST_SAMPLES  # reconstructions and real images
    assert len(list((tmp_path / "cache").glob("refstats-*.safetensors"))) == 1
    result = report(tmp_path / "first")
    metrics = result["metrics"]
    assert math.isfinite(metrics["test/fid"]) and metrics["test/fid"] > 0
    assert metrics["test/samples"] == TEST_SAMPLES
    assert 0 <= metrics["test/clip_score"] <= 100 and "test/psnr" in metrics and "test/l1" in metrics
    assert metrics == pytest.approx({k: float(v) for k, v in first.trainer.callback_metrics.items()})
    assert result == {"metrics": metrics, "num_samples": TEST_SAMPLES, "sampler": None, "steps": None, "guidance": None,
                      "seed": None, "checkpoint": str(ckpt), "model": "AutoencoderKL"}

    second = run("test", [*cli_args(AUTOENCODER, shards, tmp_path / "second", callbacks), "--ckpt_path", str(ckpt)])
    assert sample_metrics(second).extractor.images_seen == TEST_SAMPLES  # the real images' statistics: from the cache
    assert report(tmp_path / "second")["metrics"]["test/fid"] == metrics["test/fid"]

    shard = next((shards / "test").glob("shard-*.tar"))  # rewritten under the same name: the cache must not serve it
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    third = run("test", [*cli_args(AUTOENCODER, shards, tmp_path / "third", callbacks), "--ckpt_path", str(ckpt)])
    assert sample_metrics(third).extractor.images_seen == 2 * TEST_SAMPLES
    assert len(list((tmp_path / "cache").glob("refstats-*.safetensors"))) == 2


@pytest.mark.parametrize("pretrained", ["laion2b_s34b_b79k", "/no/such/open_clip_model.safetensors"])
def test_clip_score_without_weights_is_one_log_line_and_the_run_completes(pretrained: str, shards: Path, tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture,
                                                                          offline: None) -> None:
    clip = metric("ldm.metrics.clip_score.CLIPScore", clip={"model": "ViT-B-32", "pretrained": pretrained})
    callbacks = [metrics_callback(tmp_path / "cache", metrics=[FID_ENTRY, clip])]
    with caplog.at_level(logging.WARNING, logger="ldm.metrics.evaluation"):
        cli = run("test", cli_args(AUTOENCODER, shards, tmp_path, callbacks))
    lines = [r.getMessage() for r in caplog.records if r.name == "ldm.metrics.evaluation"]
    assert len(lines) == 1 and "\n" not in lines[0] and lines[0].startswith("CLIP score disabled")
    metrics = report(tmp_path)["metrics"]
    assert "test/clip_score" not in metrics and "test/clip_score" not in cli.trainer.callback_metrics
    assert math.isfinite(metrics["test/fid"]) and "test/psnr" in metrics


# --- every metric equals its definition on the same images; a metric from here plugs in by name ----
class Blur(L.LightningModule):
    """Makes each evaluation image from its original (a 3x3 box blur), as an autoencoder reconstructs; logs nothing."""

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        pass

    def evaluation_images(self, batch: dict[str, Any], draw: int = 0) -> Tensor:
        return nn.functional.avg_pool2d(batch[B.IMAGE], 3, stride=1, padding=1, count_include_pad=False)


def test_every_metric_equals_its_definition_on_the_same_images(tmp_path: Path, offline: None) -> None:
    extractor = TinyFeatures()
    clip, lpips = CLIPScore(OpenCLIP(**TINY_CLIP["clip"])), LPIPS("alex", random_init=True)
    metrics = [FID(), KID(subsets=7, subset_size=4), clip, PSNR(), SSIM(), lpips, MeanGap()]
    g = torch.Generator().manual_seed(0)
    images = torch.rand(12, 3, 32, 32, generator=g) * 2 - 1  # 32 px: the least AlexNet's LPIPS takes
    captions = [f"shape number {i}" if i != 4 else "" for i in range(12)]  # sample 4 has no caption: not scored
    batches = [{B.IMAGE: images[i : i + 4], B.CAPTION: captions[i : i + 4]} for i in range(0, 12, 4)]
    callback = SampleMetrics(metrics, feature_extractor=extractor, max_samples=6, cache_dir=str(tmp_path))
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[callback], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    logged = trainer.validate(Blur(), DataLoader(batches, batch_size=None), verbose=False)[0]

    real = images[:6]  # the cap: all of the first batch, half of the second
    with torch.no_grad():
        fake = Blur().evaluation_images({B.IMAGE: real})
        fake_feats, real_feats = extractor.net(fake), extractor.net(real)
        mu_sigma = [(f.double().mean(0), torch.cov(f.double().T)) for f in (fake_feats, real_feats)]
        unit_fake, unit_real = (fake + 1) / 2, (real + 1) / 2
        expected = {
            "val/samples": 6,
            "val/fid": frechet_distance(*mu_sigma[0], *mu_sigma[1]),
            "val/kid": kid(fake_feats, real_feats, subsets=7, subset_size=4)[0],
            "val/kid_std": kid(fake_feats, real_feats, subsets=7, subset_size=4)[1],
            "val/clip_score": clip(fake[[0, 1, 2, 3, 5]], captions[:4] + captions[5:6]).mean().item(),
            "val/psnr": 10 * math.log10(1 / (unit_fake - unit_real).square().mean().item()),
            "val/ssim": SSIM()(fake, real).mean().item(),
            "val/lpips": lpips.distance(fake, real).mean().item(),
            "val/mean_gap": (fake_feats.mean(0) - real_feats.mean(0)).square().sum().item(),
        }
    assert logged == pytest.approx(expected, rel=1e-5)
    assert extractor.images_seen == 12  # 6 generated, 6 real: one extraction per batch serves FID, KID and MeanGap


def test_a_metric_defined_outside_ldm_plugs_in_and_keeps_its_name_everywhere(shards: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The callback logs ``test/<name>`` for every name of every metric, the report writes those keys, and
    tools/evaluate.py prints and writes the bare names for the same metrics asked by name."""
    entries = [metric(f"{__name__}.MeanGap"), FID_ENTRY, metric("ldm.metrics.fid.KID", subset_size=3),
               metric("ldm.metrics.precision_recall.PrecisionRecall")]
    cli = run("test", cli_args(AUTOENCODER, shards, tmp_path / "run", [metrics_callback(tmp_path / "cache", metrics=entries)]))
    names = [name for m in sample_metrics(cli).metrics for name in m.names]
    assert names == ["mean_gap", "fid", "kid", "kid_std", "precision", "recall"]
    reported = report(tmp_path / "run")["metrics"]
    assert all(math.isfinite(reported[f"test/{name}"]) for name in names) and reported["test/mean_gap"] > 0
    assert reported == pytest.approx({k: float(v) for k, v in cli.trainer.callback_metrics.items()})

    monkeypatch.setattr(evaluate, "inception_for", lambda metrics, weights: TinyFeatures())
    test_shards = str(shards / "test" / "shard-*.tar")
    out = evaluate.main(["--generated", test_shards, "--reference", test_shards, "--resolution", str(RESOLUTION),
                         "--metrics", "mean_gap", "fid", "kid", "precision", "--kid-subset-size", "3",
                         "--out", str(tmp_path / "ev.json")])
    assert [k for k in out if k in names] == names and out["mean_gap"] == 0  # the same images: no gap
    printed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [name for name in printed if name in names] == names


def test_full_reference_scores_a_capped_sample_against_the_whole_split(shards: Path, tmp_path: Path) -> None:
    """FID-2 (then 3) of reconstructions against all 5 test images, whose features are cached once for both caps."""
    first = run("test", cli_args(AUTOENCODER, shards, tmp_path / "a", [metrics_callback(tmp_path / "cache", max_samples=2,
                                                                                        full_reference=True)]))
    assert sample_metrics(first).extractor.images_seen == 2 + TEST_SAMPLES
    assert report(tmp_path / "a")["metrics"]["test/samples"] == 2
    second = run("test", cli_args(AUTOENCODER, shards, tmp_path / "b", [metrics_callback(tmp_path / "cache", max_samples=3,
                                                                                         full_reference=True)]))
    assert sample_metrics(second).extractor.images_seen == 3  # the whole split's features: from the cache
    third = run("test", cli_args(AUTOENCODER, shards, tmp_path / "c", [metrics_callback(tmp_path / "cache", max_samples=2,
                                                                                        draws=3, full_reference=True)]))
    assert sample_metrics(third).extractor.images_seen == 6 and report(tmp_path / "c")["metrics"]["test/samples"] == 6


def test_under_fsdp_a_rank_past_its_cap_generates_while_another_still_does(shards: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """FSDP's units gather collectively, so every rank must generate on every batch some rank generates on: here the
    other rank (the strategy's max over ranks, simulated) still wants a sample on each batch after this one's cap
    of 2 is reached on the first; this rank generates one sample there, unscored."""
    calls = []
    generate = AutoencoderKL.evaluation_images
    monkeypatch.setattr(AutoencoderKL, "evaluation_images", lambda self, batch, draw=0: calls.append(
        B.batch_size(batch)) or generate(self, batch, draw))
    monkeypatch.setattr(sample_metrics_module, "sharded", lambda strategy: True)
    reduce = SingleDeviceStrategy.reduce
    monkeypatch.setattr(SingleDeviceStrategy, "reduce", lambda self, t, *args, reduce_op=None, **kwargs: t.clamp(min=1)
                        if reduce_op == "max" else reduce(self, t, *args, reduce_op=reduce_op, **kwargs))
    cli = run("test", cli_args(AUTOENCODER, shards, tmp_path, [metrics_callback(tmp_path / "cache", max_samples=2)]))
    assert calls == [2, 1, 1]  # batches of 2, 2, 1: the cap reached on the first
    assert report(tmp_path)["metrics"]["test/samples"] == 2 and sample_metrics(cli).extractor.images_seen == 2 + 2


def test_sampler_table_runs_the_evaluation_once_per_sampler(shards: Path, tmp_path: Path) -> None:
    model = {"codec": {"init_args": {"weights": None}}}
    args = [*cli_args(CLASS2IMG, shards, tmp_path / "fit", [], model), "--model.init_args.backbone", str(TINY_UNET)]
    run("fit", [*args, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"])
    evaluation = cli_args(CLASS2IMG, shards, tmp_path / "table", [metrics_callback(tmp_path / "cache")], model)
    configs = [evaluation[i + 1] for i, a in enumerate(evaluation) if a == "--config"]
    options = [a for i, a in enumerate(evaluation) if a != "--config" and (i == 0 or evaluation[i - 1] != "--config")]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["sampler_table"])
        rows = sampler_table.main([*(a for c in configs for a in ("--config", c)), "--ckpt_path",
                                   str(tmp_path / "fit" / "checkpoints" / "last.ckpt"), "--samplers", "ddim:2", "heun:2",
                                   "--out", str(tmp_path / "rows.json"), *options,
                                   "--model.init_args.backbone", str(TINY_UNET)])
    assert [(r["sampler"], r["steps"], r["nfe"]) for r in rows] == [("ddim", 2, 2), ("heun", 2, 3)]
    assert all(math.isfinite(r["fid"]) and r["samples"] == TEST_SAMPLES for r in rows)
    assert rows[0]["fid"] != rows[1]["fid"]  # the sampler changed, and with it the samples
    assert json.loads((tmp_path / "rows.json").read_text()) == rows


# --- stage 2: per-sample seeds make FID independent of the number of ranks --------------------------
def test_fid_samples_are_the_same_on_one_and_two_ddp_ranks(shards: Path, tmp_path: Path) -> None:
    """The whole test split (5 samples, dealt 3 + 2 to two ranks) generated under 1 and 2 ranks gives one FID and KID."""
    model = {"codec": {"init_args": {"weights": None}},
             "sampler": {"class_path": "ldm.diffusion.samplers.DPMSolverPP2M", "init_args": {"steps": 2}}}

    def args(out: Path) -> list[str]:
        metrics = [FID_ENTRY, metric("ldm.metrics.fid.KID", subset_size=3)]
        callbacks = [metrics_callback(tmp_path / f"cache-{out.name}", metrics=metrics)]  # a cache each: both compute their reference
        return [*cli_args(CLASS2IMG, shards, out, callbacks, model), "--model.init_args.backbone", str(TINY_UNET)]

    run("test", args(tmp_path / "one"))
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    run_ldm(["test", *args(tmp_path / "two"), *ddp], ROOT, DDP_TIMEOUT_S, {"OMP_NUM_THREADS": "1"})

    one, two = report(tmp_path / "one"), report(tmp_path / "two")
    for result in (one, two):
        assert result["metrics"]["test/samples"] == TEST_SAMPLES  # every test sample once
        assert math.isfinite(result["metrics"]["test/loss"])
        expected = {"num_samples": TEST_SAMPLES, "sampler": "dpmpp_2m", "steps": 2, "guidance": 3.0, "seed": 0,
                    "checkpoint": None, "model": "LatentDiffusion"}
        assert {k: result[k] for k in expected} == expected
    assert two["metrics"]["test/fid"] == pytest.approx(one["metrics"]["test/fid"], rel=1e-6)
    # KID's subsets index the features, which are put in the samples' order whatever rank made them
    assert two["metrics"]["test/kid"] == pytest.approx(one["metrics"]["test/kid"], rel=1e-6)


# --- TrainingMonitor ---------------------------------------------------------------------------------
class LinearRegression(L.LightningModule):
    """y = w x + b on one fixed batch; records its gradient norm where Lightning calls the monitor, before clipping."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)
        self.grad_norms: list[float] = []

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return (self.linear(batch["x"]) - batch["y"]).square().mean()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = torch.cat([p.grad.flatten() for p in self.parameters()])
        self.grad_norms.append(grads.norm().item())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_training_monitor_logs_grad_norm_and_samples_per_sec_to_tensorboard(tmp_path: Path) -> None:
    torch.manual_seed(0)
    batch = {"x": torch.randn(3, 4), "y": torch.randn(3, 1) + 5}
    model = LinearRegression()
    trainer = L.Trainer(accelerator="cpu", max_steps=2, log_every_n_steps=1, gradient_clip_val=1e-3,
                        logger=TensorBoardLogger(tmp_path, name="monitor"), callbacks=[TrainingMonitor()],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader([batch] * 2, batch_size=None))

    events = EventAccumulator(trainer.logger.log_dir)
    events.Reload()
    grad_norm = events.Scalars("train/grad_norm")
    assert [e.step for e in grad_norm] == [0, 1]
    assert [e.value for e in grad_norm] == pytest.approx(model.grad_norms, rel=1e-6)
    assert all(norm > 1e-3 for norm in model.grad_norms)  # so clipping would have shown
    throughput = events.Scalars("train/samples_per_sec")
    assert len(throughput) == 2 and all(math.isfinite(e.value) and e.value > 0 for e in throughput)


@pytest.fixture(scope="module")
def tiny_i3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random TorchScript I3D (tests/tiny_modules.py's TinyI3D), FVD's network in place of i3d_torchscript.pt."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("i3d") / "tiny_i3d.pt"
    scripted(TinyI3D().eval(), path)
    return path


def test_a_video_run_logs_per_frame_fid_kid_and_fvd_and_caches_the_reference_by_clip_length(
        tmp_path: Path, tiny_i3d: Path, offline: None) -> None:
    """SampleMetrics(metrics=[FID, KID, FVD]) on a text-to-video model: FID and KID of every frame (the tiny
    extractor sees each clip's 8 frames), FVD of whole clips; the real clips' features are cached, and clips of
    another length are another reference."""
    clips = write_clip_shards(tmp_path / "clips")  # 2 validation clips of 8 frames
    metrics = [FID_ENTRY, metric("ldm.metrics.fid.KID", subset_size=4), metric("ldm.metrics.fvd.FVD")]
    callbacks = [metrics_callback(tmp_path / "cache", metrics=metrics, i3d_weights=str(tiny_i3d))]
    model = {"codec": {"init_args": {"weights": None}}, "init_weights": None,
             "backbone": str(ROOT / "configs/backbone/video-dit-tiny.yaml"),
             "sampler": {"class_path": "ldm.diffusion.samplers.DPMSolverPP2M", "init_args": {"steps": 2}}}

    def validate(name: str, *extra: str) -> tuple[dict[str, float], int]:
        """The logged values and the frames the tiny extractor saw."""
        cli = run("validate", [*cli_args(TXT2VID, clips, tmp_path / name, callbacks, model), *extra])
        extractor = sample_metrics(cli).extractor
        assert isinstance(extractor, FeatureExtractors)  # the tiny Inception and the tiny I3D in one forward
        return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}, extractor.parts[0].images_seen

    first, seen = validate("first")
    assert all(math.isfinite(first[f"val/{name}"]) for name in ("fid", "kid", "fvd")) and first["val/fvd"] > 0
    assert first["val/samples"] == 2 and seen == 2 * 2 * 8  # clips; generated and real frames
    cached = lambda: len(list((tmp_path / "cache").glob("refstats-*.safetensors")))
    assert cached() == 2  # the real frames' features and the real clips'
    again, seen = validate("again")
    assert seen == 2 * 8 and again["val/fvd"] == first["val/fvd"] and cached() == 2  # the reference from the cache
    four = '[{"class_path": "ldm.data.video.VideoClips", "init_args": {"frames": 4}}]'
    shorter, seen = validate("shorter", "--data.init_args.formats", four)
    assert seen == 2 * 2 * 4 and cached() == 4 and math.isfinite(shorter["val/fvd"])  # not the 8-frame reference
