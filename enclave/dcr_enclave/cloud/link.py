"""The supervisor's link to Google Confidential Space: tokens, key release, progress, platform facts.

- **Tokens**: ``POST /v1/token`` over the launcher's unix socket (``teeserver.sock``) with the audience,
  the nonces and ``token_type`` ``PKI``: the token carries its ``x5c`` chain to Google's attestation root,
  so a receipt still verifies after Google rotates the signing key (an OIDC token would need the JWKS of
  its day). Google accepts nonces of 10 to 74 bytes each; a receipt's nonce, ``sha256:<64 hex>``, is 71.
- **Key release** (:meth:`CloudLink.release`): per dataset, from the *grant's* cloud entry (never from
  storage): the manifest's key must be the Cloud KMS key the grant pins; the attestation token is exchanged
  at STS under the provider's Workload Identity pool provider (whose attribute condition is the provider's
  policy, evaluated by Google), and the federated token asks Cloud KMS to decrypt the wrapped data key, with
  CRC32C checks both ways. No broker, hence no challenge from outside: :meth:`CloudLink.challenge` is a
  fresh random nonce, which makes each key-release token unique.
- **Progress**: ``<PROGRESS_URI><seq:08d>.json`` objects, create-only, in order.
- **Info**: kind ``confidential_space``; the image digest as Google attests it in the token
  (``submods.container.image_digest``); as "signer JWKS" the public key of the token's ``x5c`` leaf (a
  convenience only: verifiers pin Google's root).
"""

from __future__ import annotations

import base64
import http.client
import json
import secrets
import socket
import threading
from collections.abc import Mapping
from typing import Any

from cryptography import x509

from dcr_enclave.cloud.gcs import Bucketed
from dcr_enclave.formats import contract
from dcr_enclave.formats.attestation import MAX_TOKEN_BYTES
from dcr_enclave.formats.contract import GsUri
from dcr_enclave.formats.dataset import KmsKey, key_from_json
from dcr_enclave.formats.digests import sha256_json
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.grant import Grant, GrantedDataset
from dcr_enclave.formats.jwk import public_jwk
from dcr_enclave.formats.streamcrypt import DATA_KEY_SIZE

#: Google's documented bounds on each custom-token nonce, and on how many there may be.
MIN_NONCE_BYTES = 10
MAX_NONCE_BYTES = 74
MAX_NONCES = 6
#: What STS says when the pool provider's attribute condition is false for the token.
_CONDITION_REFUSED = "attribute condition"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
#: Seconds before a call to the launcher, STS or KMS gives up.
TIMEOUT = 30.0


def check_nonces(nonces: list[str]) -> None:
    """Refuse nonces Confidential Space would refuse (before asking it)."""
    if not 1 <= len(nonces) <= MAX_NONCES:
        raise DCRError(f"a custom attestation token carries 1 to {MAX_NONCES} nonces")
    for n in nonces:
        if not isinstance(n, str) or not MIN_NONCE_BYTES <= len(n.encode()) <= MAX_NONCE_BYTES:
            raise DCRError(f"each nonce must be {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} bytes")


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=TIMEOUT)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _payload(token: str) -> dict[str, Any]:
    """A token's claims, unverified: it came from our own launcher over a local socket."""
    try:
        seg = token.split(".")[1]
        doc = json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))
    except (IndexError, ValueError):
        raise DCRError("the launcher returned a token that is not a readable JWT") from None
    if not isinstance(doc, dict):
        raise DCRError("the launcher returned a token whose payload is not an object")
    return doc


def _header(token: str) -> dict[str, Any]:
    seg = token.split(".")[0]
    try:
        doc = json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))
    except ValueError:
        raise DCRError("the launcher returned a token whose header is unreadable") from None
    return doc if isinstance(doc, dict) else {}


def condition_digest(cloud: Any) -> str:
    """What the receipt records as the condition that released a key in the cloud: the pins the grant made
    (pool provider and KMS key). The attribute condition itself lives in the provider's project, where
    Google evaluates it; its text is not visible from inside the enclave."""
    return sha256_json({"wip_provider": cloud.wip_provider, "kms_key": cloud.kms_key})


class _AttestationSupplier:
    """google-auth's subject token supplier: always the one attestation token of this release."""

    def __init__(self, token: str) -> None:
        self._token = token

    def get_subject_token(self, context: Any, request: Any) -> str:
        return self._token


