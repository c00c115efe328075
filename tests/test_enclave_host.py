"""The enclave host as its clients and its supervisors meet it: a real in-process host on a unix socket.

Launches are idempotent by grant, jobs are private to the account that launched them, the key broker
refuses every key request that is not a fresh answer to its own challenge for the right job, bad requests
on the socket are answered with an error while the host keeps serving, a sandbox that cannot be built
stops a job before any key is asked for, and root (the hub) learns which of its grants have ended.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from other_account import run_as
from test_local_run import SUMMARY_CELLS, _grant_and_bundle, _wait_state

from dcr_enclave.formats import contract
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.grant import GrantedDataset
from dcr_enclave.formats.jwk import public_jwk
from dcr_enclave.formats.messages import MAX_MESSAGE, decode, encode
from dcr_enclave.formats.sealing import generate_keypair
from dcr_enclave.pack.grant_issuer import issue_grant
from dcr_enclave.pack.signing_keys import generate_key, load_or_create_key
from dcr_enclave.pack.store import Store
from dcr_enclave.platform import broker as broker_module
from dcr_enclave.platform.signer import local_claims, sign_token

pytestmark = [pytest.mark.root]

#: The unprivileged account that plays "another user" on the socket.
OTHER_UID = 65534
SLEEP_CELLS = ["import time\ntime.sleep(120)"]


def _audit(host: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (host.state / "audit.log").read_text().splitlines()]


def _supervisors(host: Any) -> list[int]:
    """Pids of the supervisors this host started (its direct children running the measured image)."""
    found = []
    image = str(host.host.image_dir).encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmd = Path(entry.path, "cmdline").read_bytes()
            st = Path(entry.path, "stat").read_bytes()
        except OSError:
            continue
        ppid = int(st[st.rindex(b")") + 2 :].split()[1])
        if ppid == os.getpid() and b"dcr_enclave.runtime.supervisor" in cmd and image in cmd:
            found.append(int(entry.name))
    return found


def _wait_cell(host: Any, job_id: str) -> dict[str, Any]:
    """Wait until the job's first cell runs (its supervisor has fetched the keys and started the kernel)."""
    job = _wait_state(host.client, job_id, {"running", *contract.TERMINAL_STATES})
    assert job["state"] == "running", job
    return job


# ---------------------------------------------------------------------------------------------------------
# Launch is idempotent by grant
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_launching_a_grant_twice_is_one_job(tmp_path, store, host, make_notebook):
    """Launching the same grant again (right away, and again while it runs) answers the same job: one job
    record, one spool, one audit 'launch' line, and one supervisor process."""
    nb = make_notebook(SLEEP_CELLS)
    job_id, grant, bundle, _key = _grant_and_bundle(store, nb, tmp_path)
    first = host.client.launch(grant, bundle)
    again = host.client.launch(grant, bundle)
    assert first["job_id"] == again["job_id"] == job_id
    assert first["grant_id"] == again["grant_id"]
    _wait_cell(host, job_id)
    third = host.client.launch(grant, bundle)
    assert third["job_id"] == job_id and third["state"] == "running"
    assert list(host.host.jobs) == [job_id]
    assert [p.name for p in (host.state / "spool").iterdir()] == [job_id]
    assert [e["job_id"] for e in _audit(host) if e["event"] == "launch"] == [job_id]
    sups = _supervisors(host)
    assert len(sups) == 1 and sups[0] == host.host.jobs[job_id].proc.pid  # type: ignore[union-attr]
    assert host.client.cancel(job_id)["state"] == "cancelled"
    assert _supervisors(host) == []


# ---------------------------------------------------------------------------------------------------------
# Another account on the same socket
# ---------------------------------------------------------------------------------------------------------

_AS_OTHER = r"""
import json, os, sys
from dcr_enclave.formats.errors import DCRError
from dcr_enclave.platform.client import HostClient
req = json.loads(sys.argv[2])
fds = req.pop("fds", None)
try:
    reply = HostClient(sys.argv[1]).call(req.pop("op"), fds=fds, **req)
except DCRError as e:
    reply = {"ok": False, "error": str(e)}
print(json.dumps({"uid": os.geteuid(), **reply}))
"""


