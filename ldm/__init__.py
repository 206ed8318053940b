"""ldm: latent-diffusion experiments with PyTorch Lightning, configured from YAML."""

__version__ = "0.1.0"
