"""The enclave on Google Confidential Space: the same supervisor, with Google's platform behind the seam.

``python -m dcr_enclave.cloud`` (:mod:`dcr_enclave.cloud.__main__`) is the image's entry point. It reads the
launch environment (``tee-env-*`` metadata the launcher turns into the environment, names from
:mod:`dcr_enclave.formats.contract`), copies the bundle and the granted datasets from Cloud Storage onto the
supervisor's private tmpfs, runs :class:`dcr_enclave.runtime.supervisor.Supervisor` with a
:class:`~dcr_enclave.cloud.link.CloudLink` (attestation tokens from the launcher's ``teeserver.sock``, data
keys from Cloud KMS behind STS token exchange under each provider's Workload Identity pool) and writes the
sealed results back, the completion object last.

This package is part of the trusted computing base: it may import ``formats``, ``runtime`` and Google's
client libraries, nothing of the local platform, the producers or the commands.
"""
