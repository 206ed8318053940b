"""Throughput benchmarks of the ldm platform, one subcommand each.

    python tools/benchmark.py data --shards 'data/train/shard-{000000..000009}.tar' --workers 0 1 2 4
    python tools/benchmark.py train --config experiments/shapes/txt2img_unet.yaml --device cuda --precision bf16-mixed
    python tools/benchmark.py sample --config experiments/shapes/txt2img_unet.yaml \
        --model.backbone configs/backbone/dit-tiny.yaml
    python tools/benchmark.py train --config experiments/cifar10/unet.yaml --loader 1            # data included
    python tools/benchmark.py train --config experiments/cifar10/unet.yaml --cached 'data/cifar10-latents/train/*.tar'
    python tools/benchmark.py compare --arch unet --fast      # vs diffusers' UNet2DConditionModel, same weights

`data` times the WebDataModule train loader (random crop, shuffle buffer on) per DataLoader worker
count and the single-process decode rate of the shards' images. Without `--shards` it writes a
temporary synthetic shapes dataset at 256 px.

`train` and `sample` build an experiment's model and data as `ldm` does (any option the tool does not
know, such as `--model.backbone ...`, goes to the `ldm` CLI after the `--config` files) and time one
fixed batch of its training data, so the loader is not timed (`train --loader N` times the experiment's
own loader with N workers instead; `--cached PATTERN` trains from a latent cache, `--compile` compiles
the model). `train` runs optimisation steps through
a Lightning Trainer (either stage; its own trainer options, not the experiment's); `sample` times
`evaluation_images`: generation for LatentDiffusion, reconstruction for AutoencoderKL. Both report peak
memory (CUDA max allocated, or the process's peak RSS on CPU), FLOPs per sample (the matmuls,
convolutions and attention of one untimed call under FlopCounterMode: for `train` the whole step,
forward and backward, frozen encoders included) and MFU against the peak FLOP/s of the device and the
run's compute dtype where Lightning's `get_available_flops` knows them (never on CPU).
`compare` times our training step against diffusers' (UNet2DConditionModel, DiTTransformer2DModel,
AutoencoderKL) with the same weights, alternating in one process (tools/compare.py).
Each subcommand prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch import LightningDataModule, LightningModule
from PIL import Image
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from webdataset.tariterators import tarfile_samples

from ldm.callbacks.monitor import synchronize
from ldm.cli import instantiate
from ldm.data import batch as B
from ldm.data.datamodule import WebDataModule
from ldm.data.shards import expand_shards
from ldm.data.synthetic import write_shapes
from ldm.data.transforms import IMAGE_KEYS

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling tool below, however this one is run
from compare import compare  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WARMUP_BATCHES = 3  # untimed: worker start-up and the first fill of the shuffle buffer
DECODE_IMAGES = 500  # images decoded for the per-core rate
SYNTHETIC_SAMPLES, SYNTHETIC_SIZE = 600, 256  # the temporary shapes dataset used without --shards
AUTOCAST = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}  # precision: autocast dtype


def benchmark_data(
    shards: str | None = None,  # shard pattern; None: a temporary synthetic shapes dataset
    resolution: int = 256,
    batch_size: int = 32,
    workers: tuple[int, ...] = (0, 1, 2),
    batches: int = 50,  # timed batches per worker count
) -> dict[str, Any]:
    """Train-loader images/s per worker count and single-process image decode images/s."""
    with tempfile.TemporaryDirectory() as tmp:
        source = shards or f"synthetic shapes, {SYNTHETIC_SAMPLES} x {SYNTHETIC_SIZE} px"
        if shards is None:
            write_shapes(tmp, train=SYNTHETIC_SAMPLES, val=0, test=0, size=SYNTHETIC_SIZE, samples_per_shard=100)
            shards = f"{tmp}/train/shard-*.tar"
        loader = {}
        for count in workers:
            # resampled: one endless stream, so no epoch end or worker restart falls inside the timing
            data = WebDataModule(train=shards, batch_size=batch_size, num_workers=count, resolution=resolution,
                                 crop="random", resampled=True, epoch_length=WARMUP_BATCHES + batches,
                                 pin_memory=False)
            data.setup("fit")
            stream = iter(data.train_dataloader())
            for _ in range(WARMUP_BATCHES):
                next(stream)
            start = time.perf_counter()
            images = sum(B.batch_size(next(stream)) for _ in range(batches))
            loader[count] = images / (time.perf_counter() - start)
            del stream  # shut its workers down before the next count starts its own

        samples = islice(tarfile_samples({"url": url} for url in expand_shards(shards)), DECODE_IMAGES)
        encoded = [(key, s[key]) for s in samples for key in IMAGE_KEYS if key in s]  # (format, bytes)
        start = time.perf_counter()
        for _, blob in encoded:
            Image.open(io.BytesIO(blob)).convert("RGB")  # convert() forces the full decode
        decode = len(encoded) / (time.perf_counter() - start)
    return {
        "benchmark": "data", "shards": source, "resolution": resolution, "batch_size": batch_size,
        "batches": batches, "loader_images_per_s": loader,
        "decode_format": sorted({key for key, _ in encoded}), "decode_images": len(encoded),
        "decode_images_per_s_per_core": decode,
    }


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", help="shard pattern (default: a temporary synthetic shapes dataset)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts to time")
    parser.add_argument("--batches", type=int, default=50, help="timed batches per worker count")


def _data_command(args: argparse.Namespace) -> None:
    result = benchmark_data(args.shards, args.resolution, args.batch_size, tuple(args.workers), args.batches)
    print(f"train loader: {result['shards']}; {args.resolution} px, batch {args.batch_size}, "
          f"{args.batches} timed batches after {WARMUP_BATCHES} warm-up")
    print(f"{'workers':>7}  {'images/s':>9}")
    for count, rate in result["loader_images_per_s"].items():
        print(f"{count:>7}  {rate:>9.1f}")
    print(f"decode + RGB ({'/'.join(result['decode_format'])}, 1 process): "
          f"{result['decode_images_per_s_per_core']:.1f} images/s over {result['decode_images']} images")
    print(json.dumps(result))


def build_experiment(configs: list[str], ldm_options: Sequence[str], batch_size: int | None, workers: int = 0
                     ) -> tuple[LightningModule, LightningDataModule, dict]:
    """An experiment's model and data module, built as `ldm` builds them, and the first batch of its training data."""
    args = [arg for path in configs for arg in ("--config", path)]
    args += ["--data.init_args.batch_size", str(batch_size)] if batch_size else []
    model, data = instantiate([*args, "--data.init_args.num_workers", str(workers), "--trainer.logger", "false",
                               *ldm_options])
    data.setup("fit")
    return model, data, next(iter(data.train_dataloader()))


