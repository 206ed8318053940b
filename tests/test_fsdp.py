"""Sharded training on CPU, as far as Lightning lets it run there: the FSDP units and checkpointed blocks read off
the backbone, and a sharded checkpoint of two gloo ranks exporting the same weights as the full checkpoint of the
same state. On the same two ranks, wrapped by BackboneFSDP as Lightning's setup does: the EMA swapped into the
sharded backbone, the end-of-fit export (every rank gathers, rank 0 writes), the image grid (every rank samples,
rank 0 saves), gradient clipping by the norm of all ranks' shards, the non-finite guard's decision shared by the
ranks, and a text-to-image model whose frozen text tower (a scalar parameter) stays out of FSDP. The GPU fit with
configs/trainer/fsdp.yaml runs in tools/gpu_check.py."""

from __future__ import annotations

import os
import re
import socket
from datetime import timedelta
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.fabric.strategies.fsdp import (
    _distributed_checkpoint_save,
    _get_full_state_dict_context,
    _get_sharded_state_dict_context,
)
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies.strategy import _ForwardRedirection
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointWrapper,
    apply_activation_checkpointing,
)
from torch.distributed.fsdp import FullyShardedDataParallel

from ldm.autoencoder.codec import LatentCodec
from ldm.autoencoder.vae import VAE
from ldm.backbones.dit import DiT
from ldm.backbones.unet import UNet
from ldm.callbacks.export import ExportWeights
from ldm.callbacks.images import ImageGrid
from ldm.conditioning.conditioner import Conditioner
from ldm.conditioning.label import ClassEmbedder
from ldm.conditioning.open_clip import OpenCLIP
from ldm.conditioning.text import OpenCLIPTextEmbedder
from ldm.data import batch as B
from ldm.diffusion.module import LatentDiffusion
from ldm.diffusion.samplers import DPMSolverPP2M
from ldm.export.text_to_image import load_for_export
from ldm.training.fsdp import (
    BackboneFSDP,
    checkpointing_policy,
    load_sharded_checkpoint,
    wrap_policy,
)
from ldm.training.nonfinite import NonFiniteGuard
from ldm.training.speed import clip_gradients
from tests.backbones import TINY
from tests.tiny_clip import register_tiny_clip

TINY_DIT = {"patch_size": 2, "width": 64, "depth": 2, "num_heads": 2}
BACKBONES = {"unet": partial(UNet, **TINY), "dit": partial(DiT, **TINY_DIT)}
# the blocks each backbone repeats, by their names in a LatentDiffusion (the trained backbone and its EMA copy)
BLOCK_NAMES = {"unet": r"(backbone|ema\.module)\.(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.(resnets|attentions)\.\d+",
               "dit": r"(backbone|ema\.module)\.blocks\.\d+"}
WORLD_SIZE = 2
TINY_CLIP = "ldm-test-fsdp-clip"  # registered by the fixtures that build tiny_text_model


def tiny_codec() -> LatentCodec:
    return LatentCodec(VAE(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4, norm_groups=4),
                       scale=1.0)


def tiny_model(kind: str, ema: bool = True) -> LatentDiffusion:
    """A class-conditional LatentDiffusion with a random codec, an EMA and a trained class table (the same every call)."""
    torch.manual_seed(0)
    return LatentDiffusion(BACKBONES[kind], tiny_codec(), Conditioner([ClassEmbedder(3, 8)]),
                           sampler=DPMSolverPP2M(3), ema_decay=0.9 if ema else None)


def tiny_text_model() -> LatentDiffusion:
    """Text and class conditioning: a frozen OpenCLIP text tower (with CLIP's scalar ``logit_scale``) beside a trained
    class table, so the conditioner is partly frozen."""
    torch.manual_seed(0)
    text = OpenCLIPTextEmbedder(clip=OpenCLIP(TINY_CLIP, random_init=True), layer="last")
    return LatentDiffusion(BACKBONES["unet"], tiny_codec(), Conditioner([text, ClassEmbedder(3, 8)]), ema_decay=0.9)


def frozen_names(model: nn.Module, ignored: list[nn.Module]) -> set[str]:
    return {name for name, m in model.named_modules() if any(m is i for i in ignored)}


def wrapped(policy, model: nn.Module) -> set[str]:
    """Names of the submodules ``policy`` wraps (FSDP's per-module decision, asked without a process group)."""
    return {name for name, m in model.named_modules() if name and policy(module=m, recurse=False, nonwrapped_numel=0)}


