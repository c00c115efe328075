"""Statistical disclosure control (SDC): automated checks on the tables a job brings out.

They run in the supervisor after the grant's output limits passed (:func:`~dcr_enclave.runtime.outputs.collect_outputs`),
over the supervisor's own copy of the outputs. A finding does not refuse the outputs: it holds them for the
provider's reviewers, even under ``auto``. The checks are a help to reviewers and a floor under ``auto``,
not a guarantee: a notebook that wants to can always write a table in a form no rule here recognises.

**Which files are tables.** Regular files whose name ends in ``.csv`` (comma-separated; when the first
line also holds ``;``, a tab or ``|``, the file is checked with each of those delimiters too, and every
finding counts), ``.tsv`` or ``.tab`` (tab-separated), in any letter case. Nothing else is read: the
executed notebook's own outputs, JSON, Excel, Parquet, HTML and images are left to review.

**How a table is read.** UTF-8 (a byte-order mark allowed), parsed with the standard :mod:`csv` module.
*Header rows* are the leading rows (at most :data:`MAX_HEADER_ROWS`) in which no cell after the first is a
number; a column's *name* is its header cells joined with spaces, in lower case, and its *words* the
runs of letters, digits and ``%`` in the name. The other rows (wholly empty ones skipped) are the *body*;
a body row's *label* is its first cell. A *count* is a non-negative integer (``12`` or ``12.0``).
*Suppression markers* (:data:`SUPPRESSION_MARKERS`: the empty cell, ``*``, ``**``, ``***``, ``c``,
``[c]``, ``x``, ``[x]``, ``s``, ``[s]``, ``supp``, ``suppressed``, ``-``, ``..``, ``:``, ``~`` and
``<k``/``<=k`` for a number *k*) stand for a count that was withheld; *missing markers*
(:data:`MISSING_MARKERS`: ``nan``, ``na``, ``n/a``, ``null``, ``none``, ``<na>``) for none at all.

**Rules.** Each rule reports one kind of :data:`~dcr_enclave.formats.receipt.DISCLOSURE_KINDS`:

1. *Minimum cell count* ("frequency cells below the minimum count"). Count cells are (a) the cells of a
   *count column*: its name has a word of :data:`COUNT_WORDS` and every body cell is a count, a
   suppression or a missing marker, at least one a count; (b) the cells of a *cross-tabulation*: at least
   two columns, and every body cell after the first column a count or a marker, at least one a count (the
   first column holds the labels); (c) the cells of a body row labelled by a count word, read the same
   way (``describe()`` output; the table is also checked transposed, see below). A count ``0 < n <
   min_cell_count`` is a finding; zero is not.
2. *Small-number suppression* ("suppressed cells recoverable from totals"). A suppressed count cell
   passes rule 1. But a *margin* (a column named, or a body row labelled, one of :data:`MARGIN_LABELS`:
   total, all (pandas' ``margins=True``), sum, ...) holding a count lets a suppressed cell be recovered
   by subtraction when it is the only suppressed cell of its row (among the count columns, outside the
   margin column) or of its column (among the body rows, outside the margin row): a finding. Only this
   first level is checked, not chains of recoveries through several margins.
3. *Dominance* ("dominated cells"). A *magnitude table* has a count column (1a) beside at least one
   other column holding numbers (the aggregates: mean, sum, median, ...). A row whose count is ``0 < n <
   dominance_min_contributors`` while it holds such a number is a finding: its aggregates describe one
   or two records.
4. *Extremes* ("extreme values of records"). A column whose name has a word of :data:`EXTREME_WORDS`
   (min, max, minimum, maximum, ...; also ``0%`` and ``100%``) and holds a number, or a body row so
   labelled (``describe()``), exposes single records' values: a finding unless the grant's
   ``allow_extremes`` is true.
5. *Size* ("tables too large to check"). A table over :data:`MAX_TABLE_BYTES` bytes, :data:`MAX_ROWS`
   rows, :data:`MAX_COLUMNS` columns or :data:`MAX_CELLS` cells, or one read after the job's tables
   together passed :data:`MAX_TOTAL_BYTES` or :data:`MAX_TOTAL_CELLS`, is not checked: a finding, so that
   it goes to review. The bounds keep the work of the check small whatever the notebook writes.
6. *Readability* ("tables that cannot be read"). A table that is not UTF-8, holds a NUL byte, that the
   :mod:`csv` module refuses (a field over its size limit), or that is not a regular file reached without
   following a link: a finding.

Rules 1a, 3 and 4 (the ones that go by names) are applied to the table and to its transpose, so that a
statistic named by a row label (``describe()``) is seen as if named by a column.

**What leaves.** Everything in a table is the notebook's to choose, and so is every file name: the public
result (:attr:`DisclosureCheck.kinds`) is the kinds of finding only, each once, in the order of
``DISCLOSURE_KINDS`` — no count, file, value or figure derived from a threshold. The details (file, row,
column, rule, value, threshold) are only ever sealed to the hub's airlock key for the reviewers.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from dcr_enclave.formats.grant import DisclosureRules
from dcr_enclave.formats.receipt import DISCLOSURE_KINDS

FREQUENCY, RECOVERABLE, DOMINANCE, EXTREMES, TOO_LARGE, UNREADABLE = DISCLOSURE_KINDS

#: Table files by name ending (lower case) and their delimiter.
TABLE_SUFFIXES: Final = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
#: Further delimiters a ``.csv`` file is also read with when its first line holds them.
EXTRA_CSV_DELIMITERS: Final = (";", "\t", "|")

MAX_TABLE_BYTES: Final = 4 * 2**20
MAX_TOTAL_BYTES: Final = 16 * 2**20
MAX_ROWS: Final = 50_000
MAX_COLUMNS: Final = 1_000
MAX_CELLS: Final = 250_000
MAX_TOTAL_CELLS: Final = 1_000_000
MAX_HEADER_ROWS: Final = 4
#: At most this many details are sealed for reviewers; the rest are counted.
MAX_DETAILS: Final = 500
_MAX_TEXT: Final = 200

COUNT_WORDS: Final = frozenset(
    {"count", "counts", "n", "freq", "freqs", "frequency", "frequencies", "cases", "number", "num", "nobs"}
    | {"size", "tally"}
)
MARGIN_LABELS: Final = frozenset(
    {"total", "totals", "all", "sum", "overall", "grand total", "row total", "column total", "margin"}
)
EXTREME_WORDS: Final = frozenset(
    {"min", "max", "minimum", "maximum", "amin", "amax", "smallest", "largest", "lowest", "highest"}
    | {"0%", "100%"}
)
SUPPRESSION_MARKERS: Final = frozenset(
    {"", "*", "**", "***", "c", "[c]", "x", "[x]", "s", "[s]", "supp", "suppressed", "-", "..", ":", "~"}
)
MISSING_MARKERS: Final = frozenset({"nan", "na", "n/a", "null", "none", "<na>"})

_NUMBER_RE: Final = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?$")
_LESS_THAN_RE: Final = re.compile(r"^<=?\s*\d+(?:\.\d+)?$")
_WORD_RE: Final = re.compile(r"[a-z0-9%]+")


@dataclass(frozen=True)
class Finding:
    """One finding, for reviewers only: where (file, 1-based record, column), which rule, the cell's text
    and the threshold it failed."""

    file: str
    rule: str
    row: int | None = None
    column: str | None = None
    value: str | None = None
    threshold: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "row": self.row,
            "column": self.column,
            "rule": self.rule,
            "value": self.value,
            "threshold": self.threshold,
        }


@dataclass(frozen=True)
class DisclosureCheck:
    """The checks' result: public kinds, and details sealed for reviewers."""

    #: Kinds from ``DISCLOSURE_KINDS``, each once, in that order. Public: in the receipt.
    kinds: list[str] = field(default_factory=list)
    #: :meth:`Finding.to_json` of each finding (at most :data:`MAX_DETAILS`, then one entry counting the
    #: rest). Only ever sealed to the airlock.
    details: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------------------


