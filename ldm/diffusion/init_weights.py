"""Initialise a stage-2 model's trainable parts, its backbone and conditioner, from one weights file.

The layout is told by the backbone's type and the file's keys:

- ours: a LatentDiffusion state dict or Lightning checkpoint (``backbone.*``, ``ema.module.*``, optionally
  ``conditioner.*``; ``codec.*`` and the rest are ignored), or a bare backbone state dict;
- diffusers' ``UNet2DConditionModel`` (Stable Diffusion 1.x / 2.x) into a ``UNet``;
- a Stable Diffusion 1.x / 2.x single file (``.ckpt``/``.safetensors``) into a ``UNet``: its
  ``model.diffusion_model.*``, the original layout; its autoencoder and text encoder load through their
  own options (``ldm.weights.sd``), and a key that belongs to no part is refused;
- diffusers' class-conditional ``DiTTransformer2DModel`` into a ``DiT``, its class table into the
  conditioner's one ``ClassEmbedder``.

Any of these image layouts also initialises the video backbone built on that image backbone (``VideoUNet``,
``VideoDiT``): the file's weights are its image weights, and its temporal layers (``temporal_names``), all
absent from the file, keep their initialisation, under which the video backbone is the image one frame by frame
(a ``VideoUNet`` over runs of frames, ``frame_patch`` > 1, through its ``inflate``: the image one on clips still
over each run).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping

from torch import Tensor, nn

from ldm.backbones.base import Backbone
from ldm.backbones.dit import DiT
from ldm.backbones.temporal import temporal_names
from ldm.backbones.unet import UNet
from ldm.conditioning.label import ClassEmbedder
from ldm.convert.dit import dit_from_diffusers
from ldm.convert.sd_unet import unet_from_sd
from ldm.convert.unet import unet_from_diffusers
from ldm.nn.frozen import frozen_names
from ldm.weights.io import StateDict, WeightsError, check_keys, read_state_dict, under
from ldm.weights.sd import UNET_PREFIX, unaccounted

Part = tuple[nn.Module, StateDict, str]  # (module, the weights it receives, its name in messages)
Foreign = Callable[[nn.Module, nn.Module, StateDict, str], list[Part]]  # (backbone, conditioner, file's state, path)
log = logging.getLogger(__name__)


def load_init_weights(backbone: Backbone, conditioner: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load ``path`` into ``backbone`` (and ``conditioner`` where the file has its part), strictly.

    From our own layout the backbone takes the EMA weights (``ema.module.*``) when the file has them,
    since those are the ones the model samples with, else the trained ``backbone.*`` ones. Other layouts
    go through the converter ``FOREIGN`` names for the backbone's class. A video backbone takes an image
    backbone's weights, its temporal layers left as they are (``_inflated``). Every part is checked before any
    is loaded; a mismatch raises a ``WeightsError`` naming the file.
    """
    path = os.fspath(path)
    state = read_state_dict(path)
    if any(k.startswith(("backbone.", "ema.module.")) for k in state):
        parts = _ours(backbone, conditioner, state)
    else:
        foreign = next((FOREIGN[c] for c in type(backbone).__mro__ if c in FOREIGN), _bare)
        parts = foreign(backbone, conditioner, state, path)
    parts = [(module, _inflated(module, weights, path) if module is backbone else weights, what)
             for module, weights, what in parts]
    for module, weights, what in parts:
        check_keys(weights, module.state_dict(), path, what)
    for module, weights, _ in parts:
        module.load_state_dict(weights)


def _inflated(backbone: Backbone, weights: StateDict, path: str) -> StateDict:
    """A video backbone's weights from a file without any of its temporal tensors (an image backbone's): those
    keep their initialisation. Other weights pass through the backbone's ``inflate`` (unchanged but for a
    multi-frame VideoUNet's conv_in and conv_out), and check_keys judges them as any others."""
    temporal = temporal_names(backbone)
    if not temporal or temporal & weights.keys():
        return weights
    log.info("%s: image backbone weights; the %d temporal tensors of this %s start at their initialisation",
             path, len(temporal), type(backbone).__name__)
    current = backbone.state_dict()
    return {**backbone.inflate(weights), **{k: current[k] for k in temporal}}