def _measurements(model: LightningModule, batch: dict, device: torch.device, precision: str, flops: int,
                  seconds: float, calls: int) -> dict[str, Any]:
    """What train and sample both report, from the FLOPs of one call and the time of `calls` timed calls."""
    size = next(len(v) for v in batch.values() if isinstance(v, (torch.Tensor, list)))
    if device.type == "cuda":
        memory, memory_kind = torch.cuda.max_memory_allocated(device), "CUDA max allocated"
    else:
        memory, memory_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "CPU peak RSS"  # KiB on Linux
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = get_available_flops(device, AUTOCAST[precision] or torch.float32)  # None where Lightning has no figure
    return {
        "model": type(model).__name__,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "batch_size": size, "image_size": list(batch[B.IMAGE].shape[-2:]) if B.IMAGE in batch else None,
        "device": name, "samples_per_s": size * calls / seconds, "ms_per_call": 1000 * seconds / calls,
        "peak_memory_gib": memory / 2**30, "peak_memory_kind": memory_kind, "flops_per_sample": flops / size,
        "mfu": flops * calls / seconds / peak if peak else None,
    }


class _StepTimer(L.Callback):
    """Counts the FLOPs of training batch 0 and times the batches from `warmup` on, device-synchronised."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.flops, self.seconds = warmup, 0, 0.0
        self._counter = FlopCounterMode(display=False)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self._counter.__enter__()
        if batch_idx == self.warmup:
            synchronize(pl_module.device)
            if pl_module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(pl_module.device)
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if batch_idx == 0:
            self._counter.__exit__(None, None, None)
            self.flops = self._counter.get_total_flops()

    def on_train_end(self, trainer: L.Trainer, pl_module: LightningModule) -> None:
        synchronize(pl_module.device)
        self.seconds = time.perf_counter() - self._start


def benchmark_train(
    configs: list[str],  # experiment YAML files, in order
    ldm_options: Sequence[str] = (),  # further `ldm` CLI options, e.g. ("--model.backbone", "<config>")
    batch_size: int | None = None,  # None: the experiment's
    device: str = "cpu",  # a Lightning accelerator: cpu or cuda
    precision: str = "32-true",  # a Lightning precision
    steps: int = 20,  # timed optimisation steps
    warmup: int = 3,  # untimed steps before them (at least 1: the first counts FLOPs)
    loader: int | None = None,  # None: one fixed batch; a worker count: the experiment's own data, read and decoded
) -> dict[str, Any]:
    """Optimisation steps per second of an experiment on one fixed batch, or on its data loader (decoding, and
    encoding unless the data is a latent cache, then count); FLOPs of one step (forward + backward)."""
    if warmup < 1:
        raise ValueError("train needs a warm-up step: the first step counts FLOPs and is not timed")
    model, data, batch = build_experiment(configs, ldm_options, batch_size, loader or 0)
    timer = _StepTimer(warmup)
    trainer = L.Trainer(accelerator=device, devices=1, precision=precision, max_steps=warmup + steps, limit_val_batches=0,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer])
    if loader is None:
        fixed = move_data_to_device(batch, trainer.strategy.root_device)  # no host-to-device copy inside the timing
        trainer.fit(model, DataLoader([fixed] * (warmup + steps), batch_size=None))
    else:
        trainer.fit(model, datamodule=data)
    result = _measurements(model, batch, model.device, precision, timer.flops, timer.seconds, steps)
    return {"benchmark": "train", "configs": configs, "ldm_options": list(ldm_options), "precision": precision,
            "steps": steps, "warmup": warmup, "loader_workers": loader, **result}


@torch.no_grad()
def benchmark_sample(
    configs: list[str],  # experiment YAML files, in order
    ldm_options: Sequence[str] = (),  # further `ldm` CLI options
    batch_size: int | None = None,  # None: the experiment's
    device: str = "cpu",  # cpu or cuda
    precision: str = "32-true",  # a Lightning precision: sets the autocast dtype
    repeats: int = 3,  # timed calls
    warmup: int = 1,  # untimed calls before them (the first counts FLOPs)
) -> dict[str, Any]:
    """Images per second of `evaluation_images` (samples or reconstructions) on one fixed batch."""
    model, _, batch = build_experiment(configs, ldm_options, batch_size)
    target = torch.device(device)
    model, fixed = model.to(target).eval(), move_data_to_device(batch, target)
    dtype = AUTOCAST[precision]
    with torch.autocast(target.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        with FlopCounterMode(display=False) as counter:
            model.evaluation_images(fixed)  # also the first warm-up call
        for _ in range(warmup - 1):
            model.evaluation_images(fixed)
        synchronize(target)
        if target.type == "cuda":
            torch.cuda.reset_peak_memory_stats(target)
        start = time.perf_counter()
        for _ in range(repeats):
            model.evaluation_images(fixed)
        synchronize(target)
    result = _measurements(model, batch, target, precision, counter.get_total_flops(), time.perf_counter() - start,
                          repeats)
    return {"benchmark": "sample", "configs": configs, "ldm_options": list(ldm_options), "precision": precision,
            "sampler": getattr(getattr(model, "sampler", None), "kind", None),
            "sampler_steps": getattr(getattr(model, "sampler", None), "steps", None), "repeats": repeats, **result}


def _experiment_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", required=True, help="experiment YAML (repeat to overlay more)")
    parser.add_argument("--batch-size", type=int, help="training batch size (default: the experiment's)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=list(AUTOCAST), default="32-true")
    parser.set_defaults(ldm_options=[])  # main() fills in the options it does not know: they are the ldm CLI's


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    _experiment_arguments(parser)
    parser.add_argument("--steps", type=int, default=20, help="timed optimisation steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first counts FLOPs)")
    parser.add_argument("--loader", type=int, metavar="WORKERS", help="time the experiment's data loader too, "
                        "with this many workers (default: one fixed batch, no data loading)")
    parser.add_argument("--cached", metavar="PATTERN", help="train from this latent cache (tools/cache_latents.py); "
                        "implies --loader (1 worker unless given)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (its compile option)")


def _sample_arguments(parser: argparse.ArgumentParser) -> None:
    _experiment_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3, help="timed evaluation_images calls")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (the first counts FLOPs)")
    parser.add_argument("--sampler-steps", type=int, help="LatentDiffusion sampler steps (default: the experiment's)")


def _print_experiment(result: dict[str, Any], timed: str, unit: str) -> None:
    """The table of a train or sample result, then its JSON line."""
    shape = "x".join(map(str, result["image_size"] or [])) or "?"
    print(f"{result['benchmark']}: {result['model']} ({result['trainable_params'] / 1e6:.2f} M trainable parameters) "
          f"from {' + '.join(result['configs'])} {' '.join(result['ldm_options'])}".rstrip())
    print(f"batch {result['batch_size']} x {shape} px on {result['device']} ({result['precision']}), {timed}")
    mfu = "unknown (no peak FLOP/s known)" if result["mfu"] is None else f"{100 * result['mfu']:.1f} % of peak FLOP/s"
    rows = [("samples/s", f"{result['samples_per_s']:.2f}"), (f"ms/{unit}", f"{result['ms_per_call']:.1f}"),
            ("peak memory", f"{result['peak_memory_gib']:.2f} GiB ({result['peak_memory_kind']})"),
            ("GFLOP/sample", f"{result['flops_per_sample'] / 1e9:.3f}"), ("MFU", mfu)]
    for name, value in rows:
        print(f"  {name:<13} {value}")
    print(json.dumps(result))


def _train_command(args: argparse.Namespace) -> None:
    options = [*args.ldm_options, *(["--model.init_args.compile", "true"] if args.compile else []),
               *(["--data.init_args.train", args.cached] if args.cached else [])]
    loader = args.loader if args.loader is not None else 1 if args.cached else None
    result = benchmark_train(args.config, options, args.batch_size, args.device, args.precision, args.steps,
                             args.warmup, loader)
    timed = f"{args.steps} timed steps after {args.warmup} warm-up (forward + backward FLOPs)"
    _print_experiment(result, timed, "step")


def _sample_command(args: argparse.Namespace) -> None:
    steps = ["--model.init_args.sampler.init_args.steps", str(args.sampler_steps)] if args.sampler_steps else []
    result = benchmark_sample(args.config, [*args.ldm_options, *steps], args.batch_size, args.device, args.precision,
                              args.repeats, args.warmup)
    sampler = f"{result['sampler']} x {result['sampler_steps']} steps, " if result["sampler"] else ""
    _print_experiment(result, f"{sampler}{args.repeats} timed calls after {args.warmup} warm-up", "batch")


def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", choices=["unet", "dit", "vae"], required=True,
                        help="unet: configs/backbone/unet-cpu.yaml; dit: DiT-S/2; vae: SD's kl-f8")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=16, help="latent side (unet, dit) or image side (vae)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each model")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--fast", action="store_true", help="ours with channels-last weights (convolutional nets)")
    parser.add_argument("--compile", action="store_true", help="ours torch.compiled")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")


def _compare_command(args: argparse.Namespace) -> None:
    result = compare(args.arch, ROOT, args.batch_size, args.size, args.steps, args.warmup, args.device, args.fast,
                     args.compile)
    ms = result["ms_per_step"]
    print(f"compare {args.arch}: batch {args.batch_size}, size {args.size}, {args.steps} paired steps on {args.device}"
          f"{' (ours: channels-last)' if result['channels_last'] else ''}{' (ours: compiled)' if args.compile else ''}")
    for name, params in result["params_M"].items():
        print(f"  {name:<10} {params:8.2f} M params  {ms[name]:9.1f} ms/step (median)")
    print(f"  median of paired ratios ldm / diffusers: {result['median_ratio_ldm_over_diffusers']:.3f}")
    print(json.dumps(result))


COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None]]] = {
    "data": (_data_arguments, _data_command),  # name: (add its arguments, run it)
    "train": (_train_arguments, _train_command),
    "sample": (_sample_arguments, _sample_command),
    "compare": (_compare_arguments, _compare_command),  # our train step vs diffusers', same weights
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, _) in COMMANDS.items():
        add_arguments(commands.add_parser(name, help=f"{name} throughput"))
    args, unknown = parser.parse_known_args(argv)
    if unknown and not hasattr(args, "ldm_options"):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if unknown:
        args.ldm_options = unknown
    COMMANDS[args.command][1](args)


if __name__ == "__main__":
    main()
