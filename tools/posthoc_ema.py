"""Reconstruct the EMA of any sigma_rel from a run's post-hoc EMA snapshots (EDM2's least squares), as exports.

    python tools/posthoc_ema.py runs/cifar10-unet/version_0/checkpoints/phema \\
        --sigma-rels 0.05 0.10 0.15 --out runs/cifar10-unet/version_0/phema-exports
    ldm test --config experiments/cifar10/unet.yaml \\
        --model.init_args.init_weights runs/cifar10-unet/version_0/phema-exports/0.150-00004000.safetensors

The snapshots are what a fit with `model.init_args.posthoc_ema: {sigma_rels: [0.05, 0.10], every_n_steps: 500}`
writes beside its checkpoints (ldm.diffusion.posthoc_ema). Each output, `<sigma_rel>-<step>.safetensors`, is an
export as `ldm fit` writes one (the backbone with the reconstructed weights, the trained conditioning of that
step, the codec's fingerprint): `--model.init_args.init_weights` of `ldm test`/`ldm predict` and
`tools/export.py --ckpt` take it. `--step` reconstructs the EMA at an earlier snapshot step (default the last).
sigma_rel is the EMA's width relative to the training length: 0.05-0.10 is typical, 0.289 a plain average.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm.cli import refusals
from ldm.diffusion.posthoc_ema import (
    list_snapshots,
    reconstruct,
    snapshot_name,
)
from ldm.training.module import write_weights


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("snapshots", type=Path, help="a run's snapshot folder: <checkpoint folder>/phema")
    parser.add_argument("--sigma-rels", type=float, nargs="+", required=True, help="EMA widths to reconstruct")
    parser.add_argument("--out", type=Path, required=True, help="folder for the exports (not the snapshot folder)")
    parser.add_argument("--step", type=int, help="the snapshot step to reconstruct the EMA at (default: the last)")
    args = parser.parse_args(argv)
    if args.out.resolve() == args.snapshots.resolve():
        parser.error("--out is the snapshot folder: a reconstruction is no snapshot, write it elsewhere")

    with refusals(parser.prog):  # missing or foreign snapshots, a sigma_rel out of range: one line
        snapshots = list_snapshots(args.snapshots)
        step = args.step if args.step is not None else max(s.step for s in snapshots)
        paths = [args.out / snapshot_name(sigma_rel, step) for sigma_rel in args.sigma_rels]
        if taken := [str(p) for p in paths if p.exists()]:
            parser.error(f"{taken} exist: export to a new folder")
        args.out.mkdir(parents=True, exist_ok=True)
        for path, (state, metadata) in zip(paths, reconstruct(snapshots, args.sigma_rels, step)):
            write_weights(state, metadata, path, step)
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
