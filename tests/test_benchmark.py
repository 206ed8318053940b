"""tools/benchmark.py train and sample on CPU for both stages, and compare: every number in the table and JSON line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from ldm.training.speed import channels_last_pays, channels_last_weights
from tests.cli_runs import CLI_MARKS, TINY_SIZE, tiny_shapes
from tools.bench import cli, compare, experiment

ROOT = Path(__file__).resolve().parents[1]
AUTOENCODER = str(ROOT / "experiments" / "shapes" / "autoencoder.yaml")
CLASS2IMG = str(ROOT / "experiments" / "shapes" / "class2img_unet.yaml")
pytestmark = CLI_MARKS


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_shapes(tmp_path_factory)


@pytest.fixture(scope="module")
def options(data: Path) -> list[str]:
    """Tool and ldm options running an experiment on the tiny 16 px shards."""
    return ["--device", "cpu", "--batch-size", "2", "--data.init_args.train", str(data / "train" / "shard-*.tar"),
            "--data.init_args.val", str(data / "val" / "shard-*.tar"), "--data.init_args.resolution", str(TINY_SIZE)]


@pytest.fixture(scope="module")
def random_codec(data: Path) -> list[str]:
    """A LatentDiffusion overlay config: the codec without a weights file."""
    overlay = {"model": {"init_args": {"codec": {"init_args": {"weights": None}}}}}
    (data / "codec.yaml").write_text(yaml.safe_dump(overlay))
    return ["--config", str(data / "codec.yaml")]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[str, dict]:
    cli.main(argv)
    out = capsys.readouterr().out.strip()
    return out, json.loads(out.splitlines()[-1])


def check_table(out: str, result: dict, unit: str) -> None:
    for key in ("samples_per_s", "ms_per_call", "flops_per_sample", "peak_memory_gib"):
        assert math.isfinite(result[key]) and result[key] > 0
    assert result["batch_size"] == 2 and result["image_size"] == [TINY_SIZE] * 2 and result["device"] == "cpu"
    assert result["mfu"] is None and result["peak_memory_kind"] == "CPU peak RSS"
    rows = {"samples/s": f"{result['samples_per_s']:.2f}", f"ms/{unit}": f"{result['ms_per_call']:.1f}",
            "peak memory": f"{result['peak_memory_gib']:.2f} GiB (CPU peak RSS)",
            "GFLOP/sample": f"{result['flops_per_sample'] / 1e9:.3f}", "MFU": "unknown (no peak FLOP/s known)"}
    lines = out.splitlines()
    for name, value in rows.items():  # the table row of each number
        assert f"  {name:<13} {value}" in lines


def test_mfu_divides_by_lightnings_peak_for_the_compute_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = []
    monkeypatch.setattr(experiment, "get_available_flops", lambda device, dtype: asked.append(dtype) or 8e9)
    batch = {"image": torch.zeros(2, 3, 4, 4)}
    result = experiment.measurements(torch.nn.Linear(1, 1), batch, torch.device("cpu"), "bf16-mixed", 1e9, 2.0, 4)
    assert asked == [torch.bfloat16] and result["mfu"] == pytest.approx(0.25)  # 4 calls x 1 GFLOP / 2 s / 8 GFLOP/s
    experiment.measurements(torch.nn.Linear(1, 1), batch, torch.device("cpu"), "32-true", 1e9, 2.0, 4)
    assert asked[-1] is torch.float32


def test_train_and_sample_of_the_autoencoder(options: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    out, train = run(["train", "--config", AUTOENCODER, *options, "--steps", "2", "--warmup", "1"], capsys)
    assert train["model"] == "AutoencoderKL" and train["steps"] == 2 and "2 timed steps after 1 warm-up" in out
    check_table(out, train, "step")
    out, sample = run(["sample", "--config", AUTOENCODER, *options, "--repeats", "1"], capsys)
    assert sample["model"] == "AutoencoderKL" and sample["sampler"] is None  # reconstructions
    check_table(out, sample, "batch")
    # a step is a forward and a backward of the autoencoder, about 3 forwards: the backward was counted
    assert train["flops_per_sample"] > 2 * sample["flops_per_sample"]


def test_train_and_sample_of_latent_diffusion_with_a_swapped_backbone(options: list[str], random_codec: list[str],
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    dit = ["--model.init_args.backbone", str(ROOT / "configs" / "backbone" / "dit-tiny.yaml")]
    options = ["--config", CLASS2IMG, *random_codec, *dit, *options]
    out, train = run(["train", *options, "--steps", "2", "--warmup", "1"], capsys)
    assert train["model"] == "LatentDiffusion" and train["ldm_options"][:2] == dit and "dit-tiny.yaml" in out
    check_table(out, train, "step")
    out, sample = run(["sample", *options, "--repeats", "1", "--sampler-steps", "2"], capsys)
    assert (sample["sampler"], sample["sampler_steps"]) == ("dpmpp_2m", 2) and "dpmpp_2m x 2 steps" in out
    check_table(out, sample, "batch")


def test_options_the_data_benchmark_does_not_know_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["data", "--model.init_args.backbone", "x.yaml"])
    assert "unrecognized arguments: --model.init_args.backbone x.yaml" in capsys.readouterr().err


def check_compare_row(row: dict, lines: list[str], size: int, batch_size: int, fast: bool) -> None:
    """One point of compare: its settings, each one-step ratio the quotient of its step times, and its table line."""
    ms, ratio = row["ms_per_step"], row["ratio_ldm_over_diffusers"]
    assert (row["size"], row["batch_size"], row["steps"], row["channels_last"]) == (size, batch_size, 1, fast)
    assert set(ms) == {"ldm", "diffusers"} | ({"ldm_fast"} if fast else set()) and all(v > 0 for v in ms.values())
    assert set(ratio) == {"plain"} | ({"fast"} if fast else set())
    for name, column in (("ldm", "plain"), ("ldm_fast", "fast")):
        if fast or column == "plain":  # one step: one pair, its quartiles the same number
            assert ratio[column] == pytest.approx(dict.fromkeys(("median", "q1", "q3"), ms[name] / ms["diffusers"]))
    cells = [f"{size:>5}", f"{batch_size:>5}", f"{ms['ldm']:9.1f}", f"{ms['ldm_fast']:9.1f}" if fast else f"{'—':>9}",
             f"{ms['diffusers']:12.1f}", f"{compare._ratio(ratio['plain']):<20}",
             f"{compare._ratio(ratio.get('fast')):<20}", f"{row['load_average']:.1f}"]
    assert f"  {' '.join(cells[:5])}  {' '.join(cells[5:])}" in lines


@pytest.mark.parametrize("arch", ["unet", "dit", "vae"])
def test_compare_builds_the_same_function_twice_and_times_both(arch: str, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    pair = compare.build(arch, compare.ROOT, batch_size=1, size=8, device=torch.device("cpu"))
    ours, ours_step, theirs, theirs_step = pair
    ours.eval(), theirs.eval()  # diffusers' DiT drops class labels at random in training
    with torch.random.fork_rng():  # the VAE draws its posterior sample: the same draw for both
        torch.manual_seed(0)
        a = ours_step(ours)
        torch.manual_seed(0)
        b = theirs_step(theirs)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # the same weights, the same loss

    ours.train(), theirs.train()  # as built: the command times training steps
    monkeypatch.setattr(compare, "build", lambda *args: pair)  # DiT-S/2 and kl-f8 take seconds to build: once
    out, result = run(["compare", "--arch", arch, "--batch-size", "1", "--size", "8", "--steps", "1", "--warmup", "0",
                       "--device", "cpu", "--fast"], capsys)
    assert (result["arch"], result["steps"], len(result["rows"])) == (arch, 1, 1)
    fast = arch != "dit" and channels_last_pays(ours)  # the fast column: where speed_up chooses channels-last
    check_compare_row(result["rows"][0], out.splitlines(), 8, 1, fast=fast)
    assert not channels_last_weights(ours)  # the fast column trains a copy


def test_compare_sweeps_every_size_with_every_batch_size(capsys: pytest.CaptureFixture[str]) -> None:
    out, result = run(["compare", "--arch", "unet", "--sizes", "8", "16", "--batch-sizes", "1", "2", "--steps", "1",
                       "--warmup", "0", "--device", "cpu", "--fast"], capsys)
    points = [(8, 1), (8, 2), (16, 1), (16, 2)]
    assert [(row["size"], row["batch_size"]) for row in result["rows"]] == points
    for row, (size, batch_size) in zip(result["rows"], points):
        check_compare_row(row, out.splitlines(), size, batch_size, fast=True)
