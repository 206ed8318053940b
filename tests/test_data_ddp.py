"""WebDataModule under a real 2-process CPU DDP fit (gloo): every sample once, ranks in step, reshuffled."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tests.processes import run_main
from tests.shardutil import write_shards

PROBE = Path(__file__).with_name("ddp_data_probe.py")
TIMEOUT_S = 180  # ranks with unequal batch counts block in a collective: a hang is a failure
TRAIN_COUNTS, VAL_COUNT = [7, 3, 6], 9  # uneven: in both splits one rank cuts an extra, smaller batch
BUCKETED_VAL_COUNT = 12  # 9 in 3 buckets leaves a worker 1 sample short of its batch quota: it would repeat one


def _run_probe(tmp_path: Path, buckets: bool) -> list[dict]:
    sizes = [(16, 8), (12, 10), (8, 8), (8, 16), (9, 20), (20, 9)] if buckets else (40, 32)  # (W, H): wide, square, tall
    write_shards(tmp_path / "train", TRAIN_COUNTS, sizes)
    train = str(tmp_path / "train" / f"shard-{{0000..{len(TRAIN_COUNTS) - 1:04d}}}.tar")  # a brace range
    val = write_shards(tmp_path / "val", [BUCKETED_VAL_COUNT if buckets else VAL_COUNT], sizes)[0]
    out = tmp_path / "out"
    out.mkdir()
    args = [str(PROBE), "--train", train, "--val", val, "--out", str(out), *(["--buckets"] if buckets else [])]
    log = run_main("tests.ddp_data_probe", args, PROBE.parent.parent, TIMEOUT_S)
    missing = [r for r in range(2) if not (out / f"rank{r}.json").is_file()]
    assert not missing, f"rank(s) {missing} wrote no record:\n{log[-3000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("buckets", [False, True], ids=["square", "buckets"])
def test_ddp_fit_reads_every_sample_once_per_epoch_with_ranks_in_step(tmp_path: Path, buckets: bool) -> None:
    """With aspect-ratio buckets too: each batch of one bucket, the ranks still in step, each sample once."""
    ranks = _run_probe(tmp_path, buckets)
    assert [r["world_size"] for r in ranks] == [2, 2]
    expected = {
        "train": Counter(f"sample {n}" for n in range(sum(TRAIN_COUNTS))),
        "val": Counter(f"sample {n}" for n in range(BUCKETED_VAL_COUNT if buckets else VAL_COUNT)),
    }
    for split, limit in (("train", "num_training_batches"), ("val", "num_val_batches")):
        for epoch in ("0", "1"):
            batches = [r[split][epoch] for r in ranks]
            assert len(batches[0]) == len(batches[1]) == ranks[0][limit] == ranks[1][limit]
            assert all(0 < len(b) <= 2 for rank in batches for b in rank)
            assert Counter(c for rank in batches for b in rank for c in b) == expected[split]
    assert bool(ranks[0]["buckets"]) == buckets and (not buckets or {8, 16} <= set(ranks[0]["buckets"]["0"]))
    for rank in ranks:  # each epoch deals the shards anew: another share, or the same in a new order
        orders = [[c for b in rank["train"][epoch] for c in b] for epoch in ("0", "1")]
        assert orders[0] != orders[1]