@pytest.fixture
def shared_host(make_host: Callable[..., Any]) -> Iterator[Any]:
    """A host whose socket another account can reach (pytest's temporary directories are root-only)."""
    d = Path(tempfile.mkdtemp(prefix="dcr-test-sock-"))
    os.chmod(d, 0o755)
    try:
        yield make_host(socket_path=d / "host.sock")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _as_other(host: Any, op: str, fds: tuple[int, ...] = (), **fields: Any) -> dict[str, Any]:
    """One request on the host's socket from a process running as another (unprivileged) account, in the
    sandbox a researcher's server gets (so it runs wherever the checkout lies)."""
    req = {"op": op, **fields, **({"fds": list(fds)} if fds else {})}
    proc = run_as(
        OTHER_UID,
        [sys.executable, "-c", _AS_OTHER, str(host.socket), json.dumps(req)],
        pass_fds=fds,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    reply = json.loads(proc.stdout)
    assert reply.pop("uid") == OTHER_UID
    return reply


@pytest.mark.slow
def test_another_account_cannot_see_or_touch_a_job(tmp_path, store, shared_host, make_notebook):
    """To another account, a running job does not exist: status, cancel, delete, result and watch are
    answered exactly like a job id that was never launched, its job list is empty, and the job keeps
    running. Relaunching the owner's grant is refused as launched by another account; a new valid grant
    for the same job id is refused because the job id exists under another grant."""
    host = shared_host
    nb = make_notebook(SLEEP_CELLS)
    job_id, grant, bundle, _key = _grant_and_bundle(store, nb, tmp_path)
    host.client.launch(grant, bundle)
    _wait_cell(host, job_id)

    never = contract.new_job_id()
    for op in ("status", "cancel", "delete", "result", "watch"):
        theirs = _as_other(host, op, job_id=job_id)
        unknown = _as_other(host, op, job_id=never)
        assert theirs == {"ok": False, "error": f"no such job: {job_id!r}"}, op
        assert unknown == {"ok": False, "error": f"no such job: {never!r}"}, op
    assert _as_other(host, "list") == {"ok": True, "jobs": []}
    assert host.client.status(job_id)["state"] == "running"
    assert not host.host.jobs[job_id].cancelled

    # The same grant, from another account.
    fd = os.open(bundle, os.O_RDONLY)
    try:
        reply = _as_other(host, "launch", fds=(fd,), grant=grant)
        assert reply == {"ok": False, "error": "this grant was launched by another account"}
        # A new grant (signed by the trusted hub key) reusing the job id.
        hub_key = load_or_create_key(store.hub_key_path)
        _priv, pub = generate_keypair()
        version = Store(store.root).versions(store.provider, store.dataset)[-1].version
        other_grant = issue_grant(
            hub_key, user="mallory", job_id=job_id, bundle_digest="sha256:" + "ab" * 32,
            datasets=[GrantedDataset(store.provider, store.dataset, version, "auto")], output_public_key=pub,
        )  # fmt: skip
        reply = _as_other(host, "launch", fds=(fd,), grant=other_grant)
        assert reply == {"ok": False, "error": f"job {job_id} already exists under another grant"}
    finally:
        os.close(fd)
    assert list(host.host.jobs) == [job_id]
    assert host.host.jobs[job_id].owner_uid == 0
    assert [e["event"] for e in _audit(host)].count("launch") == 1
    assert host.client.cancel(job_id)["state"] == "cancelled"


# ---------------------------------------------------------------------------------------------------------
# The key broker
# ---------------------------------------------------------------------------------------------------------


class KeyRequest:
    """A key request for one job of ``host``, correct unless a test changes part of it."""

    def __init__(self, host: Any, store: Any) -> None:
        self.h = host.host
        self.hub = load_or_create_key(store.hub_key_path)
        self.manifest = Store(store.root).versions(store.provider, store.dataset)[-1]
        self.store = store
        self.job_id = contract.new_job_id()
        self.digest = "sha256:" + "ab" * 32
        # The grant the host launched this job with (recorded as the host records a launch).
        self.launched = self.grant()
        self.h.ledger.record(_grant_id(self.launched), self.job_id)

    def grant(self, job_id: str | None = None, bundle_digest: str | None = None) -> str:
        _priv, pub = generate_keypair()
        return issue_grant(
            self.hub, user="t", job_id=job_id or self.job_id, bundle_digest=bundle_digest or self.digest,
            datasets=[GrantedDataset(self.store.provider, self.store.dataset, self.manifest.version, "auto")],
            output_public_key=pub,
        )  # fmt: skip

    def token(
        self, nonces: list[str], *, job_id: str | None = None, audience: str = "", signer: Any = None
    ) -> str:
        env = {
            contract.ENV.JOB_ID: job_id or self.job_id,
            contract.ENV.BUNDLE_DIGEST: self.digest,
            contract.ENV.HUB_KEY_THUMBPRINT: public_jwk(self.hub)["kid"],
        }
        claims = local_claims(
            image_digest=self.h.measurement(),
            env=env,
            audience=audience or contract.KEY_RELEASE_AUDIENCE,
            nonces=nonces,
        )
        key = signer or self.h.signer
        return sign_token(claims, key, kid=public_jwk(key)["kid"])

    def request(self, challenge: str, token: str, grant: str | None = None) -> dict[str, Any]:
        return {
            "provider": self.store.provider, "dataset": self.store.dataset, "version": self.manifest.version,
            "wrapped_key": self.manifest.key.to_json(), "token": token, "grant": grant or self.launched,
            "hub_jwks": [public_jwk(self.hub)], "challenge": challenge,
        }  # fmt: skip

    def valid(self) -> dict[str, Any]:
        c = self.h.broker.new_challenge(self.job_id)
        return self.request(c, self.token([c]))


def _wrong_audience(r: KeyRequest) -> dict[str, Any]:
    c = r.h.broker.new_challenge(r.job_id)
    return r.request(c, r.token([c], audience=contract.RECEIPT_AUDIENCE))


def _other_signer(r: KeyRequest) -> dict[str, Any]:
    c = r.h.broker.new_challenge(r.job_id)
    return r.request(c, r.token([c], signer=generate_key("RS256")))


def _nonce_not_the_challenge(r: KeyRequest) -> dict[str, Any]:
    c = r.h.broker.new_challenge(r.job_id)
    return r.request(c, r.token([secrets.token_urlsafe(32)]))


def _challenge_never_issued(r: KeyRequest) -> dict[str, Any]:
    c = secrets.token_urlsafe(32)
    return r.request(c, r.token([c]))


def _challenge_of_another_job(r: KeyRequest) -> dict[str, Any]:
    c = r.h.broker.new_challenge(contract.new_job_id())
    return r.request(c, r.token([c]))


def _replayed(r: KeyRequest) -> dict[str, Any]:
    req = r.valid()
    key, _cond = r.h.broker.release(dict(req), job_id=r.job_id)
    assert len(key) == 32
    return req


def _token_for_another_job(r: KeyRequest) -> dict[str, Any]:
    c = r.h.broker.new_challenge(r.job_id)
    return r.request(c, r.token([c], job_id=contract.new_job_id()))


def _grant_for_another_job(r: KeyRequest) -> dict[str, Any]:
    c = r.h.broker.new_challenge(r.job_id)
    return r.request(c, r.token([c]), grant=r.grant(contract.new_job_id()))


def _expired_challenge(r: KeyRequest) -> dict[str, Any]:
    # A challenge issued with no lifetime left: refused however soon it is answered.
    ttl = broker_module.CHALLENGE_TTL
    broker_module.CHALLENGE_TTL = -1.0
    try:
        c = r.h.broker.new_challenge(r.job_id)
    finally:
        broker_module.CHALLENGE_TTL = ttl
    return r.request(c, r.token([c]))


def _grant_for_another_bundle(r: KeyRequest) -> dict[str, Any]:
    c = r.h.broker.new_challenge(r.job_id)
    return r.request(c, r.token([c]), grant=r.grant(bundle_digest="sha256:" + "cd" * 32))


def _grant_not_launched_here(r: KeyRequest) -> dict[str, Any]:
    c = r.h.broker.new_challenge(r.job_id)
    return r.request(c, r.token([c]), grant=r.grant())  # a valid grant for this job the host never launched


def _grant_id(token: str) -> str:
    body = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))["jti"]


