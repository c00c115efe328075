"""The secure stage end to end on one machine: ``dcr local-run`` and the enclave host.

Every test here runs real kernels in real namespaces through the real supervisor, started by a real
enclave host from its measured, read-only install.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from dcr_enclave import contract
from dcr_enclave.bundle import build_bundle
from dcr_enclave.grant import GrantedDataset, issue_grant
from dcr_enclave.jwk import generate_key, load_or_create_key
from dcr_enclave.sandbox import SandboxSpec, run_notebook
from dcr_enclave.sealing import generate_keypair, open_dir
from dcr_enclave.store import Store

pytestmark = [pytest.mark.root, pytest.mark.slow]

#: A row of the real file that the synthetic file does not contain: finding it anywhere means a leak.
REAL_ROW = b"28,male,33,3,no,southeast,4449.462"

SUMMARY_CELLS = [
    "import pandas as pd\ndf = pd.read_csv('/data/acme/insurance/real.csv')",
    "s = df.groupby('smoker')['charges'].agg(['count', 'mean'])\ns.to_csv('summary.csv')\nlen(df)",
]


def _grant_and_bundle(store, notebook: Path, tmp: Path, *, key=None, time_limit: int = 600):
    hub_key = key or load_or_create_key(store.hub_key_path)
    bundle_path = tmp / "bundle.tar"
    bundle = build_bundle(notebook, bundle_path)
    version = Store(store.root).versions(store.provider, store.dataset)[-1].version
    private, public = generate_keypair()
    job_id = contract.new_job_id()
    grant = issue_grant(
        hub_key,
        user="tester",
        job_id=job_id,
        bundle_digest=bundle.digest,
        datasets=[GrantedDataset(store.provider, store.dataset, version, "auto")],
        output_public_key=public,
        time_limit=time_limit,
    )
    return job_id, grant, bundle_path, private


def _wait_state(client, job_id: str, states: set[str], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.status(job_id)
        if job["state"] in states:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job never reached {states}: {job}")


def _no_plaintext_anywhere(roots: list[Path], marker: bytes) -> list[Path]:
    hits = []
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for f in files:
                p = Path(dirpath, f)
                try:
                    if p.is_file() and not p.is_symlink() and marker in p.read_bytes():
                        hits.append(p)
                except OSError:
                    pass
    return hits


def test_same_notebook_synthetic_then_real(
    tmp_path, store, make_notebook, run_cli, insurance_real, insurance_synthetic
):
    """A notebook reading /data/<provider>/<dataset>/<file> runs unchanged on the synthetic file in a
    sandboxed kernel and on the real file under `dcr local-run`; its outputs reflect the real data exactly."""
    nb = make_notebook(SUMMARY_CELLS)
    # Programming stage: the synthetic file under the real file's name.
    syn_data = tmp_path / "syn-data"
    (syn_data / "acme" / "insurance").mkdir(parents=True)
    (syn_data / "acme" / "insurance" / "real.csv").write_bytes(insurance_synthetic.read_bytes())
    work = tmp_path / "syn-work"
    work.mkdir()
    (work / nb.name).write_bytes(nb.read_bytes())
    os.chown(work, 65534, 65534)
    os.chown(work / nb.name, 65534, 65534)
    res = run_notebook(
        nb.name, SandboxSpec(workdir=work, data_dir=syn_data, uid=65534, gid=65534, wall_time=120)
    )
    assert res.status == "ok"
    syn_summary = pd.read_csv(work / "summary.csv", index_col=0)
    assert syn_summary["count"].sum() == len(pd.read_csv(insurance_synthetic))

    # Secure stage: the same notebook, on the real rows.
    out = tmp_path / "out"
    code, _o, err = run_cli(
        "local-run", nb, "--store", store.root, "--out", out, "--host-state", tmp_path / "host-state"
    )
    assert code == 0, err
    real = pd.read_csv(insurance_real)
    expected = real.groupby("smoker")["charges"].agg(["count", "mean"])
    got = pd.read_csv(out / "outputs" / "summary.csv", index_col=0)
    pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=1e-12)
    assert not got.equals(syn_summary)
    executed = nbformat.read(out / "outputs" / nb.name, as_version=4)
    assert executed.cells[1].outputs[0]["data"]["text/plain"] == str(len(real))

    # The receipt verifies against the host's published key, and is rejected as hardware.
    code, text, _ = run_cli("verify", out, "--trust", tmp_path / "host-state" / "public" / "jwks.json")
    assert code == 0, text
    code, text, _ = run_cli(
        "verify", out, "--trust", tmp_path / "host-state" / "public" / "jwks.json", "--require-hardware"
    )
    assert code == 1
    assert "FAIL" in text and "hardware" in text.lower()


HOSTILE = r"""
import json, os, socket, subprocess, sys, time
results = {}
def attempt(name, fn):
    try:
        fn()
        results[name] = "SUCCEEDED"
    except Exception as e:
        results[name] = "failed: " + type(e).__name__

