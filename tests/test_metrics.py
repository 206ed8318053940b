"""FID / KID against torch-fidelity, Inception and OpenCLIP loading, the reference-stats cache, tools/evaluate.py."""

import json
import logging
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torch import nn
from torch_fidelity import calculate_metrics
from torch_fidelity import feature_extractor_inceptionv3 as tf_inception
from torch_fidelity.metric_fid import (
    fid_features_to_statistics,
    fid_statistics_to_metric,
)
from torch_fidelity.metric_kid import kid_features_to_metric

from ldm.metrics.clip_score import CLIPScorer, clip_score, try_build_clip_scorer
from ldm.metrics.features import InceptionFeatures, load_cached_stats, reference_stats
from ldm.metrics.fid import feature_stats, fid, kid
from tests.shardutil import write_shards

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import evaluate as ev  # noqa: E402

ASSET_INCEPTION = Path(__file__).resolve().parents[2] / "shared" / "assets" / "weights-inception-2015-12-05-6726825d.pth"
TINY_CLIP = dict(random_init=True, width=32, layers=1, heads=2, image_size=32, patch_size=16)


def feature_sets(dim: int, kind: str, n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """Two different float64 feature sets: non-negative Gaussian-ish, or rank 16 (singular covariances)."""
    g = torch.Generator().manual_seed(dim)
    if kind == "gaussian":
        x = torch.randn(n, dim, generator=g, dtype=torch.float64).abs()
        return x, (torch.randn(n, dim, generator=g, dtype=torch.float64) * 1.2 + 0.1).abs()
    basis = torch.randn(16, dim, generator=g, dtype=torch.float64)
    z1, z2 = torch.randn(2, n, 16, generator=g, dtype=torch.float64)
    return z1 @ basis, (z2 * 0.8 + 0.3) @ basis


def torch_fidelity_fid(x, y) -> float:
    stats = fid_features_to_statistics(x), fid_features_to_statistics(y)
    return fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]


def exact_fid(x, y) -> float:
    """FID from centred features: tr((S1 S2)^1/2) is the nuclear norm of A B.T / sqrt((n1-1)(n2-1))."""
    a, b = x - x.mean(0), y - y.mean(0)
    tr_covmean = torch.linalg.svdvals(a @ b.T).sum() / ((len(x) - 1) * (len(y) - 1)) ** 0.5
    diff = x.mean(0) - y.mean(0)
    return float(diff @ diff + a.square().sum() / (len(x) - 1) + b.square().sum() / (len(y) - 1) - 2 * tr_covmean)


@pytest.mark.parametrize("kind", ["gaussian", "low_rank"])
def test_fid_of_a_set_with_itself_is_zero(kind):
    x, _ = feature_sets(256, kind)
    assert abs(fid(x, x)) < 1e-6 * float(torch.cov(x.T).trace())


@pytest.mark.parametrize("kind", ["gaussian", "low_rank"])
def test_fid_matches_torch_fidelity_and_the_exact_value(kind):
    x, y = feature_sets(256, kind)  # 300 samples: singular covariances (rank 255 or 16)
    assert fid(x, y) == pytest.approx(torch_fidelity_fid(x, y), abs=1e-3)
    assert fid(x.float(), y.float()) == pytest.approx(exact_fid(x, y), rel=1e-6)


@pytest.mark.slow  # 2048-d eigendecompositions take seconds each on a CPU
@pytest.mark.parametrize("kind", ["gaussian", "low_rank"])
def test_fid_2048_matches_torch_fidelity_and_the_exact_value(kind):
    x, y = feature_sets(2048, kind)  # rank 299 or 16 covariances in 2048-d
    assert fid(x, y) == pytest.approx(exact_fid(x, y), rel=1e-9)
    # torch-fidelity takes square roots of ~2000 round-off eigenvalues of S1 S2; on rank-16
    # features their sum moves its value by ~0.02 (out of ~4700), so compare relatively there.
    tolerance = {"abs": 1e-3} if kind == "gaussian" else {"rel": 1e-5}
    assert fid(x, y) == pytest.approx(torch_fidelity_fid(x, y), **tolerance)


def test_kid_matches_torch_fidelity_with_the_same_subsets():
    x, y = feature_sets(64, "gaussian", n=80)[0], feature_sets(64, "gaussian", n=90)[1] * 1.1
    ours = kid(x, y, subsets=5, subset_size=50, seed=3)
    theirs = kid_features_to_metric(x, y, kid_subsets=5, kid_subset_size=50, rng_seed=3, verbose=False)
    assert ours == pytest.approx((theirs["kernel_inception_distance_mean"], theirs["kernel_inception_distance_std"]), abs=1e-9)
    clipped = kid(x, y, subsets=2, seed=0)  # subset size 1000 clipped to the 80 samples of x
    theirs = kid_features_to_metric(x, y, kid_subsets=2, kid_subset_size=80, rng_seed=0, verbose=False)
    assert clipped[0] == pytest.approx(theirs["kernel_inception_distance_mean"], abs=1e-9)


