"""The enclave platform as the hub sees it: where granted jobs run, and what the hub's servers need of it.

The hub configures one platform (``c.DCRPolicy.platform_class``; :class:`LocalEnclaveHost`, the machine's
``dcr enclave-host``, by default). It answers what only the hub can know for its servers and its quotas:

1. **what a researcher's server needs** to submit to it and to verify what comes back
   (:meth:`EnclavePlatform.server_config`): the hub's grant service (never the development grant source),
   the backend and its address, the trust anchors and enclave digests receipts are checked against. A DCR
   spawner hands these to every server it starts as command-line settings (:func:`make_server_args`),
   which outrank any configuration file;
2. **which host paths those servers must read** (:meth:`EnclavePlatform.server_paths`), so a sandbox shows
   them however the machine is laid out;
3. **which of the hub's grants have ended** (:meth:`EnclavePlatform.ended`), so that a job that failed in a
   second stops counting against the researcher's concurrent-jobs quota at once instead of at its time
   limit. A platform that cannot tell answers "none": the quota then errs on the side of counting;
4. **what happened to each job on the platform** (:meth:`EnclavePlatform.audit_events`): launches, key
   releases and refusals, ends, which the hub copies into its audit trail
   (:func:`dcr_spawner.audit.ingest_platform_events`). A platform that keeps no such record answers none.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from traitlets import Float, List, TraitError, Unicode, validate
from traitlets.config import LoggingConfigurable

from dcr_enclave.formats.digests import check_digest
from dcr_enclave.formats.errors import DCRError

#: What every server a DCR spawner starts asks for grants: the hub's grant service.
HUB_GRANT_SOURCE: Final = "dcr_server_ext.grant_sources.HubGrantSource"
LOCAL_BACKEND: Final = "dcr_server_ext.backends.local.LocalBackend"
#: The local enclave host's defaults (``dcr enclave-host --socket/--state``).
DEFAULT_HOST_SOCKET: Final = "/run/dcr/enclave-host.sock"
DEFAULT_HOST_STATE: Final = "/var/lib/dcr/enclave-host"
#: Most grant ids asked about in one request to the platform.
MAX_GRANTS_PER_QUERY: Final = 1000


def make_server_args(config: dict[str, dict[str, Any]]) -> list[str]:
    """``--Section.trait=value`` arguments for a Jupyter server, in a stable order.

    Strings are given as they are; a list as one argument per item (how traitlets reads a list from the
    command line; ``[]`` for an empty one, so it still outranks a configuration file); a dict as one
    ``key=value`` argument per entry (values must be strings: traitlets reads them back as strings);
    anything else (a number, a boolean) as JSON.
    """
    args = []
    for section in sorted(config):
        for trait in sorted(config[section]):
            value = config[section][trait]
            if isinstance(value, list):
                items = [str(v) for v in value] or ["[]"]
            elif isinstance(value, dict):  # key=value per entry; traitlets keeps each value a string
                items = [f"{k}={v}" for k, v in sorted(value.items())] or ["{}"]
            else:
                items = [value if isinstance(value, str) else json.dumps(value)]
            args += [f"--{section}.{trait}={item}" for item in items]
    return args


def _world_readable(path: Path) -> str | None:
    """Why an unprivileged account could not read ``path`` (a file), or ``None`` if it can."""
    try:
        st = path.stat()
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if not st.st_mode & stat.S_IROTH:
        return f"is mode {stat.S_IMODE(st.st_mode):04o}: the servers' accounts cannot read it"
    # Directories above are shown to a sandbox wherever they are (server_paths); the file's own must open.
    if not os.stat(path.parent).st_mode & stat.S_IXOTH:
        return f"is in {path.parent}, which other accounts cannot enter"
    return None


def _dev_key_note(keys: Path, thumbprints: Sequence[str]) -> str:
    """Says so when a condition pins the local development key (``dcr provider add`` without --hub-key)."""
    from dcr_enclave.formats.jwk import public_jwk, thumbprint
    from dcr_enclave.pack.signing_keys import read_private_key
    from dcr_enclave.pack.store import DEV_HUB_KEY_FILE

    dev = keys / DEV_HUB_KEY_FILE
    try:
        if thumbprint(public_jwk(read_private_key(dev))) in thumbprints:
            return f"the local development key {dev}, pinned by `dcr provider add` without --hub-key; "
    except (DCRError, OSError, ValueError):
        pass
    return ""


class EnclavePlatform(LoggingConfigurable):
    """Where the hub's granted jobs run. Subclass it for a platform; the base knows no job ends."""

    trust_jwks = List(
        Unicode(),
        default_value=[],
        help="""Signer keys of the platform's attestation that the researchers' servers verify receipts
        against: absolute paths of JWKS, JWK or PEM public key files, or ``sha256:<thumbprint>`` pins (as
        ``c.DCRExtension.trust_jwks`` and ``dcr verify --trust`` take them). Every server a DCR spawner
        starts gets exactly these; the files must be readable by every account (checked at hub start).
        With none, servers do not verify receipts (``dcr verify`` still can, offline).

        Example::

            c.LocalEnclaveHost.trust_jwks = ["/var/lib/dcr/enclave-host/public/jwks.json"]

        Security: these keys decide which receipts a researcher's JupyterLab calls verified. Pin the
        platform's published signer (for the local host, the JWKS it writes under its state directory),
        from a path only root can write; never a key taken from a receipt.
        """,
    ).tag(config=True)

    trust_roots = List(
        Unicode(),
        default_value=[],
        help="""Root CA certificates (absolute PEM paths) for certificate-chained attestation tokens, as
        ``c.DCRExtension.trust_roots`` takes them. Handed to every server a DCR spawner starts.

        Example::

            c.LocalEnclaveHost.trust_roots = ["/etc/dcr/trust/confidential_space_root.pem"]

        Security: every token chaining to one of these roots counts as genuine: pin only your platform's
        attestation roots, from a path only root can write.
        """,
    ).tag(config=True)

    enclave_digests = List(
        Unicode(),
        default_value=[],
        help="""The enclave image digests (``sha256:...``) receipts must come from, handed to every server a
        DCR spawner starts (``c.DCRExtension.enclave_digests``). The local enclave host prints its own
        (``dcr enclave-host --print-measurement``) and writes it to ``<state>/public/image-digest``.

        Example::

            c.LocalEnclaveHost.enclave_digests = ["sha256:4f0c...e1"]

        Security: pin exactly the enclave releases you reviewed and your providers' conditions name; with
        none, the servers' receipt check "pinned enclave digest" fails.
        """,
    ).tag(config=True)

    @validate("enclave_digests")
    def _valid_digests(self, proposal: Any) -> list[str]:
        for value in proposal["value"]:
            try:
                check_digest(value, "an enclave digest")
            except DCRError as e:
                raise TraitError(f"{type(self).__name__}.enclave_digests: {e.message}") from None
        return list(proposal["value"])

    @validate("trust_jwks", "trust_roots")
    def _valid_anchors(self, proposal: Any) -> list[str]:
        name = f"{type(self).__name__}.{proposal['trait'].name}"
        for value in proposal["value"]:
            pin = proposal["trait"].name == "trust_jwks" and value.startswith("sha256:")
            if not pin and not os.path.isabs(value):
                raise TraitError(f"{name}: {value!r} is not an absolute path; give the file's full path")
        return list(proposal["value"])

    def server_config(self) -> dict[str, dict[str, Any]]:
        """The Jupyter configuration every server a DCR spawner starts gets from the platform."""
        return {
            "DCRExtension": {
                "grant_source_class": HUB_GRANT_SOURCE,
                "trust_jwks": list(self.trust_jwks),
                "trust_roots": list(self.trust_roots),
                "enclave_digests": list(self.enclave_digests),
            }
        }

    def anchor_files(self) -> list[Path]:
        return [Path(p) for p in [*self.trust_jwks, *self.trust_roots] if not p.startswith("sha256:")]

    def server_paths(self) -> list[str]:
        """Host directories the servers must read (shown read-only in a sandbox that would hide them)."""
        return sorted({str(p.parent) for p in self.anchor_files()})

    def check_at_start(self) -> None:
        """Refuse, while the hub starts, a trust anchor the servers could not read (they would not start)."""
        name = type(self).__name__
        for path in self.anchor_files():
            why = _world_readable(path)
            if why is not None:
                trait = "trust_jwks" if str(path) in self.trust_jwks else "trust_roots"
                raise DCRError(
                    f"c.{name}.{trait}: {path} {why}",
                    hint="pin a file every account can read (the enclave host's public/jwks.json is 0644)",
                )
        if not self.trust_jwks and not self.trust_roots:
            self.log.warning(
                "DCR: c.%s.trust_jwks is empty: researchers' servers will not verify receipts", name
            )
        if not self.enclave_digests:
            self.log.warning(
                "DCR: c.%s.enclave_digests is empty: receipts fail the servers' pinned-digest check", name
            )

    def check_datasets(self, policy: Any, hub_thumbprint: str) -> None:
        """Tell the admin, while the hub starts, of each dataset whose key release can never accept this
        hub's grants (the base platform cannot see the providers' conditions and checks nothing)."""

    def ended(self, grant_ids: Sequence[str]) -> set[str]:
        """Which of ``grant_ids`` belong to jobs that have ended (or can no longer run)."""
        return set()

    audit_interval = Float(
        10.0,
        help="""Seconds between the hub's reads of the platform's job events (launch, key released or
        refused, end) into its audit trail (``dcr_hub_audit``, as ``enclave.*`` events); 0 turns the
        periodic read off (the audit views still read before they answer).

        Example::

            c.LocalEnclaveHost.audit_interval = 10

        Security: the events are copied once each (the platform's cursor is stored with them); a longer
        interval only delays them, it loses none while the platform keeps its journal.
        """,
    ).tag(config=True)

    def audit_events(self, cursor: str) -> tuple[list[dict[str, Any]], str, bool] | None:
        """The platform's job events after ``cursor`` ("" for the first read): ``(events, the cursor after
        them, whether more are waiting)``, or ``None`` when the platform keeps no event record. Each event
        has ``event`` (``launch``, ``key_released``, ``key_refused``, ``end``), ``time`` and structured
        fields (``job_id``, ``grant_id``, ``dataset`` or ``datasets``, ``state``, ``reason_code``, ...).
        Raises :class:`DCRError` when the platform cannot be asked now."""
        return None


