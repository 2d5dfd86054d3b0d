"""A thin layer over `google.cloud.tpu_v2`: what grpoctl asks of the Cloud TPU API, with explicit waits.

Messages are built by small pure functions (`node_message`, `queued_resource_message`,
`merge_ssh_keys`); `TpuApi` does the calls and maps every API error to a one-line grpoctl error.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from google.api_core import exceptions as gexc
from google.api_core.operation import Operation
from google.cloud import tpu_v2
from google.protobuf import duration_pb2

from orchestrator.cloud.client import api_error, build_client
from orchestrator.errors import InfraError

# Every resource grpoctl creates carries this label; `grpoctl gc` only ever touches labelled ones.
LABEL_KEY = "managed-by"
LABEL_VALUE = "grpoctl"
SSH_KEYS = "ssh-keys"
OS_LOGIN = "enable-oslogin"
CALL_TIMEOUT_S = 60.0  # one HTTP call; the long waits are our own polling loops

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


def node_message(req: NodeRequest, *, spot_in_node: bool = True) -> tpu_v2.Node:
    """The Node to create. In a queued resource spot goes on the resource itself (`spot_in_node=False`)."""
    return tpu_v2.Node(
        accelerator_type=req.accelerator_type,
        runtime_version=req.runtime_version,
        scheduling_config=tpu_v2.SchedulingConfig(spot=req.spot and spot_in_node),
        labels={**req.labels, LABEL_KEY: LABEL_VALUE},
        metadata={SSH_KEYS: req.ssh_keys} if req.ssh_keys else {},
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


def os_login_enabled(metadata: dict[str, str]) -> bool:
    return metadata.get(OS_LOGIN, "").strip().lower() in ("true", "1", "yes")


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
        self, project: str, zone: str, *, api_endpoint: str | None = None, client: Any = None
    ) -> None:
        self.project, self.zone = project, zone
        self.parent = f"projects/{project}/locations/{zone}"
        self.client: tpu_v2.TpuClient = client if client is not None else build_client(api_endpoint)

    def node_path(self, name: str) -> str:
        return f"{self.parent}/nodes/{name}"

    def queued_path(self, name: str) -> str:
        return f"{self.parent}/queuedResources/{name}"

    def _call(
        self, action: str, fn: Callable[..., T], *args: Any, missing_ok: bool = False, **kwargs: Any
    ) -> T:
        """`fn(...)` with a timeout; with `missing_ok` a NotFound returns None instead of raising."""
        try:
            return fn(*args, timeout=CALL_TIMEOUT_S, **kwargs)
        except gexc.NotFound as err:
            if missing_ok:
                return None  # type: ignore[return-value]
            raise api_error(err, action) from None
        except gexc.GoogleAPICallError as err:
            raise api_error(err, action) from None
        except (gexc.RetryError, OSError) as err:
            raise InfraError(f"{action}: cannot reach the Cloud TPU API ({type(err).__name__})") from None

    # ---- nodes ----------------------------------------------------------------------------------------
    def get_node(self, name: str) -> tpu_v2.Node | None:
        return self._call(
            f"get node {name}", self.client.get_node, name=self.node_path(name), missing_ok=True
        )

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

    def set_metadata(self, node: tpu_v2.Node, metadata: dict[str, str]) -> Operation:
        """Replace the node's metadata with `metadata` (callers merge: existing keys are kept)."""
        patch = tpu_v2.Node(name=node.name, metadata=metadata)
        return self._call(
            f"update metadata of {node.name.rsplit('/', 1)[-1]}",
            self.client.update_node,
            node=patch,
            update_mask={"paths": ["metadata"]},
        )

    def host_keys(self, name: str) -> list[dict[str, str]]:
        """Per worker (in index order), the SSH host keys the VM published: {key type: base64 key}."""
        resp = self._call(
            f"read guest attributes of {name}",
            self.client.get_guest_attributes,
            request=tpu_v2.GetGuestAttributesRequest(name=self.node_path(name), query_path="hostkeys/"),
        )
        out = []
        for attrs in resp.guest_attributes:
            keys = {}
            for item in attrs.query_value.items:
                if item.namespace == "hostkeys" and item.value:
                    keys[item.key] = _key_blob(item.key, item.value)
            out.append(keys)
        return out

    def list_nodes(self) -> list[tpu_v2.Node]:
        pager = self._call(f"list nodes in {self.zone}", self.client.list_nodes, parent=self.parent)
        return list(_pages(pager))

    # ---- queued resources -----------------------------------------------------------------------------
    def get_queued(self, name: str) -> tpu_v2.QueuedResource | None:
        return self._call(
            f"get queued resource {name}",
            self.client.get_queued_resource,
            name=self.queued_path(name),
            missing_ok=True,
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
        pager = self._call(
            f"list queued resources in {self.zone}", self.client.list_queued_resources, parent=self.parent
        )
        return list(_pages(pager))


def _key_blob(key_type: str, value: str) -> str:
    """The base64 part of a published host key ("AAAA..." from the guest agent, or "type AAAA...")."""
    tokens = value.split()
    return tokens[1] if len(tokens) > 1 and tokens[0] == key_type else tokens[0]


def _pages(pager: Any) -> Iterator[Any]:
    try:
        yield from pager
    except gexc.GoogleAPICallError as err:
        raise api_error(err, "list") from None


def wait_operation(op: Operation, action: str, *, timeout_s: float, poll_s: float = 2.0) -> Any:
    """Poll `op` until done (our own loop: Ctrl-C lands between polls); raise a grpoctl error on failure."""
    deadline = time.monotonic() + timeout_s
    try:
        while not op.done():
            if time.monotonic() > deadline:
                raise InfraError(f"{action}: still running after {timeout_s:.0f} s ({op.operation.name})")
            time.sleep(poll_s)
        return op.result(timeout=0)
    except gexc.GoogleAPICallError as err:
        raise api_error(err, action) from None