def _ours(backbone: nn.Module, conditioner: nn.Module, state: Mapping[str, Tensor]) -> list[Part]:
    """Backbone from the EMA (else the trained weights); conditioner from its keys, frozen parts kept."""
    prefix = "ema.module." if any(k.startswith("ema.module.") for k in state) else "backbone."
    parts = [(backbone, under(state, prefix), f"this {type(backbone).__name__} (the file's {prefix}* keys)")]
    trained = under(state, "conditioner.")
    if trained:  # a checkpoint leaves frozen parameters out (they load from their own files): keep ours
        current = conditioner.state_dict()
        parts.append((conditioner, {**{k: current[k] for k in frozen_names(conditioner)}, **trained}, "this conditioner"))
    return parts


def _bare(backbone: nn.Module, conditioner: nn.Module, state: StateDict, path: str) -> list[Part]:
    """A backbone's own state dict, as it is."""
    return [(backbone, state, f"this {type(backbone).__name__}")]


def _unet(backbone: nn.Module, conditioner: nn.Module, state: StateDict, path: str) -> list[Part]:
    """A Stable Diffusion single file's UNet (refusing keys of no part), else diffusers' (or our own names)."""
    if any(k.startswith(UNET_PREFIX) for k in state):
        weights = {**unet_from_sd(under(state, UNET_PREFIX), backbone.state_dict()), **unaccounted(state)}
        return [(backbone, weights, f"this {type(backbone).__name__} (the file's {UNET_PREFIX}*)")]
    return [(backbone, unet_from_diffusers(state), f"this {type(backbone).__name__}")]  # our own names pass unchanged


def _dit(backbone: nn.Module, conditioner: nn.Module, state: StateDict, path: str) -> list[Part]:
    """diffusers' class-conditional DiT: our DiT's weights and the class table for the conditioner's one
    ClassEmbedder; else a DiT state dict of ours."""
    if not any(k.startswith("transformer_blocks.") for k in state):
        return _bare(backbone, conditioner, state, path)
    try:
        weights, table = dit_from_diffusers(state)
    except (KeyError, ValueError) as error:
        raise WeightsError(f"{path}: {error.args[0]}") from error
    embedders = [m for m in conditioner.modules() if isinstance(m, ClassEmbedder)]
    if len(embedders) != 1:
        raise WeightsError(f"{path} holds a DiT class table ({table.shape[0] - 1} classes + null) for one "
                           f"ClassEmbedder, but the conditioner has {len(embedders)}")
    return [(backbone, _eps_rows(weights, backbone), "this DiT"),
            (embedders[0], {"embedding.weight": table}, "the conditioner's ClassEmbedder")]


def _eps_rows(weights: StateDict, backbone: DiT) -> StateDict:
    """Drop a learned variance: diffusers' DiT predicts 2C channels (eps first) where ours may predict C."""
    linear = weights["final.linear.weight"]  # (p*p*C_out, D), rows ordered (p, q, c)
    ours = backbone.final.linear.out_features
    if linear.shape[0] != 2 * ours:
        return weights
    patches = backbone.patch_size**2
    keep = {k: weights[k].unflatten(0, (patches, -1))[:, : ours // patches].flatten(0, 1)
            for k in ("final.linear.weight", "final.linear.bias")}  # the first C of each patch position's 2C
    return {**weights, **keep}


FOREIGN: dict[type[nn.Module], Foreign] = {  # backbone class -> reader of the other layouts it loads from
    UNet: _unet,  # Stable Diffusion single files, diffusers' UNet2DConditionModel
    DiT: _dit,  # diffusers' DiTTransformer2DModel (class-conditional)
}
