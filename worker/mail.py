"""The bodies of a notification: one document (a title, paragraphs, tables, an optional daily chart) rendered twice,
as plain text and as HTML. The HTML goes through Jinja2 with autoescaping, so every value from the data (product
names, customer names, categories) is escaped; the chart is inline SVG, so the page fetches nothing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from worker.report_page import Chart

_templates = Environment(
    loader=FileSystemLoader(Path(__file__).with_name("templates")), autoescape=True, undefined=StrictUndefined
)


@dataclass(frozen=True)
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Document:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    chart: Chart | None = None  # the daily trend, HTML only
    chart_title: str = ""


def render_html(document: Document) -> str:
    return _templates.get_template("notification.html").render(doc=document)


def _text_table(table: Table) -> list[str]:
    widths = [
        max(len(h), *(len(r[i]) for r in table.rows)) if table.rows else len(h) for i, h in enumerate(table.headers)
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(table.headers, widths, strict=True))
    lines = [table.title, "-" * len(table.title), line]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table.rows]
    return lines if table.rows else [*lines[:2], "(none)"]


def render_text(document: Document) -> str:
    lines = [document.title, "=" * len(document.title), ""]
    for paragraph in document.paragraphs:
        lines += [paragraph, ""]
    for table in document.tables:
        lines += [*_text_table(table), ""]
    return "\n".join(lines).rstrip() + "\n"