def tcp():
    s = socket.create_connection(("127.0.0.1", PORT), timeout=2)
    s.sendall(b"leak")
attempt("tcp_loopback", tcp)
attempt("read_signer_key", lambda: open(SIGNER).read())
attempt("read_provider_keys", lambda: os.listdir(KEYS))
attempt("read_hub_key", lambda: open(HUBKEY).read())
def host_socket():
    s = socket.socket(socket.AF_UNIX)
    s.connect(HOSTSOCK)
attempt("host_socket", host_socket)
attempt("other_job_spool", lambda: os.listdir(SPOOL))
attempt("write_data", lambda: open("/data/acme/insurance/new.csv", "w").write("x"))
attempt("write_outside", lambda: open(OUTSIDE, "w").write("x"))
results["interfaces"] = sorted(l.split(":")[0].strip() for l in open("/proc/net/dev").readlines()[2:])
results["uid"] = os.getuid()
results["dcr_env"] = sorted(k for k in os.environ if k.startswith("DCR"))
with open("results.json", "w") as f:
    json.dump(results, f)
# Leave a process behind that would rewrite an output after the last cell.
subprocess.Popen([sys.executable, "-c",
    "import time, os; time.sleep(3); open('results.json', 'w').write('TAMPERED')"],
    start_new_session=True)
"""


def test_hostile_notebook_fails_every_attempt(tmp_path, store, host, make_notebook, run_cli):
    """A hostile notebook under `dcr local-run` cannot reach the network (loopback included), the host's
    signing key, provider key material, the hub key, the host's socket, another job's spool, cannot write
    /data or outside its working copy, and a process it leaves behind cannot change an output."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    outside = tmp_path / "outside-marker"
    src = (
        HOSTILE.replace("PORT", str(port))
        .replace("SIGNER", repr(str(host.state / "signer.pem")))
        .replace("KEYS", repr(str(store.keys)))
        .replace("HUBKEY", repr(str(store.hub_key_path)))
        .replace("HOSTSOCK", repr(str(host.socket)))
        .replace("SPOOL", repr(str(host.state / "spool")))
        .replace("OUTSIDE", repr(str(outside)))
    )
    nb = make_notebook(["open('/data/acme/insurance/real.csv').readline()", src])
    out = tmp_path / "out"
    code, _o, err = run_cli(
        "local-run", nb, "--store", store.root, "--out", out, "--host-socket", host.socket
    )
    assert code == 0, err
    with pytest.raises(TimeoutError):
        listener.accept()  # nothing ever connected
    listener.close()
    time.sleep(4)  # longer than the left-behind process would wait
    results = json.loads((out / "outputs" / "results.json").read_text())
    for name in (
        "tcp_loopback", "read_signer_key", "read_provider_keys", "read_hub_key",
        "host_socket", "other_job_spool", "write_data",
    ):  # fmt: skip
        assert results[name].startswith("failed"), (name, results[name])
    assert results["interfaces"] == ["lo"]
    assert results["uid"] != 0
    assert results["dcr_env"] == []  # no launch environment, no link descriptor number
    assert not outside.exists()
    code, text, _ = run_cli("verify", out, "--trust", host.jwks_path)
    assert code == 0, text  # the receipt's digest of results.json matches what the last cell wrote


