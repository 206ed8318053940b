"""Collate decoded samples whose optional keys (a label, say) only some of them carry."""

from __future__ import annotations

from collections import Counter
from typing import Any

from torch.utils.data import default_collate

DROPPED = "missing in part of a batch: dropped"  # a reason that is not a skip: the sample still trains


def collate(samples: list[dict[str, Any]]) -> tuple[dict[str, Any], Counter[str]]:
    """`default_collate` over the keys every sample carries; a key only some carry is dropped from
    this batch, and the values lost are counted as {"<key> missing in part of a batch: dropped": n}
    (not skips: those samples still train)."""
    common = [key for key in samples[0] if all(key in s for s in samples)]
    dropped = Counter(f"{key} {DROPPED}" for s in samples for key in s if key not in common)
    return default_collate([{key: s[key] for key in common} for s in samples]), dropped
