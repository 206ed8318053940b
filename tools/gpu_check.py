"""One GPU check of the platform: what the CPU tests cannot reach, run on one machine in under 8 minutes.

    python tools/gpu_check.py                        # every check (about 6 minutes on one H100-class GPU)
    python tools/gpu_check.py --only fit_bf16 ddp    # some of them
    python tools/gpu_check.py --peak-tflops 989      # MFU against this dense bf16 peak (a GPU Lightning's table lacks)

The checks, in order, each within its time budget (seconds):
  stage1    60  `ldm fit` of experiments/shapes/autoencoder.yaml, bf16, 600 steps (GAN from batch 400): the export
  fit_bf16  55  `ldm fit` of experiments/shapes/txt2img_unet.yaml, bf16, 100 steps: the loss falls, no step non-finite
  compile  130  its training step with channels-last and torch.compile each on and off (ms/step, speed-ups)
  sync      30  its training step under torch.cuda.set_sync_debug_mode: every host sync, with where it happens
  dit       60  DiT-XL/2 on cached kl-f8 latents at 256 px, batch 32 (img/s, MFU from Lightning's FLOPs table)
  sd15      60  the SD-1.5 fine-tune step (random weights) at 512 px, batch 1 and 2 (s/step, peak memory)
  fsdp      40  `ldm fit` of the text-to-image experiment with configs/trainer/fsdp.yaml on one device, 30 steps
  ddp       45  the same with configs/trainer/ddp.yaml on every visible device
Each fit passes when the mean logged loss of its last quarter is below its first quarter's, no step was
non-finite and it exported its weights. Every budget spent would take 8 minutes; the checks take about 6.

A failing check (an error, a failed condition, or its budget spent) is recorded and the next one runs. After
each, <out>/gpu_check.json holds every number so far and <out>/gpu_check.md the rows of README's GPU table.
Everything the checks make goes under <out>: shapes shards at 64, 256 and 512 px, a latent cache, the runs,
and each `ldm fit`'s output (logs/<check>.log). Nothing is downloaded (LDM_OFFLINE=1).

The stage-2 shapes experiments read the shapes autoencoder's export. The check makes it with a short bf16 fit
(about 40 s) rather than using a random codec: the export then carries latent statistics as a real one does,
and its latents have structure to learn. On a barely trained codec (8 steps) the text-to-image loss stayed flat
at about 0.3 over 100 steps (measured on CPU), where on the trained one it halves within them (0.2 to 0.1 in
the shapes runs), so "the loss falls" needs a codec worth the name. Stage 1 (both of its phases, the
statistics, the export) runs on the GPU too. Should that fit fail, the later checks run on a random codec
(no statistics: latents unnormalised) and say so. Step times come from tools/bench (one fixed batch on the device, or the
loader of a latent cache); the fits run as subprocesses, as a user runs them (DDP launches its own ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import cache_latents  # tools/ is on sys.path when this file runs as a script
import lightning as L
import torch
from bench.train import benchmark_train
from check_runner import Check, Outcome, run_checks
from lightning.fabric.utilities.throughput import get_available_flops
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ldm.cli import OWN_CODE, quiet_lightning, refusals
from ldm.data.latents import CACHE_INFO
from ldm.data.synthetic import write_shapes

ROOT = Path(__file__).resolve().parent.parent
TXT2IMG = ROOT / "experiments" / "shapes" / "txt2img_unet.yaml"
AUTOENCODER = ROOT / "experiments" / "shapes" / "autoencoder.yaml"
TRAINER = ROOT / "configs" / "trainer"
ONE_GPU = ["--config", str(TRAINER / "gpu.yaml"), "--trainer.devices", "1"]  # gpu.yaml's `devices: auto` would be DDP
DIT = [str(ROOT / "experiments" / "cifar10" / "dit.yaml"), str(ROOT / "configs" / "benchmark" / "dit-XL-2-256.yaml")]
SD15 = [str(ROOT / "experiments" / "sd" / "finetune_sd15.yaml"), str(ROOT / "configs" / "benchmark" / "sd15-random.yaml")]
PRECISION = "bf16-mixed"
SHAPES = {64: (1000, 64), 256: (512, 0), 512: (8, 0)}  # px: (train, val) samples; no val: validation reads train
SYNC = "called a synchronizing CUDA operation"  # torch's sync debug message


@dataclass(frozen=True)
class Context:
    """Where the checks put what they make, and the device's peak where Lightning's table has none."""

    out: Path  # absolute
    peak_tflops: float | None = None

    def shapes(self, size: int) -> Path:
        """The folder of the synthetic shapes shards at ``size`` px (SHAPES says how many)."""
        return self.out / "data" / f"shapes-{size}"

    def run_dir(self, name: str) -> Path:
        """The run folder (TensorBoard logs, checkpoints, export) of the `ldm fit` named ``name``."""
        return self.out / "runs" / name / "version_0"

    @property
    def codec(self) -> Path:
        """The stage-1 export (with latent statistics) that the stage1 check writes."""
        return self.run_dir("stage1") / "export.safetensors"


# --- what each check runs -------------------------------------------------------------------------------------------
def write_data(ctx: Context, size: int) -> Path:
    """The shapes shards at ``size`` px, written once."""
    root = ctx.shapes(size)
    if not (root / "meta.json").is_file():  # written last
        train, val = SHAPES[size]
        write_shapes(root, train=train, val=val, test=0, size=size)
    return root


def data_options(ctx: Context, size: int) -> list[str]:
    train, val = (str(ctx.shapes(size) / split / "shard-*.tar") for split in ("train", "val"))
    return ["--data.init_args.train", train, "--data.init_args.val", val if SHAPES[size][1] else train]


def codec_options(ctx: Context) -> list[str]:
    """The shapes experiments' codec: the stage-1 export if there is one, else a random one. (As JSON: a `null`
    given to the dotted option would reach the codec as the string 'None'.)"""
    weights = str(ctx.codec) if ctx.codec.is_file() else None
    return ["--model.init_args.codec", json.dumps({"init_args": {"weights": weights}})]


def fit_args(ctx: Context, name: str, experiment: Path, *options: str) -> list[str]:
    """`ldm fit` options running ``experiment`` with ``options``, logging to ``ctx.run_dir(name)``."""
    return ["--config", str(experiment), *options, "--trainer.logger.init_args.save_dir", str(ctx.out / "runs"),
            "--trainer.logger.init_args.name", name, "--trainer.logger.init_args.version", "0",
            "--trainer.enable_model_summary", "false"]


def txt2img_args(ctx: Context, name: str, trainer: Sequence[str], steps: int) -> list[str]:
    """The text-to-image experiment for ``steps`` steps on the shapes data, validated once at the end."""
    return fit_args(ctx, name, TXT2IMG, *trainer, *data_options(ctx, 64), *codec_options(ctx),
                    "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
                    "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "5")


FITS: dict[str, Callable[[Context], list[str]]] = {  # check name -> its `ldm fit` options
    # 400 batches of the autoencoder alone, then 100 with its discriminator (2 optimizer steps each)
    "stage1": lambda ctx: fit_args(ctx, "stage1", AUTOENCODER, *ONE_GPU, *data_options(ctx, 64),
                                   "--model.init_args.loss.init_args.disc_start", "400",
                                   "--trainer.max_steps", "600", "--trainer.val_check_interval", "500",
                                   "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "5",
                                   "--export.path", str(ctx.codec)),  # not the experiment's runs/shapes/...
    "fit_bf16": lambda ctx: txt2img_args(ctx, "fit_bf16", ONE_GPU, 100),
    "fsdp": lambda ctx: txt2img_args(ctx, "fsdp", ["--config", str(TRAINER / "fsdp.yaml"), "--trainer.devices", "1"], 30),
    "ddp": lambda ctx: txt2img_args(ctx, "ddp", ["--config", str(TRAINER / "ddp.yaml")], 30),  # devices: auto
}
BENCHES: dict[str, Callable[[Context], tuple[list[str], list[str]]]] = {  # setup -> its configs and ldm options
    "txt2img": lambda ctx: ([str(TXT2IMG)], [*data_options(ctx, 64), *codec_options(ctx)]),
    "dit": lambda ctx: (DIT, data_options(ctx, 256)),  # the image shards; training reads their latent cache
    "sd15": lambda ctx: (SD15, data_options(ctx, 512)),
}


# --- the checks -----------------------------------------------------------------------------------------------------
def run_logged(argv: list[str], log: Path, cwd: Path) -> int:
    """Run ``argv`` in ``cwd`` in a session of its own, its output to ``log``; the exit status. If interrupted
    (a check's budget spent), every process of the session is killed: DDP ranks, loader workers."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as sink:
        process = subprocess.Popen(argv, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return process.wait()
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def scalars(run: Path) -> dict[str, list[float]]:
    """Every scalar series a run logged to TensorBoard, in step order."""
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def fit_outcome(series: dict[str, list[float]], exported: bool) -> Outcome:
    """A fit passes when the mean logged loss of its last quarter is below its first quarter's, no step was
    non-finite and its weights were exported."""
    loss = series.get("train/loss", [])
    quarter = max(1, len(loss) // 4)
    first, last = statistics.fmean(loss[:quarter] or [float("nan")]), statistics.fmean(loss[-quarter:] or [float("nan")])
    nonfinite = int(max(series.get("train/nonfinite_steps", [0])))  # the count of the whole run so far
    speed, memory = statistics.median(series.get("train/samples_per_sec", [0])), max(series.get("train/gpu_mem_gb", [0]))
    numbers = {"loss_first_quarter": first, "loss_last_quarter": last, "logged_losses": len(loss),
               "nonfinite_steps": nonfinite, "samples_per_s": speed, "peak_memory_gib": memory, "exported": exported}
    summary = (f"loss {first:.3f} → {last:.3f}, {nonfinite} non-finite steps, {speed:.0f} img/s, {memory:.1f} GiB"
               + ("" if exported else ", no export"))
    return {"passed": last < first and nonfinite == 0 and exported, "summary": summary, "numbers": numbers}


def fit_check(name: str, ctx: Context) -> Outcome:
    """Run the `ldm fit` of FITS[name] and judge it (fit_outcome)."""
    write_data(ctx, 64)
    log = ctx.out / "logs" / f"{name}.log"
    # run in <out>: a path an experiment writes relative to its working folder lands there too
    status = run_logged([sys.executable, "-m", "ldm.cli", "fit", *FITS[name](ctx)], log, cwd=ctx.out)
    if status:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        raise RuntimeError(f"`ldm fit` exited with status {status}: {lines[-1] if lines else 'no output'} (see {log})")
    outcome = fit_outcome(scalars(ctx.run_dir(name)), (ctx.run_dir(name) / "export.safetensors").is_file())
    if name == "ddp":
        outcome["numbers"]["devices"] = torch.cuda.device_count()
        outcome["summary"] = f"{torch.cuda.device_count()} GPUs: {outcome['summary']}"
    if name != "stage1" and not ctx.codec.is_file():
        outcome["summary"] += " (random codec: no stage-1 export)"
    return outcome


VARIANTS = {  # the compile check's variants: their ldm options
    "plain": [],
    "channels_last": ["--model.init_args.channels_last", "true"],
    "compile": ["--model.init_args.compile", "true"],
    "channels_last+compile": ["--model.init_args.channels_last", "true", "--model.init_args.compile", "true"],
}


def compile_check(ctx: Context) -> Outcome:
    """ms per training step of the text-to-image experiment, each fast path on and off."""
    write_data(ctx, 64)
    configs, options = BENCHES["txt2img"](ctx)
    ms = {}
    for variant, extra in VARIANTS.items():
        torch.compiler.reset()  # a fresh model compiles afresh, within dynamo's recompile limit
        result = benchmark_train(configs, [*options, *extra], device="cuda", precision=PRECISION, steps=20, warmup=5)
        ms[variant] = result["ms_per_call"]
    summary = ", ".join(f"{v} {t:.1f} ms ({ms['plain'] / t:.2f}x)" for v, t in ms.items())
    return {"passed": True, "summary": summary, "numbers": {"ms_per_step": ms, "batch_size": result["batch_size"]}}


class SyncSites(L.Callback):
    """Records every host sync (torch.cuda.set_sync_debug_mode("warn")) from the start of training batch
    ``first`` to the start of batch ``last``: the training step, backward, optimizer step, EMA update and the
    loop between batches. Each sync counts at its site: the innermost frame of ldm or tools, and the
    innermost frame of all where that differs.

    Warnings rather than "error" mode: one run lists every site, where an error would stop at the first; a
    step passes the same way, with none."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last, self.sites = first, last, {}
        self._saved: warnings.catch_warnings | None = None  # the warning state to restore while the window is open

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.first:
            self.open()
        elif batch_idx == self.last:
            self.close()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.close()

    def open(self) -> None:
        self._saved = warnings.catch_warnings()
        self._saved.__enter__()
        self._show = warnings.showwarning
        warnings.filterwarnings("always", message=SYNC)
        warnings.showwarning = self._record
        torch.cuda.set_sync_debug_mode("warn")

    def close(self) -> None:
        if self._saved is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._saved.__exit__(None, None, None)
            self._saved = None

    def _record(self, message: Warning | str, category: type[Warning], filename: str, lineno: int, *args: Any) -> None:
        if not str(message).startswith(SYNC):
            return self._show(message, category, filename, lineno, *args)
        frames = [f for f in traceback.extract_stack() if f.filename != warnings.__file__][:-1]  # not this function
        ours = [f for f in frames if any(Path(f.filename).resolve().is_relative_to(d) for d in OWN_CODE)]
        site = " via ".join(dict.fromkeys(f"{short(f.filename)}:{f.lineno} ({f.name})" for f in [*ours[-1:], frames[-1]]))
        self.sites[site] = self.sites.get(site, 0) + 1


def short(path: str) -> str:
    """``path`` from the project root, or from the installed packages' folder (`torch/...`, `lightning/...`)."""
    parts = Path(path).resolve().parts
    if Path(*parts).is_relative_to(ROOT):
        return str(Path(*parts).relative_to(ROOT))
    folders = [i for i, part in enumerate(parts) if part in ("site-packages", "dist-packages")]
    return str(Path(*parts[folders[-1] + 1:])) if folders else path


def sync_check(ctx: Context) -> Outcome:
    """Host syncs in 10 training steps of the text-to-image experiment (after 2 warm-up steps). The guard's
    documented read of its skip count every max_nonfinite_steps steps is moved past the window."""
    write_data(ctx, 64)
    configs, options = BENCHES["txt2img"](ctx)
    window = SyncSites(first=2, last=12)
    benchmark_train(configs, [*options, "--model.init_args.max_nonfinite_steps", "1000"], device="cuda",
                    precision=PRECISION, steps=11, warmup=2, callbacks=[window])
    listed = "; ".join(f"{site} x{n}" for site, n in sorted(window.sites.items(), key=lambda kv: -kv[1]))
    return {"passed": not window.sites, "numbers": {"steps": window.last - window.first, "sync_sites": window.sites},
            "summary": f"{sum(window.sites.values())} host syncs in {window.last - window.first} steps" + (f": {listed}" if listed else "")}


def peak_flops(device: torch.device, tflops: float | None) -> tuple[float | None, str]:
    """The device's peak bf16 FLOP/s, and where the figure comes from: ``tflops`` (--peak-tflops) if given,
    else Lightning's table (None where it has no figure for the device)."""
    if tflops:
        return tflops * 1e12, "--peak-tflops"
    with warnings.catch_warnings():  # Lightning warns where it has no figure: said in the source instead
        warnings.simplefilter("ignore")
        peak = get_available_flops(device, torch.bfloat16)
    name = torch.cuda.get_device_name(device)
    return peak, f"Lightning's table for {name}" if peak else f"none: Lightning's table lacks {name}, pass --peak-tflops"


def mfu(flops_per_sample: float, samples_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: the FLOPs of the samples a second (one step's, forward and backward) over the peak."""
    return flops_per_sample * samples_per_s / peak if peak else None


def dit_check(ctx: Context) -> Outcome:
    """DiT-XL/2 training steps from a latent cache of 256 px shapes images, encoded by a random kl-f8."""
    write_data(ctx, 256)
    configs, options = BENCHES["dit"](ctx)
    cache = ctx.out / "data" / "dit-latents"
    if not (cache / CACHE_INFO).is_file():
        cache_latents.main([*(a for c in configs for a in ("--config", c)), *options, "--split", "train",
                            "--out", str(cache)])
    result = benchmark_train(configs, [*options, "--data.init_args.train", str(cache / "*.tar")], batch_size=32,
                             device="cuda", precision=PRECISION, steps=30, warmup=3, loader=1)
    peak, source = peak_flops(torch.device("cuda"), ctx.peak_tflops)
    utilisation = mfu(result["flops_per_sample"], result["samples_per_s"], peak)
    numbers = {key: result[key] for key in ("batch_size", "samples_per_s", "ms_per_call", "flops_per_sample",
                                            "peak_memory_gib")} | {"mfu": utilisation, "peak_flops": peak, "peak_source": source}
    shown = f"MFU {100 * utilisation:.1f} % ({source})" if utilisation is not None else f"MFU unknown ({source})"
    return {"passed": True, "numbers": numbers,
            "summary": f"{result['samples_per_s']:.0f} img/s, {result['flops_per_sample'] / 1e9:.0f} GFLOP/img a step, "
                       f"{shown}, {result['peak_memory_gib']:.1f} GiB"}


def sd15_check(ctx: Context) -> Outcome:
    """Seconds per SD-1.5 fine-tune step at 512 px (encoding on the fly, gradient checkpointing) and peak memory."""
    write_data(ctx, 512)
    configs, options = BENCHES["sd15"](ctx)
    rows = {}
    for batch_size in (1, 2):
        result = benchmark_train(configs, options, batch_size=batch_size, device="cuda", precision=PRECISION,
                                 steps=5, warmup=2)
        rows[batch_size] = {"s_per_step": result["ms_per_call"] / 1000, "peak_memory_gib": result["peak_memory_gib"]}
    summary = ", ".join(f"batch {b}: {r['s_per_step']:.2f} s/step, {r['peak_memory_gib']:.1f} GiB" for b, r in rows.items())
    return {"passed": True, "summary": summary, "numbers": {"by_batch_size": rows}}


CHECKS = [
    Check("stage1", "stage-1 fit, bf16: shapes autoencoder, 600 steps, export", 60, partial(fit_check, "stage1")),
    Check("fit_bf16", "bf16 fit: shapes text-to-image (UNet), 100 steps", 55, partial(fit_check, "fit_bf16")),
    Check("compile", "channels-last, torch.compile: its step, batch 32", 130, compile_check),
    Check("sync", "its step without host syncs (sync debug mode)", 30, sync_check),
    Check("dit", "DiT-XL/2 on cached kl-f8 latents, 256 px, batch 32", 60, dit_check),
    Check("sd15", "SD-1.5 fine-tune step, 512 px", 60, sd15_check),
    Check("fsdp", "FSDP on one GPU: shapes text-to-image, 30 steps", 40, partial(fit_check, "fsdp")),
    Check("ddp", "DDP on every visible GPU: shapes text-to-image, 30 steps", 45, partial(fit_check, "ddp")),
]


def require_cuda() -> None:
    if not torch.cuda.is_available():
        why = "sees no CUDA device" if torch.version.cuda else "is built without CUDA"
        raise RuntimeError(f"needs a CUDA GPU (torch {torch.__version__} {why})")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check", help="where everything goes")
    parser.add_argument("--only", nargs="+", choices=[c.name for c in CHECKS], help="run these checks alone")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for MFU where Lightning's "
                        "get_available_flops has no figure (e.g. 989 for an H100 SXM or H200)")
    args = parser.parse_args(argv)
    with refusals("gpu_check"):
        require_cuda()
    os.environ["LDM_OFFLINE"] = "1"  # every model here is random or made here; no download can succeed offline
    quiet_lightning()
    ctx = Context(args.out.resolve(), args.peak_tflops)
    header = {"device": torch.cuda.get_device_name(0), "devices": torch.cuda.device_count(), "torch": torch.__version__,
              "cuda": torch.version.cuda, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
              "command": " ".join(["python tools/gpu_check.py", *(argv if argv is not None else sys.argv[1:])])}
    checks = [c for c in CHECKS if not args.only or c.name in args.only]
    results = run_checks(checks, ctx, header)
    print(f"gpu_check: {sum(r['passed'] for r in results)} of {len(results)} pass; {ctx.out / 'gpu_check.md'}")
    return results


if __name__ == "__main__":
    sys.exit(0 if all(r["passed"] for r in main()) else 1)
