"""The report's sections as Markdown, for Prefect artifacts: the same tables,
the same rounded numbers, and the figures inline as PNG data URIs (the Prefect
UI renders Markdown images)."""

from __future__ import annotations

import base64
from collections.abc import Sequence

from tasks.report.sections import Block, Figure, Link, Section, Table


def _text(text: str) -> str:
    """Markdown text: ``<night>`` would be read as an HTML tag and dropped, so
    angle brackets outside `code` spans become entities."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _escape(text: str) -> str:
    """A table cell or caption on one line."""
    return _text(text).replace("|", "\\|").replace("\n", " ")


def _cell(value: str | Link) -> str:
    if isinstance(value, Link):
        return f"[{_escape(value.text)}]({value.href})"
    return _escape(value)


def table(t: Table) -> str:
    lines = [
        "| " + " | ".join(_escape(c) for c in t.columns) + " |",
        "|" + "|".join("---" for _ in t.columns) + "|",
        *("| " + " | ".join(_cell(c) for c in row) + " |" for row in t.rows),
    ]
    if t.caption:
        lines += ["", f"*{_escape(t.caption)}*"]
    return "\n".join(lines)


def figure(f: Figure) -> str:
    data = base64.b64encode(f.png).decode("ascii")
    return f"![{_escape(f.caption)}](data:image/png;base64,{data})\n\n*{_escape(f.caption)}*"


def _block(b: Block) -> str:
    if isinstance(b, Table):
        return table(b)
    if isinstance(b, Figure):
        return figure(b)
    return _text(b)


def render(title: str, sections: Sequence[Section], *, intro: Sequence[Block] = ()) -> str:
    """A Markdown document: the title, ``intro`` blocks, then every section."""
    parts = [f"# {title}", *(_block(b) for b in intro)]
    for s in sections:
        parts.append(f"## {s.title}")
        parts += [_block(b) for b in s.blocks]
    return "\n\n".join(parts) + "\n"
