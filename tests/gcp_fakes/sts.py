"""A fake of Google's Security Token Service: token exchange under Workload Identity pool providers.

``POST /v1/token`` with the form fields google-auth's external-account credentials send. The subject token
is verified against the provider's issuer (x5c chain to its root, or its OIDC keys; expiry; issuer; one of
the provider's allowed audiences), then the provider's attribute condition (the text
:func:`dcr_enclave.platform.condition_cel.compile_wip_condition` writes) is evaluated with CEL, ``assertion``
bound to the token's claims. Errors have STS's OAuth shape (``{"error", "error_description"}``, 400).
"""

from __future__ import annotations

import re
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from dcr_enclave.formats import contract
from dcr_enclave.formats.attestation import TokenCheckError
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.platform.condition_cel import _cel_env, _plain, _run
from dcr_enclave.verify.token import verify_signature
from gcp_fakes._http import LoopbackServer, Reply, json_reply
from gcp_fakes.issuer import FakeAttestationIssuer

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
JWT = "urn:ietf:params:oauth:token-type:jwt"
_PROVIDER_RE = re.compile(
    r"^projects/(?P<number>[0-9]+)/locations/global/workloadIdentityPools/(?P<pool>[a-z0-9-]+)/providers/[a-z0-9-]+$"
)


@dataclass
class _Provider:
    name: str
    condition: str
    issuer: FakeAttestationIssuer
    allowed_audiences: tuple[str, ...]

    @property
    def principal_set(self) -> str:
        m = _PROVIDER_RE.match(self.name)
        assert m
        return f"principalSet://iam.googleapis.com/projects/{m['number']}/locations/global/workloadIdentityPools/{m['pool']}/*"


@dataclass
class Exchange:
    """One token exchange as the fake saw it: the provider asked for, and the outcome (``ok`` or the error)."""

    provider: str
    outcome: str
    claims: dict[str, Any] = field(default_factory=dict)


def pool_principal_set(wip_provider: str) -> str:
    m = _PROVIDER_RE.match(wip_provider)
    if not m:
        raise ValueError(f"not a pool provider name: {wip_provider}")
    return f"principalSet://iam.googleapis.com/projects/{m['number']}/locations/global/workloadIdentityPools/{m['pool']}/*"


def _error(code: str, description: str) -> Reply:
    return json_reply(400, {"error": code, "error_description": description})


class StsFake:
    def __init__(self) -> None:
        self._providers: dict[str, _Provider] = {}
        self._tokens: dict[str, str] = {}
        self._lock = threading.Lock()
        self.exchanges: list[Exchange] = []
        self._http = LoopbackServer(self._handle)

    @property
    def endpoint(self) -> str:
        return self._http.endpoint

    def start(self) -> StsFake:
        self._http.start()
        return self

    def stop(self) -> None:
        self._http.stop()

    def add_provider(
        self,
        wip_provider: str,
        attribute_condition: str,
        issuer: FakeAttestationIssuer,
        allowed_audiences: tuple[str, ...] = (contract.KEY_RELEASE_AUDIENCE,),
    ) -> str:
        """Register a pool provider; returns the principal set its federated tokens stand for."""
        p = _Provider(wip_provider, attribute_condition, issuer, allowed_audiences)
        self._providers[wip_provider] = p
        return p.principal_set

    def principal_of(self, access_token: str) -> str | None:
        with self._lock:
            return self._tokens.get(access_token)

    def _handle(self, method: str, path: str, headers: Any, body: bytes) -> Reply:
        if method != "POST" or path.split("?")[0] != "/v1/token":
            return json_reply(404, {"error": "not_found"})
        form = {k: v[0] for k, v in parse_qs(body.decode(), keep_blank_values=True).items()}
        if form.get("grant_type") != TOKEN_EXCHANGE:
            return _error("unsupported_grant_type", "grant_type must be token-exchange")
        if form.get("requested_token_type") != ACCESS_TOKEN:
            return _error("invalid_request", "requested_token_type must be an access token")
        if form.get("subject_token_type") != JWT:
            return _error("invalid_request", "subject_token_type must be a JWT")
        audience = form.get("audience", "")
        name = audience.removeprefix("//iam.googleapis.com/")
        provider = self._providers.get(name) if audience.startswith("//iam.googleapis.com/") else None
        if provider is None:
            return _error(
                "invalid_target", 'The target service indicated by the "audience" parameters is invalid.'
            )
        outcome, claims = self._check(provider, form.get("subject_token", ""))
        self.exchanges.append(Exchange(name, outcome, claims))
        if outcome != "ok":
            return outcome_reply(outcome)
        access = "fake-sts-" + secrets.token_urlsafe(24)
        with self._lock:
            self._tokens[access] = provider.principal_set
        return json_reply(
            200,
            {
                "access_token": access,
                "issued_token_type": ACCESS_TOKEN,
                "token_type": "Bearer",
                "expires_in": 3600,
            },
        )

    def _check(self, p: _Provider, token: str) -> tuple[str, dict[str, Any]]:
        try:
            v = verify_signature(
                token, trusted_keys=p.issuer.jwks["keys"], trust_root_pem=p.issuer.root_pem, verify_exp=True
            )
        except (TokenCheckError, DCRError):
            return "invalid_grant: the subject token's signature does not verify", {}
        claims = dict(v.claims.payload)
        if v.claims.issuer != contract.GOOGLE_ISSUER:
            return "invalid_grant: the subject token's issuer is not the provider's", claims
        if not set(v.claims.audience) & set(p.allowed_audiences):
            return "invalid_grant: the subject token's audience is not allowed", claims
        try:
            data = {"assertion": _plain(claims, "claims")}
        except DCRError:
            return "invalid_grant: unreadable claims", claims
        result = _run(_cel_env(), p.condition, data)
        if result is not True:
            return "unauthorized_client: The given credential is rejected by the attribute condition.", claims
        return "ok", claims


def outcome_reply(outcome: str) -> Reply:
    code, _, description = outcome.partition(": ")
    return _error(code, description)
