"""A provider's side of Google Cloud: data keys wrapped by Cloud KMS, versions uploaded to Cloud Storage,
and the Workload Identity Pool policy that releases the keys.

Producer code, outside the trusted computing base: nothing here runs in the enclave. The Google client
libraries (the ``gcp`` extra) are imported only when a command needs them, so the rest of ``dcr provider``
works without them.

- :class:`KmsKeyWrapper` wraps a version's data key with ``cryptoKeys.encrypt`` (CRC32C-checked both ways);
  only a principal with the decrypter role on that key (in DCR: the pool's principal set, behind the
  attestation condition) can unwrap it.
- :func:`upload_version` copies a version directory to ``gs://bucket/prefix/`` in the store layout, each
  object created only if absent (``if_generation_match=0``), the manifest last, so a reader never sees a
  manifest whose files are not all there; a second run of the same version is a no-op.
- :func:`gcp_policy` compiles the provider's condition into what the pool provider and IAM need.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from dcr_enclave.formats.contract import KEY_RELEASE_AUDIENCE, GsUri, check_name, parse_gs_uri
from dcr_enclave.formats.digests import check_digest
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.grant import KMS_KEY_RE, WIP_PROVIDER_RE
from dcr_enclave.formats.store_layout import MANIFEST_FILE
from dcr_enclave.platform.condition import KeyReleaseCondition
from dcr_enclave.platform.condition_cel import compile_wip_condition

#: Issuer of Confidential Space attestation tokens, as a pool provider names it.
CS_ISSUER_URI: Final = "https://confidentialcomputing.googleapis.com/"
#: The audience the enclave asks its key-release tokens for (the pool provider's allowed audience).
STS_AUDIENCE: Final = KEY_RELEASE_AUDIENCE
DECRYPTER_ROLE: Final = "roles/cloudkms.cryptoKeyDecrypter"
OBJECT_VIEWER_ROLE: Final = "roles/storage.objectViewer"


#: What to do when Google finds no credentials, or refuses the ones it found.
CREDENTIALS_HINT: Final = (
    "sign in with `gcloud auth application-default login`, or point GOOGLE_APPLICATION_CREDENTIALS at a "
    "credentials file"
)


@contextlib.contextmanager
def google_calls(action: str, hint: str) -> Iterator[None]:
    """Google's errors as a :class:`DCRError` that says what failed (``action``) and what to do."""
    import requests
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth

    try:
        yield
    except auth.DefaultCredentialsError:
        raise DCRError(f"{action}: no Google credentials were found", hint=CREDENTIALS_HINT) from None
    except auth.GoogleAuthError as e:  # a credential that cannot be refreshed, an unreachable token server
        raise DCRError(f"{action}: Google sign-in failed ({e})", hint=CREDENTIALS_HINT) from None
    except api.GoogleAPICallError as e:
        raise DCRError(f"{action}: {e.message}", hint=hint) from None
    except api.RetryError as e:
        raise DCRError(f"{action}: Google did not answer ({e.cause or e})", hint="try again") from None
    except requests.RequestException as e:  # the REST transports' own: no route, no name, a reset
        raise DCRError(
            f"{action}: Google cannot be reached ({e})", hint="check the network, then try again"
        ) from None


def check_kms_key(name: str) -> str:
    if not isinstance(name, str) or not KMS_KEY_RE.match(name):
        raise DCRError(
            f"{name!r} is not a Cloud KMS key name",
            hint="projects/<project>/locations/<location>/keyRings/<ring>/cryptoKeys/<key>",
        )
    return name


def wip_provider_parts(name: str) -> tuple[str, str, str]:
    """``(project number, pool, provider)`` of a Workload Identity Pool provider's resource name."""
    if not isinstance(name, str) or not WIP_PROVIDER_RE.match(name):
        raise DCRError(
            f"{name!r} is not a Workload Identity Pool provider",
            hint="projects/<project number>/locations/global/workloadIdentityPools/<pool>/providers/<provider>",
        )
    parts = name.split("/")
    return parts[1], parts[5], parts[7]


def parse_store(uri: str) -> GsUri:
    """A gs:// store location, as a prefix (ending in ``/`` unless it is the bucket's root)."""
    try:
        u = parse_gs_uri(uri, "store")
    except DCRError as e:
        raise DCRError(f"{uri!r} is not a Cloud Storage location", hint="gs://<bucket>[/<prefix>]") from e
    return u if not u.name or u.name.endswith("/") else GsUri(u.bucket, u.name + "/")


#: What a provider needs on the store's bucket to upload a version.
UPLOAD_HINT: Final = "you need roles/storage.objectCreator and roles/storage.objectViewer on the bucket"


