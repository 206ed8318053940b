"""Video backbones: shapes on any T x h x w, inflation from an image backbone (frame-by-frame equality, weights
files), temporal mixing, gradients, and the video configs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from safetensors.torch import save_file

from ldm.backbones.base import Backbone
from ldm.backbones.dit import DiT
from ldm.backbones.temporal import TemporalDiTBlock, TemporalLayer, TemporalTransformer, temporal_names
from ldm.backbones.unet import UNet
from ldm.backbones.video_dit import JointVideoDiT, VideoDiT
from ldm.backbones.video_unet import VideoUNet
from ldm.conditioning.conditioner import Conditioner
from ldm.convert.sd_unet import unet_to_sd
from ldm.diffusion.init_weights import load_init_weights
from ldm.training.speed import speed_up
from ldm.weights.io import WeightsError
from ldm.weights.sd import UNET_PREFIX
from tests.backbones import randomize

CONFIGS = Path(__file__).parents[1] / "configs" / "backbone"
pytestmark = pytest.mark.usefixtures("one_thread")
CONTEXT_DIM, VECTOR_DIM = 12, 10
# kind -> (video class, image class, the knobs of the tiny config they share)
KINDS = {kind: (video, image, yaml.safe_load((CONFIGS / f"video-{kind}-tiny.yaml").read_text())["init_args"])
         for kind, video, image in (("unet", VideoUNet, UNet), ("dit", VideoDiT, DiT))}


def build(kind: str, video: bool, context: bool = True, vector: bool = True) -> torch.nn.Module:
    video_class, image_class, knobs = KINDS[kind]
    return (video_class if video else image_class)(4, 4, CONTEXT_DIM if context else None,
                                                    VECTOR_DIM if vector else None, **knobs)


def clip_inputs(batch: int = 2, frames: int = 8, height: int = 8, width: int = 8, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, 4, frames, height, width, generator=generator),
            "t": torch.rand(batch, generator=generator) * 1000,
            "context": torch.randn(batch, 5, CONTEXT_DIM, generator=generator),
            "vector": torch.randn(batch, VECTOR_DIM, generator=generator)}


def temporal_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    names = temporal_names(model)
    return {k: p for k, p in model.named_parameters() if k in names}


@pytest.fixture(scope="module", params=list(KINDS))
def inflated(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """(kind, image backbone with random weights, video backbone initialised from its safetensors export, export)."""
    torch.manual_seed(0)
    image = randomize(build(request.param, video=False)).eval()
    path = tmp_path_factory.mktemp("export") / "image.safetensors"
    save_file({k: v.contiguous() for k, v in image.state_dict().items()}, path)
    video = build(request.param, video=True).eval()
    load_init_weights(video, Conditioner([]), path)
    return request.param, image, video, path


@pytest.mark.parametrize("kind", list(KINDS))
def test_output_shape_for_any_frames_and_sides(kind):
    model = build(kind, video=True).eval()
    assert isinstance(model, Backbone) and model.size_multiple == 2
    with torch.no_grad():
        for frames, height, width in [(1, 8, 8), (5, 8, 12), (11, 12, 4)]:  # the other tests use 3, 4, 6, 8 frames
            assert model(**clip_inputs(1, frames, height, width)).shape == (1, 4, frames, height, width)


@pytest.mark.parametrize("kind", list(KINDS))
def test_without_context_and_vector_and_refusals(kind):
    model = build(kind, video=True, context=False, vector=False)
    batch = clip_inputs(1, 3)
    assert model(batch["x"], batch["t"]).shape == (1, 4, 3, 8, 8)
    with pytest.raises(ValueError, match=r"takes latent clips \(B, C, T, H, W\), got shape \(1, 4, 8, 8\)"):
        model(batch["x"][:, :, 0], batch["t"])
    with pytest.raises(ValueError, match="context"):
        model(batch["x"], batch["t"], batch["context"])


def test_video_state_dict_is_the_image_one_plus_temporal_tensors(inflated):
    kind, image, video, _ = inflated
    temporal = temporal_names(video)
    assert set(video.state_dict()) - temporal == set(image.state_dict())
    assert temporal and all(".temporal." in k for k in temporal)


def test_inflated_video_backbone_is_the_image_backbone_frame_by_frame(inflated):
    kind, image, video, _ = inflated
    batch = clip_inputs(2, 4, 8, 12)
    with torch.no_grad():
        got = video(**batch)
        frames = [image(batch["x"][:, :, i], batch["t"], batch["context"], batch["vector"]) for i in range(4)]
        expected = torch.stack(frames, dim=2)  # (B, C, T, H, W)
        assert expected.abs().mean() > 1e-2  # random image weights: not a comparison of zeros
        torch.testing.assert_close(got, expected, atol=1e-5 * expected.abs().max(), rtol=1e-5)
        perturbed = build(kind, video=True).eval()
        perturbed.load_state_dict(video.state_dict())
        for param in temporal_parameters(perturbed).values():
            param.add_(torch.randn_like(param) * 0.05)
        assert not torch.allclose(perturbed(**batch), expected, atol=1e-3)  # the temporal layers are in the path


def test_temporal_layers_mix_frames_in_order(inflated):
    kind, image, video, _ = inflated
    batch = clip_inputs(1, 6, 8, 8)
    changed = {**batch, "x": batch["x"].clone()}
    changed["x"][:, :, 0] += 1.0
    reversed_ = {**batch, "x": batch["x"].flip(2)}
    trained = build(kind, video=True).eval()
    trained.load_state_dict(video.state_dict())
    with torch.no_grad():
        for param in temporal_parameters(trained).values():  # as after training: every temporal weight non-zero
            param.copy_(torch.randn_like(param) * 0.2)
        assert torch.equal(video(**changed)[:, :, 5], video(**batch)[:, :, 5])  # at init: each frame on its own
        out = trained(**batch)
        assert not torch.allclose(trained(**changed)[:, :, 5], out[:, :, 5], atol=1e-4)  # frame 0 reaches frame 5
        # frame positions: the reversed clip does not give the reversed output
        assert not torch.allclose(trained(**reversed_).flip(2), out, atol=1e-4)


@pytest.mark.parametrize("inflated", ["dit"], indirect=True)  # the UNet's temporal convolutions pad with zeros
def test_video_dit_frame_positions_reach_the_residual_stream(inflated):
    """Opening only the frame gates (every other temporal tensor at its zero start) makes a clip of one frame
    repeated come out different at each frame: the spatial layers see which frame they draw."""
    kind, image, video, _ = inflated
    batch = clip_inputs(1, 4)
    batch["x"] = batch["x"][:, :, :1].expand(-1, -1, 4, -1, -1)
    gated = build(kind, video=True).eval()
    gated.load_state_dict(video.state_dict())
    with torch.no_grad():
        closed = video(**batch)
        assert torch.equal(closed[:, :, 0], closed[:, :, 3])
        gates = [p for k, p in gated.named_parameters() if k.endswith(".frame_gate")]
        assert len(gates) == len(gated.blocks)
        for gate in gates:
            gate.fill_(1.0)
        out = gated(**batch)
        assert not torch.allclose(out[:, :, 0], out[:, :, 3], atol=1e-4)


def test_temporal_attention_reads_the_text(inflated):
    """What moves where is in the caption (SVD's temporal blocks): each temporal attention changes with the
    context alone, with the frames it mixes held fixed."""
    kind, _, video, _ = inflated
    trained = build(kind, video=True).eval()
    trained.load_state_dict(video.state_dict())
    attentions = [m for m in trained.modules() if isinstance(m, (TemporalTransformer, TemporalDiTBlock))]
    calls = []
    hooks = [m.register_forward_pre_hook(lambda m, args: calls.append((m, args))) for m in attentions]
    with torch.no_grad():
        for param in temporal_parameters(trained).values():  # as after training: every temporal weight non-zero
            param.copy_(torch.randn_like(param) * 0.2)
        trained(**clip_inputs(1, 4))
        for hook in hooks:
            hook.remove()
        assert len(calls) == len(attentions) > 0
        for module, args in calls:
            context = [i for i, a in enumerate(args) if a is not None and a.ndim == 3 and a.shape[-1] == CONTEXT_DIM]
            assert len(context) == 1, f"{type(module).__name__} is not given the text"
            other = list(args)
            other[context[0]] = torch.randn_like(args[context[0]])
            assert not torch.allclose(module(*other), module(*args), atol=1e-4)


def test_gradients_reach_the_temporal_layers(inflated):
    kind, image, video, _ = inflated
    model = build(kind, video=True)
    model.load_state_dict(video.state_dict())
    model(**clip_inputs(1, 4)).square().mean().backward()
    grads = {k: p.grad for k, p in temporal_parameters(model).items()}
    assert all(g is not None for g in grads.values())
    layers = {name for name, m in model.named_modules() if isinstance(m, TemporalLayer)}
    for layer in layers:  # at init only a layer's zeroed output map has a gradient; it is non-zero in each
        assert any(g.abs().sum() > 0 for k, g in grads.items() if k.startswith(f"{layer}.")), layer


def test_gradient_checkpointing_gives_the_same_gradients(inflated):
    kind, image, video, _ = inflated
    grads = []
    for checkpointing in (False, True):
        model = build(kind, video=True)
        model.load_state_dict(video.state_dict())
        model.gradient_checkpointing = checkpointing
        model.train()
        model(**clip_inputs(1, 3)).square().mean().backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    for k, g in grads[0].items():
        torch.testing.assert_close(grads[1][k], g, atol=1e-6, rtol=1e-5)


def test_every_temporal_tensor_sits_in_a_declared_block(inflated):
    """FSDP makes each block_types module one unit: the temporal layers go with their spatial layer."""
    kind, image, video, _ = inflated
    blocks = [name for name, m in video.named_modules() if isinstance(m, type(video).block_types)]
    assert all(any(k.startswith(f"{b}.") for b in blocks) for k in temporal_names(video))


def test_image_export_loads_into_the_video_backbone(inflated, tmp_path, caplog):
    kind, image, video, path = inflated
    fresh = build(kind, video=True)
    start = {k: v.clone() for k, v in fresh.state_dict().items()}
    stage2 = tmp_path / "stage2.safetensors"  # our export's layout: the EMA backbone under backbone.*
    save_file({f"backbone.{k}": v.contiguous() for k, v in image.state_dict().items()}, stage2)
    with caplog.at_level(logging.INFO, logger="ldm.diffusion.init_weights"):
        load_init_weights(fresh, Conditioner([]), stage2)
    temporal = temporal_names(fresh)
    assert [r.getMessage() for r in caplog.records] == [
        f"{stage2}: image backbone weights; the {len(temporal)} temporal tensors of this {type(fresh).__name__} "
        "start at their initialisation"]
    loaded = fresh.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in image.state_dict().items())
    assert all(torch.equal(loaded[k], start[k]) for k in temporal)
    # a video backbone's own weights (temporal tensors included) load as they are, without that line
    caplog.clear()
    video_file = tmp_path / "video.safetensors"
    save_file({k: torch.randn_like(v) for k, v in loaded.items()}, video_file)
    load_init_weights(fresh, Conditioner([]), video_file)
    assert not caplog.records and not torch.equal(fresh.state_dict()[min(temporal)], start[min(temporal)])


def test_anything_but_the_temporal_tensors_missing_or_extra_is_refused(inflated, tmp_path):
    kind, image, video, path = inflated
    state = {k: v.contiguous() for k, v in image.state_dict().items()}
    first = min(state)
    broken = {**{k: v for k, v in state.items() if k != first}, "extra.weight": torch.zeros(1)}
    save_file(broken, tmp_path / "broken.safetensors")
    with pytest.raises(WeightsError, match=rf"broken\.safetensors does not fit this {type(video).__name__}; "
                                           rf"missing keys: {first}; unexpected keys: extra\.weight"):
        load_init_weights(build(kind, video=True), Conditioner([]), tmp_path / "broken.safetensors")
    partly = min(temporal_names(video))
    save_file({**state, partly: video.state_dict()[partly].contiguous()}, tmp_path / "partly.safetensors")
    with pytest.raises(WeightsError, match=r"partly\.safetensors does not fit .*missing keys: .*temporal"):
        load_init_weights(build(kind, video=True), Conditioner([]), tmp_path / "partly.safetensors")


@pytest.mark.parametrize("inflated", ["unet"], indirect=True)
def test_a_stable_diffusion_unet_inflates_into_the_video_unet(inflated, tmp_path):
    """AnimateDiff's start: an SD single file's UNet, its temporal layers fresh."""
    kind, image, video, _ = inflated
    sd = {UNET_PREFIX + k: v.contiguous() for k, v in unet_to_sd(image.state_dict(), linear_projections=False).items()}
    save_file(sd, tmp_path / "sd.safetensors")
    fresh = build(kind, video=True)
    load_init_weights(fresh, Conditioner([]), tmp_path / "sd.safetensors")
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in image.state_dict().items())


@pytest.mark.parametrize("inflated", ["unet"], indirect=True)
def test_channels_last_video_unet_gives_the_same_output(inflated):
    kind, image, video, _ = inflated
    fast = build(kind, video=True).eval()
    fast.load_state_dict(video.state_dict())
    speed_up(fast, channels_last=True)
    batch = clip_inputs(1, 3)
    with torch.no_grad():
        torch.testing.assert_close(fast(**batch), video(**batch), atol=1e-5, rtol=1e-4)


def joint(context: bool = True, vector: bool = True) -> JointVideoDiT:
    return JointVideoDiT(4, 4, CONTEXT_DIM if context else None, VECTOR_DIM if vector else None, **KINDS["dit"][2])


def test_joint_video_dit_any_clip_size_and_refusals():
    model = randomize(joint()).eval()
    with torch.no_grad():
        for frames, height, width in [(1, 8, 8), (5, 8, 12), (11, 12, 4)]:
            assert model(**clip_inputs(1, frames, height, width)).shape == (1, 4, frames, height, width)
    batch = clip_inputs(1, 3)
    with pytest.raises(ValueError, match=r"takes latent clips \(B, C, T, H, W\), got shape \(1, 4, 8, 8\)"):
        model(batch["x"][:, :, 0], batch["t"], batch["context"], batch["vector"])
    assert joint(context=False, vector=False)(batch["x"], batch["t"]).shape == (1, 4, 3, 8, 8)


@pytest.mark.parametrize("inflated", ["dit"], indirect=True)  # its image DiT export
def test_joint_video_dit_attends_across_frames_and_positions_in_one_block(inflated):
    """One block: a change at frame 0, column 0 reaches frame 5, the far column (factorised attention needs its
    spatial and its temporal layer for that); a reversed clip does not give the reversed output (rotary frame
    positions); an image DiT's export loads into it strictly, as it has the same tensors."""
    torch.manual_seed(0)
    model = JointVideoDiT(4, 4, CONTEXT_DIM, VECTOR_DIM, **{**KINDS["dit"][2], "depth": 1}).eval()
    with torch.no_grad():  # its own initialisation, the zeroed layers opened: attention that is not one-hot
        for param in model.parameters():
            if not param.any():
                param.normal_(0, 0.1)
    batch = clip_inputs(1, 6, 8, 8)
    changed = {**batch, "x": batch["x"].clone()}
    changed["x"][:, :, 0, :2, :2] += 1.0  # the first token of the first frame
    with torch.no_grad():
        out = model(**batch)
        assert not torch.allclose(model(**changed)[:, :, 5, :2, -2:], out[:, :, 5, :2, -2:], atol=1e-4)
        assert not torch.allclose(model(**{**batch, "x": batch["x"].flip(2)}).flip(2), out, atol=1e-4)
    _, image, _, path = inflated
    video = joint()
    load_init_weights(video, Conditioner([]), path)
    expected = image.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in video.state_dict().items())


