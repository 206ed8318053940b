"""CLIP text towers between open_clip's names and transformers' ``CLIPTextModel``, and inside SD files.

SD 1.x files hold OpenAI's CLIP ViT-L/14 text tower as a transformers ``CLIPTextModel``
(``cond_stage_model.transformer.text_model.*``): quick GELU, no projection head, q/k/v projections
stored apart where open_clip keeps one ``in_proj_weight``. SD 2.x files hold open_clip's ViT-H-14 in
open_clip's own names (``cond_stage_model.model.*``, the image tower removed). Both load into an
open_clip text tower; the conversion back writes either layout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

from ldm.weights.io import StateDict, under
from ldm.weights.rename import rename, table
from ldm.weights.sd import HF_PREFIX, OPEN_CLIP_PREFIX, TEXT_PREFIX

CLIP_HEAD = ("text_projection", "logit_scale")  # CLIP's contrastive head: not part of a CLIPTextModel
HF_BUFFERS = ("embeddings.position_ids",)  # a buffer older transformers saved: 0..L-1, nothing to load
OPEN_CLIP_BUFFERS = ("attn_mask",)  # the causal mask, should an older open_clip have saved it: rebuilt, not loaded
BOS, EOS = 49406, 49407  # CLIP's start- and end-of-text token ids

# (open_clip, transformers' CLIPTextModel without its "text_model." prefix)
_RENAMES = table("""
    token_embedding.            embeddings.token_embedding.
    positional_embedding        embeddings.position_embedding.weight
    transformer.resblocks.{i}.  encoder.layers.{i}.
    ln_1.                       layer_norm1.
    ln_2.                       layer_norm2.
    attn.out_proj.              self_attn.out_proj.
    mlp.c_fc.                   mlp.fc1.
    mlp.c_proj.                 mlp.fc2.
    ln_final.                   final_layer_norm.
""")
_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
_IN_PROJ = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)")
_LAYER = re.compile(r"transformer\.resblocks\.(\d+)\.")


def open_clip_from_hf(state_dict: Mapping[str, Tensor]) -> StateDict:
    """A ``CLIPTextModel`` state dict (with or without ``text_model.``) in open_clip's text-tower names.

    Its ``position_ids`` buffer is dropped; keys it does not know keep their names (for ``check_keys``).
    """
    out: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("text_model.")
        if key in HF_BUFFERS:
            continue
        if m := _QKV.fullmatch(key):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
        else:
            out[rename(key, _RENAMES, to_theirs=False)] = value
    for (layer, kind), parts in qkv.items():
        if parts.keys() == {"q", "k", "v"}:
            out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts[p] for p in "qkv"])  # (3W, ...)
        else:  # incomplete: left under the file's names, for check_keys to report
            out |= {f"encoder.layers.{layer}.self_attn.{p}_proj.{kind}": v for p, v in parts.items()}
    return out


def hf_from_open_clip(state_dict: Mapping[str, Tensor], layers: int) -> StateDict:
    """An open_clip text tower's first ``layers`` blocks as a ``CLIPTextModel`` state dict (``text_model.*``).

    CLIP's contrastive head (``CLIP_HEAD``) has no place there and is left out.
    """
    out: StateDict = {}
    for key, value in state_dict.items():
        if key in CLIP_HEAD or ((m := _LAYER.match(key)) and int(m[1]) >= layers):
            continue
        if m := _IN_PROJ.fullmatch(key):
            for part, tensor in zip("qkv", value.chunk(3)):  # (3W, ...) -> 3 x (W, ...)
                out[f"text_model.encoder.layers.{m[1]}.self_attn.{part}_proj.{m[2]}"] = tensor
        else:
            out["text_model." + rename(key, _RENAMES, to_theirs=True)] = value
    return out


def text_from_sd(state_dict: Mapping[str, Tensor]) -> tuple[StateDict, bool]:
    """The open_clip text-tower weights of an SD file's ``cond_stage_model.*``, and whether they are SD 1.x's.

    SD 1.x's tower is OpenAI's CLIP ViT-L/14 (quick GELU, no ``CLIP_HEAD``). Saved buffers are dropped
    (``HF_BUFFERS``, ``OPEN_CLIP_BUFFERS``); keys under neither SD layout keep their full names, for
    ``check_keys`` to report.
    """
    text = under(state_dict, TEXT_PREFIX)
    hf = under(text, HF_PREFIX)
    ours = {k: v for k, v in under(text, OPEN_CLIP_PREFIX).items() if k not in OPEN_CLIP_BUFFERS}
    other = {TEXT_PREFIX + k: v for k, v in text.items() if not k.startswith((HF_PREFIX, OPEN_CLIP_PREFIX))}
    return {**open_clip_from_hf(hf), **ours, **other}, bool(hf)