class CloudLink:
    """:class:`~dcr_enclave.runtime.platform_link.PlatformLink` for Confidential Space."""

    def __init__(
        self,
        env: Mapping[str, str],
        storage: Bucketed,
        progress_uri: GsUri,
    ) -> None:
        self.socket_path = env.get(contract.CLOUD_TEESERVER_SOCKET) or contract.DEFAULT_TEESERVER_SOCKET
        self.sts_endpoint = (env.get(contract.CLOUD_STS_ENDPOINT) or contract.DEFAULT_STS_ENDPOINT).rstrip(
            "/"
        )
        self.kms_endpoint = (env.get(contract.CLOUD_KMS_ENDPOINT) or contract.DEFAULT_KMS_ENDPOINT).rstrip(
            "/"
        )
        self.storage = storage
        self.progress_uri = progress_uri
        self._seq = 0
        self._lock = threading.Lock()
        self._grant: Grant | None = None
        self._claims: dict[str, Any] | None = None
        self._x5c_leaf: str | None = None

    def bind(self, grant: Grant) -> None:
        """The verified grant, whose datasets' cloud entries say what may release which key."""
        self._grant = grant

    # -- tokens -------------------------------------------------------------------------------------

    def challenge(self) -> str:
        return secrets.token_hex(16)

    def token(self, audience: str, nonces: list[str]) -> str:
        check_nonces(nonces)
        body = json.dumps({"audience": audience, "nonces": nonces, "token_type": "PKI"})
        conn = _UnixHTTPConnection(self.socket_path)
        try:
            conn.request("POST", "/v1/token", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read(MAX_TOKEN_BYTES + 1)
        except OSError as e:
            raise DCRError(f"the launcher's token service is unreachable ({type(e).__name__})") from None
        finally:
            conn.close()
        if resp.status != 200:
            raise DCRError(f"the launcher refused an attestation token (HTTP {resp.status})")
        if len(data) > MAX_TOKEN_BYTES:
            raise DCRError("the launcher returned a token larger than allowed")
        token = data.decode("ascii", "replace").strip()
        claims = _payload(token)
        with self._lock:
            self._claims = claims
            x5c = _header(token).get("x5c")
            if isinstance(x5c, list) and x5c and isinstance(x5c[0], str):
                self._x5c_leaf = x5c[0]
        return token

    # -- key release --------------------------------------------------------------------------------

    def _granted(self, provider: str, dataset: str) -> GrantedDataset:
        if self._grant is None:
            raise DCRError("key release before the grant was verified")
        for d in self._grant.datasets:
            if (d.provider, d.dataset) == (provider, dataset):
                return d
        raise DCRError(f"dataset {provider}/{dataset} is not in the grant")

    def release(self, **request: Any) -> tuple[bytes, str]:
        """The data key of one granted dataset, decrypted by Cloud KMS for this attested enclave."""
        d = self._granted(str(request.get("provider")), str(request.get("dataset")))
        if d.cloud is None:
            raise DCRError(f"dataset {d.key}: the grant names no Cloud KMS key or Workload Identity provider")
        key = key_from_json(request["wrapped_key"])
        if not isinstance(key, KmsKey) or key.name != d.cloud.kms_key:
            raise DCRError(
                f"dataset {d.key}: its manifest's data key is not wrapped by the Cloud KMS key the grant pins "
                f"({d.cloud.kms_key})",
                hint="the store holds a version registered under another key: ask the provider",
            )
        try:
            wrapped = base64.b64decode(key.wrapped_data_key, validate=True)
        except ValueError:
            raise DCRError(f"dataset {d.key}: its wrapped data key is not base64") from None
        data_key = self._kms_decrypt(d, key.name, wrapped, str(request["token"]))
        return data_key, condition_digest(d.cloud)

    def _kms_decrypt(self, d: GrantedDataset, key_name: str, wrapped: bytes, token: str) -> bytes:
        import google_crc32c
        from google.api_core import exceptions as gexc
        from google.api_core.client_options import ClientOptions
        from google.auth import exceptions as aexc
        from google.auth import identity_pool
        from google.cloud import kms_v1

        assert d.cloud is not None
        creds = identity_pool.Credentials(
            audience=d.cloud.sts_audience,
            subject_token_type=JWT_TOKEN_TYPE,
            token_url=f"{self.sts_endpoint}/v1/token",
            subject_token_supplier=_AttestationSupplier(token),
            scopes=[CLOUD_PLATFORM_SCOPE],
        )
        client = kms_v1.KeyManagementServiceClient(
            credentials=creds,
            transport="rest",
            client_options=ClientOptions(api_endpoint=self.kms_endpoint),
        )
        try:
            resp = client.decrypt(
                request={
                    "name": key_name,
                    "ciphertext": wrapped,
                    "ciphertext_crc32c": google_crc32c.value(wrapped),
                },
                timeout=TIMEOUT,
            )
        except (aexc.RefreshError, aexc.OAuthError) as e:
            if _CONDITION_REFUSED in str(e):
                raise DCRError(
                    f"dataset {d.key}: key release refused: the provider's attestation condition refused "
                    "this enclave",
                    hint="the provider's Workload Identity pool condition does not admit this image, "
                    "platform or hub key",
                ) from None
            raise DCRError(
                f"dataset {d.key}: key release refused: STS did not exchange the attestation token "
                f"({_sts_error(e)})"
            ) from None
        except (gexc.PermissionDenied, gexc.Forbidden):
            raise DCRError(
                f"dataset {d.key}: key release refused: Cloud KMS denied decrypt on {key_name} to this "
                "provider's Workload Identity pool"
            ) from None
        except gexc.GoogleAPICallError as e:
            raise DCRError(f"dataset {d.key}: Cloud KMS decrypt failed (HTTP {e.code})") from None
        except (aexc.GoogleAuthError, OSError) as e:
            raise DCRError(f"dataset {d.key}: key release failed ({type(e).__name__})") from None
        finally:
            client.transport.close()
        plaintext = bytes(resp.plaintext)
        # Both directions are checked: KMS verified our ciphertext's CRC (or refused), we verify its plaintext's.
        if resp.plaintext_crc32c is None or int(resp.plaintext_crc32c) != google_crc32c.value(plaintext):
            raise DCRError(f"dataset {d.key}: the data key from Cloud KMS failed its CRC32C check")
        if len(plaintext) != DATA_KEY_SIZE:
            raise DCRError(f"dataset {d.key}: Cloud KMS returned a data key of the wrong size")
        return plaintext

    # -- progress and platform facts ----------------------------------------------------------------

    def progress(self, msg: dict[str, Any]) -> None:
        data = json.dumps(msg, separators=(",", ":"), sort_keys=True).encode()
        if len(data) > contract.Progress.MAX_MESSAGE_BYTES:
            raise DCRError("a progress message is larger than allowed")
        with self._lock:
            seq = self._seq
            self._seq += 1
        self.storage.create(
            self.progress_uri.child(contract.progress_object_name(seq)), data, content_type="application/json"
        )

    def info(self) -> dict[str, Any]:
        if self._claims is None:
            self.token(contract.RECEIPT_AUDIENCE, [self.challenge()])
        claims = self._claims or {}
        submods = claims.get("submods")
        container = submods.get("container") if isinstance(submods, dict) else None
        digest = container.get("image_digest") if isinstance(container, dict) else None
        if not isinstance(digest, str):
            raise DCRError("the attestation token names no submods.container.image_digest")
        if self._x5c_leaf is None:
            raise DCRError("the launcher's tokens carry no x5c chain (PKI tokens were asked for)")
        try:
            leaf = x509.load_der_x509_certificate(base64.b64decode(self._x5c_leaf, validate=True))
            jwk = public_jwk(leaf.public_key())  # type: ignore[arg-type]
        except (ValueError, DCRError) as e:
            raise DCRError(f"the token's x5c leaf certificate is unusable ({type(e).__name__})") from None
        return {"kind": "confidential_space", "image_digest": digest, "jwks": {"keys": [jwk]}}

    def close(self) -> None:
        pass


def _sts_error(e: BaseException) -> str:
    """STS's OAuth error code from a refresh error, else the exception's kind (never a response body)."""
    text = str(e)
    for code in (
        "invalid_grant",
        "invalid_request",
        "unauthorized_client",
        "invalid_target",
        "access_denied",
    ):
        if code in text:
            return code
    return type(e).__name__
