"""FID / KID against torch-fidelity, PSNR / SSIM against torchmetrics, Inception and OpenCLIP loading, the
reference-stats cache, the metric protocol's loading and discovery, tools/evaluate.py."""

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch_fidelity import calculate_metrics
from torch_fidelity import feature_extractor_inceptionv3 as tf_inception
from torch_fidelity.metric_fid import (
    fid_features_to_statistics,
    fid_statistics_to_metric,
)
from torch_fidelity.metric_kid import kid_features_to_metric
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ldm.conditioning.open_clip import OpenCLIP
from ldm.metrics.base import metric_classes
from ldm.metrics.clip_score import CLIPScore, clip_score
from ldm.metrics.evaluation import load_metrics
from ldm.metrics.features import InceptionFeatures
from ldm.metrics.fid import FID, KID, SFID, kid
from ldm.metrics.inception_score import InceptionScore
from ldm.metrics.paired import LPIPS, PSNR, SSIM
from ldm.metrics.precision_recall import PrecisionRecall
from ldm.metrics.statistics import FeatureSet, ReferenceCache
from tests.assets import asset
from tests.metric_inputs import as_tensor, cifar_folder, exact_fid, random_inception_file, write_images
from tests.shardutil import write_shards
from tests.tiny_clip import register_tiny_clip
from tests.tiny_modules import TinyFeatures
from tools import evaluate as ev

TINY_CLIP = OpenCLIP(random_init=True, text_cfg={"width": 32, "layers": 1, "heads": 2}, vision_cfg={"width": 32, "layers": 1, "head_width": 16, "image_size": 32, "patch_size": 16})


def ready(*metrics):
    """The metrics, their pretrained parts built (random ones in these tests)."""
    for metric in metrics:
        metric.load()
    return metrics[0] if len(metrics) == 1 else metrics


def fid(x: torch.Tensor, y: torch.Tensor) -> float:
    """The FID metric of two (N, D) feature sets."""
    return FID().compute(*(as_set(f) for f in (x, y)))["fid"]


def as_set(features: torch.Tensor, keep: bool = False) -> FeatureSet:
    out = FeatureSet(keep)
    out.add(features)
    return out


def feature_sets(dim: int, n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """Two different non-negative, Gaussian-ish float64 feature sets."""
    g = torch.Generator().manual_seed(dim)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64).abs()
    return x, (torch.randn(n, dim, generator=g, dtype=torch.float64) * 1.2 + 0.1).abs()


def torch_fidelity_fid(x, y) -> float:
    stats = fid_features_to_statistics(x), fid_features_to_statistics(y)
    return fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]


def test_fid_of_a_set_with_itself_is_zero():
    x, _ = feature_sets(64)
    assert abs(fid(x, x)) < 1e-6 * float(torch.cov(x.T).trace())


def test_fid_is_torch_fidelitys_and_the_exact_value_on_full_rank_features():
    x, y = feature_sets(64)  # 300 samples in 64-d: full-rank covariances
    assert fid(x, y) == pytest.approx(torch_fidelity_fid(x, y), rel=1e-12)
    assert fid(x.float(), y.float()) == pytest.approx(exact_fid(x, y), rel=1e-6)


def test_kid_is_torch_fidelitys_with_the_same_subsets_and_clips_the_subset_size():
    x, y = feature_sets(64, n=80)[0], feature_sets(64, n=90)[1] * 1.1
    ours = kid(x, y, subsets=5, subset_size=50, seed=3)
    theirs = kid_features_to_metric(x, y, kid_subsets=5, kid_subset_size=50, rng_seed=3, verbose=False)
    assert ours == pytest.approx((theirs["kernel_inception_distance_mean"], theirs["kernel_inception_distance_std"]), abs=1e-9)
    clipped = kid(x, y, subsets=2, seed=0)  # subset size 1000 clipped to the 80 samples of x
    theirs = kid_features_to_metric(x, y, kid_subsets=2, kid_subset_size=80, rng_seed=0, verbose=False)
    assert clipped[0] == pytest.approx(theirs["kernel_inception_distance_mean"], abs=1e-9)


def _contributions(feature_set: FeatureSet) -> list[torch.Tensor]:
    """What a rank hands to each collective of ``merged``, in call order (recorded as a world of one)."""
    calls: list[torch.Tensor] = []
    feature_set.merged(lambda t: calls.append(t) or t, lambda t: calls.append(t) or t[None])
    return calls


