"""Rename state-dict keys by a table of (ours, theirs) name pieces, in either direction.

A piece matches from a dot boundary (or the key's start). ``{i}``-style fields in a piece match an
integer and copy it into the other side, through ``fields`` when indices are counted differently.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

Pairs = tuple[tuple[str, str], ...]  # (our name piece, their name piece)
Fields = Callable[[dict[str, int]], dict[str, int]]  # the matched integer fields -> those to write


def table(text: str) -> Pairs:
    """A rename table written as two columns, ours then theirs, one pair a line; ``#`` starts a comment."""
    rows = [row for line in text.splitlines() if (row := line.split("#", 1)[0].split())]
    bad = [row for row in rows if len(row) != 2]
    if bad:
        raise ValueError(f"a rename table row has two name pieces, got {bad[0]}")
    return tuple((ours, theirs) for ours, theirs in rows)


@functools.cache
def _pattern(template: str) -> re.Pattern[str]:
    """Regex for a name piece starting at a dot boundary, with {i}/{j}/... as named integer groups."""
    parts = re.split(r"\{(\w)\}", template)  # literal, field, literal, field, ...
    body = "".join(re.escape(p) if n % 2 == 0 else f"(?P<{p}>\\d+)" for n, p in enumerate(parts))
    return re.compile(r"(?<![^.])" + body)


def rename(key: str, pairs: Pairs, to_theirs: bool, fields: Fields | None = None) -> str:
    """Apply every (ours, theirs) rename of ``pairs`` to ``key`` in order, in the given direction."""
    for ours, theirs in pairs:
        source, target = (ours, theirs) if to_theirs else (theirs, ours)

        def substitute(m: re.Match[str], target: str = target) -> str:
            found = {name: int(value) for name, value in m.groupdict().items()}
            return target.format(**(fields(found) if fields else found))

        key = _pattern(source).sub(substitute, key)
    return key
