"""A provider's key-release condition as CEL: compiled per backend and evaluated by the local key broker.

The condition (:mod:`dcr_enclave.platform.condition`) is stored as structured fields. This module turns it into a
Common Expression Language (CEL) expression in two flavours:

- :func:`compile_condition`: the expression the enclave host's key broker evaluates. Its variables are
  ``assertion`` (the verified attestation token's claims), ``request`` (the verified grant's values for this
  key: provider, dataset, version, bundle digest, hub key thumbprint) and ``condition`` (the condition's own
  JSON). Condition values are never written into the expression text: they reach CEL as data through the
  ``condition`` variable, so no value, whatever characters it holds, can change what the expression means.
- :func:`compile_wip_condition`: the attribute condition of a Google Workload Identity Pool provider, where
  ``assertion`` is the only variable. Values must be literals there; each one is written by
  :func:`cel_string_literal`, which escapes every character outside a small safe set.

:func:`evaluate` runs the broker's expression with Google's CEL runtime (``cel-expr-python``, the Python
binding of cel-cpp; see docs/key-release.md for why this one). It evaluates the whole expression for the
decision and each clause on its own to name what failed; the two must agree, and any error (a missing
claim, a value of the wrong type, an unavailable evaluator) denies.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from dcr_enclave.formats import contract
from dcr_enclave.formats.errors import DCRError, LimitError
from dcr_enclave.platform.condition import KeyReleaseCondition

#: Google's limit on the length of a Workload Identity Pool provider's attribute condition.
WIP_CONDITION_MAX_CHARS: Final = 4096

_ENV: Final = "assertion.submods.container.env"
_HUB_TP: Final = f"{_ENV}.{contract.ENV.HUB_KEY_THUMBPRINT}"
_BUNDLE: Final = f"{_ENV}.{contract.ENV.BUNDLE_DIGEST}"
_DATASETS: Final = f"{_ENV}.{contract.ENV.DATASETS}"
_IMAGE: Final = "assertion.submods.container.image_digest"
_SUPPORT: Final = "assertion.submods.confidential_space.support_attributes"
_PROJECT: Final = "assertion.submods.gce.project_id"
_ACCOUNTS: Final = "assertion.google_service_accounts"


@dataclass(frozen=True)
class Clause:
    """One named conjunct of the broker's expression."""

    name: str
    cel: str


@dataclass(frozen=True)
class Decision:
    """The outcome of :func:`evaluate`.

    ``failed`` has one entry per clause that did not hold: its name (``platform.hwmodel``), followed by
    ``(error: ...)`` when the clause could not be evaluated at all.
    """

    allowed: bool
    failed: list[str] = field(default_factory=list)
    expression: str = ""

    @property
    def failed_clauses(self) -> list[str]:
        """Just the names of the failed clauses."""
        return [f.split(" (", 1)[0] for f in self.failed]


def _as_condition(cond: Mapping[str, Any] | KeyReleaseCondition) -> KeyReleaseCondition:
    if isinstance(cond, KeyReleaseCondition):
        return cond
    return KeyReleaseCondition.from_json(cond)


def clauses(cond: Mapping[str, Any] | KeyReleaseCondition) -> list[Clause]:
    """The broker's clauses for ``cond``, one per pinned field plus the two launch bindings.

    Which clauses appear depends only on which optional fields are set (``secboot``, support attributes,
    project, service accounts, bundle digests); the values themselves stay in the ``condition`` variable.
    """
    c = _as_condition(cond)
    p = c.platform
    out = [
        Clause("provider", "request.provider == condition.provider"),
        Clause("dataset", "request.dataset == condition.dataset"),
        Clause("versions", "request.version in condition.versions"),
        Clause("platform.hwmodel", "assertion.hwmodel in condition.platform.hwmodel"),
        Clause("platform.swname", "assertion.swname in condition.platform.swname"),
        Clause("platform.dbgstat", "assertion.dbgstat in condition.platform.dbgstat"),
    ]
    if p.secboot is not None:
        out.append(Clause("platform.secboot", "assertion.secboot == condition.platform.secboot"))
    if p.support_attributes:
        # Every listed attribute must be present (LATEST implies STABLE implies USABLE on Google's side).
        out.append(
            Clause(
                "platform.support_attributes",
                f"condition.platform.support_attributes.all(a, a in {_SUPPORT})",
            )
        )
    if p.project_id is not None:
        out.append(Clause("platform.project_id", f"{_PROJECT} == condition.platform.project_id"))
    if p.service_accounts:
        # The VM runs as one service account; any of the listed ones will do.
        out.append(
            Clause(
                "platform.service_accounts",
                f"condition.platform.service_accounts.exists(s, s in {_ACCOUNTS})",
            )
        )
    out.append(Clause("enclave_digests", f"{_IMAGE} in condition.enclave_digests"))
    out.append(Clause("hub_key_thumbprints", f"{_HUB_TP} in condition.hub_key_thumbprints"))
    if c.bundle_digests is not None:
        out.append(Clause("bundle_digests", f"{_BUNDLE} in condition.bundle_digests"))
    # The grant the broker verified must be the one for what the token says was launched: the pins above
    # look at the token, these two tie the request to it.
    out.append(Clause("binding.hub_key_thumbprint", f"request.hub_key_thumbprint == {_HUB_TP}"))
    out.append(Clause("binding.bundle_digest", f"request.bundle_digest == {_BUNDLE}"))
    return out


