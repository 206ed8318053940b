"""FID against the number of function evaluations: one `ldm test` of a trained model per sampler setting.

    python tools/sampler_table.py --config experiments/cifar10/unet.yaml \\
        --ckpt_path runs/cifar10-unet/version_0/checkpoints/last.ckpt \\
        --samplers ddim:50 ddim:100 dpmpp_2m:10 dpmpp_2m:20 euler:50 heun:25 --out runs/cifar10/samplers.json

Each row runs the experiment's own evaluation (its SampleMetrics: e.g. FID and KID of 5,000 samples against
the whole test split, whose features are computed once and then served from the cache) with only the
sampler changed, and records the report's metrics, the denoiser evaluations per sample (NFE: Heun makes
two per step but the last; classifier-free guidance doubles the batch of each, not the count) and the wall
time. Any further option goes to `ldm test` after the configs. Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

from ldm.cli import build_cli


def nfe(kind: str, steps: int) -> int:
    """Denoiser evaluations per sample of a sampler run."""
    return 2 * steps - 1 if kind == "heun" else steps


def run(configs: list[str], ckpt_path: str, kind: str, steps: int, options: list[str]) -> dict[str, Any]:
    """One `ldm test` with this sampler: the report's metrics, NFE and wall seconds."""
    args = ["test", *(a for c in configs for a in ("--config", c)), *options, "--ckpt_path", ckpt_path,
            "--model.init_args.sampler.init_args.kind", kind, "--model.init_args.sampler.init_args.steps", str(steps)]
    start = time.perf_counter()
    with warnings.catch_warnings():  # LightningCLI warns that this tool's own argv goes unread
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = build_cli(args)
    seconds = time.perf_counter() - start
    metrics = {k.removeprefix("test/"): float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}
    return {"sampler": kind, "steps": steps, "nfe": nfe(kind, steps), "seconds": round(seconds, 1), **metrics}


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
    parser.add_argument("--samplers", nargs="+", required=True, help="kind:steps, e.g. ddim:100 dpmpp_2m:20 heun:25")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args, options = parser.parse_known_args(argv)
    rows = []
    for spec in args.samplers:
        kind, steps = spec.split(":")
        rows.append(run(args.config, args.ckpt_path, kind, int(steps), options))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