class TinyFeatures(nn.Module):
    """A small random conv net standing in for Inception; counts its calls."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        return self.net(images)  # (B, 8)


def write_images(folder: Path, seed: int, n: int, size: int = 16, captions: bool = False) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / ("sub" if i % 2 else "") / f"{i:03d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        if captions:
            path.with_suffix(".txt").write_text(f"image number {i}\n")
        paths.append(path)
    return sorted(paths)


def as_tensor(paths: list[Path]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in paths])


def test_reference_stats_are_cached_by_key(tmp_path):
    images = [torch.rand(4, 3, 16, 16) * 2 - 1 for _ in range(3)]
    extractor = TinyFeatures()
    key = {"data": "set-a", "split": "val", "resolution": 16, "count": 12, "extractor": "tiny"}
    mu, sigma, count = reference_stats(images, extractor, str(tmp_path), key)
    assert extractor.calls == 3 and count == 12
    expected = feature_stats(torch.cat([extractor.net(b) for b in images]).detach())
    torch.testing.assert_close((mu, sigma), expected)
    again = reference_stats(images, extractor, str(tmp_path), dict(reversed(key.items())))
    assert extractor.calls == 3  # served from disk
    torch.testing.assert_close(again, (mu, sigma, 12))
    reference_stats(images[:1], extractor, str(tmp_path), {**key, "resolution": 32})
    assert extractor.calls == 4 and len(list(tmp_path.glob("*.safetensors"))) == 2
    assert load_cached_stats(str(tmp_path), {**key, "split": "test"}) is None


@pytest.fixture
def random_inception(tmp_path) -> tuple[Path, nn.Module]:
    """torch-fidelity's Inception with random weights, and the state dict file it was saved to."""
    with pytest.MonkeyPatch.context() as mp, torch.random.fork_rng(devices=[]):
        mp.setattr(tf_inception, "load_state_dict_from_url", lambda *args, **kwargs: None)
        mp.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *args, **kwargs: None)
        torch.manual_seed(0)
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path / "inception.pth"
    torch.save(net.state_dict(), path)
    return path, net


def test_inception_features_load_a_local_file_and_see_uint8_pixels(random_inception, offline):
    path, net = random_inception
    pixels = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    ours = InceptionFeatures(str(path))(pixels.float() / 127.5 - 1)
    assert ours.shape == (1, 2048)
    torch.testing.assert_close(ours, net(pixels)[0], rtol=0, atol=0)


def test_inception_features_without_weights_name_the_cache(tmp_path, monkeypatch, offline):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth") as err:
        InceptionFeatures()
    assert str(tmp_path / "checkpoints") in str(err.value)


@pytest.mark.skipif(not ASSET_INCEPTION.is_file(), reason=f"no real FID Inception weights at {ASSET_INCEPTION} "
                    "(shared assets absent); random weights load through InceptionFeatures and test_evaluate_* run "
                    "the same evaluation path with an injected extractor")
def test_fid_with_real_inception_matches_torch_fidelity(tmp_path):
    write_images(tmp_path / "a", 0, 10, size=32)
    write_images(tmp_path / "b", 1, 10, size=32)
    ours = ev.evaluate(str(tmp_path / "a"), str(tmp_path / "b"), InceptionFeatures(str(ASSET_INCEPTION)), resolution=32)
    theirs = calculate_metrics(input1=str(tmp_path / "a"), input2=str(tmp_path / "b"), fid=True, cuda=False,
                               samples_find_deep=True, feature_extractor_weights_path=str(ASSET_INCEPTION), verbose=False)
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-5, abs=1e-3)


def test_clip_score_is_clamped_scaled_cosine():
    image, text = torch.randn(2, 6, 16)
    text[0] = -image[0]  # cosine -1: clamped to 0
    expected = (100 * (image * text).sum(-1) / (image.norm(dim=-1) * text.norm(dim=-1))).clamp(min=0)
    torch.testing.assert_close(clip_score(image, text), expected)
    assert clip_score(image, text)[0] == 0 and clip_score(image, 3 * image).tolist() == pytest.approx([100.0] * 6)


def test_clip_scorer_random_init_end_to_end(offline):
    scores = CLIPScorer(**TINY_CLIP)(torch.rand(3, 3, 20, 24) * 2 - 1, ["a cat", "a red cube", ""])
    assert scores.shape == (3,) and ((scores >= 0) & (scores <= 100)).all()


def test_clip_scorer_loads_a_local_weights_file(tmp_path, offline):
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                           "patch_size": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "tiny-test-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "tiny-test-clip.json")
    trained = CLIPScorer("tiny-test-clip", random_init=True, seed=3)
    torch.save(trained.clip.state_dict(), tmp_path / "tiny.pt")
    loaded = CLIPScorer("tiny-test-clip", pretrained=str(tmp_path / "tiny.pt"))
    other = CLIPScorer("tiny-test-clip", random_init=True, seed=4)
    images, captions = torch.rand(2, 3, 32, 32) * 2 - 1, ["a cat", "a dog"]
    torch.testing.assert_close(loaded(images, captions), trained(images, captions))
    assert not torch.allclose(other.clip.visual.conv1.weight, trained.clip.visual.conv1.weight)


