"""Reading and writing the tables DCR synthesizes: CSV and Parquet.

Reading is strict: a file that cannot be parsed, has no rows, has a ragged row, or holds a value that does not
fit its schema is refused with an error naming the row and column. Without a declared schema, column names
and types are read off the file (they are not secret: the synthetic file shows them to researchers), but
domains never are (see :mod:`dcr_provider.domain`).

:func:`check_same_schema` is the check for a provider's own synthetic file (``--synthetic``): same format,
same column names in the same order, same types.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import numpy as np
import pandas as pd

from dcr_enclave.formats.errors import DCRError, LimitError

from .schema import ColumnSpec, TableSchema

FORMATS: Final = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
_INT_RE = re.compile(r"^\s*[+-]?\d+\s*$")
_CHECK_CHUNK_ROWS = 200_000


def table_format(path: Path) -> str:
    """``csv`` or ``parquet`` from the file name; anything else cannot be synthesized."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DCRError(
            f"{path} is not a CSV or Parquet file", hint=f"DCR synthesizes {', '.join(sorted(FORMATS))} files"
        )
    return fmt


def _check_size(path: Path, max_bytes: int) -> None:
    try:
        size = os.stat(path).st_size
    except OSError as e:
        raise DCRError(f"cannot read {path}: {e.strerror}") from None
    if size == 0:
        raise DCRError(f"{path} is empty", hint="a dataset file must hold data")
    if size > max_bytes:
        raise LimitError(f"{path} is {size} bytes, over the limit of {max_bytes}", hint="raise --max-bytes")


def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), None)
    except UnicodeDecodeError as e:
        raise DCRError(
            f"{path} is not UTF-8 text (byte {e.start} of the header)", hint="save it as UTF-8 CSV"
        ) from None
    except csv.Error as e:
        raise DCRError(f"{path}: cannot parse the header: {e}") from None
    if not header:
        raise DCRError(f"{path} has no header line", hint="the first line must name the columns")
    for i, name in enumerate(header, 1):
        if not name.strip():
            raise DCRError(
                f"{path}: header column {i} has no name", hint="name every column in the first line"
            )
    dupes = sorted({n for n in header if header.count(n) > 1})
    if dupes:
        raise DCRError(f"{path}: the header names column {dupes[0]!r} twice")
    return header


