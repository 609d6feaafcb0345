"""The hand mutants (tests/mutants/run_hand_mutants.py) still apply: each one's original
text occurs exactly once in its file. Code that moved would otherwise make a mutant
report "not applied" and guard nothing (nine had rotted this way before this check)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _mutants():
    spec = importlib.util.spec_from_file_location(
        "run_hand_mutants", ROOT / "tests/mutants/run_hand_mutants.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("run_hand_mutants", module)
    spec.loader.exec_module(module)
    return module.MUTANTS


def test_every_hand_mutant_applies_exactly_once_and_changes_something():
    mutants = _mutants()
    assert len(mutants) > 200
    names = [m.name for m in mutants]
    assert len(names) == len(set(names)), "two mutants share a name"
    stale = []
    for m in mutants:
        text = (ROOT / m.file).read_text()
        if text.count(m.old) != 1 or m.old == m.new:
            stale.append(f"{m.name}: {m.file} holds its text {text.count(m.old)} times")
        for test in m.tests:
            assert (ROOT / test).is_file(), f"{m.name}: no test file {test}"
    assert not stale, "; ".join(stale)