def _crc32c(data: bytes) -> int:
    import google_crc32c

    return int(google_crc32c.value(data))


def _file_crc32c(path: Path) -> str:
    """A file's CRC32C as Cloud Storage reports it (base64 of the big-endian value)."""
    import google_crc32c

    c = google_crc32c.Checksum()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            c.update(chunk)
    return base64.b64encode(c.digest()).decode()


class KmsKeyWrapper:
    """Wraps data keys with one Cloud KMS key (the manifest's ``key`` becomes ``gcp-kms``)."""

    def __init__(self, name: str, *, endpoint: str | None = None, credentials: Any = None) -> None:
        self.name = check_kms_key(name)
        self.endpoint = endpoint
        self.credentials = credentials
        self._kms: Any = None

    def connect(self) -> Any:
        """The KMS client, made once: Google's credentials are looked up here, so a provider without any
        is told before anything is written."""
        if self._kms is None:
            from google.api_core.client_options import ClientOptions
            from google.cloud import kms_v1

            options = ClientOptions(api_endpoint=self.endpoint) if self.endpoint else None
            credentials = self.credentials
            if credentials is None and self.endpoint:
                # An emulator (tests): a placeholder bearer token, never the machine's own credentials.
                from google.oauth2.credentials import Credentials

                credentials = Credentials(token="dcr-emulator")  # noqa: S106 (not a secret)
            with google_calls(f"cannot reach Cloud KMS for {self.name}", hint=CREDENTIALS_HINT):
                self._kms = kms_v1.KeyManagementServiceClient(
                    credentials=credentials, transport="rest", client_options=options
                )
        return self._kms

    def wrap(self, provider: str, dataset: str, version: str, data_key: bytes) -> dict[str, Any]:
        check_name(provider, "provider")
        check_name(dataset, "dataset")
        check_digest(version, "dataset version")
        with google_calls(
            f"Cloud KMS refused to wrap the data key with {self.name}",
            hint="you need roles/cloudkms.cryptoKeyEncrypter on the key (gcloud auth application-default login)",
        ):
            reply = self.connect().encrypt(
                request={"name": self.name, "plaintext": data_key, "plaintext_crc32c": _crc32c(data_key)}
            )
        # CRC32C both ways: the request arrived intact, and the ciphertext we store is what KMS returned.
        if not reply.verified_plaintext_crc32c or reply.ciphertext_crc32c != _crc32c(reply.ciphertext):
            raise DCRError(
                "Cloud KMS's answer failed its CRC32C check; nothing was written", hint="try again"
            )
        return {
            "kind": "gcp-kms",
            "name": self.name,
            "wrapped_data_key": base64.b64encode(reply.ciphertext).decode(),
        }


def storage_client(endpoint: str | None = None, credentials: Any = None, project: str | None = None) -> Any:
    from google.cloud import storage

    if endpoint:
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(
            project=project or "dcr-local",
            credentials=credentials or AnonymousCredentials(),
            client_options={"api_endpoint": endpoint},
        )
    with google_calls("cannot reach Cloud Storage", hint=CREDENTIALS_HINT):
        return storage.Client(project=project, credentials=credentials)


