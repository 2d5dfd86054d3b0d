"""`grpoctl gc`: find and delete grpoctl's leftovers that hold quota but will never run a job again."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.cloud import api as cloud
from orchestrator.cloud.policy import READ_RETRY
from orchestrator.config import GrpoctlConfig, TpuTargetConfig
from orchestrator.errors import UsageError
from orchestrator.retry import Backoff

DEAD_NODES = ("PREEMPTED", "TERMINATED")
DEAD_QUEUED = ("FAILED", "SUSPENDED")


@dataclass(frozen=True)
class Leftover:
    kind: str  # "node" or "queued resource"
    name: str  # short name
    state: str
    zone: str


def find_leftovers(api: cloud.TpuApi) -> list[Leftover]:
    """grpoctl-labelled nodes that are PREEMPTED/TERMINATED and queued resources FAILED/SUSPENDED."""
    out = []
    for qr in api.list_queued():
        specs = list(qr.tpu.node_spec)
        labelled = any(cloud.is_grpoctl(s.node.labels) for s in specs)
        if labelled and cloud.queued_state_name(qr) in DEAD_QUEUED:
            out.append(
                Leftover("queued resource", qr.name.rsplit("/", 1)[1], cloud.queued_state_name(qr), api.zone)
            )
    taken = {x.name for x in out}  # deleting a queued resource (force) takes its node along
    for node in api.list_nodes():
        short = node.name.rsplit("/", 1)[1]
        if cloud.is_grpoctl(node.labels) and cloud.state_name(node) in DEAD_NODES and short not in taken:
            queued = node.queued_resource.rsplit("/", 1)[-1] if node.queued_resource else ""
            if queued and queued not in taken:
                out.append(Leftover("queued resource", queued, f"node {cloud.state_name(node)}", api.zone))
                taken.add(queued)
            elif not queued:
                out.append(Leftover("node", short, cloud.state_name(node), api.zone))
    return out


def delete_leftover(
    api: cloud.TpuApi, item: Leftover, *, timeout_s: float = 600, poll_s: float = 5.0
) -> None:
    op = api.delete_node(item.name) if item.kind == "node" else api.delete_queued(item.name, force=True)
    cloud.wait_operation(op, f"delete {item.kind} {item.name}", timeout_s=timeout_s, poll_s=poll_s)


def find_all(
    config: GrpoctlConfig, target: str | None = None, *, read_retry: Backoff = READ_RETRY
) -> list[tuple[cloud.TpuApi, Leftover]]:
    """Leftovers in every project/zone the config's tpu targets use (or only `target`'s); reads back off
    by `read_retry` (a stand-in service's wiring: a quicker one)."""
    tpus = {n: t for n, t in config.targets.items() if isinstance(t, TpuTargetConfig)}
    if target is not None:
        _, chosen = config.target(target)
        if not isinstance(chosen, TpuTargetConfig):
            raise UsageError(f"target {target!r} is not a tpu target: nothing to collect")
        tpus = {target: chosen}
    if not tpus:
        raise UsageError(f"no tpu targets in {config.source}: nothing to collect")
    places = sorted({(t.project, z, t.api_endpoint or "") for t in tpus.values() for z in t.all_zones()})
    found = []
    for project, zone, endpoint in places:
        api = cloud.TpuApi(project, zone, api_endpoint=endpoint or None, read_retry=read_retry)
        found += [(api, x) for x in find_leftovers(api)]
    return found
