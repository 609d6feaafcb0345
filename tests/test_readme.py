"""Every block fenced as ```bash runnable, in README.md or any page under docs/, pastes
into bash and exits 0.

The convention (docs/development.md, Tests): a fenced block whose info string is
``bash runnable`` is run as one bash script (``set -euo pipefail``, so each command
must exit 0), from the repository root, in a fresh HOME. Keep such blocks fast: the
suite is over its time budget, so the jobs they launch are capped (``JOB_BUDGET``).
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.conftest import ROOT

FENCE = re.compile(r"^```bash runnable[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
# A line that starts a federated job (Ray, actors, rounds): what makes a block cost.
LAUNCH = re.compile(r"^\s*(make run\b|\S*python\S* -m fedray\.(launch|site)\b)", re.M)
# The runnable blocks launch 5 jobs in all (about 130 s on the 2-core machine): move a
# block rather than add one; a new block may run --help or a tool without Ray.
JOB_BUDGET = 5


def runnable_blocks(text: str) -> list[str]:
    return [m.group(1) for m in FENCE.finditer(text)]


def documents() -> list[str]:
    """README.md and every Markdown page under docs/, as paths from the repository root."""
    pages = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.md"))
    return ["README.md", *pages]


BLOCKS = {
    f"{doc}#{i}": block
    for doc in documents()
    for i, block in enumerate(runnable_blocks((ROOT / doc).read_text()))
}


def test_the_docs_have_runnable_blocks_and_the_parser_finds_them():
    assert len(BLOCKS) >= 3
    assert any(name.startswith("docs/") for name in BLOCKS)
    sample = "x\n```bash runnable\necho a\n```\n```bash\nnot this\n```\n"
    assert runnable_blocks(sample) == ["echo a\n"]


def test_the_runnable_blocks_launch_no_more_jobs_than_the_budget():
    assert LAUNCH.findall("make run ARGS=x\n.venv/bin/python -m fedray.launch a=1\necho\n")
    jobs = {name: len(LAUNCH.findall(block)) for name, block in BLOCKS.items()}
    assert sum(jobs.values()) <= JOB_BUDGET, (
        f"the runnable blocks launch {sum(jobs.values())} jobs, over the budget of "
        f"{JOB_BUDGET}: {jobs}"
    )


@pytest.mark.slow
@pytest.mark.parametrize("block", list(BLOCKS.values()), ids=list(BLOCKS))
def test_runnable_block_exits_0(block, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["HOME"] = str(tmp_path)  # a first-time user: no ~/.ray yet
    proc = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + block],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (
        f"{block}\n--- exit {proc.returncode}:\n" + (proc.stdout + proc.stderr)[-3000:]
    )