def parse_number(cell: str) -> float | None:
    """The finite number a cell holds, else ``None``."""
    c = cell.strip()
    if len(c) > 64 or not _NUMBER_RE.match(c):
        return None
    v = float(c)
    return v if math.isfinite(v) else None


def parse_count(cell: str) -> int | None:
    """The non-negative integer a cell holds (``12`` or ``12.0``), else ``None``."""
    v = parse_number(cell)
    if v is None or v < 0 or v != math.floor(v):
        return None
    return int(v)


def is_suppressed(cell: str) -> bool:
    c = cell.strip().lower()
    return c in SUPPRESSION_MARKERS or bool(_LESS_THAN_RE.match(c))


def is_missing(cell: str) -> bool:
    return cell.strip().lower() in MISSING_MARKERS


def _words(name: str) -> set[str]:
    return set(_WORD_RE.findall(name))


def _clip(text: str | None) -> str | None:
    return text if text is None or len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + "..."


# ---------------------------------------------------------------------------------------------------------
# One parsed table
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Table:
    """A parsed table: header rows, body rows (with their 1-based record numbers), column names."""

    names: list[str]
    body: list[list[str]]
    #: For each body row, its position in the original file's records (1-based) or, transposed, the
    #: original column it came from.
    body_ids: list[str]
    #: Column labels as reported (the original column's name, or the original record number transposed).
    column_ids: list[str]
    width: int
    #: Whether this is the transpose of the file's table (ids swap back when reported).
    transposed: bool = False

    def label(self, i: int) -> str:
        return self.body[i][0].strip().lower() if self.width else ""