@pytest.mark.parametrize("kind", list(BACKBONES))
def test_each_block_and_each_backbone_is_one_fsdp_unit(kind: str) -> None:
    model = tiny_model(kind)
    names = {name for name, _ in model.named_modules()}
    blocks = {name for name in names if re.fullmatch(BLOCK_NAMES[kind], name)}
    assert len(blocks) == 2 * {"unet": 12, "dit": 2}[kind]  # UNet: 3 down, 3 mid, 6 up (ResBlocks and transformers)
    assert wrapped(wrap_policy(model), model) == blocks | {"backbone", "ema.module"}
    assert wrapped(checkpointing_policy(model), model) == blocks


def test_activation_checkpointing_wraps_the_blocks_and_keeps_the_function() -> None:
    model = tiny_model("unet").backbone
    model.train()
    x, t, vector = torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 8)
    before = model(x, t, vector=vector)
    apply_activation_checkpointing(model, auto_wrap_policy=checkpointing_policy(model))
    checkpointed = {name for name, m in model.named_modules() if isinstance(m, CheckpointWrapper)}
    assert checkpointed and all(re.fullmatch(r"(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.(resnets|attentions)\.\d+",
                                             name) for name in checkpointed)
    torch.testing.assert_close(model(x, t, vector=vector), before)


def test_a_model_without_backbone_is_refused_naming_the_config() -> None:
    with pytest.raises(ValueError, match=r"configs/trainer/fsdp.yaml.*a Sequential holds no Backbone"):
        wrap_policy(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="drop \\['auto_wrap_policy'\\]"):
        BackboneFSDP(auto_wrap_policy={nn.Linear})


@pytest.mark.parametrize("reduce_dtype", ["float32", "bfloat16"])
def test_mixed_precision_gathers_in_the_trainer_precision_and_reduces_in_the_option(reduce_dtype: str) -> None:
    strategy = BackboneFSDP(reduce_dtype=reduce_dtype)
    strategy.precision_plugin = FSDPPrecision("bf16-mixed")
    config = strategy.mixed_precision_config
    assert config.param_dtype == torch.bfloat16 and config.reduce_dtype == getattr(torch, reduce_dtype)
    assert config.buffer_dtype is None and not config.cast_root_forward_inputs  # as under autocast
    strategy.precision_plugin = FSDPPrecision("32-true")
    assert strategy.mixed_precision_config.param_dtype == torch.float32


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> None:
    register_tiny_clip(tmp_path_factory.mktemp("open_clip"), TINY_CLIP)


