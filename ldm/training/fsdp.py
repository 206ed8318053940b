"""Sharded training (FSDP): Lightning's strategy with its policies read off the model, and its checkpoints read back.

``BackboneFSDP`` (configs/trainer/fsdp.yaml) makes each repeated block of the model's backbone one FSDP unit,
from the classes the backbone declares in ``Backbone.block_types``, so no YAML names a layer class. With
``state_dict_type: sharded`` (the default here) a checkpoint is a folder written by torch.distributed.checkpoint,
each rank its own shards, plus Lightning's ``meta.pt``; ``load_sharded_checkpoint`` turns one back into the
dict a ``.ckpt`` file holds, which ``tools/export.py`` exports like any other checkpoint. The frozen parts (the codec's
VAE, frozen text encoders) stay out of FSDP, replicated on every rank. ``call_as_forward`` runs a sampling method
(image grids, sample metrics) as FSDP needs it run.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.strategies.fsdp import _is_sharded_checkpoint
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.strategies import FSDPStrategy, Strategy
from lightning.pytorch.strategies.strategy import _ForwardRedirection
from torch import nn
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
from torch.distributed.fsdp import (
    FullyShardedDataParallel,
    MixedPrecision,
    ShardingStrategy,
)
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from ldm.nn.frozen import is_frozen

MODEL_KEY = "model"  # where Lightning's sharded save puts the module's state dict (the rest goes to meta.pt)


def backbone_types(model: nn.Module) -> set[type[nn.Module]]:
    """The classes of ``model``'s submodules that declare ``block_types``: its backbones (see ``Backbone``).

    Read by that attribute, as this package sits below ``ldm.backbones``; a ValueError if there is none.
    """
    found = {type(m) for m in model.modules() if hasattr(type(m), "block_types")}
    if not found:
        raise ValueError(f"BackboneFSDP (configs/trainer/fsdp.yaml) shards a model's backbone blocks, but a "
                         f"{type(model).__name__} holds no Backbone (no module declares block_types)")
    return found


def block_types(model: nn.Module) -> set[type[nn.Module]]:
    """The repeated block classes that ``model``'s backbones declare."""
    return {block for backbone in backbone_types(model) for block in backbone.block_types}


def wrap_policy(model: nn.Module) -> ModuleWrapPolicy:
    """FSDP units: each backbone block, and each backbone whole (its embeddings and output layers).

    A backbone is its own unit so that the EMA's copy of it (``LatentDiffusion.ema``) is flattened and
    sharded exactly as the trained one: each rank's shards of both then hold the same elements, which
    ``EMA.update`` lerps pairwise. The rest that trains (a conditioner's tables) stays in the root unit; the frozen
    parts stay out of FSDP (``frozen_modules``).
    """
    return ModuleWrapPolicy(block_types(model) | backbone_types(model))


def checkpointing_policy(model: nn.Module) -> ModuleWrapPolicy:
    """Activation checkpointing: each backbone block recomputes its activations in the backward pass."""
    return ModuleWrapPolicy(block_types(model))


def frozen_modules(model: nn.Module) -> list[nn.Module]:
    """The largest submodules of ``model`` whose parameters all stay frozen (the codec's VAE, frozen text encoders).

    FSDP leaves them out (``ignored_states``): replicated on every rank, never trained, kept in their dtype, and
    free of FSDP's limits (it refuses scalar parameters, such as CLIP's ``logit_scale``). No backbone, nor any module
    in or around one, is one: the EMA's copy is frozen to the optimizer but updated, and sharded as the backbone is.
    """
    backbones = tuple(backbone_types(model))

    def largest(module: nn.Module) -> list[nn.Module]:
        if isinstance(module, backbones):
            return []
        if is_frozen(module) and not any(isinstance(m, backbones) for m in module.modules()):
            return [module]
        return [found for child in module.children() for found in largest(child)]

    return largest(model)