def _make_table(
    rows: list[list[str]], row_ids: list[str], col_ids: list[str] | None, transposed: bool = False
) -> _Table:
    width = max((len(r) for r in rows), default=0)
    rows = [r + [""] * (width - len(r)) for r in rows]
    n_header = 0
    for r in rows[:MAX_HEADER_ROWS]:
        if any(parse_number(c) is not None for c in r[1:]):
            break
        n_header += 1
    if n_header == len(rows):  # no row with a number: all header, nothing to count
        n_header = min(1, len(rows))
    header, body_all = rows[:n_header], rows[n_header:]
    names = [" ".join(h[j].strip() for h in header if h[j].strip()).lower() for j in range(width)]
    keep = [i for i, r in enumerate(body_all) if any(c.strip() for c in r)]
    ids = col_ids or [names[j] or f"#{j + 1}" for j in range(width)]
    return _Table(
        names=names,
        body=[body_all[i] for i in keep],
        body_ids=[row_ids[n_header + i] for i in keep],
        column_ids=ids,
        width=width,
        transposed=transposed,
    )


def _countish(cell: str) -> bool:
    return parse_count(cell) is not None or is_suppressed(cell) or is_missing(cell)


def _count_columns(t: _Table) -> list[int]:
    """Rule 1a: columns named by a count word holding counts (markers allowed, at least one count)."""
    out = []
    for j in range(t.width):
        if not _words(t.names[j]) & COUNT_WORDS or not t.body:
            continue
        col = [r[j] for r in t.body]
        if all(_countish(c) for c in col) and any(parse_count(c) is not None for c in col):
            out.append(j)
    return out


def _is_crosstab(t: _Table) -> bool:
    """Rule 1b: labels, then only counts (markers allowed, at least one count)."""
    if t.width < 2 or not t.body:
        return False
    cells = [c for r in t.body for c in r[1:]]
    return all(_countish(c) for c in cells) and any(parse_count(c) is not None for c in cells)


