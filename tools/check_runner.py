"""A runner of budgeted checks (tools/gpu_check.py's): each in order within its time budget, a failing one recorded
and the next run, the report (JSON and the README table's markdown rows) rewritten after each."""

from __future__ import annotations

import json
import signal
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

Outcome = dict[str, Any]  # what a check returns: passed, summary (its table cell), numbers


class Workspace(Protocol):
    """Where the checks put what they make."""

    out: Path


@dataclass(frozen=True)
class Check:
    name: str
    title: str  # its row in the table
    budget_s: float
    run: Callable[[Any], Outcome]  # given the Workspace


class OverBudget(Exception):
    """A check ran past its time budget."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise OverBudget in the main thread once ``seconds`` have passed (at the next Python bytecode)."""
    def stop(signum: int, frame: Any) -> None:
        raise OverBudget(f"over its {seconds:g} s budget")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_checks(checks: Sequence[Check], ctx: Workspace, header: dict[str, Any]) -> list[dict[str, Any]]:
    """Run ``checks`` in order, each within its budget; a failing one is recorded and the next runs. The
    report is rewritten after each (write_report)."""
    results: list[dict[str, Any]] = []
    for index, check in enumerate(checks, 1):
        start = time.perf_counter()
        try:
            with time_limit(check.budget_s):
                outcome = check.run(ctx)
        except Exception as error:  # noqa: BLE001 - whatever a check raises, it is recorded and the next runs
            lines = str(error).strip().splitlines() or [""]
            outcome = {"passed": False, "summary": f"{type(error).__name__}: {lines[-1]}".rstrip(": "), "numbers": {},
                       "traceback": traceback.format_exc()}
        results.append({"name": check.name, "title": check.title, **outcome,
                        "seconds": round(time.perf_counter() - start, 1), "budget_s": check.budget_s})
        write_report(ctx.out, header, results)
        verdict = "pass" if outcome["passed"] else "FAIL"
        print(f"gpu_check: [{index}/{len(checks)}] {check.name}: {verdict} in {results[-1]['seconds']:.0f} s: "
              f"{outcome['summary']}", flush=True)
    return results


def markdown(header: dict[str, Any], results: Sequence[dict[str, Any]]) -> str:
    """The GPU table's rows for README, with a line naming the machine above them."""
    passed, seconds = sum(r["passed"] for r in results), sum(r["seconds"] for r in results)
    machine = (f"{header['device']} ({header['devices']} visible), torch {header['torch']}, CUDA {header['cuda']}, "
               f"{header['date']}: {passed} of {len(results)} checks pass in {seconds / 60:.1f} min "
               "(`python tools/gpu_check.py`).")
    lines = [machine, "", "| check | result | measured | time |", "|---|---|---|---:|"]
    for r in results:
        cell = r["summary"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['title']} | {'pass' if r['passed'] else '**fail**'} | {cell} | {r['seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, header: dict[str, Any], results: Sequence[dict[str, Any]]) -> None:
    """<out>/gpu_check.json (the header and every result) and <out>/gpu_check.md (markdown)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps({**header, "checks": list(results)}, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(header, results))
