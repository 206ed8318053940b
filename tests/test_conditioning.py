"""Conditioner and embedders: dims, null values, CFG dropout, frozen offline OpenCLIP, CLI parsing."""

import jsonargparse
import open_clip
import pytest
import torch

from ldm.conditioning.conditioner import Conditioner
from ldm.conditioning.label import ClassEmbedder
from ldm.conditioning.open_clip import OpenCLIP
from ldm.conditioning.scalars import ScalarEmbedder
from ldm.conditioning.size import SizeEmbedder
from ldm.conditioning.spatial import SpatialEmbedder
from ldm.conditioning.text import OpenCLIPTextEmbedder
from ldm.nn.layers import timestep_embedding
from ldm.weights.io import WeightsUnavailable
from tests.tiny_clip import register_tiny_clip

LATENT = (4, 4)
TINY_TEXT = {"width": 32, "layers": 2, "heads": 2, "context_length": 8}
TINY = dict(clip=OpenCLIP("ViT-H-14", random_init=True, text_cfg=TINY_TEXT))


@pytest.fixture
def text(offline):
    return OpenCLIPTextEmbedder(**TINY)


def labels(n: int) -> dict:
    return {"label": torch.arange(n) % 4}


def test_class_embedder_null_is_last_row():
    emb = ClassEmbedder(num_classes=4, dim=8)
    out = emb(labels(6), LATENT)
    assert (emb.kind, emb.dim, emb.keys) == ("vector", 8, ("label",))
    assert torch.equal(out, emb.embedding.weight[torch.arange(6) % 4])
    assert torch.equal(emb.null(labels(6), LATENT), emb.embedding.weight[4].expand(6, 8))


def test_dropout_rate_and_dropped_rows_equal_null():
    cond = Conditioner([ClassEmbedder(num_classes=4, dim=8, drop_rate=0.3)])
    batch = labels(20000)
    out = cond(batch, LATENT, drop=True, generator=torch.Generator().manual_seed(0)).vector
    null = cond.embedders[0].null(batch, LATENT)
    kept = cond(batch, LATENT, drop=False).vector
    dropped = (out == null).all(1)
    assert torch.equal(out[~dropped], kept[~dropped])  # every row is exactly its value or the null
    assert abs(dropped.float().mean().item() - 0.3) < 0.02
    assert torch.equal(cond.train()(batch, LATENT, drop=False).vector, kept)  # drop=False never drops


def test_drop_follows_training_mode_and_generator():
    cond = Conditioner([ClassEmbedder(num_classes=4, dim=8, drop_rate=0.5)])
    batch = labels(64)
    clean = cond(batch, LATENT, drop=False).vector
    assert torch.equal(cond.eval()(batch, LATENT).vector, clean)
    first = cond.train()(batch, LATENT, generator=torch.Generator().manual_seed(1)).vector
    assert not torch.equal(first, clean)
    assert torch.equal(cond(batch, LATENT, generator=torch.Generator().manual_seed(1)).vector, first)


def test_embedders_drop_independently():
    a, b = ClassEmbedder(4, 8, drop_rate=0.5), ClassEmbedder(4, 8, drop_rate=0.5)
    batch = labels(4000)
    out = Conditioner([a, b])(batch, LATENT, drop=True, generator=torch.Generator().manual_seed(0)).vector
    drop_a = (out[:, :8] == a.null(batch, LATENT)).all(1)
    drop_b = (out[:, 8:] == b.null(batch, LATENT)).all(1)
    assert abs((drop_a & drop_b).float().mean().item() - 0.25) < 0.03


def test_merge_two_vectors_and_dims():
    a, b = ClassEmbedder(4, 8), SizeEmbedder(features_per_value=4, image_size=32)
    spatial = SpatialEmbedder(num_classes=3)
    cond = Conditioner([a, b, spatial])
    batch = {**labels(2), "original_size": torch.tensor([[40, 50], [32, 32]]), "crop_coords": torch.zeros(2, 2),
             "seg": torch.zeros(2, 1, 16, 16, dtype=torch.long)}
    out = cond(batch, LATENT, drop=False)
    assert (cond.context_dim, cond.vector_dim, cond.concat_channels) == (None, 8 + 24, 3)
    assert out.crossattn is None and out.concat.shape == (2, 3, *LATENT)
    assert torch.equal(out.vector, torch.cat([a(batch, LATENT), b(batch, LATENT)], 1))
    uncond = cond.unconditional(batch, LATENT)
    assert torch.equal(uncond.vector[:, :8], a.null(batch, LATENT)) and not uncond.vector[:, 8:].any()
    assert Conditioner([]).concat_channels == 0 and Conditioner([]).vector_dim is None


