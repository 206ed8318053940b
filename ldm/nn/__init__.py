"""Layers and module helpers shared by the backbones, the autoencoder and the conditioning."""
