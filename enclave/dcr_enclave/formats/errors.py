"""The one exception type the CLI turns into a clear message and a non-zero exit.

Every refusal in the TCB raises :class:`DCRError` (or a subclass) with a message that says what is wrong
and, where there is one, what to do about it. Anything else escaping to the CLI is a bug.
"""

from __future__ import annotations


class DCRError(Exception):
    """A refusal with a message fit for the person who ran the command."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class IntegrityError(DCRError):
    """Data failed an integrity or authenticity check (tampered, truncated, reordered, wrong key)."""


class LimitError(DCRError):
    """Input exceeds a configured limit (files, bytes, size)."""
