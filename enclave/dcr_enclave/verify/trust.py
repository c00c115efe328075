"""Trust anchors: the one parser behind ``dcr verify --trust/--trust-root`` and ``c.DCRExtension.trust_*``.

A receipt is verified only against anchors the verifier pins, never against keys the receipt brings. There
are two kinds, given separately, because a certificate could mean either "trust this key" or "trust chains
that end here", and guessing is how the wrong thing gets trusted:

* **signer anchors** (``dcr verify --trust``, ``c.DCRExtension.trust_jwks``): ``sha256:<hex>``, the RFC 7638
  thumbprint of a signer key (the key itself may then come from the receipt's ``signer-jwks.json``, but
  only a key with a pinned thumbprint is used), or a file of public signer keys: a JWKS, a single JWK or
  one PEM public key. Every key must be an EC P-256 or RSA public key usable for ES256/RS256 signatures.
* **root anchors** (``dcr verify --trust-root``, ``c.DCRExtension.trust_roots``): a PEM file of one or more
  CA certificates (basicConstraints CA:TRUE) that the ``x5c`` chain of a PKI token must end at.

Files are read once, must be regular files of at most :data:`MAX_ANCHOR_BYTES`, and are refused when they
hold anything that does not fit their kind: a certificate given as a signer key, a public key given as a
root, a private key anywhere, PEM blocks of another type mixed in, a JWK for encryption or for another
algorithm. Relative paths are resolved against ``base_dir`` (the command line passes the current
directory) or, without one (configuration files, read by servers started elsewhere), refused. Every
refusal is a :class:`~dcr_enclave.formats.errors.DCRError` naming the option, the entry, what is wrong
and what to do.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from dcr_enclave.formats.contract import ACCEPTED_ALGORITHMS
from dcr_enclave.formats.digests import DIGEST_RE
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.jwk import MAX_JWKS_BYTES, key_alg, parse_jwks, public_key_from_jwk, thumbprint

#: Largest trust anchor file read (JWKS, JWK, PEM public key or certificates).
MAX_ANCHOR_BYTES = MAX_JWKS_BYTES
#: How the command line names the two kinds (the server extension passes its trait names).
CLI_SIGNER_OPTION = "--trust"
CLI_ROOT_OPTION = "--trust-root"

_PEM_BEGIN_RE = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_PEM_BLOCK_RE = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.DOTALL)
_PUBLIC_KEY_LABELS = (b"PUBLIC KEY", b"RSA PUBLIC KEY")
_HEX64_RE = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class TrustAnchors:
    """What receipts are verified against: pinned signer keys, key thumbprints and root certificates.

    Built by :func:`load_trust_anchors`, never from a receipt. ``roots_pem`` is the pinned roots as PEM,
    as :func:`~dcr_enclave.verify.receipt.check_receipt_dir` takes them.
    """

    keys: tuple[dict[str, Any], ...] = ()
    thumbprints: tuple[str, ...] = ()
    roots_pem: bytes | None = None
    #: ``{"kind": "key"|"thumbprint"|"root", "source", "id"}`` per anchor, in the order given.
    described: tuple[dict[str, str], ...] = field(default=())

    def __bool__(self) -> bool:
        return bool(self.keys or self.thumbprints or self.roots_pem)


def load_trust_anchors(
    signers: Iterable[str] = (),
    roots: Iterable[str] = (),
    *,
    signer_option: str = CLI_SIGNER_OPTION,
    root_option: str = CLI_ROOT_OPTION,
    base_dir: str | Path | None = None,
) -> TrustAnchors:
    """Parse signer anchors (thumbprints, JWKS/JWK/PEM public key files) and root anchors (PEM CA
    certificate files). ``signer_option``/``root_option`` name where the entries came from in messages.
    Raises :class:`DCRError` for the first entry refused; no anchor at all is not an error here."""
    base = Path(base_dir) if base_dir is not None else None
    keys: dict[str, dict[str, Any]] = {}
    thumbprints: dict[str, None] = {}
    certs: dict[bytes, x509.Certificate] = {}
    described: list[dict[str, str]] = []
    for entry in _entries(
        signers, signer_option, "the path of a JWKS/JWK/PEM public key file or sha256:<thumbprint>"
    ):
        if entry.startswith("sha256:"):
            if not DIGEST_RE.match(entry):
                raise DCRError(
                    f"{signer_option} {entry!r} is not a key thumbprint",
                    hint="write sha256: and the 64 lowercase hex digits of the RFC 7638 thumbprint",
                )
            thumbprints[entry] = None
            described.append({"kind": "thumbprint", "source": entry, "id": entry})
            continue
        if _HEX64_RE.match(entry) and (base is None or not os.path.lexists(base / entry)):
            raise DCRError(
                f"{signer_option} {entry!r} is neither a file nor a key thumbprint",
                hint=f"write a thumbprint as sha256:{entry.lower()}",
            )
        path = _path(entry, signer_option, base)
        for key in _signer_keys(_read(path, entry, signer_option), entry, signer_option, root_option):
            tp = thumbprint(key)
            keys.setdefault(tp, key)
            described.append({"kind": "key", "source": entry, "id": tp})
    for entry in _entries(roots, root_option, "the path of a PEM file of CA certificates"):
        if entry.startswith("sha256:") or _HEX64_RE.match(entry):
            raise DCRError(
                f"{root_option} {entry!r} is a key thumbprint, not a certificate file",
                hint=f"a root is a PEM CA certificate file; pin a key thumbprint with {signer_option}",
            )
        path = _path(entry, root_option, base)
        for cert in _root_certificates(_read(path, entry, root_option), entry, signer_option, root_option):
            certs.setdefault(cert.public_bytes(Encoding.DER), cert)
            described.append({"kind": "root", "source": entry, "id": _cert_name(cert)})
    roots_pem = b"".join(c.public_bytes(Encoding.PEM) for c in certs.values()) or None
    return TrustAnchors(tuple(keys.values()), tuple(thumbprints), roots_pem, tuple(described))


# ---------------------------------------------------------------------------------------------------------
# Entries and files
# ---------------------------------------------------------------------------------------------------------


def _entries(values: Iterable[str], option: str, expected: str) -> list[str]:
    if isinstance(values, str | bytes):  # one path given where a list belongs: refuse, do not iterate it
        raise DCRError(f"{option} must be a list of trust anchors, not the single value {values!r}")
    out = []
    for value in values:
        if not isinstance(value, str) or not value.strip():
            raise DCRError(f"{option} {value!r} is no trust anchor", hint=f"give {expected}")
        if value != value.strip() or "\x00" in value:
            raise DCRError(f"{option} {value!r} has surrounding white space or a NUL byte; remove it")
        out.append(value)
    return out


def _path(entry: str, option: str, base: Path | None) -> Path:
    p = Path(entry)
    if p.is_absolute():
        return p
    if base is None:
        raise DCRError(
            f"{option} {entry!r} must be an absolute path",
            hint="the server reads configuration from its own working directory; write the full path",
        )
    return base / p


def _read(path: Path, entry: str, option: str) -> bytes:
    """A regular file's bytes, at most MAX_ANCHOR_BYTES; links are followed, special files refused."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise DCRError(
            f"{option} {entry!r}: cannot read the file ({e.strerror})",
            hint="give the path of a file this account can read",
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DCRError(
                f"{option} {entry!r} is not a regular file",
                hint="give the path of the key or certificate file",
            )
        if st.st_size > MAX_ANCHOR_BYTES:
            raise DCRError(
                f"{option} {entry!r} is larger than {MAX_ANCHOR_BYTES} bytes, too large for a key or certificate file"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_ANCHOR_BYTES + 1)
    except OSError as e:
        raise DCRError(f"{option} {entry!r}: cannot read the file ({e.strerror})") from None
    finally:
        os.close(fd)
    if len(data) > MAX_ANCHOR_BYTES:
        raise DCRError(
            f"{option} {entry!r} is larger than {MAX_ANCHOR_BYTES} bytes, too large for a key or certificate file"
        )
    if not data.strip():
        raise DCRError(
            f"{option} {entry!r} is empty", hint="give the file the signer or root was published in"
        )
    return data


