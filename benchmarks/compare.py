"""Compare two results files of ``make bench``, figure by figure.

    .venv/bin/python benchmarks/compare.py OLD.json NEW.json [--tolerance 0.10]

Prints each figure both files hold with its change, and a verdict by the figure's own
direction (lower or higher is better): ``better``, ``worse`` (beyond the tolerance, 10 %
by default), or ``same``. Above the table: each file's commit, machine and load, and a
warning when the machines differ or either was loaded (a load average above half its
cores), since then a difference may not be the code's. Exit code 1 if any figure is
worse, so a script or CI job can stop on a regression; 2 if a file is not a results file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class ResultsError(ValueError):
    pass


def load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ResultsError(f"{path}: not a readable JSON results file ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != 1 or "benchmarks" not in data:
        raise ResultsError(f"{path}: not a results file of benchmarks/bench.py (format 1)")
    return data


def figures(data: dict) -> dict[str, dict]:
    """``benchmark/figure`` -> {value, unit, better} of every benchmark that ran clean."""
    out = {}
    for bench, record in data["benchmarks"].items():
        if record.get("exit_code") == 0:
            for name, item in record.get("figures", {}).items():
                out[f"{bench}/{name}"] = item
    return out


def verdict(old: float, new: float, better: str, tolerance: float) -> str:
    if old == new:
        return "same"
    change = float("inf") if old == 0 else (new - old) / abs(old)
    gain = -change if better == "lower" else change
    if gain > tolerance:
        return "better"
    if gain < -tolerance:
        return "worse"
    return "same"


def _loaded(data: dict) -> bool:
    cores = data["machine"].get("cores") or 1
    return any(
        max(r.get("load_average_before", [0])[0], r.get("load_average_after", [0])[0]) > cores / 2
        for r in data["benchmarks"].values()
    )


def compare(old: dict, new: dict, tolerance: float) -> tuple[list[str], int]:
    lines = []
    for tag, data in (("old", old), ("new", new)):
        m = data["machine"]
        loads = [r["load_average_before"][0] for r in data["benchmarks"].values()]
        lines.append(
            f"{tag}: commit {data['commit'][:10] or '?'}"
            f"{' (with changes)' if data.get('tree_changed') else ''}, {data['started']}, "
            f"{m.get('cpu')}, {m.get('cores')} cores; load at each start "
            + ", ".join(f"{x:.1f}" for x in loads)
        )
    if (old["machine"].get("cpu"), old["machine"].get("cores")) != (
        new["machine"].get("cpu"),
        new["machine"].get("cores"),
    ):
        lines.append("warning: the two runs are of different machines")
    if _loaded(old) or _loaded(new):
        lines.append("warning: a run had a load average above half its cores")
    a, b = figures(old), figures(new)
    both = [k for k in a if k in b]
    width = max([len(k) for k in both] + [6])
    lines.append(f"{'figure':<{width}}  {'old':>12}  {'new':>12}  {'change':>8}  verdict")
    worse = 0
    for key in both:
        x, y = a[key]["value"], b[key]["value"]
        v = verdict(x, y, b[key].get("better", "lower"), tolerance)
        worse += v == "worse"
        change = f"{(y - x) / abs(x) * 100:+.1f}%" if x else "n/a"
        lines.append(
            f"{key:<{width}}  {x:>12.4g}  {y:>12.4g}  {change:>8}  {v} "
            f"({b[key]['unit']}, {b[key].get('better', 'lower')} is better)"
        )
    for key in sorted(set(a) ^ set(b)):
        lines.append(f"{key}: only in the {'old' if key in a else 'new'} file")
    lines.append(f"{worse} of {len(both)} figures worse by more than {tolerance:.0%}")
    return lines, worse


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--tolerance", type=float, default=0.10, help="relative change ignored")
    args = ap.parse_args(argv)
    try:
        lines, worse = compare(load(args.old), load(args.new), args.tolerance)
    except ResultsError as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 1 if worse else 0


if __name__ == "__main__":
    raise SystemExit(main())
