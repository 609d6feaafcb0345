"""Every README block fenced as ```bash runnable pastes into bash and exits 0.

The convention (README, Development): a fenced block whose info string is
``bash runnable`` is run as one bash script (``set -euo pipefail``, so each command
must exit 0), from the repository root, in a fresh HOME. Keep such blocks fast.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.conftest import ROOT

FENCE = re.compile(r"^```bash runnable[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def runnable_blocks(text: str) -> list[str]:
    return [m.group(1) for m in FENCE.finditer(text)]


BLOCKS = runnable_blocks((ROOT / "README.md").read_text())


def test_the_readme_has_runnable_blocks_and_the_parser_finds_them():
    assert len(BLOCKS) >= 3
    sample = "x\n```bash runnable\necho a\n```\n```bash\nnot this\n```\n"
    assert runnable_blocks(sample) == ["echo a\n"]


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_runnable_block_exits_0(block, tmp_path):
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
