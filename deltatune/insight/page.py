"""The report as one self-contained HTML file: figures inlined as base64 PNGs, no scripts, no network, so it opens
offline in any browser and can be mailed as one file."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from typing import Any, Sequence

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
td, th { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.number { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; } p.note { color: #555; font-size: .9em; }
"""


@dataclass
class Section:
    title: str
    parts: list[str] = field(default_factory=list)  # HTML fragments, in order

    def text(self, words: str, note: bool = False) -> "Section":
        self.parts.append(f'<p class="note">{html.escape(words)}</p>' if note else f"<p>{html.escape(words)}</p>")
        return self

    def figure(self, png: bytes | None, alt: str) -> "Section":
        if png is not None:
            encoded = base64.b64encode(png).decode("ascii")
            self.parts.append(f'<img src="data:image/png;base64,{encoded}" alt="{html.escape(alt)}">')
        return self

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> "Section":
        head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
        body = "".join("<tr>" + "".join(_cell(value) for value in row) + "</tr>" for row in rows)
        self.parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        return self


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f'<td class="number">{value:.4g}</td>'
    if isinstance(value, int):
        return f'<td class="number">{value:,}</td>'
    return f"<td>{html.escape('' if value is None else str(value))}</td>"


def render(title: str, sections: list[Section]) -> str:
    body = "".join(f"<h2>{html.escape(section.title)}</h2>" + "".join(section.parts) for section in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")
