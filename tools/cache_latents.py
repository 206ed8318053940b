"""Encode a split once with a stage-2 experiment's frozen codec: shards of posterior moments to train from.

    python tools/cache_latents.py --config experiments/cifar10/unet.yaml --split train --out data/cifar10-latents/train
    ldm fit --config experiments/cifar10/unet.yaml --data.init_args.train 'data/cifar10-latents/train/*.tar'

Each source shard becomes one cache shard of the same name (`ldm.data.latents` has the format): the
posterior's mean and std at latent size (`--dtype`, bfloat16 by default), the mirrored image's too when the
experiment flips, the key, caption, class, size and crop fields, extra maps resized to latent size and,
with `--text`, the outputs of the conditioner's frozen text encoders (training then never runs them).
Images are center-cropped as for evaluation: a cache fixes the crop. Every sample records the
fingerprint hashes of the codec (weights and latent statistics) and text encoders; training refuses a
cache made with others. `cache.json` describes the cache and `shardindex.json` counts its samples.

Resumable: a shard whose `<name>.done` exists is skipped, a half-written one is redone. Split across
processes or GPUs with `--rank R --world-size W` (or torchrun's RANK / WORLD_SIZE): each takes every W-th
source shard and writes its own cache shards. Any option the tool does not know goes to the `ldm` CLI.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import webdataset as wds

from ldm.cli import instantiate
from ldm.data import batch as B
from ldm.data.latents import CACHE_INFO, FLIP, encode_sample
from ldm.data.shards import INDEX_NAME, expand_shards, identify
from ldm.data.stream import ShardStream
from ldm.data.transforms import SampleTransform
from ldm.diffusion.module import LatentDiffusion

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _to_latent_size(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Class maps (integers) resized nearest, float maps bilinear with antialiasing, as SpatialEmbedder resizes."""
    if maps.is_floating_point():
        return F.interpolate(maps, size=size, mode="bilinear", antialias=True)
    return F.interpolate(maps.float(), size=size, mode="nearest-exact").to(torch.int16)


@torch.no_grad()
def cache_shard(model: LatentDiffusion, source: str, target: Path, transform: SampleTransform, flips: bool,
                text: bool, dtype: torch.dtype, batch_size: int, device: torch.device) -> int:
    """Encode one source shard into ``target`` (written whole, then renamed); the number of samples cached."""
    codec_hash, text_hash = model.codec.fingerprint_hash(), model.conditioner.frozen_hash() if text else ""
    maps = [B.map_key(k) for k in transform.extra_keys]
    count, partial = 0, target.with_suffix(".partial")
    with wds.TarWriter(str(partial)) as sink:
        for batch in ShardStream([source], transform, batch_size).batches(worker=0):
            images = batch[B.IMAGE].to(device)
            variants = {"": images, **({FLIP: images.flip(-1)} if flips else {})}
            tensors: dict[str, torch.Tensor] = {}
            for prefix, x in variants.items():
                mean, std = model.codec.moments(x)
                tensors |= {f"{prefix}mean": mean.to(dtype), f"{prefix}std": std.to(dtype)}
                for name in maps:
                    pixels = batch[name].to(device)
                    tensors[f"{prefix}{name}"] = _to_latent_size(pixels.flip(-1) if prefix else pixels, mean.shape[-2:])
            if text:
                for index in model.conditioner.frozen():
                    tensors[B.cached_embedding(index)] = model.conditioner.embedders[index](batch, mean.shape[-2:]).to(dtype)
            for i, key in enumerate(batch[B.KEY]):
                meta = {B.CAPTION: batch[B.CAPTION][i], B.LABEL: int(batch[B.LABEL][i]) if B.LABEL in batch else None,
                        B.ORIGINAL_SIZE: batch[B.ORIGINAL_SIZE][i].tolist(), B.CROP_COORDS: batch[B.CROP_COORDS][i].tolist(),
                        B.CACHE_CODEC: codec_hash, B.CACHE_TEXT: text_hash}
                sink.write(encode_sample(key, {k: v[i].cpu() for k, v in tensors.items()}, meta))
                count += 1
    os.replace(partial, target)
    target.with_suffix(".done").write_text(json.dumps({"nsamples": count}))
    return count


def write_index(out: Path) -> Path:
    """The wids-style shard index of every finished cache shard in ``out``."""
    entries = [{"url": done.with_suffix(".tar").name, "nsamples": json.loads(done.read_text())["nsamples"]}
               for done in sorted(out.glob("*.done"))]
    index, partial = out / INDEX_NAME, out / f"{INDEX_NAME}.partial{os.getpid()}"
    partial.write_text(json.dumps({"__kind__": "wids-shard-index-v1", "wids_version": 1, "shardlist": entries}, indent=1))
    os.replace(partial, index)
    return index


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help="stage-2 experiment YAML (repeatable)")
    parser.add_argument("--split", choices=("train", "val", "test"), default="train")
    parser.add_argument("--out", type=Path, required=True, help="folder of the cache's shards")
    parser.add_argument("--text", action="store_true", help="also store the frozen text encoders' outputs")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="storage type of moments, embeddings")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    parser.add_argument("--device", default=f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    args, options = parser.parse_known_args(argv)
    model, data = instantiate([*(a for c in args.config for a in ("--config", c)), *options])
    if not isinstance(model, LatentDiffusion):
        raise TypeError(f"{args.config}: the model is a {type(model).__name__}; a latent cache needs a LatentDiffusion")
    model.to(args.device).eval()
    hp = data.hparams
    transform = SampleTransform(resolution=hp.resolution, crop="center", extra_keys=dict(hp.extra_keys or {}),
                                require=tuple(hp.require))
    flips = bool(hp.hflip) and args.split == "train"
    sources = expand_shards(data.patterns[args.split])
    args.out.mkdir(parents=True, exist_ok=True)
    done = 0
    for source in sources[args.rank :: args.world_size]:
        target = args.out / Path(source).name
        if target.with_suffix(".done").is_file():
            continue
        n = cache_shard(model, source, target, transform, flips, args.text, DTYPES[args.dtype], args.batch_size,
                        torch.device(args.device))
        done += 1
        print(f"{source} -> {target}: {n} samples", flush=True)
    info = {"codec": model.codec.fingerprint(), "codec_hash": model.codec.fingerprint_hash(),
            "text_hash": model.conditioner.frozen_hash() if args.text else None, "text_embedders": model.conditioner.frozen() if args.text else [],
            "source": identify(sources), "resolution": hp.resolution, "crop": "center", "flips": flips,
            "dtype": args.dtype, "extra_keys": dict(hp.extra_keys or {})}
    (args.out / CACHE_INFO).write_text(json.dumps(info, indent=1) + "\n")
    index = write_index(args.out)
    print(f"rank {args.rank}/{args.world_size}: {done} shards cached now; index {index}")
    return info


if __name__ == "__main__":
    main()
