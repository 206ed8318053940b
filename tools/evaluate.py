"""Score generated images against a reference set with any of ldm's metrics: FID (default), sFID, Inception
Score, precision and recall, KID, CLIP score, PSNR, SSIM, LPIPS, ...

Each set is a folder of images (png / jpg / jpeg / webp, searched recursively, captions in
sidecar .txt files), a WebDataset shard pattern (captions from the samples' txt), or an ADM-style
.npz batch (guided-diffusion's evaluations/, e.g. VIRTUAL_imagenet256_labeled.npz: images in arr_0,
used at their size). Images of folders and shards are resized on their shorter side and
center-cropped to --resolution, as training data is. An .npz reference's published statistics
(mu / sigma, mu_s / sigma_s) are read as they are for FID and sFID, so the figures compare with
the papers' (ADM, DiT, SiT, EDM2, REPA: fid sfid inception_score precision recall); its images
serve the metrics needing features (precision, recall, KID). --write-reference OUT.npz writes the
--reference set as such a batch (images and Inception statistics), from our own data.

    python tools/evaluate.py --generated samples/ --reference 'data/val-{0000..0004}.tar' \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth --metrics fid kid clip_score --out report.json
    python tools/evaluate.py --generated samples.npz --reference VIRTUAL_imagenet256_labeled.npz \
        --metrics fid sfid inception_score precision --out report.json      # the ADM evaluator's five numbers

--metrics takes the metrics' names, those `ldm test` logs (fid, sfid, inception_score, precision, kid,
clip_score, psnr, ssim, lpips, ...; a metric reporting two values, as precision and recall, by its first),
and the report and the printout give each value under those names. Paired metrics (psnr, ssim, lpips)
compare the i-th generated image with the i-th reference image, in sorted file (or shard) order:
reconstructions against their originals. Pretrained weights load as their libraries do: a local path
if given, else the library's cache, else its download (none with LDM_OFFLINE=1). Without Inception
weights the tool stops, naming the option; with an Inception file lacking the classifier (the
Inception Score's), that metric alone is left out, in one line. CLIP score needs captions for the generated
images (sidecars, shard txt or --captions, one line per image in sorted file order) and OpenCLIP weights;
without either it is left out.

With --frames T both sets are clips of T frames: shard patterns of video samples (decoded as evaluation decodes
them, ldm.data.video.VideoClips: the first T frames, at stride 1), folders of video files (mp4, webm, mkv, mov,
avi, m4v; decoded the same way) and folders of `ldm predict` clips (PNG strips of T frames side by side) or
GIFs. FVD reads each clip whole (I3D: --i3d-weights, else torch hub's cache, else its download; without it FVD
alone is left out, in one line), the other metrics every frame (per-frame FID and KID over all frames, CLIP score the mean over
frames with the clip's caption, PSNR / SSIM / LPIPS frame by frame); generated_count counts clips.

    python tools/evaluate.py --frames 8 --generated runs/.../predictions --reference 'data/moving-shapes/test/*.tar' \
        --resolution 64 --metrics fvd fid kid --i3d-weights i3d_torchscript.pt --out report.json
"""

from __future__ import annotations

import argparse
import io
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.conditioning.open_clip import OpenCLIP
from ldm.data import batch as B
from ldm.data import entries as E
from ldm.data.decoder import SampleDecoder, SkipSample
from ldm.data.images import ImageDecoder
from ldm.data.shards import expand_shards, identify
from ldm.data.stream import ShardStream
from ldm.data.video import VideoClips, clip_frames
from ldm.metrics.base import SampleMetric, TextMetric, metric_classes
from ldm.metrics.clip_score import CLIPScore
from ldm.metrics.evaluation import Evaluation, inception_for, load_metrics
from ldm.metrics.features import FeaturesUnavailable, InceptionFeatures, reads_clips
from ldm.metrics.fid import KID
from ldm.metrics.paired import LPIPS
from ldm.metrics.reference_batch import (
    STATISTICS,
    image_count,
    is_reference_batch,
    read_images,
    read_statistics,
    write_reference_batch,
)
from ldm.metrics.statistics import ReferenceCache
from ldm.weights.io import WeightsUnavailable, state_sha256


