"""Read and write the autoencoder's weights: ours, diffusers' AutoencoderKL or a Stable Diffusion file."""

from __future__ import annotations

import os

from safetensors.torch import save_file

from ldm.autoencoder.vae import VAE
from ldm.convert.vae import Layout, detect_layout, vae_from
from ldm.weights.io import WeightsError, load_weights, read_state_dict, under


def load_vae_weights(vae: VAE, path: str | os.PathLike[str], layout: Layout = "auto") -> None:
    """Load ours (exported or an AutoencoderKL checkpoint), diffusers or Stable Diffusion weights into ``vae`` (strict).

    Foreign layouts carry no latent statistics; they are reset to mean 0, std 1, not estimated.
    """
    path = os.fspath(path)
    state_dict = read_state_dict(path)
    if "vae.latent_mean" in state_dict:  # an AutoencoderKL Lightning checkpoint: keep its VAE
        state_dict = under(state_dict, "vae.")
    if layout == "auto":
        layout = detect_layout(state_dict, path)
    try:
        state_dict = vae_from(layout, state_dict)
    except KeyError as err:
        raise WeightsError(f"{path}: not a {layout!r} autoencoder checkpoint, it lacks {err}") from err
    load_weights(vae, state_dict, path, f"this VAE ({layout} layout)")


def save_vae_safetensors(vae: VAE, path: str | os.PathLike[str]) -> None:
    """Export our weights, latent statistics included, to a ``.safetensors`` file."""
    save_file({k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}, os.fspath(path))
