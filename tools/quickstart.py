"""The whole two-stage pipeline on the built-in shapes data, through the real `ldm` CLI and experiments.

    python tools/quickstart.py                 # about 15 minutes on 2 CPU cores
    python tools/quickstart.py --fast          # a 1-2 minute smoke version
    python tools/quickstart.py --backbone dit  # the transformer instead of the UNet
    python tools/quickstart.py --resume        # skip the stages whose outputs already exist

Stages: shapes shards -> autoencoder (`ldm fit`, which exports it with its latent statistics) ->
text-to-image model (`ldm fit`) -> evaluation (`ldm test`: FID where Inception weights are on the
machine, CLIP score where CLIP weights are) -> a sample grid (`ldm predict`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from torchvision.io import decode_image
from torchvision.utils import make_grid, save_image

from ldm import cli
from ldm.data.synthetic import write_shapes

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "a large red circle in the center", "a large green square in the center", "a large blue triangle in the center",
    "a large yellow star in the center", "a large purple diamond in the center", "a large orange cross in the center",
    "a small white circle in the top left", "a small red square in the bottom right",
]
# (full, --fast): dataset sizes and training steps per stage
BUDGET = {
    "data": ({"train": 6000, "val": 256, "test": 512}, {"train": 512, "val": 64, "test": 64}),
    "autoencoder": ({}, {"max_steps": 20, "val_check_interval": 10, "limit_val_batches": 1}),  # full: the experiment's own (~4.5 min)
    "diffusion": ({"max_steps": 800, "val_check_interval": 400},  # ~9 min
                  {"max_steps": 20, "val_check_interval": 10, "limit_val_batches": 1}),
}


def say(message: str) -> None:
    print(f"\n=== quickstart: {message}", flush=True)


def ldm(subcommand: str, config: str, out: Path, stage: str, *options: str) -> Path:
    """`ldm <subcommand>` logging to <out>/<stage>/version_0, shown as a command and run in this process (one
    interpreter start for every stage); returns that run folder. A failure stops the quickstart (the run has said why)."""
    # no model summary: its FLOPs column needs an example input that these models do not define (it shows 0)
    args = [subcommand, "--config", str(ROOT / config), "--trainer.logger.init_args.save_dir", str(out),
            "--trainer.logger.init_args.name", stage, "--trainer.logger.init_args.version", "0",
            "--trainer.enable_model_summary", "false", *options]
    print("$ ldm", " ".join(args).replace(f"{ROOT}/", ""), flush=True)
    try:
        cli.main(args)
    except SystemExit as stop:
        if stop.code:
            sys.exit(f"{stop.code}\nquickstart: stopped, `ldm {subcommand} --config {config}` failed")
    return out / stage / "version_0"


def trainer_options(budget: dict[str, int]) -> list[str]:
    return [arg for key, value in budget.items() for arg in (f"--trainer.{key}", str(value))]


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="a 1-2 minute smoke version")
    parser.add_argument("--backbone", choices=("unet", "dit"), default="unet")
    parser.add_argument("--resume", action="store_true", help="skip stages whose outputs exist")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "quickstart", help="where runs and outputs go")
    parser.add_argument("--data", type=Path, default=None, help="shapes shards folder (default: data/shapes, or <out>/data with --fast)")
    args = parser.parse_args(argv)
    out, level = args.out.resolve(), int(args.fast)
    data = (args.data or (out / "data" if args.fast else ROOT / "data" / "shapes")).resolve()
    if out.exists() and not args.resume and any(out.glob("*/version_0")):
        parser.error(f"{out} holds an earlier quickstart: pass --resume to continue it, or another --out")
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    overlay = out / "data.yaml"  # every stage and tool reads the same shards
    overlay.write_text(json.dumps({"data": {"init_args": {s: str(data / s / "shard-*.tar") for s in ("train", "val", "test")}}}))
    data_options = ["--config", str(overlay)]

    say(f"1/5 shapes shards in {data}")
    if not (data / "meta.json").exists():
        sizes = BUDGET["data"][level]
        options = " ".join(f"--{k} {v}" for k, v in sizes.items())
        print(f"$ python -m ldm.data.synthetic --out {data} --size 64 {options}", flush=True)
        write_shapes(data, size=64, **sizes)

    say("2/5 autoencoder (stage 1), exported with its latent statistics")
    ae_config = "experiments/shapes/autoencoder.yaml"
    vae = out / "autoencoder.safetensors"
    if not (args.resume and vae.exists()):
        ldm("fit", ae_config, out, "autoencoder", *trainer_options(BUDGET["autoencoder"][level]), *data_options,
            "--export.path", str(vae))

    say(f"3/5 text-to-image model, {args.backbone} backbone (stage 2)")
    config = f"experiments/shapes/txt2img_{args.backbone}.yaml"
    stage2 = f"txt2img_{args.backbone}"
    model_options = ["--model.init_args.codec.init_args.weights", str(vae), *data_options]
    if args.fast:
        model_options += ["--model.init_args.sampler.init_args.steps", "5", "--model.init_args.num_logged_samples", "4",
                          "--data.init_args.batch_size", "8"]
    ckpt = out / stage2 / "version_0" / "checkpoints" / "last.ckpt"
    if not (args.resume and ckpt.exists()):
        ldm("fit", config, out, stage2, *trainer_options(BUDGET["diffusion"][level]), *model_options)

    say("4/5 evaluation (ldm test)")
    report = out / f"{stage2}_test" / "version_0" / "report.json"
    if not (args.resume and report.exists()):
        ldm("test", config, out, f"{stage2}_test", "--ckpt_path", str(ckpt), *model_options)

    say("5/5 samples")
    prompts = out / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    predict_dir = out / f"{stage2}_predict" / "version_0"
    images = sorted((predict_dir / "predictions").glob("*.png"))
    if not (args.resume and len(images) == len(PROMPTS)):
        ldm("predict", config, out, f"{stage2}_predict", "--ckpt_path", str(ckpt), *model_options,
            "--data.init_args.predict", str(prompts))
        images = sorted((predict_dir / "predictions").glob("*.png"))
    grid = out / "samples.png"
    save_image(make_grid([decode_image(str(p)).float() / 255 for p in images], nrow=4, padding=2), grid)

    outputs = {"tensorboard logs": str(out), "report": str(report), "samples": str(predict_dir / "predictions"), "grid": str(grid)}
    say(f"done in {time.perf_counter() - start:.0f} s")
    for name, path in outputs.items():
        print(f"  {name:16s} {path}")
    if report.exists():
        print("  metrics         ", json.dumps(json.loads(report.read_text())["metrics"]))
    print(f"\n  watch the runs:  tensorboard --logdir {out}")
    return outputs


if __name__ == "__main__":
    main()
