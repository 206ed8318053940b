"""Metrics of clips (issue 23): per-frame FID and KID, FVD of whole clips and per-frame CLIP score / SSIM through one
evaluation against direct computations, the order of kept frame features, FVD refused on images, I3D and Inception
each disabled alone without weights, and tools/evaluate.py --frames on shards, video files and ``ldm predict`` strips.

The tiny stand-ins: tests/tiny_modules.py's TinyFeatures for Inception, its random TorchScript I3D (TinyI3D).
"""

from __future__ import annotations

import logging
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import Tensor

from ldm.callbacks.images import frame_strips
from ldm.conditioning.open_clip import OpenCLIP
from ldm.data.synthetic import write_shapes
from ldm.data.video import clip_frames
from ldm.metrics.clip_score import CLIPScore
from ldm.metrics.evaluation import Evaluation, frame_order, load_metrics
from ldm.metrics.features import FeatureExtractors
from ldm.metrics.fid import FID, KID, frechet_distance, kid
from ldm.metrics.fvd import FVD, I3D_OPTION, I3DFeatures
from ldm.metrics.paired import SSIM
from tests.fvd_direct import clips, direct_features, frechet
from tests.tiny_modules import TinyFeatures, TinyI3D, scripted
from tools import evaluate

FRAMES, SIZE = 8, 32
KID_ARGS = {"subsets": 10, "subset_size": 6}
TINY_CLIP = {"random_init": True, "text_cfg": {"width": 32, "layers": 1, "heads": 2},
             "vision_cfg": {"width": 32, "layers": 1, "head_width": 16, "image_size": 32, "patch_size": 16}}


