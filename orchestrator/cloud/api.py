"""A thin layer over `google.cloud.tpu_v2`: what grpoctl asks of the Cloud TPU API, with explicit waits.

Messages are built by small pure functions (`node_message`, `queued_resource_message`,
`merge_ssh_keys`); `TpuApi` does the calls and maps every API error to a one-line grpoctl error
(cloud/errors.py). Reads (get, list, guest attributes, operation polls, project metadata) are retried
on transient errors (5xx, 429, a dropped connection) with backoff and jitter (orchestrator/retry.py):
the client has no default retry for them, and a 30-minute wait makes hundreds. Creates and deletes are
not retried (not idempotent); a read that keeps failing raises `TransientApiError`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from google.api_core import exceptions as gexc
from google.api_core import retry as gretry
from google.api_core.operation import Operation
from google.auth import exceptions as auth_exc
from google.cloud import tpu_v2
from google.protobuf import duration_pb2

from orchestrator.cloud.client import build_client, build_session, compute_base
from orchestrator.cloud.errors import TransientApiError, api_error, is_transient
from orchestrator.cloud.policy import READ_RETRY
from orchestrator.errors import GrpoctlError, InfraError
from orchestrator.retry import Backoff, poll_until, retry_call

# Every resource grpoctl creates carries this label; `grpoctl gc` only ever touches labelled ones.
LABEL_KEY = "managed-by"
LABEL_VALUE = "grpoctl"
SSH_KEYS = "ssh-keys"
OS_LOGIN = "enable-oslogin"
CALL_TIMEOUT_S = 60.0  # one HTTP call; the long waits are our own polling loops
# The errors one API call can end with (credentials errors are neither of the other two).
CALL_ERRORS = (gexc.GoogleAPICallError, gexc.RetryError, OSError, auth_exc.GoogleAuthError)

T = TypeVar("T")


@dataclass(frozen=True)
class NodeRequest:
    """What to create: the parts of `TpuTargetConfig` that reach the API."""

    accelerator_type: str
    runtime_version: str
    spot: bool
    labels: dict[str, str] = field(default_factory=dict)
    ssh_keys: str = ""  # "user:ssh-ed25519 AAAA... user"
    internal_ip: bool = False
    # OS Login is on in the project: the node's own metadata turns it off so ssh-keys work
    os_login_off: bool = False


def node_message(req: NodeRequest, *, spot_in_node: bool = True) -> tpu_v2.Node:
    """The Node to create. In a queued resource spot goes on the resource itself (`spot_in_node=False`)."""
    return tpu_v2.Node(
        accelerator_type=req.accelerator_type,
        runtime_version=req.runtime_version,
        scheduling_config=tpu_v2.SchedulingConfig(spot=req.spot and spot_in_node),
        labels={**req.labels, LABEL_KEY: LABEL_VALUE},
        metadata={
            **({SSH_KEYS: req.ssh_keys} if req.ssh_keys else {}),
            **({OS_LOGIN: "FALSE"} if req.os_login_off else {}),
        },
        network_config=tpu_v2.NetworkConfig(enable_external_ips=not req.internal_ip),
    )


def queued_resource_message(
    parent: str, node_id: str, req: NodeRequest, valid_until_s: int | None
) -> tpu_v2.QueuedResource:
    qr = tpu_v2.QueuedResource(
        tpu=tpu_v2.QueuedResource.Tpu(
            node_spec=[
                tpu_v2.QueuedResource.Tpu.NodeSpec(
                    parent=parent, node_id=node_id, node=node_message(req, spot_in_node=False)
                )
            ]
        )
    )
    if req.spot:
        qr.spot = tpu_v2.QueuedResource.Spot()
    if valid_until_s:
        qr.queueing_policy = tpu_v2.QueuedResource.QueueingPolicy(
            valid_until_duration=duration_pb2.Duration(seconds=valid_until_s)
        )
    return qr


def merge_ssh_keys(existing: str, line: str) -> str | None:
    """`existing` ssh-keys metadata with `line` added; None when the key is already there."""
    key = line.split(":", 1)[-1].split()[:2]
    for old in existing.splitlines():
        if old.split(":", 1)[-1].split()[:2] == key and old.split(":", 1)[0] == line.split(":", 1)[0]:
            return None
    return "\n".join([*(x for x in existing.splitlines() if x.strip()), line])


def os_login_setting(metadata: dict[str, str]) -> bool | None:
    """`enable-oslogin` of a metadata map: True, False, or None when it is not set there."""
    value = metadata.get(OS_LOGIN, "").strip().lower()
    if not value:
        return None
    return value in ("true", "1", "yes")


def os_login_enabled(metadata: dict[str, str], project_default: bool | None = False) -> bool:
    """Whether the guest agent of a node with this metadata uses OS Login: the node's own setting wins
    over the project's (Compute Engine's rule: instance metadata overrides project metadata)."""
    own = os_login_setting(metadata)
    return bool(project_default) if own is None else own


def state_name(node: tpu_v2.Node) -> str:
    return tpu_v2.Node.State(node.state).name


def health_name(node: tpu_v2.Node) -> str:
    return tpu_v2.Node.Health(node.health).name


def queued_state_name(qr: tpu_v2.QueuedResource) -> str:
    return tpu_v2.QueuedResourceState.State(qr.state.state).name


def is_grpoctl(labels: Any) -> bool:
    return dict(labels).get(LABEL_KEY) == LABEL_VALUE


class TpuApi:
    """Nodes and queued resources in one project and zone."""

    def __init__(
        self,
        project: str,
        zone: str,
        *,
        api_endpoint: str | None = None,
        client: Any = None,
        sleep: Callable[[float], None] = time.sleep,
        read_retry: Backoff = READ_RETRY,
    ) -> None:
        self.project, self.zone = project, zone
        self.parent = f"projects/{project}/locations/{zone}"
        self.api_endpoint = api_endpoint
        self.client: tpu_v2.TpuClient = client if client is not None else build_client(api_endpoint)
        self.sleep = sleep  # between read retries (a test's fake clock)
        self.read_retry = read_retry  # how reads back off (a stand-in that answers at once: a quicker one)
        self.retries = 0  # transient read errors met and retried (for reports and tests)

    def node_path(self, name: str) -> str:
        return f"{self.parent}/nodes/{name}"

    def queued_path(self, name: str) -> str:
        return f"{self.parent}/queuedResources/{name}"

    def _error(self, err: BaseException, action: str) -> Exception:
        return api_error(err, action, project=self.project, zone=self.zone)

    def _call(self, action: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(...)` once, with a timeout (creates, deletes, updates: not idempotent, never retried)."""
        try:
            return fn(*args, timeout=CALL_TIMEOUT_S, **kwargs)
        except CALL_ERRORS as err:
            raise self._error(err, action) from None

    def read(self, action: str, fn: Callable[[], T], *, missing_ok: bool = False) -> T:
        """`fn()`, an idempotent read, retried on transient errors; see `read_with_retry`."""

        def counted(attempt: int, err: BaseException, delay: float) -> None:
            self.retries += 1

        return read_with_retry(
            action, fn, missing_ok=missing_ok, sleep=self.sleep, error=self._error, on_retry=counted,
            policy=self.read_retry,
        )

    def _get(self, action: str, fn: Callable[..., T], **kwargs: Any) -> T:
        return self.read(action, lambda: fn(timeout=CALL_TIMEOUT_S, **kwargs), missing_ok=True)

    def poll(self, op: Operation, action: str) -> bool:
        """`op.done()` (a read of the operation), retried like every read."""
        return self.read(action, lambda: _done_once(op))

    def project_os_login(self) -> bool | None:
        """`enable-oslogin` of the project's metadata (Compute Engine `projects.get`, the API that holds
        it): True, False (also when unset), or None when it cannot be read (Compute API off, no
        permission: the caller then explains the first failed login instead)."""
        url = f"{compute_base(self.api_endpoint)}/compute/v1/projects/{self.project}"

        def get() -> dict[str, Any]:
            resp = build_session(self.api_endpoint).get(url, timeout=CALL_TIMEOUT_S)
            if resp.status_code != 200:
                raise gexc.from_http_response(resp)
            return resp.json()

        try:
            project = self.read(f"read the metadata of project {self.project}", get)
        except GrpoctlError:  # permission, API off, unreachable: unknown
            return None
        items = project.get("commonInstanceMetadata", {}).get("items", [])
        return bool(os_login_setting({i.get("key", ""): i.get("value", "") for i in items}))

    # ---- nodes ----------------------------------------------------------------------------------------
    def get_node(self, name: str) -> tpu_v2.Node | None:
        return self._get(f"get node {name}", self.client.get_node, name=self.node_path(name))

    def create_node(self, name: str, req: NodeRequest) -> Operation:
        return self._call(
            f"create node {name} ({req.accelerator_type} in {self.zone})",
            self.client.create_node,
            parent=self.parent,
            node_id=name,
            node=node_message(req),
        )

    def delete_node(self, name: str) -> Operation:
        return self._call(f"delete node {name}", self.client.delete_node, name=self.node_path(name))

    def start_node(self, name: str) -> Operation:
        return self._call(
            f"start node {name}",
            self.client.start_node,
            request=tpu_v2.StartNodeRequest(name=self.node_path(name)),
        )

    def set_metadata(self, node: tpu_v2.Node, metadata: dict[str, str]) -> Operation:
        """Replace the node's metadata with `metadata` (callers merge: existing keys are kept)."""
        patch = tpu_v2.Node(name=node.name, metadata=metadata)
        return self._call(
            f"update metadata of {node.name.rsplit('/', 1)[-1]}",
            self.client.update_node,
            node=patch,
            update_mask={"paths": ["metadata"]},
        )

    def host_keys(self, name: str) -> list[dict[str, str]] | None:
        """Per worker (in index order), the SSH host keys the VM published: {key type: base64 key}.
        None while nothing is published (the API answers 404 until the guest agent writes them)."""
        request = tpu_v2.GetGuestAttributesRequest(name=self.node_path(name), query_path="hostkeys/")
        resp = self._get(
            f"read guest attributes of {name}", self.client.get_guest_attributes, request=request
        )
        if resp is None:
            return None
        out = []
        for attrs in resp.guest_attributes:
            keys = {}
            for item in attrs.query_value.items:
                if item.namespace == "hostkeys" and item.value:
                    keys[item.key] = _key_blob(item.key, item.value)
            out.append(keys)
        return out

    def list_nodes(self) -> list[tpu_v2.Node]:
        """Every node of the zone: all pages (the pager fetches them), the whole list again on an error."""
        return self.read(
            f"list nodes in {self.zone}",
            lambda: list(self.client.list_nodes(parent=self.parent, timeout=CALL_TIMEOUT_S)),
        )

    # ---- queued resources -----------------------------------------------------------------------------
    def get_queued(self, name: str) -> tpu_v2.QueuedResource | None:
        return self._get(
            f"get queued resource {name}", self.client.get_queued_resource, name=self.queued_path(name)
        )

    def create_queued(
        self, name: str, node_id: str, req: NodeRequest, valid_until_s: int | None
    ) -> Operation:
        return self._call(
            f"create queued resource {name} ({req.accelerator_type} in {self.zone})",
            self.client.create_queued_resource,
            parent=self.parent,
            queued_resource_id=name,
            queued_resource=queued_resource_message(self.parent, node_id, req, valid_until_s),
        )

    def delete_queued(self, name: str, *, force: bool = True) -> Operation:
        """Delete the queued resource; `force` also deletes its node (otherwise the API refuses)."""
        return self._call(
            f"delete queued resource {name}",
            self.client.delete_queued_resource,
            request=tpu_v2.DeleteQueuedResourceRequest(name=self.queued_path(name), force=force),
        )

    def list_queued(self) -> list[tpu_v2.QueuedResource]:
        return self.read(
            f"list queued resources in {self.zone}",
            lambda: list(self.client.list_queued_resources(parent=self.parent, timeout=CALL_TIMEOUT_S)),
        )