def _check_rows(path: Path, width: int) -> None:
    """Refuse a row with more or fewer fields than the header (pandas would pad short rows silently)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            next(reader, None)
            for i, row in enumerate(reader, 1):
                if len(row) != width and row:
                    raise DCRError(
                        f"{path}: row {i} (line {reader.line_num}) has {len(row)} fields, the header has {width}"
                    )
    except UnicodeDecodeError as e:
        raise DCRError(
            f"{path} is not UTF-8 text: {e.reason} at byte {e.start}", hint="save it as UTF-8 CSV"
        ) from None
    except csv.Error as e:
        raise DCRError(f"{path} is not valid CSV: {e}") from None


def _read_csv_text(path: Path) -> pd.DataFrame:
    """Every cell as text (no type guessing, no NA guessing); ragged rows are refused."""
    header = _csv_header(path)
    _check_rows(path, len(header))
    try:
        df = pd.read_csv(
            # No string counts as missing (so "" stays ""), but a short row's absent fields come back NaN.
            path,
            dtype=str,
            keep_default_na=False,
            na_values=[],
            encoding="utf-8",
            engine="c",
        )
    except UnicodeDecodeError as e:
        raise DCRError(
            f"{path} is not UTF-8 text: {e.reason} at byte {e.start}", hint="save it as UTF-8 CSV"
        ) from None
    except (pd.errors.ParserError, ValueError) as e:
        # pandas says e.g. "Expected 7 fields in line 12, saw 8": keep its line number.
        raise DCRError(f"{path} is not valid CSV: {str(e).strip().splitlines()[-1]}") from None
    df.columns = header
    if df.empty:
        raise DCRError(f"{path} has a header but no rows")
    return df


def _read_parquet(path: Path) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # The schema is checked before the rows are read: pyarrow's reader fails on duplicate column names
    # with a message that does not say so.
    try:
        arrow_schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise DCRError(f"{path} is not a valid Parquet file: {e}") from None
    _check_parquet_names(path, arrow_schema.names)
    for f in arrow_schema:
        t = f.type
        ok = (
            pa.types.is_integer(t)
            or pa.types.is_floating(t)
            or pa.types.is_string(t)
            or pa.types.is_large_string(t)
            or (pa.types.is_dictionary(t) and pa.types.is_string(t.value_type))
        )
        if not ok:
            raise DCRError(
                f"{path}: column {f.name!r} has type {t}, which DCR cannot synthesize",
                hint="use integer, float or string columns",
            )
    try:
        table = pq.ParquetFile(path).read()
    except (pa.ArrowException, OSError) as e:
        raise DCRError(f"{path} is not a valid Parquet file: {e}") from None
    if table.num_rows == 0:
        raise DCRError(f"{path} has no rows", hint="a dataset file must hold data")
    return table.to_pandas()


def _check_parquet_names(path: Path, names: list[str]) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DCRError(
            f"{path}: column {dupes[0]!r} appears twice", hint="every column needs a name of its own"
        )


def _infer_spec(name: str, values: pd.Series, fmt: str) -> ColumnSpec:
    """Type only (never a domain) of an undeclared column."""
    if fmt == "parquet":
        kind = values.dtype.kind
        return ColumnSpec(name, "integer" if kind in "iu" else "float" if kind == "f" else "categorical")
    present = values[values != ""]
    if len(present) and present.str.match(_INT_RE).all():
        return ColumnSpec(name, "integer")
    if len(present) and pd.to_numeric(present, errors="coerce").notna().all():
        return ColumnSpec(name, "float")
    return ColumnSpec(name, "categorical")


def _row_ref(path: Path, fmt: str, i: int) -> str:
    return f"row {i + 1} (line {i + 2})" if fmt == "csv" else f"row {i + 1}"


def _convert(path: Path, fmt: str, spec: ColumnSpec, raw: pd.Series) -> pd.Series:
    """One column converted to its type and checked against its declared domain."""
    where = f"column {spec.name!r}"

    def fail(mask: np.ndarray, problem: str, hint: str | None = None) -> None:
        i = int(np.asarray(mask).argmax())
        raise DCRError(f"{path}: {_row_ref(path, fmt, i)}, {where}: {problem}", hint=hint)

    missing = (raw == "").to_numpy(dtype=bool) if fmt == "csv" else raw.isna().to_numpy()
    if missing.any() and not spec.nullable:
        fail(missing, "the value is missing", hint=f"declare {spec.name!r} nullable: true in --schema")
    present = ~missing
    if spec.type == "categorical":
        out = raw.astype(object).where(present, None)
        if fmt == "parquet":
            out = out.map(lambda v: v if v is None else str(v))
        if spec.categories is not None:
            bad = present & ~out.isin(spec.categories).to_numpy()
            if bad.any():
                fail(bad, "the value is not one of the declared categories")
        return out
    if fmt == "csv":
        if spec.type == "integer":
            bad = present & ~raw.str.match(_INT_RE).to_numpy()
            if bad.any():
                fail(bad, "the value is not an integer")
        nums = pd.to_numeric(raw.where(present, None), errors="coerce")
        bad = present & nums.isna().to_numpy()
        if bad.any():
            fail(bad, "the value is not a number")
    else:
        nums = pd.to_numeric(raw, errors="coerce")
    values = nums.to_numpy(dtype=float, na_value=np.nan)
    bad = present & ~np.isfinite(values)
    if bad.any():
        fail(bad, "the value is not a finite number")
    if spec.type == "integer":
        bad = present & (np.nan_to_num(values) != np.round(np.nan_to_num(values)))
        if bad.any():
            fail(bad, "the value is not an integer")
    if spec.min is not None and spec.max is not None:
        bad = present & (
            (np.nan_to_num(values, nan=spec.min) < spec.min)
            | (np.nan_to_num(values, nan=spec.max) > spec.max)
        )
        if bad.any():
            fail(bad, f"the value is outside the declared range [{spec.min:g}, {spec.max:g}]")
    if spec.type == "integer":
        return pd.Series(values, name=spec.name).astype("Int64" if spec.nullable else "int64")
    return pd.Series(values, name=spec.name)


def read_table(
    path: str | Path, schema: TableSchema | None = None, max_bytes: int = 16 << 30
) -> tuple[pd.DataFrame, TableSchema]:
    """The typed table in ``path`` and its schema (``schema`` itself, or types read off the file).

    Integer columns come back as ``int64`` (``Int64`` when nullable), float as ``float64``, categorical as
    Python strings (``None`` when missing).
    """
    p = Path(path)
    fmt = table_format(p)
    _check_size(p, max_bytes)
    raw = _read_csv_text(p) if fmt == "csv" else _read_parquet(p)
    names = [str(c) for c in raw.columns]
    if schema is None:
        schema = TableSchema(tuple(_infer_spec(n, raw[n], fmt) for n in names), declared=False)
    elif names != schema.names:
        missing = [n for n in schema.names if n not in names]
        extra = [n for n in names if n not in schema.names]
        detail = (f"missing {missing}" if missing else "") + (
            f"{'; ' if missing else ''}not in the schema {extra}" if extra else ""
        )
        raise DCRError(
            f"{p} does not have the schema's columns: {detail or 'they are in another order'}",
            hint="the schema lists every column of the file, in file order",
        )
    raw = raw.reset_index(drop=True)
    out = pd.DataFrame({spec.name: _convert(p, fmt, spec, raw[spec.name]) for spec in schema.columns})
    return out, schema


def write_table(
    df: pd.DataFrame, path: Path, schema: TableSchema, fmt: str, like: Path | None = None
) -> None:
    """Write a synthetic table with the schema's types, to a new file; Parquet copies the column types of
    the file ``like`` (the real file) when given."""
    out = pd.DataFrame(index=range(len(df)))
    for spec in schema.columns:
        col = df[spec.name]
        if spec.type == "integer":
            out[spec.name] = col.astype("Int64" if spec.nullable else "int64")
        elif spec.type == "float":
            out[spec.name] = col.astype("float64")
        else:
            out[spec.name] = col.astype(object)
    if fmt == "csv":
        out.to_csv(path, index=False, lineterminator="\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        fields = []
        for spec in schema.columns:
            t = (
                pa.int64()
                if spec.type == "integer"
                else pa.float64()
                if spec.type == "float"
                else pa.string()
            )
            fields.append(pa.field(spec.name, t, nullable=True))
        table = pa.Table.from_pandas(out, schema=pa.schema(fields), preserve_index=False)
        if like is not None:  # the real file's exact Arrow types (int32, large_string, dictionary, ...)
            real = pq.read_schema(like).remove_metadata()
            table = table.cast(pa.schema([pa.field(f.name, f.type, nullable=True) for f in real]))
        pq.write_table(table, path)


# ---------------------------------------------------------------------------------------------------------
# A provider's own synthetic file: same format, names and types as the real file
# ---------------------------------------------------------------------------------------------------------

_RANK = {"integer": 0, "float": 1, "text": 2}


def _kind(dtype: object) -> str:
    s = str(dtype)
    if s.startswith(("Int", "UInt", "int", "uint")):
        return "integer"
    if s.startswith(("Float", "float")):
        return "float"
    if s in ("boolean", "bool"):
        return "boolean"
    if s.startswith("datetime"):
        return "datetime"
    return "text"


def _arrow_kind(t: object) -> str:
    import pyarrow as pa

    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_temporal(t):
        return "datetime"
    return "text"


def _merge(a: str | None, b: str) -> str:
    if a is None or a == b:
        return b
    if a in _RANK and b in _RANK:
        return max(a, b, key=_RANK.__getitem__)
    return "text"


def column_types(path: str | Path, max_bytes: int = 16 << 30) -> dict[str, str]:
    """Column name → type class (integer, float, text, boolean, datetime) of a CSV or Parquet file.

    Lenient (pandas' own type guessing, missing values ignored) and memory-flat: CSV is read in chunks.
    """
    p = Path(path)
    fmt = table_format(p)
    _check_size(p, max_bytes)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            arrow = pq.read_schema(p)
        except (pa.ArrowException, OSError) as e:
            raise DCRError(f"{p} is not a valid Parquet file: {e}") from None
        _check_parquet_names(p, arrow.names)
        return {f.name: _arrow_kind(f.type) for f in arrow}
    header = _csv_header(p)
    kinds: dict[str, str | None] = dict.fromkeys(header)
    try:
        chunks: Iterator[pd.DataFrame] = pd.read_csv(p, chunksize=_CHECK_CHUNK_ROWS, encoding="utf-8")
        for chunk in chunks:
            typed = chunk.convert_dtypes()
            for name, col in zip(header, typed.columns, strict=True):
                if typed[col].notna().any():
                    kinds[name] = _merge(kinds[name], _kind(typed[col].dtype))
    except UnicodeDecodeError as e:
        raise DCRError(f"{p} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    except (pd.errors.ParserError, ValueError) as e:
        raise DCRError(f"{p} is not valid CSV: {str(e).strip().splitlines()[-1]}") from None
    return {n: k or "empty" for n, k in kinds.items()}


def check_same_schema(real: str | Path, synthetic: str | Path, max_bytes: int = 16 << 30) -> None:
    """Refuse a synthetic file whose format, column names or column types differ from the real file's.

    An integer column may stand in for a float one (a float column can hold whole numbers); every other
    difference would make a notebook behave differently in the two stages.
    """
    r, s = Path(real), Path(synthetic)
    if table_format(r) != table_format(s):
        raise DCRError(
            f"the synthetic file {s} is {table_format(s)} but the real file {r} is {table_format(r)}",
            hint="a synthetic file takes the real file's name in the sandbox; give it the same format",
        )
    rt, st = column_types(r, max_bytes), column_types(s, max_bytes)
    if list(rt) != list(st):
        missing = [n for n in rt if n not in st]
        extra = [n for n in st if n not in rt]
        parts = ([f"missing {missing}"] if missing else []) + ([f"extra {extra}"] if extra else [])
        raise DCRError(
            f"the synthetic file {s} does not have the real file's columns: "
            + ("; ".join(parts) or "they are in another order"),
            hint="the synthetic version must have the real data's column names, in order",
        )
    for name, kind in rt.items():
        other = st[name]
        if other == kind or "empty" in (kind, other) or (kind == "float" and other == "integer"):
            continue
        raise DCRError(
            f"column {name!r} is {kind} in the real file {r} but {other} in the synthetic file {s}",
            hint="the synthetic version must have the real data's column types",
        )