def test_the_frozen_parts_stay_out_of_fsdp_on_the_rank_device(tiny_clip: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """BackboneFSDP hands FSDP the largest frozen subtrees (not the EMA's frozen copy) as its ignored states, and puts
    them on the rank's device itself (meta here): FSDP moves only what it manages. The wrapping runs in the fixture."""
    model = tiny_text_model()
    monkeypatch.setattr(FSDPStrategy, "_setup_model", lambda self, module: module)
    strategy = BackboneFSDP(parallel_devices=[torch.device("meta")])
    strategy._setup_model(model)
    assert frozen_names(model, strategy.kwargs["ignored_states"]) == {"codec", "conditioner.embedders.0"}
    assert model.conditioner.embedders[0].clip.logit_scale.dim() == 0  # a scalar, which FSDP could not flatten
    tensors = [*model.named_parameters(), *model.named_buffers()]
    assert {name for name, t in tensors if t.is_meta} == {
        name for name, _ in tensors if name.startswith(("codec.", "conditioner.embedders.0."))}
    with pytest.raises(ValueError, match="leaves out the frozen modules: drop \\['ignored_modules'\\]"):
        BackboneFSDP(ignored_modules=[model.codec])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s batch: two images and their classes."""
    generator = torch.Generator().manual_seed(rank)
    return {B.IMAGE: torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1, B.LABEL: torch.tensor([rank, 2])}


def _wrap(model: LatentDiffusion) -> tuple[BackboneFSDP, FullyShardedDataParallel]:
    """``model`` wrapped as Lightning's setup of BackboneFSDP wraps it, on this rank's CPU (Lightning would pass
    ``device_id=None``, which FSDP refuses without an accelerator)."""
    strategy = BackboneFSDP(parallel_devices=[torch.device("cpu")])
    with mock.patch.object(FSDPStrategy, "_setup_model", lambda self, module: module):
        strategy._setup_model(model)  # BackboneFSDP's part: the policies and the frozen modules
    strategy.model = FullyShardedDataParallel(model, cpu_offload=strategy.cpu_offload, device_id=torch.device("cpu"),
                                              mixed_precision=strategy.mixed_precision_config,
                                              sharding_strategy=strategy.sharding_strategy, **strategy.kwargs)
    return strategy, strategy.model


def _train_and_save(rank: int, port: int, out: Path) -> None:
    """One rank: wrap the tiny model by BackboneFSDP, take one step as TrainingModule does (the guard, a fused step,
    the EMA update), clip gradients and check the guard on a NaN on rank 1, gather the weights with the EMA swapped
    in, export as ExportWeights does, draw the image grid, then save the state as Lightning's FSDP strategy does,
    both as a sharded folder and as a full checkpoint. Last, a step of the text-to-image model."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60))  # a hang fails
    torch.set_num_threads(1)
    model = tiny_model("unet")
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)  # counted before FSDP flattens them
    strategy, fsdp = _wrap(model)
    (out / f"units{rank}.txt").write_text("\n".join(
        name.replace("_fsdp_wrapped_module.", "") for name, m in fsdp.named_modules() if isinstance(m, FullyShardedDataParallel)))
    optimizer = torch.optim.AdamW((p for p in fsdp.parameters() if p.requires_grad), fused=True)
    generator = torch.Generator().manual_seed(rank)
    batch = _batch(rank)
    loss = _ForwardRedirection()(fsdp, model, "diffusion_loss", batch, generator).mean()  # as Lightning's step calls it
    loss.backward()
    guard = NonFiniteGuard()
    finite = guard.check(0, loss, optimizer)
    optimizer.step()
    model.ema.update(model.backbone, finite)

    # the first step's gradients sit on one rank (the backbone's output layer starts at zero): now give every element
    # of every rank's shards the gradient 1, clip to norm 1, then make one element NaN on rank 1 alone
    grads = [p.grad for p in optimizer.param_groups[0]["params"] if p.grad is not None]
    for g in grads:
        g.fill_(1.0)
    clip_gradients(optimizer, 1.0, model=fsdp)
    clipped = torch.cat([g.flatten() for g in grads])
    if rank == 1:
        grads[0].view(-1)[0] = float("nan")
    torch.save({"finite": finite, "poisoned": guard.check(1, loss, optimizer), "clipped": clipped, "trained": trained},
               out / f"step{rank}.pt")
    with model.ema.swapped(model.backbone), _get_full_state_dict_context(fsdp, world_size=WORLD_SIZE):
        swapped = fsdp.state_dict()  # every rank gathers, rank 0 gets it
    if rank == 0:
        torch.save({k: v for k, v in swapped.items() if k.startswith(("backbone.", "ema."))}, out / "swapped.pt")
    # what ExportWeights and ImageGrid read of the trainer (Lightning's FSDPStrategy refuses a CPU accelerator)
    trainer = SimpleNamespace(log_dir=str(out), default_root_dir=str(out), interrupted=False, global_step=1,
                              is_global_zero=rank == 0, strategy=strategy, sanity_checking=False, current_epoch=0,
                              loggers=[])
    ExportWeights(str(out / "fit.safetensors")).on_fit_end(trainer, model)
    ImageGrid(nrow=2).on_validation_batch_end(trainer, model, None, batch, 0)

    with _get_sharded_state_dict_context(fsdp):  # FSDPStrategy.save_checkpoint with state_dict_type="sharded"
        checkpoint = {"state_dict": fsdp.state_dict(), "epoch": 0, "global_step": 1}
    model.on_save_checkpoint(checkpoint)
    _distributed_checkpoint_save({"model": checkpoint.pop("state_dict")}, out / "sharded.ckpt")
    if rank == 0:
        torch.save(checkpoint, out / "sharded.ckpt" / _METADATA_FILENAME)
    with _get_full_state_dict_context(fsdp, world_size=WORLD_SIZE):  # state_dict_type="full": rank 0 writes
        checkpoint = {"state_dict": fsdp.state_dict(), "epoch": 0, "global_step": 1}
    if rank == 0:
        model.on_save_checkpoint(checkpoint)
        torch.save(checkpoint, out / "full.ckpt")
    _text_to_image_step(rank, out)
    dist.destroy_process_group()


