"""LPIPS perceptual distance (Zhang et al. 2018) on the ``lpips`` package, built without any download."""

from __future__ import annotations

import warnings

import lpips
import torch
from safetensors.torch import load_file
from torch import Tensor


class PerceptualDistance(lpips.LPIPS):
    """Frozen LPIPS-VGG16, always in eval mode (its dropout stays off) and computed in fp32.

    Parameter names are the ``lpips`` package's (as in LDM's ``perceptual_loss``), so either's weights load.
    """

    def train(self, mode: bool = True) -> PerceptualDistance:
        """Stay in eval mode whatever the parent module does."""
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:  # type: ignore[override]
        """Distance (B,) between images (B, 3, H, W) in [-1, 1]."""
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float(), y.float()).flatten()  # (B,)


def build_lpips(weights: str | None = None) -> PerceptualDistance:
    """LPIPS-VGG16 whose VGG trunk comes from ``weights``, a local file (.pt, .pth or .safetensors).

    The file holds a full LPIPS state dict or a torchvision VGG16 one (the whole model, e.g.
    ``vgg16-397923af.pth``, or its ``features``). The linear calibration layers ship inside the
    ``lpips`` package. With ``weights=None`` the trunk stays random: fine for tests, meaningless numbers.
    """
    state = None if weights is None else _read_state_dict(weights)
    with warnings.catch_warnings():  # lpips still passes torchvision's deprecated `pretrained` flag
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.")
        model = PerceptualDistance(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    if state is None:
        warnings.warn("LPIPS has a random VGG16 trunk (no weights): perceptual distances are uncalibrated", stacklevel=2)
    else:
        _load_trunk(model, state, weights)
    return model.requires_grad_(False)


def _read_state_dict(path: str) -> dict[str, Tensor]:
    if path.endswith(".safetensors"):
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"LPIPS weights {path}: expected a state dict, got {type(state).__name__}")
    return state


def _load_trunk(model: PerceptualDistance, state: dict[str, Tensor], path: str) -> None:
    """Load a full LPIPS or a torchvision VGG16 state dict, telling which by its keys."""
    own = model.state_dict()
    if not any(k.startswith("net.slice") for k in state):  # torchvision naming: [features.]<index>.<param>
        vgg_to_lpips = {k.split(".", 2)[2]: k for k in own if k.startswith("net.")}  # "0.weight": "net.slice1.0.weight"
        features = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
        state = {vgg_to_lpips.get(k, k): v for k, v in features.items()}
    missing = sorted(k for k in own if k.startswith("net.") and k not in state)
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(state) & set(own) if state[k].shape != own[k].shape)
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"LPIPS weights {path} fit neither an LPIPS nor a torchvision VGG16 state dict: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong_shape[:3]}"
        )
    model.load_state_dict(state, strict=False)  # calibration layers may be absent: the package's stay
