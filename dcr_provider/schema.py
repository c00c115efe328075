"""The declared schema of a tabular dataset file (YAML or JSON), and the column types DCR understands.

A schema says what a table holds without looking at it, so nothing in it can leak a real value::

    rows: 1000            # random synthesizer only: how many rows to draw
    target: charges       # optional: the column the fidelity report's utility check predicts
    columns:
      - {name: age, type: integer, min: 18, max: 100}
      - {name: sex, type: categorical, categories: [female, male]}
      - {name: bmi, type: float, min: 10, max: 70, bins: 20, decimals: 2}
      - {name: note, type: categorical, nullable: true}   # categories estimated with DP

``min``/``max`` (numeric) and ``categories`` (categorical) are the column's *domain*. A column without them
gets a domain estimated with differential privacy, which spends part of the budget (see
:mod:`dcr_provider.domain`). Values outside a declared domain make the file not fit its schema: an error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from dcr_enclave.formats.errors import DCRError

TYPES: Final = ("integer", "float", "categorical")
DEFAULT_BINS: Final = 10
#: Integer columns whose declared range has at most this many values get one bin per value.
MAX_EXACT_INTEGERS: Final = 32
MAX_BINS: Final = 1000
MAX_CATEGORIES: Final = 10_000
MAX_SCHEMA_BYTES: Final = 1 << 20
MAX_ROWS: Final = 100_000_000
_COLUMN_KEYS: Final = {"name", "type", "min", "max", "bins", "decimals", "categories", "nullable"}
_SCHEMA_KEYS: Final = {"columns", "rows", "target"}


@dataclass(frozen=True)
class ColumnSpec:
    """One column: its name, type and (if declared) domain."""

    name: str
    type: str
    min: float | None = None
    max: float | None = None
    bins: int | None = None
    decimals: int | None = None
    categories: tuple[str, ...] | None = None
    nullable: bool = False

    def __post_init__(self) -> None:
        where = f"schema column {self.name!r}"
        if not isinstance(self.name, str) or not self.name or len(self.name) > 256:
            raise DCRError(
                f"schema column name {self.name!r} must be a non-empty string of at most 256 characters"
            )
        if self.type not in TYPES:
            raise DCRError(f"{where}: unknown type {self.type!r}", hint=f"use one of {', '.join(TYPES)}")
        numeric = self.type in ("integer", "float")
        for key in ("min", "max"):
            value = getattr(self, key)
            if value is None:
                continue
            if not numeric:
                raise DCRError(f"{where}: {key} applies to integer and float columns only")
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise DCRError(f"{where}: {key} must be a finite number, not {value!r}")
            if self.type == "integer" and value != int(value):
                raise DCRError(f"{where}: {key} of an integer column must be a whole number")
        if (self.min is None) != (self.max is None):
            raise DCRError(f"{where}: declare both min and max, or neither (then they are estimated with DP)")
        if self.min is not None and self.max is not None and not self.min < self.max:
            raise DCRError(f"{where}: min ({self.min:g}) must be less than max ({self.max:g})")
        for key, top in (("bins", MAX_BINS), ("decimals", 12)):
            value = getattr(self, key)
            if value is None:
                continue
            if not numeric:
                raise DCRError(f"{where}: {key} applies to integer and float columns only")
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not (1 if key == "bins" else 0) <= value <= top
            ):
                raise DCRError(
                    f"{where}: {key} must be an integer between {1 if key == 'bins' else 0} and {top}"
                )
        if self.categories is not None:
            if self.type != "categorical":
                raise DCRError(f"{where}: categories apply to categorical columns only")
            cats = self.categories
            if not cats or len(cats) > MAX_CATEGORIES or not all(isinstance(c, str) and c for c in cats):
                raise DCRError(
                    f"{where}: categories must be a list of 1 to {MAX_CATEGORIES} non-empty strings",
                    hint="quote values that YAML would read as numbers or booleans",
                )
            seen: set[str] = set()
            for c in cats:
                if c in seen:
                    raise DCRError(f"{where}: category {c!r} is listed twice")
                seen.add(c)
        if not isinstance(self.nullable, bool):
            raise DCRError(f"{where}: nullable must be true or false")

    @property
    def numeric(self) -> bool:
        return self.type in ("integer", "float")

    @property
    def declared_domain(self) -> bool:
        """Whether the domain is declared (else it must be estimated with DP)."""
        return self.categories is not None if self.type == "categorical" else self.min is not None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type}
        for key in ("min", "max", "bins", "decimals"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.categories is not None:
            out["categories"] = list(self.categories)
        if self.nullable:
            out["nullable"] = True
        return out


@dataclass(frozen=True)
class TableSchema:
    """The columns of one table, in file order; ``declared`` is False for a schema read off a file."""

    columns: tuple[ColumnSpec, ...]
    rows: int | None = None
    target: str | None = None
    declared: bool = field(default=True, compare=False)

    def __post_init__(self) -> None:
        if not self.columns:
            raise DCRError("a schema needs at least one column")
        names = [c.name for c in self.columns]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DCRError(f"the schema names column {dupes[0]!r} twice")
        if self.rows is not None and (
            isinstance(self.rows, bool) or not isinstance(self.rows, int) or not 1 <= self.rows <= MAX_ROWS
        ):
            raise DCRError(f"schema rows must be an integer between 1 and {MAX_ROWS}")
        if self.target is not None and self.target not in names:
            raise DCRError(f"the schema's target {self.target!r} is not one of its columns")

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> ColumnSpec:
        for c in self.columns:
            if c.name == name:
                return c
        raise DCRError(f"the schema has no column {name!r}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"columns": [c.to_json() for c in self.columns]}
        if self.rows is not None:
            out["rows"] = self.rows
        if self.target is not None:
            out["target"] = self.target
        return out


def schema_from_json(doc: Any, what: str = "schema") -> TableSchema:
    """A :class:`TableSchema` from parsed YAML/JSON, refusing unknown keys (they are usually typos)."""
    if not isinstance(doc, Mapping):
        raise DCRError(f"{what} must be a mapping with a 'columns' list")
    unknown = sorted(set(map(str, doc)) - _SCHEMA_KEYS)
    if unknown:
        raise DCRError(
            f"{what}: unknown key {unknown[0]!r}", hint=f"known keys: {', '.join(sorted(_SCHEMA_KEYS))}"
        )
    columns = doc.get("columns")
    if not isinstance(columns, Sequence) or isinstance(columns, str | bytes):
        raise DCRError(f"{what} must have a 'columns' list")
    specs = []
    for i, col in enumerate(columns, 1):
        if not isinstance(col, Mapping):
            raise DCRError(f"{what}: column {i} must be a mapping with name and type")
        unknown = sorted(set(map(str, col)) - _COLUMN_KEYS)
        if unknown:
            raise DCRError(
                f"{what}: column {col.get('name', i)!r} has unknown key {unknown[0]!r}",
                hint=f"known keys: {', '.join(sorted(_COLUMN_KEYS))}",
            )
        if "name" not in col or "type" not in col:
            raise DCRError(f"{what}: column {i} needs a name and a type")
        cats = col.get("categories")
        if cats is not None and (not isinstance(cats, Sequence) or isinstance(cats, str | bytes)):
            raise DCRError(f"{what}: categories of column {col['name']!r} must be a list")
        specs.append(
            ColumnSpec(
                name=col["name"],
                type=col["type"],
                min=col.get("min"),
                max=col.get("max"),
                bins=col.get("bins"),
                decimals=col.get("decimals"),
                categories=tuple(cats) if cats is not None else None,
                nullable=col.get("nullable", False),
            )
        )
    return TableSchema(tuple(specs), rows=doc.get("rows"), target=doc.get("target"))


def load_schema(path: str | Path) -> TableSchema:
    """Read a schema file: ``.json`` as JSON, anything else as YAML (which also reads JSON)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_SCHEMA_BYTES + 1)
    except OSError as e:
        raise DCRError(f"cannot read the schema {p}: {e.strerror}") from None
    if len(data) > MAX_SCHEMA_BYTES:
        raise DCRError(f"the schema {p} is larger than {MAX_SCHEMA_BYTES} bytes")
    syntax = "JSON" if p.suffix.lower() == ".json" else "YAML"
    try:
        text = data.decode("utf-8")
        doc = json.loads(text) if syntax == "JSON" else yaml.safe_load(text)
    except UnicodeDecodeError as e:
        raise DCRError(f"the schema {p} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DCRError(
            f"the schema {p} is not valid JSON: line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise DCRError(f"the schema {p} is not valid YAML: {where}{problem}") from None
    try:
        return schema_from_json(doc, f"the schema {p}")
    except DCRError as e:
        if e.message.startswith(f"the schema {p}"):
            raise
        # A column's own check does not know the file: name it, as table errors do.
        raise DCRError(f"{p}: {e.message}", hint=e.hint) from None
