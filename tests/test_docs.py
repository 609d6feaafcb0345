"""The documentation site (mkdocs.yml, docs/): it builds in strict mode, its generated
configuration reference holds every key and every config option, the README is short
(at most 200 lines), every page it links to exists and its example is a tested block,
and the output-file reference lists exactly the fields a real run writes."""

from __future__ import annotations

import csv
import dataclasses
import html
import json
import os
import re
import subprocess
import sys
import time
import typing
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, compose

DOCS = ROOT / "docs"
HOOKS = DOCS / "hooks"
BUILD_BUDGET_S = 60  # about 7 s on the 2-core machine; a slower build is a regression


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site as `make docs` builds it (strict), into a temporary folder."""
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert "WARNING" not in proc.stderr + proc.stdout, proc.stderr
    assert seconds < BUILD_BUDGET_S, f"the site took {seconds:.0f} s to build"
    return out


def _page(site: Path, src: str) -> str:
    """The built HTML of the docs page ``src`` (a path under docs/)."""
    rel = Path(src).with_suffix("")
    path = site / (rel.parent if rel.name == "index" else rel) / "index.html"
    assert path.is_file(), f"docs/{src} was not built ({path} is missing)"
    return path.read_text()


def _text(page: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", page))


# -- (a) the strict build, and what it must catch ------------------------------------------


def test_site_builds_in_strict_mode(site):
    """Broken links, anchors and undocumented configuration keys are warnings, so any of
    them fails the build (the fixture asserts it); every nav section is there."""
    for page in (
        "index.md",
        "tutorials/index.md",
        "how-to/index.md",
        "explanations/index.md",
        "explanations/architecture.md",
        "reference/index.md",
        "reference/configuration.md",
        "reference/cli.md",
        "reference/outputs.md",
        "benchmarks/index.md",
        "tutorials/first-job.md",
        "tutorials/your-own-task.md",
        "explanations/threat-model.md",
        "how-to/resume.md",
        "development.md",
    ):
        _page(site, page)
    # The diagrams are Mermaid code, handed to Mermaid (not printed as code blocks).
    architecture = _page(site, "explanations/architecture.md")
    assert architecture.count('<pre class="mermaid">') == 2
    # A runnable block shows as a bash block, not as text that swallows the page after it
    # (Material's fences refuse the info string "bash runnable"; the build drops the marker).
    first_job = _page(site, "tutorials/first-job.md")
    assert "runnable" not in _text(first_job)
    assert 'id="change-the-job"' in first_job  # a heading after the runnable block
    assert '<span class="nv">ARGS</span>' in first_job  # highlighted as bash
    # The benchmark plots come from benchmarks/results/ (docs/hooks/benchmark_results.py).
    assert (site / "benchmarks" / "results" / "scaling.png").is_file()
    assert '<img alt="scaling" src="../results/scaling.png"' in _page(site, "benchmarks/scaling.md")


def test_included_pages_are_included_whole(site):
    """The threat model holds federation.md's "Not yet" list, and the Kubernetes how-to is
    jobs/k8s/README.md (pymdownx.snippets): every item of each is on the built page."""
    federation = (DOCS / "federation.md").read_text()
    not_yet = federation.split("[start:not-yet]", 1)[1].split("[end:not-yet]", 1)[0]
    items = re.findall(r"^- \*\*(.+?)\*\*", not_yet, flags=re.M | re.S)
    assert len(items) > 10, items
    threat_model = " ".join(_text(_page(site, "explanations/threat-model.md")).split())
    missing = [i for i in items if " ".join(i.replace("`", "").split()) not in threat_model]
    assert not missing, f"the threat model lacks these Not yet items: {missing}"
    k8s = (ROOT / "jobs" / "k8s" / "README.md").read_text()
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", k8s, flags=re.S), flags=re.M)
    kubernetes = _text(_page(site, "how-to/kubernetes.md"))
    for heading in headings:
        assert heading.replace("`", "") in kubernetes, heading


def _hook(name: str):
    sys.path.insert(0, str(HOOKS))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(HOOKS))


def test_a_key_without_a_docstring_is_reported():
    """The hook names a field whose docstring is gone (the build then fails: strict)."""
    import fedray.config as config

    hook = _hook("config_reference")
    source = Path(config.__file__).read_text()
    assert hook.undocumented(hook.walk(config.FedrayConfig, source, config)) == []
    without = re.sub(
        r'(\n    topk_fraction: float = 0\.01\n)    """.*?"""\n', r"\1", source, flags=re.S
    )
    assert without != source
    keys = hook.walk(config.FedrayConfig, without, config)
    assert hook.undocumented(keys) == ["compression.topk_fraction"]


# -- (b) every key and option in the configuration reference -------------------------------


def _schema_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key of the structured config, nested dataclasses walked recursively."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _schema_keys(hints[f.name], f"{prefix}{f.name}.")
    return keys


def test_every_configuration_key_and_option_is_in_the_reference(site):
    from fedray.config import FedrayConfig

    page = _page(site, "reference/configuration.md")
    keys = _schema_keys(FedrayConfig)
    assert len(keys) > 100 and "model.lora.target_modules" in keys
    missing = [k for k in keys if f"<td><code>{k}</code></td>" not in page]
    assert not missing, f"keys missing from the configuration reference: {missing}"
    assert "undocumented" not in _text(page)
    options = sorted(ROOT.glob("conf/*/*.yaml"))
    assert len(options) > 30
    missing = [p for p in options if f"<code>{p.relative_to(ROOT)}</code>" not in page]
    assert not missing, f"config options missing from the reference: {missing}"
    # A choice the code checks against a tuple is listed as allowed.
    row = re.search(r"<td><code>crypto\.custody</code></td>.*?</tr>", page, re.S).group(0)
    assert "<code>threshold</code>" in row and "<code>shared</code>" in row


def test_the_cli_reference_holds_each_tools_own_help(site):
    built = _page(site, "reference/cli.md")
    page = _text(built)
    commands = sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for path in (ROOT / "fedray").rglob("*.py")
        if 'if __name__ == "__main__":' in path.read_text()
    )
    assert "fedray.launch" in commands and "fedray.tools.certs" in commands
    sections = re.findall(r'<h2 id="[^"]*"><code>python -m ([\w.]+)</code>', built)
    missing = [c for c in commands if c not in sections]
    assert not missing, f"commands without a section in the CLI reference: {missing}"
    for usage in (
        "usage: python -m fedray.tools.certs",
        "usage: python -m fedray.tools.keys deal",
        "usage: python -m fedray.tools.tiny_model",
        "usage: python -m fedray.export",
        "usage: python -m fedray.predict",
    ):
        assert usage in page
    for flag in (
        "--coordinator",
        "--sites",
        "--clients",
        "--dealer",
        "--threshold",
        "--num-labels",
    ):
        assert flag in page, flag
    assert "--multirun" in page and "--cfg" in page  # Hydra's flags, from its parser


# -- (c) the README: short, its links, its example ------------------------------------------

README_MAX_LINES = 200


def test_the_readme_is_at_most_200_lines():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


def test_the_readmes_example_is_a_tested_block():
    """Each command of the README's example is a line of a runnable block of the docs,
    which tests/test_readme.py runs (one copy of the cost, not two)."""
    from tests.test_readme import BLOCKS

    text = (ROOT / "README.md").read_text()
    example = re.search(r"\n## An example\n.*?```bash\n(.*?)```", text, re.S)
    assert example, "README.md has no example block under '## An example'"
    commands = [
        re.sub(r"\s+#.*$", "", line).strip()
        for line in example.group(1).splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert commands
    tested = {line.strip() for name, block in BLOCKS.items() for line in block.splitlines()}
    untested = [c for c in commands if c not in tested]
    assert not untested, f"README example commands no runnable block runs: {untested}"


def _readme_links() -> list[str]:
    text = (ROOT / "README.md").read_text()
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # not links in code blocks
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_every_page_the_readme_links_exists(site):
    relative = [
        link for link in _readme_links() if not re.match(r"[a-z]+:", link) and link[0] != "#"
    ]
    docs_links = [link for link in relative if link.startswith("docs/")]
    assert docs_links, "README.md links no docs page"
    for link in relative:
        path, _, anchor = link.partition("#")
        assert (ROOT / path).exists(), f"README.md links {link}, which does not exist"
        if not path.startswith("docs/") or not path.endswith(".md"):
            continue
        page = _page(site, path.removeprefix("docs/"))  # in the site, not only on disk
        if anchor:
            assert f'id="{anchor}"' in page, f"README.md links {link}: no such anchor"


# -- the output files: documented fields against a real run --------------------------------


def _documented(section: str) -> dict[str, str]:
    """The first table under ``## section`` in docs/reference/outputs.md: name -> meaning."""
    text = (DOCS / "reference" / "outputs.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| (.*) \|$", body, flags=re.M)
    names = [name for name, _ in rows]
    assert len(set(names)) == len(names), f"{section}: a field documented twice: {names}"
    return dict(rows)


