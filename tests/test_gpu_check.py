"""tools/gpu_check.py on CPU: its one-line refusal, its runner and report, its MFU arithmetic, how it judges a fit
and records host syncs, and that the `ldm` commands its checks run compose."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from ldm.cli import compose

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))  # as when the tool runs as a script: it imports bench and cache_latents so
import check_runner
import gpu_check

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
HEADER = {"device": "NVIDIA H200", "devices": 1, "torch": "2.9.0", "cuda": "12.8", "date": "2025-01-01"}


def test_refuses_without_a_gpu_in_one_line(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120, check=False, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.strip().splitlines() == [
        f"gpu_check: error: needs a CUDA GPU (torch {torch.__version__} "
        + ("sees no CUDA device)" if torch.version.cuda else "is built without CUDA)")]
    assert not (tmp_path / "out").exists()


def fake_check(name: str, budget_s: float, run) -> gpu_check.Check:
    return gpu_check.Check(name, f"the {name} check", budget_s, run)


def fail(ctx: gpu_check.Context) -> gpu_check.Outcome:
    raise ValueError("first line\nsecond | line")


def overrun(ctx: gpu_check.Context) -> gpu_check.Outcome:
    time.sleep(5)
    return {"passed": True, "summary": "never", "numbers": {}}


def test_the_runner_records_a_failing_check_and_runs_the_next(tmp_path: Path) -> None:
    ran = []
    checks = [fake_check("boom", 10, fail), fake_check("slow", 0.2, overrun),
              fake_check("good", 10, lambda ctx: ran.append(ctx) or {"passed": True, "summary": "7 img/s", "numbers": {"x": 7}})]
    ctx = gpu_check.Context(tmp_path)
    start = time.perf_counter()
    results = gpu_check.run_checks(checks, ctx, HEADER)
    assert time.perf_counter() - start < 2  # the slow check was stopped at its budget
    assert ran == [ctx] and [r["name"] for r in results] == ["boom", "slow", "good"]
    assert [r["passed"] for r in results] == [False, False, True]
    assert results[0]["summary"] == "ValueError: second | line" and "fail" in results[0]["traceback"]
    assert results[1]["summary"] == "OverBudget: over its 0.2 s budget" and results[1]["seconds"] < 1
    assert results[2]["numbers"] == {"x": 7} and results[2]["budget_s"] == 10
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["device"] == "NVIDIA H200" and [r["passed"] for r in saved["checks"]] == [False, False, True]
    rows = (tmp_path / "gpu_check.md").read_text().splitlines()[-3:]
    assert rows[0] == "| the boom check | **fail** | ValueError: second \\| line | 0 s |"
    assert rows[1].startswith("| the slow check | **fail** | OverBudget") and rows[2] == "| the good check | pass | 7 img/s | 0 s |"


def test_the_markdown_names_the_machine_above_the_rows() -> None:
    results = [{"title": "bf16 fit", "passed": True, "summary": "loss 0.9 → 0.5", "seconds": 42.4},
               {"title": "DDP", "passed": False, "summary": "RuntimeError: nccl", "seconds": 78.0}]
    assert check_runner.markdown(HEADER, results) == (
        "NVIDIA H200 (1 visible), torch 2.9.0, CUDA 12.8, 2025-01-01: 1 of 2 checks pass in 2.0 min "
        "(`python tools/gpu_check.py`).\n\n"
        "| check | result | measured | time |\n|---|---|---|---:|\n"
        "| bf16 fit | pass | loss 0.9 → 0.5 | 42 s |\n| DDP | **fail** | RuntimeError: nccl | 78 s |\n")


def test_mfu_is_step_flops_per_image_times_images_per_second_over_lightnings_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    peak, source = gpu_check.peak_flops(torch.device("cuda"), None)
    assert peak == 989.4e12 and source == "Lightning's table for NVIDIA H100 80GB HBM3"  # dense bf16, H100 SXM
    # by hand: DiT-XL/2 at 256 px is 118.6 GMAC a forward (Peebles & Xie, Table 4), 2 FLOPs a MAC, a step is
    # forward + backward = 3 forwards: 711.6 GFLOP an image; 500 img/s -> 355.8 TFLOP/s of 989.4 = 35.96 %
    assert gpu_check.mfu(3 * 2 * 118.6e9, 500, peak) == pytest.approx(0.3596, abs=1e-4)
    assert gpu_check.mfu(3 * 2 * 118.6e9, 500, None) is None

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA X1")  # a GPU Lightning does not know
    assert gpu_check.peak_flops(torch.device("cuda"), None) == (
        None, "none: Lightning's table lacks NVIDIA X1, pass --peak-tflops")
    assert gpu_check.peak_flops(torch.device("cuda"), 989.0) == (989e12, "--peak-tflops")


def series(loss: list[float], nonfinite: float = 0) -> dict[str, list[float]]:
    return {"train/loss": loss, "train/nonfinite_steps": [0, nonfinite], "train/samples_per_sec": [900, 1000, 1100],
            "train/gpu_mem_gb": [1.0, 2.5]}


def test_a_fit_passes_when_its_loss_falls_with_no_nonfinite_step_and_an_export() -> None:
    falling = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    good = gpu_check.fit_outcome(series(falling), exported=True)
    assert good["passed"] and good["summary"] == "loss 0.950 → 0.350, 0 non-finite steps, 1000 img/s, 2.5 GiB"
    assert good["numbers"]["logged_losses"] == 8 and good["numbers"]["peak_memory_gib"] == 2.5
    assert not gpu_check.fit_outcome(series(falling[::-1]), exported=True)["passed"]  # rising
    nonfinite = gpu_check.fit_outcome(series(falling, nonfinite=3), exported=True)
    assert not nonfinite["passed"] and "3 non-finite steps" in nonfinite["summary"]
    unexported = gpu_check.fit_outcome(series(falling), exported=False)
    assert not unexported["passed"] and unexported["summary"].endswith(", no export")
    assert not gpu_check.fit_outcome({}, exported=True)["passed"]  # nothing logged


def sync_here() -> None:
    warnings.warn(gpu_check.SYNC + " (Triggered internally at CUDAFunctions.cpp:1)", UserWarning)


def test_sync_sites_counts_the_syncs_of_its_window_at_their_sites(monkeypatch: pytest.MonkeyPatch) -> None:
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    window = gpu_check.SyncSites(first=1, last=3)
    window.on_train_batch_start(None, None, None, 0)
    assert modes == []
    window.on_train_batch_start(None, None, None, 1)
    sync_here()
    sync_here()
    with pytest.warns(UserWarning, match="another warning"):  # passed on as before
        warnings.warn("another warning")
    window.on_train_batch_start(None, None, None, 3)
    with pytest.warns(UserWarning, match=gpu_check.SYNC):  # after the window: a warning like any other, not counted
        sync_here()
    window.on_train_end(None, None)
    line = sync_here.__code__.co_firstlineno + 1
    assert window.sites == {f"tests/test_gpu_check.py:{line} (sync_here)": 2} and modes == ["warn", "default"]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> gpu_check.Context:
    return gpu_check.Context(tmp_path_factory.mktemp("gpu_check"))


@pytest.mark.parametrize("name,devices,strategy,steps,batches", [  # batches: to the one validation, at the end
    ("stage1", "1", "auto", 600, 500),  # 400 batches of one optimizer step, 100 of two (the discriminator's)
    ("fit_bf16", "1", "auto", 100, 100), ("fsdp", "1", "ldm.training.fsdp.BackboneFSDP", 30, 30),
    ("ddp", "auto", "ddp", 30, 30)])  # devices: jsonargparse keeps the option's string
def test_each_fit_composes_on_the_gpu_in_bf16(ctx: gpu_check.Context, name: str, devices: str, strategy: str,
                                              steps: int, batches: int) -> None:
    config = compose(gpu_check.FITS[name](ctx))
    trainer = config["trainer"]
    assert (trainer["accelerator"], trainer["precision"], trainer["devices"]) == ("gpu", "bf16-mixed", devices)
    assert (trainer["strategy"] if isinstance(trainer["strategy"], str) else trainer["strategy"]["class_path"]) == strategy
    assert (trainer["max_steps"], trainer["val_check_interval"]) == (steps, batches)
    assert trainer["logger"]["init_args"]["save_dir"] == str(ctx.out / "runs")
    assert config["data"]["init_args"]["train"] == str(ctx.shapes(64) / "train" / "shard-*.tar")
    if name == "stage1":  # into the check's folder, not the experiment's runs/shapes/autoencoder.safetensors
        assert config["export"]["path"] == str(ctx.codec)
    else:  # no stage-1 export in ctx yet: a random codec (None, not the string 'None')
        assert config["model"]["init_args"]["codec"]["init_args"].get("weights") is None


def test_the_shapes_experiments_read_the_stage1_export_once_there_is_one(tmp_path: Path) -> None:
    ctx = gpu_check.Context(tmp_path)  # the module's has no export: each fit above composes a random codec
    ctx.codec.parent.mkdir(parents=True)
    ctx.codec.touch()
    assert compose(gpu_check.FITS["fit_bf16"](ctx))["model"]["init_args"]["codec"]["init_args"]["weights"] == str(ctx.codec)


def test_the_benchmark_setups_compose_with_random_weights(ctx: gpu_check.Context) -> None:
    configs, options = gpu_check.BENCHES["sd15"](ctx)
    sd = compose([*(a for c in configs for a in ("--config", c)), *options])
    model = sd["model"]["init_args"]
    assert model.get("init_weights") is None and model["codec"]["init_args"].get("weights") is None
    assert model["backbone"]["init_args"]["model_channels"] == 320 and sd["data"]["init_args"]["resolution"] == 512
    assert all(e["init_args"]["clip"]["random_init"] for e in model["conditioner"]["init_args"]["embedders"])
    configs, options = gpu_check.BENCHES["dit"](ctx)
    dit = compose([*(a for c in configs for a in ("--config", c)), *options])
    assert dit["model"]["init_args"]["backbone"]["init_args"]["width"] == 1152
    assert dit["data"]["init_args"]["resolution"] == 256
    assert dit["data"]["init_args"]["train"] == str(ctx.shapes(256) / "train" / "shard-*.tar")