def test_size_embedder_features_and_default_target():
    emb = SizeEmbedder(features_per_value=6, image_size=64)
    batch = {"original_size": torch.tensor([[100, 80]]), "crop_coords": torch.tensor([[3, 5]])}
    out = emb(batch, LATENT)
    assert emb.dim == 36 and out.shape == (1, 36)
    expected = timestep_embedding(torch.tensor([100.0, 80, 3, 5, 64, 64]), 6).reshape(1, 36)
    assert torch.allclose(out, expected)
    assert torch.equal(emb(batch | {"target_size": torch.tensor([[64, 64]])}, LATENT), out)
    assert torch.equal(emb.null(batch, LATENT), torch.zeros(1, 36))
    with pytest.raises(KeyError, match="target_size"):
        SizeEmbedder()(batch, LATENT)


def test_scalar_embedder_features_defaults_and_refusal():
    """A clip's fps (and its source's frame count) as Fourier features; a request without them takes the defaults."""
    emb = ScalarEmbedder(keys=("fps", "num_frames"), defaults={"fps": 8.0}, features_per_value=6)
    batch = {"fps": torch.tensor([8.0, 4.0]), "num_frames": torch.tensor([16, 30])}
    out = emb(batch, LATENT)
    assert emb.dim == 12 and emb.kind == "vector" and out.shape == (2, 12)
    expected = timestep_embedding(torch.tensor([8.0, 16, 4, 30]), 6).reshape(2, 12)
    assert torch.allclose(out, expected) and not torch.allclose(out[0], out[1])
    request = {"caption": ["a", "b"], "num_frames": torch.tensor([16, 30])}  # no fps: the default, 8
    assert torch.equal(emb(request, LATENT)[0], out[0]) and torch.equal(emb(request, LATENT)[1, :6], out[0, :6])
    assert torch.equal(emb.null(batch, LATENT), torch.zeros(2, 12))
    with pytest.raises(KeyError, match=r"reads 'num_frames', which the batch lacks.*defaults"):
        emb({"caption": ["a"]}, LATENT)


def test_spatial_class_map_one_hot_nearest():
    emb = SpatialEmbedder(key="seg", num_classes=3)
    seg = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    seg[..., :4] = 2  # left half class 2, right half class 0
    out = emb({"seg": seg}, (2, 2))
    assert (emb.kind, emb.dim) == ("concat", 3) and out.shape == (1, 3, 2, 2)
    assert torch.equal(out[0, :, 0], torch.tensor([[0.0, 1], [0, 0], [1, 0]]))
    assert torch.equal(emb({"seg": seg[:, 0]}, (2, 2)), out)  # (B, H, W) reads the same
    encoded = seg.float() / 127.5 - 1  # a uint8 PNG scaled to [-1, 1]
    assert torch.equal(SpatialEmbedder(num_classes=3, from_uint8=True)({"seg": encoded}, (2, 2)), out)
    assert torch.equal(emb.null({"seg": seg}, (2, 2)), torch.zeros(1, 3, 2, 2))


def test_spatial_float_map_resized_and_checked():
    emb = SpatialEmbedder(key="low", channels=3)
    image = torch.full((2, 3, 16, 16), 0.5)
    image[..., 8:] = -0.5  # right half darker
    out = emb({"low": image}, LATENT)
    assert out.shape == (2, 3, *LATENT)
    assert torch.allclose(out[..., 0], torch.tensor(0.5)) and torch.allclose(out[..., -1], torch.tensor(-0.5))
    assert torch.allclose(out, out[:, :, :1].expand_as(out))  # rows stay identical
    with pytest.raises(ValueError, match="channels"):
        emb({"low": image[:, :1]}, LATENT)
    with pytest.raises(ValueError, match="exactly one"):
        SpatialEmbedder(num_classes=3, channels=3)


def test_text_tokens_null_and_frozen(text):
    batch = {"caption": ["a red cube", "two blue spheres", ""]}
    out = text(batch, LATENT)
    assert (text.kind, text.dim) == ("crossattn", 32) and out.shape == (3, 8, 32)
    assert torch.allclose(text.null(batch, LATENT), out[2:].expand(3, 8, 32), atol=1e-5)  # null = embedding of ""
    assert not torch.equal(out[0], out[2])
    assert all(not p.requires_grad for p in text.parameters())
    text.train()
    assert text.training and not text.clip.training and not any(m.training for m in text.clip.modules())
    assert not text(batch, LATENT).requires_grad