def _documented_table(section: str, after: str) -> dict[str, str]:
    """The table under ``## section`` that follows the line starting with ``after``."""
    text = (DOCS / "reference" / "outputs.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    body = body.split(after, 1)[1]
    table = body.split("\n\n", 2)[1]
    return dict(re.findall(r"^\| `([^`]+)` \| (.*) \|$", table, flags=re.M))


def test_documented_output_fields_are_what_a_run_writes(ray_2cpus, tmp_path):
    """One small DP run (1 round, 2 clients) writes every file; each file's fields are
    exactly the documented ones, but for the summary fields documented as written only
    in some runs (a resume, an early stop, Ctrl-C), which the driver sets. The driver
    writes the same summary keys with or without encryption (null where they do not
    apply), so the run is a plaintext one."""
    from fedray.runtime.driver import run_experiment
    from fedray.runtime.outputs import METRIC_COLUMNS

    over = [
        "crypto=none",  # the same fields as with encryption (null here), 5 s sooner
        "privacy=dp",
        "strategy=fedadam",
        "rounds=1",
        "num_clients=2",
        "clients_per_round=2",
        "dataset.share_label_counts=true",
    ]
    run_experiment(compose(over), tmp_path)

    files = {p.name for p in tmp_path.iterdir()}
    overview = (DOCS / "reference" / "outputs.md").read_text().split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| \[?`([^`/]+)/?`", overview, flags=re.M))
    assert files <= listed, f"files not in the output reference: {files - listed}"

    summary = json.loads((tmp_path / "summary.json").read_text())
    documented = _documented("`summary.json`")
    sometimes = {k for k, meaning in documented.items() if meaning.startswith("only ")}
    assert set(documented) - set(summary) == sometimes, set(documented) ^ set(summary)
    assert set(summary) <= set(documented), f"undocumented: {set(summary) - set(documented)}"
    driver = (ROOT / "fedray" / "runtime" / "driver.py").read_text()
    for key in sometimes:
        assert f'summary["{key}"]' in driver, f"{key} is documented but never written"

    with (tmp_path / "metrics.csv").open() as fh:
        header = next(csv.reader(fh))
    assert header == list(_documented("`metrics.csv`")) == METRIC_COLUMNS

    clients = json.loads((tmp_path / "clients.json").read_text())
    assert {frozenset(c) for c in clients.values()} == {frozenset(_documented("`clients.json`"))}

    checkpoints = tmp_path / "checkpoints"
    latest = checkpoints / (checkpoints / "latest").read_text().strip()
    state = json.loads((latest / "state.json").read_text())
    assert set(state) == set(_documented_table("`checkpoints/`", "`round_NNNNN/state.json`"))
    with np.load(latest / "arrays.npz") as npz:
        arrays = set(npz.files)
    assert arrays == {"weights", "strategy.m", "strategy.v"}  # FedAdam's moments
    documented_arrays = _documented_table("`checkpoints/`", "`round_NNNNN/arrays.npz`")
    assert set(documented_arrays) == {"weights", "strategy.NAME"}

    ledger = json.loads((checkpoints / "privacy_ledger.json").read_text())
    assert set(ledger) == set(_documented("Privacy ledger"))
    assert set(ledger["privacy"]) == {"steps", "participation"}  # client level, as documented
    assert set(state["privacy"]) == set(ledger["privacy"])
