"""The README's config reference, generated from the dataclasses' own field comments.

Each config field carries a trailing `# comment` in its dataclass; this module turns
them into one Markdown table per section, so the documentation cannot drift from the
code: tests/tools/test_docs.py checks that README.md holds exactly this text.
"""

from __future__ import annotations

import dataclasses
import inspect
import re

from moge.training.config import SECTIONS

_FIELD_RE = re.compile(r"^\s{4}(\w+): [^=#]+?(?:= (?P<default>[^#]+?))?\s*(?:#\s*(?P<doc>.*))?$")


def field_comments(cls: type) -> dict[str, str]:
    """{field name: its trailing comment} read from the class source ('' if none)."""
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    for line in inspect.getsource(cls).splitlines():
        match = _FIELD_RE.match(line)
        # The docstring may mention a field too ("    router: ..."): keep a commented match.
        if match and match.group(1) in names and not out.get(match.group(1)):
            out[match.group(1)] = (match.group("doc") or "").strip()
    return out


def _default(field: dataclasses.Field) -> str:
    if field.default is dataclasses.MISSING:
        return "required"
    value = field.default
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def section_table(section: str) -> str:
    """Markdown table of one config section: field, default, meaning."""
    cls = SECTIONS[section]
    docs = field_comments(cls)
    rows = ["| field | default | meaning |", "|---|---|---|"]
    for field in dataclasses.fields(cls):
        if section == "moe" and field.name == "d_model":
            continue  # filled from model.d_model
        rows.append(f"| `{section}.{field.name}` | {_default(field)} | {docs.get(field.name, '')} |")
    return "\n".join(rows)


def config_reference() -> str:
    """Every section's table, in the order of a YAML run config."""
    parts = []
    for section in SECTIONS:
        doc = inspect.getdoc(SECTIONS[section])
        assert doc, f"{section}: its config dataclass needs a docstring"
        parts.append(f"**`{section}`**: {doc.splitlines()[0]}\n")
        parts.append(section_table(section) + "\n")
    return "\n".join(parts).rstrip() + "\n"


def undocumented_fields() -> list[str]:
    """Dotted names of fields that have no comment (the docs test keeps this empty)."""
    missing = []
    for section, cls in SECTIONS.items():
        docs = field_comments(cls)
        for field in dataclasses.fields(cls):
            if section == "moe" and field.name == "d_model":
                continue
            if not docs.get(field.name):
                missing.append(f"{section}.{field.name}")
    return missing


README_MARKERS = ("<!-- config-reference:start -->", "<!-- config-reference:end -->")


def replace_config_reference(readme: str) -> str:
    """README text with the block between the markers replaced by config_reference()."""
    start, end = README_MARKERS
    head, sep, rest = readme.partition(start)
    _, sep2, tail = rest.partition(end)
    if not sep or not sep2:
        raise ValueError(f"README.md: the markers {start} and {end} are missing")
    return f"{head}{start}\n{config_reference()}{end}{tail}"
