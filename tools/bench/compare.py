"""Our training step against diffusers', the same architecture with the same weights, alternating.

`--arch unet|dit|vae`: UNet2DConditionModel, DiTTransformer2DModel or AutoencoderKL. Each step is forward + MSE
loss + backward + optimizer step on a fixed batch; the two models alternate step by step in one process (so
a load change on the machine hits both alike) and the result is the median over steps of the paired ratio
ours / diffusers. Ours runs as `ldm` trains it: fused AdamW, and optionally channels-last weights (`--fast`)
and torch.compile (`--compile`); diffusers runs as its training scripts do by default (AdamW, eager).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from ldm.autoencoder.codec import LatentCodec
from ldm.autoencoder.vae import VAE
from ldm.backbones.dit import DiT
from ldm.backbones.unet import UNet
from ldm.convert.dit import dit_from_diffusers
from ldm.training.speed import speed_up

from .device import add_device_argument, clock

ROOT = Path(__file__).resolve().parents[2]  # the repository: its configs/ hold the architectures
Arch = Literal["unet", "dit", "vae"]
Step = Callable[[], Tensor]  # the training loss of one step on the fixed batch
Pair = tuple[nn.Module, Step, nn.Module, Step]  # ours, its step; diffusers', its step


def _configs(root: Path, part: str) -> dict[str, Any]:
    return yaml.safe_load((root / "configs" / part).read_text())["init_args"]


def _randomised(model: nn.Module) -> nn.Module:
    """Replace zero-initialised output layers, so the gradients and the optimizer touch every weight."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return model


