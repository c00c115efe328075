"""A Compute Engine REST fake on 127.0.0.1 for the hub's launcher, driven by the real ``compute_v1`` client.

It answers ``instances.insert/get/delete/list`` and ``zoneOperations.get/wait`` under ``/compute/v1/``,
validating requests as the real API does where the launcher depends on it:

- required fields (``name``, ``machineType``, a boot disk, a network interface), the name format
  (``^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$``), label keys and values, a Confidential VM needing
  ``onHostMaintenance: TERMINATE``, ``maxRunDuration`` needing an ``instanceTerminationAction``;
- metadata: ``tee-*`` keys only as the Confidential Space image's launch policy allows them
  (``tee-env-<NAME>`` only for NAME in the image's ``allow_env_override`` label, which is the launch
  contract's :data:`LAUNCH_ENV_NAMES`; ``tee-container-log-redirect`` only on the debug image family, as
  ``log_redirect=debugonly``; ``tee-restart-policy`` one of Never/Always/OnFailure);
- ``requestId`` must be a UUID (not the zero UUID); the same request id again returns the first operation
  and creates nothing (Compute's idempotency);
- the same instance name twice is ``409 alreadyExists``.

Errors come in Google's JSON error shape, so ``google.api_core`` raises what it raises against Google.
Injection: :meth:`ComputeFake.refuse_next_insert` (e.g. 403 ``quotaExceeded``),
:meth:`ComputeFake.fail_next_operation` (the insert's operation ends ``DONE`` with ``error.errors`` and no
instance), and the ``boot`` callable decides what the "VM" does: it is called in a thread with a
:class:`FakeVM` once the insert is done; when it returns the instance is ``TERMINATED`` (the Confidential
Space launcher powers off after the workload exits); a delete sets ``vm.stopping``. A boot that ignores
``stopping`` is a VM that never stops by itself. ``enforce_max_run=True`` deletes an instance when its
``scheduling.maxRunDuration`` ends, as Compute does with ``instanceTerminationAction: DELETE``.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from dcr_enclave.formats import contract

NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
LABEL_KEY_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE_RE = re.compile(r"^[a-z0-9_-]{0,63}$")
#: The metadata keys Confidential Space's launcher reads (anything else ``tee-*`` is refused).
TEE_KEYS = {
    "tee-image-reference",
    "tee-restart-policy",
    "tee-container-log-redirect",
    "tee-cmd",
    "tee-mount",
    "tee-monitoring-memory-enable",
    "tee-impersonate-service-accounts",
    "tee-added-capabilities",
}
_PATH = re.compile(
    r"^/compute/v1/projects/([^/]+)/zones/([^/]+)/(instances|operations)(?:/([^/]+))?(?:/(wait))?$"
)


class ApiError(Exception):
    def __init__(self, code: int, message: str, reason: str = "invalid", domain: str = "global") -> None:
        super().__init__(message)
        self.code, self.message, self.reason, self.domain = code, message, reason, domain

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "code": self.code,
                "message": self.message,
                "errors": [{"message": self.message, "domain": self.domain, "reason": self.reason}],
            }
        }


@dataclass
class FakeVM:
    """What a booted "VM" gets: its instance (Compute JSON) and an event set when it is deleted."""

    instance: dict[str, Any]
    stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def metadata(self) -> dict[str, str]:
        return {i["key"]: i.get("value", "") for i in self.instance.get("metadata", {}).get("items", [])}

    @property
    def env(self) -> dict[str, str]:
        """The ``tee-env-*`` values, as the launcher hands them to the container."""
        return {k[len("tee-env-") :]: v for k, v in self.metadata.items() if k.startswith("tee-env-")}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    at: float


class ComputeFake:
    def __init__(
        self,
        boot: Callable[[FakeVM], None] | None = None,
        *,
        allow_env_override: tuple[str, ...] = tuple(
            contract.LAUNCH_POLICY_LABELS["tee.launch_policy.allow_env_override"].split(",")
        ),
        enforce_max_run: bool = True,
    ) -> None:
        self.boot = boot
        self.allow_env_override = set(allow_env_override)
        self.enforce_max_run = enforce_max_run
        self.instances: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.vms: dict[tuple[str, str, str], FakeVM] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        self._by_request_id: dict[str, str] = {}
        self.requests: list[Request] = []
        self.inserts_created = 0
        self._refuse: list[ApiError] = []
        self._fail_ops: list[str] = []
        self._lock = threading.RLock()
        self._ids = itertools.count(1000)
        #: Called with each request as it arrives (the benchmark times inserts with it).
        self.on_request: Callable[[Request], None] | None = None
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> ComputeFake:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def _do(self) -> None:
                fake._handle(self)

            do_GET = do_POST = do_DELETE = _do

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True, name="compute-fake").start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for vm in list(self.vms.values()):
            vm.stopping.set()

    def __enter__(self) -> ComputeFake:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- injection and inspection ----------------------------------------------------------------------

    def refuse_next_insert(self, code: int = 403, reason: str = "quotaExceeded", message: str = "") -> None:
        msg = message or "Quota 'N2D_CPUS' exceeded.  Limit: 0.0 in region europe-west4."
        self._refuse.append(ApiError(code, msg, reason, "usageLimits"))

    def fail_next_operation(self, code: str = "ZONE_RESOURCE_POOL_EXHAUSTED", message: str = "") -> None:
        self._fail_ops.append(code + "\n" + (message or "The zone does not have enough resources available."))

    def live(self) -> list[dict[str, Any]]:
        """Instances that exist (any status but deleted)."""
        with self._lock:
            return [dict(i) for i in self.instances.values()]

    def inserts(self) -> list[Request]:
        return [r for r in self.requests if r.method == "POST" and r.path.endswith("/instances")]

    # -- HTTP ------------------------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        parts = urllib.parse.urlsplit(h.path)
        query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            body = ApiError(400, "Invalid JSON payload received.")
        req = Request(h.command, parts.path, query, body, time.monotonic())
        with self._lock:
            self.requests.append(req)
        if self.on_request is not None:
            self.on_request(req)
        try:
            if isinstance(body, ApiError):
                raise body
            status, doc = self._route(req)
        except ApiError as e:
            status, doc = e.code, e.body()
        data = json.dumps(doc).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json; charset=UTF-8")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _route(self, req: Request) -> tuple[int, dict[str, Any]]:
        m = _PATH.match(req.path)
        if not m:
            raise ApiError(404, f"The requested URL {req.path} was not found.", "notFound")
        project, zone, kind, name, wait = m.groups()
        if kind == "operations":
            if name is None or (req.method, wait) not in (("GET", None), ("POST", "wait")):
                raise ApiError(405, "method not allowed")
            return 200, self._operation(project, zone, name)
        if req.method == "POST" and name is None:
            return 200, self._insert(project, zone, req)
        if req.method == "GET" and name is None:
            return 200, self._list(project, zone, req.query.get("filter", ""))
        if req.method == "GET":
            with self._lock:
                inst = self.instances.get((project, zone, name))
            if inst is None:
                raise ApiError(
                    404,
                    f"The resource 'projects/{project}/zones/{zone}/instances/{name}' was not found",
                    "notFound",
                )
            return 200, inst
        if req.method == "DELETE" and name is not None:
            return 200, self._delete(project, zone, name, req.query.get("requestId"))
        raise ApiError(405, "method not allowed")

    # -- operations ------------------------------------------------------------------------------------

    def _new_op(
        self, project: str, zone: str, kind: str, target: str, error: str | None = None
    ) -> dict[str, Any]:
        op_id = next(self._ids)
        name = f"operation-{op_id}-{uuid.uuid4().hex[:12]}"
        op: dict[str, Any] = {
            "kind": "compute#operation",
            "id": str(op_id),
            "name": name,
            "zone": f"https://www.googleapis.com/compute/v1/projects/{project}/zones/{zone}",
            "operationType": kind,
            "targetLink": f"https://www.googleapis.com/compute/v1/projects/{project}/zones/{zone}/instances/{target}",
            "status": "DONE",
            "progress": 100,
            "selfLink": f"https://www.googleapis.com/compute/v1/projects/{project}/zones/{zone}/operations/{name}",
        }
        if error is not None:
            code, message = error.split("\n", 1)
            op["error"] = {"errors": [{"code": code, "message": message}]}
            op["httpErrorStatusCode"] = 503
        self.operations[name] = op
        return op

    def _operation(self, project: str, zone: str, name: str) -> dict[str, Any]:
        with self._lock:
            op = self.operations.get(name)
        if op is None:
            raise ApiError(
                404,
                f"The resource 'projects/{project}/zones/{zone}/operations/{name}' was not found",
                "notFound",
            )
        return op

    # -- instances -------------------------------------------------------------------------------------

    def _insert(self, project: str, zone: str, req: Request) -> dict[str, Any]:
        rid = req.query.get("requestId")
        if rid is not None:
            try:
                parsed = uuid.UUID(rid)
            except ValueError:
                raise ApiError(
                    400, f"Invalid value for field 'requestId': '{rid}'. Must be a UUID."
                ) from None
            if parsed.int == 0:
                raise ApiError(400, "Invalid value for field 'requestId': the zero UUID is not supported.")
        with self._lock:
            if rid is not None and rid in self._by_request_id:
                return self.operations[self._by_request_id[rid]]  # the first answer, nothing created
            if self._refuse:
                raise self._refuse.pop(0)
            body = req.body
            if not isinstance(body, dict):
                raise ApiError(400, "Required 'instance resource' not specified.", "required")
            self._validate(zone, body)
            key = (project, zone, body["name"])
            if key in self.instances:
                raise ApiError(
                    409,
                    f"The resource 'projects/{project}/zones/{zone}/instances/{body['name']}' already exists",
                    "alreadyExists",
                )
            error = self._fail_ops.pop(0) if self._fail_ops else None
            op = self._new_op(project, zone, "insert", body["name"], error)
            if rid is not None:
                self._by_request_id[rid] = op["name"]
            if error is not None:
                return op  # accepted, then failed: no instance
            inst = dict(body)
            inst.update(
                {
                    "kind": "compute#instance",
                    "id": str(next(self._ids)),
                    "status": "RUNNING",
                    "zone": op["zone"],
                    "creationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000-00:00", time.gmtime()),
                    "selfLink": op["targetLink"],
                }
            )
            self.instances[key] = inst
            self.inserts_created += 1
            vm = FakeVM(inst)
            self.vms[key] = vm
        threading.Thread(target=self._run_vm, args=(key, vm), daemon=True, name=f"vm-{body['name']}").start()
        max_run = body.get("scheduling", {}).get("maxRunDuration")
        if self.enforce_max_run and max_run:
            timer = threading.Timer(float(max_run.get("seconds", 0)), self._expire, args=(key, vm))
            timer.daemon = True
            timer.start()
        return op

    def _run_vm(self, key: tuple[str, str, str], vm: FakeVM) -> None:
        try:
            if self.boot is not None:
                self.boot(vm)
            else:
                vm.stopping.wait()
        finally:
            with self._lock:
                inst = self.instances.get(key)
                if inst is not None and self.vms.get(key) is vm:
                    inst["status"] = "TERMINATED"

    def _expire(self, key: tuple[str, str, str], vm: FakeVM) -> None:
        with self._lock:
            if self.vms.get(key) is vm:
                self.instances.pop(key, None)
                self.vms.pop(key, None)
        vm.stopping.set()

    def _delete(self, project: str, zone: str, name: str, rid: str | None) -> dict[str, Any]:
        with self._lock:
            if rid is not None and rid in self._by_request_id:
                return self.operations[self._by_request_id[rid]]
            key = (project, zone, name)
            if key not in self.instances:
                raise ApiError(
                    404,
                    f"The resource 'projects/{project}/zones/{zone}/instances/{name}' was not found",
                    "notFound",
                )
            self.instances.pop(key)
            vm = self.vms.pop(key, None)
            op = self._new_op(project, zone, "delete", name)
            if rid is not None:
                self._by_request_id[rid] = op["name"]
        if vm is not None:
            vm.stopping.set()
        return op

    def _list(self, project: str, zone: str, flt: str) -> dict[str, Any]:
        wanted = dict(re.findall(r"labels\.([a-z][a-z0-9_-]*)\s*=\s*\"?([a-z0-9_-]*)\"?", flt))
        if flt and not wanted:
            raise ApiError(400, f"Invalid list filter expression '{flt}'.")
        with self._lock:
            items = [
                dict(i)
                for (p, z, _), i in sorted(self.instances.items())
                if p == project
                and z == zone
                and all(i.get("labels", {}).get(k) == v for k, v in wanted.items())
            ]
        return {
            "kind": "compute#instanceList",
            "id": f"projects/{project}/zones/{zone}/instances",
            "items": items,
        }

    # -- validation, as the real API (and the image's launch policy) --------------------------------------

    def _capabilities_allowed(self, value: Any) -> bool:
        """``tee-added-capabilities`` is a JSON array of capability names; the image must allow them."""
        if contract.LAUNCH_POLICY_LABELS.get("tee.launch_policy.allow_capabilities") != "true":
            return False
        try:
            caps = json.loads(value)
        except (TypeError, ValueError):
            return False
        return isinstance(caps, list) and all(
            isinstance(c, str) and re.match(r"^CAP_[A-Z_]+$", c) for c in caps
        )

    def _validate(self, zone: str, body: dict[str, Any]) -> None:
        name = body.get("name")
        if not name:
            raise ApiError(
                400,
                "Invalid value for field 'resource.name': ''. Must be a match of regex '[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?'",
                "invalid",
            )
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ApiError(
                400,
                f"Invalid value for field 'resource.name': '{name}'. Must be a match of regex '[a-z](?:[-a-z0-9]{{0,61}}[a-z0-9])?'",
            )
        mt = body.get("machineType")
        if not isinstance(mt, str) or not re.match(
            rf"^(zones/{re.escape(zone)}/)?machineTypes/[a-z0-9-]+$|^[a-z0-9-]+$",
            mt.rsplit("/zones/", 1)[-1] if mt.startswith("http") else mt,
        ):
            raise ApiError(400, "Invalid value for field 'resource.machineType'.", "required")
        disks = body.get("disks")
        if not isinstance(disks, list) or not any(isinstance(d, dict) and d.get("boot") for d in disks):
            raise ApiError(
                400, "Invalid value for field 'resource.disks': no boot disk specified.", "required"
            )
        nics = body.get("networkInterfaces")
        if not isinstance(nics, list) or not nics:
            raise ApiError(400, "Required field 'resource.networkInterfaces' not specified", "required")
        labels = body.get("labels") or {}
        if len(labels) > 64:
            raise ApiError(400, "Too many labels (at most 64).")
        for k, v in labels.items():
            if not LABEL_KEY_RE.match(k) or not isinstance(v, str) or not LABEL_VALUE_RE.match(v):
                raise ApiError(400, f"Invalid value for field 'resource.labels': '{k}'='{v}'.")
        sched = body.get("scheduling") or {}
        confidential = (body.get("confidentialInstanceConfig") or {}).get("confidentialInstanceType")
        if confidential is not None:
            if confidential not in ("SEV", "SEV_SNP", "TDX"):
                raise ApiError(
                    400,
                    f"Invalid value for field 'resource.confidentialInstanceConfig.confidentialInstanceType': '{confidential}'.",
                )
            if sched.get("onHostMaintenance") != "TERMINATE":
                raise ApiError(
                    400,
                    "Confidential VMs do not support live migration: set scheduling.onHostMaintenance to TERMINATE.",
                )
        if "maxRunDuration" in sched:
            if sched.get("instanceTerminationAction") not in ("DELETE", "STOP"):
                raise ApiError(
                    400, "scheduling.maxRunDuration requires scheduling.instanceTerminationAction."
                )
            seconds = int(sched["maxRunDuration"].get("seconds", 0))
            if not 30 <= seconds <= 120 * 86400:
                raise ApiError(400, "Invalid value for field 'resource.scheduling.maxRunDuration.seconds'.")
        items = (body.get("metadata") or {}).get("items") or []
        keys = [i.get("key") for i in items]
        if len(keys) != len(set(keys)):
            raise ApiError(400, "Duplicate metadata keys.")
        source = str((disks[0].get("initializeParams") or {}).get("sourceImage", ""))
        debug = source.endswith("/confidential-space-debug")
        for i in items:
            key, value = str(i.get("key", "")), i.get("value", "")
            if not re.match(r"^[a-zA-Z0-9_-]{1,128}$", key):
                raise ApiError(400, f"Invalid value for field 'resource.metadata.items[].key': '{key}'.")
            if not key.startswith("tee-"):
                continue
            if key.startswith("tee-env-"):
                if key[len("tee-env-") :] not in self.allow_env_override:
                    raise ApiError(
                        400,
                        f"launch policy: env override {key[len('tee-env-') :]!r} is not allowed by the image",
                    )
            elif key not in TEE_KEYS:
                raise ApiError(400, f"launch policy: unknown metadata key {key!r}")
            elif key == "tee-container-log-redirect" and not debug:
                raise ApiError(
                    400, "launch policy: log redirect is allowed only on the debug image (debugonly)"
                )
            elif key == "tee-restart-policy" and value not in ("Never", "Always", "OnFailure"):
                raise ApiError(400, f"launch policy: restart policy {value!r}")
            elif key == "tee-added-capabilities" and not self._capabilities_allowed(value):
                raise ApiError(400, f"launch policy: capabilities {value!r} are not allowed by the image")
