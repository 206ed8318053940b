"""The Stable Diffusion experiments: one `&ckpt` line feeds UNet, codec and text encoder; a fine-tune from an SD
file trains, and tools/export.py turns its export into a diffusers pipeline that samples as the model does
and into an SD file holding its weights.

The experiments run as they are but for the checkpoint line, a reduced width (a tiny SD file of the same
block layouts stands in for the real one), 64 px shards and 2 sampler steps.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from ldm.cli import build_cli, compose
from ldm.convert.sd_unet import unet_from_sd
from ldm.export.sd import save_sd_checkpoint
from ldm.weights.io import under
from ldm.weights.sd import UNET_PREFIX
from tests.stage2 import ROOT, backbone_params, write_stage2_shards
from tests.sd_models import REDUCED, SIZE, sd_model
from tools import export as export_tool

SD = ROOT / "experiments" / "sd"
FINETUNES = {"finetune_sd15": "sd1", "finetune_sd2": "sd2"}
ANCHOR = re.compile(r"(init_weights: &ckpt )(\S+)")
pytestmark = [pytest.mark.filterwarnings("ignore:LightningCLI's args parameter"), pytest.mark.usefixtures("one_thread")]


def weight_paths(experiment: Path) -> set[str]:
    """Every path the composed experiment loads SD weights from: init_weights, codec weights, clip.pretrained."""
    model = compose(["--config", str(experiment)])["model"]["init_args"]
    text = model["conditioner"]["init_args"]["embedders"][0]["init_args"]["clip"]["pretrained"]
    return {model["init_weights"], model["codec"]["init_args"]["weights"], text}


def anchored_copy(folder: Path, checkpoint: str, text_cfg: dict | None = None) -> Path:
    """experiments/sd/ copied into ``folder`` (configs/ linked beside it) with ``checkpoint`` on each `&ckpt` line."""
    copy = folder / "experiments" / "sd"
    copy.mkdir(parents=True)
    (folder / "configs").symlink_to(ROOT / "configs")
    for source in SD.glob("*.yaml"):
        text = ANCHOR.sub(lambda m: m[1] + checkpoint, source.read_text())
        if text_cfg:  # the reduced text tower of the tiny stand-in file
            text = text.replace("pretrained: *ckpt}", f"pretrained: *ckpt, text_cfg: {text_cfg}}}")
        (copy / source.name).write_text(text)
    return copy


@pytest.mark.parametrize("name", ["sd15", *FINETUNES])
def test_one_anchor_line_sets_every_weights_path(name: str, tmp_path: Path) -> None:
    assert len(weight_paths(SD / f"{name}.yaml")) == 1
    assert weight_paths(anchored_copy(tmp_path, "/elsewhere/mine.ckpt") / f"{name}.yaml") == {"/elsewhere/mine.ckpt"}


def test_sd2_is_sd15s_unet_with_a_head_width_of_64() -> None:
    spec = compose(["--config", str(SD / "finetune_sd2.yaml")])["model"]["init_args"]["backbone"]
    with torch.device("meta"):
        reference = UNet2DConditionModel(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20])
    assert backbone_params(spec, context_dim=1024) == sum(p.numel() for p in reference.parameters()) == 865_910_724
    assert spec["init_args"]["gradient_checkpointing"]


@pytest.fixture(scope="module", params=list(FINETUNES))
def finetuned(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """(version, the fit's CLI, its config files, its output folder): one step from a tiny SD file."""
    version = FINETUNES[request.param]
    out = tmp_path_factory.mktemp(request.param)
    save_sd_checkpoint(sd_model(version, REDUCED[version]), out / "tiny-sd.safetensors")
    experiment = anchored_copy(out / "tree", str(out / "tiny-sd.safetensors"), REDUCED[version]["text"]) / f"{request.param}.yaml"
    shards = write_stage2_shards(out / "shards")
    overlay = {  # the reduced width of the tiny file; 2 sampler steps; everything written under out
        "model": {"init_args": {
            "backbone": {"class_path": "ldm.backbones.unet.UNet", "init_args": REDUCED[version]["unet"]},
            "codec": {"init_args": {"vae": {"class_path": "ldm.autoencoder.vae.VAE", "init_args": REDUCED[version]["vae"]}}},
            "sampler": {"class_path": "ldm.diffusion.samplers.DDIM", "init_args": {"steps": 2}},
        }},
        "data": {"init_args": {"train": str(shards / "train" / "shard-*.tar"), "val": str(shards / "val" / "shard-*.tar"),
                               "resolution": SIZE, "batch_size": 2, "num_workers": 0, "pin_memory": False}},
        "trainer": {"logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(out / "runs"), "name": "test"}}},
    }
    (out / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    configs = [str(experiment), str(out / "overlay.yaml")]
    cli = build_cli(["fit", *(a for c in configs for a in ("--config", c)), "--trainer.fast_dev_run", "1",
                     "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                     "--checkpoint.dirpath", str(out / "checkpoints"), "--export.path", str(out / "export.safetensors")])
    return version, cli, configs, out


def test_finetune_from_an_sd_file_trains(finetuned: tuple) -> None:
    version, cli, _, out = finetuned
    assert cli.trainer.global_step == 1 and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert cli.model.backbone.gradient_checkpointing and cli.trainer.precision == "bf16-mixed"
    started = sd_model(version, REDUCED[version])  # the weights the tiny file was written from
    assert cli.model.conditioner.embedders[0].clip.positional_embedding.equal(
        started.conditioner.embedders[0].clip.positional_embedding)
    assert not cli.model.backbone.conv_out.weight.equal(started.backbone.conv_out.weight)  # trained one step


def test_export_tool_writes_what_diffusers_and_sd_tools_read(finetuned: tuple) -> None:
    version, cli, configs, out = finetuned
    args = [a for c in configs for a in ("--config", c)] + ["--ckpt", str(out / "export.safetensors")]
    export_tool.main([*args, "--out", str(out / "diffusers")])
    export_tool.main([*args, "--format", "sd", "--out", str(out / "sd.safetensors")])
    model = cli.model.eval()

    pipeline = DiffusionPipeline.from_pretrained(out / "diffusers", local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    prompts = ["a small blue star on the left"]
    ours = (model.generate({"caption": prompts, "target_size": torch.tensor([[SIZE, SIZE]])}) + 1) / 2
    noise = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(model.hparams.seed))
    theirs = pipeline(prompts, num_inference_steps=2, guidance_scale=model.hparams.cfg_scale, latents=noise,
                      output_type="pt").images  # the default size: the data resolution
    torch.testing.assert_close(theirs, ours, atol=1e-3, rtol=0)

    unet = unet_from_sd(under(load_file(out / "sd.safetensors"), UNET_PREFIX), model.backbone.state_dict())
    assert all(torch.equal(unet[k], v) for k, v in model.backbone.state_dict().items())
    shutil.rmtree(out / "diffusers")
    with pytest.raises(SystemExit):  # an existing path is never overwritten
        export_tool.main([*args, "--format", "sd", "--out", str(out / "sd.safetensors")])