def _join(parts: list[str]) -> str:
    return " && ".join(f"({p})" for p in parts)


def compile_condition(cond: Mapping[str, Any] | KeyReleaseCondition) -> str:
    """The broker's CEL expression over ``assertion``, ``request`` and ``condition`` (see module doc)."""
    return _join([cl.cel for cl in clauses(cond)])


# ---------------------------------------------------------------------------------------------------------
# The Workload Identity Pool flavour: literals only, so every value goes through cel_string_literal
# ---------------------------------------------------------------------------------------------------------

_SAFE_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:@/+=,- ")


def cel_string_literal(value: str) -> str:
    """``value`` as a single-quoted CEL string literal that denotes exactly ``value``.

    Only letters, digits, space and ``_.:@/+=,-`` are written as themselves; everything else (quotes,
    backslashes, control characters, non-ASCII) becomes a ``\\u``/``\\U`` escape, so no value can end the
    literal early or smuggle syntax into the expression.
    """
    if not isinstance(value, str):
        raise DCRError(f"a CEL string literal needs a string, not {type(value).__name__}")
    out = ["'"]
    for ch in value:
        cp = ord(ch)
        if ch in _SAFE_CHARS:
            out.append(ch)
        elif 0xD800 <= cp <= 0xDFFF:
            raise DCRError("refusing a string with a lone surrogate: it is not valid Unicode text")
        elif cp <= 0xFFFF:
            out.append(f"\\u{cp:04x}")
        else:
            out.append(f"\\U{cp:08x}")
    out.append("'")
    return "".join(out)


