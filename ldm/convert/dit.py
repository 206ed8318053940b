"""Convert diffusers' class-conditional DiT weights into our DiT's (``ldm.diffusion.init_weights`` loads the files).

diffusers' ``DiTTransformer2DModel`` keeps a timestep + class embedder inside every block's
adaLN-Zero norm (``transformer_blocks.N.norm1.emb``) and its final layer reads block 0's. The
original DiT has one shared embedding, which diffusers' conversion copies into every block, so
we require the copies to be equal and keep one: the timestep MLP becomes ``time_embed`` and the
class table is returned for a ``ClassEmbedder`` whose output feeds our ``vector`` input, whose
projection is set to the identity.

Build the receiving model as diffusers computes it: ``DiT(C, C_out, None, width,
patch_size=p, width=width, depth=num_layers, num_heads=heads, pos_embed_base_size=sample_size // p,
time_freq_shift=1.0)``; diffusers' blocks use ``norm_eps`` (default 1e-5) on the MLP norm where
DiT uses 1e-6, a difference far below the model's precision.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

_SHARED_EMBED = re.compile(r"transformer_blocks\.(\d+)\.norm1\.emb\.(.+)")
_TOP_LEVEL = {  # diffusers prefix -> ours
    "pos_embed.proj.": "patch_embed.",
    "transformer_blocks.0.norm1.emb.timestep_embedder.": "time_embed.",
    "proj_out_1.": "final.modulation.",
    "proj_out_2.": "final.linear.",
}
_PER_BLOCK = {  # diffusers prefix inside transformer_blocks.N -> ours inside blocks.N
    "norm1.linear.": "modulation.",
    "attn1.to_q.": "attn.to_q.",
    "attn1.to_k.": "attn.to_k.",
    "attn1.to_v.": "attn.to_v.",
    "attn1.to_out.0.": "attn.to_out.",
    "ff.net.0.proj.": "mlp.proj_in.",
    "ff.net.2.": "mlp.proj_out.",
}
_CLASS_TABLE = "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"


def _rename(key: str) -> str | None:
    """Our name for a diffusers key, or None when it has none."""
    for old, new in _TOP_LEVEL.items():
        if key.startswith(old):
            return new + key[len(old):]
    block = re.match(r"transformer_blocks\.(\d+)\.(.+)", key)
    if block:
        for old, new in _PER_BLOCK.items():
            if block[2].startswith(old):
                return f"blocks.{block[1]}.{new}{block[2][len(old):]}"
    return None


def dit_from_diffusers(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
    """diffusers ``DiTTransformer2DModel`` weights -> (our DiT state dict, class table (classes + 1, D)).

    The table's last row is the null class used for classifier-free guidance.
    """
    if _CLASS_TABLE not in state_dict:
        raise KeyError(f"not a class-conditional diffusers DiT state dict: no {_CLASS_TABLE!r}")
    differing = []
    for key, value in state_dict.items():
        shared = _SHARED_EMBED.fullmatch(key)
        if shared and shared[1] != "0":
            reference = f"transformer_blocks.0.norm1.emb.{shared[2]}"
            if reference not in state_dict or not torch.equal(value, state_dict[reference]):
                differing.append(key)
    if differing:
        raise ValueError(
            "per-block timestep/class embedders differ from block 0's; our DiT shares one embedding: "
            + ", ".join(differing)
        )
    converted, unknown = {}, []
    for key, value in state_dict.items():
        new = _rename(key)
        if new is not None:
            converted[new] = value
        elif not _SHARED_EMBED.fullmatch(key):  # the class table is returned, the copies were checked
            unknown.append(key)
    if unknown:
        raise ValueError(f"diffusers DiT keys with no counterpart in our DiT: {', '.join(unknown)}")
    table = state_dict[_CLASS_TABLE]
    width = table.shape[1]
    converted["vector_embed.weight"] = torch.eye(width, dtype=table.dtype)
    converted["vector_embed.bias"] = torch.zeros(width, dtype=table.dtype)
    return converted, table
