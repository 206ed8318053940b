"""The pretrained-weights policy: explicit path > the library's cache > its download; offline, one clear message."""

from __future__ import annotations

import logging
import socket
from urllib.error import URLError

import open_clip
import pytest
import torch
from torchvision.models import alexnet

import ldm.conditioning.open_clip as ldm_open_clip
from ldm.autoencoder.loss import AutoencoderLoss
from ldm.callbacks.sample_metrics import SampleMetrics
from ldm.conditioning.open_clip import OpenCLIP, create_clip
from ldm.conditioning.text import OpenCLIPTextEmbedder
from ldm.metrics.clip_score import CLIPScore
from ldm.metrics.features import InceptionFeatures
from ldm.metrics.fid import FID
from ldm.metrics.paired import LPIPS
from ldm.weights.pretrained import WeightsUnavailable, resolve_weights

# Every pretrained family, built from its defaults (no path): (build, the option its message must name)
FAMILIES = {
    "inception": (InceptionFeatures, "inception_weights"),
    "lpips-vgg": (lambda: AutoencoderLoss(perceptual_weight=1.0), "lpips_weights"),
    "lpips-alex": (lambda: AutoencoderLoss(perceptual_weight=1.0, lpips_net="alex"), "lpips_weights"),
    "openclip-text": (OpenCLIPTextEmbedder, "clip.pretrained of OpenCLIPTextEmbedder"),
    "clip-score": (lambda: CLIPScore().load(), "clip.pretrained of CLIPScore"),
    "lpips-metric": (lambda: LPIPS().load(), "weights of LPIPS"),
}


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Empty torch hub, open_clip URL and Hugging Face caches."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path))  # open_clip's ~/.cache/clip
    monkeypatch.setattr(ldm_open_clip, "try_to_load_from_cache", lambda repo, name: None)


class FakeResolver:
    """Stands in for ``socket.getaddrinfo``: records the host names looked up; those in ``down`` do not resolve."""

    def __init__(self) -> None:
        self.looked_up: list[str] = []
        self.down = {"unknown.invalid"}

    def __call__(self, host, port, *args, **kwargs):
        self.looked_up.append(host)
        if host in self.down:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 443))]  # nothing connects to it


@pytest.fixture
def resolver(monkeypatch):
    """A fake name resolver and no proxy set."""
    fake = FakeResolver()
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    for proxy in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    return fake


