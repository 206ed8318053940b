"""The ADM evaluation suite: sFID, Inception Score, precision and recall against torch-fidelity and direct NumPy
computations, Inception's spatial and logit features, ADM-style reference batches (.npz) read as they are and
written from our data, and the suite's names in SampleMetrics and tools/evaluate.py.

Tiny features (``TinySuite``) serve the paths that need no Inception; Inception itself runs with random weights
(no file needed) and, where the shared assets are on the machine, with the real FID file on a few CIFAR-10 images.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import scipy.linalg
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from ldm.callbacks.sample_metrics import SampleMetrics
from ldm.data import batch as B
from ldm.metrics.evaluation import load_metrics
from ldm.metrics.features import InceptionFeatures
from ldm.metrics.fid import FID, KID, SFID
from ldm.metrics.inception_score import InceptionScore, inception_score
from ldm.metrics.precision_recall import PrecisionRecall, precision_recall
from ldm.metrics.reference_batch import read_statistics
from ldm.metrics.statistics import FeatureSet
from tests.assets import asset
from tests.metric_inputs import as_tensor, cifar_folder, exact_fid, random_inception_file, write_images
from tests.tiny_modules import TinyFeatures
from tools import evaluate as ev

INCEPTION = "inception/weights-inception-2015-12-05-6726825d.pth"


class TinySuite(TinyFeatures):
    """TinyFeatures with every kind the suite reads: pool3 (B, 8), spatial (B, 12: a corner of the conv map),
    logits (B, 16)."""

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        features = super().forward(images)
        conv = self.net[1](self.net[0](images))  # (B, 8, h, w)
        features["spatial"] = conv[:, :3, :2, :2].flatten(1)  # (B, 12)
        features["logits"] = 3 * torch.cat([features["pool3"], -features["pool3"]], 1)  # (B, 16)
        return features


def adm_frechet(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """ADM's FIDStatistics.frechet_distance, written out with SciPy's matrix square root."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def adm_precision_recall(reference: np.ndarray, generated: np.ndarray, k: int = 3) -> tuple[float, float]:
    """ADM's ManifoldEstimator, brute force in float64: radii are the k-th neighbour's squared distance (self at 0)."""
    def distances(a, b):
        return ((a[:, None] - b[None]) ** 2).sum(-1)
    radius_ref = np.partition(distances(reference, reference), k, axis=1)[:, k]
    radius_gen = np.partition(distances(generated, generated), k, axis=1)[:, k]
    precision = (distances(generated, reference) <= radius_ref[None]).any(1).mean()
    recall = (distances(reference, generated) <= radius_gen[None]).any(1).mean()
    return float(precision), float(recall)


