"""MkDocs hook: the benchmark plots, from where the scripts write them.

``benchmarks/*.py`` write their figures to ``benchmarks/results/`` (tracked), which is
outside ``docs/``. This hook adds each ``benchmarks/results/*.png`` to the site as
``benchmarks/results/NAME.png``, so a page under ``docs/benchmarks/`` shows it with
``![...](results/NAME.png)``: one copy of each plot, the one the script wrote, and a
missing plot is a broken link (the strict build fails).
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def on_files(files, config):
    for png in sorted(RESULTS.glob("*.png")):
        files.append(
            File.generated(config, f"benchmarks/results/{png.name}", abs_src_path=str(png))
        )
    return files
