"""PatchGAN discriminator of the stage-1 autoencoder and its two losses (Isola et al. 2017; Esser et al. 2021)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ActNorm(nn.Module):
    """Per-channel affine set by the first training batch to zero mean, unit variance (Kingma & Dhariwal 2018, Sec. 3.1).

    A batch-size-independent alternative to BatchNorm; parameter names follow taming-transformers.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    def forward(self, x: Tensor) -> Tensor:
        if self.training and not self.initialized:
            with torch.no_grad():
                std, mean = torch.std_mean(x, dim=(0, 2, 3), keepdim=True)  # (1, C, 1, 1)
                self.loc.copy_(-mean)
                self.scale.copy_(1.0 / (std + 1e-6))
                self.initialized.fill_(True)
        return self.scale * (x + self.loc)  # (B, C, H, W)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: strided 4x4 convs giving one real/fake logit per overlapping patch (Isola et al. 2017, Sec. 3.2.2).

    ``n_layers`` stride-2 convs then two stride-1 convs; with ``n_layers=3`` each logit sees a 70x70 patch.
    Inputs need at least ``3 * 2**n_layers`` px (24 for 3 layers). Layer order matches LDM's ``main``
    Sequential, so its discriminator weights load by name.
    """

    def __init__(
        self,
        in_channels: int = 3,  # image channels
        channels: int = 64,  # width of the first conv; doubles per layer up to 8x
        n_layers: int = 3,  # stride-2 convs; sets the patch size
        use_actnorm: bool = False,  # ActNorm instead of BatchNorm (independent of batch size)
    ) -> None:
        super().__init__()
        norm = ActNorm if use_actnorm else nn.BatchNorm2d
        widths = [channels * min(2**i, 8) for i in range(n_layers + 1)]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        for i in range(1, n_layers + 1):
            stride = 2 if i < n_layers else 1
            # BatchNorm's shift makes a conv bias redundant; ActNorm's is fixed after init, so keep one.
            layers += [
                nn.Conv2d(widths[i - 1], widths[i], 4, stride=stride, padding=1, bias=use_actnorm),
                norm(widths[i]),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.init_weights()

    def init_weights(self) -> None:
        """DCGAN/pix2pix init: conv weights N(0, 0.02), BatchNorm scales N(1, 0.02), biases 0; ActNorm inits on data."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)  # (B, 1, h, w) patch logits


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge loss for D (Lim & Ye 2017): mean relu(1 - D(x)) + mean relu(1 + D(x')), halved as in LDM."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Cross-entropy for D on logits (Goodfellow et al. 2014): mean softplus(-D(x)) + mean softplus(D(x')), halved."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())
