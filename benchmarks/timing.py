"""Wall-clock helpers shared by the side-by-side benchmark scripts (medians: the machines are noisy)."""
from __future__ import annotations

import statistics
import time


def timed(fn):
    """(fn(), seconds it took)."""
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def median_seconds(fn, repeat: int) -> float:
    """Median seconds of `repeat` calls of fn, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def script_help(doc: str) -> None:
    """Command-line handling for a script without options: --help prints its docstring, and
    anything else is refused (rather than silently running the whole benchmark)."""
    import argparse

    argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