def iter_batches(source: str, resolution: int, batch_size: int,
                 frames: int | None = None) -> Iterator[tuple[Tensor, list[str]]]:
    """(images (B, 3, R, R), or with ``frames`` clips (B, 3, T, R, R), in [-1, 1], captions, "" where none) from a
    folder or a shard pattern; from an ADM .npz batch its images at their own size, without captions."""
    if is_reference_batch(source):
        if frames is not None:
            raise ValueError(f"{source}: an ADM .npz batch holds images, not clips of --frames {frames}")
        for images in read_images(source, batch_size):
            yield images, [""] * len(images)
        return
    images = ImageDecoder(resolution=resolution, crop="center", require=())
    clips = None if frames is None else VideoClips(frames)  # evaluation's clips: the first T frames
    decoder = images if clips is None else clips.decoder(images)
    if not Path(source).is_dir():
        urls = expand_shards(source)
        if clips is not None and not clips.recognises(urls):
            raise ValueError(f"--frames {frames}: {source} holds images, not clips (video entries or frame images)")
        for batch in ShardStream(urls, decoder, batch_size).batches(worker=0):
            yield batch[B.IMAGE], list(batch[B.CAPTION])
        return
    paths = _files(source, frames)
    if not paths:
        kinds = E.IMAGE_EXTENSIONS if frames is None else (*E.VIDEO_EXTENSIONS, "gif", "image strips")
        raise FileNotFoundError(f"no {'/'.join(kinds)} under {source}")
    rng = random.Random(0)  # a center crop without flips draws nothing from it
    for start in range(0, len(paths), batch_size):
        samples = [_load(path, decoder, rng, frames) for path in paths[start:start + batch_size]]
        yield torch.stack([s[B.IMAGE] for s in samples]), [s[B.CAPTION] for s in samples]


def _clip_image(path: Path) -> bool:
    """Whether a file of a folder of clips is a clip saved as an image: a strip of frames or a GIF."""
    return bool(E.image_entry(path)) or path.suffix.lower() == ".gif"


def _files(folder: str, frames: int | None = None) -> list[Path]:
    """The image files under a folder, recursively, in sorted order; with ``frames``, its clips: video files, image
    strips and GIFs."""
    found = (p for p in Path(folder).rglob("*") if p.is_file())
    return sorted(p for p in found if (E.image_entry(p) if frames is None else E.video_entry(p) or _clip_image(p)))


def _load(path: Path, decoder: SampleDecoder, rng: random.Random, frames: int | None = None) -> dict:
    """An image file (with ``frames``, a video file or an image strip of that many frames) and its sidecar caption
    (`a.jpg`, `a.txt`) decoded as a sample of a shard would be."""
    if frames is not None and _clip_image(path):
        raw = _strip(path, frames)
    else:
        raw = {E.image_entry(path) or E.video_entry(path): path.read_bytes()}
    if path.with_suffix(f".{E.TXT}").is_file():
        raw[E.TXT] = path.with_suffix(f".{E.TXT}").read_bytes()
    try:
        return decoder(raw, rng)
    except SkipSample as err:
        raise ValueError(f"{path}: {err}") from None


def _strip(path: Path, frames: int) -> dict[str, bytes]:
    """A clip saved as an image (``ldm predict``'s strips, or a GIF; ``ldm.data.video.clip_frames``) as the entries
    of a frame sequence (``000.png``, ``001.png``, ... and its json's fps, which any value serves)."""
    raw = {E.JSON: json.dumps({E.FPS: frames}).encode()}
    for i, frame in enumerate(clip_frames(path, frames)):
        buffer = io.BytesIO()
        frame.save(buffer, "PNG", compress_level=1)
        raw[E.frame_entry(i, "png")] = buffer.getvalue()
    return raw


def _sources(source: str, frames: int | None = None) -> list[str]:
    """The files a folder, shard pattern or .npz batch reads, in order."""
    if is_reference_batch(source):
        return [source]
    return [str(p) for p in _files(source, frames)] if Path(source).is_dir() else expand_shards(source)


