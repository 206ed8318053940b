"""Pure state-dict converters between layouts (ours, diffusers, Stable Diffusion original, open_clip/transformers)."""
