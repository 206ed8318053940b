"""tools/cache_latents.py: a cached-latent run trains like the run that encodes images, the default cache
(bfloat16 moments, flipped copies) gives the latents encoding the images would, a stale cache is refused,
and the tool resumes and splits across processes."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds
import yaml
from safetensors.torch import load, load_file, save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ldm.autoencoder.vae import VAE
from ldm.autoencoder.weights import save_vae_safetensors
from ldm.cli import build_cli, compose, instantiate
from ldm.data import batch as B
from ldm.data.datamodule import WebDataModule
from ldm.data.entries import resize_map
from ldm.data.latents import CACHE_INFO, MEAN, TENSORS, LatentDecoder
from ldm.data.shards import expand_shards
from ldm.data.stream import ShardStream
from ldm.data.synthetic import write_shapes
from tests.stage2 import ROOT, cli_args, write_clip_shards
from tools import cache_latents
from tools.bench import cli as benchmark  # tools/benchmark.py runs it

pytestmark = [pytest.mark.filterwarnings("ignore:LightningCLI's args parameter"), pytest.mark.usefixtures("one_thread")]
SEG2IMG = ROOT / "experiments" / "shapes" / "seg2img_unet.yaml"
TXT2VID = ROOT / "experiments" / "shapes" / "txt2vid_dit.yaml"
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


@pytest.fixture(scope="module")
def float_cache(setup: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The train split cached once for the tests that only read it: float32 moments and the text embeddings."""
    shards, weights = setup
    out = tmp_path_factory.mktemp("float-cache") / "latents"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["ldm"])
        return out, cache(shards, weights, out)


def losses(out: Path) -> list[float]:
    events = EventAccumulator(str(next((out / "runs" / "test").glob("version_*")))).Reload()
    return [e.value for e in sorted(events.Scalars("train/loss"), key=lambda e: e.step)]


def test_cached_latents_train_like_encoded_images(setup: tuple[Path, Path], float_cache: tuple[Path, dict],
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shards, weights = setup
    latents, info = float_cache
    monkeypatch.setattr(sys, "argv", ["ldm"])
    assert info["flips"] is False and info["text_embedders"] == [0]  # the caption tower; the seg map is computed
    fit = ["--trainer.max_steps", "4", "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1"]
    build_cli(["fit", *args(shards, tmp_path / "images", weights), *fit])
    build_cli(["fit", *args(shards, tmp_path / "cached", weights), *fit,
               "--data.init_args.train", str(latents / "shard-*.tar")])
    encoded, cached = losses(tmp_path / "images"), losses(tmp_path / "cached")
    assert len(encoded) == 4 and cached == pytest.approx(encoded, rel=1e-5, abs=1e-6)


def test_the_default_cache_gives_the_latents_encoding_the_images_would(setup: tuple[Path, Path], tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """bfloat16 moments, z drawn from them and flipped copies: batch for batch the same keys, flips and maps
    as the image loader's, and the same z up to the rounding of the stored moments: with eps the shared
    generator's draw, |z_cached - z_images| <= 2^-8 (|mean| + |std eps|) / latent std (bfloat16 keeps 8
    significant bits), plus 1e-5 for float32 convolutions run over other batch sizes."""
    shards, weights = setup
    monkeypatch.setattr(sys, "argv", ["ldm"])
    options = [*cli_args(SEG2IMG, shards, tmp_path / "run", codec_weights=str(weights)), "--model.init_args.backbone",
               TINY, "--data.init_args.batch_size", "3", "--data.init_args.hflip", "true"]  # the experiment's own codec
    out = tmp_path / "latents"
    info = cache_latents.main(["--config", options[1], *options[2:], "--out", str(out)])  # every default kept
    assert info["flips"] is True and info["dtype"] == "bfloat16"
    stored = load(next(iter(wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False)))[TENSORS])
    assert stored[MEAN].dtype == torch.bfloat16
    model, images = instantiate(options)
    assert model.codec.sample_posterior  # z is drawn, not the mean
    settings = {k: v for k, v in images.hparams.items() if not k.startswith("_")}  # less jsonargparse's class path
    cached = type(images)(**{**settings, "train": str(out / "shard-*.tar")})
    unflipped = {b[B.KEY][i]: b[B.IMAGE][i] for b in ShardStream(expand_shards(images.patterns["train"]),
                                                                 images.image_decoder(train=False), 4).batches(0)
                 for i in range(len(b[B.KEY]))}
    images.setup("fit")
    cached.setup("fit")
    flips = []
    for step, (a, b) in enumerate(zip(images.train_dataloader(), cached.train_dataloader(), strict=True)):
        assert a[B.KEY] == b[B.KEY]
        flips += [not torch.equal(image, unflipped[key]) for key, image in zip(a[B.KEY], a[B.IMAGE])]
        assert torch.equal(resize_map(a["seg"], b["seg"].shape[-2:]), b["seg"].long())  # maps flipped alike
        mean, std = model.codec.moments(a[B.IMAGE])
        eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(step))  # what from_moments draws first
        z_images = model.latents(a, torch.Generator().manual_seed(step))
        z_cached = model.latents(b, torch.Generator().manual_seed(step))
        bound = 2**-8 * (mean.abs() + (std * eps).abs()) / model.codec.std + 1e-5
        assert ((z_cached - z_images).abs() <= bound).all()
        assert not torch.allclose(z_images, (mean - model.codec.mean) / model.codec.std)  # drawn, not the mean
    assert len(flips) == 12 and any(flips) and not all(flips)