def test_feature_sets_merged_across_ranks_equal_the_whole_set():
    x = torch.randn(11, 6, dtype=torch.float64)
    order = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    ranks = [FeatureSet(keep=True), FeatureSet(keep=True)]
    for rank, (start, stop) in zip(ranks, ((0, 4), (4, 11))):  # uneven counts, batch by batch
        for i in range(start, stop, 3):
            rank.add(x[i:min(i + 3, stop)], order[i:min(i + 3, stop)])
    other = iter(_contributions(ranks[1]))  # rank 1's side of each all-reduce and all-gather

    def gather(t: torch.Tensor) -> torch.Tensor:  # pads rank 1's tensor as the real all-gather's caller does
        theirs = next(other)
        return torch.stack([t, torch.cat([theirs, theirs.new_zeros(len(t) - len(theirs), *theirs.shape[1:])])
                            if theirs.ndim else theirs])

    whole = ranks[0].merged(lambda t: t + next(other), gather)
    assert whole.count == 11
    mu, sigma = whole.mu_sigma()
    torch.testing.assert_close(mu, x.mean(0))
    torch.testing.assert_close(sigma, torch.cov(x.T))
    torch.testing.assert_close(whole.features, x[order.argsort()].float())  # sorted by the samples' order keys


def test_reference_cache_keys_by_content_and_keeps_features_only_when_asked(tmp_path):
    cache, features = ReferenceCache(tmp_path), FeatureSet(keep=False)
    features.add(torch.randn(5, 8))
    key = {"data": [["/shards/a.tar", 100, 1]], "resolution": 16, "extractor": "sha"}
    assert cache.load(key) is None
    cache.save(key, features)
    cached = cache.load(dict(reversed(key.items())))  # the same key in another order
    torch.testing.assert_close(cached.mu_sigma(), features.mu_sigma())
    assert cache.load({**key, "data": [["/shards/a.tar", 101, 1]]}) is None  # another size: another entry
    assert cache.load(key, keep=True) is None  # KID needs the features, which this entry lacks


@pytest.fixture
def random_inception(tmp_path) -> tuple[Path, nn.Module]:
    """torch-fidelity's Inception with random weights, and the state dict file it was saved to."""
    path = tmp_path / "inception.pth"
    return path, random_inception_file(path)


@pytest.mark.parametrize("where", ["path", "torch hub cache"])
def test_inception_features_load_the_weights_and_see_uint8_pixels(random_inception, where, tmp_path, monkeypatch,
                                                                   offline):
    path, net = random_inception
    if where == "torch hub cache":  # where torch-fidelity downloads it: found with no path given
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
        cached = tmp_path / "torch" / "hub" / "checkpoints" / Path(tf_inception.URL_INCEPTION_V3).name
        cached.parent.mkdir(parents=True)
        path = path.rename(cached)
    pixels = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    ours = InceptionFeatures(str(path) if where == "path" else None)(pixels.float() / 127.5 - 1)
    assert list(ours) == ["pool3"] and ours["pool3"].shape == (1, 2048)
    torch.testing.assert_close(ours["pool3"], net(pixels)[0], rtol=0, atol=0)


def test_fid_with_real_inception_matches_torch_fidelity(tmp_path):
    """Our FID (tools/evaluate.py's path) equals torch-fidelity's on real images: CIFAR-10 test cats vs trucks.

    A few images keep it short: Inception costs ~0.1 s per image on a CPU, and each FID two 2048-d eigen-solves.
    """
    weights = str(asset("inception/weights-inception-2015-12-05-6726825d.pth",
                        "test_inception_features_load_the_weights_and_see_uint8_pixels"))
    n = 40
    cats = cifar_folder(tmp_path / "cats", [f"test/cat/{i:04d}.jpg" for i in range(n)])
    trucks = cifar_folder(tmp_path / "trucks", [f"test/truck/{i:04d}.jpg" for i in range(n)])
    ours = ev.evaluate(str(cats), str(trucks), [FID()], InceptionFeatures(weights), resolution=32, batch_size=n)
    theirs = calculate_metrics(input1=str(cats), input2=str(trucks), fid=True, cuda=False, batch_size=n,
                               save_cpu_ram=True, feature_extractor_weights_path=weights, verbose=False)
    assert ours["generated_count"] == ours["reference_count"] == n
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-3)
    assert ours["fid"] > 100  # cats and trucks lie far apart: not a comparison of two near-zero values


def test_clip_score_is_clamped_scaled_cosine():
    image, text = torch.randn(2, 6, 16)
    text[0] = -image[0]  # cosine -1: clamped to 0
    expected = (100 * (image * text).sum(-1) / (image.norm(dim=-1) * text.norm(dim=-1))).clamp(min=0)
    torch.testing.assert_close(clip_score(image, text), expected)
    assert clip_score(image, text)[0] == 0 and clip_score(image, 3 * image).tolist() == pytest.approx([100.0] * 6)


