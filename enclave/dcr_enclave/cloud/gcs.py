"""Cloud Storage as the enclave uses it: bounded downloads into scratch, create-only uploads.

Storage is untrusted (docs/architecture: trust model): what is read is checked afterwards (the bundle's
digest, each manifest's MAC under the released key, each file's size and authenticated chunks); what is
written is public or sealed. Every write is create-only (``if_generation_match=0``), so a result object is
never replaced once written, not even by a second run of the same job.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dcr_enclave.formats import contract
from dcr_enclave.formats.contract import GsUri
from dcr_enclave.formats.errors import DCRError


def storage_client(env: Mapping[str, str]) -> Any:
    """A storage client: the VM's service account by default; anonymous against a test endpoint."""
    from google.cloud import storage  # type: ignore[attr-defined]

    endpoint = env.get(contract.CLOUD_STORAGE_ENDPOINT)
    if endpoint:
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(
            project="dcr-enclave",
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": endpoint},
        )
    return storage.Client()


def _api_error() -> tuple[type[BaseException], ...]:
    from google.api_core import exceptions as gexc
    from google.auth import exceptions as aexc
    from google.resumable_media import common

    return (gexc.GoogleAPIError, aexc.GoogleAuthError, common.DataCorruption, OSError)


class Bucketed:
    """Reads and writes of one storage client, with errors that name the object but never its contents."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def download(self, uri: GsUri, dest: Path, *, max_bytes: int, what: str) -> int:
        """Copy one object to ``dest`` (created, owner-only), at most ``max_bytes``; returns its size.

        The object's generation is fixed when its size is checked, so a replaced object cannot slip in
        between the check and the read.
        """
        errors = _api_error()
        try:
            blob = self.client.bucket(uri.bucket).get_blob(uri.name)
        except errors as e:
            raise DCRError(f"cannot read {what} at {uri}: {type(e).__name__}") from None
        if blob is None:
            raise DCRError(f"{what} is missing: no object {uri}")
        if blob.size is None or blob.size > max_bytes:
            raise DCRError(f"{what} at {uri} is larger than {max_bytes} bytes")
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                blob.download_to_file(f, if_generation_match=blob.generation, checksum="auto")
        except errors as e:
            dest.unlink(missing_ok=True)
            raise DCRError(f"cannot read {what} at {uri}: {type(e).__name__}") from None
        size = dest.stat().st_size
        if size != blob.size:
            dest.unlink(missing_ok=True)
            raise DCRError(f"{what} at {uri} changed while it was read")
        return size

    def create(
        self, uri: GsUri, data: bytes | Path, *, content_type: str = "application/octet-stream"
    ) -> None:
        """Write a new object; refuses (DCRError) if the object exists already."""
        from google.api_core import exceptions as gexc

        blob = self.client.bucket(uri.bucket).blob(uri.name)
        try:
            if isinstance(data, Path):
                blob.upload_from_filename(str(data), content_type=content_type, if_generation_match=0)
            else:
                blob.upload_from_string(data, content_type=content_type, if_generation_match=0)
        except gexc.PreconditionFailed:
            raise DCRError(f"{uri} exists already: results are never replaced") from None
        except _api_error() as e:
            raise DCRError(f"cannot write {uri}: {type(e).__name__}") from None