class LocalEnclaveHost(EnclavePlatform):
    """This machine's ``dcr enclave-host`` (a simulated TEE), reached on its unix socket."""

    socket_path = Unicode(
        DEFAULT_HOST_SOCKET,
        help="""The enclave host's unix socket (``dcr enclave-host --socket``). Every server a DCR spawner
        starts submits there (``c.LocalBackend.socket_path``); the hub, as root, asks it which of its grants
        have ended, so failed jobs stop counting against the concurrent-jobs quota.

        Example::

            c.LocalEnclaveHost.socket_path = "/run/dcr/enclave-host.sock"

        Security: the host answers each account about its own jobs only, and launches only grants signed
        by a hub key it trusts. Keep the socket's directory root-owned so no account can put another
        socket in its place.
        """,
    ).tag(config=True)

    keys_dir = Unicode(
        "",
        help="""The providers' keys directory the enclave host reads (``dcr enclave-host --keys``); empty
        (the default) for each dataset store's own ``.keys``, as the host defaults to. The hub reads only
        the key-release conditions there, at start: a dataset whose condition does not accept this hub's
        key (for instance one registered without ``--hub-key``, pinned to a development key) is named in an
        error in the hub's log at start, with the fix, instead of only failing jobs at key release.

        Example::

            c.LocalEnclaveHost.keys_dir = "/srv/dcr/keys"

        Security: the hub only reads the conditions (public policy); the KEKs beside them stay the
        enclave host's.
        """,
    ).tag(config=True)

    @validate("socket_path")
    def _valid_socket(self, proposal: Any) -> str:
        value = str(proposal["value"])
        if not os.path.isabs(value):
            raise TraitError(f"LocalEnclaveHost.socket_path: {value!r} is not an absolute path")
        return value

    def server_config(self) -> dict[str, dict[str, Any]]:
        config = super().server_config()
        config["DCRExtension"]["backend_class"] = LOCAL_BACKEND
        config["LocalBackend"] = {"socket_path": self.socket_path}
        return config

    def server_paths(self) -> list[str]:
        return sorted({*super().server_paths(), os.path.dirname(self.socket_path)})

    def check_at_start(self) -> None:
        super().check_at_start()
        if not os.path.exists(self.socket_path):
            self.log.warning(
                "DCR: no enclave host listens at %s yet (c.LocalEnclaveHost.socket_path): Submit fails "
                "until `dcr enclave-host --socket %s` runs",
                self.socket_path,
                self.socket_path,
            )

    def check_datasets(self, policy: Any, hub_thumbprint: str) -> None:
        from dcr_enclave.pack.store import Store
        from dcr_enclave.platform.key_store import KeyDirectory

        for spec in policy.specs():
            keys = Path(self.keys_dir) if self.keys_dir else Store(spec.store).default_keys_dir
            try:
                condition = KeyDirectory(keys).read_condition(spec.provider, spec.dataset)
            except (DCRError, OSError) as e:
                self.log.warning("DCR: cannot read the key-release condition of %s: %s", spec.ref, e)
                continue
            if condition is None:
                self.log.warning(
                    "DCR: %s has no key-release condition in %s (c.LocalEnclaveHost.keys_dir): its jobs "
                    "will fail at key release",
                    spec.ref,
                    keys,
                )
                continue
            if hub_thumbprint not in condition.hub_key_thumbprints:
                # Told to the admin at start (the researcher would only see it at key release). Not a
                # refusal to start: the other datasets stay usable while the provider re-registers.
                message = (
                    f"DCR: {spec.ref}: the provider's key-release condition accepts grants only from hub "
                    f"key(s) {', '.join(condition.hub_key_thumbprints)}, not this hub's {hub_thumbprint} "
                    f"({_dev_key_note(keys, condition.hub_key_thumbprints)}every job on it will fail at key "
                    "release). Fix: `dcr hub-key <c.DCRPolicy.hub_key_file> --public hub.jwks`, then have "
                    "the provider run `dcr provider add ... --hub-key hub.jwks` again"
                )
                self.log.error("%s", message)
                print(message, file=sys.stderr, flush=True)

    def audit_events(self, cursor: str) -> tuple[list[dict[str, Any]], str, bool] | None:
        from dcr_enclave.platform.client import HostClient

        page = HostClient(self.socket_path, timeout=10.0).events(cursor or None)
        return page["events"], page["cursor"], page["more"]

    def ended(self, grant_ids: Sequence[str]) -> set[str]:
        from dcr_enclave.platform.client import HostClient

        out: set[str] = set()
        client = HostClient(self.socket_path, timeout=5.0)
        ids = list(grant_ids)
        for i in range(0, len(ids), MAX_GRANTS_PER_QUERY):
            try:
                states = client.grant_states(ids[i : i + MAX_GRANTS_PER_QUERY])
            except DCRError as e:
                # Unknown is not ended: the jobs keep counting until their time limit.
                self.log.warning("DCR: cannot ask the enclave host which jobs ended: %s", e)
                return out
            out |= {g for g, state in states.items() if state == "ended"}
        return out
