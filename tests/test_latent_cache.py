"""tools/cache_latents.py: a cached-latent run trains like the run that encodes images, a stale cache is
refused, and the tool resumes and splits across processes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ldm.autoencoder.vae import VAE
from ldm.autoencoder.weights import save_vae_safetensors
from ldm.cli import build_cli, compose
from ldm.data import batch as B
from ldm.data.latents import CACHE_INFO
from ldm.data.synthetic import write_shapes
from tests.stage2 import ROOT, cli_args
from tools import benchmark, cache_latents

pytestmark = [pytest.mark.filterwarnings("ignore:LightningCLI's args parameter"), pytest.mark.usefixtures("one_thread")]
SEG2IMG = ROOT / "experiments" / "shapes" / "seg2img_unet.yaml"
TINY = str(ROOT / "configs" / "backbone" / "unet-tiny.yaml")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Shards (2 train shards) and a codec weights file with latent statistics."""
    root = tmp_path_factory.mktemp("cache")
    write_shapes(root / "shards", train=12, val=2, test=0, size=32, samples_per_shard=6)
    vae_spec = compose(["--config", str(SEG2IMG)])["model"]["init_args"]["codec"]["init_args"]["vae"]
    torch.manual_seed(0)
    vae = VAE(**vae_spec["init_args"])
    vae.set_latent_stats(torch.randn(4) * 0.1, torch.rand(4) + 0.5)
    save_vae_safetensors(vae, root / "vae.safetensors")
    return root / "shards", root / "vae.safetensors"


def args(shards: Path, out: Path, weights: Path, *extra: str) -> list[str]:
    overlay = out.parent / f"{out.name}-posterior.yaml"  # the posterior's mean: the same z for both runs
    overlay.write_text(yaml.safe_dump({"model": {"init_args": {"codec": {"init_args": {"sample_posterior": False}}}}}))
    return [*cli_args(SEG2IMG, shards, out, codec_weights=str(weights)), "--config", str(overlay),
            "--model.init_args.backbone", TINY, "--data.init_args.batch_size", "3", *extra]


def cache(shards: Path, weights: Path, out: Path, *extra: str) -> dict:
    configs = args(shards, out.parent / "tool", weights)
    return cache_latents.main(["--config", configs[1], *configs[2:], "--out", str(out), "--text", "--dtype", "float32", *extra])


def losses(out: Path) -> list[float]:
    events = EventAccumulator(str(next((out / "runs" / "test").glob("version_*")))).Reload()
    return [e.value for e in sorted(events.Scalars("train/loss"), key=lambda e: e.step)]


def test_cached_latents_train_like_encoded_images(setup: tuple[Path, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    shards, weights = setup
    monkeypatch.setattr(sys, "argv", ["ldm"])
    info = cache(shards, weights, tmp_path / "latents")
    assert info["flips"] is False and info["text_embedders"] == [0]  # the caption tower; the seg map is computed
    fit = ["--trainer.max_steps", "4", "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1"]
    build_cli(["fit", *args(shards, tmp_path / "images", weights), *fit])
    build_cli(["fit", *args(shards, tmp_path / "cached", weights), *fit,
               "--data.init_args.train", str(tmp_path / "latents" / "shard-*.tar")])
    encoded, cached = losses(tmp_path / "images"), losses(tmp_path / "cached")
    assert len(encoded) == 4 and cached == pytest.approx(encoded, rel=1e-5, abs=1e-6)


def test_a_cache_of_another_codec_or_text_encoder_is_refused(setup: tuple[Path, Path], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    shards, weights = setup
    monkeypatch.setattr(sys, "argv", ["ldm"])
    cache(shards, weights, tmp_path / "latents")
    other = tmp_path / "other.safetensors"
    state = load_file(weights)
    state["latent_mean"] = state["latent_mean"] + 1  # the same autoencoder, other statistics
    save_file(state, other)
    fit = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
           "--data.init_args.train", str(tmp_path / "latents" / "shard-*.tar")]
    with pytest.raises(ValueError, match="were made with another autoencoder or latent statistics"):
        build_cli(["fit", *args(shards, tmp_path / "stale", other), *fit])
    text = yaml.safe_load((ROOT / "configs" / "embedder" / "text-tiny.yaml").read_text())
    text["init_args"]["clip"]["seed"] = 1  # another random tower
    other_text = tmp_path / "other-text.yaml"
    other_text.write_text(yaml.safe_dump({"model": {"init_args": {"conditioner": {"init_args": {
        "embedders": [text, str(ROOT / "configs" / "embedder" / "shapes-seg.yaml")]}}}}}))
    with pytest.raises(ValueError, match="were made with another text encoder"):
        build_cli(["fit", *args(shards, tmp_path / "text", weights), *fit, "--config", str(other_text)])


def test_the_tool_resumes_and_splits_shards_over_processes(setup: tuple[Path, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    shards, weights = setup
    monkeypatch.setattr(sys, "argv", ["ldm"])
    out = tmp_path / "latents"
    cache(shards, weights, out, "--rank", "1", "--world-size", "2")
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000001.tar"]  # rank 1 of 2: every other source shard
    written = (out / "shard-000001.tar").stat().st_mtime_ns
    cache(shards, weights, out, "--rank", "0", "--world-size", "2")
    cache(shards, weights, out)  # a rerun has nothing left to do
    assert (out / "shard-000001.tar").stat().st_mtime_ns == written
    index = json.loads((out / "shardindex.json").read_text())["shardlist"]
    assert [(e["url"], e["nsamples"]) for e in index] == [("shard-000000.tar", 6), ("shard-000001.tar", 6)]
    info = json.loads((out / CACHE_INFO).read_text())
    assert info["codec_hash"] and info["resolution"] == 32 and info["extra_keys"] == {"seg.png": "class"}
    assert B.cached_embedding(0) == "embedding.0"


def test_the_train_benchmark_times_a_cache_with_its_loader(setup: tuple[Path, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    shards, weights = setup
    cache(shards, weights, tmp_path / "latents")
    options = args(shards, tmp_path / "bench", weights)
    benchmark.main(["train", "--config", options[1], "--steps", "2", "--warmup", "1", "--cached",
                    str(tmp_path / "latents" / "shard-*.tar"), *options[2:]])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["loader_workers"] == 1 and result["steps"] == 2 and result["samples_per_s"] > 0
    assert str(tmp_path / "latents") in " ".join(result["ldm_options"])
