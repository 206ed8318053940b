"""Our training step against diffusers', the same architecture with the same weights, alternating.

`--arch unet|dit|vae`: UNet2DConditionModel, DiTTransformer2DModel or AutoencoderKL. Each step is forward + MSE
loss + backward + optimizer step on a fixed batch; the two models alternate step by step in one process (so
a load change on the machine hits both alike) and the result is the median (and quartiles) over steps of the
paired ratio ours / diffusers. Ours runs as `ldm` trains it: fused AdamW, plain and, in a column of its own,
with the fast paths `speed_up` chooses (`--fast`: channels-last weights; `--compile`: torch.compile); diffusers
runs as its training scripts do by default (AdamW, eager). `--sizes` and `--batch-sizes` sweep: every
combination is one row of the table and of the JSON line's `rows`.

    python tools/benchmark.py compare --arch unet --sizes 16 32 --batch-sizes 4 8 --steps 10 --fast
"""

from __future__ import annotations

import argparse
import copy
import json
import os
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
from ldm.training.speed import channels_last_weights, speed_up

from .device import add_device_argument, clock

ROOT = Path(__file__).resolve().parents[2]  # the repository: its configs/ hold the architectures
Arch = Literal["unet", "dit", "vae"]
Step = Callable[[nn.Module], Tensor]  # a model's training loss of one step on the fixed batch
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
        ours_step = lambda m: F.mse_loss(m(x, t.float(), context=context), target)  # noqa: E731
        theirs_step = lambda m: F.mse_loss(m(x, t, encoder_hidden_states=context).sample, target)  # noqa: E731
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
        ours_step = lambda m: F.mse_loss(m["dit"](x, t.float(), vector=m["classes"](y)), target)  # noqa: E731
        theirs_step = lambda m: F.mse_loss(m(x, timestep=t, class_labels=y).sample, target)  # noqa: E731
    else:  # SD's kl-f8 autoencoder, reconstruction through a posterior sample
        ours = VAE(**_configs(root, "autoencoder/kl-f8.yaml"))
        theirs = diffusers_vae(LatentCodec(ours, scale=1.0), size)
        ours.requires_grad_(True)  # the codec froze it
        images = torch.rand(batch_size, 3, size, size) * 2 - 1
        ours_step = lambda m: F.mse_loss(m(images)[0], images)  # noqa: E731
        theirs_step = lambda m: F.mse_loss(m(images, sample_posterior=True).sample, images)  # noqa: E731
    for model in (ours, theirs):
        model.to(device).train().requires_grad_(True)
    return ours, ours_step, theirs, theirs_step


def _quartiles(values: list[float]) -> dict[str, float]:
    """Median and quartiles of the paired ratios: the quartiles give the spread the machine's load leaves."""
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": median, "q1": q1, "q3": q3}