def evaluate(
    generated: str,
    reference: str,
    metrics: Sequence[SampleMetric],
    extractor: nn.Module | None = None,
    resolution: int = 256,
    batch_size: int = 50,
    captions: list[str] | None = None,
    reference_cache: str | None = None,
    frames: int | None = None,
) -> dict[str, float | int | str]:
    """The ``metrics`` (loaded, on the extractor's device) of the generated set against the reference set.

    ``extractor`` maps [-1, 1] images to the feature kinds the distribution metrics read (``InceptionFeatures``
    for true FID). ``captions`` override the generated images' own, in their order. ``reference_cache`` keeps the
    reference's features on disk, keyed by its files (sizes and modification times), the resolution, the
    feature kind and the extractor's weights, so an edited reference is never served from a stale entry.
    An .npz ``reference`` gives its published statistics (``ldm.metrics.reference_batch``) as they are. With
    ``frames`` both sets are clips of that many frames (``iter_batches``), and the cache key names it.
    """
    run = Evaluation(metrics, extractor)
    if is_reference_batch(reference):
        run.use_statistics(read_statistics(reference), image_count(reference))
    device = _device(extractor, *metrics)
    cache = ReferenceCache(reference_cache) if reference_cache is not None and run.compared else None
    if cache is not None:
        key = {"data": identify(_sources(reference, frames)), "resolution": resolution,
               "extractor": state_sha256(extractor), **({"frames": frames} if frames is not None else {})}
        run.reference = run.cached_reference(cache, key)
    fresh = run.needs_reference
    references = iter_batches(reference, resolution, batch_size, frames) if fresh or run.paired else iter(())
    lines = iter(captions) if captions is not None else None
    for images, own in iter_batches(generated, resolution, batch_size, frames):
        real = _pair(references, len(images)).to(device) if run.paired else None
        if fresh and real is not None:
            run.add_reference(real)
        texts = own if lines is None else [_next_caption(lines) for _ in own]
        run.add_generated(images.to(device), real, texts)
    if lines is not None and next(lines, None) is not None:
        raise ValueError("more captions than generated images")
    for real, _ in references:
        if run.paired:
            raise ValueError(PAIRS)
        run.add_reference(real.to(device))
    values = run.compute()
    if cache is not None and fresh:
        run.save_reference(cache, key)
    report: dict[str, float | int | str] = {"generated": generated, "reference": reference, "resolution": resolution,
                                            "generated_count": run.samples}
    if run.reference is not None:
        report["reference_count"] = next(iter(run.reference.values())).count
    return report | values


def _device(*modules: nn.Module | None) -> torch.device:
    """Where the first module with parameters lives (the CPU if none has any)."""
    return next((p.device for m in modules if m is not None for p in m.parameters()), torch.device("cpu"))


def write_reference(source: str, out: str, extractor: nn.Module, resolution: int = 256, batch_size: int = 50) -> int:
    """Write ``source`` (a folder, shards or an .npz) as an ADM reference batch ``out``: its images as this tool
    reads them and the mean and covariance of their features of each kind of ``STATISTICS`` (pool3 and spatial,
    from ``extractor``: ``InceptionFeatures``); returns the number of images."""
    device = _device(extractor)
    batches = (images.to(device) for images, _ in iter_batches(source, resolution, batch_size))
    return write_reference_batch(out, batches, extractor)


PAIRS = "paired metrics need as many reference images as generated ones, in the same order"


def _pair(references: Iterator[tuple[Tensor, list[str]]], n: int) -> Tensor:
    """The next batch of reference images: the originals of the next ``n`` generated ones."""
    real, _ = next(references, (None, None))
    if real is None or len(real) != n:
        raise ValueError(PAIRS)
    return real


def _next_caption(lines: Iterator[str]) -> str:
    line = next(lines, None)
    if line is None:
        raise ValueError("fewer captions than generated images")
    return line.strip()


def build_metrics(names: Sequence[str], args: argparse.Namespace) -> list[SampleMetric]:
    """The metrics of these names, with this tool's options for those that take any (KID, CLIP score, LPIPS)."""
    classes = metric_classes()
    options = {KID: {"subsets": args.kid_subsets, "subset_size": args.kid_subset_size},
               CLIPScore: {"clip": OpenCLIP(args.clip_model, args.clip_pretrained)},
               LPIPS: {"net": args.lpips_net, "weights": args.lpips_weights}}
    return [classes[name](**options.get(classes[name], {})) for name in dict.fromkeys(names)]