def test_concurrent_jobs_do_not_see_each_other(tmp_path, store, host, make_notebook):
    """Two jobs running at once each see only their own working copy and /data; neither can list the
    other's scratch, and both finish."""
    a_nb = make_notebook(
        ["import time, os\nopen('mine-a.txt', 'w').write('a')\ntime.sleep(4)\nsorted(os.listdir('.'))"],
        workspace="a",
    )
    b_src = (
        "import os, json\n"
        "found = []\n"
        "for root, dirs, files in os.walk('/'):\n"
        "    dirs[:] = [d for d in dirs if root != '/' or d not in ('proc', 'sys', 'dev')]\n"
        "    found += [os.path.join(root, f) for f in files if f == 'mine-a.txt']\n"
        "seen = {'procs': sorted(p for p in os.listdir('/proc') if p.isdigit()),\n"
        "        'other_work': found,\n"
        "        'spool': os.path.exists(" + repr(str(host.state / "spool")) + ")}\n"
        "json.dump(seen, open('seen.json', 'w'))"
    )
    b_nb = make_notebook(["import time\ntime.sleep(1)", b_src], workspace="b")
    (tmp_path / "ta").mkdir()
    (tmp_path / "tb").mkdir()
    ja, ga, ba, _a_key = _grant_and_bundle(store, a_nb, tmp_path / "ta")
    jb, gb, bb, b_key = _grant_and_bundle(store, b_nb, tmp_path / "tb")
    host.client.launch(ga, ba)
    host.client.launch(gb, bb)
    a = _wait_state(host.client, ja, contract.TERMINAL_STATES)
    b = _wait_state(host.client, jb, contract.TERMINAL_STATES)
    assert a["state"] == b["state"] == "succeeded", (a, b)
    out = tmp_path / "b-out"
    host.client.result(jb, out)
    open_dir(out / contract.SEALED_OUTPUTS_FILE, out / "outputs", b_key, jb)
    seen = json.loads((out / "outputs" / "seen.json").read_text())
    assert seen["other_work"] == []
    assert seen["spool"] is False
    # Its own PID namespace: the kernel and its few helpers, not the host's or the other job's processes.
    assert len(seen["procs"]) < 10


def test_modified_enclave_code_changes_measurement_and_key_is_refused(tmp_path, store, host, make_notebook):
    """Changing one byte of the installed enclave code changes the measurement; the broker then refuses
    the key, the job fails naming the condition, and no plaintext is left anywhere."""
    before = host.host.measurement()
    target = host.host.image_dir / "dcr_enclave" / "contract.py"
    os.chmod(target, 0o644)
    data = target.read_bytes()
    target.write_bytes(data + b"\n")
    os.chmod(target, 0o444)
    after = host.host.measurement()
    assert before != after
    nb = make_notebook(SUMMARY_CELLS)
    job_id, grant, bundle, _key = _grant_and_bundle(store, nb, tmp_path)
    host.client.launch(grant, bundle)
    job = _wait_state(host.client, job_id, contract.TERMINAL_STATES)
    assert job["state"] == "failed"
    assert "enclave" in job["failure"]["reason"] and "digest" in job["failure"]["reason"]
    audit = (host.state / "audit.log").read_text()
    assert "key_refused" in audit and "key_released" not in audit
    assert _no_plaintext_anywhere([host.state, Path("/dev/shm")], REAL_ROW) == []


def test_grant_signed_by_another_key_is_refused(tmp_path, store, host, make_notebook):
    """A grant signed by a key the host does not trust is refused at launch, and nothing is spooled."""
    nb = make_notebook(SUMMARY_CELLS)
    _job_id, grant, bundle, _key = _grant_and_bundle(store, nb, tmp_path, key=generate_key())
    from dcr_enclave.errors import DCRError

    with pytest.raises(DCRError, match="grant"):
        host.client.launch(grant, bundle)
    assert list((host.state / "spool").iterdir()) == []


@pytest.mark.parametrize("how", ["cancel", "kill-9"])
def test_no_plaintext_after_cancel_or_kill(tmp_path, store, host, make_notebook, how):
    """After cancel, and after `kill -9` of the supervisor mid-run, the job ends, its processes are gone
    and no plaintext remains on disk or in /dev/shm."""
    nb = make_notebook(
        [
            "import shutil\nshutil.copy('/data/acme/insurance/real.csv', 'copy.csv')",
            "import time\ntime.sleep(120)",
        ]
    )
    job_id, grant, bundle, _key = _grant_and_bundle(store, nb, tmp_path)
    host.client.launch(grant, bundle)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        j = host.client.status(job_id)
        if j["cell"] and j["cell"][0] == 1:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"job never reached its second cell: {j}")
    proc = host.host.jobs[job_id].proc
    assert proc is not None
    if how == "cancel":
        assert host.client.cancel(job_id)["state"] == "cancelled"
    else:
        os.kill(proc.pid, signal.SIGKILL)
    job = _wait_state(host.client, job_id, contract.TERMINAL_STATES)
    assert job["state"] == ("cancelled" if how == "cancel" else "failed")

    def leftover() -> list[str]:
        found = subprocess.run(["pgrep", "-f", str(host.state)], capture_output=True, text=True).stdout
        return [p for p in found.split() if int(p) != os.getpid()]

    # A cancel is answered once the tree is gone; after a kill -9 the sandbox dies with its parent, which
    # the kernel carries out a moment later.
    deadline = time.monotonic() + (0 if how == "cancel" else 30)
    while leftover() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leftover() == []
    # The notebook had copied the real file into its working copy: that copy lived on the supervisor's
    # private tmpfs and is gone with it.
    assert _no_plaintext_anywhere([host.state, Path("/dev/shm")], REAL_ROW) == []


