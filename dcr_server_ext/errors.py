"""Refusals with an HTTP status: the handlers turn them into ``{"error": "..."}`` responses."""

from __future__ import annotations

from dcr_enclave.formats.errors import DCRError


class APIError(DCRError):
    status = 400


class NotFound(APIError):
    status = 404


class Conflict(APIError):
    status = 409


class TooLarge(APIError):
    status = 413


class Unavailable(APIError):
    """The enclave backend or the grant service cannot be reached; the job is not lost."""

    status = 503
