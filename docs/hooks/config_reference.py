"""MkDocs hook: the configuration reference, generated from the code at every build.

``reference/configuration.md`` is not a file in ``docs/``: this hook writes it from

* the structured-config dataclasses in ``fedray/config.py`` (``FedrayConfig`` and the
  dataclasses it nests): every key with its type (as annotated), its default (the value
  the default job, ``conf/config.yaml``, composes to; the schema's own default beside it
  where a YAML file changes it), the allowed values where ``__post_init__`` checks them
  against a tuple (``_choice(KEY, self.FIELD, CHOICES)``), and its attribute docstring;
* the config groups in ``conf/``: each option file and what it sets.

A key without an attribute docstring (a string literal right under the field) is logged
as a warning, so ``mkdocs build --strict`` (``make docs``) fails and names it.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import logging
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PAGE = "reference/configuration.md"
ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"

log = logging.getLogger("mkdocs.hooks.config_reference")

# Folders of conf/ that are not groups of the job's config, and what they hold.
EXAMPLE_GROUPS = {
    "site": "an example of a site's policy file, which `python -m fedray.site` reads with "
    "`federation.policy=FILE` (see [Site policy file](../site-policy.md))",
}


@dataclass
class Key:
    """One configuration key, as the reference shows it."""

    path: str  # dotted, as on the command line: dataset.dirichlet_alpha
    owner: str  # the dataclass that declares it
    type: str  # the annotation, as written
    default: Any  # the schema's default (dataclasses.MISSING for a config group)
    doc: str  # the attribute docstring ("" when there is none)
    choices: tuple[str, ...] | None  # the values __post_init__ allows, if it checks a tuple
    nested: type | None  # the dataclass this key holds (a section of its own)
    open: bool = False  # a mapping that takes keys of the user's own (+KEY.NAME=VALUE)


def attribute_docs(source: str) -> dict[str, dict[str, str]]:
    """Class name -> field name -> its attribute docstring (the string literal right
    under ``name: type = default``), from a module's source."""
    docs: dict[str, dict[str, str]] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        found = docs.setdefault(node.name, {})
        body = node.body
        for stmt, after in zip(body, [*body[1:], None], strict=True):
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            if (
                isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                found[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def annotations(source: str) -> dict[str, dict[str, str]]:
    """Class name -> field name -> its annotation as written in the source."""
    out: dict[str, dict[str, str]] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            out[node.name] = {
                s.target.id: ast.unparse(s.annotation)
                for s in node.body
                if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
            }
    return out


def checked_choices(source: str, module: Any) -> dict[str, dict[str, tuple[str, ...]]]:
    """Class name -> field name -> the tuple a method of the class checks it against with
    ``_choice(KEY, self.FIELD, CHOICES)`` (a module constant or a literal tuple)."""
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    for cls in ast.walk(ast.parse(source)):
        if not isinstance(cls, ast.ClassDef):
            continue
        for call in ast.walk(cls):
            if not (
                isinstance(call, ast.Call)
                and isinstance(call.func, ast.Name)
                and call.func.id == "_choice"
                and len(call.args) == 3
            ):
                continue
            attr, allowed = call.args[1], call.args[2]
            if not (
                isinstance(attr, ast.Attribute)
                and isinstance(attr.value, ast.Name)
                and attr.value.id == "self"
            ):
                continue
            if isinstance(allowed, ast.Name):
                values = tuple(getattr(module, allowed.id))
            else:
                values = tuple(ast.literal_eval(allowed))
            out.setdefault(cls.name, {})[attr.attr] = values
    return out


def walk(cls: type, source: str, module: Any) -> list[Key]:
    """Every key of ``cls`` (a dataclass of ``module``, whose source is ``source``) and of
    the dataclasses it nests, depth first."""
    facts = (attribute_docs(source), annotations(source), checked_choices(source, module))
    return _walk(cls, facts, "", getattr(module, "_is_open", lambda hint: False))


def _walk(cls: type, facts: tuple[dict, dict, dict], prefix: str, is_open) -> list[Key]:
    docs, types, choices = facts
    hints = typing.get_type_hints(cls)
    keys: list[Key] = []
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        hint = hints[f.name]
        nested = hint if dataclasses.is_dataclass(hint) else None
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING and nested is None:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        keys.append(
            Key(
                path=path,
                owner=cls.__name__,
                type=types.get(cls.__name__, {}).get(f.name, str(hint)),
                default=default,
                doc=docs.get(cls.__name__, {}).get(f.name, ""),
                choices=choices.get(cls.__name__, {}).get(f.name),
                nested=nested,
                open=nested is None and is_open(hint),
            )
        )
        if nested is not None:
            keys.extend(_walk(nested, facts, path + ".", is_open))
    return keys


def undocumented(keys: list[Key]) -> list[str]:
    """The keys without an attribute docstring."""
    return [k.path for k in keys if not k.doc.strip()]


# -- rendering -------------------------------------------------------------------------------

_CODE = re.compile(r"(`+)(.+?)\1", re.S)
_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`~?([\w.]+)`")


def _cell(text: str) -> str:
    """Docstring text for a table cell: one line, ``rst literals`` as code spans, pipes
    outside code escaped."""
    text = _ROLE.sub(r"`\1`", " ".join(text.split()))
    out, last = [], 0
    for m in _CODE.finditer(text):
        out.append(text[last : m.start()].replace("|", "\\|"))
        out.append(f"`{m.group(2)}`" if "`" not in m.group(2) else m.group(0))
        last = m.end()
    out.append(text[last:].replace("|", "\\|"))
    return "".join(out)


def _value(value: Any) -> str:
    """A value as YAML (and the command line) spell it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, separators=(", ", ": ")) if value else str(type(value)())
    return str(value)


def _plain(value: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def default_job() -> Any:
    """The config ``python -m fedray.launch`` composes with no override."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fedray.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(config_name="config")


def _anchor(path: str) -> str:
    return path.replace(".", "-")


def _default_cell(key: Key, job: Any) -> str:
    from omegaconf import OmegaConf

    if key.nested is not None:
        section = _anchor(key.path)
        option = OmegaConf.select(job, key.path + ".name", default=None)
        picked = f"`{option}` option; " if option is not None else ""
        return f"{picked}see [`{key.path}`](#{section})"
    composed = _plain(OmegaConf.select(job, key.path, default=None))
    cell = f"`{_value(composed)}`"
    if key.default is not dataclasses.MISSING and _plain(key.default) != composed:
        cell += f" (schema: `{_value(key.default)}`)"
    return cell


def _table(keys: list[Key], job: Any) -> list[str]:
    lines = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for k in keys:
        allowed = ", ".join(f"`{c}`" for c in k.choices) if k.choices else ""
        doc = _cell(k.doc) if k.doc.strip() else "**undocumented**"
        lines.append(f"| `{k.path}` | `{k.type}` | {_default_cell(k, job)} | {allowed} | {doc} |")
    return lines


def _group_defaults() -> dict[str, str]:
    import yaml

    defaults = yaml.safe_load((CONF / "config.yaml").read_text())["defaults"]
    return {k: v for d in defaults if isinstance(d, dict) for k, v in d.items()}


def _comments(text: str) -> str:
    """A YAML file's own note: its full-line comments before its first key other than
    ``name`` and ``defaults`` (later ones are about that key; Hydra's ``@package`` line
    and the indented lines that continue a key's trailing comment are not notes)."""
    lines = []
    for line in text.splitlines():
        key = re.match(r"([A-Za-z_]\w*):", line)
        if key and key.group(1) not in ("name", "defaults"):
            break
        if line.startswith("#") and not line.startswith("# @package"):
            lines.append(line.lstrip("#").strip())
    return " ".join(lines)


def _flatten(data: Any, prefix: str) -> list[str]:
    if isinstance(data, dict) and data:
        out = []
        for k, v in data.items():
            out.extend(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return [f"{prefix}={_value(data)}"]


def option_files() -> list[Path]:
    """Every option file of a config group: ``conf/<group>/<option>.yaml``."""
    return sorted(CONF.glob("*/*.yaml"))


def _groups_section(job_groups: set[str]) -> list[str]:
    import yaml

    chosen = _group_defaults()
    lines = [
        "## Config groups",
        "",
        "`conf/config.yaml` composes one option of each group (its `defaults` list); pick "
        "another on the command line with `GROUP=OPTION`, e.g. `dataset=csv`. An option "
        "file sets the keys listed beside it; every other key keeps its default above.",
        "",
    ]
    for group_dir in sorted({p.parent for p in option_files()}):
        group = group_dir.name
        lines += [f"### `{group}` {{#group-{group}}}", ""]
        if group not in job_groups:
            what = EXAMPLE_GROUPS.get(group, "example files (see their notes)")
            lines += [f"Not a group of the job's config: `conf/{group}/` holds {what}.", ""]
        elif group in chosen:
            lines += [f"Default: `{group}={chosen[group]}`.", ""]
        lines += ["| option | file | notes | sets |", "|---|---|---|---|"]
        for path in sorted(group_dir.glob("*.yaml")):
            text = path.read_text()
            data = yaml.safe_load(text) or {}
            is_global = "# @package _global_" in text
            notes = _comments(text)
            sets: list[str] = []
            for entry in data.pop("defaults", []) if isinstance(data, dict) else []:
                if isinstance(entry, str):
                    sets.append(f"extends `{entry}`")
                else:
                    for k, v in entry.items():
                        sets.append(f"`{k.replace('override /', '')}={v}`")
            if group in job_groups:
                if data:
                    sets += [f"`{item}`" for item in _flatten(data, "" if is_global else group)]
            else:
                notes = (notes + " ") if notes else ""
                notes += f"Top-level keys: {', '.join(f'`{k}`' for k in data)}."
            lines.append(
                f"| `{path.stem}` | `conf/{group}/{path.name}` | {_cell(notes)} | "
                f"{'<br>'.join(sets)} |"
            )
        lines.append("")
    return lines


def render() -> tuple[str, list[str]]:
    """The page's Markdown, and the keys that have no docstring."""
    import fedray.config as config

    source = Path(config.__file__).read_text()
    keys = walk(config.FedrayConfig, source, config)
    job = default_job()
    top = [k for k in keys if "." not in k.path]
    lines = [
        "# Configuration reference",
        "",
        "Every key of a job's configuration, generated at each build from the "
        "structured-config dataclasses in `fedray/config.py` (type, default, the values "
        "the code allows where it checks a list, and the field's docstring) and from the "
        "option files in `conf/`. Set a key on the command line as `KEY=VALUE`, e.g. "
        "`python -m fedray.launch rounds=5 crypto.key_bits=3072`; a misspelled key is "
        "refused before Ray starts, naming the nearest one.",
        "",
        "**default** is what the default job (`conf/config.yaml`, no override) composes "
        "to; where a config file changes the dataclass's own default, that one is shown "
        "as *schema*. A group option (e.g. `model=hf`) may set other values: see "
        "[Config groups](#config-groups). *Open mappings* ("
        + ", ".join(f"`{k.path}`" for k in keys if k.open)
        + ") take keys of your own with `+`, e.g. `+cluster.sites.0.site_a=1`; the "
        "launcher refuses any other key that is not in the schema.",
        "",
        "## Top-level keys",
        "",
        f"`{config.FedrayConfig.__name__}`: {_cell(config.FedrayConfig.__doc__ or '')}",
        "",
        *_table(top, job),
        "",
    ]
    sections = [k for k in keys if k.nested is not None]
    for section in sections:
        children = [k for k in keys if "." in k.path and k.path.rsplit(".", 1)[0] == section.path]
        cls = section.nested
        lines += [
            f"## `{section.path}` {{#{_anchor(section.path)}}}",
            "",
            f"`{cls.__name__}`: {_cell(inspect.cleandoc(cls.__doc__ or ''))}",
            "",
            *_table(children, job),
            "",
        ]
    lines += _groups_section({k.path for k in top})
    return "\n".join(lines) + "\n", undocumented(keys)


# -- the hook --------------------------------------------------------------------------------


def on_files(files, config):
    """Add the generated page to the site's files (MkDocs event)."""
    from mkdocs.structure.files import File

    content, missing = render()
    for key in missing:
        log.warning(
            "configuration key %r has no docstring: add a string literal right under its "
            "field in fedray/config.py",
            key,
        )
    files.append(File.generated(config, PAGE, content=content))
    return files