@pytest.mark.parametrize("pretrained", ["laion2b_s34b_b79k", "/no/such/weights.bin"])
def test_clip_scorer_without_weights_is_disabled_in_one_line(pretrained, caplog, offline):
    with caplog.at_level(logging.WARNING, logger="ldm.metrics.clip_score"):
        assert try_build_clip_scorer("ViT-B-32", pretrained) is None
    lines = [r.getMessage() for r in caplog.records if r.name == "ldm.metrics.clip_score"]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith("CLIP score disabled: no weights for ViT-B-32") and "local weights path" in lines[0]


def test_evaluate_folders_with_an_injected_extractor(tmp_path, offline):
    gen = write_images(tmp_path / "gen", 0, 7, captions=True)
    ref = write_images(tmp_path / "ref", 1, 9)
    extractor = TinyFeatures()
    scorer = CLIPScorer(**TINY_CLIP)
    report = ev.evaluate(str(tmp_path / "gen"), str(tmp_path / "ref"), extractor, resolution=16, batch_size=4,
                         with_kid=True, kid_subsets=3, clip_scorer=scorer)
    with torch.no_grad():
        gen_feats, ref_feats = (extractor.net(as_tensor(p).float() / 127.5 - 1) for p in (gen, ref))
    assert report["generated_count"] == 7 and report["reference_count"] == 9
    assert report["fid"] == pytest.approx(fid(gen_feats, ref_feats), rel=1e-6)
    assert (report["kid_mean"], report["kid_std"]) == pytest.approx(kid(gen_feats, ref_feats, 3), rel=1e-6)
    captions = [f"image number {int(p.stem)}" for p in gen]
    expected = scorer(as_tensor(gen).float() / 127.5 - 1, captions).mean()
    assert report["clip_score_count"] == 7 and report["clip_score"] == pytest.approx(float(expected), rel=1e-5)

    ev.evaluate(str(tmp_path / "gen"), str(tmp_path / "ref"), extractor, resolution=16, reference_cache=str(tmp_path / "c"))
    calls = extractor.calls
    cached = ev.evaluate(str(tmp_path / "gen"), str(tmp_path / "ref"), extractor, resolution=16,
                         reference_cache=str(tmp_path / "c"))
    assert extractor.calls == calls + 1 and cached["fid"] == pytest.approx(report["fid"], rel=1e-6)  # generated only
    with pytest.raises(ValueError, match="fewer captions"):
        ev.evaluate(str(tmp_path / "gen"), str(tmp_path / "ref"), extractor, resolution=16, captions=["one"])


def test_evaluate_reads_shards_and_crops_like_training(tmp_path, offline):
    write_shards(tmp_path / "shards", [3, 2], size=(24, 16))  # captioned, resized to 16 x 24, cropped
    write_images(tmp_path / "ref", 1, 6)
    scorer = CLIPScorer(**TINY_CLIP)
    report = ev.evaluate(str(tmp_path / "shards" / "shard-{0000..0001}.tar"), str(tmp_path / "ref"), TinyFeatures(),
                         resolution=16, batch_size=2, clip_scorer=scorer)
    assert report["generated_count"] == 5 and report["clip_score_count"] == 5
    assert np.isfinite(report["fid"])


def test_cli_end_to_end(tmp_path, monkeypatch, caplog, offline):
    write_images(tmp_path / "gen", 0, 5, captions=True)
    write_images(tmp_path / "ref", 1, 6)
    (tmp_path / "captions.txt").write_text("".join(f"caption {i}\n" for i in range(5)))
    weights = []
    monkeypatch.setattr(ev, "InceptionFeatures", lambda path: weights.append(path) or TinyFeatures())
    out = tmp_path / "report" / "out.json"
    report = ev.main(["--generated", str(tmp_path / "gen"), "--reference", str(tmp_path / "ref"), "--resolution", "16",
                      "--captions", str(tmp_path / "captions.txt"), "--inception-weights", "inception.pth",
                      "--clip-pretrained", str(tmp_path / "none.pt"), "--kid", "--out", str(out)])
    assert weights == ["inception.pth"] and json.loads(out.read_text()) == report
    expected = ev.evaluate(str(tmp_path / "gen"), str(tmp_path / "ref"), TinyFeatures(), resolution=16, with_kid=True)
    assert report == pytest.approx(expected) and "clip_score" not in report
    assert any(r.getMessage().startswith("CLIP score disabled") for r in caplog.records)


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        ev.main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    for option in ("--generated", "--reference", "--captions", "--inception-weights", "--clip-pretrained", "--kid", "--out"):
        assert option in out
