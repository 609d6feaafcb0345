"""MkDocs hook: a ```` ```bash runnable ```` block shows as a plain bash block.

The info string ``bash runnable`` marks the blocks ``tests/test_readme.py`` runs (in
README.md and in every page here). GitHub reads the first word as the language and
ignores the rest; Material's fences do not accept a bare second word and would print the
block as text, so the build drops the marker.
"""

from __future__ import annotations

import re

MARKER = re.compile(r"^```bash runnable[ \t]*$", re.M)


def on_page_markdown(markdown, page, config, files):
    return MARKER.sub("```bash", markdown)
