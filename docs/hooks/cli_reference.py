"""MkDocs hook: the command-line reference shows each command's own ``--help``.

A page may hold these markers, each on a line of its own; the build replaces them:

* ``<!-- help: MODULE [ARGS...] -->``: the output of ``python -m MODULE [ARGS...] --help``,
  taken in-process from the module's argparse ``main(argv)`` (``fedray.tools.certs``,
  ``fedray.tools.keys deal``, ...), 88 columns wide;
* ``<!-- hydra-flags -->``: a table of the flags Hydra's own parser takes, which
  ``python -m fedray.launch`` and ``python -m fedray.site`` pass through to Hydra.

So the reference cannot drift from the flags the code parses. A module without a
``main(argv)``, or one whose help cannot be taken, is a warning (the strict build fails).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import re

log = logging.getLogger("mkdocs.hooks.cli_reference")

HELP = re.compile(r"^<!-- help: ([\w.]+)((?: [\w-]+)*) -->$", re.M)
HYDRA_FLAGS = "<!-- hydra-flags -->"
WIDTH = "88"


def help_text(module: str, args: list[str]) -> str:
    """What ``python -m MODULE ARGS --help`` prints, from the module's ``main(argv)``."""
    main = importlib.import_module(module).main
    out = io.StringIO()
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main([*args, "--help"])
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    text = out.getvalue().rstrip()
    if not text.startswith("usage:"):
        raise ValueError(f"python -m {module} {' '.join(args)} --help printed no usage")
    return text


def hydra_flags() -> str:
    """Hydra's own command-line flags as a Markdown table (from Hydra's parser)."""
    from hydra._internal.utils import get_args_parser

    rows = ["| flag | meaning |", "|---|---|"]
    for action in get_args_parser()._actions:
        if not action.option_strings:
            continue  # the overrides themselves: the configuration reference
        flags = ", ".join(f"`{flag}`" for flag in action.option_strings)
        if action.choices:
            flags += " " + "\\|".join(f"`{c}`" for c in action.choices)
        meaning = str(action.help).strip().splitlines()[0].rstrip(":")
        rows.append(f"| {flags} | {meaning.replace('|', '/')} |")
    return "\n".join(rows)


def on_page_markdown(markdown, page, config, files):
    """Fill in the markers (MkDocs event)."""
    del config, files

    def fill(match: re.Match) -> str:
        module, args = match.group(1), match.group(2).split()
        try:
            text = help_text(module, args)
        except Exception as exc:
            log.warning("%s: cannot take the help of %s: %s", page.file.src_uri, module, exc)
            return match.group(0)
        return f"```text\n{text}\n```"

    markdown = HELP.sub(fill, markdown)
    if HYDRA_FLAGS in markdown:
        markdown = markdown.replace(HYDRA_FLAGS, hydra_flags())
    return markdown