class _Collector:
    def __init__(self, file: str, rules: DisclosureRules) -> None:
        self.file = file
        self.rules = rules
        self.findings: dict[tuple[str, str | None, str | None], Finding] = {}

    def add(self, kind: str, t: _Table | None, i: int | None, j: int | None, threshold: int | None) -> None:
        row = t.body_ids[i] if t is not None and i is not None else None
        col = t.column_ids[j] if t is not None and j is not None else None
        value = t.body[i][j] if t is not None and i is not None and j is not None else None
        if t is not None and t.transposed:
            row, col = col, row
        key = (kind, row, col)
        if key not in self.findings:
            self.findings[key] = Finding(
                self.file,
                kind,
                row=int(row) if row is not None and row.isdigit() else None,
                column=_clip(col),
                value=_clip(value),
                threshold=threshold,
            )


def _named_rules(t: _Table, out: _Collector) -> None:
    """Rules 1a, 3 and 4: what columns are named."""
    rules = out.rules
    counts = _count_columns(t)
    for j in counts:
        for i, r in enumerate(t.body):
            n = parse_count(r[j])
            if n is not None and 0 < n < rules.min_cell_count:
                out.add(FREQUENCY, t, i, j, rules.min_cell_count)
    numeric = [
        j for j in range(t.width) if j not in counts and any(parse_number(r[j]) is not None for r in t.body)
    ]
    if counts and numeric:
        for j in counts:
            for i, r in enumerate(t.body):
                n = parse_count(r[j])
                small = n is not None and 0 < n < rules.dominance_min_contributors
                if small and any(parse_number(r[k]) is not None for k in numeric):
                    out.add(DOMINANCE, t, i, j, rules.dominance_min_contributors)
    if not rules.allow_extremes:
        for j in range(t.width):
            if _words(t.names[j]) & EXTREME_WORDS:
                for i, r in enumerate(t.body):
                    if parse_number(r[j]) is not None:
                        out.add(EXTREMES, t, i, j, None)
                        break


def _shape_rules(t: _Table, out: _Collector) -> None:
    """Rules 1b and 2: cross-tabulations, and suppressed cells beside margins."""
    rules = out.rules
    crosstab = _is_crosstab(t)
    if crosstab:
        for i, r in enumerate(t.body):
            for j in range(1, t.width):
                n = parse_count(r[j])
                if n is not None and 0 < n < rules.min_cell_count:
                    out.add(FREQUENCY, t, i, j, rules.min_cell_count)
    cols = list(range(1, t.width)) if crosstab else _count_columns(t)
    if not cols:
        return
    margin_cols = [j for j in cols if t.names[j] in MARGIN_LABELS]
    inner_cols = [j for j in cols if j not in margin_cols]
    margin_rows = [i for i in range(len(t.body)) if t.label(i) in MARGIN_LABELS]
    inner_rows = [i for i in range(len(t.body)) if i not in margin_rows]
    for i in inner_rows:
        r = t.body[i]
        hidden = [j for j in inner_cols if is_suppressed(r[j])]
        if len(hidden) == 1 and any(parse_count(r[m]) is not None for m in margin_cols):
            out.add(RECOVERABLE, t, i, hidden[0], None)
    for j in inner_cols:
        hidden_rows = [i for i in inner_rows if is_suppressed(t.body[i][j])]
        if len(hidden_rows) == 1 and any(parse_count(t.body[m][j]) is not None for m in margin_rows):
            out.add(RECOVERABLE, t, hidden_rows[0], j, None)


def check_rows(rows: list[list[str]], file: str, rules: DisclosureRules) -> list[Finding]:
    """Apply rules 1 to 4 to one parsed table (a list of records); the findings, for reviewers."""
    out = _Collector(file, rules)
    row_ids = [str(k + 1) for k in range(len(rows))]
    t = _make_table(rows, row_ids, None)
    _shape_rules(t, out)
    _named_rules(t, out)
    # Transposed: the original's first column becomes the header, record numbers become column ids.
    width = max((len(r) for r in rows), default=0)
    padded = [r + [""] * (width - len(r)) for r in rows]
    transposed = [[padded[i][j] for i in range(len(padded))] for j in range(width)]
    tt = _make_table(transposed, t.column_ids, row_ids, transposed=True)
    _named_rules(tt, out)
    return list(out.findings.values())


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------


