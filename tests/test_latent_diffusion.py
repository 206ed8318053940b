"""Stage 2 end to end on CPU: every shapes experiment trains; predict, checkpoints, EMA and sampling behave.

CLI runs use the experiments as they are, with tiny data (32 px shards), a random codec, 2 sampler steps
and everything written under tmp_path; the unit-level tests build a tiny LatentDiffusion directly.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from ldm.autoencoder.vae import VAE
from ldm.autoencoder.weights import save_vae_safetensors
from ldm.callbacks.images import ImageGrid
from ldm.callbacks.predictions import PredictionWriter
from ldm.cli import LdmCLI, build_cli, compose
from ldm.data.synthetic import render_sample
from ldm.diffusion.samplers import (
    DDIM,
    DDPMAncestral,
    DPMSolverPP2M,
    Euler,
    Heun,
    Sampler,
)
from tests.processes import run_ldm
from tests.stage2 import RESOLUTION, cli_args, reads_clips, write_clip_shards, write_stage2_shards
from tests.tiny_models import assert_same_state, state, tiny_model
from tools import caption_probe

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted(p for p in (ROOT / "experiments").rglob("*.yaml")
                     if compose(["--config", str(p)])["model"]["class_path"] == "ldm.diffusion.module.LatentDiffusion")
TXT2IMG = ROOT / "experiments" / "shapes" / "txt2img_unet.yaml"
TXT2VID = ROOT / "experiments" / "shapes" / "txt2vid_dit.yaml"
PROMPTS = ["a large red circle in the center", "a small blue star on the left", "a large green square at the top"]
DDP_TIMEOUT_S = 240


@pytest.fixture(scope="module", autouse=True)
def cli_process():
    """One thread: tiny models run fastest so, and several thrash a busy 2-core machine. Pytest's argv is
    hidden from LightningCLI, which warns when it sees both command-line arguments and `args`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["ldm"])
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_stage2_shards(tmp_path_factory.mktemp("shapes"))


def _experiment(path: Path) -> dict[str, Any]:
    """The experiment's composed configuration (its parts and includes resolved)."""
    return compose(["--config", str(path)])


def differs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# --- every experiment, through the CLI --------------------------------------------------------------
@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip_shards(tmp_path_factory.mktemp("moving-shapes"))


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_trains_a_step_and_answers_jsonl_requests_with_maps(experiment: Path, shards: Path, clips: Path,
                                                                       tmp_path: Path) -> None:
    """fast_dev_run: a training and a validation step with finite losses; then the fitted model answers requests
    carrying caption, label and seg map, so every experiment finds the keys it reads."""
    (tmp_path / "maps").mkdir()
    lines = []
    for i in (5, 9):
        sample = render_sample(i, size=RESOLUTION)
        sample.seg.save(tmp_path / "maps" / f"{i}.png")
        lines.append(json.dumps({"caption": sample.caption, "label": sample.label, "seg": f"maps/{i}.png"}))
    (tmp_path / "requests.jsonl").write_text("\n".join(lines) + "\n")
    data = clips if reads_clips(experiment) else shards
    cli = build_cli(["fit", *cli_args(experiment, data, tmp_path), "--trainer.fast_dev_run", "1",
                     "--data.init_args.predict", str(tmp_path / "requests.jsonl")])
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 1
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["val/loss"])

    folder = tmp_path / "predictions"
    next(c for c in cli.trainer.callbacks if isinstance(c, PredictionWriter)).output_dir = str(folder)  # no log dir
    cli.trainer.predict(cli.model, datamodule=cli.datamodule)
    assert sorted(p.name for p in folder.glob("*.png")) == ["000000.png", "000001.png"]
    records = [json.loads(line) for line in (folder / "prompts.rank0.jsonl").read_text().splitlines()]
    assert sorted((r["index"], r["label"]) for r in records) == [(0, render_sample(5).label), (1, render_sample(9).label)]


