"""Score generated images against a reference set: FID, optionally KID, and CLIP score.

Each set is a folder of images (png / jpg / jpeg / webp, searched recursively, captions in
sidecar .txt files) or a WebDataset shard pattern (captions from the samples' txt). Images are
resized on their shorter side and center-cropped to --resolution, as training data is.

    python tools/evaluate.py --generated samples/ --reference 'data/val-{0000..0004}.tar' \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth --kid --out report.json

Pretrained weights load as their libraries do: a local path if given, else the library's cache, else
its download (none with LDM_OFFLINE=1). Without Inception weights the tool stops, naming the option.
CLIP score needs captions for the generated images (sidecars, shard txt or --captions, one line
per image in sorted file order) and OpenCLIP weights; without either it is left out.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.data import batch as B
from ldm.data.shards import expand_shards, identify
from ldm.data.stream import ShardStream
from ldm.data.transforms import SampleTransform, SkipSample
from ldm.metrics.clip_score import CLIPScorer, try_build_clip_scorer
from ldm.metrics.features import InceptionFeatures
from ldm.metrics.fid import frechet_distance, kid
from ldm.metrics.statistics import FeatureSet, ReferenceCache
from ldm.weights.io import WeightsUnavailable, state_sha256

IMAGE_KEYS = {".jpg": "jpg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp"}  # suffix -> SampleTransform key


def iter_batches(source: str, resolution: int, batch_size: int) -> Iterator[tuple[Tensor, list[str]]]:
    """(images (B, 3, R, R) in [-1, 1], captions, "" where none) from a folder or a shard pattern."""
    transform = SampleTransform(resolution=resolution, crop="center", require=())
    if not Path(source).is_dir():
        for batch in ShardStream(expand_shards(source), transform, batch_size).batches(worker=0):
            yield batch[B.IMAGE], list(batch[B.CAPTION])
        return
    paths = sorted(p for p in Path(source).rglob("*") if p.suffix.lower() in IMAGE_KEYS)
    if not paths:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_KEYS)} images under {source}")
    rng = random.Random(0)  # a center crop without flips draws nothing from it
    for start in range(0, len(paths), batch_size):
        samples = [_load(path, transform, rng) for path in paths[start:start + batch_size]]
        yield torch.stack([s[B.IMAGE] for s in samples]), [s[B.CAPTION] for s in samples]


def _load(path: Path, transform: SampleTransform, rng: random.Random) -> dict:
    raw = {IMAGE_KEYS[path.suffix.lower()]: path.read_bytes()}
    if path.with_suffix(".txt").is_file():
        raw["txt"] = path.with_suffix(".txt").read_bytes()
    try:
        return transform(raw, rng)
    except SkipSample as err:
        raise ValueError(f"{path}: {err}") from None


def _sources(source: str) -> list[str]:
    """The files a folder or shard pattern reads, in order."""
    if Path(source).is_dir():
        return [str(p) for p in sorted(Path(source).rglob("*")) if p.suffix.lower() in IMAGE_KEYS]
    return expand_shards(source)


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
    ``captions`` override the generated images' own, in their order. ``reference_cache`` keeps the
    reference's features on disk, keyed by its files (sizes and modification times), the resolution
    and the extractor's weights, so an edited reference is never served from a stale entry.
    """
    device = next(extractor.parameters(), torch.empty(0)).device
    fake, scores, lines = FeatureSet(with_kid), [], iter(captions) if captions is not None else None
    for images, own in iter_batches(generated, resolution, batch_size):
        fake.add(extractor(images.to(device)))
        texts = own if lines is None else [_next_caption(lines) for _ in own]
        keep = [i for i, text in enumerate(texts) if text]
        if clip_scorer is not None and keep:
            scores.append(clip_scorer(images[keep], [texts[i] for i in keep]).cpu())  # (K,)
    if lines is not None and next(lines, None) is not None:
        raise ValueError(f"more captions than the {fake.count} generated images")
    cache = ReferenceCache(reference_cache) if reference_cache is not None else None
    key = {"data": identify(_sources(reference)), "resolution": resolution, "extractor": state_sha256(extractor)}
    real = cache.load(key, keep=with_kid) if cache is not None else None
    if real is None:
        real = FeatureSet(with_kid)
        for images, _ in iter_batches(reference, resolution, batch_size):
            real.add(extractor(images.to(device)))
        if cache is not None:
            cache.save(key, real)
    report: dict[str, float | int | str] = {"generated": generated, "reference": reference, "resolution": resolution,
                                            "generated_count": fake.count, "reference_count": real.count}
    report["fid"] = frechet_distance(*fake.mu_sigma(), *real.mu_sigma())
    if with_kid:
        report["kid_mean"], report["kid_std"] = kid(fake.features, real.features, kid_subsets, kid_subset_size)
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
                        "(default: torch-fidelity's file in torch hub's cache, else downloaded there)")
    parser.add_argument("--clip-model", default="ViT-B-32", help="open_clip architecture")
    parser.add_argument("--clip-pretrained", default="laion2b_s34b_b79k",
                        help="local weights file or an open_clip tag (from open_clip's cache, else downloaded)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--kid", action="store_true", help="also compute KID (mean and std over subsets)")
    parser.add_argument("--kid-subsets", type=int, default=100)
    parser.add_argument("--kid-subset-size", type=int, default=1000)
    parser.add_argument("--reference-cache", help="folder caching the reference's features, keyed by its files' content")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True, help="JSON report path")
    args = parser.parse_args(argv)

    try:
        extractor = InceptionFeatures(args.inception_weights).to(args.device)
    except WeightsUnavailable as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
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