@pytest.fixture(scope="module")
def i3d(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyI3D, Path]:
    """The tiny I3D (seeded) and its TorchScript file."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("i3d") / "tiny_i3d.pt"
    return scripted(TinyI3D().eval(), path), path


def frames_by_hand(x: Tensor) -> Tensor:
    """(B * T, 3, H, W): clip 0's frames, then clip 1's, ..."""
    return x.permute(0, 2, 1, 3, 4).reshape(-1, *x.shape[1:2], *x.shape[3:])


def direct(generated: Tensor, real: Tensor, features: TinyFeatures, net: TinyI3D) -> dict[str, float]:
    """FID and KID of every frame's features, FVD of every clip's I3D features, computed here."""
    with torch.no_grad():
        fake_frames, real_frames = features.net(frames_by_hand(generated)), features.net(frames_by_hand(real))
    stats = [(f.double().mean(0), torch.cov(f.double().T)) for f in (fake_frames, real_frames)]
    kid_mean, kid_std = kid(fake_frames, real_frames, **KID_ARGS)
    return {"fid": frechet_distance(*stats[0], *stats[1]), "kid": kid_mean, "kid_std": kid_std,
            "fvd": frechet(direct_features(net, generated), direct_features(net, real))}


def test_fid_kid_fvd_clip_score_and_ssim_of_clips_equal_direct_computations(i3d, offline) -> None:
    net, path = i3d
    metrics, extractor = load_metrics([FID(), KID(**KID_ARGS), FVD(), CLIPScore(OpenCLIP(**TINY_CLIP)), SSIM()],
                                      TinyFeatures(), i3d_weights=str(path))
    assert isinstance(extractor, FeatureExtractors) and len(metrics) == 5  # Inception's stand-in and I3D, one forward
    real, generated = clips(6, seed=1), clips(6, seed=2, shift=0.3)
    captions = ["a red circle moving up", "", "a blue star staying still", "x", "a green cross", "a square"]
    run = Evaluation(metrics, extractor)
    for batch in (slice(0, 4), slice(4, 6)):
        run.add_reference(real[batch])
        run.add_generated(generated[batch], real[batch], captions[batch])
    values = run.compute()

    expected = direct(generated, real, extractor.parts[0], net)
    assert {k: values[k] for k in expected} == pytest.approx(expected, rel=1e-6)
    assert expected["fid"] > 1e-3 and expected["fvd"] > 1e-3
    scored = [i for i, text in enumerate(captions) if text]  # clip 1 has no caption: none of its frames is scored
    fake_frames, real_frames = frames_by_hand(generated), frames_by_hand(real)
    rows = [i * FRAMES + t for i in scored for t in range(FRAMES)]
    clipsim = metrics[3](fake_frames[rows], [captions[i] for i in scored for _ in range(FRAMES)]).mean().item()
    assert values["clip_score"] == pytest.approx(clipsim, rel=1e-5)  # CLIPSIM: the mean CLIP score over frames
    assert values["ssim"] == pytest.approx(SSIM()(fake_frames, real_frames).mean().item(), rel=1e-6)
    assert run.samples == 6  # clips, not frames


def test_frame_features_are_ordered_by_their_clip_whatever_the_batches(i3d) -> None:
    """Kept (KID) frame features sort by o * T + t: clips arriving in other batches, in another order, give them in
    the same order."""
    assert frame_order(torch.tensor([5, 2]), 3).tolist() == [15, 16, 17, 6, 7, 8]
    x, order = clips(5, seed=3), torch.tensor([40, 10, 30, 20, 50])

    def kept(batches: list[list[int]]) -> Tensor:
        run = Evaluation([KID(**KID_ARGS)], TinyFeatures())
        for batch in batches:
            run.add_generated(x[batch], order=order[batch])
        return run.generated["pool3"].merged(lambda t: t).features

    once = kept([[0, 1, 2, 3, 4]])
    torch.testing.assert_close(kept([[4, 2], [3], [1, 0]]), once, rtol=0, atol=0)
    with torch.no_grad():
        by_hand = TinyFeatures().net(frames_by_hand(x[order.argsort()]))  # clip 10's frames, then 20's, ...
    torch.testing.assert_close(once, by_hand)


def test_fvd_refuses_images_in_one_line(i3d) -> None:
    _, path = i3d
    run = Evaluation([FID(), FVD()], FeatureExtractors(TinyFeatures(), I3DFeatures(str(path))))
    images = clips(2, seed=4)[:, :, 0]  # (B, 3, H, W)
    for add in (run.add_generated, run.add_reference):
        with pytest.raises(ValueError) as refused:
            add(images)
        assert str(refused.value) == "FVD reads clips (B, 3, T, H, W), not images of shape (2, 3, 16, 20)"
    run = Evaluation([FID()], TinyFeatures())  # metrics of images take images, as before
    run.add_generated(images)
    run.add_reference(images)
    assert run.compute()["fid"] == pytest.approx(0, abs=1e-6)


def test_without_i3d_fvd_alone_is_disabled_in_one_line_and_without_inception_fid_alone(
        i3d, tmp_path, monkeypatch, caplog, offline) -> None:
    _, path = i3d
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache, and no download (LDM_OFFLINE=1)
    features = TinyFeatures()
    with caplog.at_level(logging.WARNING, logger="ldm.metrics.evaluation"):
        metrics, extractor = load_metrics([FID(), KID(**KID_ARGS), FVD()], features)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0] and lines[0].startswith("FVD disabled:") and I3D_OPTION in lines[0]
    assert [m.label for m in metrics] == ["FID", "KID"] and extractor is features
    run = Evaluation(metrics, extractor)
    run.add_generated(clips(3, seed=5))
    run.add_reference(clips(3, seed=6))
    values = run.compute()
    assert values["fid"] > 0 and "kid" in values and "fvd" not in values

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm.metrics.evaluation"):
        metrics, extractor = load_metrics([FID(), FVD()], i3d_weights=str(path))  # no Inception file either
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("FID disabled:") and "inception_weights" in lines[0]
    assert [m.label for m in metrics] == ["FVD"] and isinstance(extractor, I3DFeatures)


# --- tools/evaluate.py --frames ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Six moving-shapes clips as mp4 shards, the same mp4 files in a folder (with caption sidecars), and a folder
    of other clips (the shards' reversed in time and brightened) as `ldm predict` strips."""
    root = tmp_path_factory.mktemp("clips")
    write_shapes(root / "shards", train=1, val=6, test=1, size=SIZE, frames=FRAMES)
    videos, strips = root / "videos", root / "strips"
    videos.mkdir()
    strips.mkdir()
    for shard in sorted((root / "shards" / "val").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith((".mp4", ".txt")):
                    (videos / member.name).write_bytes(tar.extractfile(member).read())
    real = torch.cat([x for x, _ in evaluate.iter_batches(str(root / "shards" / "val" / "*.tar"), SIZE, 4, FRAMES)])
    generated = (real.flip(2) + 0.2).clamp(-1, 1)
    pixels = frame_strips(generated).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy()  # (B, H, T*W, 3)
    for i, strip in enumerate(pixels):
        Image.fromarray(strip).save(strips / f"{i:06d}.png")
    return {"shards": root / "shards" / "val" / "*.tar", "videos": videos, "strips": strips, "real": real,
            "generated": ((generated + 1) * 127.5).round() / 127.5 - 1}  # as the strips store it


def run_evaluate(generated: Path, reference: Path, path: Path, out: Path, *extra: str) -> dict:
    return evaluate.main(["--generated", str(generated), "--reference", str(reference), "--frames", str(FRAMES),
                          "--resolution", str(SIZE), "--batch-size", "4", "--metrics", "fvd", "fid", "kid",
                          "--kid-subsets", str(KID_ARGS["subsets"]), "--kid-subset-size", str(KID_ARGS["subset_size"]),
                          "--i3d-weights", str(path), "--out", str(out), *extra])


def test_evaluate_frames_reads_shards_video_files_and_strips_as_clips(clip_data, i3d, tmp_path, monkeypatch,
                                                                       offline) -> None:
    net, path = i3d
    features = TinyFeatures()
    monkeypatch.setattr(evaluate, "inception_for", lambda metrics, weights: features)
    assert len(list(clip_data["videos"].glob("*.mp4"))) == 6 and len(list(clip_data["strips"].glob("*.png"))) == 6

    same = run_evaluate(clip_data["videos"], clip_data["shards"], path, tmp_path / "same.json")
    assert same["generated_count"] == 6 and same["reference_count"] == 6  # clips
    assert same["fid"] == pytest.approx(0, abs=1e-6) and same["fvd"] == pytest.approx(0, abs=1e-6)  # decoded alike

    cache = ["--reference-cache", str(tmp_path / "cache")]
    strips = run_evaluate(clip_data["strips"], clip_data["shards"], path, tmp_path / "strips.json", *cache)
    expected = direct(clip_data["generated"], clip_data["real"], features, net)
    assert {k: strips[k] for k in expected} == pytest.approx(expected, rel=1e-5)
    assert expected["fvd"] > 1e-3  # reversed and brighter: not a set against itself
    cached = lambda: len(list((tmp_path / "cache").glob("*.safetensors")))
    assert cached() == 2  # the reference's frame features and clip features
    seen = features.images_seen
    again = run_evaluate(clip_data["strips"], clip_data["shards"], path, tmp_path / "again.json", *cache)
    assert again["fvd"] == strips["fvd"] and cached() == 2
    assert features.images_seen - seen == 6 * FRAMES  # the generated frames alone: the reference's from the cache
    shorter = run_evaluate(clip_data["videos"], clip_data["shards"], path, tmp_path / "four.json", *cache, "--frames", "4")
    assert cached() == 4 and shorter["fid"] == pytest.approx(0, abs=1e-6)  # clips of 4 frames: another reference


def test_evaluate_frames_reads_a_folder_of_gifs_as_the_strips_of_their_frames(clip_data, tmp_path) -> None:
    gifs, strips = tmp_path / "gifs", tmp_path / "strips"
    gifs.mkdir()
    strips.mkdir()
    for path in sorted(clip_data["strips"].glob("*.png")):
        frames = clip_frames(path, FRAMES)
        frames[0].save(gifs / f"{path.stem}.gif", save_all=True, append_images=frames[1:], duration=100)
        held = clip_frames(gifs / f"{path.stem}.gif", FRAMES)  # the GIF's palette colours
        strip = Image.new("RGB", (FRAMES * SIZE, SIZE))
        for i, frame in enumerate(held):
            strip.paste(frame, (i * SIZE, 0))
        strip.save(strips / path.name)
    read = [torch.cat([x for x, _ in evaluate.iter_batches(str(folder), SIZE, 4, FRAMES)]) for folder in (gifs, strips)]
    assert read[0].shape == (6, 3, FRAMES, SIZE, SIZE) and torch.equal(*read)


def test_evaluate_refuses_fvd_without_frames_and_names_a_strip_of_other_frames(clip_data, tmp_path, monkeypatch,
                                                                                 capsys) -> None:
    monkeypatch.setattr(evaluate, "inception_for", lambda metrics, weights: TinyFeatures())
    with pytest.raises(SystemExit):
        evaluate.main(["--generated", str(clip_data["strips"]), "--reference", str(clip_data["shards"]),
                       "--metrics", "fvd", "--out", str(tmp_path / "r.json")])
    assert "fvd reads clips: give --frames T" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"000000.png: 256 px wide, not a strip of --frames 3 equal frames in a row"):
        evaluate.main(["--generated", str(clip_data["strips"]), "--reference", str(clip_data["shards"]), "--frames", "3",
                       "--resolution", str(SIZE), "--metrics", "fid", "--out", str(tmp_path / "r.json")])