BROKER_CASES = [
    ("wrong audience", _wrong_audience, "audience"),
    ("token signed by another key", _other_signer, "attestation token"),
    ("nonce is not the challenge", _nonce_not_the_challenge, "nonce"),
    ("challenge never issued", _challenge_never_issued, "challenge is unknown"),
    ("challenge of another job", _challenge_of_another_job, "challenge is unknown"),
    ("challenge reused", _replayed, "replay"),
    ("expired challenge", _expired_challenge, "expired"),
    ("token for another job", _token_for_another_job, "token is not for this job"),
    ("grant for another job", _grant_for_another_job, "grant refused: it is for job"),
    ("grant for another bundle", _grant_for_another_bundle, "grant refused: it names another bundle"),
    ("grant not launched on this host", _grant_not_launched_here, "not launched for this job"),
]


@pytest.mark.parametrize(("make", "message"), [c[1:] for c in BROKER_CASES], ids=[c[0] for c in BROKER_CASES])
def test_broker_refuses_bad_key_requests(store, host, make, message):
    """The key broker refuses a request whose token has the wrong audience, another signer or a nonce that
    is not the challenge; whose challenge it never issued, issued to another job, already answered, or
    issued past its lifetime; whose token or grant is for another job. No key leaves it, the refusal is an
    audit line naming the job and the reason, and a correct request for the same job is then released."""
    r = KeyRequest(host, store)
    req = make(r)
    released_before = [e for e in _audit(host) if e["event"] == "key_released"]
    with pytest.raises(DCRError, match=message):
        r.h.broker.release(req, job_id=r.job_id)
    events = _audit(host)
    assert [e for e in events if e["event"] == "key_released"] == released_before
    refusal = events[-1]
    assert refusal["event"] == "key_refused" and refusal["job_id"] == r.job_id
    assert refusal["reason"].startswith("key release refused") and message.split(":")[0] in refusal["reason"]
    # The broker still serves this job: the fault was the request's.
    key, _cond = r.h.broker.release(r.valid(), job_id=r.job_id)
    assert len(key) == 32
    assert _audit(host)[-1]["event"] == "key_released"


