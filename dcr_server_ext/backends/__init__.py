"""Enclave backends: where a granted job runs. Chosen by ``c.DCRExtension.backend_class``."""

from .base import Backend, BackendStatus

__all__ = ["Backend", "BackendStatus"]