def _refuse_private(labels: list[bytes], entry: str, option: str) -> None:
    if any(b"PRIVATE" in label for label in labels):
        raise DCRError(
            f"{option} {entry!r} holds a private key",
            hint="pin only public material (the JWKS or certificate the signer publishes); "
            "keep the private key where it was and out of verifiers' configuration",
        )


# ---------------------------------------------------------------------------------------------------------
# The two kinds
# ---------------------------------------------------------------------------------------------------------


def _signer_keys(data: bytes, entry: str, option: str, root_option: str) -> list[dict[str, Any]]:
    labels = _PEM_BEGIN_RE.findall(data)
    _refuse_private(labels, entry, option)
    if b"CERTIFICATE" in labels:
        raise DCRError(
            f"{option} {entry!r} holds a certificate, not a signer key",
            hint=f"pin a root certificate with {root_option}; pin a signer with its JWKS or sha256:<thumbprint>",
        )
    if labels:
        if len(labels) != 1 or labels[0] not in _PUBLIC_KEY_LABELS:
            raise DCRError(
                f"{option} {entry!r} must hold exactly one PEM public key, not "
                f"{', '.join(label.decode() for label in labels)}",
                hint="give one public key per PEM file, or a JWKS with several keys",
            )
        block = _PEM_BLOCK_RE.search(data)
        if block is None:
            raise DCRError(f"{option} {entry!r} holds a PEM block without its END line")
        data = block.group(0)
    else:
        _check_jwk_members(data, entry, option)
    where = f"{option} {entry!r}"
    try:
        keys = parse_jwks(data, where)
    except DCRError as e:
        message = e.message if e.message.startswith(where) else f"{where}: {e.message}"
        raise DCRError(
            message, hint=e.hint or "give a JWKS, a JWK or a PEM public key (EC P-256 or RSA)"
        ) from None
    for jwk in keys:
        key = public_key_from_jwk(jwk)  # parse_jwks has checked it: EC P-256 or RSA, public only
        alg = jwk.get("alg")
        if alg is not None and alg != key_alg(key):
            raise DCRError(
                f"{where}: key {thumbprint(jwk)} says alg {alg!r}, but DCR verifies this key type only "
                f"with {key_alg(key)}",
                hint="remove the alg member or correct it",
            )
    return keys


