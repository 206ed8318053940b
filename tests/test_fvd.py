"""FVD: a tiny random TorchScript I3D stand-in, loaded through the real weights' path, against a direct NumPy/SciPy
Fréchet distance; the weights policy (path, torch hub's cache, offline in one line) and refused files."""

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.metrics.base import metric_classes
from ldm.metrics.evaluation import Evaluation
from ldm.metrics.fvd import (
    FVD,
    I3D_FILE,
    I3D_MIN_FRAMES,
    I3D_OPTION,
    I3D_URL,
    I3DFeatures,
)
from ldm.weights.io import WeightsError, WeightsUnavailable


class TinyI3D(nn.Module):
    """I3D's call convention on a tiny random net: (B, 3, T, H, W) -> (B, 8) features (``return_features``) or class
    probabilities. Its temporal kernel spans ``I3D_MIN_FRAMES`` frames, so shorter clips fail as they do in I3D."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 8, (I3D_MIN_FRAMES, 3, 3), stride=(1, 2, 2))
        self.head = nn.Linear(8, 8)

    def forward(self, x: Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False) -> Tensor:
        if rescale:
            x = x.float() / 127.5 - 1
        if resize:  # I3D: each frame to 224 x 224; here 12 x 12
            x = F.interpolate(x, size=(x.shape[2], 12, 12), mode="trilinear", align_corners=False)
        features = self.head(torch.relu(self.conv(x)).mean((2, 3, 4)))  # (B, 8)
        return features if return_features else features.softmax(-1)


class NoOptions(nn.Module):
    """A TorchScript module whose forward lacks I3D's options."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean((2, 3, 4))


def scripted(module: nn.Module, path) -> nn.Module:
    """``module`` compiled to TorchScript and saved at ``path``, as i3d_torchscript.pt was."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates TorchScript; the real I3D is one
        torch.jit.script(module).save(str(path))
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny net (seeded) and the TorchScript file it was saved to."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("i3d") / "tiny_i3d.pt"
    return scripted(TinyI3D().eval(), path), path


def clips(n: int, seed: int, frames: int = 8, shift: float = 0.0) -> Tensor:
    """(n, 3, T, 16, 20) clips in [-1, 1]: smooth random patterns, brighter by ``shift``."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, frames, 4, 5, generator=g), size=(frames, 16, 20), mode="trilinear")
    return (2 * x - 1 + shift).clamp(-1, 1)