def _text_to_image_step(rank: int, out: Path) -> None:
    """Wrap the text-to-image model by BackboneFSDP and take one optimizer step; keep what FSDP left out of its units,
    which parameters got gradients, and whether the text tower is still the one it was built with."""
    model = tiny_text_model()
    _, fsdp = _wrap(model)
    optimizer = torch.optim.AdamW(p for p in fsdp.parameters() if p.requires_grad)
    batch = {**_batch(rank), B.CAPTION: ["a red square", "a blue circle"]}
    loss = _ForwardRedirection()(fsdp, model, "diffusion_loss", batch, torch.Generator().manual_seed(rank)).mean()
    loss.backward()
    optimizer.step()
    tower = model.conditioner.embedders[0].clip.state_dict()
    built = tiny_text_model().conditioner.embedders[0].clip.state_dict()
    ignored = fsdp._ignored_params  # FSDP's own record of the parameters it leaves alone
    torch.save({"ignored": {name for name, p in model.named_parameters() if any(p is i for i in ignored)},
                "loss": loss.detach(),
                "with_grad": {name.replace("_fsdp_wrapped_module.", "") for name, p in model.named_parameters()
                              if p.grad is not None},
                "tower_unchanged": all(tower[k].equal(built[k]) for k in built)}, out / f"text{rank}.pt")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tiny_clip: None) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    # forked: the ranks start with this process's imports (spawned, each would import torch and Lightning again)
    mp.start_processes(_train_and_save, args=(_free_port(), out), nprocs=WORLD_SIZE, start_method="fork")
    return out


def test_two_ranks_shard_the_blocks_and_each_backbone(checkpoints: Path) -> None:
    units = set((checkpoints / "units0.txt").read_text().split("\n"))
    blocks = {name for name, _ in tiny_model("unet").named_modules() if re.fullmatch(BLOCK_NAMES["unet"], name)}
    assert units == blocks | {"", "backbone", "ema.module"}  # "": the root unit (the class table; the codec: none)


def test_the_image_grid_under_fsdp_is_what_the_unsharded_model_draws(checkpoints: Path, tmp_path: Path) -> None:
    """Every rank sampled (the class table gathered in the root's forward), rank 0 saved what the same weights give
    unsharded, where rank 0 alone samples."""
    model = tiny_model("unet")
    state = torch.load(checkpoints / "full.ckpt", weights_only=True)["state_dict"]
    assert all(k.startswith("codec.") for k in model.load_state_dict(state, strict=False).missing_keys)
    trainer = SimpleNamespace(log_dir=str(tmp_path), is_global_zero=True, strategy=SimpleNamespace(model=model),
                              sanity_checking=False, current_epoch=0, loggers=[], global_step=1)
    ImageGrid(nrow=2).on_validation_batch_end(trainer, model, None, _batch(0), 0)
    sharded = sorted((checkpoints / "images").iterdir())
    assert [p.name for p in sharded] == sorted(p.name for p in (tmp_path / "images").iterdir())
    assert len(sharded) == 1 + len(model.hparams.grid_cfg_scales)  # the samples at each scale and the real images
    for path in sharded:
        pixels = [torch.from_numpy(np.asarray(Image.open(p), dtype=np.int16)) for p in (path, tmp_path / "images" / path.name)]
        assert (pixels[0] - pixels[1]).abs().max() <= 1  # 8-bit rounding of the same image