def test_clip_score_random_init_end_to_end(offline):
    scores = ready(CLIPScore(TINY_CLIP))(torch.rand(3, 3, 20, 24) * 2 - 1, ["a cat", "a red cube", ""])
    assert scores.shape == (3,) and ((scores >= 0) & (scores <= 100)).all()


def test_clip_score_loads_a_local_weights_file(tmp_path, offline):
    register_tiny_clip(tmp_path)
    trained = ready(CLIPScore(OpenCLIP("tiny-test-clip", random_init=True, seed=3)))
    torch.save(trained.clip.state_dict(), tmp_path / "tiny.pt")
    loaded = ready(CLIPScore(OpenCLIP("tiny-test-clip", pretrained=str(tmp_path / "tiny.pt"))))
    other = ready(CLIPScore(OpenCLIP("tiny-test-clip", random_init=True, seed=4)))
    images, captions = torch.rand(2, 3, 32, 32) * 2 - 1, ["a cat", "a dog"]
    torch.testing.assert_close(loaded(images, captions), trained(images, captions))
    assert not torch.allclose(other.clip.visual.conv1.weight, trained.clip.visual.conv1.weight)


@pytest.mark.parametrize("pretrained", ["laion2b_s34b_b79k", "/no/such/weights.bin"])
def test_a_metric_without_weights_is_left_out_in_one_line(pretrained, caplog, offline):
    metrics = [PSNR(), CLIPScore(OpenCLIP("ViT-B-32", pretrained))]
    with caplog.at_level(logging.WARNING, logger="ldm.metrics.evaluation"):
        assert load_metrics(metrics) == (metrics[:1], None)  # PSNR runs on, with no feature extractor to build
    lines = [r.getMessage() for r in caplog.records if r.name == "ldm.metrics.evaluation"]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith("CLIP score disabled: OpenCLIP ViT-B-32 weights") and "clip.pretrained of CLIPScore" in lines[0]


def test_every_metric_is_found_by_the_name_it_reports():
    classes = metric_classes()
    for cls in (FID, SFID, KID, InceptionScore, PrecisionRecall, CLIPScore, PSNR, SSIM, LPIPS):
        assert classes[cls.names[0]] is cls


def test_psnr_and_ssim_are_torchmetrics_over_the_whole_set():
    """PSNR of the set's mean squared error and the mean SSIM, as AutoencoderKL's torchmetrics log them over its batches."""
    g = torch.Generator().manual_seed(0)
    real = torch.rand(6, 3, 16, 16, generator=g) * 2 - 1
    fake = (real + 0.3 * torch.randn(6, 3, 16, 16, generator=g)).clamp(-1, 1)
    psnr, ssim = PeakSignalNoiseRatio(data_range=1.0), StructuralSimilarityIndexMeasure(data_range=1.0)
    for batch in (slice(0, 4), slice(4, 6)):
        psnr.update((fake[batch] + 1) / 2, (real[batch] + 1) / 2)
        ssim.update((fake[batch] + 1) / 2, (real[batch] + 1) / 2)
    assert PSNR().finish(float(PSNR()(fake, real).mean())) == pytest.approx(float(psnr.compute()), rel=1e-5)
    assert float(SSIM()(fake, real).mean()) == pytest.approx(float(ssim.compute()), rel=1e-5)
    assert PSNR().finish(0.0) == math.inf


def test_evaluate_folders_with_an_injected_extractor(tmp_path, offline):
    gen = write_images(tmp_path / "gen", 0, 7, captions=True)
    ref = write_images(tmp_path / "ref", 1, 9)
    extractor, scorer = TinyFeatures(), ready(CLIPScore(TINY_CLIP))
    report = ev.evaluate(str(tmp_path / "gen"), str(tmp_path / "ref"), [FID(), KID(subsets=3), scorer], extractor,
                         resolution=16, batch_size=4)
    with torch.no_grad():
        gen_feats, ref_feats = (extractor.net(as_tensor(p).float() / 127.5 - 1) for p in (gen, ref))
    assert report["generated_count"] == 7 and report["reference_count"] == 9
    assert report["fid"] == pytest.approx(fid(gen_feats, ref_feats), rel=1e-6)
    assert (report["kid"], report["kid_std"]) == pytest.approx(kid(gen_feats, ref_feats, 3), rel=1e-6)
    captions = [f"image number {int(p.stem)}" for p in gen]
    expected = scorer(as_tensor(gen).float() / 127.5 - 1, captions).mean()
    assert report["clip_score"] == pytest.approx(float(expected), rel=1e-5)

    ev.evaluate(str(tmp_path / "gen"), str(tmp_path / "ref"), [FID()], extractor, resolution=16,
                reference_cache=str(tmp_path / "c"))
    seen = extractor.images_seen
    cached = ev.evaluate(str(tmp_path / "gen"), str(tmp_path / "ref"), [FID()], extractor, resolution=16,
                         reference_cache=str(tmp_path / "c"))
    assert extractor.images_seen == seen + 7 and cached["fid"] == pytest.approx(report["fid"], rel=1e-6)  # generated only
    write_images(tmp_path / "ref", 2, 1)  # the reference is edited: its cached features are stale
    edited = ev.evaluate(str(tmp_path / "gen"), str(tmp_path / "ref"), [FID()], extractor, resolution=16,
                         reference_cache=str(tmp_path / "c"))
    assert extractor.images_seen == seen + 7 + 7 + 9 and edited["reference_count"] == 9 and edited["fid"] != cached["fid"]
    with pytest.raises(ValueError, match="fewer captions"):
        ev.evaluate(str(tmp_path / "gen"), str(tmp_path / "ref"), [FID()], extractor, resolution=16, captions=["one"])


