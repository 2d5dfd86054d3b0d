"""A fake Cloud TPU v2 API on 127.0.0.1 (plain HTTP) that the real `google-cloud-tpu` REST client talks to.

It serves the JSON shapes of the real API (camelCase, `{"error": {...}}` bodies, long-running operations
at `/v2/{operation name}`) for nodes, queued resources and guest attributes, plus the one Compute Engine
read grpoctl makes (`GET /compute/v1/projects/P`: project metadata, where OS Login is switched on). What
the real service does that a client must survive is scripted by the knobs of `Script`, all in one place:
transient 500/503/429 on reads (one-shot or at a rate), operation errors (codes 3, 8, 9), synchronous
quota errors with QuotaFailure details, 409 on metadata updates, guest attributes that 404 until the
VM publishes its host keys (ecdsa, ed25519, rsa) or 403 under an org policy, OS Login from project
metadata or org policy, images that refuse root, slow deletes (DELETING), queued resources that start
WAITING_FOR_RESOURCES, expire at `validUntil` and go SUSPENDING -> SUSPENDED (the node deleted),
pagination, enums as integers, and the API's name and label rules. `Script.realistic()` turns on what
the real service does by default. Scripted events (`preempt`, `set_state`) play what happens to a node.
Every request is recorded so tests can assert what the client sent.

A node's workers are real loopback sshd instances (see `SshdWorker`), started when the node becomes
READY and killed, together with every process they started, when the node is preempted or deleted:
that is what "the VM died" means on one machine.

    with FakeTpuApi() as fake:
        client = build_client(fake.endpoint)
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import re
import secrets
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from grpoctl_contract.accelerators import parse_slice

# Hosts per slice for the accelerator types tests use, from the one accelerator table (v4 counts
# TensorCores: v4-16 is 2 hosts); a Script may still set other counts to play a misbehaving API.
DEFAULT_HOSTS = {
    t: parse_slice(t).hosts for t in ("v6e-1", "v6e-4", "v6e-8", "v6e-16", "v5litepod-8", "v4-8", "v4-16")
}


class FakeWorker(Protocol):
    """One TPU VM host of a fake node."""

    port: int

    def host_public_key(self) -> str: ...  # "ssh-ed25519 AAAA..."

    def set_authorized_keys(self, by_user: dict[str, list[str]]) -> None: ...  # user -> key lines

    def kill(self) -> None: ...  # the VM dies: its sshd and everything it started


# (node id, worker index, script) -> a started worker (the script says which host keys it has and whether
# its image lets root log in)
WorkerFactory = Callable[[str, int, "Script"], FakeWorker]


class ApiError(Exception):
    def __init__(
        self, http: HTTPStatus, status: str, message: str, details: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(message)
        self.http, self.status, self.message, self.details = http, status, message, details or []

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": int(self.http), "message": self.message, "status": self.status}
        if self.details:
            error["details"] = self.details
        return {"error": error}


GRPC_CODES = {"INVALID_ARGUMENT": 3, "NOT_FOUND": 5, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9}

# Failed create operations as the real service reports them: (gRPC code, message).
PREEMPTED_WHILE_CREATING = (
    3,
    "Cloud TPU received a bad request. update is not supported while in state PREEMPTED [EID: 0x1a2b]",
)
STOCKOUT = (
    8,
    'There is no more capacity in the zone "{zone}"; you can try in another zone where Cloud TPU Nodes are '
    "offered (see https://cloud.google.com/tpu/docs/regions) [EID: 0x3c4d]",
)
INSUFFICIENT_RESERVED = (
    9,
    "Insufficient reserved capacity. Contact customer support to increase your reservation.",
)
QUOTA_NAME = "TPUV6EPreemptiblePodPerProjectPerZone"

# Transient errors a read can meet: HTTP status -> (status, message) of the real service's bodies.
TRANSIENT = {
    500: ("INTERNAL", "Internal error encountered."),
    503: ("UNAVAILABLE", "The service is currently unavailable."),
    429: (
        "RESOURCE_EXHAUSTED",
        "Quota exceeded for quota metric 'Read requests' and limit 'Read requests per minute' of service "
        "'tpu.googleapis.com'",
    ),
}

# The API's resource-name and label rules (RFC 1035 labels; label keys start with a letter).
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
LABEL_KEY_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE_RE = re.compile(r"^[a-z0-9_-]{0,63}$")

HOST_KEY_TYPES = {"ed25519": "ssh-ed25519", "ecdsa": "ecdsa-sha2-nistp256", "rsa": "ssh-rsa"}


@dataclass
class Script:
    """Knobs a test turns before (or while) the client acts. Defaults are the quickest happy path;
    `Script.realistic()` is what the real service does unasked."""

    # ---- time
    create_s: float = 0.3  # time a node spends CREATING before READY
    wait_for_resources_s: float = 0.3  # a queued resource waits this long before PROVISIONING
    key_propagation_s: float = 0.0  # ssh-keys metadata reaches the workers' sshd after this delay
    delete_s: float = 0.0  # a deleted node (queued resource) shows DELETING this long, then is gone
    suspend_s: float = 0.0  # a preempted queued resource is SUSPENDING this long, then SUSPENDED
    # ---- creates that fail
    offered_accelerator_types: set[str] = field(default_factory=lambda: set(DEFAULT_HOSTS))
    quota_exhausted: bool = False  # creates fail in their operation with RESOURCE_EXHAUSTED (a quota)
    quota_exhausted_sync: bool = False  # creates are refused at once: 429 with QuotaFailure details
    # creates fail in their operation with (gRPC code, message): PREEMPTED_WHILE_CREATING (the node is
    # left PREEMPTED), STOCKOUT, INSUFFICIENT_RESERVED
    create_error: tuple[int, str] | None = None
    stockout_zones: set[str] = field(default_factory=set)  # node creates there fail with STOCKOUT
    spot_stockout_zones: set[str] = field(default_factory=set)  # ... only spot ones (on-demand works)
    # 403 on node creates: "permission" (Permission 'tpu.nodes.create' denied), or on every request:
    # "api_disabled" (the Cloud TPU API is not enabled in the project; SERVICE_DISABLED)
    forbidden: str = ""
    # ---- transient errors
    fail_reads: list[int] = field(default_factory=list)  # the next reads answer these HTTP codes, one each
    read_error_rate: float = 0.0  # besides: this share of all reads answers 503/500/429
    seed: int = 0  # of the read-error draws
    metadata_conflicts: int = 0  # the next metadata updates answer 409 (another operation runs)
    # ---- logins
    root_login: bool = True  # the image's sshd lets root in with a key (the seed SOP's v6e did)
    project_os_login: bool = False  # project metadata enable-oslogin=TRUE: metadata keys ignored, unless
    #   the node's own metadata says enable-oslogin=FALSE
    org_requires_os_login: bool = False  # constraints/compute.requireOsLogin: OS Login always; a request
    #   that sets enable-oslogin=FALSE is refused (FAILED_PRECONDITION)
    compute_api_forbidden: bool = False  # the project-metadata read answers 403 (API off, no permission)
    # ---- guest attributes
    guest_attributes_forbidden: bool = False  # 403: an org policy disables guest attributes
    host_key_types: tuple[str, ...] = ("ed25519", "ecdsa")  # the workers' sshd host keys, all published
    # ---- encoding
    page_size: int = 0  # list answers at most this many items per page (nextPageToken); 0: all
    enum_ints: bool = False  # enums as integers (what `$alt=json;enum-encoding=int` asks for)
    hosts: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_HOSTS))
    internal_ip: str = "127.0.0.1"  # what networkEndpoints report (the sshd workers listen on loopback)
    external_ip: str = "127.0.0.1"
    # Guest attributes publish a host key other than the one the worker's sshd offers (a man in the
    # middle, or a VM replaced behind the same address): a client that pins the published key must refuse.
    publish_other_host_keys: bool = False
    # A fresh VM's guest agent publishes its host keys a little after READY: 404 until this long after.
    host_keys_delay_s: float = 0.0

    @classmethod
    def realistic(cls, **overrides: Any) -> Script:
        """What the real service does unasked: transient read errors now and then (~5% of reads), host
        keys published a while after READY (all three types), deletes and suspensions that take time,
        lists in pages."""
        base: dict[str, Any] = dict(
            create_s=2.0,
            wait_for_resources_s=1.0,
            read_error_rate=0.05,
            host_keys_delay_s=3.0,
            host_key_types=("ed25519", "ecdsa", "rsa"),
            delete_s=1.0,
            suspend_s=1.0,
            key_propagation_s=1.0,
            page_size=2,
            enum_ints=True,
        )
        return cls(**{**base, **overrides})


@dataclass
class FakeNode:
    name: str  # projects/P/locations/Z/nodes/N
    body: dict[str, Any]  # the create request body, camelCase
    state: str
    ready_at: float
    queued_resource: str = ""
    health: str = "HEALTHY"  # shown while READY
    booted_at: float = 0.0  # when its VMs last came up (the guest agent publishes host keys after)
    gone_at: float | None = None  # DELETING until then
    back_at: float | None = None  # restart(): READY again (with new VMs) then
    held: bool = False  # report_state(): the reported state stays what the test set
    workers: list[FakeWorker] = field(default_factory=list)
    create_time: str = field(default_factory=lambda: datetime.now(UTC).isoformat().replace("+00:00", "Z"))

    @property
    def node_id(self) -> str:
        return self.name.rsplit("/", 1)[1]


@dataclass
class FakeQueued:
    name: str
    body: dict[str, Any]
    state: str
    provision_at: float
    node_name: str = ""
    expire_at: float | None = None  # validUntil: still waiting then -> FAILED
    failed: dict[str, Any] | None = None  # failedData.error
    change_at: float | None = None  # DELETING -> gone, SUSPENDING -> SUSPENDED


@dataclass
class FakeOperation:
    name: str
    done_when: Callable[[], bool]
    result: Callable[[], dict[str, Any]]  # the response (with @type) once done
    error: dict[str, Any] | None = None


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    body: dict[str, Any] | None
    authorization: str | None = None  # the Authorization header (the node watchdog's bearer token)


def _node_type(body: dict[str, Any]) -> dict[str, Any]:
    return {"@type": "type.googleapis.com/google.cloud.tpu.v2.Node", **body}


EMPTY = {"@type": "type.googleapis.com/google.protobuf.Empty"}


class FakeTpuApi:
    """The fake API server. Thread-safe; all state changes happen under one lock."""

    def __init__(self, worker_factory: WorkerFactory | None = None, script: Script | None = None) -> None:
        self.worker_factory = worker_factory
        self.nodes: dict[str, FakeNode] = {}
        self.queued: dict[str, FakeQueued] = {}
        self.operations: dict[str, FakeOperation] = {}
        self.requests: list[RecordedRequest] = []
        self.injected: list[tuple[str, int]] = []  # (path, HTTP code) of every transient error served
        self._failures: list[list[Any]] = []  # [method, path part, HTTP code, times left] (fail_next)
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.script = script or Script()

    @property
    def script(self) -> Script:
        return self._script

    @script.setter
    def script(self, script: Script) -> None:  # a new script restarts the read-error draws
        self._script = script
        self._rng = random.Random(script.seed)

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> FakeTpuApi:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                status, payload = api.handle(self.command, self.path, raw, dict(self.headers))
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do_PATCH = _serve

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="fake-tpu")
        self._thread.start()
        return self

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "call start() first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            for node in self.nodes.values():
                self._kill_workers(node)

    def __enter__(self) -> FakeTpuApi:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- scripted events ---------------------------------------------------------------------------
    def preempt(self, node_id: str) -> None:
        """The spot VM is taken back now: workers die, the node shows PREEMPTED. Its queued resource (if
        any) goes SUSPENDING, then (after `suspend_s`) SUSPENDED, which deletes the node."""
        with self._lock:
            node = self._node_by_id(node_id)
            node.state = "PREEMPTED"
            self._kill_workers(node)
            if node.queued_resource and node.queued_resource in self.queued:
                qr = self.queued[node.queued_resource]
                qr.state, qr.change_at = "SUSPENDING", time.monotonic() + self.script.suspend_s

    def set_state(self, node_id: str, state: str, health: str = "HEALTHY") -> None:
        """The node is now in `state` (any of the API's 16) with `health`: maintenance, repair, a stop by
        a person. Workers die when it leaves READY for a state without a running VM, and a fresh VM
        boots when it comes back to READY."""
        with self._lock:
            node = self._node_by_id(node_id)
            if state != "READY" and node.workers:
                self._kill_workers(node)
            node.state, node.health = state, health
            if state == "READY" and not node.workers:
                self._start_workers(node)

    def restart(self, node_id: str, state: str = "RESTARTING", down_s: float = 0.5) -> None:
        """Maintenance, a repair or a reimage under a running job: the VMs go down and the node shows
        `state` for `down_s`, then READY again with new VMs (fresh disks, as after a reimage)."""
        with self._lock:
            node = self._node_by_id(node_id)
            self._kill_workers(node)
            node.state, node.back_at = state, time.monotonic() + down_s

    def report_state(self, node_id: str, state: str) -> None:
        """Only what the API reports changes (e.g. STARTING, no endpoints) while the VMs keep running;
        `report_state(node, "READY")` ends it."""
        with self._lock:
            node = self._node_by_id(node_id)
            node.state, node.held = state, state != "READY"

    def kill_worker(self, node_id: str, index: int) -> None:
        """One worker's VM dies (its sshd and all it ran) while the node stays READY."""
        with self._lock:
            self._node_by_id(node_id).workers[index].kill()

    def delete_by_someone(self, node_id: str) -> None:
        """Someone else deletes the node (the console, gcloud): as a DELETE request would."""
        with self._lock:
            self._delete_node(self._node_by_id(node_id).name)

    def fail_next(self, method: str, path_part: str, http: int = 500, times: int = 1) -> None:
        """The next `times` requests `method` whose path contains `path_part` fail with `http` (a 500 on a
        create, a 403 on a read), whatever `fail_reads` and `read_error_rate` say."""
        with self._lock:
            self._failures.append([method, path_part, http, times])

    def node_state(self, node_id: str) -> str | None:
        with self._lock:
            self._advance()
            node = self._find_node_by_id(node_id)
            return node.state if node else None

    def creates(self, kind: str = "nodes") -> list[RecordedRequest]:
        """The recorded create requests for `nodes` or `queuedResources`."""
        return [r for r in self.requests if r.method == "POST" and r.path.endswith("/" + kind)]

    def _node_by_id(self, node_id: str) -> FakeNode:
        node = self._find_node_by_id(node_id)
        if node is None:
            raise KeyError(node_id)
        return node

    def _find_node_by_id(self, node_id: str) -> FakeNode | None:
        return next((n for n in self.nodes.values() if n.node_id == node_id), None)

    # ---- time passes -------------------------------------------------------------------------------
    def _advance(self) -> None:
        now = time.monotonic()
        for qr in self.queued.values():
            if qr.state == "WAITING_FOR_RESOURCES" and qr.expire_at is not None and now >= qr.expire_at:
                qr.state = "FAILED"
                qr.failed = {"code": 4, "message": "Queued resource request expired: validUntil reached"}
            elif qr.state == "WAITING_FOR_RESOURCES" and now >= qr.provision_at:
                qr.state = "PROVISIONING"
                spec = qr.body["tpu"]["nodeSpec"][0]
                qr.node_name = f"{spec['parent']}/nodes/{spec['nodeId']}"
                self._new_node(qr.node_name, spec.get("node", {}), queued_resource=qr.name)
            elif qr.state == "SUSPENDING" and qr.change_at is not None and now >= qr.change_at:
                qr.state = "SUSPENDED"  # the service deletes the node of a suspended queued resource
                node = self.nodes.pop(qr.node_name, None)
                if node is not None:
                    self._kill_workers(node)
        for name, qr in list(self.queued.items()):
            if qr.state == "DELETING" and qr.change_at is not None and now >= qr.change_at:
                del self.queued[name]
        for name, node in list(self.nodes.items()):
            if node.back_at is not None and now >= node.back_at:  # restart(): back, with new VMs
                node.back_at = None
                self._start_workers(node)
                node.state = "READY"
            if node.state == "DELETING" and node.gone_at is not None and now >= node.gone_at:
                del self.nodes[name]
            elif node.state in ("CREATING", "STARTING") and now >= node.ready_at and not node.held:
                self._start_workers(node)
                node.state = "READY"
        for qr in self.queued.values():
            node = self.nodes.get(qr.node_name)
            if qr.state == "PROVISIONING" and node is not None and node.state == "READY":
                qr.state = "ACTIVE"

    def _new_node(self, name: str, body: dict[str, Any], queued_resource: str = "") -> FakeNode:
        node = FakeNode(
            name=name,
            body=body,
            state="CREATING",
            ready_at=time.monotonic() + self.script.create_s,
            queued_resource=queued_resource,
        )
        self.nodes[name] = node
        return node

    def _start_workers(self, node: FakeNode) -> None:
        if self.worker_factory is None:
            return
        count = self.script.hosts.get(node.body.get("acceleratorType", ""), 1)
        node.workers = [self.worker_factory(node.node_id, i, self.script) for i in range(count)]
        keys = self._authorized(node.body)
        for w in node.workers:
            w.set_authorized_keys(keys)
        node.booted_at = time.monotonic()

    def _kill_workers(self, node: FakeNode) -> None:
        for w in node.workers:
            w.kill()
        node.workers = []

    def _os_login(self, metadata: dict[str, str]) -> bool:
        """Whether the guest agent of a node with this metadata uses OS Login (and ignores ssh-keys)."""
        if self.script.org_requires_os_login:
            return True
        own = metadata.get("enable-oslogin", "").strip().upper()
        return own == "TRUE" if own else self.script.project_os_login

    def _authorized(self, body: dict[str, Any]) -> dict[str, list[str]]:
        """What the guest agent writes: per user of the `user:ssh-ed25519 AAAA comment` lines of the
        ssh-keys metadata, that user's authorized_keys lines; nothing under OS Login."""
        metadata = body.get("metadata", {})
        out: dict[str, list[str]] = {}
        if self._os_login(metadata):
            return out
        for line in metadata.get("ssh-keys", "").splitlines():
            if ":" in line:
                user, key = line.split(":", 1)
                out.setdefault(user.strip(), []).append(key.strip())
        return out

    # ---- JSON views ----------------------------------------------------------------------------------
    def _enum(self, kind: str, name: str) -> str | int:
        if not self.script.enum_ints:
            return name
        from google.cloud import tpu_v2

        enum = {
            "node": tpu_v2.Node.State,
            "health": tpu_v2.Node.Health,
            "queued": tpu_v2.QueuedResourceState.State,
        }[kind]
        return int(enum[name])

    def _node_json(self, node: FakeNode) -> dict[str, Any]:
        body = dict(node.body)
        count = len(node.workers) or self.script.hosts.get(body.get("acceleratorType", ""), 1)
        endpoints = []
        for i in range(count):
            ep: dict[str, Any] = {
                "ipAddress": self.script.internal_ip,
                "accessConfig": {"externalIp": self.script.external_ip},
            }
            if i < len(node.workers):
                ep["port"] = node.workers[i].port
            endpoints.append(ep)
        body.update(
            name=node.name,
            state=self._enum("node", node.state),
            createTime=node.create_time,
            apiVersion="V2",
            id=str(abs(hash(node.name)) % 10**12),
        )
        if node.state == "READY":
            body.update(health=self._enum("health", node.health), networkEndpoints=endpoints)
        if node.queued_resource:
            body["queuedResource"] = node.queued_resource
        return body

    def _queued_json(self, qr: FakeQueued) -> dict[str, Any]:
        state: dict[str, Any] = {"state": self._enum("queued", qr.state)}
        if qr.failed is not None:
            state["failedData"] = {"error": qr.failed}
        return {**qr.body, "name": qr.name, "state": state}

    def _page(self, key: str, items: list[dict[str, Any]], query: dict[str, str]) -> dict[str, Any]:
        """One page of a list: at most `page_size` (the client's `pageSize`, capped by the script's)."""
        sizes = [n for n in (self.script.page_size, int(query.get("pageSize") or 0)) if n > 0]
        if not sizes:
            return {key: items}
        start = int(query.get("pageToken") or 0)
        end = start + min(sizes)
        out: dict[str, Any] = {key: items[start:end]}
        if end < len(items):
            out["nextPageToken"] = str(end)
        return out

    # ---- HTTP ----------------------------------------------------------------------------------------
    def handle(
        self, method: str, raw_path: str, raw_body: bytes, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        url = urlsplit(raw_path)
        query = parse_qs(url.query)
        body = json.loads(raw_body) if raw_body else None
        headers = {k.lower(): v for k, v in (headers or {}).items()}
        with self._lock:
            self.requests.append(RecordedRequest(method, url.path, query, body, headers.get("authorization")))
            if url.path.startswith("/computeMetadata/"):  # the VM's metadata server, for the watchdog
                return self._metadata(url.path, headers)
            self._advance()
            failure = next((f for f in self._failures if f[0] == method and f[1] in url.path), None)
            if failure is not None:  # fail_next
                failure[3] -= 1
                if failure[3] <= 0:
                    self._failures.remove(failure)
                http = HTTPStatus(failure[2])
                status = {403: "PERMISSION_DENIED", 429: "RESOURCE_EXHAUSTED"}.get(failure[2], "INTERNAL")
                self.injected.append((url.path, failure[2]))
                return int(http), ApiError(http, status, f"injected {http.phrase}").body()
            try:
                self._maybe_transient(method, url.path)
                if url.path.startswith("/compute/v1/projects/"):
                    return 200, self._compute_project(url.path)
                return 200, self._route(method, url.path, query, body or {})
            except ApiError as err:
                return int(err.http), err.body()

    SA_TOKEN = "fake-sa-token-0123"  # the service-account token the metadata server hands out

    def _metadata(self, path: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """The metadata server's token endpoint (the real one refuses requests without the header)."""
        if headers.get("metadata-flavor") != "Google":
            return 403, {"error": "Missing Metadata-Flavor:Google header."}
        if path == "/computeMetadata/v1/instance/service-accounts/default/token":
            return 200, {"access_token": self.SA_TOKEN, "expires_in": 3599, "token_type": "Bearer"}
        return 404, {"error": f"no metadata at {path}"}

    def _maybe_transient(self, method: str, path: str) -> None:
        """A read (GET, getGuestAttributes) answers a transient error: the next of `fail_reads`, else
        at `read_error_rate`."""
        if not (method == "GET" or path.endswith(":getGuestAttributes")):
            return
        code = None
        if self.script.fail_reads:
            code = self.script.fail_reads.pop(0)
        elif self.script.read_error_rate and self._rng.random() < self.script.read_error_rate:
            code = self._rng.choice((503, 503, 500, 429))
        if code is not None:
            self.injected.append((path, code))
            status, message = TRANSIENT[code]
            raise ApiError(HTTPStatus(code), status, message)

    def _compute_project(self, path: str) -> dict[str, Any]:
        """Compute Engine `projects.get`: the project's common instance metadata."""
        project = path.rsplit("/", 1)[1]
        if self.script.compute_api_forbidden:
            raise ApiError(
                HTTPStatus.FORBIDDEN,
                "PERMISSION_DENIED",
                f"Compute Engine API has not been used in project {project} before or it is disabled.",
            )
        items = []
        if self.script.project_os_login or self.script.org_requires_os_login:
            items.append({"key": "enable-oslogin", "value": "TRUE"})
        return {"kind": "compute#project", "name": project, "commonInstanceMetadata": {"items": items}}

    def _route(self, method: str, path: str, query: dict[str, list[str]], body: dict[str, Any]) -> Any:
        if not path.startswith("/v2/projects/"):
            raise ApiError(HTTPStatus.NOT_FOUND, "NOT_FOUND", f"no such path {path}")
        name = path[len("/v2/") :]
        verb = ""
        if ":" in name.rsplit("/", 1)[-1]:
            name, verb = name.rsplit(":", 1)
        parts = name.split("/")  # projects P locations Z <collection> [id ...]
        if len(parts) < 5 or parts[0] != "projects" or parts[2] != "locations":
            raise ApiError(HTTPStatus.NOT_FOUND, "NOT_FOUND", f"no such path {path}")
        self._check_zone(parts[3])
        if self.script.forbidden == "api_disabled":
            raise ApiError(
                HTTPStatus.FORBIDDEN,
                "PERMISSION_DENIED",
                f"Cloud TPU API has not been used in project {parts[1]} before or it is disabled. Enable it "
                f"by visiting https://console.developers.google.com/apis/api/tpu.googleapis.com/overview"
                f"?project={parts[1]} then retry.",
            )
        parent, collection = "/".join(parts[:4]), parts[4]
        one = len(parts) == 6
        q = {k: v[0] for k, v in query.items()}
        match (collection, method, one, verb):
            case ("nodes", "POST", False, ""):
                return self._create_node(parent, q.get("nodeId", ""), body)
            case ("nodes", "GET", False, ""):
                nodes = [self._node_json(n) for n in self.nodes.values() if n.name.startswith(parent + "/")]
                return self._page("nodes", nodes, q)
            case ("nodes", "GET", True, ""):
                return self._node_json(self._get_node(name))
            case ("nodes", "DELETE", True, ""):
                return self._delete_node(name)
            case ("nodes", "PATCH", True, ""):
                return self._update_node(name, q.get("updateMask", ""), body)
            case ("nodes", "POST", True, "start"):
                return self._start_node(name)
            case ("nodes", "POST", True, "getGuestAttributes"):
                return self._guest_attributes(name, body)
            case ("queuedResources", "POST", False, ""):
                return self._create_queued(parent, q.get("queuedResourceId", ""), body)
            case ("queuedResources", "GET", False, ""):
                items = [
                    self._queued_json(r) for r in self.queued.values() if r.name.startswith(parent + "/")
                ]
                return self._page("queuedResources", items, q)
            case ("queuedResources", "GET", True, ""):
                return self._queued_json(self._get_queued(name))
            case ("queuedResources", "DELETE", True, ""):
                return self._delete_queued(name, q.get("force") == "true")
            case ("operations", "GET", True, ""):
                return self._operation_json(name)
            case ("acceleratorTypes", "GET", False, ""):  # `grpoctl doctor`: what the zone offers
                offered = sorted(self.script.offered_accelerator_types)
                return {"acceleratorTypes": [{"name": f"{name}/{t}", "type": t} for t in offered]}
        raise ApiError(HTTPStatus.NOT_FOUND, "NOT_FOUND", f"{method} {path} is not served by the fake")

    @staticmethod
    def _check_zone(zone: str) -> None:
        if zone.count("-") != 2:
            raise ApiError(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT", f"Invalid location: {zone}")

    @staticmethod
    def _check_name(what: str, name: str) -> None:
        if not NAME_RE.match(name):
            raise ApiError(
                HTTPStatus.BAD_REQUEST,
                "INVALID_ARGUMENT",
                f"Invalid {what} {name!r}: must be 1-63 characters, lowercase letters, digits and hyphens, "
                "starting with a letter and not ending with a hyphen",
            )

    def _check_node_body(self, body: dict[str, Any]) -> None:
        for key, value in body.get("labels", {}).items():
            if not LABEL_KEY_RE.match(key) or not LABEL_VALUE_RE.match(str(value)):
                raise ApiError(
                    HTTPStatus.BAD_REQUEST,
                    "INVALID_ARGUMENT",
                    f"Invalid label {key}={value}: keys and values are lowercase letters, digits, _ and -, "
                    "at most 63 characters (keys start with a letter)",
                )
        metadata = body.get("metadata", {})
        if self.script.org_requires_os_login and metadata.get("enable-oslogin", "").upper() == "FALSE":
            raise ApiError(
                HTTPStatus.BAD_REQUEST,
                "FAILED_PRECONDITION",
                "Constraint constraints/compute.requireOsLogin violated: enable-oslogin cannot be FALSE",
            )

    def _get_node(self, name: str) -> FakeNode:
        node = self.nodes.get(name)
        if node is None:
            raise ApiError(HTTPStatus.NOT_FOUND, "NOT_FOUND", f'Resource "{name}" was not found')
        return node

    def _get_queued(self, name: str) -> FakeQueued:
        qr = self.queued.get(name)
        if qr is None:
            raise ApiError(HTTPStatus.NOT_FOUND, "NOT_FOUND", f'Resource "{name}" was not found')
        return qr

    def _check_accelerator(self, parent: str, accelerator_type: str) -> None:
        if accelerator_type not in self.script.offered_accelerator_types:
            zone = parent.rsplit("/", 1)[1]
            raise ApiError(
                HTTPStatus.BAD_REQUEST,
                "INVALID_ARGUMENT",
                f'Accelerator type "{accelerator_type}" is not available in zone "{zone}"',
            )

    def _check_quota_sync(self, parent: str, accelerator_type: str) -> None:
        if not self.script.quota_exhausted_sync:
            return
        zone = parent.rsplit("/", 1)[1]
        text = f"Quota limit '{QUOTA_NAME}' has been exceeded. Limit: 0 in zone {zone}."
        raise ApiError(
            HTTPStatus.TOO_MANY_REQUESTS,
            "RESOURCE_EXHAUSTED",
            text,
            details=[
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [{"subject": f"{QUOTA_NAME} in {zone}", "description": text}],
                }
            ],
        )

    def _new_operation(
        self, parent: str, done_when: Callable[[], bool], result: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        op = FakeOperation(f"{parent}/operations/operation-{next(self._ids)}", done_when, result)
        self.operations[op.name] = op
        return self._operation_json(op.name)

    def _failed_operation(self, parent: str, code: int, message: str) -> dict[str, Any]:
        op = FakeOperation(f"{parent}/operations/operation-{next(self._ids)}", lambda: True, lambda: {})
        op.error = {"code": code, "message": message}
        self.operations[op.name] = op
        return self._operation_json(op.name)

    def _operation_json(self, name: str) -> dict[str, Any]:
        op = self.operations.get(name)
        if op is None:
            raise ApiError(HTTPStatus.NOT_FOUND, "NOT_FOUND", f'Operation "{name}" was not found')
        out: dict[str, Any] = {"name": op.name, "done": False}
        if op.error is not None:
            out.update(done=True, error=op.error)
        elif op.done_when():
            out.update(done=True, response=op.result())
        return out

    def _create_node(self, parent: str, node_id: str, body: dict[str, Any]) -> dict[str, Any]:
        if not node_id:
            raise ApiError(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT", "nodeId is required")
        self._check_name("node id", node_id)
        self._check_node_body(body)
        self._check_accelerator(parent, body.get("acceleratorType", ""))
        name = f"{parent}/nodes/{node_id}"
        if name in self.nodes:
            raise ApiError(HTTPStatus.CONFLICT, "ALREADY_EXISTS", f'Resource "{name}" already exists')
        self._check_quota_sync(parent, body.get("acceleratorType", ""))
        if self.script.forbidden == "permission":
            raise ApiError(
                HTTPStatus.FORBIDDEN, "PERMISSION_DENIED", f"Permission 'tpu.nodes.create' denied on '{name}'"
            )
        zone = parent.rsplit("/", 1)[1]
        spot = bool(body.get("schedulingConfig", {}).get("spot"))
        if zone in self.script.stockout_zones or (spot and zone in self.script.spot_stockout_zones):
            return self._failed_operation(parent, STOCKOUT[0], STOCKOUT[1].format(zone=zone))
        if self.script.quota_exhausted:
            chips = body.get("acceleratorType", "?")
            return self._failed_operation(
                parent, GRPC_CODES["RESOURCE_EXHAUSTED"], f"Quota '{QUOTA_NAME}' exceeded for {chips}"
            )
        if self.script.create_error is not None:
            code, message = self.script.create_error
            if code == PREEMPTED_WHILE_CREATING[0]:  # the node exists, taken back before it was READY
                self._new_node(name, body).state = "PREEMPTED"
            return self._failed_operation(parent, code, message.format(zone=parent.rsplit("/", 1)[1]))
        node = self._new_node(name, body)
        return self._new_operation(
            parent, lambda: node.state != "CREATING", lambda: _node_type(self._node_json(node))
        )

    def _delete_node(self, name: str) -> dict[str, Any]:
        node = self._get_node(name)
        self._kill_workers(node)
        if self.script.delete_s > 0:
            node.state, node.gone_at = "DELETING", time.monotonic() + self.script.delete_s
        else:
            del self.nodes[name]
        parent = name.split("/nodes/")[0]
        return self._new_operation(parent, lambda: name not in self.nodes, lambda: EMPTY)

    def _start_node(self, name: str) -> dict[str, Any]:
        node = self._get_node(name)
        if node.state != "STOPPED":
            raise ApiError(
                HTTPStatus.BAD_REQUEST, "FAILED_PRECONDITION", f"start is not supported in state {node.state}"
            )
        node.state, node.ready_at = "STARTING", time.monotonic() + self.script.create_s
        parent = name.split("/nodes/")[0]
        return self._new_operation(
            parent, lambda: node.state == "READY", lambda: _node_type(self._node_json(node))
        )

    def _update_node(self, name: str, mask: str, body: dict[str, Any]) -> dict[str, Any]:
        node = self._get_node(name)
        fields = [f for f in mask.split(",") if f]
        if fields != ["metadata"]:
            raise ApiError(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT", f"unsupported update mask {mask!r}")
        if self.script.metadata_conflicts > 0:
            self.script.metadata_conflicts -= 1
            raise ApiError(
                HTTPStatus.CONFLICT,
                "ABORTED",
                f"unable to queue the operation: another operation on {name.rsplit('/', 1)[1]} is running",
            )
        self._check_node_body(body)
        node.body["metadata"] = dict(body.get("metadata", {}))
        keys = self._authorized(node.body)

        workers = list(node.workers)

        def propagate() -> None:
            for w in workers:
                w.set_authorized_keys(keys)

        if self.script.key_propagation_s > 0:
            timer = threading.Timer(self.script.key_propagation_s, propagate)
            timer.daemon = True
            timer.start()
        else:
            propagate()
        parent = name.split("/nodes/")[0]
        return self._new_operation(parent, lambda: True, lambda: _node_type(self._node_json(node)))

    def _guest_attributes(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        node = self._get_node(name)
        if self.script.guest_attributes_forbidden:
            raise ApiError(
                HTTPStatus.FORBIDDEN,
                "PERMISSION_DENIED",
                "Guest attributes are disabled by constraints/compute.disableGuestAttributesAccess",
            )
        booted = max(node.ready_at, node.booted_at)
        published = node.state == "READY" and time.monotonic() >= booted + self.script.host_keys_delay_s
        if not published:  # the guest agent has not written the namespace yet
            raise ApiError(
                HTTPStatus.NOT_FOUND, "NOT_FOUND", f"guest attributes {body.get('queryPath', '')} not found"
            )
        out = []
        for w in node.workers:
            items = []
            for line in w.host_public_keys():
                key_type, key = line.split()[:2]
                if self.script.publish_other_host_keys:
                    key_type, key = (
                        _other_ed25519_key().split()[:2] if key_type == "ssh-ed25519" else ("", "")
                    )
                if key_type:
                    items.append({"namespace": "hostkeys", "key": key_type, "value": key})
            out.append({"queryPath": body.get("queryPath", ""), "queryValue": {"items": items}})
        return {"guestAttributes": out}

    def _create_queued(self, parent: str, qr_id: str, body: dict[str, Any]) -> dict[str, Any]:
        if not qr_id:
            raise ApiError(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT", "queuedResourceId is required")
        self._check_name("queued resource id", qr_id)
        name = f"{parent}/queuedResources/{qr_id}"
        if name in self.queued:
            raise ApiError(HTTPStatus.CONFLICT, "ALREADY_EXISTS", f'Resource "{name}" already exists')
        spec = body.get("tpu", {}).get("nodeSpec", [])
        if len(spec) != 1:
            raise ApiError(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT", "exactly one nodeSpec is supported")
        self._check_name("node id", spec[0].get("nodeId", ""))
        self._check_node_body(spec[0].get("node", {}))
        self._check_accelerator(parent, spec[0].get("node", {}).get("acceleratorType", ""))
        self._check_quota_sync(parent, spec[0].get("node", {}).get("acceleratorType", ""))
        now = time.monotonic()
        qr = FakeQueued(name, body, "WAITING_FOR_RESOURCES", now + self.script.wait_for_resources_s)
        valid = body.get("queueingPolicy", {}).get("validUntilDuration", "")
        if valid:
            qr.expire_at = now + float(valid.rstrip("s"))
        if self.script.quota_exhausted:
            qr.state = "FAILED"
            qr.failed = {"code": 8, "message": f"Quota '{QUOTA_NAME}' exceeded"}
        elif self.script.create_error is not None:
            code, message = self.script.create_error
            qr.state = "FAILED"
            qr.failed = {"code": code, "message": message.format(zone=parent.rsplit("/", 1)[1])}
        self.queued[name] = qr
        return self._new_operation(
            parent,
            lambda: True,
            lambda: {
                "@type": "type.googleapis.com/google.cloud.tpu.v2.QueuedResource",
                **self._queued_json(qr),
            },
        )

    def _delete_queued(self, name: str, force: bool) -> dict[str, Any]:
        qr = self._get_queued(name)
        node = self.nodes.get(qr.node_name)
        if node is not None:
            if not force:
                raise ApiError(
                    HTTPStatus.BAD_REQUEST,
                    "FAILED_PRECONDITION",
                    f"queued resource {name} has a node; delete it first or pass force",
                )
            self._kill_workers(node)
            del self.nodes[node.name]
        if self.script.delete_s > 0:
            qr.state, qr.change_at = "DELETING", time.monotonic() + self.script.delete_s
        else:
            del self.queued[name]
        parent = name.split("/queuedResources/")[0]
        return self._new_operation(parent, lambda: name not in self.queued, lambda: EMPTY)


# ---- workers: loopback sshd servers that die like VMs -----------------------------------------------------
VM_TAG_ENV = "GRPOCTL_FAKE_VM"  # sshd sets it in every session; what a session starts inherits it


def _tagged_pids(tag: str) -> list[int]:
    """Processes (other than us) whose environment carries `VM_TAG_ENV=tag`: everything the VM ran."""
    needle = f"{VM_TAG_ENV}={tag}\0".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def kill_vm_processes(tag: str) -> int:
    """SIGKILL every process of the fake VM `tag` (setsid/nohup jobs included); returns how many."""
    killed = 0
    for _ in range(5):  # a dying shell may fork once more: look again until nothing is left
        pids = _tagged_pids(tag)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        time.sleep(0.05)
    return killed


class SshdWorker:
    """A fake TPU VM host: its own sshd (own host keys, own HOME), killed with all it started.

    Logins are per user, as the guest agent makes them: `authorized_keys.d/<user>` holds the keys the
    ssh-keys metadata gives that user; an image that refuses root has `PermitRootLogin no`."""

    def __init__(
        self,
        root: Path,
        tag: str,
        session_env: dict[str, str] | None = None,
        *,
        host_key_types: tuple[str, ...] = ("ed25519",),
        root_login: bool = True,
    ) -> None:
        from grpoctl_testing.sshd import LoopbackSshd

        self.tag = tag
        self.home = root / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self._keys_dir = root / "sshd" / "authorized_keys.d"
        self._keys_dir.mkdir(parents=True, exist_ok=True)
        env = {**(session_env or {}), "HOME": str(self.home), VM_TAG_ENV: tag}
        self.sshd = LoopbackSshd(
            root / "sshd",
            session_env=env,
            extra_host_key_types=tuple(t for t in host_key_types if t != "ed25519"),
            authorized_keys_file=f"{self._keys_dir}/%u",
            permit_root_login="prohibit-password" if root_login else "no",
        )
        self.set_authorized_keys({})  # nobody gets in until the node's ssh-keys metadata says so
        self.sshd.start()
        self.port = self.sshd.port

    def host_public_key(self) -> str:
        return self.sshd.host_key_line

    def host_public_keys(self) -> list[str]:
        """`type AAAA...` of every host key the worker's sshd holds (what the guest agent publishes)."""
        return [" ".join(Path(f"{key}.pub").read_text().split()[:2]) for key in self.sshd.host_keys]

    def set_authorized_keys(self, by_user: dict[str, list[str]]) -> None:
        for old in self._keys_dir.iterdir():
            if old.name not in by_user and not old.name.endswith(".tmp"):
                old.unlink()
        for user, lines in by_user.items():
            tmp = self._keys_dir / f"{user}.tmp"
            tmp.write_text("".join(f"{line}\n" for line in lines))
            tmp.replace(self._keys_dir / user)  # sshd reads the file per login: swap it whole

    def kill(self) -> None:
        self.sshd.stop()
        kill_vm_processes(self.tag)


def _other_ed25519_key() -> str:
    """A fresh `ssh-ed25519 AAAA...` public key that no worker's sshd holds."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    public = Ed25519PrivateKey.generate().public_key()
    return public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def sshd_workers(base: Path, session_env: dict[str, str] | None = None) -> WorkerFactory:
    """Workers under `base`, a fresh folder (fresh disk, fresh host key) for every node incarnation.

    `session_env`: more variables for every SSH session on every worker (the rehearsal points pip at one
    cache shared by the VMs)."""
    incarnation = itertools.count()
    # The tag finds a VM's processes machine-wide: two fakes at once (two rehearsals, a CI job beside a
    # developer's) name their nodes alike, so the tag carries this factory's own token too.
    token = secrets.token_hex(4)

    def make(node_id: str, index: int, script: Script) -> FakeWorker:
        folder = f"{node_id}-{next(incarnation)}-w{index}"
        return SshdWorker(
            base / folder,
            f"{folder}.{token}",
            session_env,
            host_key_types=script.host_key_types,
            root_login=script.root_login,
        )

    return make