def test_a_video_model_generates_clips_as_strips_of_their_frames(clips: Path, tmp_path: Path) -> None:
    """txt2vid trains on clips (each frame through the image autoencoder) and generates the model's ``frames``-frame
    clips for prediction requests, written as strips of their frames; a clip's noise is its own, so a request
    generates the same clip alone or in a batch (to float rounding)."""
    args = cli_args(TXT2VID, clips, tmp_path)
    build_cli(["fit", *args, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving up\na blue square staying still\n")
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    batched = [np.asarray(Image.open(p)) for p in sorted(_predict(args, ckpt, prompts).glob("*.png"))]
    alone = [np.asarray(Image.open(p)) for p in sorted(_predict([*args, "--data.init_args.batch_size", "1"], ckpt,
                                                                prompts).glob("*.png"))]
    assert [a.shape for a in batched] == [(RESOLUTION, 8 * RESOLUTION, 3)] * 2  # 8 frames side by side
    frames = batched[0].reshape(RESOLUTION, 8, RESOLUTION, 3)
    assert not np.array_equal(frames[:, 0], frames[:, 5])  # frames, not one image repeated
    for a, b in zip(batched, alone, strict=True):  # equal up to float rounding of another batch size's kernels
        assert np.abs(a.astype(int) - b).max() <= 2


@pytest.fixture(scope="module")
def trained(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[LdmCLI, list[str], Path]:
    """txt2img fitted for 2 steps with its codec loaded from a weights file: (cli, config args, last.ckpt)."""
    out = tmp_path_factory.mktemp("txt2img")
    vae_spec = _experiment(TXT2IMG)["model"]["init_args"]["codec"]["init_args"]["vae"]
    vae = VAE(**vae_spec["init_args"])
    channels = vae_spec["init_args"]["latent_channels"]
    vae.set_latent_stats(torch.randn(channels), torch.rand(channels) + 0.5)
    save_vae_safetensors(vae, out / "vae.safetensors")
    args = cli_args(TXT2IMG, shards, out, codec_weights=str(out / "vae.safetensors"))
    cli = build_cli(["fit", *args, "--trainer.max_steps", "2"])
    return cli, args, out / "checkpoints" / "last.ckpt"


def _predict(args: list[str], ckpt: Path, prompts: Path) -> Path:
    cli = build_cli(["predict", *args, "--ckpt_path", str(ckpt), "--data.init_args.predict", str(prompts)])
    return Path(cli.trainer.log_dir) / "predictions"


def test_predict_writes_one_png_per_prompt_reproducibly(trained: tuple, tmp_path: Path) -> None:
    _, args, ckpt = trained
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    first, second = _predict(args, ckpt, prompts), _predict(args, ckpt, prompts)
    assert first != second
    names = [f"{i:06d}.png" for i in range(len(PROMPTS))]
    for folder in (first, second):
        assert sorted(p.name for p in folder.glob("*.png")) == names
        lines = [json.loads(line) for line in (folder / "prompts.rank0.jsonl").read_text().splitlines()]
        assert sorted((r["index"], r["caption"]) for r in lines) == list(enumerate(PROMPTS))
    images = [[np.asarray(Image.open(folder / name)) for name in names] for folder in (first, second)]
    assert all(image.shape == (RESOLUTION, RESOLUTION, 3) for image in images[0])
    for a, b in zip(*images):  # same seed, same images
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(images[0][0], images[0][1])  # each request has noise of its own


@pytest.mark.parametrize("experiment", [TXT2IMG, TXT2IMG.with_name("txt2img_dit.yaml")], ids=lambda p: p.stem)
def test_predict_generates_each_request_at_its_own_width_and_height(experiment: Path, shards: Path, tmp_path: Path) -> None:
    """Wide, tall and square requests in one file (the square from the data's resolution): each image at its
    size, batched by size, and a request's image the same whatever else the file asks for (its noise is its own)."""
    sizes = [(96, 48), (48, 96), None, (96, 48)]  # (width, height); None: the default
    requests = [{"caption": PROMPTS[i % 3], **({} if size is None else {"width": size[0], "height": size[1]})}
                for i, size in enumerate(sizes)]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    (tmp_path / "alone.jsonl").write_text(json.dumps(requests[0]) + "\n")
    folders = [Path(build_cli(["predict", *cli_args(experiment, shards, tmp_path / name),
                               "--data.init_args.predict", str(tmp_path / f"{name}.jsonl")]).trainer.log_dir) / "predictions"
               for name in ("mixed", "alone")]
    images = [np.asarray(Image.open(folders[0] / f"{i:06d}.png")) for i in range(len(sizes))]
    assert [image.shape[:2][::-1] for image in images] == [size or (RESOLUTION, RESOLUTION) for size in sizes]
    alone = np.asarray(Image.open(folders[1] / "000000.png")).astype(int)
    assert np.abs(images[0].astype(int) - alone).max() <= 1  # float rounding of another batch size, at most 1 level


def test_a_request_of_a_size_the_model_cannot_take_is_refused_naming_its_line(shards: Path, tmp_path: Path) -> None:
    """The tiny run's UNet halves its latent once and its codec downsamples 4x: sides must be multiples of 8."""
    (tmp_path / "requests.jsonl").write_text('{"caption": "a"}\n\n{"caption": "b", "width": 100, "height": 48}\n')
    with pytest.raises(ValueError, match=r"requests.jsonl line 3 asks for 100x48 \(width x height\).*multiples of 8, "
                                         r"e.g. 96x48, 104x48"):
        build_cli(["predict", *cli_args(TXT2IMG, shards, tmp_path), "--data.init_args.predict", str(tmp_path / "requests.jsonl")])


def test_buckets_whose_sides_the_model_cannot_take_are_refused_before_training(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data.init_args.buckets: the buckets \[.*'24x44'.*\] \(width x height\) have "
                                         r"sides that are not multiples of 8.*set buckets.multiple to a multiple of 8"):
        build_cli(["fit", *cli_args(TXT2IMG, shards, tmp_path), "--data.init_args.buckets", "{max_ratio: 2.0, multiple: 4}"])


def test_caption_probe_scores_a_trained_model_on_its_validation_captions(trained: tuple,
                                                                        capsys: pytest.CaptureFixture) -> None:
    _, args, ckpt = trained  # every shapes caption says small or large: each of the 4 validation samples is probed
    caption_probe.main([*args, "--ckpt", str(ckpt), "--swap", "small=large", "large=small", "--seeds", "1"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"4 samples: the true caption's loss is lower for \d+%; swapping raises the loss by [+-]\d+\.\d+% on average", line)


def test_checkpoint_keeps_ema_leaves_frozen_parts_out_and_round_trips(trained: tuple) -> None:
    cli, args, ckpt = trained
    model = cli.model.eval()
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    state_dict = checkpoint["state_dict"]
    assert any(k.startswith("ema.") for k in state_dict) and any(k.startswith("backbone.") for k in state_dict)
    assert not [k for k in state_dict if k.startswith("codec.")]
    assert any(k.startswith("conditioner.embedders.0.clip.") for k in model.state_dict())
    assert not [k for k in state_dict if k.startswith("conditioner.")]  # the frozen text tower is its only part

    fresh = build_cli(args, run=False).model.eval()
    assert differs(fresh.backbone, model.backbone) and differs(fresh.ema, model.ema)
    fresh.on_load_checkpoint(checkpoint)  # what Lightning does, before a strict load
    fresh.load_state_dict(state_dict)
    assert_same_state(fresh.backbone, model.backbone)
    assert_same_state(fresh.ema, model.ema)
    assert_same_state(fresh.codec, model.codec)  # rebuilt from its weights file

    batch = {"caption": PROMPTS, "target_size": torch.tensor([[RESOLUTION, RESOLUTION]] * len(PROMPTS))}
    with model.ema_weights(), fresh.ema_weights():
        torch.testing.assert_close(fresh.generate(batch), model.generate(batch), rtol=0, atol=0)


def _other_codec_weights(out: Path, mean_shift: float = 0.0, seed: int | None = None) -> str:
    """The trained fixture's codec weights file, with its latent mean shifted or its weights re-drawn."""
    state = load_file(out / "vae.safetensors")
    state["latent_mean"] = state["latent_mean"] + mean_shift
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        state = {k: v + 0.01 * torch.randn(v.shape, generator=generator) if v.is_floating_point() and "latent" not in k
                 else v for k, v in state.items()}
    path = out / f"vae-shift{mean_shift}-seed{seed}.safetensors"
    save_file(state, path)
    return str(path)


def test_checkpoint_refuses_a_codec_with_other_weights_or_statistics(trained: tuple, shards: Path, tmp_path: Path) -> None:
    cli, args, ckpt = trained
    out = ckpt.parent.parent
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert checkpoint["codec"] == cli.model.codec.fingerprint()
    for weights, message in ((_other_codec_weights(out, mean_shift=0.5), "other latent statistics"),
                             (_other_codec_weights(out, seed=1), "another autoencoder")):
        other = build_cli(cli_args(TXT2IMG, shards, tmp_path, codec_weights=weights), run=False).model
        with pytest.raises(ValueError, match=message):
            other.on_load_checkpoint(checkpoint)
    same = build_cli(cli_args(TXT2IMG, shards, tmp_path, codec_weights=str(out / "vae.safetensors")), run=False).model
    same.on_load_checkpoint(checkpoint)  # the codec it was trained with loads


def test_fit_exports_the_ema_backbone_with_the_codec_fingerprint(trained: tuple) -> None:
    cli, _, ckpt = trained
    model = cli.model
    path = ckpt.parent.parent / "export.safetensors"  # where cli_args puts it
    exported = load_file(path)
    with model.ema_weights():
        assert_same_state({k.removeprefix("backbone."): v for k, v in exported.items() if k.startswith("backbone.")},
                          model.backbone)
    assert not [k for k in exported if not k.startswith("backbone.")]  # the frozen text tower is not exported
    with safe_open(path, "pt") as f:
        assert json.loads(f.metadata()["codec"]) == model.codec.fingerprint()


def test_init_weights_starts_backbone_and_ema_from_an_export(trained: tuple) -> None:
    cli, args, ckpt = trained
    export = ckpt.parent.parent / "export.safetensors"  # where cli_args puts it
    started = build_cli([*args, "--model.init_args.init_weights", str(export)], run=False).model
    with cli.model.ema_weights():
        assert_same_state(started.backbone, cli.model.backbone)  # the exported EMA weights
        assert_same_state(started.ema.module, cli.model.backbone)  # and the EMA starts from them too


def test_bf16_mixed_fit_has_finite_losses(shards: Path, tmp_path: Path) -> None:
    cli = build_cli(["fit", *cli_args(TXT2IMG, shards, tmp_path), "--trainer.precision", "bf16-mixed",
                "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1"])
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 2
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["val/loss"])


def test_ddp_fit_on_two_cpu_processes(shards: Path, tmp_path: Path) -> None:
    """txt2img with the DiT, swapped in by one option, trains and validates under 2-process CPU DDP (the UNet's
    DDP runs are test_resume_ddp.py's)."""
    swap = ["--model.init_args.backbone", str(ROOT / "configs" / "backbone" / "dit-tiny.yaml")]
    args = ["fit", *cli_args(TXT2IMG, shards, tmp_path), *swap,
            "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
            "--trainer.max_steps", "2", "--trainer.num_sanity_val_steps", "0",
            # one validation, where rank 0 alone samples the image grids: no collective may wait on it
            "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1"]
    run_ldm(args, ROOT, DDP_TIMEOUT_S, {"OMP_NUM_THREADS": "1"})
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def requests(labels: list[int], size: int = 16) -> dict[str, torch.Tensor]:
    return {"label": torch.tensor(labels), "target_size": torch.tensor([[size, size]] * len(labels))}


def test_validation_and_predict_use_the_ema_and_restore_the_trained_weights() -> None:
    model = tiny_model()
    with torch.no_grad():
        for p in model.ema.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trained_weights = state(model.backbone)
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    batch = {"image": torch.rand(2, 3, 16, 16) * 2 - 1, "label": torch.tensor([0, 3])}
    val_loss = trainer.validate(model, DataLoader([batch], batch_size=None), verbose=False)[0]["val/loss"]
    assert_same_state(model.backbone, trained_weights)

    def loss(weights: dict[str, torch.Tensor]) -> float:  # the validation loss of batch 0 with these weights
        reference = tiny_model()
        reference.load_state_dict(model.state_dict())
        reference.backbone.load_state_dict(weights)
        return reference.diffusion_loss(batch, torch.Generator().manual_seed(model.hparams.seed)).mean().item()

    assert val_loss == pytest.approx(loss(state(model.ema.module)), rel=1e-6)
    assert val_loss != pytest.approx(loss(trained_weights), rel=1e-3)

    prompts = {**requests([1, 4]), "index": torch.tensor([0, 1])}
    predicted = trainer.predict(model, DataLoader([prompts], batch_size=None))[0]["images"]
    assert_same_state(model.backbone, trained_weights)
    with model.ema_weights():
        torch.testing.assert_close(predicted, model.generate(prompts, indices=prompts["index"]))
    assert not torch.allclose(predicted, model.generate(prompts, indices=prompts["index"]), atol=1e-4)


def test_the_image_grid_also_samples_the_first_val_batch_at_each_size_asked(tmp_path: Path) -> None:
    model = tiny_model()
    trainer = SimpleNamespace(sanity_checking=False, current_epoch=0, log_dir=str(tmp_path), is_global_zero=True,
                              loggers=[], global_step=3, strategy=SimpleNamespace(model=model))
    batch = {"image": torch.rand(2, 3, 16, 16) * 2 - 1, "label": torch.tensor([0, 3]), "key": ["a", "b"]}
    ImageGrid(nrow=2, sizes=[(32, 16), (16, 24)]).on_validation_batch_end(trainer, model, None, batch, 0)
    grids = {p.name: Image.open(p).size for p in (tmp_path / "images").glob("*.png")}
    tile = {"": (16, 16), "_32x16": (32, 16), "_16x24": (16, 24)}  # (W, H) of each grid's images
    expected = {f"{name}{suffix}_step0000003.png": (2 * (w + 2) + 2, h + 4)  # make_grid: 2 px around each tile
                for suffix, (w, h) in tile.items() for name in ("samples_cfg1", "samples_cfg4")}
    assert grids == {**expected, "real_step0000003.png": (38, 20)}


@pytest.mark.parametrize("sampler", [DDPMAncestral(3), DDIM(3, eta=1.0), DDIM(3), DPMSolverPP2M(3), Euler(3), Heun(3)],
                         ids=["ddpm", "ddim1", "ddim0", "dpmpp_2m", "euler", "heun"])
def test_sample_depends_only_on_seed_and_index_for_every_sampler(sampler: Sampler) -> None:
    """Each sample draws its initial and per-step noise from its own stream, so batching cannot change it."""
    model = tiny_model()
    model.sampler = sampler
    everything = model.generate(requests([0, 1, 2, 3]))  # indices 0..3 in one batch
    parts = [model.generate(requests([2]), indices=torch.tensor([2])),
             model.generate(requests([3, 1]), indices=torch.tensor([3, 1]))]
    torch.testing.assert_close(parts[0][0], everything[2], rtol=0, atol=1e-4)  # so FID samples do not depend on
    torch.testing.assert_close(parts[1], everything[[3, 1]], rtol=0, atol=1e-4)  # the batching or the world size
    assert not torch.allclose(everything[2], everything[3], atol=1e-3)


def test_evaluation_draws_are_new_samples_of_the_same_condition() -> None:
    model = tiny_model()
    batch = {**requests([1, 2]), "key": ["a", "b"]}
    first, again, second = model.evaluation_images(batch), model.evaluation_images(batch, 0), model.evaluation_images(batch, 1)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert (first - second).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def test_class_label_changes_the_sample_from_the_same_noise() -> None:
    model = tiny_model()
    images = model.generate(requests([0, 1, 0]), indices=torch.tensor([7, 7, 7]))  # one noise for all three
    torch.testing.assert_close(images[0], images[2])
    assert (images[0] - images[1]).abs().max() > 1e-3


def test_ema_updates_once_per_optimizer_step_under_gradient_accumulation() -> None:
    model = tiny_model()
    trainer = Trainer(accelerator="cpu", max_steps=2, accumulate_grad_batches=2, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    batches = [{"image": torch.rand(2, 3, 16, 16) * 2 - 1, "label": torch.tensor([i, 5 - i])} for i in range(4)]
    trainer.fit(model, DataLoader(batches, batch_size=None))
    assert trainer.global_step == 2
    assert int(model.ema.num_updates) == 2
