"""JSON Schemas shipped in a package's ``schemas/`` folder, loaded once and applied with one error style.

The shared formats' schemas live in ``dcr_enclave/formats/schemas``; a layer with its own format (the local
platform's key-release condition) keeps its schema beside its code and names its package.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

import jsonschema

from dcr_enclave.formats.errors import DCRError

MAX_MESSAGE = 300
#: The package whose schemas/ folder holds the shared formats' schemas.
FORMATS_PACKAGE = "dcr_enclave.formats"


@cache
def validator(schema_file: str, package: str = FORMATS_PACKAGE) -> jsonschema.protocols.Validator:
    schema = json.loads(resources.files(package).joinpath("schemas", schema_file).read_text("utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def validate(
    doc: Any,
    schema_file: str,
    what: str,
    *,
    error: type[DCRError] = DCRError,
    hint: str | None = None,
    package: str = FORMATS_PACKAGE,
) -> None:
    """Refuse ``doc`` with ``error`` naming where the schema's most relevant complaint is."""
    err = jsonschema.exceptions.best_match(validator(schema_file, package).iter_errors(doc))
    if err is not None:
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        msg = err.message if len(err.message) <= MAX_MESSAGE else err.message[:MAX_MESSAGE] + "..."
        raise error(f"{what} is invalid at {where}: {msg}", hint=hint)