class BackboneFSDP(FSDPStrategy):
    """Lightning's FSDPStrategy with its wrap and activation-checkpointing policies built from the model.

    Parameters are gathered in the trainer precision's dtype (bf16 under ``bf16-mixed``), while gradients
    are reduced in ``reduce_dtype`` and buffers and the batch keep their dtypes: autocast then decides each
    operation's precision as it does under DDP (Lightning's default would cast all three to bf16). Pass
    Lightning's ``mixed_precision`` object (from Python) to set everything yourself. Use ``checkpoint_blocks``
    instead of a backbone's own ``gradient_checkpointing``. Any other FSDPStrategy option passes through.
    """

    def __init__(
        self,
        checkpoint_blocks: bool = False,  # recompute each backbone block's activations in the backward pass
        reduce_dtype: Literal["float32", "bfloat16", "float16"] = "float32",  # dtype of the gradient reductions
        state_dict_type: Literal["full", "sharded"] = "sharded",  # sharded: a checkpoint folder, each rank its shards
        **kwargs: Any,  # FSDPStrategy's other options (sharding_strategy, cpu_offload, ...)
    ) -> None:
        given = [k for k in ("auto_wrap_policy", "activation_checkpointing", "activation_checkpointing_policy",
                             "ignored_modules", "ignored_states") if kwargs.get(k)]
        if given:
            raise ValueError(f"BackboneFSDP builds its policies from the backbone's block_types and leaves out the "
                             f"frozen modules: drop {given} "
                             "(or use lightning.pytorch.strategies.FSDPStrategy)")
        super().__init__(state_dict_type=state_dict_type, **kwargs)
        self.checkpoint_blocks = checkpoint_blocks
        self.reduce_dtype = getattr(torch, reduce_dtype)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        """Read the policies and the frozen modules off the model, put those on this rank's device, then wrap it."""
        self.kwargs["auto_wrap_policy"] = wrap_policy(model)
        if self.checkpoint_blocks:
            self._activation_checkpointing_kwargs = {"auto_wrap_policy": checkpointing_policy(model)}
        self.kwargs["ignored_states"] = frozen = frozen_modules(model)
        for module in frozen:  # FSDP moves only the states it manages to its device
            module.to(self.root_device)
        return super()._setup_model(model)

    @property
    def mixed_precision_config(self) -> MixedPrecision | None:
        config = super().mixed_precision_config
        if self.mixed_precision is not None or config is None:
            return config
        return replace(config, reduce_dtype=self.reduce_dtype, buffer_dtype=None, cast_root_forward_inputs=False)


def sharded(strategy: Strategy) -> bool:
    """Whether ``strategy`` runs the model as FSDP units (its ``model`` the root unit)."""
    return isinstance(strategy.model, FullyShardedDataParallel)


def call_as_forward(strategy: Strategy, module: nn.Module, method: str, *args: Any) -> Any:
    """``module.<method>(*args)``; under FSDP as the root unit's forward in the precision's autocast, as Lightning runs
    a validation step: only there are the root's own parameters (a trained conditioner's) gathered, and autocast
    matches the units' bf16 parameters with the fp32 noise. Under FSDP every rank must call it, as often (each
    unit gathers its parameters collectively); under any other strategy it is a plain call.
    """
    if not sharded(strategy):
        return getattr(module, method)(*args)
    with strategy.precision_plugin.forward_context():
        return _ForwardRedirection()(strategy.model, module, method, *args)


def load_sharded_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A sharded FSDP checkpoint folder as the dict a Lightning ``.ckpt`` holds, without the optimizer states.

    The module's tensors come whole from torch.distributed.checkpoint's own reader, in this one process;
    everything else (epoch, callbacks, the codec fingerprint, ...) from Lightning's ``meta.pt``.
    """
    path = Path(path)
    if not _is_sharded_checkpoint(path):
        raise FileNotFoundError(f"{path}: not a sharded checkpoint folder (no {_METADATA_FILENAME} in it)")
    checkpoint = torch.load(path / _METADATA_FILENAME, map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = _load_state_dict_from_keys(MODEL_KEY, checkpoint_id=path)[MODEL_KEY]
    return checkpoint


def full_weights(model: nn.Module) -> AbstractContextManager:
    """Context in which rank zero's ``model`` (the module the strategy runs) holds its whole weights.

    Under FSDP (``model`` is the root unit) this is a collective: every rank must enter it, rank zero gets each
    unit's weights gathered (on the CPU where they are sharded), the others keep their shards. Any other model
    already holds its weights.
    """
    if not isinstance(model, FullyShardedDataParallel):
        return nullcontext()
    sharded = model.sharding_strategy != ShardingStrategy.NO_SHARD  # FSDP offloads only sharded units (1 GPU: none)
    return FullyShardedDataParallel.summon_full_params(model, writeback=False, rank0_only=True, offload_to_cpu=sharded)
