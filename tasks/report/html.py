"""The static HTML QA report: ``DIR/index.html`` across nights and one page per
night, each a single file with its figures embedded, so it opens from disk (or
any static web server) with nothing else running. ``DIR`` is a local folder or,
like the store, an object-store prefix (``s3://bucket/photocal.zarr.report``)."""

from __future__ import annotations

import base64
import datetime as dt
import html
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tasks.io import groups
from tasks.io.objstore import storage_options
from tasks.io.provenance import photocal_version
from tasks.io.store import is_local, local_path
from tasks.report.data import (
    light_curves,
    master_trends,
    night_files,
    night_qa,
    night_summary,
    report_nights,
)
from tasks.report.sections import (
    Block,
    Figure,
    Link,
    Section,
    Table,
    index_sections,
    night_sections,
)

INDEX = "index.html"

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 0 1.2em 3em; color: #1b1b1b; }
header { border-bottom: 2px solid #345; margin-bottom: 1em; }
h1 { font-size: 1.6em; margin: .6em 0 .2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ccd; padding-bottom: .15em; margin-top: 1.8em; }
nav a { margin-right: .9em; }
.meta { color: #555; font-size: .9em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: .92em; }
caption { caption-side: bottom; text-align: left; color: #555; font-size: .9em; padding-top: .3em; }
th, td { border: 1px solid #ccd; padding: .2em .55em; vertical-align: top; }
th { background: #eef1f6; text-align: left; }
tbody tr:nth-child(even) { background: #f7f8fb; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
figure { margin: .8em 0 1.4em; }
figure img { max-width: 100%; height: auto; border: 1px solid #dde; }
figcaption { color: #444; font-size: .9em; }
code { background: #f1f2f5; padding: 0 .25em; }
"""

_NUMBER = re.compile(r"^[-+]?(\d[\d,]*)?(\.\d+)?( %)?$|^–$")


@dataclass(frozen=True)
class ReportFiles:
    """What :func:`write_report` wrote."""

    index: Path | str
    """``index.html``: a path, or a URL for an object-store ``out``."""
    pages: dict[str, Path | str]


def page_name(night: str) -> str:
    """File name of a night's page."""
    return f"night-{night}.html"


def _inline(text: str) -> str:
    """Escape, then render `code` spans."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _cell(value: str | Link, tag: str = "td") -> str:
    if isinstance(value, Link):
        inner = f'<a href="{html.escape(value.href)}">{html.escape(value.text)}</a>'
        return f"<{tag}>{inner}</{tag}>"
    cls = ' class="num"' if tag == "td" and _NUMBER.match(value) else ""
    return f"<{tag}{cls}>{html.escape(value)}</{tag}>"


def _table(t: Table) -> str:
    head = "".join(_cell(c, "th") for c in t.columns)
    body = "\n".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in t.rows)
    caption = f"<caption>{_inline(t.caption)}</caption>" if t.caption else ""
    return (
        f'<table data-table="{html.escape(t.name)}">{caption}<thead><tr>{head}</tr></thead>'
        f"<tbody>\n{body}\n</tbody></table>"
    )


def _figure(f: Figure) -> str:
    data = base64.b64encode(f.png).decode("ascii")
    alt = html.escape(f.caption)
    return (
        f'<figure data-figure="{html.escape(f.name)}">'
        f'<img src="data:image/png;base64,{data}" alt="{alt}">'
        f"<figcaption>{alt}</figcaption></figure>"
    )


def _block(b: Block) -> str:
    if isinstance(b, Table):
        return _table(b)
    if isinstance(b, Figure):
        return _figure(b)
    return f"<p>{_inline(b)}</p>"


def render_page(
    title: str, sections: Sequence[Section], *, store: str, links: Sequence[Link] = ()
) -> str:
    """One self-contained HTML page."""
    nav = " ".join(
        [f'<a href="{html.escape(lk.href)}">{html.escape(lk.text)}</a>' for lk in links]
        + [f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections]
    )
    made = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n".join(
        f'<section id="{s.id}" data-section="{s.id}"><h2>{html.escape(s.title)}</h2>\n'
        + "\n".join(_block(b) for b in s.blocks)
        + "\n</section>"
        for s in sections
    )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
        f"<header><h1>{html.escape(title)}</h1>"
        f'<p class="meta">Store <code>{html.escape(store)}</code>; made {made} by photocal '
        f"{html.escape(photocal_version())}</p><nav>{nav}</nav></header>\n{body}\n</body></html>\n"
    )


def write_report(
    store: str | os.PathLike, out: str | os.PathLike, nights: Sequence[str] | None = None
) -> ReportFiles:
    """Write a page per night (default: every night in the store) and the index.

    The index lists every night of the store and links those with a page in
    ``out`` (written now or by an earlier report), so a nightly run that adds
    its night's page keeps the index complete.
    """
    store = os.fspath(store)
    have = report_nights(store)
    wanted = list(have if nights is None else nights)
    unknown = sorted(set(wanted) - set(have))
    if unknown:
        raise ValueError(
            f"{store}: no index or night groups for {unknown}; nights in the store: {have}"
        )
    target = _Target(os.fspath(out))
    trends = master_trends(store)
    pages: dict[str, Path | str] = {}
    for i, night in enumerate(wanted):
        links = [Link("index", INDEX)]
        if i > 0:
            links.append(Link(f"< {wanted[i - 1]}", page_name(wanted[i - 1])))
        if i + 1 < len(wanted):
            links.append(Link(f"{wanted[i + 1]} >", page_name(wanted[i + 1])))
        page = render_page(
            f"photocal QA: night {night}",
            night_sections(night_qa(store, night), trends),
            store=store,
            links=links,
        )
        pages[night] = target.write(page_name(night), page)
    on_disk = target.names()
    linked = {n: page_name(n) for n in have if page_name(n) in on_disk}
    index = render_page(
        "photocal QA report",
        index_sections(
            [night_summary(store, n) for n in have],
            linked,
            night_files(store, groups.UNKNOWN_NIGHT),
            trends,
            light_curves(store),
        ),
        store=store,
    )
    return ReportFiles(index=target.write(INDEX, index), pages=pages)


class _Target:
    """Where the pages go. Each page replaces the old one whole, so a reader never
    opens half a page: a local file by rename, an object by one PUT."""

    def __init__(self, out: str) -> None:
        self.local = local_path(out) if is_local(out) else None
        if self.local is not None:
            self.local.mkdir(parents=True, exist_ok=True)
            return
        import fsspec

        self.url = out.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **storage_options(self.url))

    def write(self, name: str, text: str) -> Path | str:
        if self.local is not None:
            path = self.local / name
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
            return path
        self.fs.pipe_file(f"{self.root}/{name}", text.encode("utf-8"))
        return f"{self.url}/{name}"

    def names(self) -> set[str]:
        """The pages already there (written now or by an earlier report)."""
        if self.local is not None:
            return {p.name for p in self.local.glob("*.html")}
        self.fs.invalidate_cache(self.root)
        return {Path(p).name for p in self.fs.glob(f"{self.root}/*.html")}
