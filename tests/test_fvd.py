"""FVD: a tiny random TorchScript I3D stand-in, loaded through the real weights' path, against a direct NumPy/SciPy
Fréchet distance; the weights policy (path, torch hub's cache, offline in one line) and refused files."""

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from ldm.metrics.base import metric_classes
from ldm.metrics.evaluation import Evaluation
from ldm.metrics.fvd import (
    FVD,
    I3D_FILE,
    I3D_OPTION,
    I3D_URL,
    I3DFeatures,
)
from ldm.weights.io import WeightsError, WeightsUnavailable
from tests.fvd_direct import clips, direct_features, frechet
from tests.tiny_modules import TinyI3D, scripted


class NoOptions(nn.Module):
    """A TorchScript module whose forward lacks I3D's options."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean((2, 3, 4))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny net (seeded) and the TorchScript file it was saved to."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("i3d") / "tiny_i3d.pt"
    return scripted(TinyI3D().eval(), path), path


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