# ---------------------------------------------------------------------------------------------------------
# Bad input on the socket
# ---------------------------------------------------------------------------------------------------------


def _exchange(sock_path: Path, data: bytes, fds: list[int] | None = None) -> dict[str, Any]:
    """Send raw bytes (with descriptors) and read the one reply line."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(60)
        s.connect(str(sock_path))
        if fds:
            socket.send_fds(s, [data], fds)
        else:
            s.sendall(data)
        with s.makefile("rb") as f:
            return decode(f.readline(MAX_MESSAGE + 1))


def _open_fds(path: str) -> list[str]:
    """This process's descriptors open on ``path``."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == path:
                out.append(fd)
        except OSError:
            pass
    return out


def _valid_grant(store: Any, tmp_path: Path, make_notebook: Callable[..., Path]) -> str:
    nb = make_notebook(SUMMARY_CELLS)
    (tmp_path / "g").mkdir(exist_ok=True)
    return _grant_and_bundle(store, nb, tmp_path / "g")[1]


BAD_REQUESTS: list[tuple[str, Callable[[Path], tuple[bytes, list[int]]], str]] = [
    ("unknown op", lambda d: (encode({"op": "format-disk"}), []), "unknown request 'format-disk'"),
    ("no op", lambda d: (encode({"job_id": "job-x"}), []), "unknown request None"),
    ("malformed JSON", lambda d: (b'{"op": "ping"\n', []), "not JSON"),
    ("not an object", lambda d: (b'["ping"]\n', []), "not a JSON object"),
    ("oversized line without end", lambda d: (b"x" * (MAX_MESSAGE + 10), []), "too large"),
    (
        "oversized line",
        lambda d: (b'{"op": "ping", "pad": "' + b"x" * MAX_MESSAGE + b'"}\n', []),
        "too large",
    ),
    ("launch without a grant", lambda d: (encode({"op": "launch"}), []), "launch needs a grant"),
    (
        "launch with a non-string grant",
        lambda d: (encode({"op": "launch", "grant": 7}), []),
        "launch needs a grant",
    ),
    (
        "launch with a forged grant",
        lambda d: (encode({"op": "launch", "grant": "a.b.c"}), []),
        "grant refused",
    ),
    ("status of a malformed id", lambda d: (encode({"op": "status", "job_id": ["x"]}), []), "no such job"),
]