@pytest.fixture
def downloads_allowed(monkeypatch, resolver):
    """Downloads allowed, every host resolving (the download functions themselves are faked by each test)."""
    monkeypatch.delenv("LDM_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return resolver


def resolve(path=None, cached=None, download=lambda: "downloaded.pt", offline_vars=("LDM_OFFLINE",),
            url="https://x/w.pt") -> str:
    return resolve_weights(path, what="Test weights", option="test_weights of Thing", url=url,
                           where="the test cache", cached=lambda: cached, download=download, offline_vars=offline_vars)


def refuse():
    raise AssertionError("not to be called")


def test_an_explicit_path_wins_and_must_exist(tmp_path):
    (tmp_path / "w.pt").write_bytes(b"")
    assert resolve(str(tmp_path / "w.pt"), cached="cached.pt", download=refuse) == str(tmp_path / "w.pt")
    with pytest.raises(WeightsUnavailable, match=r"Test weights: no file at .*absent\.pt; set test_weights of Thing"):
        resolve(str(tmp_path / "absent.pt"), cached="cached.pt", download=refuse)


def test_the_cache_comes_before_a_download(downloads_allowed, offline):
    assert resolve(cached="cached.pt", download=refuse) == "cached.pt"
    assert resolve() == "downloaded.pt"


@pytest.mark.parametrize("variable", ["LDM_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_variables_forbid_the_download(variable, downloads_allowed, monkeypatch):
    monkeypatch.setenv(variable, "1")
    with pytest.raises(WeightsUnavailable) as error:
        resolve(download=refuse, offline_vars=("LDM_OFFLINE", "HF_HUB_OFFLINE"))
    assert str(error.value) == ("Test weights not found (looked in the test cache) and downloads are off "
                                f"({variable}=1); set test_weights of Thing to a local copy of https://x/w.pt")
    assert isinstance(error.value, FileNotFoundError)  # what the metric callbacks catch to disable themselves
    monkeypatch.setenv(variable, "0")
    assert resolve(offline_vars=("LDM_OFFLINE", "HF_HUB_OFFLINE")) == "downloaded.pt"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_offline_with_nothing_found_raises_one_line_naming_the_option(family, empty_caches, offline):
    build, option = FAMILIES[family]
    with pytest.raises(WeightsUnavailable) as error:
        build()
    message = str(error.value)
    assert option in message and "LDM_OFFLINE=1" in message and "\n" not in message


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_failed_download_raises_the_message_not_a_socket_error(family, empty_caches, downloads_allowed, offline,
                                                                  monkeypatch):
    def no_network(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)  # torch-fidelity's and torchvision's download
    monkeypatch.setattr(open_clip, "download_pretrained", no_network)  # open_clip's
    build, option = FAMILIES[family]
    with pytest.raises(WeightsUnavailable, match="failed \\(URLError: .*name resolution") as error:
        build()
    assert option in str(error.value) and "\n" not in str(error.value)
    assert isinstance(error.value.__cause__, URLError)


def test_a_host_that_does_not_resolve_fails_at_once_without_the_download(downloads_allowed, offline, monkeypatch):
    """An offline machine is told in one line, not after the library's retries; a proxy resolves names itself."""
    with pytest.raises(WeightsUnavailable) as error:
        resolve(download=refuse, url="https://unknown.invalid/w.pt")
    assert str(error.value) == ("Test weights not found (looked in the test cache) and unknown.invalid does not "
                                "resolve (Name or service not known): no network?; set test_weights of Thing to a "
                                "local copy of https://unknown.invalid/w.pt")
    assert downloads_allowed.looked_up == ["unknown.invalid"]
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    assert resolve(url="https://unknown.invalid/w.pt") == "downloaded.pt"
    assert downloads_allowed.looked_up == ["unknown.invalid"]  # not looked up again: the proxy does it


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_checks_its_librarys_download_host_first(family, empty_caches, downloads_allowed, offline,
                                                              monkeypatch):
    hosts = {"inception": "github.com", "openclip-text": "huggingface.co", "clip-score": "huggingface.co"}
    host = hosts.get(family, "download.pytorch.org")  # torchvision's LPIPS trunks
    downloads_allowed.down.add(host)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(open_clip, "download_pretrained", refuse)
    build, option = FAMILIES[family]
    with pytest.raises(WeightsUnavailable, match="does not resolve .*: no network\\?; set") as error:
        build()
    assert option in str(error.value) and "\n" not in str(error.value)
    assert downloads_allowed.looked_up == [host]


def test_a_download_lands_in_torch_hubs_cache_and_is_found_there_next_time(empty_caches, downloads_allowed, offline,
                                                                              monkeypatch, tmp_path):
    """torchvision's AlexNet for LPIPS: downloaded (faked) into TORCH_HOME's hub checkpoints, then found there."""
    torch.manual_seed(0)
    features = {f"features.{k}": v for k, v in alexnet().features.state_dict().items()}
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        torch.save({**features, "classifier.1.weight": torch.zeros(2, 2)}, dst)  # the whole model, as torchvision's

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    for _ in range(2):
        lpips = AutoencoderLoss(perceptual_weight=1.0, lpips_net="alex", disc_layers=1).perceptual_loss
        assert torch.equal(lpips.net.state_dict()["slice2.3.weight"], features["features.3.weight"])
    assert calls == [("https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", "7be5be79")]  # once
    assert (tmp_path / "torch" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth").is_file()


def test_metric_callbacks_disable_in_one_line_each(empty_caches, offline, caplog):
    callback = SampleMetrics([FID(), CLIPScore(OpenCLIP("ViT-B-32", "laion2b_s34b_b79k")), LPIPS()])
    with caplog.at_level(logging.WARNING):
        callback.setup(None, None, "fit")  # type: ignore[arg-type]  # setup reads neither
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and not any("\n" in line for line in lines)
    assert lines[0].startswith("FID disabled: FID Inception-v3 weights not found") and "inception_weights" in lines[0]
    assert lines[1].startswith("CLIP score disabled: OpenCLIP ViT-B-32 weights") and "clip.pretrained" in lines[1]
    assert lines[2].startswith("LPIPS disabled: LPIPS vgg trunk") and "weights of LPIPS" in lines[2]
    assert callback.metrics == [] and callback.extractor is None


def test_open_clip_tag_from_the_cache_or_open_clip_download_keeps_the_tag_config(downloads_allowed, offline,
                                                                                   monkeypatch, tmp_path):
    created = []
    fake_create = lambda model, **kwargs: created.append(kwargs) or torch.nn.Identity()  # noqa: E731
    monkeypatch.setattr(open_clip, "create_model", fake_create)
    cached = tmp_path / "open_clip_model.safetensors"
    monkeypatch.setattr(ldm_open_clip, "try_to_load_from_cache", lambda repo, name: str(cached))
    create_clip("ViT-B-32", "openai", "pretrained of Test")
    tag = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    assert created[-1] == {"pretrained": str(cached), "force_quick_gelu": True, "force_preprocess_cfg": tag}

    monkeypatch.setattr(ldm_open_clip, "try_to_load_from_cache", lambda repo, name: None)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/clip copy
    monkeypatch.setattr(open_clip, "download_pretrained", lambda cfg: str(tmp_path / "fetched.bin"))
    create_clip("ViT-B-32", "openai", "pretrained of Test")
    assert created[-1]["pretrained"] == str(tmp_path / "fetched.bin")


def test_lpips_random_trunk_is_an_explicit_opt_in(empty_caches):
    loss = AutoencoderLoss(perceptual_weight=1.0, lpips_net="alex", lpips_random_init=True, disc_layers=1)
    assert loss.perceptual_loss is not None and loss.perceptual_loss.pnet_type == "alex"
