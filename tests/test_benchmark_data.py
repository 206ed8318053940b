"""tools/benchmark.py data: a rate for every worker count and a decode rate, in the table and the JSON line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.shardutil import write_shards
from tools.bench import cli
from tools.bench import data as benchmark_data

ROOT = Path(__file__).resolve().parents[1]
DATA = ["data", "--resolution", "32", "--batch-size", "4", "--batches", "2"]  # the command, on tiny batches


def _lines_and_result(out: str) -> tuple[list[str], dict]:
    lines = out.strip().splitlines()
    return lines, json.loads(lines[-1])


def _positive(rate: float) -> bool:
    return math.isfinite(rate) and rate > 0


def test_data_benchmark_on_given_shards(tmp_path: Path) -> None:
    """Run as the README runs it: `python tools/benchmark.py`, whose commands are in tools/bench/."""
    write_shards(tmp_path, [12, 9])
    shards = ["--shards", str(tmp_path / "shard-{0000..0001}.tar"), "--workers", "0", "2"]
    proc = subprocess.run([sys.executable, "tools/benchmark.py", *DATA, *shards], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines, result = _lines_and_result(proc.stdout)
    assert list(result["loader_images_per_s"]) == ["0", "2"]
    assert all(_positive(rate) for rate in result["loader_images_per_s"].values())
    for workers, rate in result["loader_images_per_s"].items():  # the table row of each worker count
        assert f"{workers:>7}  {rate:>9.1f}" in lines
    assert result["decode_images"] == 21 and result["decode_format"] == ["jpg"]
    assert _positive(result["decode_images_per_s_per_core"])


def test_data_benchmark_writes_a_synthetic_set_without_shards(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(benchmark_data, "SYNTHETIC_SAMPLES", 24)
    monkeypatch.setattr(benchmark_data, "SYNTHETIC_SIZE", 48)
    cli.main([*DATA, "--workers", "0"])
    lines, result = _lines_and_result(capsys.readouterr().out)
    assert result["shards"] == "synthetic shapes, 24 x 48 px" and result["shards"] in lines[0]
    assert list(result["loader_images_per_s"]) == ["0"] and _positive(result["loader_images_per_s"]["0"])
    assert result["decode_images"] == 24 and _positive(result["decode_images_per_s_per_core"])


def test_data_benchmark_times_buckets_beside_square_crops_on_the_same_shards(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(benchmark_data, "SYNTHETIC_SAMPLES", 24)
    monkeypatch.setattr(benchmark_data, "SYNTHETIC_SIZE", 48)
    cli.main([*DATA, "--workers", "0", "--buckets", "2", "16"])
    lines, result = _lines_and_result(capsys.readouterr().out)
    assert result["shards"] == "synthetic mixed-aspect shapes, 24 x 48 px" and result["buckets"] == [2, 16]
    square, bucketed = result["loader_images_per_s"]["0"], result["loader_images_per_s_buckets"]["0"]
    assert _positive(square) and _positive(bucketed) and result["buckets_over_square"]["0"] == bucketed / square
    assert f"{0:>7}  {square:>9.1f}  {bucketed:>9.1f}  {bucketed / square:>5.2f}" in lines


def test_resume_benchmark_times_a_restored_loader_to_its_first_batch(tmp_path: Path, capsys) -> None:
    """`tools/benchmark.py resume`: a time to the first batch for each position in the epoch, in the table and the JSON."""
    write_shards(tmp_path, [30, 30], (16, 16))
    cli.main(["resume", "--shards", str(tmp_path / "shard-*.tar"), "--resolution", "16", "--batch-size", "4",
              "--workers", "0", "--shuffle-buffer", "4", "--fractions", "0.2", "0.8", "--repeats", "1"])
    lines, result = _lines_and_result(capsys.readouterr().out)
    assert result["batches_per_epoch"] == 15 and list(result["seconds_to_first_batch"]) == ["0.2", "0.8"]
    assert all(_positive(s) for s in result["seconds_to_first_batch"].values())
    assert any(line.split()[0] == "80%" for line in lines[2:-1])
