"""tools/benchmark.py data: a rate for every worker count and a decode rate, in the table and the JSON line."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from tests.shardutil import write_shards

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import benchmark  # noqa: E402


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[list[str], dict]:
    benchmark.main(["data", "--resolution", "32", "--batch-size", "4", "--batches", "2", *argv])
    lines = capsys.readouterr().out.strip().splitlines()
    return lines, json.loads(lines[-1])


def _positive(rate: float) -> bool:
    return math.isfinite(rate) and rate > 0


def test_data_benchmark_on_given_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_shards(tmp_path, [12, 9])
    lines, result = _run(["--shards", str(tmp_path / "shard-{0000..0001}.tar"), "--workers", "0", "2"], capsys)
    assert list(result["loader_images_per_s"]) == ["0", "2"]
    assert all(_positive(rate) for rate in result["loader_images_per_s"].values())
    for workers, rate in result["loader_images_per_s"].items():  # the table row of each worker count
        assert f"{workers:>7}  {rate:>9.1f}" in lines
    assert result["decode_images"] == 21 and result["decode_format"] == ["jpg"]
    assert _positive(result["decode_images_per_s_per_core"])


def test_data_benchmark_writes_a_synthetic_set_without_shards(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(benchmark, "SYNTHETIC_SAMPLES", 24)
    monkeypatch.setattr(benchmark, "SYNTHETIC_SIZE", 48)
    lines, result = _run(["--workers", "0"], capsys)
    assert result["shards"] == "synthetic shapes, 24 x 48 px" and result["shards"] in lines[0]
    assert list(result["loader_images_per_s"]) == ["0"] and _positive(result["loader_images_per_s"]["0"])
    assert result["decode_images"] == 24 and _positive(result["decode_images_per_s_per_core"])