def build(arch: Arch, root: Path, batch_size: int, size: int, device: torch.device) -> Pair:
    """(ours, its step loss, diffusers', its step loss) with equal weights on one fixed batch of ``size`` pixels
    (the VAE) or ``size`` latent pixels (the denoisers)."""
    # the diffusers extra, which compare alone needs: imported here, so the other commands run without it
    from diffusers import DiTTransformer2DModel

    from ldm.export.diffusers import diffusers_unet, diffusers_vae

    torch.manual_seed(0)
    if arch == "unet":  # the shapes UNet with the text-tiny context (128-d tokens, 16 of them)
        ours = _randomised(UNet(4, 4, 128, None, **_configs(root, "backbone/unet-cpu.yaml")))
        theirs = diffusers_unet(ours, size)
        x, t = torch.randn(batch_size, 4, size, size), torch.randint(0, 1000, (batch_size,))
        context, target = torch.randn(batch_size, 16, 128), torch.randn(batch_size, 4, size, size)
        ours_step = lambda: F.mse_loss(ours(x, t.float(), context=context), target)  # noqa: E731
        theirs_step = lambda: F.mse_loss(theirs(x, t, encoder_hidden_states=context).sample, target)  # noqa: E731
    elif arch == "dit":  # DiT-S/2, class-conditional with a learned variance, as DiT trains it
        knobs = _configs(root, "backbone/dit-S-2.yaml")
        width, heads = knobs["width"], knobs["num_heads"]
        theirs = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=width // heads, in_channels=4,
                                       out_channels=8, num_layers=knobs["depth"], sample_size=size,
                                       patch_size=knobs["patch_size"], num_embeds_ada_norm=1000)
        with torch.no_grad():  # DiT shares one timestep/class embedding; diffusers copies it into every block
            shared = theirs.transformer_blocks[0].norm1.emb.state_dict()
            for block in theirs.transformer_blocks:
                block.norm1.emb.load_state_dict(shared)
        state, table = dit_from_diffusers(_randomised(theirs).state_dict())
        ours = DiT(4, 8, None, width, **knobs, pos_embed_base_size=size // knobs["patch_size"], time_freq_shift=1.0)
        ours.load_state_dict(state)
        embedding = nn.Embedding.from_pretrained(table, freeze=False)
        ours = nn.ModuleDict({"dit": ours, "classes": embedding})
        x, t = torch.randn(batch_size, 4, size, size), torch.randint(0, 1000, (batch_size,))
        y, target = torch.randint(0, 1000, (batch_size,)), torch.randn(batch_size, 8, size, size)
        ours_step = lambda: F.mse_loss(ours["dit"](x, t.float(), vector=ours["classes"](y)), target)  # noqa: E731
        theirs_step = lambda: F.mse_loss(theirs(x, timestep=t, class_labels=y).sample, target)  # noqa: E731
    else:  # SD's kl-f8 autoencoder, reconstruction through a posterior sample
        ours = VAE(**_configs(root, "autoencoder/kl-f8.yaml"))
        theirs = diffusers_vae(LatentCodec(ours, scale=1.0), size)
        ours.requires_grad_(True)  # the codec froze it
        images = torch.rand(batch_size, 3, size, size) * 2 - 1
        ours_step = lambda: F.mse_loss(ours(images)[0], images)  # noqa: E731
        theirs_step = lambda: F.mse_loss(theirs(images, sample_posterior=True).sample, images)  # noqa: E731
    for model in (ours, theirs):
        model.to(device).train().requires_grad_(True)
    return ours, ours_step, theirs, theirs_step


def compare(arch: Arch, root: Path, batch_size: int = 8, size: int = 16, steps: int = 10, warmup: int = 2,
            device: str = "cpu", fast: bool = False, compile: bool = False) -> dict[str, Any]:
    """Median over steps of (our step time / diffusers'), with both models' parameter counts and ms per step."""
    target = torch.device(device)
    with target:
        ours, ours_step, theirs, theirs_step = build(arch, root, batch_size, size, target)
    if fast or compile:
        speed_up(ours, channels_last=fast and arch != "dit", compile=compile)
    runs = {"ldm": (ours, ours_step, torch.optim.AdamW(ours.parameters(), lr=1e-5, fused=True)),
            "diffusers": (theirs, theirs_step, torch.optim.AdamW(theirs.parameters(), lr=1e-5))}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(warmup + steps):
        for name, (_, loss_fn, optimizer) in runs.items():
            start = clock(target)
            loss = loss_fn()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step >= warmup:
                times[name].append(clock(target) - start)
    ratios = [a / b for a, b in zip(times["ldm"], times["diffusers"])]
    return {"arch": arch, "batch_size": batch_size, "size": size, "device": device, "steps": steps,
            "channels_last": fast and arch != "dit", "compile": compile,
            "params_M": {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, (m, _, _) in runs.items()},
            "ms_per_step": {name: 1000 * statistics.median(t) for name, t in times.items()},
            "median_ratio_ldm_over_diffusers": statistics.median(ratios)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", choices=get_args(Arch), required=True,
                        help="unet: configs/backbone/unet-cpu.yaml; dit: DiT-S/2; vae: SD's kl-f8")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=16, help="latent side (unet, dit) or image side (vae)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each model")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--fast", action="store_true", help="ours with channels-last weights (convolutional nets)")
    parser.add_argument("--compile", action="store_true", help="ours torch.compiled")
    add_device_argument(parser)


def run(args: argparse.Namespace) -> None:
    result = compare(args.arch, ROOT, args.batch_size, args.size, args.steps, args.warmup, args.device, args.fast,
                     args.compile)
    ms = result["ms_per_step"]
    print(f"compare {args.arch}: batch {args.batch_size}, size {args.size}, {args.steps} paired steps on {args.device}"
          f"{' (ours: channels-last)' if result['channels_last'] else ''}{' (ours: compiled)' if args.compile else ''}")
    for name, params in result["params_M"].items():
        print(f"  {name:<10} {params:8.2f} M params  {ms[name]:9.1f} ms/step (median)")
    print(f"  median of paired ratios ldm / diffusers: {result['median_ratio_ldm_over_diffusers']:.3f}")
    print(json.dumps(result))
