"""The JSON Schemas shipped in ``dcr_enclave/schemas``, loaded once and applied with one error style."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

import jsonschema

from .errors import DCRError

MAX_MESSAGE = 300


@cache
def validator(schema_file: str) -> jsonschema.protocols.Validator:
    schema = json.loads(resources.files(__package__).joinpath("schemas", schema_file).read_text("utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def validate(
    doc: Any, schema_file: str, what: str, *, error: type[DCRError] = DCRError, hint: str | None = None
) -> None:
    """Refuse ``doc`` with ``error`` naming where the schema's most relevant complaint is."""
    err = jsonschema.exceptions.best_match(validator(schema_file).iter_errors(doc))
    if err is not None:
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        msg = err.message if len(err.message) <= MAX_MESSAGE else err.message[:MAX_MESSAGE] + "..."
        raise error(f"{what} is invalid at {where}: {msg}", hint=hint)
