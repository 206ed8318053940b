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
from open_clip.transformer import QuickGELU
from torch import Tensor, nn

from ldm.interop.io import StateDict
from ldm.interop.rename import rename

TEXT_PREFIX = "cond_stage_model."  # an SD file's text encoder
HF_PREFIX = "transformer."  # SD 1.x: transformers' CLIPTextModel, under TEXT_PREFIX
OPEN_CLIP_PREFIX = "model."  # SD 2.x: open_clip's CLIP without its image tower, under TEXT_PREFIX
CLIP_HEAD = ("text_projection", "logit_scale")  # CLIP's contrastive head: not part of a CLIPTextModel
HF_BUFFERS = ("embeddings.position_ids",)  # a buffer older transformers saved: 0..L-1, nothing to load
OPEN_CLIP_BUFFERS = ("attn_mask",)  # the causal mask, should an older open_clip have saved it: rebuilt, not loaded
BOS, EOS = 49406, 49407  # CLIP's start- and end-of-text token ids

_RENAMES = (  # (open_clip, transformers' CLIPTextModel without its "text_model." prefix)
    ("token_embedding.", "embeddings.token_embedding."),
    ("positional_embedding", "embeddings.position_embedding.weight"),
    ("transformer.resblocks.{i}.", "encoder.layers.{i}."),
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("attn.out_proj.", "self_attn.out_proj."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
    ("ln_final.", "final_layer_norm."),
)
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
    text = {k.removeprefix(TEXT_PREFIX): v for k, v in state_dict.items() if k.startswith(TEXT_PREFIX)}
    hf = {k.removeprefix(HF_PREFIX): v for k, v in text.items() if k.startswith(HF_PREFIX)}
    ours = {k.removeprefix(OPEN_CLIP_PREFIX): v for k, v in text.items()
            if k.startswith(OPEN_CLIP_PREFIX) and k.removeprefix(OPEN_CLIP_PREFIX) not in OPEN_CLIP_BUFFERS}
    other = {TEXT_PREFIX + k: v for k, v in text.items() if not k.startswith((HF_PREFIX, OPEN_CLIP_PREFIX))}
    return {**open_clip_from_hf(hf), **ours, **other}, bool(hf)


def text_state(clip: nn.Module) -> StateDict:
    """An open_clip model's text-tower state dict (everything but an image tower)."""
    return {k: v for k, v in clip.state_dict().items() if not k.startswith("visual.")}


def uses_quick_gelu(clip: nn.Module) -> bool:
    """Whether an open_clip text tower uses OpenAI's quick GELU (x * sigmoid(1.702 x))."""
    return isinstance(clip.transformer.resblocks[0].mlp.gelu, QuickGELU)


def hf_text_config(clip: nn.Module, layers: int) -> dict[str, object]:
    """``CLIPTextConfig`` arguments for the first ``layers`` blocks of an open_clip text tower."""
    block = clip.transformer.resblocks[0]
    return {
        "vocab_size": clip.token_embedding.num_embeddings,
        "hidden_size": clip.token_embedding.embedding_dim,
        "intermediate_size": block.mlp.c_fc.out_features,
        "num_hidden_layers": layers,
        "num_attention_heads": block.attn.num_heads,
        "max_position_embeddings": clip.positional_embedding.shape[0],
        "hidden_act": "quick_gelu" if uses_quick_gelu(clip) else "gelu",
        "layer_norm_eps": clip.ln_final.eps,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
    }