def adm_inception_score(logits: np.ndarray, split_size: int) -> float:
    """ADM's compute_inception_score from logits: softmax, then consecutive splits of ``split_size``."""
    preds = np.exp(logits - logits.max(1, keepdims=True))
    preds /= preds.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def stats(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = features.double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


# --- the metrics as functions ------------------------------------------------------------------------------------
def test_inception_score_is_adms_and_torch_fidelitys_unshuffled():
    logits = torch.randn(50, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    theirs = isc_features_to_metric(logits, splits=5, shuffle=False)["inception_score_mean"]
    assert inception_score(logits, split_size=10) == pytest.approx(theirs, rel=1e-12)  # 5 splits of 10
    assert inception_score(logits, split_size=20) == pytest.approx(adm_inception_score(logits.numpy(), 20), rel=1e-10)
    assert 1 < inception_score(logits, 50) < 12  # between one class for all and a confident spread over all 12


def test_precision_recall_is_torch_fidelitys_and_adms_in_blocks():
    g = torch.Generator().manual_seed(1)
    reference = torch.randn(70, 16, generator=g)
    generated = torch.randn(50, 16, generator=g) * 1.3 + 0.4  # a shifted, wider set: neither figure is 0 or 1
    ours = precision_recall(generated, reference, k=3, block=16)  # 16 rows at a time: several blocks per set
    theirs = prc_features_to_metric(generated, reference, prc_neighborhood=3, prc_batch_size=10000,
                                    save_cpu_ram=False, verbose=False)
    assert ours == pytest.approx((theirs["precision"], theirs["recall"]), abs=1e-6)  # theirs: a float32 mean
    assert ours == pytest.approx(adm_precision_recall(reference.double().numpy(), generated.double().numpy()), abs=1e-12)
    assert 0 < ours[0] < 1 and 0 < ours[1] < 1 and ours[0] != ours[1]
    assert precision_recall(reference, reference, block=16) == (1.0, 1.0)


def test_feature_sets_from_statistics_give_them_back_with_their_features():
    x = torch.randn(9, 5, dtype=torch.float64)
    mu, sigma = torch.randn(5, dtype=torch.float64), torch.eye(5, dtype=torch.float64) * 0.3
    fixed = FeatureSet.from_statistics(mu, sigma, 9)
    torch.testing.assert_close(fixed.mu_sigma(), (mu, sigma))
    kept = FeatureSet(keep=True)
    kept.add(x)
    replaced = kept.with_statistics(mu, sigma)
    torch.testing.assert_close(replaced.mu_sigma(), (mu, sigma))
    torch.testing.assert_close(replaced.features, x.float())
    assert replaced.count == 9


# --- ADM reference batches ---------------------------------------------------------------------------------------
def test_a_written_reference_batch_holds_the_images_and_their_statistics_and_reads_back(tmp_path):
    write_images(tmp_path / "ref", 1, 11)
    extractor = TinySuite()
    count = ev.write_reference(str(tmp_path / "ref"), str(tmp_path / "ref.npz"), extractor, resolution=16, batch_size=4)
    stored = np.load(tmp_path / "ref.npz")
    images = as_tensor(sorted((tmp_path / "ref").rglob("*.png")))  # (N, 3, 16, 16) uint8, in the tool's order
    assert count == 11 and sorted(stored) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
    np.testing.assert_array_equal(stored["arr_0"], images.permute(0, 2, 3, 1).numpy())  # NHWC uint8, as ADM's
    with torch.no_grad():
        features = extractor(images.float() / 127.5 - 1)
    for kind, (mu, sigma) in {"pool3": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}.items():
        expected = stats(features[kind])
        np.testing.assert_allclose(stored[mu], expected[0], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(stored[sigma], expected[1], rtol=1e-6, atol=1e-9)
    read = read_statistics(tmp_path / "ref.npz")
    assert set(read) == {"pool3", "spatial"} and read["spatial"][1].shape == (12, 12)

    # the batch as the reference of its own images: every distance 0, every image inside the manifold
    report = ev.evaluate(str(tmp_path / "ref"), str(tmp_path / "ref.npz"), [FID(), SFID(), PrecisionRecall()],
                         extractor, resolution=16, batch_size=4)
    assert report["reference_count"] == report["generated_count"] == 11
    assert abs(report["fid"]) < 1e-6 and abs(report["sfid"]) < 1e-6
    assert report["precision"] == report["recall"] == 1.0


def test_an_adm_reference_batch_is_read_as_it_is(tmp_path):
    """The file's mu / sigma and mu_s / sigma_s are used as they are (here deliberately not its images'), its
    images only where features are needed: precision and recall; FID and sFID alone read no image of it."""
    generated = write_images(tmp_path / "gen", 0, 9)
    pixels = np.random.default_rng(3).integers(0, 256, (12, 20, 20, 3), dtype=np.uint8)  # 20 px: used at their size
    g = torch.Generator().manual_seed(5)
    published = {name: torch.randn(shape, generator=g, dtype=torch.float64) for name, shape in
                 (("mu", (8,)), ("mu_s", (12,)), ("a", (8, 8)), ("a_s", (12, 12)))}
    sigma, sigma_s = (published[a] @ published[a].T / 8 for a in ("a", "a_s"))  # symmetric positive definite
    np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=pixels, arr_1=np.arange(12), mu=published["mu"].numpy(),
             sigma=sigma.numpy(), mu_s=published["mu_s"].numpy(), sigma_s=sigma_s.numpy())

    extractor = TinySuite()
    report = ev.evaluate(str(tmp_path / "gen"), str(tmp_path / "VIRTUAL_ref.npz"), [FID(), SFID()], extractor,
                         resolution=16, batch_size=5)
    assert extractor.images_seen == 9 and report["reference_count"] == 12  # the count from arr_0's header
    with torch.no_grad():
        gen = extractor(as_tensor(generated).float() / 127.5 - 1)
    assert report["fid"] == pytest.approx(adm_frechet(*stats(gen["pool3"]), published["mu"].numpy(), sigma.numpy()),
                                          rel=1e-6)
    assert report["sfid"] == pytest.approx(adm_frechet(*stats(gen["spatial"]), published["mu_s"].numpy(),
                                                       sigma_s.numpy()), rel=1e-6)

    both = ev.evaluate(str(tmp_path / "gen"), str(tmp_path / "VIRTUAL_ref.npz"), [FID(), PrecisionRecall()],
                       extractor, resolution=16, batch_size=5)
    with torch.no_grad():
        ref = extractor(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert both["fid"] == pytest.approx(report["fid"], rel=1e-9)  # still the published statistics
    expected = adm_precision_recall(ref["pool3"].double().numpy(), gen["pool3"].double().numpy())
    assert (both["precision"], both["recall"]) == pytest.approx(expected, abs=1e-12)

    np.savez(tmp_path / "stats_only.npz", mu=published["mu"].numpy(), sigma=sigma.numpy())
    with pytest.raises(ValueError, match=r"stats_only\.npz: no arr_0"):
        ev.evaluate(str(tmp_path / "gen"), str(tmp_path / "stats_only.npz"), [FID()], extractor, resolution=16)


def test_a_reference_batch_streams_without_loading_whole(tmp_path):
    """Batches of a compressed arr_0 come out in order, equal to the array, whatever the batch size."""
    pixels = np.random.default_rng(0).integers(0, 256, (7, 4, 5, 3), dtype=np.uint8)
    np.savez_compressed(tmp_path / "c.npz", arr_0=pixels)
    batches = [images for images, _ in ev.iter_batches(str(tmp_path / "c.npz"), 99, 3)]
    assert [len(b) for b in batches] == [3, 3, 1]
    back = (torch.cat(batches) + 1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    np.testing.assert_array_equal(back.numpy(), pixels)
    with zipfile.ZipFile(tmp_path / "bad.npz", "w") as archive, archive.open("arr_0.npy", "w") as f:
        np.lib.format.write_array(f, pixels.astype(np.float32))
    with pytest.raises(ValueError, match=r"bad\.npz: arr_0 is float32 .* expected uint8 images"):
        next(ev.iter_batches(str(tmp_path / "bad.npz"), 16, 2))


# --- Inception's features ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def random_inception_run(tmp_path_factory) -> dict:
    """Inception with random weights (no file needed) on 2 images: ours with every kind, and torch-fidelity's own
    forward with its Mixed_6d 1x1 branch (TF's mixed_6/conv) recorded by a hook."""
    folder = tmp_path_factory.mktemp("random_inception")
    path = folder / "inception.pth"
    theirs = random_inception_file(path, ("2048", "logits_unbiased"))
    pixels = torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    recorded = []
    theirs.Mixed_6d.branch1x1.register_forward_hook(lambda module, args, out: recorded.append(out.clone()))
    with torch.no_grad():
        pool3, logits = theirs(pixels)
    ours = InceptionFeatures(str(path), ["pool3", "spatial", "logits"])(pixels.float() / 127.5 - 1)
    return {"path": path, "ours": ours, "pool3": pool3, "logits": logits, "mixed_6_conv": recorded[0]}


def test_spatial_features_are_adms_first_7_channels_of_mixed_6_conv(random_inception_run):
    ours, conv = random_inception_run["ours"], random_inception_run["mixed_6_conv"]
    assert conv.shape == (2, 192, 17, 17) and ours["spatial"].shape == (2, 2023)  # 17 x 17 x 7, as ADM's sFID
    # ADM reshapes TF's (N, 17, 17, 7): the 7 channels of pixel (0, 0) first, then those of pixel (0, 1), ...
    torch.testing.assert_close(ours["spatial"].view(2, 17, 17, 7), conv[:, :7].permute(0, 2, 3, 1), rtol=0, atol=0)
    torch.testing.assert_close(ours["pool3"], random_inception_run["pool3"], rtol=0, atol=0)
    torch.testing.assert_close(ours["logits"], random_inception_run["logits"], rtol=0, atol=0)  # no bias, as ADM's


def test_inception_score_of_random_inception_is_torch_fidelitys(random_inception_run):
    """The shared Inception file has no classifier: the Inception Score is checked on random weights."""
    score = InceptionScore(split_size=2).compute(_kept(random_inception_run["ours"]["logits"]), None)
    theirs = isc_features_to_metric(random_inception_run["logits"], splits=1, shuffle=False)
    assert score["inception_score"] == pytest.approx(theirs["inception_score_mean"], rel=1e-6)


def _kept(features: Tensor) -> FeatureSet:
    out = FeatureSet(keep=True)
    out.add(features)
    return out


def _nan_classifier(path: Path, tmp_path: Path) -> Path:
    """A copy of an Inception file whose classifier is NaN, as the shared pool3-only conversion stores it."""
    state = torch.load(path, weights_only=True)
    state["fc.weight"] = torch.full_like(state["fc.weight"], torch.nan)
    torch.save(state, tmp_path / "pool3_only.pth")
    return tmp_path / "pool3_only.pth"


@pytest.mark.parametrize("file", ["random weights, NaN classifier", "shared assets"])
def test_without_a_classifier_the_inception_score_alone_is_left_out_in_one_line(file, random_inception_run, tmp_path,
                                                                              caplog, offline):
    if file == "shared assets":
        weights = asset(INCEPTION, "test_without_a_classifier_the_inception_score_alone_is_left_out_in_one_line")
    else:
        weights = _nan_classifier(random_inception_run["path"], tmp_path)
    metrics = [FID(), InceptionScore(), SFID()]
    with caplog.at_level(logging.WARNING, logger="ldm.metrics.evaluation"):
        ready, extractor = load_metrics(metrics, None, str(weights))
    lines = [r.getMessage() for r in caplog.records if r.name == "ldm.metrics.evaluation"]
    assert ready == [metrics[0], metrics[2]] and extractor.kinds == ("pool3", "spatial")
    assert len(lines) == 1 and "\n" not in lines[0] and lines[0].startswith("Inception Score disabled: ")
    assert "no Inception classifier layer" in lines[0] and "--inception-weights" in lines[0]


# --- the real FID Inception on CIFAR-10 (shared assets) ----------------------------------------------------------
class Recording(torch.nn.Module):
    """An extractor that keeps what it returns, so a test sees the features the evaluation saw."""

    def __init__(self, extractor: torch.nn.Module) -> None:
        super().__init__()
        self.extractor, self.seen = extractor, []

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        self.seen.append(self.extractor(images))
        return self.seen[-1]


@pytest.mark.slow  # ~1 min on 2 loaded CPU cores: 24 Inception passes and a 2023-d matrix square root
def test_the_suite_on_cifar10_with_the_real_inception_against_direct_computations(tmp_path, caplog):
    """tools/evaluate.py's path: 4 test trucks and 4 test cats written as an ADM reference batch, then 8 other test
    cats scored against it; sFID equals the exact Fréchet distance of the recorded features, precision and recall torch-fidelity's,
    the batch's statistics NumPy's. Few images and no FID: Inception costs up to ~1 s per image on these CPUs,
    and a 2023-d matrix square root (sFID) tens of seconds; the tiny-feature tests above cover FID's path."""
    weights = str(asset(INCEPTION, "test_spatial_features_are_adms_first_7_channels_of_mixed_6_conv"))
    n = 8
    cats = cifar_folder(tmp_path / "cats", [f"test/cat/{i:04d}.jpg" for i in range(n)])
    trucks = cifar_folder(tmp_path / "trucks", [f"test/{c}/{i:04d}.jpg" for c, i in [*(("truck", i) for i in range(4)),
                                                                                         *(("cat", i) for i in range(8, 12))]])
    metrics = [SFID(), PrecisionRecall(), InceptionScore()]
    with caplog.at_level(logging.WARNING, logger="ldm.metrics.evaluation"):
        metrics, inception = load_metrics(metrics, None, weights)  # the shared file has no classifier: IS left out
    assert [m.names[0] for m in metrics] == ["sfid", "precision"] and inception.kinds == ("pool3", "spatial")
    scorer = Recording(inception)
    ev.write_reference(str(trucks), str(tmp_path / "trucks.npz"), scorer, resolution=32, batch_size=n)
    stored = np.load(tmp_path / "trucks.npz")
    trucks_seen = scorer.seen.pop()
    for kind, (mu, sigma) in {"pool3": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}.items():
        np.testing.assert_allclose(stored[mu], stats(trucks_seen[kind])[0], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(stored[sigma], stats(trucks_seen[kind])[1], rtol=1e-6, atol=1e-9)

    report = ev.evaluate(str(cats), str(tmp_path / "trucks.npz"), metrics, scorer, resolution=32, batch_size=n)
    cats_seen, reference_seen = scorer.seen  # the cats, then the batch's stored images (for precision and recall)
    torch.testing.assert_close(reference_seen["pool3"], trucks_seen["pool3"], rtol=0, atol=1e-5)
    assert report["sfid"] == pytest.approx(exact_fid(cats_seen["spatial"].double(), trucks_seen["spatial"].double()),
                                           rel=1e-4)
    theirs = prc_features_to_metric(cats_seen["pool3"], reference_seen["pool3"], prc_neighborhood=3,
                                    prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    assert (report["precision"], report["recall"]) == pytest.approx((theirs["precision"], theirs["recall"]), abs=1e-6)
    assert report["sfid"] > 10 and 0 < report["precision"] < 1  # no comparison of near-zero or saturated values


# --- the same names in SampleMetrics and tools/evaluate.py -------------------------------------------------------
class Blur(L.LightningModule):
    """Evaluation images: its batch's images blurred."""

    def validation_step(self, batch, batch_idx) -> None:
        pass

    def evaluation_images(self, batch, draw: int = 0) -> Tensor:
        return torch.nn.functional.avg_pool2d(batch[B.IMAGE], 3, stride=1, padding=1, count_include_pad=False)


def test_sample_metrics_logs_the_suite_under_its_names(tmp_path, offline):
    extractor = TinySuite()
    metrics = [FID(), SFID(), InceptionScore(split_size=4), PrecisionRecall(), KID(subsets=3, subset_size=5)]
    images = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batches = [{B.IMAGE: images[i:i + 4]} for i in range(0, 12, 4)]
    callback = SampleMetrics(metrics, feature_extractor=extractor, cache_dir=str(tmp_path))
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[callback], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    logged = trainer.validate(Blur(), DataLoader(batches, batch_size=None), verbose=False)[0]
    assert extractor.images_seen == 24  # one extraction per batch serves every kind and metric
    with torch.no_grad():
        fake, real = extractor(Blur().evaluation_images({B.IMAGE: images})), extractor(images)
    expected = {
        "val/fid": adm_frechet(*stats(fake["pool3"]), *stats(real["pool3"])),
        "val/sfid": adm_frechet(*stats(fake["spatial"]), *stats(real["spatial"])),
        "val/inception_score": adm_inception_score(fake["logits"].double().numpy(), 4),
        **dict(zip(("val/precision", "val/recall"),
                   adm_precision_recall(real["pool3"].double().numpy(), fake["pool3"].double().numpy()))),
    }
    assert {k: logged[k] for k in expected} == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert {"val/kid", "val/kid_std", "val/samples"} <= set(logged)


def test_evaluate_cli_writes_a_reference_then_reports_the_suite_by_name(tmp_path, monkeypatch, capsys, offline):
    write_images(tmp_path / "gen", 0, 8)
    write_images(tmp_path / "ref", 1, 9)
    monkeypatch.setattr(ev, "InceptionFeatures", lambda weights, kinds: TinySuite())
    monkeypatch.setattr(ev, "inception_for", lambda metrics, weights: TinySuite())
    written = ev.main(["--reference", str(tmp_path / "ref"), "--write-reference", str(tmp_path / "ref.npz"),
                       "--resolution", "16"])
    assert written["reference_count"] == 9 and (tmp_path / "ref.npz").is_file()
    names = ["fid", "sfid", "inception_score", "precision", "recall"]
    report = ev.main(["--generated", str(tmp_path / "gen"), "--reference", str(tmp_path / "ref.npz"), "--resolution",
                      "16", "--metrics", "fid", "sfid", "inception_score", "precision", "--out", str(tmp_path / "r.json")])
    assert [k for k in report if k in names] == names and json.loads((tmp_path / "r.json").read_text()) == report
    printed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [name for name in printed if name in names] == names
    direct = ev.evaluate(str(tmp_path / "gen"), str(tmp_path / "ref"), [FID(), SFID()], TinySuite(), resolution=16)
    assert report["fid"] == pytest.approx(direct["fid"], rel=1e-6) and report["sfid"] == pytest.approx(direct["sfid"], rel=1e-6)
    with pytest.raises(SystemExit):
        ev.main(["--reference", str(tmp_path / "ref")])  # neither --generated nor --write-reference


def test_sample_metrics_compare_with_an_adm_reference_batch(tmp_path, offline):
    """SampleMetrics(reference=...npz): FID from the file's statistics, precision and recall from its images,
    whose features are cached for the next evaluation."""
    pixels = np.random.default_rng(3).integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)
    mu, a = np.linspace(0, 1, 8), np.random.default_rng(4).normal(size=(8, 8))
    np.savez(tmp_path / "ref.npz", arr_0=pixels, mu=mu, sigma=a @ a.T / 8)
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batches = [{B.IMAGE: images[i:i + 4]} for i in range(0, 8, 4)]

    def validate(extractor: TinySuite) -> dict[str, float]:
        callback = SampleMetrics([FID(), PrecisionRecall()], feature_extractor=extractor, cache_dir=str(tmp_path / "c"),
                                 reference=str(tmp_path / "ref.npz"))
        trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[callback], enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        return trainer.validate(Blur(), DataLoader(batches, batch_size=None), verbose=False)[0]

    first, second = TinySuite(), TinySuite()
    logged, again = validate(first), validate(second)
    assert first.images_seen == 8 + 7 and second.images_seen == 8  # the batch's features: from the cache
    with torch.no_grad():
        fake = first(Blur().evaluation_images({B.IMAGE: images}))["pool3"]
        real = first(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1)["pool3"]
    expected = {"val/fid": adm_frechet(*stats(fake), mu, a @ a.T / 8),
                **dict(zip(("val/precision", "val/recall"), adm_precision_recall(real.double().numpy(),
                                                                                 fake.double().numpy())))}
    assert {k: logged[k] for k in expected} == pytest.approx(expected, rel=1e-5)
    assert again == pytest.approx(logged, rel=1e-9)
    with pytest.raises(ValueError, match="reference of SampleMetrics: .*ref.png is not an ADM reference batch"):
        SampleMetrics(reference=str(tmp_path / "ref.png"))
