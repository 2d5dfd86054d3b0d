"""A fake Cloud TPU v2 API on 127.0.0.1 (plain HTTP) that the real `google-cloud-tpu` REST client talks to.

It serves the JSON shapes of the real API (camelCase, `{"error": {...}}` bodies, long-running operations
at `/v2/{operation name}`) for nodes, queued resources and guest attributes, and can be scripted: slow
create, waiting for resources, preempt now, quota exhausted, accelerator type not offered, OS Login on,
SSH-key propagation delay. Every request is recorded so tests can assert what the client sent.

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

# Hosts per slice for the accelerator types tests use (v4 counts TensorCores: v4-16 is 2 hosts).
DEFAULT_HOSTS = {"v6e-1": 1, "v6e-4": 1, "v6e-8": 1, "v6e-16": 4, "v5litepod-8": 1, "v4-8": 1, "v4-16": 2}


class FakeWorker(Protocol):
    """One TPU VM host of a fake node."""

    port: int

    def host_public_key(self) -> str: ...  # "ssh-ed25519 AAAA..."

    def set_authorized_keys(self, lines: list[str]) -> None: ...

    def kill(self) -> None: ...  # the VM dies: its sshd and everything it started


WorkerFactory = Callable[[str, int], FakeWorker]  # (node id, worker index) -> a started worker


class ApiError(Exception):
    def __init__(self, http: HTTPStatus, status: str, message: str) -> None:
        super().__init__(message)
        self.http, self.status, self.message = http, status, message

    def body(self) -> dict[str, Any]:
        return {"error": {"code": int(self.http), "message": self.message, "status": self.status}}


GRPC_CODES = {"INVALID_ARGUMENT": 3, "NOT_FOUND": 5, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9}


@dataclass
class Script:
    """Knobs a test turns before (or while) the client acts."""

    create_s: float = 0.3  # time a node spends CREATING before READY
    wait_for_resources_s: float = 0.3  # a queued resource waits this long before PROVISIONING
    key_propagation_s: float = 0.0  # ssh-keys metadata reaches the workers' sshd after this delay
    offered_accelerator_types: set[str] = field(default_factory=lambda: set(DEFAULT_HOSTS))
    quota_exhausted: bool = False  # the next creates fail in their operation with RESOURCE_EXHAUSTED
    os_login: bool = False  # nodes report enable-oslogin=TRUE (as if inherited from the project)
    hosts: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_HOSTS))
    internal_ip: str = "127.0.0.1"  # what networkEndpoints report (the sshd workers listen on loopback)
    external_ip: str = "127.0.0.1"
    # Guest attributes publish a host key other than the one the worker's sshd offers (a man in the
    # middle, or a VM replaced behind the same address): a client that pins the published key must refuse.
    publish_other_host_keys: bool = False
    # A fresh VM's guest agent publishes its host keys a little after READY: none until this long after.
    host_keys_delay_s: float = 0.0


@dataclass
class FakeNode:
    name: str  # projects/P/locations/Z/nodes/N
    body: dict[str, Any]  # the create request body, camelCase
    state: str
    ready_at: float
    queued_resource: str = ""
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
        self.script = script or Script()
        self.worker_factory = worker_factory
        self.nodes: dict[str, FakeNode] = {}
        self.queued: dict[str, FakeQueued] = {}
        self.operations: dict[str, FakeOperation] = {}
        self.requests: list[RecordedRequest] = []
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

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
        """The spot VM is taken back now: workers die, the node shows PREEMPTED (its QR SUSPENDED)."""
        with self._lock:
            node = self._node_by_id(node_id)
            node.state = "PREEMPTED"
            self._kill_workers(node)
            if node.queued_resource and node.queued_resource in self.queued:
                self.queued[node.queued_resource].state = "SUSPENDED"

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
            if qr.state in ("ACCEPTED", "WAITING_FOR_RESOURCES") and now >= qr.provision_at:
                qr.state = "PROVISIONING"
                spec = qr.body["tpu"]["nodeSpec"][0]
                qr.node_name = f"{spec['parent']}/nodes/{spec['nodeId']}"
                self._new_node(qr.node_name, spec.get("node", {}), queued_resource=qr.name)
            elif qr.state == "ACCEPTED":
                qr.state = "WAITING_FOR_RESOURCES"
        for node in self.nodes.values():
            if node.state == "CREATING" and now >= node.ready_at:
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
        node.workers = [self.worker_factory(node.node_id, i) for i in range(count)]
        keys = self._ssh_key_lines(node.body)
        for w in node.workers:
            w.set_authorized_keys(keys)

    def _kill_workers(self, node: FakeNode) -> None:
        for w in node.workers:
            w.kill()
        node.workers = []

    @staticmethod
    def _ssh_key_lines(body: dict[str, Any]) -> list[str]:
        """`user:ssh-ed25519 AAAA comment` lines of the ssh-keys metadata -> authorized_keys lines."""
        text = body.get("metadata", {}).get("ssh-keys", "")
        return [line.split(":", 1)[1].strip() for line in text.splitlines() if ":" in line]

    # ---- JSON views ----------------------------------------------------------------------------------
    def _node_json(self, node: FakeNode) -> dict[str, Any]:
        body = dict(node.body)
        metadata = dict(body.get("metadata", {}))
        if self.script.os_login:
            metadata["enable-oslogin"] = "TRUE"
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
            state=node.state,
            metadata=metadata,
            createTime=node.create_time,
            apiVersion="V2",
            id=str(abs(hash(node.name)) % 10**12),
        )
        if node.state == "READY":
            body.update(health="HEALTHY", networkEndpoints=endpoints)
        if node.queued_resource:
            body["queuedResource"] = node.queued_resource
        return body

    def _queued_json(self, qr: FakeQueued) -> dict[str, Any]:
        return {**qr.body, "name": qr.name, "state": {"state": qr.state}}

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
            try:
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
        parent, collection = "/".join(parts[:4]), parts[4]
        one = len(parts) == 6
        q = {k: v[0] for k, v in query.items()}
        match (collection, method, one, verb):
            case ("nodes", "POST", False, ""):
                return self._create_node(parent, q.get("nodeId", ""), body)
            case ("nodes", "GET", False, ""):
                return {
                    "nodes": [self._node_json(n) for n in self.nodes.values() if n.name.startswith(parent)]
                }
            case ("nodes", "GET", True, ""):
                return self._node_json(self._get_node(name))
            case ("nodes", "DELETE", True, ""):
                return self._delete_node(name)
            case ("nodes", "PATCH", True, ""):
                return self._update_node(name, q.get("updateMask", ""), body)
            case ("nodes", "POST", True, "getGuestAttributes"):
                return self._guest_attributes(name, body)
            case ("queuedResources", "POST", False, ""):
                return self._create_queued(parent, q.get("queuedResourceId", ""), body)
            case ("queuedResources", "GET", False, ""):
                items = [self._queued_json(r) for r in self.queued.values() if r.name.startswith(parent)]
                return {"queuedResources": items}
            case ("queuedResources", "GET", True, ""):
                return self._queued_json(self._get_queued(name))
            case ("queuedResources", "DELETE", True, ""):
                return self._delete_queued(name, q.get("force") == "true")
            case ("operations", "GET", True, ""):
                return self._operation_json(name)
        raise ApiError(HTTPStatus.NOT_FOUND, "NOT_FOUND", f"{method} {path} is not served by the fake")

    @staticmethod
    def _check_zone(zone: str) -> None:
        if zone.count("-") != 2:
            raise ApiError(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT", f"Invalid location: {zone}")

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

    def _new_operation(
        self, parent: str, done_when: Callable[[], bool], result: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        op = FakeOperation(f"{parent}/operations/operation-{next(self._ids)}", done_when, result)
        self.operations[op.name] = op
        return self._operation_json(op.name)

    def _failed_operation(self, parent: str, status: str, message: str) -> dict[str, Any]:
        op = FakeOperation(f"{parent}/operations/operation-{next(self._ids)}", lambda: True, lambda: {})
        op.error = {"code": GRPC_CODES[status], "message": message}
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
        self._check_accelerator(parent, body.get("acceleratorType", ""))
        name = f"{parent}/nodes/{node_id}"
        if name in self.nodes:
            raise ApiError(HTTPStatus.CONFLICT, "ALREADY_EXISTS", f'Resource "{name}" already exists')
        if self.script.quota_exhausted:
            chips = body.get("acceleratorType", "?")
            return self._failed_operation(
                parent,
                "RESOURCE_EXHAUSTED",
                f"Quota 'TPUV6EPreemptiblePodPerProjectPerZone' exceeded for {chips}",
            )
        node = self._new_node(name, body)
        return self._new_operation(
            parent, lambda: node.state != "CREATING", lambda: _node_type(self._node_json(node))
        )

    def _delete_node(self, name: str) -> dict[str, Any]:
        node = self._get_node(name)
        self._kill_workers(node)
        del self.nodes[name]
        parent = name.split("/nodes/")[0]
        return self._new_operation(parent, lambda: True, lambda: EMPTY)

    def _update_node(self, name: str, mask: str, body: dict[str, Any]) -> dict[str, Any]:
        node = self._get_node(name)
        fields = [f for f in mask.split(",") if f]
        if fields != ["metadata"]:
            raise ApiError(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT", f"unsupported update mask {mask!r}")
        # enable-oslogin is the project's (added by the JSON view), not the node's own metadata
        node.body["metadata"] = {k: v for k, v in body.get("metadata", {}).items() if k != "enable-oslogin"}
        keys = self._ssh_key_lines(node.body)

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
        out = []
        if time.monotonic() < node.ready_at + self.script.host_keys_delay_s:
            return {"guestAttributes": []}
        for w in node.workers:
            key_type, key = w.host_public_key().split()[:2]
            if self.script.publish_other_host_keys:
                key_type, key = _other_ed25519_key().split()[:2]
            items = [{"namespace": "hostkeys", "key": key_type, "value": key}]
            out.append({"queryPath": body.get("queryPath", ""), "queryValue": {"items": items}})
        return {"guestAttributes": out}

    def _create_queued(self, parent: str, qr_id: str, body: dict[str, Any]) -> dict[str, Any]:
        if not qr_id:
            raise ApiError(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT", "queuedResourceId is required")
        name = f"{parent}/queuedResources/{qr_id}"
        if name in self.queued:
            raise ApiError(HTTPStatus.CONFLICT, "ALREADY_EXISTS", f'Resource "{name}" already exists')
        spec = body.get("tpu", {}).get("nodeSpec", [])
        if len(spec) != 1:
            raise ApiError(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT", "exactly one nodeSpec is supported")
        self._check_accelerator(parent, spec[0].get("node", {}).get("acceleratorType", ""))
        qr = FakeQueued(name, body, "ACCEPTED", time.monotonic() + self.script.wait_for_resources_s)
        if self.script.quota_exhausted:
            qr.state = "FAILED"
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
        del self.queued[name]
        parent = name.split("/queuedResources/")[0]
        return self._new_operation(parent, lambda: True, lambda: EMPTY)


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
    """A fake TPU VM host: its own sshd (own host key, own HOME), killed with all it started."""

    def __init__(self, root: Path, tag: str, session_env: dict[str, str] | None = None) -> None:
        from orchestrator.testing.sshd import LoopbackSshd

        self.tag = tag
        self.home = root / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self._authorized = root / "sshd" / "authorized_keys"
        env = {**(session_env or {}), "HOME": str(self.home), VM_TAG_ENV: tag}
        self.sshd = LoopbackSshd(root / "sshd", session_env=env)
        self.set_authorized_keys([])  # nobody gets in until the node's ssh-keys metadata says so
        self.sshd.start()
        self.port = self.sshd.port

    def host_public_key(self) -> str:
        return self.sshd.host_key_line

    def set_authorized_keys(self, lines: list[str]) -> None:
        tmp = self._authorized.with_suffix(".tmp")
        tmp.write_text("".join(f"{line}\n" for line in lines))
        tmp.replace(self._authorized)  # sshd reads the file per login: swap it whole

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

    def make(node_id: str, index: int) -> FakeWorker:
        tag = f"{node_id}-{next(incarnation)}-w{index}"
        return SshdWorker(base / tag, tag, session_env)

    return make