def direct_features(net: nn.Module, x: Tensor) -> np.ndarray:
    """The features by hand: 8-bit levels, first and last frames repeated to I3D_MIN_FRAMES, I3D's options."""
    pixels = np.round((x.numpy() + 1) * 127.5).clip(0, 255) / 127.5 - 1  # (B, 3, T, H, W)
    missing = max(I3D_MIN_FRAMES - pixels.shape[2], 0)
    pixels = np.pad(pixels, [(0, 0), (0, 0), (missing // 2, missing - missing // 2), (0, 0), (0, 0)], mode="edge")
    with torch.no_grad():
        return net(torch.from_numpy(pixels).float(), rescale=False, resize=True, return_features=True).double().numpy()


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 sqrtm(S_a S_b)) with np.cov's unbiased covariances."""
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(sa @ sb).real
    return float(np.square(a.mean(0) - b.mean(0)).sum() + np.trace(sa + sb - 2 * root))


def fvd(extractor: nn.Module, generated: Tensor, real: Tensor, batch: int = 5) -> float:
    """FVD through the evaluation the SampleMetrics callback and tools/evaluate.py run, batch by batch."""
    run = Evaluation([FVD()], extractor)
    for g, r in zip(generated.split(batch), real.split(batch)):
        run.add_generated(g)
        run.add_reference(r)
    return run.compute()["fvd"]


def test_fvd_equals_a_direct_frechet_distance_of_the_same_features(tiny):
    net, path = tiny
    extractor = I3DFeatures(str(path))
    real, generated = clips(24, seed=1), clips(24, seed=2, shift=0.3)
    expected = frechet(direct_features(net, generated), direct_features(net, real))
    assert fvd(extractor, generated, real) == pytest.approx(expected, rel=1e-6)
    assert expected > 1e-3  # two different sets: not a comparison of two zeros
    assert fvd(extractor, real, real) == pytest.approx(0.0, abs=1e-9)  # a set against itself
    other = fvd(extractor, clips(24, seed=3), real)  # another draw of the real distribution lies nearer than the shift
    assert 0 < other < expected


@pytest.mark.parametrize("frames", [4, 8, 9, 12])
def test_features_see_8_bit_levels_and_short_clips_padded_to_i3ds_minimum(tiny, frames):
    net, path = tiny
    x = clips(3, seed=4, frames=frames)
    extractor = I3DFeatures(str(path))
    ours = extractor(x)
    assert list(ours) == ["i3d"] and ours["i3d"].shape == (3, 8)
    np.testing.assert_allclose(ours["i3d"].double().numpy(), direct_features(net, x), rtol=1e-5, atol=1e-6)
    levels = ((x + 1) * 127.5).round() / 127.5 - 1  # on 8-bit levels: 0.3 of a level either way rounds back
    for nudged in (levels + 0.3 / 127.5, levels - 0.3 / 127.5):
        torch.testing.assert_close(extractor(nudged)["i3d"], extractor(levels)["i3d"], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\) clips"):
        extractor(x[:, :, 0])  # a batch of images, not clips


def test_i3d_is_found_in_torch_hubs_cache_and_offline_without_it_is_one_line_naming_the_option(
        tiny, tmp_path, monkeypatch, offline):
    _, path = tiny
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("LDM_OFFLINE", "1")
    with pytest.raises(WeightsUnavailable) as missing:
        I3DFeatures()
    line = str(missing.value)
    assert "\n" not in line and I3D_OPTION in line and I3D_URL in line and "LDM_OFFLINE=1" in line
    assert isinstance(missing.value, FileNotFoundError)  # what load_metrics catches to leave the metric out
    cached = tmp_path / "torch" / "hub" / "checkpoints" / I3D_FILE  # where the download goes
    cached.parent.mkdir(parents=True)
    cached.write_bytes(path.read_bytes())
    x = clips(2, seed=5)
    torch.testing.assert_close(I3DFeatures()(x)["i3d"], I3DFeatures(str(path))(x)["i3d"], rtol=0, atol=0)
    with pytest.raises(WeightsUnavailable, match=f"no file at {tmp_path / 'nope.pt'}; set {I3D_OPTION}"):
        I3DFeatures(str(tmp_path / "nope.pt"))  # an explicit path wins, even over the cache


def test_a_file_that_is_not_the_i3d_torchscript_is_refused_naming_it(tiny, tmp_path):
    net, _ = tiny
    state_dict, page, no_options = tmp_path / "state_dict.pt", tmp_path / "page.pt", tmp_path / "no_options.pt"
    torch.save(net.state_dict(), state_dict)  # weights without the network
    page.write_text("<html>Dropbox: this link has expired</html>")  # a download gone wrong
    scripted(NoOptions(), no_options)
    for path, why in [(state_dict, "not a TorchScript archive"), (page, "not a TorchScript archive"),
                      (no_options, "its forward takes ['x'], not I3D's")]:
        with pytest.raises(WeightsError) as refused:
            I3DFeatures(str(path))
        assert str(refused.value).startswith(f"{path}: {why}") and I3D_OPTION in str(refused.value)
        assert not isinstance(refused.value, WeightsUnavailable)  # a wrong file is an error, not a missing one


def test_fvd_is_found_by_its_name_and_reads_i3d_features():
    assert metric_classes()["fvd"] is FVD
    assert FVD.feature == "i3d" and FVD.names == ("fvd",) and FVD.label == "FVD"