def test_text_random_init_is_seeded(offline):
    batch = {"caption": ["a cat"]}
    state = torch.get_rng_state()
    a, b = OpenCLIPTextEmbedder(**TINY)(batch, LATENT), OpenCLIPTextEmbedder(**TINY)(batch, LATENT)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert torch.equal(a, b)
    assert not torch.allclose(OpenCLIPTextEmbedder(clip=OpenCLIP("ViT-H-14", random_init=True, seed=1, text_cfg=TINY_TEXT))(batch, LATENT), a)


def test_text_layer_and_pooled(offline):
    batch = {"caption": ["a cat", "a dog"]}
    last = OpenCLIPTextEmbedder(**TINY, layer="last")
    penultimate = OpenCLIPTextEmbedder(**TINY)
    assert not torch.allclose(last(batch, LATENT), penultimate(batch, LATENT))
    pooled = OpenCLIPTextEmbedder(**TINY, output="pooled")
    assert (pooled.kind, pooled.dim) == ("vector", 1024)  # ViT-H-14's embed_dim
    assert torch.equal(pooled(batch, LATENT), pooled.clip.encode_text(pooled.tokenizer(batch["caption"])))
    assert pooled.null(batch, LATENT).shape == (2, 1024)


def test_text_loads_local_weights_file(offline, tmp_path):
    register_tiny_clip(tmp_path, "ldm-test-tiny", text={"context_length": 8, "layers": 2},
                       vision={"width": 8, "head_width": 8, "patch_size": 1, "image_size": 1})
    reference = open_clip.create_model("ldm-test-tiny")
    torch.save(reference.state_dict(), tmp_path / "weights.pt")
    emb = OpenCLIPTextEmbedder(clip=OpenCLIP("ldm-test-tiny", str(tmp_path / "weights.pt")), output="pooled")
    assert not hasattr(emb.clip, "visual")
    assert torch.equal(emb({"caption": ["a cat"]}, LATENT), reference.encode_text(emb.tokenizer(["a cat"])))


def test_text_requires_weights_or_explicit_random_init():
    with pytest.raises(WeightsUnavailable, match="none named; set clip.pretrained of OpenCLIPTextEmbedder"):
        OpenCLIPTextEmbedder(clip=OpenCLIP(pretrained=None))
    with pytest.raises(ValueError, match="random_init"):
        OpenCLIPTextEmbedder(clip=OpenCLIP(pretrained="some.safetensors", text_cfg={"width": 32}))


def test_conditioner_text_and_token_length_mismatch(text):
    other = OpenCLIPTextEmbedder(clip=OpenCLIP("ViT-H-14", random_init=True, text_cfg={**TINY_TEXT, "context_length": 6}))
    batch = {"caption": ["a", "b"], **labels(2)}
    cond = Conditioner([text, OpenCLIPTextEmbedder(**TINY, layer="last"), ClassEmbedder(4, 8)])
    out = cond(batch, LATENT, drop=False)
    assert cond.context_dim == 64 and out.crossattn.shape == (2, 8, 64) and out.vector.shape == (2, 8)
    with pytest.raises(ValueError, match="6 tokens"):
        Conditioner([text, other])(batch, LATENT)


def test_jsonargparse_builds_conditioner():
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--c", type=Conditioner)
    cfg = parser.parse_string(
        "c:\n"
        "  embedders:\n"
        "    - class_path: ldm.conditioning.label.ClassEmbedder\n"
        "      init_args: {num_classes: 4, dim: 8}\n"
        "    - class_path: ldm.conditioning.spatial.SpatialEmbedder\n"
        "      init_args: {channels: 3, key: low}\n"
        "    - class_path: ldm.conditioning.size.SizeEmbedder\n"
        "      init_args: {keys: [original_size], features_per_value: 4}\n"
    )
    cond = parser.instantiate(cfg).c
    assert isinstance(cond, Conditioner) and isinstance(cond.embedders[0], ClassEmbedder)
    assert (cond.vector_dim, cond.concat_channels) == (8 + 8, 3)
    assert cond.embedders[2].keys == ("original_size",)
