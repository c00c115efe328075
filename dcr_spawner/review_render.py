"""Held outputs as HTML for the review page: notebooks, tables, text and images, every byte escaped.

Everything here comes from the researcher's notebook, so it is treated as hostile: text is escaped, a
notebook's HTML outputs are shown inside a sandboxed frame with no scripts, images only as ``data:`` URIs of
the raster types, and every piece is cut to a size a browser can show. Pure functions, tested directly.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from html import escape
from typing import Any, Final

#: What the page shows of one file or one output before it says the rest is cut.
MAX_TEXT_CHARS: Final = 200_000
MAX_TABLE_ROWS: Final = 500
MAX_TABLE_COLUMNS: Final = 100
MAX_IMAGE_BYTES: Final = 8 * 2**20
IMAGE_TYPES: Final = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif"}
TEXT_SUFFIXES: Final = (".txt", ".md", ".json", ".log", ".py", ".r", ".html", ".tex", ".yaml", ".yml", ".svg")
TABLE_SUFFIXES: Final = {".csv": ",", ".tsv": "\t"}
_ANSI: Final = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def kind_of(path: str) -> str:
    """How a file is shown: ``notebook``, ``table``, ``image``, ``text`` or ``binary``."""
    low = path.lower()
    if low.endswith(".ipynb"):
        return "notebook"
    if any(low.endswith(s) for s in TABLE_SUFFIXES):
        return "table"
    if any(low.endswith(s) for s in IMAGE_TYPES):
        return "image"
    if low.endswith(TEXT_SUFFIXES):
        return "text"
    return "binary"


def render_file(path: str, data: bytes) -> str:
    """One output file as an HTML fragment."""
    kind = kind_of(path)
    if kind == "notebook":
        return render_notebook(data)
    if kind == "table":
        return render_table(data, TABLE_SUFFIXES[next(s for s in TABLE_SUFFIXES if path.lower().endswith(s))])
    if kind == "image":
        mime = IMAGE_TYPES[next(s for s in IMAGE_TYPES if path.lower().endswith(s))]
        return _image(mime, data)
    if kind == "text":
        return _pre(_decode(data))
    return f"<p class='text-muted'>A binary file of {len(data)} bytes (download it to inspect it).</p>"


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _cut(text: str, limit: int = MAX_TEXT_CHARS) -> tuple[str, bool]:
    return (text[:limit], True) if len(text) > limit else (text, False)


def _pre(text: str, cls: str = "dcr-pre") -> str:
    shown, cut = _cut(_ANSI.sub("", text))
    more = f"<p class='text-muted'>… cut at {MAX_TEXT_CHARS} characters.</p>" if cut else ""
    return f"<pre class='{cls}'>{escape(shown)}</pre>{more}"


def _image(mime: str, data: bytes) -> str:
    if len(data) > MAX_IMAGE_BYTES:
        return f"<p class='text-muted'>An image of {len(data)} bytes, too large to show here.</p>"
    b64 = base64.b64encode(data).decode("ascii")
    return f"<img class='dcr-image' alt='output image' src='data:{mime};base64,{b64}'>"


def render_table(data: bytes, delimiter: str = ",") -> str:
    """A CSV/TSV file as an HTML table (first rows and columns)."""
    text = _decode(data)
    try:
        rows = []
        for i, row in enumerate(csv.reader(io.StringIO(text), delimiter=delimiter)):
            if i > MAX_TABLE_ROWS:
                break
            rows.append(row[:MAX_TABLE_COLUMNS])
    except csv.Error:
        return _pre(text)
    if not rows:
        return "<p class='text-muted'>An empty table.</p>"
    head = "".join(f"<th>{escape(c)}</th>" for c in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows[1 : MAX_TABLE_ROWS + 1]
    )
    more = (
        f"<p class='text-muted'>First {MAX_TABLE_ROWS} rows shown.</p>" if len(rows) > MAX_TABLE_ROWS else ""
    )
    return (
        "<div class='table-responsive'><table class='table table-sm table-bordered dcr-table'>"
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>{more}"
    )


def _text_of(value: Any) -> str:
    if isinstance(value, list):
        return "".join(str(v) for v in value)
    return str(value) if value is not None else ""


def render_notebook(data: bytes) -> str:
    """An executed notebook, cell by cell, with its outputs."""
    try:
        nb = json.loads(data)
        cells = nb["cells"]
        if not isinstance(cells, list):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        return "<p class='text-danger'>Not a readable notebook; its text follows.</p>" + _pre(_decode(data))
    parts = []
    for i, cell in enumerate(cells):
        if not isinstance(cell, dict):
            continue
        kind = str(cell.get("cell_type", ""))
        source = _text_of(cell.get("source"))
        label = f"[{i + 1}] {escape(kind)}"
        parts.append(
            f"<div class='dcr-cell dcr-cell-{escape(kind)}'><div class='dcr-cell-label'>{label}</div>"
        )
        parts.append(_pre(source, "dcr-source"))
        outputs = cell.get("outputs") if kind == "code" else None
        for out in outputs if isinstance(outputs, list) else []:
            if isinstance(out, dict):
                parts.append(render_output(out))
        parts.append("</div>")
    return "".join(parts) or "<p class='text-muted'>The notebook has no cells.</p>"


def render_output(out: dict[str, Any]) -> str:
    """One cell output: a stream, an error, or rich data (the richest type shown safely)."""
    kind = out.get("output_type")
    if kind == "stream":
        return _pre(_text_of(out.get("text")), "dcr-output")
    if kind == "error":
        trace = "\n".join(_text_of(t) for t in out.get("traceback") or [])
        head = f"{out.get('ename', '')}: {out.get('evalue', '')}"
        return _pre(trace or head, "dcr-output dcr-error")
    bundle = out.get("data")
    if not isinstance(bundle, dict):
        return ""
    for mime in ("image/png", "image/jpeg", "image/gif"):
        if mime in bundle:
            try:
                raw = base64.b64decode(_text_of(bundle[mime]), validate=False)
            except ValueError:
                continue
            return _image(mime, raw)
    if "text/html" in bundle:
        html, _ = _cut(_text_of(bundle["text/html"]))
        # No scripts, no forms, no same origin: the frame can only show what it holds.
        return f"<iframe class='dcr-html' sandbox='' srcdoc='{escape(html, quote=True)}'></iframe>"
    if "text/plain" in bundle:
        return _pre(_text_of(bundle["text/plain"]), "dcr-output")
    return ""