def test_replayed_key_request_is_refused(tmp_path, store, host):
    """A key request that reuses a challenge (same token, same challenge) is refused the second time,
    and both the release and the refusal are in the audit log."""
    from dcr_enclave.attestation import local_claims, sign_token
    from dcr_enclave.errors import DCRError
    from dcr_enclave.jwk import public_jwk

    h = host.host
    hub_key = load_or_create_key(store.hub_key_path)
    st = Store(store.root)
    manifest = st.versions(store.provider, store.dataset)[-1]
    job_id = contract.new_job_id()
    _priv, pub = generate_keypair()
    digest = "sha256:" + "ab" * 32
    grant = issue_grant(
        hub_key, user="t", job_id=job_id, bundle_digest=digest,
        datasets=[GrantedDataset(store.provider, store.dataset, manifest.version, "auto")], output_public_key=pub,
    )  # fmt: skip
    challenge = h.broker.new_challenge(job_id)
    env = {
        contract.ENV.JOB_ID: job_id,
        contract.ENV.BUNDLE_DIGEST: digest,
        contract.ENV.HUB_KEY_THUMBPRINT: public_jwk(hub_key)["kid"],
    }
    token = sign_token(
        local_claims(
            image_digest=h.measurement(), env=env, audience=contract.KEY_RELEASE_AUDIENCE, nonces=[challenge]
        ),
        h.signer,
        kid=public_jwk(h.signer)["kid"],
    )
    req = {
        "provider": store.provider, "dataset": store.dataset, "version": manifest.version,
        "wrapped_key": manifest.key.to_json(), "token": token, "grant": grant,
        "hub_jwks": [public_jwk(hub_key)], "challenge": challenge,
    }  # fmt: skip
    key, _cond = h.broker.release(dict(req), job_id=job_id)
    assert len(key) == 32
    with pytest.raises(DCRError, match="replay"):
        h.broker.release(dict(req), job_id=job_id)
    # A grant signed by another key, with the request's JWKS swapped to that key, is refused too.
    other = generate_key()
    forged = issue_grant(
        other, user="t", job_id=job_id, bundle_digest=digest,
        datasets=[GrantedDataset(store.provider, store.dataset, manifest.version, "auto")], output_public_key=pub,
    )  # fmt: skip
    c2 = h.broker.new_challenge(job_id)
    token2 = sign_token(
        local_claims(
            image_digest=h.measurement(), env=env, audience=contract.KEY_RELEASE_AUDIENCE, nonces=[c2]
        ),
        h.signer,
        kid=public_jwk(h.signer)["kid"],
    )
    with pytest.raises(DCRError, match="grant"):
        h.broker.release(
            {**req, "grant": forged, "hub_jwks": [public_jwk(other)], "token": token2, "challenge": c2},
            job_id=job_id,
        )
    events = [json.loads(line)["event"] for line in (host.state / "audit.log").read_text().splitlines()]
    assert events.count("key_released") == 1 and events.count("key_refused") == 2


def test_review_grant_without_airlock_is_refused_before_any_key(tmp_path, store, host, make_notebook):
    """A grant that puts outputs under review but names no airlock key is refused by the supervisor before it
    asks for a single key: sealing held outputs to the researcher's own key would skip the review."""
    nb = make_notebook(SUMMARY_CELLS)
    hub_key = load_or_create_key(store.hub_key_path)
    bundle_path = tmp_path / "bundle.tar"
    bundle = build_bundle(nb, bundle_path)
    version = Store(store.root).versions(store.provider, store.dataset)[-1].version
    _private, public = generate_keypair()
    job_id = contract.new_job_id()
    grant = issue_grant(
        hub_key, user="t", job_id=job_id, bundle_digest=bundle.digest,
        datasets=[GrantedDataset(store.provider, store.dataset, version, "review")], output_public_key=public,
    )  # fmt: skip
    host.client.launch(grant, bundle_path)
    job = _wait_state(host.client, job_id, contract.TERMINAL_STATES)
    assert job["state"] == "failed"
    assert "airlock" in job["failure"]["reason"]
    audit = (host.state / "audit.log").read_text()
    assert "key_released" not in audit and "key_refused" not in audit