def _list_literal(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(cel_string_literal(v) for v in values) + "]"


def _one_of(lhs: str, values: tuple[str, ...]) -> str:
    if len(values) == 1:
        return f"{lhs} == {cel_string_literal(values[0])}"
    return f"{lhs} in {_list_literal(values)}"


def compile_wip_condition(cond: Mapping[str, Any] | KeyReleaseCondition) -> str:
    """The Workload Identity Pool attribute condition for a ``confidential_space`` condition.

    Covers everything the Confidential Space token carries: platform claims, project, service account,
    image digest and the attested launch variables: hub key thumbprint, bundle digest, and the granted
    dataset versions (``DCR_DATASETS``, which the supervisor, pinned by its image digest, checks against the
    verified grant), so the key is released only to a job granted one of the condition's versions.
    """
    c = _as_condition(cond)
    p = c.platform
    if p.kind != "confidential_space":
        raise DCRError(
            f"{c.ref}: a Workload Identity Pool condition needs a confidential_space platform, not {p.kind}",
            hint="the local platform is evaluated by the enclave host's broker (compile_condition)",
        )
    if missing := p.missing():
        raise DCRError(
            f"{c.ref}: the condition is not deployable to Google Cloud yet: it lacks {', '.join(missing)}",
            hint="pin the enclave VM's project and service account",
        )
    parts = [
        _one_of("assertion.swname", p.swname),
        _one_of("assertion.hwmodel", p.hwmodel),
        _one_of("assertion.dbgstat", p.dbgstat),
    ]
    if p.secboot is not None:
        parts.append(f"assertion.secboot == {'true' if p.secboot else 'false'}")
    parts.extend(f"{cel_string_literal(a)} in {_SUPPORT}" for a in p.support_attributes)
    assert p.project_id is not None  # missing() above
    parts.append(f"{_PROJECT} == {cel_string_literal(p.project_id)}")
    accounts = [f"{cel_string_literal(s)} in {_ACCOUNTS}" for s in p.service_accounts]
    parts.append(accounts[0] if len(accounts) == 1 else "(" + " || ".join(accounts) + ")")
    parts.append(f"{_IMAGE} in {_list_literal(c.enclave_digests)}")
    parts.append(f"{_HUB_TP} in {_list_literal(c.hub_key_thumbprints)}")
    if c.bundle_digests is not None:
        parts.append(f"{_BUNDLE} in {_list_literal(c.bundle_digests)}")
    versions = [f"{_DATASETS}.contains({cel_string_literal(f',{c.ref}@{v},')})" for v in c.versions]
    parts.append(versions[0] if len(versions) == 1 else "(" + " || ".join(versions) + ")")
    text = " && ".join(parts)
    if len(text) > WIP_CONDITION_MAX_CHARS:
        raise LimitError(
            f"{c.ref}: the attribute condition is {len(text)} characters; Google accepts at most "
            f"{WIP_CONDITION_MAX_CHARS}",
            hint="retire old enclave or bundle digests from the condition",
        )
    return text


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------

_env_lock = threading.Lock()
_env: Any = None


def _cel_env() -> Any:
    """The CEL environment, with the three variables declared so the checker rejects anything else."""
    global _env
    with _env_lock:
        if _env is None:
            try:
                from cel_expr_python import cel
            except ImportError as e:
                raise DCRError(
                    f"the CEL evaluator is not installed ({e})",
                    hint="install jupyterhub-dcr-enclave[runtime] (it brings cel-expr-python)",
                ) from None
            dyn_map = cel.Type.Map(cel.Type.STRING, cel.Type.DYN)
            _env = cel.NewEnv(
                variables={
                    "assertion": dyn_map,
                    "request": cel.Type.Map(cel.Type.STRING, cel.Type.STRING),
                    "condition": dyn_map,
                }
            )
        return _env


def _plain(value: Any, where: str) -> Any:
    """Deep copy into dicts and lists (the binding takes only plain containers; claims are read-only views).

    Refuses strings the binding cannot carry faithfully: cel-expr-python 0.1.3 cuts a string at its first
    NUL (``"a\\x00b"`` would compare equal to ``"a"``) and fails on lone surrogates.
    """
    if isinstance(value, str):
        if "\x00" in value:
            raise DCRError(f"{where} holds a string with a NUL character")
        if any(0xD800 <= ord(ch) <= 0xDFFF for ch in value):
            raise DCRError(f"{where} holds a string that is not valid Unicode")
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise DCRError(f"{where} has a key that is not a string: {k!r}")
            out[_plain(k, where)] = _plain(v, f"{where}.{k}")
        return out
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _run(env: Any, text: str, data: dict[str, Any]) -> bool | str:
    """True or False, or the error message when the expression cannot be compiled or evaluated."""
    from cel_expr_python import cel

    try:
        result = env.compile(text).eval(data=data)
        kind = result.type()
        value = result.value()
    except Exception as e:  # the binding reports compile and conversion failures as RuntimeError
        return " ".join(str(e).split())[:300] or type(e).__name__
    if kind == cel.Type.ERROR:
        return " ".join(str(value).split())[:300]
    if kind != cel.Type.BOOL or not isinstance(value, bool):
        return f"the expression yields a {kind.name()}, not a bool"
    return value


def evaluate(
    cond: Mapping[str, Any] | KeyReleaseCondition, claims: Mapping[str, Any], request: Mapping[str, Any]
) -> Decision:
    """Whether ``cond`` holds for the verified token ``claims`` and the verified grant's ``request``.

    Never raises: a malformed condition, an evaluation error or a disagreement between the whole expression
    and its clauses all deny, with the reason in :attr:`Decision.failed`.
    """
    try:
        c = _as_condition(cond)
    except DCRError as e:
        return Decision(False, [f"condition (error: {e})"])
    try:
        env = _cel_env()
    except DCRError as e:
        return Decision(False, [f"evaluator (error: {e})"])
    parts = clauses(c)
    whole = _join([cl.cel for cl in parts])
    try:
        data = {
            "assertion": _plain(claims, "claims"),
            "request": _plain(request, "request"),
            "condition": c.to_json(),
        }
    except (DCRError, RecursionError) as e:
        return Decision(False, [f"input (error: {e})"], whole)
    failed = []
    for cl in parts:
        outcome = _run(env, cl.cel, data)
        if outcome is not True:
            failed.append(cl.name if outcome is False else f"{cl.name} (error: {outcome})")
    overall = _run(env, whole, data)
    if (overall is True) != (not failed):
        # CEL's && is commutative and absorbs errors only into false, so this cannot happen in a
        # conforming evaluator; if it does, the evaluator is not one to trust with keys.
        failed.append(f"expression (error: the whole expression gives {overall!r} but its clauses disagree)")
    elif isinstance(overall, str) and not any("(error:" in f for f in failed):
        failed.append(f"expression (error: {overall})")
    return Decision(allowed=not failed, failed=failed, expression=whole)