def test_a_cache_of_another_codec_or_text_encoder_is_refused(setup: tuple[Path, Path], float_cache: tuple[Path, dict],
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shards, weights = setup
    monkeypatch.setattr(sys, "argv", ["ldm"])
    other = tmp_path / "other.safetensors"
    state = load_file(weights)
    state["latent_mean"] = state["latent_mean"] + 1  # the same autoencoder, other statistics
    save_file(state, other)
    cached = ["--data.init_args.train", str(float_cache[0] / "shard-*.tar")]

    def train_step(*options: str) -> None:
        """A training step of the run these options make, on the first batch from the cache."""
        model, data = instantiate([*options, *cached])
        data.setup("fit")
        model.training_step(next(iter(data.train_dataloader())), 0)

    with pytest.raises(ValueError, match="were made with another autoencoder or latent statistics"):
        train_step(*args(shards, tmp_path / "stale", other))
    text = yaml.safe_load((ROOT / "configs" / "embedder" / "text-tiny.yaml").read_text())
    text["init_args"]["clip"]["seed"] = 1  # another random tower
    other_text = tmp_path / "other-text.yaml"
    other_text.write_text(yaml.safe_dump({"model": {"init_args": {"conditioner": {"init_args": {
        "embedders": [text, str(ROOT / "configs" / "embedder" / "shapes-seg.yaml")]}}}}}))
    with pytest.raises(ValueError, match="were made with another text encoder"):
        train_step(*args(shards, tmp_path / "text", weights), "--config", str(other_text))


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


def test_the_train_benchmark_times_a_cache_with_its_loader(setup: tuple[Path, Path], float_cache: tuple[Path, dict],
                                                           tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shards, weights = setup
    latents = float_cache[0]
    options = args(shards, tmp_path / "bench", weights)
    benchmark.main(["train", "--config", options[1], "--steps", "2", "--warmup", "1", "--cached",
                    str(latents / "shard-*.tar"), *options[2:]])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["loader_workers"] == 1 and result["steps"] == 2 and result["samples_per_s"] > 0
    assert str(latents) in " ".join(result["ldm_options"])


def test_a_bucketed_cache_gives_the_batches_and_latents_training_from_images_would(
        setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mixed-aspect shards in buckets: the cache stores each sample at its bucket, in its source order, so a cached
    epoch deals the same samples to the same batches (one bucket each) with the same latents; a square run refuses it."""
    _, weights = setup
    monkeypatch.setattr(sys, "argv", ["ldm"])
    shards = tmp_path / "mixed"
    write_shapes(shards, train=12, val=2, test=0, size=32, samples_per_shard=6, aspect="mixed")
    options = [*args(shards, tmp_path / "run", weights), "--data.init_args.buckets", '{"max_ratio": 2.0, "multiple": 8}']
    out = tmp_path / "latents"
    info = cache_latents.main(["--config", options[1], *options[2:], "--out", str(out), "--dtype", "float32"])
    assert info["buckets"] == ((48, 24), (40, 24), (32, 32), (24, 40), (24, 48))
    model, images = instantiate(options)
    cached = instantiate([*options, "--data.init_args.train", str(out / "shard-*.tar")])[1]
    images.setup("fit")
    cached.setup("fit")
    sizes = set()
    for step, (a, b) in enumerate(zip(images.train_dataloader(), cached.train_dataloader(), strict=True)):
        assert a[B.KEY] == b[B.KEY] and torch.equal(a[B.TARGET_SIZE], b[B.TARGET_SIZE])
        sizes.add(tuple(a[B.IMAGE].shape[-2:]))
        z_images, z_cached = (model.latents(x, torch.Generator().manual_seed(step)) for x in (a, b))
        torch.testing.assert_close(z_cached, z_images, rtol=1e-5, atol=1e-5)  # the posterior's mean, float32
    assert len(sizes) > 2  # several buckets, each batch at one
    square = instantiate([*options, "--data.init_args.train", str(out / "shard-*.tar"), "--data.init_args.buckets", "null",
                          "--data.init_args.num_workers", "0"])[1]
    square.setup("fit")
    with pytest.raises(ValueError, match=r"is at bucket \[\d+, \d+\] \(H, W\), but this run's data has no buckets: rebuild the cache"):
        next(iter(square.train_dataloader()))


def test_a_clip_cache_gives_the_batches_and_latents_training_from_clips_would(
        setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Moving-shapes clips: each frame's moments stored as a (C, T, h, w) clip with its fps and frame count, and a
    cached epoch gives the clip run's batches and latents; moving-shapes.yaml recognises the cache by itself."""
    _, weights = setup
    monkeypatch.setattr(sys, "argv", ["ldm"])
    shards = write_clip_shards(tmp_path / "clips")
    overlay = tmp_path / "posterior.yaml"  # the posterior's mean: the same z for both runs
    overlay.write_text(yaml.safe_dump({"model": {"init_args": {"codec": {"init_args": {"sample_posterior": False}}}}}))
    options = [*cli_args(TXT2VID, shards, tmp_path / "run", codec_weights=str(weights)), "--config", str(overlay)]
    out = tmp_path / "latents"
    info = cache_latents.main(["--config", options[1], *options[2:], "--out", str(out), "--dtype", "float32"])
    assert info["clips"] == {"frames": 8, "stride": 1, "fps": None}
    model, clips = instantiate(options)
    cached = instantiate([*options, "--data.init_args.train", str(out / "shard-*.tar")])[1]
    clips.setup("fit")
    cached.setup("fit")
    batches = 0
    for step, (a, b) in enumerate(zip(clips.train_dataloader(), cached.train_dataloader(), strict=True)):
        assert a[B.KEY] == b[B.KEY] and a[B.IMAGE].ndim == 5 and b[B.LATENT_MEAN].shape[1:3] == (4, 8)
        assert torch.equal(a[B.FPS], b[B.FPS]) and torch.equal(a[B.NUM_FRAMES], b[B.NUM_FRAMES])
        z_clips, z_cached = (model.latents(x, torch.Generator().manual_seed(step)) for x in (a, b))
        torch.testing.assert_close(z_cached, z_clips, rtol=1e-5, atol=1e-5)  # the posterior's mean, float32
        batches += 1
    assert batches == 2  # 4 clips in batches of 2


def test_a_cache_loader_resumes_at_its_position_decoding_nothing_before_it(float_cache: tuple[Path, dict],
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Latent-cache shards resume as image shards do: the shards reopened at the workers' positions."""
    latents, _ = float_cache

    def loader():
        data = WebDataModule(train=str(latents / "shard-*.tar"), batch_size=2, num_workers=0, resolution=32,
                             shuffle_buffer=2, pin_memory=False)
        data.setup("fit")
        return data.train_dataloader()

    expected = [list(b[B.KEY]) for b in loader()]
    interrupted = loader()
    seen = [list(b[B.KEY]) for b in itertools.islice(iter(interrupted), 4)]  # 8 of 12 samples
    decoded = []
    original = LatentDecoder.__call__
    monkeypatch.setattr(LatentDecoder, "__call__", lambda self, raw, rng: decoded.append(raw["__key__"]) or original(self, raw, rng))
    resumed = loader()
    resumed.load_state_dict(interrupted.state_dict())
    assert len(expected) == 6 and seen + [list(b[B.KEY]) for b in resumed] == expected
    assert len(decoded) == 4  # the 2 in the shuffle buffer and the 2 still unread