@pytest.mark.parametrize(("make", "message"), [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_are_answered_and_the_host_keeps_serving(host, make, message):
    """Unknown or missing ops, malformed or non-object JSON, oversized lines and launches without a usable
    grant are answered with an error naming the problem; no job is created and a following ping works."""
    data, fds = make(host.state)
    reply = _exchange(host.socket, data, fds)
    assert reply["ok"] is False and message in reply["error"], reply
    assert host.client.ping()["ok"] is True
    assert host.host.jobs == {} and host.client.jobs() == []
    assert list((host.state / "spool").iterdir()) == []


@pytest.mark.parametrize("kind", ["pipe", "directory", "none"])
def test_launch_with_a_bundle_that_is_not_a_regular_file(tmp_path, store, host, make_notebook, kind):
    """A launch with a valid grant whose bundle descriptor is a pipe or a directory, or that passes no
    descriptor at all, is refused saying what the bundle must be; no job or spool is left, the host
    closes the descriptor it was given, and it keeps serving."""
    grant = _valid_grant(store, tmp_path, make_notebook)
    fds: list[int] = []
    bundle_dir = tmp_path / "bundle-dir"
    if kind == "pipe":
        r, w = os.pipe()
        os.write(w, b"not a bundle")
        os.close(w)
        fds = [r]
    elif kind == "directory":
        bundle_dir.mkdir()
        fds = [os.open(bundle_dir, os.O_RDONLY | os.O_DIRECTORY)]
    try:
        reply = _exchange(host.socket, encode({"op": "launch", "grant": grant}), fds)
    finally:
        for fd in fds:
            os.close(fd)
    expected = "passed file descriptor" if kind == "none" else "regular file"
    assert reply["ok"] is False and "launch refused" in reply["error"] and expected in reply["error"], reply
    assert host.client.ping()["ok"] is True
    assert host.host.jobs == {} and host.host.by_grant == {}
    assert list((host.state / "spool").iterdir()) == []
    # The host and the client share this process: nothing may still hold the directory open.
    assert _open_fds(str(bundle_dir)) == []


# ---------------------------------------------------------------------------------------------------------
# No sandbox, no key
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sandbox_that_cannot_be_built_stops_the_job_before_any_key(tmp_path, store, make_host, make_notebook):
    """When the kernel sandbox cannot be built (here the host's scratch root is too deep for the kernel's
    unix sockets), the supervisor refuses before asking for a key: the job fails with a reason naming the
    sandbox, and the audit log has no key release or refusal for it, only its launch and its end."""
    deep = tmp_path / ("scratch-" + "d" * 60)
    host = make_host(scratch_root=deep)
    nb = make_notebook(SUMMARY_CELLS)
    job_id, grant, bundle, _key = _grant_and_bundle(store, nb, tmp_path)
    host.client.launch(grant, bundle)
    job = _wait_state(host.client, job_id, contract.TERMINAL_STATES)
    assert job["state"] == "failed"
    assert "sandbox" in job["failure"]["reason"], job
    events = [e for e in _audit(host) if e.get("job_id") == job_id]
    assert [e["event"] for e in events] == ["launch", "end"]
    assert (events[1]["state"], events[1]["reason_code"]) == ("failed", "enclave_failed")
    out = tmp_path / "result"
    host.client.result(job_id, out)
    assert sorted(p.name for p in out.iterdir()) == [contract.FAILURE_FILE]


# ---------------------------------------------------------------------------------------------------------
# Grant states, for the hub's quota
# ---------------------------------------------------------------------------------------------------------


def _launched(store: Any, host: Any, nb: Path, tmp: Path) -> tuple[str, str]:
    """Launch a job of ``nb``; its job id and grant id."""
    tmp.mkdir()
    job_id, grant, bundle, _key = _grant_and_bundle(store, nb, tmp)
    return job_id, host.client.launch(grant, bundle)["grant_id"]


@pytest.mark.slow
def test_grant_states_tell_root_which_grants_have_ended(
    tmp_path, store, make_host, shared_host, make_notebook, monkeypatch
):
    """``grant_states`` answers root, for each grant id: ``unused`` (never launched here), ``running`` (its
    job has not ended) or ``ended`` (its job failed, was cancelled or deleted, or the host restarted since
    its launch). Another account gets the same refusal whatever it asks; malformed requests are refused
    and change nothing. A job the host cannot start ends at once (failed, ``host_error``) instead of
    counting as running for ever. The stopped host leaves its socket path alone once a file replaced it."""
    host = shared_host

    def no_sandbox_id() -> tuple[int, int]:
        raise DCRError("no sandbox id left")

    monkeypatch.setattr(host.host.sandbox_ids, "allocate", no_sandbox_id)
    broken_job, broken = _launched(store, host, make_notebook(SLEEP_CELLS), tmp_path / "broken")
    job = _wait_state(host.client, broken_job, contract.TERMINAL_STATES)
    assert job["failure"]["reason"] == "the enclave host could not run the job", job
    monkeypatch.undo()
    cancelled_job, cancelled = _launched(store, host, make_notebook(SLEEP_CELLS), tmp_path / "a")
    stopped_job, stopped = _launched(store, host, make_notebook(SLEEP_CELLS), tmp_path / "b")
    unused = _grant_id(_grant_and_bundle(store, make_notebook(SLEEP_CELLS), tmp_path)[1])
    ids = [broken, cancelled, stopped, unused]
    assert host.client.grant_states(ids) == {
        broken: "ended",
        cancelled: "running",
        stopped: "running",
        unused: "unused",
    }

    refused = {"ok": False, "error": "not allowed: grant states are answered only to root"}
    assert _as_other(host, "grant_states", grant_ids=ids) == refused
    assert _as_other(host, "grant_states", grant_ids="everything") == refused
    before = [(host.state / f).read_bytes() for f in ("grants.log", "audit.log")]
    for bad, message in [
        ("not a list", "a list of strings"),
        ([cancelled, 7], "a list of strings"),
        (None, "a list of strings"),
        ([f"g{i}" for i in range(1001)], "at most 1000 grant ids, not 1001"),
    ]:
        with pytest.raises(DCRError, match=message):
            host.client.call("grant_states", **({} if bad is None else {"grant_ids": bad}))
    assert [(host.state / f).read_bytes() for f in ("grants.log", "audit.log")] == before
    assert sorted(host.host.jobs) == sorted([broken_job, cancelled_job, stopped_job])
    many = [f"g{i}" for i in range(1000)]
    assert host.client.grant_states(many) == dict.fromkeys(many, "unused")

    host.client.cancel(cancelled_job)
    host.client.delete(cancelled_job)
    assert host.client.grant_states(ids)[cancelled] == "ended"

    # Stopped with a job running; its socket path was replaced meanwhile, and stays as it was replaced.
    host.socket.unlink()
    host.socket.write_text("not the host's")
    host.host.shutdown()
    assert host.socket.read_text() == "not the host's"
    host.socket.unlink()
    again = make_host(socket_path=host.socket)
    assert again.client.grant_states(ids) == {
        broken: "ended",
        cancelled: "ended",
        stopped: "ended",
        unused: "unused",
    }
    ends = [(e["job_id"], e["state"], e.get("reason_code")) for e in _audit(again) if e["event"] == "end"]
    assert sorted(ends) == sorted([
        (broken_job, "failed", "host_error"),
        (cancelled_job, "cancelled", None),
        (stopped_job, "failed", "host_stopped"),
    ])  # fmt: skip