def _check_jwk_members(data: bytes, entry: str, option: str) -> None:
    """Refuse, before any key is built from them, JWKs meant for encryption or for an algorithm DCR never
    accepts (an ``alg`` of ``none`` or ``HS256`` says the key is not a signature key DCR can use)."""
    try:
        doc = json.loads(data)
    except ValueError:
        return  # parse_jwks says what is wrong with the file
    members = doc.get("keys") if isinstance(doc, dict) and "keys" in doc else [doc]
    if not isinstance(members, list):
        return
    for i, jwk in enumerate(members):
        if not isinstance(jwk, dict):
            continue
        what = f"{option} {entry!r}: key {jwk.get('kid', i)!r}"
        use = jwk.get("use")
        if use is not None and use != "sig":
            raise DCRError(
                f"{what} is for {use!r}, not for signatures (use: sig)", hint="pin the signing key"
            )
        alg = jwk.get("alg")
        if alg is not None and alg not in ACCEPTED_ALGORITHMS:
            raise DCRError(
                f"{what} says alg {alg!r}; DCR verifies only {', '.join(ACCEPTED_ALGORITHMS)}",
                hint="pin the attestation signer's public key",
            )


def _root_certificates(data: bytes, entry: str, signer_option: str, option: str) -> list[x509.Certificate]:
    labels = _PEM_BEGIN_RE.findall(data)
    _refuse_private(labels, entry, option)
    if b"CERTIFICATE" not in labels:
        held = f" (it holds {', '.join(sorted({label.decode() for label in labels}))})" if labels else ""
        raise DCRError(
            f"{option} {entry!r} holds no PEM certificate{held}",
            hint=f"a root is a PEM CA certificate; pin a JWKS or public key with {signer_option}",
        )
    others = sorted({label.decode() for label in labels if label != b"CERTIFICATE"})
    if others:
        raise DCRError(
            f"{option} {entry!r} holds {', '.join(others)} besides certificates",
            hint=f"a root file holds CA certificates only; pin signer keys with {signer_option}",
        )
    certs = []
    for block in _PEM_BLOCK_RE.finditer(data):
        try:
            cert = x509.load_pem_x509_certificate(block.group(0))
        except ValueError as e:
            raise DCRError(f"{option} {entry!r} holds an unreadable certificate: {e}") from None
        if not _is_ca(cert):
            raise DCRError(
                f"{option} {entry!r}: certificate {_cert_name(cert)!r} is not a CA certificate "
                "(basicConstraints CA:TRUE); a root must be a certificate authority",
                hint=f"pin the root CA that the chains end at; pin a signer's own key with {signer_option}",
            )
        certs.append(cert)
    if len(certs) != len(labels):
        raise DCRError(f"{option} {entry!r} holds a certificate block without its END line")
    return certs


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _cert_name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(no subject)"
