"""The review page's rendering of held outputs: everything the notebook wrote is hostile, so every byte is
escaped, HTML outputs are framed without scripts, images only as raster data URIs; against literal values."""

from __future__ import annotations

import base64
import json

from dcr_spawner.review_render import (
    MAX_TABLE_ROWS,
    kind_of,
    render_file,
    render_notebook,
    render_output,
    render_table,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 8


def test_kinds_by_name() -> None:
    assert [
        kind_of(p) for p in ("a.IPYNB", "t.csv", "t.TSV", "f.png", "f.JPEG", "r.txt", "x.svg", "b.parquet")
    ] == [
        "notebook",
        "table",
        "table",
        "image",
        "image",
        "text",
        "text",
        "binary",
    ]


def test_tables_are_escaped_and_cut() -> None:
    html = render_table(b"name,count\n<script>alert(1)</script>,3\n")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>" not in html
    assert "<th>name</th><th>count</th>" in html and "<td>3</td>" in html
    many = b"n\n" + b"".join(b"%d\n" % i for i in range(MAX_TABLE_ROWS + 50))
    html = render_table(many)
    assert html.count("<tr>") == MAX_TABLE_ROWS + 1 and f"First {MAX_TABLE_ROWS} rows shown" in html
    assert "An empty table" in render_table(b"")
    assert "<th>a</th><th>b</th>" in render_table(b"a\tb\n1\t2\n", "\t")


def test_text_images_and_binaries() -> None:
    assert render_file("notes.txt", b"a < b \x1b[31mred\x1b[0m") == "<pre class='dcr-pre'>a &lt; b red</pre>"
    img = render_file("plot.png", PNG)
    assert (
        img
        == f"<img class='dcr-image' alt='output image' src='data:image/png;base64,{base64.b64encode(PNG).decode()}'>"
    )
    # An SVG can carry scripts: shown as its text, never as an image.
    assert render_file("x.svg", b"<svg onload='x()'/>").startswith("<pre class='dcr-pre'>&lt;svg")
    assert render_file("data.bin", b"\x00" * 10) == (
        "<p class='text-muted'>A binary file of 10 bytes (download it to inspect it).</p>"
    )


def test_cell_outputs() -> None:
    assert (
        render_output({"output_type": "stream", "text": ["1\n", "2\n"]})
        == "<pre class='dcr-output'>1\n2\n</pre>"
    )
    err = render_output(
        {"output_type": "error", "ename": "E", "evalue": "v", "traceback": ["\x1b[0;31mE\x1b[0m: v"]}
    )
    assert err == "<pre class='dcr-output dcr-error'>E: v</pre>"
    framed = render_output({"output_type": "display_data", "data": {"text/html": "<b onclick='x'>hi</b>"}})
    assert framed == (
        "<iframe class='dcr-html' sandbox='' srcdoc='&lt;b onclick=&#x27;x&#x27;&gt;hi&lt;/b&gt;'></iframe>"
    )
    png = base64.b64encode(PNG).decode()
    assert render_output(
        {"output_type": "execute_result", "data": {"image/png": png, "text/plain": "fig"}}
    ).startswith("<img class='dcr-image'")
    assert render_output({"output_type": "execute_result", "data": {"text/plain": "<1>"}}) == (
        "<pre class='dcr-output'>&lt;1&gt;</pre>"
    )
    assert render_output({"output_type": "display_data", "data": {"application/x-unknown": "?"}}) == ""


def test_notebooks() -> None:
    nb = {
        "cells": [
            {"cell_type": "markdown", "source": "# <h1>", "metadata": {}},
            {
                "cell_type": "code",
                "source": ["x = 1\n", "x"],
                "outputs": [{"output_type": "stream", "text": "1"}],
            },
        ],
        "metadata": {},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    html = render_notebook(json.dumps(nb).encode())
    assert "[1] markdown" in html and "# &lt;h1&gt;" in html and "[2] code" in html
    assert "<pre class='dcr-source'>x = 1\nx</pre>" in html and "<pre class='dcr-output'>1</pre>" in html
    broken = render_notebook(b"{not json <b>")
    assert broken.startswith("<p class='text-danger'>Not a readable notebook") and "&lt;b&gt;" in broken
    assert render_notebook(b'{"cells": []}') == "<p class='text-muted'>The notebook has no cells.</p>"
