"""Encode a split once with a stage-2 experiment's frozen codec: shards of posterior moments to train from.

    python tools/cache_latents.py --config experiments/cifar10/unet.yaml --split train --out data/cifar10-latents/train
    ldm fit --config experiments/cifar10/unet.yaml --data.init_args.train 'data/cifar10-latents/train/*.tar'

Each source shard becomes one cache shard of the same name (`ldm.data.latents` has the format): the
posterior's mean and std at latent size (`--dtype`, bfloat16 by default), the mirrored image's too when the
experiment flips, the key, caption, class, size and crop fields, extra maps resized to latent size and,
with `--text`, the outputs of the conditioner's frozen text encoders (training then never runs them).
Images are center-cropped as for evaluation: a cache fixes the crop. Clip shards (a data part with the
`VideoClips` format) are cached as clips: the first T frames at the stride, as evaluation takes them, each
frame through the codec, so a cache fixes the temporal window too. Every sample records the
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
from collections.abc import Iterable
from typing import Any

import torch
import webdataset as wds

from ldm.cli import instantiate
from ldm.data import batch as B
from ldm.data.decoder import SampleDecoder
from ldm.data.formats import decoder_for
from ldm.data.latents import cached_samples, view_tensors, write_info
from ldm.data.shards import expand_shards, identify, shard_keys, write_shard_index
from ldm.data.stream import ShardStream
from ldm.data.video import VideoDecoder
from ldm.diffusion.module import LatentDiffusion

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@torch.no_grad()
def cache_shard(model: LatentDiffusion, source: str, target: Path, decoder: SampleDecoder, maps: Iterable[str],
                flips: bool, text: bool, dtype: torch.dtype, batch_size: int, device: torch.device) -> int:
    """Encode one source shard into ``target`` (written whole, then renamed), with the extra ``maps`` (their
    names) at latent size; the number of samples cached.

    The cache keeps the source's sample order, so an epoch plan deals the same samples to the same slots
    as from the images; bucketed batches encode out of order, so a shard's samples are held until all are.
    """
    codec_hash, text_hash = model.codec.fingerprint_hash(), model.conditioner.frozen_hash() if text else ""
    cached: dict[str, dict[str, Any]] = {}
    for batch in ShardStream([source], decoder, batch_size).batches(worker=0):
        images = batch[B.IMAGE].to(device)
        extra = {name: batch[name].to(device) for name in map(B.map_key, maps)}
        views = [(False, images, extra)]
        if flips:
            views.append((True, images.flip(-1), {k: v.flip(-1) for k, v in extra.items()}))
        tensors: dict[str, torch.Tensor] = {}
        for flipped, x, view_maps in views:
            mean, std = model.codec.moments(x)
            tensors |= view_tensors(mean.to(dtype), std.to(dtype), view_maps, flipped)
        if text:
            for index in model.conditioner.frozen():
                tensors[B.cached_embedding(index)] = model.conditioner.embedders[index](batch, mean.shape[-2:]).to(dtype)
        cached |= {sample["__key__"]: sample for sample in cached_samples(batch, tensors, codec_hash, text_hash)}
    partial = target.with_suffix(".partial")
    with wds.TarWriter(str(partial)) as sink:
        for key in shard_keys(source):
            if key in cached:  # skipped samples are not cached
                sink.write(cached[key])
    os.replace(partial, target)
    target.with_suffix(".done").write_text(json.dumps({"nsamples": len(cached)}))
    return len(cached)


def write_index(out: Path) -> Path | None:
    """The wids-style shard index of every finished cache shard in ``out`` (None while none is finished)."""
    done = sorted(out.glob("*.done"))
    if not done:
        return None
    return write_shard_index([d.with_suffix(".tar") for d in done])


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
    sources = expand_shards(data.patterns[args.split])
    images = data.image_decoder(train=False)  # a cache fixes the center crop; flips are stored as a second view
    decoder = decoder_for(sources, images, data.formats)  # image shards, or clips with the split's format
    flips = data.image_decoder(train=True).hflip and args.split == "train"
    args.out.mkdir(parents=True, exist_ok=True)
    done = 0
    for source in sources[args.rank :: args.world_size]:
        target = args.out / Path(source).name
        if target.with_suffix(".done").is_file():
            continue
        n = cache_shard(model, source, target, decoder, images.extra_keys, flips, args.text, DTYPES[args.dtype], args.batch_size,
                        torch.device(args.device))
        done += 1
        print(f"{source} -> {target}: {n} samples", flush=True)
    info = {"codec": model.codec.fingerprint(), "codec_hash": model.codec.fingerprint_hash(),
            "text_hash": model.conditioner.frozen_hash() if args.text else None, "text_embedders": model.conditioner.frozen() if args.text else [],
            "source": identify(sources), "resolution": images.resolution, "crop": images.crop, "flips": flips,
            "dtype": args.dtype, "extra_keys": dict(images.extra_keys), "buckets": images.buckets,
            "clips": {"frames": decoder.frames, "stride": decoder.stride, "fps": decoder.fps}
            if isinstance(decoder, VideoDecoder) else None}
    write_info(args.out, info)
    index = write_index(args.out)
    print(f"rank {args.rank}/{args.world_size}: {done} shards cached now; index {index}")
    return info


if __name__ == "__main__":
    main()