def compare(arch: Arch, root: Path, batch_size: int = 8, size: int = 16, steps: int = 10, warmup: int = 2,
            device: str = "cpu", fast: bool = False, compile: bool = False) -> dict[str, Any]:
    """One point: medians and quartiles over steps of (our step time / diffusers'), ours plain and, with
    ``fast`` (channels-last, where ``speed_up`` chooses it) or ``compile``, a copy of ours with those fast
    paths; all of them alternate step by step, in turn first, so each ratio pairs steps taken under the same load."""
    target = torch.device(device)
    with target:
        ours, ours_step, theirs, theirs_step = build(arch, root, batch_size, size, target)
    models = {"ldm": ours}
    channels_last = fast and arch != "dit"  # DiT has one convolution, its patch embedding
    if compile:  # each point compiles afresh: earlier points' graphs would count toward torch's recompile limit (8),
        torch._dynamo.reset()  # past which the fast column would silently run eagerly
    if channels_last or compile:
        fast_copy = copy.deepcopy(ours)
        speed_up(fast_copy, channels_last=channels_last, compile=compile)
        if compile or channels_last_weights(fast_copy):  # else speed_up chose no fast path for this model: no column
            models["ldm_fast"] = fast_copy
    runs = {name: (model, ours_step, torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True))
            for name, model in models.items()}
    runs["diffusers"] = (theirs, theirs_step, torch.optim.AdamW(theirs.parameters(), lr=1e-5))
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for step in range(warmup + steps):
        for name in names[step % len(names):] + names[:step % len(names)]:  # each takes each place in turn
            model, loss_fn, optimizer = runs[name]
            start = clock(target)
            loss = loss_fn(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step >= warmup:
                times[name].append(clock(target) - start)
    return {"arch": arch, "batch_size": batch_size, "size": size, "device": device, "steps": steps,
            "channels_last": "ldm_fast" in models and channels_last_weights(models["ldm_fast"]), "compile": compile,
            "params_M": {name: sum(p.numel() for p in m.parameters()) / 1e6
                         for name, m in (("ldm", ours), ("diffusers", theirs))},
            "ms_per_step": {name: 1000 * statistics.median(t) for name, t in times.items()},
            "ratio_ldm_over_diffusers": {"plain" if name == "ldm" else "fast": _quartiles(
                [a / b for a, b in zip(times[name], times["diffusers"])]) for name in models},
            "load_average": os.getloadavg()[0]}  # busier than its cores, a machine distorts even paired ratios


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", choices=get_args(Arch), required=True,
                        help="unet: configs/backbone/unet-cpu.yaml; dit: DiT-S/2; vae: SD's kl-f8")
    parser.add_argument("--batch-sizes", "--batch-size", type=int, nargs="+", default=[8],
                        help="one or more: every size with every batch size is one row")
    parser.add_argument("--sizes", "--size", type=int, nargs="+", default=[16],
                        help="latent sides (unet, dit) or image sides (vae), one or more")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each model at each point")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--fast", action="store_true",
                        help="also ours with channels-last weights (convolutional nets), a column of its own")
    parser.add_argument("--compile", action="store_true", help="the fast column torch.compiled")
    add_device_argument(parser)


def _ratio(ratio: dict[str, float] | None) -> str:
    return "—" if ratio is None else f"{ratio['median']:.3f} ({ratio['q1']:.2f}-{ratio['q3']:.2f})"


def run(args: argparse.Namespace) -> None:
    fast = ", ".join(name for name, on in (("channels-last", args.fast and args.arch != "dit"),
                                             ("compiled", args.compile)) if on)
    print(f"compare {args.arch}: {args.steps} paired steps per point on {args.device}, ours / diffusers as median "
          f"(quartiles){f'; fast: ours {fast}' if fast else ''}; load: the 1-minute load average", flush=True)
    print(f"  {'size':>5} {'batch':>5} {'ldm ms':>9} {'fast ms':>9} {'diffusers ms':>12}  "
          f"{'plain ratio':<20} {'fast ratio':<20} load", flush=True)
    rows = []
    for size in args.sizes:
        for batch_size in args.batch_sizes:
            row = compare(args.arch, ROOT, batch_size, size, args.steps, args.warmup, args.device, args.fast, args.compile)
            ms, ratio = row["ms_per_step"], row["ratio_ldm_over_diffusers"]
            fast_ms = f"{ms['ldm_fast']:9.1f}" if "ldm_fast" in ms else f"{'—':>9}"
            print(f"  {size:>5} {batch_size:>5} {ms['ldm']:9.1f} {fast_ms} {ms['diffusers']:12.1f}  "
                  f"{_ratio(ratio['plain']):<20} {_ratio(ratio.get('fast')):<20} {row['load_average']:.1f}", flush=True)
            rows.append(row)
    params = rows[0]["params_M"]
    print(f"  params: ldm {params['ldm']:.2f} M, diffusers {params['diffusers']:.2f} M")
    print(json.dumps({"arch": args.arch, "device": args.device, "steps": args.steps, "warmup": args.warmup,
                      "rows": rows}))