def test_evaluate_pairs_the_ith_generated_image_with_the_ith_reference(tmp_path, offline):
    gen, ref = write_images(tmp_path / "gen", 0, 5), write_images(tmp_path / "ref", 1, 5)
    report = ev.evaluate(str(tmp_path / "gen"), str(tmp_path / "ref"), [PSNR(), SSIM()], resolution=16, batch_size=2)
    fake, real = (as_tensor(p).float() / 255 for p in (gen, ref))  # [0, 1]
    assert report["generated_count"] == 5 and "reference_count" not in report  # no reference features were made
    assert report["psnr"] == pytest.approx(float(PeakSignalNoiseRatio(data_range=1.0)(fake, real)), rel=1e-5)
    assert report["ssim"] == pytest.approx(float(StructuralSimilarityIndexMeasure(data_range=1.0)(fake, real)), rel=1e-5)
    write_images(tmp_path / "ref", 2, 6)  # one more reference image than generated
    with pytest.raises(ValueError, match="as many reference images as generated ones"):
        ev.evaluate(str(tmp_path / "gen"), str(tmp_path / "ref"), [PSNR()], resolution=16, batch_size=2)


def test_evaluate_reads_shards_and_crops_like_training(tmp_path, offline):
    write_shards(tmp_path / "shards", [3, 2], size=(24, 16))  # captioned, resized to 16 x 24, cropped
    write_images(tmp_path / "ref", 1, 6)
    scorer = ready(CLIPScore(TINY_CLIP))
    report = ev.evaluate(str(tmp_path / "shards" / "shard-{0000..0001}.tar"), str(tmp_path / "ref"), [FID(), scorer],
                         TinyFeatures(), resolution=16, batch_size=2)
    assert report["generated_count"] == 5 and 0 <= report["clip_score"] <= 100
    assert np.isfinite(report["fid"])


def test_cli_end_to_end(tmp_path, monkeypatch, caplog, capsys, offline):
    write_images(tmp_path / "gen", 0, 5, captions=True)
    write_images(tmp_path / "ref", 1, 6)
    (tmp_path / "captions.txt").write_text("".join(f"caption {i}\n" for i in range(5)))
    weights = []
    monkeypatch.setattr(ev, "inception_for", lambda metrics, path: weights.append(path) or TinyFeatures())
    out = tmp_path / "report" / "out.json"
    report = ev.main(["--generated", str(tmp_path / "gen"), "--reference", str(tmp_path / "ref"), "--resolution", "16",
                      "--captions", str(tmp_path / "captions.txt"), "--inception-weights", "inception.pth",
                      "--clip-pretrained", str(tmp_path / "none.pt"), "--kid", "--out", str(out)])
    assert weights == ["inception.pth"] and json.loads(out.read_text()) == report
    expected = ev.evaluate(str(tmp_path / "gen"), str(tmp_path / "ref"), [FID(), KID()], TinyFeatures(), resolution=16)
    assert report == pytest.approx(expected) and "clip_score" not in report
    assert any(r.getMessage().startswith("CLIP score disabled") for r in caplog.records)
    printed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert {"fid", "kid", "kid_std"} <= printed


def test_cli_stops_naming_the_option_without_inception_weights(tmp_path, monkeypatch, capsys, offline):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        ev.main(["--generated", str(tmp_path), "--reference", str(tmp_path), "--out", str(tmp_path / "report.json")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert "FID Inception-v3 weights not found" in err and "--inception-weights" in err and "LDM_OFFLINE=1" in err


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        ev.main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    for option in ("--generated", "--reference", "--metrics", "--captions", "--inception-weights", "--clip-pretrained",
                   "--kid", "--out", "--write-reference", "fid", "sfid", "inception_score", "precision", "kid",
                   "clip_score", "psnr", "ssim", "lpips", ".npz"):
        assert option in out