def test_a_text_to_image_model_trains_with_its_frozen_parts_left_out_of_fsdp(checkpoints: Path) -> None:
    """The codec and the text tower (whose scalar logit_scale FSDP refuses) stay out; the rest trains, each element
    on one rank (a parameter gets a gradient on the ranks that hold some of it)."""
    steps = [torch.load(checkpoints / f"text{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]
    frozen = {name for name, _ in tiny_text_model().named_parameters()
              if name.startswith(("codec.", "conditioner.embedders.0."))}
    assert "conditioner.embedders.0.clip.logit_scale" in frozen
    assert all(step["ignored"] == frozen and step["loss"].isfinite() for step in steps)
    with_grad = set.union(*(step["with_grad"] for step in steps))
    assert {"conditioner.embedders.1.embedding.weight", "backbone.conv_out.weight"} <= with_grad
    assert not any(name.startswith(("codec.", "conditioner.embedders.0.", "ema.")) for name in with_grad)
    assert all(step["tower_unchanged"] for step in steps)


def test_the_ema_of_the_sharded_step_is_its_update(checkpoints: Path) -> None:
    """Shard by shard, EMA.update lerped each shadow shard with its own backbone shard: first update, decay 0.1."""
    state = torch.load(checkpoints / "full.ckpt", weights_only=True)["state_dict"]
    start = tiny_model("unet").backbone.state_dict()
    stepped = {k: state[f"backbone.{k}"] for k in start}
    assert any(not stepped[k].equal(start[k]) for k in start)
    for k in start:
        torch.testing.assert_close(state[f"ema.module.{k}"], start[k] + 0.9 * (stepped[k] - start[k]))


def test_the_ranks_clip_by_the_norm_of_all_their_shards(checkpoints: Path) -> None:
    """Every trained element had the gradient 1: clipped to norm 1 by the global norm, each is 1/sqrt(their count)."""
    steps = [torch.load(checkpoints / f"step{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]
    trained = steps[0]["trained"]
    assert sum(len(step["clipped"]) for step in steps) == trained  # FSDP: each element lives on one rank
    for step in steps:
        torch.testing.assert_close(step["clipped"], torch.full_like(step["clipped"], trained ** -0.5))


def test_a_nonfinite_gradient_shard_on_one_rank_skips_the_step_on_every_rank(checkpoints: Path) -> None:
    steps = [torch.load(checkpoints / f"step{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]
    assert all(step["finite"] for step in steps)
    assert not any(step["poisoned"] for step in steps)  # rank 0's own shards were finite


def test_the_ema_swapped_into_the_sharded_backbone_is_what_it_gathers(checkpoints: Path) -> None:
    """Inside ``EMA.swapped`` the gathered backbone is the EMA; after it (the full checkpoint) the trained one again."""
    swapped = torch.load(checkpoints / "swapped.pt", weights_only=True)
    after = torch.load(checkpoints / "full.ckpt", weights_only=True)["state_dict"]
    names = [k.removeprefix("backbone.") for k in after if k.startswith("backbone.")]
    assert any(not after[f"backbone.{k}"].equal(after[f"ema.module.{k}"]) for k in names)
    for k in names:
        assert swapped[f"backbone.{k}"].equal(after[f"ema.module.{k}"])
        assert swapped[f"ema.module.{k}"].equal(after[f"ema.module.{k}"])


def _exported(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    return load_file(path), metadata


def _export(checkpoint: Path, out: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What tools/export.py writes from ``checkpoint``: a model with no EMA of its own, loaded and exported."""
    load_for_export(tiny_model("unet", ema=False), checkpoint).export(str(out))
    return _exported(out)


@pytest.fixture(scope="module")
def full_export(checkpoints: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What tools/export.py writes from the full checkpoint."""
    return _export(checkpoints / "full.ckpt", checkpoints / "full.safetensors")


def test_a_sharded_checkpoint_exports_what_its_full_checkpoint_does(checkpoints: Path, full_export: tuple,
                                                                  tmp_path: Path) -> None:
    sharded, full = checkpoints / "sharded.ckpt", checkpoints / "full.ckpt"
    assert sorted(p.name for p in sharded.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    consolidated = load_sharded_checkpoint(sharded)
    expected = torch.load(full, weights_only=True)
    assert consolidated.keys() == expected.keys() and consolidated["codec"] == expected["codec"]
    tensors, metadata = _export(sharded, tmp_path / "sharded.safetensors")
    reference, reference_metadata = full_export
    assert metadata == reference_metadata and tensors.keys() == reference.keys()
    assert all(tensors[k].equal(reference[k]) for k in reference)
    ema = {k.removeprefix("ema.module."): v for k, v in expected["state_dict"].items() if k.startswith("ema.module.")}
    assert all(tensors[f"backbone.{k}"].equal(v) for k, v in ema.items())  # the EMA weights, not the trained ones
    assert tensors["conditioner.embedders.0.embedding.weight"].equal(expected["state_dict"]["conditioner.embedders.0.embedding.weight"])


def test_the_end_of_fit_export_under_fsdp_writes_what_the_full_checkpoint_exports(checkpoints: Path,
                                                                                  full_export: tuple) -> None:
    """ExportWeights on both ranks: each gathers its shards, rank 0 writes the EMA backbone and the whole class table."""
    tensors, metadata = _exported(checkpoints / "fit.safetensors")
    reference, reference_metadata = full_export
    assert metadata == reference_metadata and tensors.keys() == reference.keys()
    assert all(tensors[k].equal(reference[k]) for k in reference)


def test_a_folder_that_is_not_a_sharded_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: not a sharded checkpoint folder"):
        load_sharded_checkpoint(tmp_path)
