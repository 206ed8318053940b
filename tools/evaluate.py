"""Score generated images against a reference set: FID, optionally KID, and CLIP score.

Each set is a folder of images (png / jpg / jpeg / webp, searched recursively, captions in
sidecar .txt files) or a WebDataset shard pattern (captions from the samples' txt). Images are
resized on their shorter side and center-cropped to --resolution, as training data is.

    python tools/evaluate.py --generated samples/ --reference 'data/val-{0000..0004}.tar' \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth --kid --out report.json

CLIP score needs captions for the generated images (sidecars, shard txt or --captions, one line
per image in sorted file order) and OpenCLIP weights on disk; without them it is left out.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.data.shards import expand_shards, is_remote
from ldm.data.stream import ShardStream
from ldm.data.transforms import SampleTransform, SkipSample
from ldm.metrics.clip_score import CLIPScorer, try_build_clip_scorer
from ldm.metrics.features import InceptionFeatures, extract_features, reference_stats
from ldm.metrics.fid import feature_stats, frechet_distance, kid

IMAGE_KEYS = {".jpg": "jpg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp"}  # suffix -> SampleTransform key


def iter_batches(source: str, resolution: int, batch_size: int) -> Iterator[tuple[Tensor, list[str]]]:
    """(images (B, 3, R, R) in [-1, 1], captions, "" where none) from a folder or a shard pattern."""
    transform = SampleTransform(resolution=resolution, crop="center", require_caption=False)
    if not Path(source).is_dir():
        for batch in ShardStream(expand_shards(source), transform, batch_size).batches(worker=0):
            yield batch["image"], list(batch["caption"])
        return
    paths = sorted(p for p in Path(source).rglob("*") if p.suffix.lower() in IMAGE_KEYS)
    if not paths:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_KEYS)} images under {source}")
    rng = random.Random(0)  # a center crop without flips draws nothing from it
    for start in range(0, len(paths), batch_size):
        samples = [_load(path, transform, rng) for path in paths[start:start + batch_size]]
        yield torch.stack([s["image"] for s in samples]), [s["caption"] for s in samples]


def _load(path: Path, transform: SampleTransform, rng: random.Random) -> dict:
    raw = {IMAGE_KEYS[path.suffix.lower()]: path.read_bytes()}
    if path.with_suffix(".txt").is_file():
        raw["txt"] = path.with_suffix(".txt").read_bytes()
    try:
        return transform(raw, rng)
    except SkipSample as err:
        raise ValueError(f"{path}: {err}") from None


def evaluate(
    generated: str,
    reference: str,
    extractor: nn.Module,
    resolution: int = 256,
    batch_size: int = 50,
    with_kid: bool = False,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    clip_scorer: CLIPScorer | None = None,
    captions: list[str] | None = None,
    reference_cache: str | None = None,
) -> dict[str, float | int | str]:
    """FID (and KID, CLIP score) of the generated set against the reference set.

    ``extractor`` maps [-1, 1] images to (B, D) features (``InceptionFeatures`` for true FID).
    ``captions`` override the generated images' own, in their order. ``reference_cache`` keeps
    the reference statistics on disk, keyed by path, resolution and extractor; KID needs the
    reference features themselves and so bypasses it.
    """
    features, scores, lines = [], [], iter(captions) if captions is not None else None
    for images, own in iter_batches(generated, resolution, batch_size):
        features.append(extract_features([images], extractor))  # (B, D)
        texts = own if lines is None else [_next_caption(lines) for _ in own]
        keep = [i for i, text in enumerate(texts) if text]
        if clip_scorer is not None and keep:
            scores.append(clip_scorer(images[keep], [texts[i] for i in keep]).cpu())  # (K,)
    if lines is not None and next(lines, None) is not None:
        raise ValueError(f"more captions than the {sum(map(len, features))} generated images")
    gen_feats = torch.cat(features)  # (N, D)
    ref_batches = (images for images, _ in iter_batches(reference, resolution, batch_size))
    report: dict[str, float | int | str] = {"generated": generated, "reference": reference, "resolution": resolution,
                                            "generated_count": len(gen_feats)}
    if reference_cache is not None and not with_kid:
        key = {"reference": reference if is_remote(reference) else str(Path(reference).resolve()),
               "resolution": resolution, "extractor": type(extractor).__name__}
        ref_mu, ref_sigma, report["reference_count"] = reference_stats(ref_batches, extractor, reference_cache, key)
    else:
        ref_feats = extract_features(ref_batches, extractor)  # (M, D)
        ref_mu, ref_sigma = feature_stats(ref_feats)
        report["reference_count"] = len(ref_feats)
    report["fid"] = frechet_distance(*feature_stats(gen_feats), ref_mu, ref_sigma)
    if with_kid:
        report["kid_mean"], report["kid_std"] = kid(gen_feats, ref_feats, kid_subsets, kid_subset_size)
    if scores:
        all_scores = torch.cat(scores)  # (K,)
        report["clip_score"], report["clip_score_count"] = float(all_scores.mean()), len(all_scores)
    return report


def _next_caption(lines: Iterator[str]) -> str:
    line = next(lines, None)
    if line is None:
        raise ValueError("fewer captions than generated images")
    return line.strip()


def main(argv: list[str] | None = None) -> dict[str, float | int | str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generated", required=True, help="folder of images or shard pattern")
    parser.add_argument("--reference", required=True, help="folder of images or shard pattern")
    parser.add_argument("--captions", help="text file, one caption per generated image in sorted file order")
    parser.add_argument("--inception-weights", help="local weights-inception-2015-12-05-6726825d.pth "
                        "(default: torch-fidelity's download cache; nothing is downloaded)")
    parser.add_argument("--clip-model", default="ViT-B-32", help="open_clip architecture")
    parser.add_argument("--clip-pretrained", default="laion2b_s34b_b79k",
                        help="local weights file or an open_clip tag already in its cache")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--kid", action="store_true", help="also compute KID (mean and std over subsets)")
    parser.add_argument("--kid-subsets", type=int, default=100)
    parser.add_argument("--kid-subset-size", type=int, default=1000)
    parser.add_argument("--reference-cache", help="folder caching reference statistics (FID only)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True, help="JSON report path")
    args = parser.parse_args(argv)

    extractor = InceptionFeatures(args.inception_weights).to(args.device)
    scorer = try_build_clip_scorer(args.clip_model, args.clip_pretrained)
    captions = Path(args.captions).read_text().splitlines() if args.captions else None
    report = evaluate(
        args.generated, args.reference, extractor, args.resolution, args.batch_size, args.kid,
        args.kid_subsets, args.kid_subset_size, scorer.to(args.device) if scorer is not None else None, captions,
        args.reference_cache,
    )
    if scorer is not None and "clip_score" not in report:
        print("CLIP score left out: the generated images have no captions")
    print(f"{'metric':<18} value")
    for name, value in report.items():
        print(f"{name:<18} {value:.6g}" if isinstance(value, float) else f"{name:<18} {value}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
