"""Griffe extension: the reST in fedray's docstrings, as the Markdown the site renders.

fedray's docstrings name other objects the Sphinx way (:class:`~fedray.tasks.Task`,
:func:`gaussian`, :meth:`Unmasker.unmask`). Markdown would print the role as text; this
extension turns each into an *optional* autorefs cross-reference: a link where the site
renders that object (a name without a package is looked up from the docstring's own
object outwards: its members, its class's, its module's), else plain code, without a
warning. ``~`` shows the last component only, as in Sphinx. A paragraph ending in reST's
literal-block marker ``::`` ends in ``:``.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`(~?)([\w.]+)`")


def _resolve(name: str, obj: Any) -> str:
    """The full path of ``name`` as seen from ``obj``'s docstring: a dotted ``fedray.``
    name as it is; else the first of ``obj``, its class, its module, its package that
    has a member of that name (an alias counts as its target); else ``name``."""
    if name.startswith("fedray."):
        return name
    scope = obj
    while scope is not None:
        try:
            found = scope[name]
        except Exception:  # not a member here (or not a scope at all): look further out
            found = None
        if found is not None:
            return getattr(found, "target_path", None) or found.path
        scope = getattr(scope, "parent", None)
    return name


def rewrite(text: str, obj: Any) -> str:
    """``text`` with each role replaced by an optional cross-reference."""

    def link(match: re.Match) -> str:
        short, name = match.group(1), match.group(2)
        title = name.rsplit(".", 1)[-1] if short else name
        identifier = _resolve(name, obj)
        return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'

    text = ROLE.sub(link, text)
    # reST's literal-block marker: "text::" is "text:" before the indented block, a
    # lone "::" nothing (Markdown takes the indented block as code by itself).
    text = re.sub(r"\s+::$", "", text, flags=re.M)
    return re.sub(r"::$", ":", text, flags=re.M)


class SphinxRoles(Extension):
    """Rewrite the roles of every docstring griffe loads."""

    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        del kwargs
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value, obj)
