"""Loopback stand-ins for the Google services the Confidential Space path talks to.

They speak the real wire protocols to the real client libraries (``google-auth``, ``google-cloud-kms``,
``google-cloud-storage``) and listen on 127.0.0.1 or a unix socket only:

- :mod:`.issuer`: Google's attestation issuer: a root CA, an intermediate and a signing leaf (``PKI``
  tokens carry the ``x5c`` chain), plus an OIDC key set, and Confidential Space claim shapes;
- :mod:`.teeserver`: the launcher's ``teeserver.sock`` (``POST /v1/token``);
- :mod:`.sts`: the Security Token Service's token exchange under Workload Identity pool providers, whose
  attribute conditions it evaluates with the CEL runtime the local broker uses;
- :mod:`.kms`: Cloud KMS ``encrypt``/``decrypt`` over REST, with CRC32C fields and per-key decrypt bindings
  to principal sets;
- :mod:`.storage`: the pinned ``gcp-storage-emulator``, run as a subprocess.
"""