@pytest.mark.parametrize("inflated", ["dit"], indirect=True)  # its image DiT export
@pytest.mark.parametrize("video_class", [VideoDiT, JointVideoDiT])
def test_frame_patch_tokens_cover_consecutive_frames(video_class, inflated):
    """frame_patch 2: each token embeds and unembeds two consecutive frames (a tubelet). With every block the
    identity (adaLN-Zero at init) and the output layer opened, frame 1's output reads frame 0 and not frame 2,
    where one-frame tokens read frame 1 alone; a clip not divisible into tubelets is refused, and an image DiT's
    export (one-frame patches) is refused by name."""
    def opened(frame_patch: int) -> VideoDiT:
        model = video_class(4, 4, CONTEXT_DIM, VECTOR_DIM, frame_patch=frame_patch, **KINDS["dit"][2]).eval()
        with torch.no_grad():
            for layer in (model.final.modulation, model.final.linear):
                layer.weight.normal_(0, 0.1)
        return model

    batch = clip_inputs(2, 6, 8, 12)
    frame0, frame2 = ({**batch, "x": batch["x"].clone()} for _ in range(2))
    frame0["x"][:, :, 0] += 1.0
    frame2["x"][:, :, 2] += 1.0
    with torch.no_grad():
        for frame_patch, reads_frame0 in ((2, True), (1, False)):
            model = opened(frame_patch)
            out = model(**batch)[:, :, 1]
            assert out.shape == (2, 4, 8, 12) and out.abs().mean() > 1e-3
            assert torch.allclose(model(**frame0)[:, :, 1], out, atol=1e-6) != reads_frame0
            torch.testing.assert_close(model(**frame2)[:, :, 1], out)
        tubelets = opened(2)
        with pytest.raises(ValueError, match="clip of 5 frames is not divisible by frame_patch 2"):
            tubelets(**clip_inputs(1, 5))
    with pytest.raises(ValueError, match="frame_patch must be at least 1"):
        video_class(4, 4, None, None, frame_patch=0)
    with pytest.raises(WeightsError, match="patch_embed.weight"):
        load_init_weights(tubelets, Conditioner([]), inflated[3])


