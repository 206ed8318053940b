"""LPIPS perceptual distance (Zhang et al. 2018) on the ``lpips`` package; its ImageNet trunk loads as torchvision's."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Literal

import lpips
import torch
from torch import Tensor
from torchvision.models import AlexNet_Weights, VGG16_Weights

from ldm.nn.frozen import StaysInEval
from ldm.weights.io import load_weights, read_state_dict
from ldm.weights.pretrained import hub_weights

Net = Literal["alex", "vgg"]
TRUNKS = {"alex": AlexNet_Weights.IMAGENET1K_V1, "vgg": VGG16_Weights.IMAGENET1K_V1}  # what lpips itself loads
LPIPS_OPTION = "lpips_weights of AutoencoderLoss"


class PerceptualDistance(StaysInEval, lpips.LPIPS):
    """Frozen LPIPS, always in eval mode (its dropout stays off) and computed in fp32.

    Parameter names are the ``lpips`` package's (as in LDM's ``perceptual_loss``), so either's weights load.
    """


    def forward(self, x: Tensor, y: Tensor) -> Tensor:  # type: ignore[override]
        """Distance (B,) between images (B, 3, H, W) in [-1, 1]."""
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float(), y.float()).flatten()  # (B,)


def build_lpips(net: Net = "vgg", weights: str | None = None, random_init: bool = False,
                option: str = LPIPS_OPTION) -> PerceptualDistance:
    """LPIPS on an AlexNet or VGG16 trunk; the calibrated linear layers ship inside the ``lpips`` package.

    The trunk comes from ``weights``, a local file (.pth, .pt or .safetensors) holding a full LPIPS
    state dict or a torchvision one (the whole model, e.g. ``vgg16-397923af.pth``, or its ``features``);
    None takes torchvision's ImageNet file from torch hub's cache, else downloads it as torchvision
    would, unless ``LDM_OFFLINE=1`` (then ``WeightsUnavailable`` names ``option``, the setting that holds ``weights``).
    ``random_init=True`` keeps a random trunk and ignores ``weights``: for tests and CPU smoke runs,
    its distances are uncalibrated.
    """
    if net not in TRUNKS:
        raise ValueError(f"LPIPS net {net!r}: expected one of {sorted(TRUNKS)}")
    path = state = None
    if not random_init:
        path = hub_weights(weights, TRUNKS[net].url, what=f"LPIPS {net} trunk (torchvision's ImageNet weights)",
                           option=option, check_hash=True)
        state = read_state_dict(path)  # before building: a bad file fails fast
    with warnings.catch_warnings():  # lpips still passes torchvision's deprecated `pretrained` flag
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.")
        model = PerceptualDistance(net=net, pretrained=True, pnet_rand=True, verbose=False)
    if state is not None:
        _load_trunk(model, state, path)
    return model.requires_grad_(False)


def _load_trunk(model: PerceptualDistance, state: Mapping[str, Tensor], path: str) -> None:
    """Load a full LPIPS state dict (``net.sliceN.*`` keys) or a torchvision trunk, telling which by its keys."""
    if any(k.startswith("net.") for k in state):
        load_weights(model, state, path, f"LPIPS-{model.pnet_type}")
        return
    # torchvision naming: [features.]<index>.<param>; lpips keeps the same modules as slice<N>.<index>.<param>
    by_index = {k.split(".", 1)[1]: k for k in model.net.state_dict()}  # "3.weight": "slice2.3.weight"
    trunk = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
    load_weights(model.net, {by_index.get(k, k): v for k, v in trunk.items()}, path,
                 f"the torchvision {model.pnet_type} trunk of LPIPS")