def _key_blob(key_type: str, value: str) -> str:
    """The base64 part of a published host key ("AAAA..." from the guest agent, or "type AAAA...")."""
    tokens = value.split()
    return tokens[1] if len(tokens) > 1 and tokens[0] == key_type else tokens[0]


def _one_line(err: BaseException) -> str:
    text = " ".join(str(getattr(err, "message", "") or err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def read_with_retry(
    action: str,
    fn: Callable[[], T],
    *,
    missing_ok: bool = False,
    sleep: Callable[[float], None] = time.sleep,
    error: Callable[[BaseException, str], Exception] = api_error,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
    policy: Backoff = READ_RETRY,
) -> T:
    """`fn()`, an idempotent read, retried on transient errors (`policy`, READ_RETRY unless the client
    says otherwise), then one grpoctl error: `TransientApiError` when the errors stayed transient. With
    `missing_ok` a NotFound returns None."""
    try:
        return retry_call(fn, retry_on=is_transient, policy=policy, sleep=sleep, on_retry=on_retry)
    except gexc.NotFound as err:
        if missing_ok:
            return None  # type: ignore[return-value]
        raise error(err, action) from None
    except CALL_ERRORS as err:
        if is_transient(err):
            raise TransientApiError(
                f"{action}: the Cloud TPU API kept failing ({policy.attempts} tries, last: "
                f"{_one_line(err)}); nothing was deleted: try again"
            ) from None
        raise error(err, action) from None


# api-core refreshes an operation with its own default retry (transient errors, backoff 1 s doubling up to
# 120 s) unless given one: under our read retry that hid up to minutes of waiting inside each "try", so
# the read policy's attempts and the "kept failing (N tries)" message meant nothing. One retry layer: ours.
_ONE_TRY = gretry.Retry(predicate=lambda _: False)


def _done_once(op: Operation) -> bool:
    return bool(op.done(retry=_ONE_TRY))


def operation_done(op: Operation, action: str, api: TpuApi | None = None) -> bool:
    """`op.done()`, a read of the operation: retried on transient errors (with `api`'s sleep)."""
    return api.poll(op, action) if api is not None else read_with_retry(action, lambda: _done_once(op))


def wait_operation(
    op: Operation, action: str, *, timeout_s: float, poll_s: float = 2.0, api: TpuApi | None = None
) -> Any:
    """Poll `op` until done (our own loop: Ctrl-C lands between polls); raise a grpoctl error on failure.
    Polls are reads: transient errors are retried (`api`'s sleep and error context when given)."""
    poll_until(
        lambda: operation_done(op, action, api) or None,
        timeout_s=timeout_s,
        poll_s=poll_s,
        on_timeout=lambda: InfraError(
            f"{action}: still running after {timeout_s:.0f} s ({op.operation.name})"
        ),
    )
    try:
        return op.result(timeout=0)
    except CALL_ERRORS as err:
        raise (api._error(err, action) if api is not None else api_error(err, action)) from None