@pytest.mark.parametrize("inflated", ["unet"], indirect=True)  # its image UNet export
def test_unet_frame_patch_inflates_to_the_image_unet_on_clips_still_over_each_pair(inflated):
    """frame_patch 2: each of the UNet's feature maps covers two consecutive frames. Its image UNet's export
    inflates it (I3D: conv_in's weights split over the two frames, conv_out's tiled), so a clip that stands still
    over each pair of frames gets the image model's prediction on every frame; with the temporal layers at their
    identity start, frame 1 reads frame 0 (its pair) and not frame 2, and a pair played backwards is not the same
    pair (conv_in's differences between frames do not start at zero); a clip of an odd frame count is refused."""
    _, image, _, path = inflated
    video = VideoUNet(4, 4, CONTEXT_DIM, VECTOR_DIM, frame_patch=2, **KINDS["unet"][2]).eval()
    load_init_weights(video, Conditioner([]), path)
    batch = clip_inputs(2, 3, 8, 12)
    still_pairs = {**batch, "x": batch["x"].repeat_interleave(2, dim=2)}  # frames 0 = 1, 2 = 3, 4 = 5
    frame0, frame2 = ({**still_pairs, "x": still_pairs["x"].clone()} for _ in range(2))
    frame0["x"][:, :, 0] += 1.0
    frame2["x"][:, :, 2] += 1.0
    with torch.no_grad():
        got = video(**still_pairs)
        expected = torch.stack([image(still_pairs["x"][:, :, i], batch["t"], batch["context"], batch["vector"])
                                for i in range(6)], dim=2)  # (B, C, T, H, W)
        assert expected.abs().mean() > 1e-2
        torch.testing.assert_close(got, expected, atol=1e-5 * expected.abs().max(), rtol=1e-5)
        assert not torch.allclose(video(**frame0)[:, :, 1], got[:, :, 1], atol=1e-3)
        torch.testing.assert_close(video(**frame2)[:, :, 1], got[:, :, 1])
        moving = clip_inputs(2, 4, 8, 12)  # every frame differs
        reversed_pairs = {**moving, "x": moving["x"][:, :, [1, 0, 3, 2]]}
        assert not torch.allclose(video(**moving), video(**reversed_pairs)[:, :, [1, 0, 3, 2]], atol=1e-3)
    with pytest.raises(ValueError, match="clip of 5 frames is not divisible by frame_patch 2"):
        video(**clip_inputs(1, 5))
    with pytest.raises(ValueError, match="frame_patch must be at least 1"):
        VideoUNet(4, 4, None, None, frame_patch=0)


@pytest.mark.parametrize("name", ["video-dit-cpu.yaml", "video-unet-cpu.yaml", "video-dit-tiny.yaml",
                                  "video-unet-tiny.yaml"])
def test_config_builds_through_jsonargparse_with_its_image_twin_knobs(name):
    """Each video config is its image twin's knobs (so that twin's export initialises it) on the video class,
    with at most the video-only frame_patch beside them."""
    parser = ArgumentParser()
    parser.add_argument("--backbone", type=Backbone)
    written = yaml.safe_load((CONFIGS / name).read_text())
    twin = yaml.safe_load((CONFIGS / name.removeprefix("video-")).read_text())
    assert {k: v for k, v in written["init_args"].items() if k != "frame_patch"} == twin["init_args"]
    spec = {**written, "init_args": {"in_channels": 4, "out_channels": 4, "context_dim": None, "vector_dim": None,
                                     **written["init_args"]}}
    with torch.device("meta"):
        backbone = parser.instantiate_classes(parser.parse_object({"backbone": spec})).backbone
    assert type(backbone).__name__ == {"dit": "VideoDiT", "unet": "VideoUNet"}[name.split("-")[1]]