def is_table(rel: str) -> bool:
    return rel.lower().endswith(tuple(TABLE_SUFFIXES))


def _delimiters(rel: str, text: str) -> list[str]:
    suffix = next(s for s in TABLE_SUFFIXES if rel.lower().endswith(s))
    first = TABLE_SUFFIXES[suffix]
    if suffix != ".csv":
        return [first]
    line = text.split("\n", 1)[0]
    return [first, *(d for d in EXTRA_CSV_DELIMITERS if d in line)]


def _read_bounded(path: Path, limit: int) -> bytes | None:
    """The file's bytes if it is a regular file (no link followed) of at most ``limit`` bytes; ``None``
    if it is larger. Raises OSError if it cannot be opened as one."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError("not a regular file")
        if st.st_size > limit:
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
        return None if len(data) > limit else data
    finally:
        os.close(fd)


class _Budget:
    def __init__(self) -> None:
        self.bytes = MAX_TOTAL_BYTES
        self.cells = MAX_TOTAL_CELLS


def check_file(path: Path, rel: str, rules: DisclosureRules, budget: _Budget | None = None) -> list[Finding]:
    """The findings of one table file (rules 1 to 6); never raises for what the file holds."""
    budget = budget or _Budget()
    try:
        raw = _read_bounded(path, min(MAX_TABLE_BYTES, budget.bytes))
    except OSError:
        return [Finding(rel, UNREADABLE)]
    if raw is None:
        budget.bytes = 0  # what is too large for the rest is too large for all after it
        return [Finding(rel, TOO_LARGE)]
    budget.bytes -= len(raw)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return [Finding(rel, UNREADABLE)]
    if "\x00" in text:
        return [Finding(rel, UNREADABLE)]
    findings: dict[tuple[str, int | None, str | None], Finding] = {}
    for delimiter in _delimiters(rel, text):
        try:
            rows = _parse(text, delimiter)
        except csv.Error:
            return [Finding(rel, UNREADABLE)]
        if rows is None:
            return [Finding(rel, TOO_LARGE)]
        cells = sum(len(r) for r in rows)
        if cells > budget.cells:
            budget.cells = 0
            return [Finding(rel, TOO_LARGE)]
        budget.cells -= cells
        for f in check_rows(rows, rel, rules):
            findings.setdefault((f.rule, f.row, f.column), f)
    return list(findings.values())


def _parse(text: str, delimiter: str) -> list[list[str]] | None:
    """The records, or ``None`` when the table is over a size bound."""
    rows: list[list[str]] = []
    cells = 0
    for r in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter):
        if len(rows) >= MAX_ROWS or len(r) > MAX_COLUMNS:
            return None
        cells += len(r)
        if cells > MAX_CELLS:
            return None
        rows.append(r)
    return rows


def table_files(root: Path) -> list[tuple[str, Path]]:
    """The table files under ``root`` (no link followed), sorted by relative path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            p = Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            if is_table(rel):
                found.append((rel, p))
    return sorted(found)


def summarise(findings: Iterable[Finding]) -> DisclosureCheck:
    """The public kinds (each once, in ``DISCLOSURE_KINDS`` order) and the bounded details."""
    findings = list(findings)
    seen = {f.rule for f in findings}
    details = [f.to_json() for f in findings[:MAX_DETAILS]]
    if len(findings) > MAX_DETAILS:
        details.append({"omitted": len(findings) - MAX_DETAILS})
    return DisclosureCheck(kinds=[k for k in DISCLOSURE_KINDS if k in seen], details=details)


def check_outputs(root: Path, rules: DisclosureRules) -> DisclosureCheck:
    """Run the checks over every table under ``root`` (the supervisor's copy of the outputs)."""
    budget = _Budget()
    findings: list[Finding] = []
    for rel, p in table_files(root):
        findings.extend(check_file(p, rel, rules, budget))
    return summarise(findings)
