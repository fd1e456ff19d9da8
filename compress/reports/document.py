"""Reports as data: headings, paragraphs, tables and figures rendered to Markdown and to one
self-contained HTML file (images inlined as base64 PNG, no scripts, no external URLs)."""

from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from compress.io import atomic_write_bytes, atomic_write_text  # noqa: E402

__all__ = ["Heading", "Para", "Table", "Figure", "save_figure", "render_markdown", "render_html", "write_document"]

DPI = 100


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    marked: set[int] = field(default_factory=set)


@dataclass
class Figure:
    path: str  # relative to the report folder, "figures/<name>.png"
    caption: str
    png: bytes


def save_figure(fig, name: str, caption: str) -> Figure:
    buf = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    return Figure(f"figures/{name}.png", caption, buf.getvalue())


def render_markdown(blocks: list) -> str:
    def esc(s: str) -> str:
        return re.sub(r"([\\`*\[\]<>|])", r"\\\1", str(s))

    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {esc(b.text)}")
        elif isinstance(b, Para):
            out.append(esc(b.text))
        elif isinstance(b, Table):
            lines = ["| " + " | ".join(esc(h) for h in b.header) + " |",
                     "|" + "|".join(" --- " for _ in b.header) + "|"]
            for i, row in enumerate(b.rows):
                cells = [f"**{esc(v)}**" if i in b.marked and v else esc(v) for v in row]
                lines.append("| " + " | ".join(cells) + " |")
            out.append("\n".join(lines))
        elif isinstance(b, Figure):
            out.append(f"![{esc(b.caption)}]({b.path})\n\n*{esc(b.caption)}*")
    return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1280px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; } h3 { margin-top: 1.5em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f0f0f0; } tr.plateau td { background: #fff3c4; font-weight: bold; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #444; }
"""


def render_html(title: str, blocks: list) -> str:
    e = html.escape
    body = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f"<p>{e(b.text)}</p>")
        elif isinstance(b, Table):
            rows = ["<tr>" + "".join(f"<th>{e(h)}</th>" for h in b.header) + "</tr>"]
            for i, row in enumerate(b.rows):
                cls = ' class="plateau"' if i in b.marked else ""
                rows.append(f"<tr{cls}>" + "".join(f"<td>{e(v)}</td>" for v in row) + "</tr>")
            body.append("<table>\n" + "\n".join(rows) + "\n</table>")
        elif isinstance(b, Figure):
            data = base64.b64encode(b.png).decode("ascii")
            body.append(f'<figure><img alt="{e(b.caption)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{e(b.caption)}</figcaption></figure>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body) + "\n</body>\n</html>\n"
    )


def write_document(folder: str | Path, title: str, blocks: list, stem: str = "report") -> dict[str, Path]:
    """Write the figures, ``<stem>.md`` and ``<stem>.html`` for ``blocks`` under ``folder``."""
    folder = Path(folder)
    for b in blocks:
        if isinstance(b, Figure):
            atomic_write_bytes(folder / b.path, b.png)
    return {"markdown": atomic_write_text(folder / f"{stem}.md", render_markdown(blocks)),
            "html": atomic_write_text(folder / f"{stem}.html", render_html(title, blocks))}