def upload_version(version_dir: Path, rel: str, dest: GsUri, client: Any) -> list[str]:
    """Upload a version directory to ``dest`` + ``rel`` (its path in the store layout); returns the objects.

    Every object is created only if absent. An object already there with the same bytes (a re-run) is
    left as it is; different bytes are refused: a version is immutable, its name is its content digest.
    """
    from google.api_core import exceptions

    bucket = client.bucket(dest.bucket)
    files = sorted(p for p in version_dir.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    names = []
    for path in [*files, version_dir / MANIFEST_FILE]:  # the manifest last: it says the version is complete
        name = dest.name + rel.rstrip("/") + "/" + path.relative_to(version_dir).as_posix()
        with google_calls(f"cannot upload to gs://{dest.bucket}/{name}", hint=UPLOAD_HINT):
            there = bucket.get_blob(name)
            if there is None:
                try:  # create-only: a concurrent writer is never overwritten between the look and the write
                    bucket.blob(name).upload_from_filename(
                        str(path), if_generation_match=0, checksum="crc32c"
                    )
                except exceptions.PreconditionFailed:
                    raise DCRError(
                        f"gs://{dest.bucket}/{name} appeared while it was being uploaded",
                        hint="run the command again",
                    ) from None
        if there is not None and (there.size != path.stat().st_size or there.crc32c != _file_crc32c(path)):
            raise DCRError(
                f"gs://{dest.bucket}/{name} already exists with other content",
                hint="a version's objects never change: remove the stray object or use another prefix",
            )
        names.append(name)
    return names


#: The attribute each pool provider maps to its own id, so that a KMS binding names one provider's
#: principals: a pool's ``/*`` principal set would let a token that meets any provider's condition in
#: the pool (another dataset's, a laxer one) decrypt every key bound to the pool.
PROVIDER_ATTRIBUTE: Final = "dcr_wip_provider"


def uploaded_manifest(rel: str, dest: GsUri, client: Any) -> bytes | None:
    """The manifest of the version at ``dest`` + ``rel`` if it was uploaded completely (it goes last)."""
    name = dest.name + rel.rstrip("/") + "/" + MANIFEST_FILE
    with google_calls(f"cannot read gs://{dest.bucket}/{name}", hint=UPLOAD_HINT):
        blob = client.bucket(dest.bucket).get_blob(name)
        return None if blob is None else bytes(blob.download_as_bytes())


def principal_set(wip_provider: str) -> str:
    """The principals of one pool provider: those whose token met that provider's condition."""
    number, pool, provider = wip_provider_parts(wip_provider)
    return (
        f"principalSet://iam.googleapis.com/projects/{number}/locations/global/"
        f"workloadIdentityPools/{pool}/attribute.{PROVIDER_ATTRIBUTE}/{provider}"
    )


def attribute_mapping(wip_provider: str) -> dict[str, str]:
    provider = wip_provider_parts(wip_provider)[2]
    # A constant: the provider's id (letters, digits, '-') as a CEL string literal.
    return {"google.subject": "assertion.sub", f"attribute.{PROVIDER_ATTRIBUTE}": f"'{provider}'"}


def gcp_policy(
    condition: KeyReleaseCondition, *, wip_provider: str, kms_key: str, store: GsUri
) -> dict[str, Any]:
    """What a provider deploys in Google Cloud for one dataset: the pool provider's attribute condition
    (compiled from the structured condition; refused over Google's length limit), its attribute mapping
    and issuer, and the IAM bindings (KMS decrypt only for the principals of this pool provider, never a
    service account nor the whole pool; object read for the enclave's service accounts)."""
    number, pool, provider = wip_provider_parts(wip_provider)
    check_kms_key(kms_key)
    text = compile_wip_condition(condition)
    return {
        "dataset": condition.ref,
        "versions": list(condition.versions),
        "workload_identity_pool": {
            "project_number": number,
            "pool": pool,
            "provider": provider,
            "issuer_uri": CS_ISSUER_URI,
            "allowed_audiences": [STS_AUDIENCE],
            "attribute_mapping": attribute_mapping(wip_provider),
            "attribute_condition": text,
        },
        "iam_bindings": [
            {"resource": kms_key, "role": DECRYPTER_ROLE, "member": principal_set(wip_provider)},
            *(
                {
                    "resource": f"gs://{store.bucket}",
                    "role": OBJECT_VIEWER_ROLE,
                    "member": f"serviceAccount:{sa}",
                    "condition_prefix": f"projects/_/buckets/{store.bucket}/objects/{store.name}",
                }
                for sa in condition.platform.service_accounts
            ),
        ],
    }


def gcp_policy_text(policy: dict[str, Any]) -> str:
    """:func:`gcp_policy` as ``gcloud`` commands a provider can read and run."""
    w = policy["workload_identity_pool"]
    lines = [
        f"# Workload Identity Pool provider for {policy['dataset']} (versions: {', '.join(policy['versions'])})",
        f"gcloud iam workload-identity-pools providers create-oidc {w['provider']} \\",
        f"  --location=global --workload-identity-pool={w['pool']} \\",
        f"  --issuer-uri={w['issuer_uri']} --allowed-audiences={','.join(w['allowed_audiences'])} \\",
        '  --attribute-mapping="' + ",".join(f"{k}={v}" for k, v in w["attribute_mapping"].items()) + '" \\',
        '  --attribute-condition="$(cat attribute-condition.cel)"',
        "",
        f"# attribute-condition.cel ({len(w['attribute_condition'])} of 4096 characters):",
        w["attribute_condition"],
        "",
        "# IAM bindings",
    ]
    for b in policy["iam_bindings"]:
        if b["resource"].startswith("gs://"):
            lines.append(
                f"gcloud storage buckets add-iam-policy-binding {b['resource']} --member={b['member']} "
                f"--role={b['role']}  # read the dataset objects under {b['condition_prefix']}"
            )
        else:
            key = b["resource"].split("/")
            lines.append(
                f"gcloud kms keys add-iam-policy-binding {key[7]} --keyring={key[5]} --location={key[3]} "
                f"--project={key[1]} --member='{b['member']}' --role={b['role']}"
            )
    return "\n".join(lines)
