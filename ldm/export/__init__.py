"""Writers of whole models for other tools: diffusers folders and Stable Diffusion single files."""
