"""FID against the number of function evaluations: one `ldm test` of a trained model per sampler setting.

    python tools/sampler_table.py --config experiments/cifar10/unet.yaml \\
        --ckpt_path runs/cifar10-unet/version_0/checkpoints/last.ckpt \\
        --samplers ddim:50 ddim:100 dpmpp_2m:10 dpmpp_2m:20 euler:50 heun:25 --out runs/cifar10/samplers.json

A sampler is named by its kind (a `Sampler` subclass of ldm.diffusion.samplers) or by its class path, then
`:steps`. Each row runs the experiment's own evaluation (its SampleMetrics: e.g. FID and KID of 5,000 samples
against the whole test split, whose features are computed once and then served from the cache) with only the
sampler changed (settings it shares with the experiment's sampler, such as DDIM's eta, are kept), and records
the report's metrics, the denoiser evaluations per sample that the solver states (`Sampler.evaluations`, NFE)
and the wall time. Any further option goes to `ldm test` after the configs. Prints a Markdown table and writes
JSON.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

from ldm.cli import build_cli
from ldm.diffusion.samplers import Sampler


def class_path(name: str) -> str:
    """The class path of a sampler given by its kind (one of ldm.diffusion.samplers) or by its class path."""
    kinds = {cls.kind: f"{cls.__module__}.{cls.__qualname__}" for cls in Sampler.__subclasses__()}
    if name not in kinds and "." not in name:
        raise SystemExit(f"unknown sampler {name!r}: one of {', '.join(sorted(kinds))}, or a Sampler's class path")
    return kinds.get(name, name)


def run(configs: list[str], ckpt_path: str, name: str, steps: int, options: list[str]) -> dict[str, Any]:
    """One `ldm test` with this sampler: the report's metrics, NFE and wall seconds."""
    sampler = {"class_path": class_path(name), "init_args": {"steps": steps}}
    args = ["test", *(a for c in configs for a in ("--config", c)), *options, "--ckpt_path", ckpt_path,
            "--model.init_args.sampler", json.dumps(sampler)]
    start = time.perf_counter()
    with warnings.catch_warnings():  # LightningCLI warns that this tool's own argv goes unread
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = build_cli(args)
    seconds = time.perf_counter() - start
    metrics = {k.removeprefix("test/"): float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}
    solver = cli.model.sampler
    return {"sampler": solver.kind, "steps": solver.steps, "nfe": solver.evaluations(), "seconds": round(seconds, 1),
            **metrics}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| sampler | steps | NFE | FID | KID (x1e3) | wall s |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        kid = f"{1e3 * r['kid']:.2f} ± {1e3 * r['kid_std']:.2f}" if "kid" in r else "n/a"
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['nfe']} | {r.get('fid', float('nan')):.2f} | {kid} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help="experiment YAML (repeatable, as ldm test)")
    parser.add_argument("--ckpt_path", required=True, help="the trained model's checkpoint")
    parser.add_argument("--samplers", nargs="+", required=True,
                        help="kind:steps or class_path:steps, e.g. ddim:100 dpmpp_2m:20 heun:25")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args, options = parser.parse_known_args(argv)
    rows = []
    for spec in args.samplers:
        name, steps = spec.rsplit(":", 1)
        rows.append(run(args.config, args.ckpt_path, name, int(steps), options))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
