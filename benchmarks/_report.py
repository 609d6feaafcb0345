"""One machine-readable line per headline figure, beside a benchmark's human output.

A benchmark calls :func:`figure` for each number a README or docs table quotes; it prints
``@figure {"name": ..., "value": ..., "unit": ..., "better": "lower"|"higher"}`` on its own
line. ``benchmarks/bench.py`` (``make bench``) collects those lines into the run's results
file and ``benchmarks/compare.py`` compares two such files figure by figure.
"""

from __future__ import annotations

import json
import math

MARK = "@figure "


def figure(name: str, value: float, unit: str, better: str = "lower") -> None:
    """Print one figure: ``better`` says which way is an improvement (lower or higher)."""
    if better not in ("lower", "higher"):
        raise ValueError(f"better={better!r}: must be 'lower' or 'higher'")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"figure {name!r} is {value}: not a finite number")
    line = json.dumps({"name": name, "value": value, "unit": unit, "better": better})
    print(MARK + line, flush=True)


def parse(output: str) -> dict[str, dict]:
    """The figures a benchmark printed, by name (a later one of a name replaces it)."""
    figures = {}
    for line in output.splitlines():
        if line.startswith(MARK):
            item = json.loads(line[len(MARK) :])
            figures[item.pop("name")] = item
    return figures