def main(argv: list[str] | None = None) -> dict[str, float | int | str]:
    names = sorted(metric_classes())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generated", help="folder of images, shard pattern or .npz batch (arr_0)")
    parser.add_argument("--reference", required=True, help="folder of images, shard pattern or ADM reference .npz")
    parser.add_argument("--write-reference", metavar="OUT.npz", help="write --reference as an ADM reference batch "
                        "(images in arr_0, Inception mu / sigma and mu_s / sigma_s) before evaluating, if --generated")
    parser.add_argument("--metrics", nargs="+", default=["fid", "clip_score"], choices=names, metavar="NAME",
                        help=f"metrics to compute, of {', '.join(names)} (default: fid clip_score)")
    parser.add_argument("--captions", help="text file, one caption per generated image in sorted file order")
    parser.add_argument("--inception-weights", help="local weights-inception-2015-12-05-6726825d.pth "
                        "(default: torch-fidelity's file in torch hub's cache, else downloaded there)")
    parser.add_argument("--clip-model", default="ViT-B-32", help="open_clip architecture")
    parser.add_argument("--clip-pretrained", default="laion2b_s34b_b79k",
                        help="local weights file or an open_clip tag (from open_clip's cache, else downloaded)")
    parser.add_argument("--lpips-net", default="vgg", choices=["vgg", "alex"], help="LPIPS trunk")
    parser.add_argument("--lpips-weights", help="local LPIPS trunk (torchvision's ImageNet file) or LPIPS state dict "
                        "(default: torch hub's cache, else downloaded there)")
    parser.add_argument("--frames", type=int, metavar="T", help="read both sets as clips of T frames (video shards, "
                        "folders of video files or of `ldm predict` PNG strips): FVD of clips, the rest per frame")
    parser.add_argument("--i3d-weights", help="local FVD I3D TorchScript i3d_torchscript.pt (default: torch hub's "
                        "cache, else downloaded there)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--kid", action="store_true", help="also KID (mean and std over subsets): --metrics ... kid")
    parser.add_argument("--kid-subsets", type=int, default=100)
    parser.add_argument("--kid-subset-size", type=int, default=1000)
    parser.add_argument("--reference-cache", help="folder caching the reference's features, keyed by its files' content")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="JSON report path (required with --generated)")
    args = parser.parse_args(argv)
    if args.generated is None and args.write_reference is None:
        parser.error("--generated (to evaluate) or --write-reference (to write a reference batch) is required")
    if args.generated is not None and args.out is None:
        parser.error("--out is required with --generated")
    if args.frames is not None and (args.frames < 1 or args.write_reference is not None):
        parser.error("--frames takes T >= 1, and --write-reference writes images, not clips")

    if args.write_reference is not None:
        try:
            writer = InceptionFeatures(args.inception_weights, list(STATISTICS)).to(args.device)
        except WeightsUnavailable as err:
            parser.exit(2, f"{parser.prog}: error: {err}\n")
        count = write_reference(args.reference, args.write_reference, writer, args.resolution, args.batch_size)
        print(f"wrote {count} reference images and their statistics to {args.write_reference}")
        if args.generated is None:
            return {"reference": args.reference, "reference_count": count}
    metrics = build_metrics([*args.metrics, *(["kid"] if args.kid else [])], args)
    of_clips = [m.names[0] for m in metrics if reads_clips(m)]
    if of_clips and args.frames is None:
        parser.error(f"{', '.join(of_clips)} reads clips: give --frames T")
    try:
        extractor = inception_for(metrics, args.inception_weights)
    except FeaturesUnavailable:
        extractor = None  # load_metrics leaves out the metrics reading the missing kinds, in one line
    except WeightsUnavailable as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    metrics, extractor = load_metrics(metrics, extractor, args.inception_weights, args.i3d_weights)
    for module in (extractor, *metrics):
        if module is not None:
            module.to(args.device)
    captions = Path(args.captions).read_text().splitlines() if args.captions else None
    reference = args.write_reference or args.reference  # a reference just written is read back, statistics and all
    report = evaluate(args.generated, reference, metrics, extractor, args.resolution, args.batch_size, captions,
                      args.reference_cache, args.frames)
    for metric in metrics:
        if isinstance(metric, TextMetric) and metric.names[0] not in report:
            print(f"{metric.label} left out: the generated images have no captions")
    print(f"{'metric':<18} value")
    for name, value in report.items():
        print(f"{name:<18} {value:.6g}" if isinstance(value, float) else f"{name:<18} {value}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
