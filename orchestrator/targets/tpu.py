"""TpuTarget: a Cloud TPU VM (one or more workers) created or attached through the Cloud TPU API.

`up` is idempotent: READY node -> attach (adding our SSH key to its metadata if needed); missing, preempted
or terminated -> create it (or its queued resource) and wait, showing each state; anything this call
created is deleted again if the wait is interrupted, times out or ends unusable. Workers are reached over
SSH without gcloud: our own ed25519 key in the `ssh-keys` metadata and host keys pinned from the
guest attributes (or the user's `host_key_sha256`).
"""

from __future__ import annotations

import getpass
import sys  # only to ask whether stderr is a terminal (the live spinner); lines go to `say`
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TypeVar

from google.cloud import tpu_v2
from rich.console import Console
from rich.status import Status

from orchestrator.cloud import api as cloud
from orchestrator.cloud import autodelete
from orchestrator.cloud.errors import TransientApiError, classify, kind_of, status_error
from orchestrator.cloud.sshkeys import ensure_key, fingerprint_of, metadata_line
from orchestrator.cloud.stale import clear_stale_tpu_users
from orchestrator.config import NotifyConfig, RepoConfig, TpuTargetConfig
from orchestrator.errors import AuthError, GrpoctlError, HostKeyError, InfraError, RunStopped, UsageError
from orchestrator.retry import poll_until, retry_call
from orchestrator.targets.base import Condition, Machine, Say, Target, TargetState, Worker, say_nothing
from orchestrator.targets.topology import pins_per_host
from orchestrator.targets.tpu_wiring import REAL_TPU_VM, TpuWiring
from orchestrator.transport.base import Transport
from orchestrator.transport.ssh import SshTransport

# Node states after which the node will never run our job again: recreate it.
DEAD_NODE_STATES = ("PREEMPTED", "TERMINATED")
DEAD_QUEUED_STATES = ("SUSPENDED", "SUSPENDING", "FAILED")
WAITING_QUEUED_STATES = ("ACCEPTED", "WAITING_FOR_RESOURCES")  # the ledger's waiting_for_capacity
# What `up` does with every other state (the API has 16): wait it out, start the node, or give up.
# READY counts only with a health that is not UNHEALTHY_MAINTENANCE (a maintenance event is running).
WAIT_NODE_STATES = (
    "CREATING", "STARTING", "RESTARTING", "REPAIRING", "REIMAGING", "UNHIDING", "STOPPING",
    "STATE_UNSPECIFIED", "UNKNOWN",
)  # fmt: skip
START_NODE_STATES = ("STOPPED",)  # stopped (by a person): `up` starts it again
GONE_NODE_STATES = ("DELETING", "HIDING", "HIDDEN")  # going away: never usable again
MAINTENANCE = "UNHEALTHY_MAINTENANCE"
STOPPED_NODE_STATES = ("STOPPED", "STOPPING")
HEALTHY = ("HEALTHY", "HEALTH_UNSPECIFIED")

T = TypeVar("T")


class TpuTarget(Target):
    def __init__(
        self,
        name: str,
        cfg: TpuTargetConfig,
        repo_cfg: RepoConfig,
        *,
        accept_new_host_key: bool = False,
        api: cloud.TpuApi | None = None,
        say: Say = say_nothing,
        wiring: TpuWiring = REAL_TPU_VM,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.remote_dir = repo_cfg.remote_dir
        self.python = cfg.python
        self.say = say  # node states, deletions, stale chip users: the caller renders them
        self.wiring = wiring  # the VM's insides: a real node's unless a stand-in service says otherwise
        self.bootstrap_extras = wiring.bootstrap_extras
        self.coordinator_port = wiring.coordinator_port
        # `--attach-any`: attach to an existing node of another accelerator type or spot-ness (with a
        # warning) instead of refusing it.
        self.attach_any = False
        self._accept_new = accept_new_host_key
        self._api = api
        self._node: tpu_v2.Node | None = None
        self._transports: list[Transport] | None = None
        self._create_op: cloud.Operation | None = None  # the node create this `up` started
        self._zone: str | None = None if api is None else cfg.zone  # where the node is (zones: looked up)
        self._spot = cfg.spot is not False  # this attempt's: "prefer" starts with spot
        self.notify: NotifyConfig | None = None  # grpoctl.yaml's, for the watchdog's node_deleted message
        self.capacity_wait_s = 0.0  # of the last `up`: queued and waiting for resources, or stocked out
        self._project_os_login: bool | None = None  # enable-oslogin of the project metadata (None: unknown)
        self._started_node = False  # this `up` asked a STOPPED node to start

    # ---- the API ------------------------------------------------------------------------------------
    @property
    def api(self) -> cloud.TpuApi:
        if self._api is None:  # built on first use: `status` of other targets never needs credentials
            self._api = cloud.TpuApi(
                self.cfg.project, self.zone, api_endpoint=self.cfg.api_endpoint,
                read_retry=self.wiring.read_retry,
            )
        return self._api

    @property
    def node_label(self) -> str:
        return f"node {self.cfg.name} ({self.cfg.accelerator_type}, {self.zone})"

    @property
    def zone(self) -> str:
        """The zone the node is in: `zone`, or with `zones` the first where it (or its queued resource)
        exists, so every later command finds a node that `up` made in a fallback zone."""
        if self._zone is None:
            self._zone = self.cfg.zone
            if self.cfg.zones:
                for zone in self.cfg.all_zones():
                    api = cloud.TpuApi(
                        self.cfg.project, zone, api_endpoint=self.cfg.api_endpoint,
                        read_retry=self.wiring.read_retry,
                    )
                    if api.get_node(self.cfg.name) is not None or (
                        self.cfg.queued and api.get_queued(self.cfg.name) is not None
                    ):
                        self._zone = zone
                        break
        return self._zone

    def _use(self, zone: str, spot: bool) -> None:
        if zone != self._zone:
            self._zone, self._api = zone, None
        self._spot = spot

    def is_spot(self) -> bool | None:
        """Whether the node is a spot VM (what the ledger prices), None when it cannot be read."""
        try:
            return bool(self._current_node().scheduling_config.spot)
        except GrpoctlError:
            return None

    def _node_request(self, *, os_login_off: bool = False) -> cloud.NodeRequest:
        key = ensure_key(self.cfg.ssh_key)
        return cloud.NodeRequest(
            accelerator_type=self.cfg.accelerator_type,
            runtime_version=self.cfg.runtime_version,
            spot=self._spot,
            labels=dict(self.cfg.labels),
            ssh_keys=metadata_line(self.cfg.user, key),
            internal_ip=self.cfg.internal_ip,
            os_login_off=os_login_off,
        )

    # ---- up -----------------------------------------------------------------------------------------
    def up(self) -> None:
        """Create or attach, trying each zone (and with spot: prefer, on-demand after spot) on a stockout."""
        self._reset_transports()
        zone = self.zone  # where the node already is, if anywhere
        node = self.api.get_node(self.cfg.name)
        queued = self.api.get_queued(self.cfg.name) if self.cfg.queued else None
        alive = (node is not None or queued is not None) and _dead_reason(node, queued) is None
        # a live node is attached where it is; else capacity is sought from its zone on
        zones = [zone] if alive else [zone, *(z for z in self.cfg.all_zones() if z != zone)]
        modes = {True: [True], False: [False], "prefer": [True, False]}[self.cfg.spot]
        plan = [(z, spot) for spot in modes for z in zones]
        tried: list[str] = []
        self.capacity_wait_s = 0.0
        for i, (z, spot) in enumerate(plan):
            self._use(z, spot)
            began = time.monotonic()
            try:
                self._up_once()
                return
            except GrpoctlError as err:
                if kind_of(err) != "stockout" or len(plan) == 1:
                    raise
                self.capacity_wait_s += time.monotonic() - began  # a zone without capacity: waiting for it
                tried.append(f"{z} ({'spot' if spot else 'on-demand'})")
                if i + 1 < len(plan):
                    nz, nspot = plan[i + 1]
                    mode = "spot" if nspot else "on-demand"
                    self.say(f"{self.node_label}: no capacity; trying {nz} ({mode})")
        out = InfraError(
            f"no capacity for {self.cfg.accelerator_type} ({self.cfg.name}) in any zone tried: "
            f"{', '.join(tried)}; try later, add zones, or set queued: true (waits for capacity)"
        )
        out.kind = "stockout"  # type: ignore[attr-defined]
        raise out

    def _up_once(self) -> None:
        self._reset_transports()
        self._create_op, self._started_node = None, False
        node = self.api.get_node(self.cfg.name)
        queued = self.api.get_queued(self.cfg.name) if self.cfg.queued else None
        node, queued = self._wait_deleted(node, queued)
        dead = _dead_reason(node, queued)
        if dead is not None:
            self.say(f"{self.node_label}: {dead}; deleting it to create a fresh one")
            self._delete(node, queued)
            node, queued = None, None
        created: list[str] = []
        try:
            if node is None and queued is None:
                self._create(created)
            # a node that exists without a queued resource is attached as a plain node
            self._node = self._wait_ready(queued_mode=queued is not None or "queued" in created)
            if not created:
                self._check_matches(self._node)
            for warning in node_warnings(self._node):
                self.say(f"{self.node_label}: warning: {warning}")
            self._check_os_login(self._node)
            self._ensure_ssh_key(self._node)
            self._connect()
            self._start_autodelete(self._node)
        except BaseException as err:
            self._reset_transports()
            if created:
                self._undo(created, err)
            raise

    def _wait_deleted(
        self, node: tpu_v2.Node | None, queued: tpu_v2.QueuedResource | None
    ) -> tuple[tpu_v2.Node | None, tpu_v2.QueuedResource | None]:
        """A node or queued resource still DELETING (a `down` a moment ago) is waited out: then there is
        nothing, and `up` creates afresh."""

        def deleting() -> bool:
            return (node is not None and cloud.state_name(node) == "DELETING") or (
                queued is not None and cloud.queued_state_name(queued) == "DELETING"
            )

        if not deleting():
            return node, queued
        self.say(f"{self.node_label}: DELETING; waiting until it is gone")

        def gone() -> tuple[tpu_v2.Node | None, tpu_v2.QueuedResource | None] | None:
            nonlocal node, queued
            node = self.api.get_node(self.cfg.name)
            queued = self.api.get_queued(self.cfg.name) if self.cfg.queued else None
            return None if deleting() else (node, queued)

        return self._poll_up(gone, "still DELETING")

    def _poll_up(self, check: Callable[[], T | None], late: str, last: Callable[[], str] = str) -> T:
        """`check()` every poll_s until it answers; `<node>: <late> after <up_timeout_s> s<last()>` (an
        InfraError) when it has not within up_timeout_s."""
        return poll_until(
            check,
            timeout_s=self.cfg.up_timeout_s,
            poll_s=self.cfg.poll_s,
            on_timeout=lambda: InfraError(
                f"{self.node_label}: {late} after {self.cfg.up_timeout_s:.0f} s{last()}"
            ),
        )

    def _check_matches(self, node: tpu_v2.Node) -> None:
        """An existing node is attached only if it is what the config asks for (type and spot-ness)."""
        accel, spot = node.accelerator_type, bool(node.scheduling_config.spot)
        wrong = []
        if accel and accel != self.cfg.accelerator_type:
            wrong.append(f"accelerator {accel}, the config asks for {self.cfg.accelerator_type}")
        # a queued resource holds spot-ness itself; spot: prefer takes either
        if not self.cfg.queued and self.cfg.spot != "prefer" and spot != self.cfg.spot:
            wrong.append(f"spot={str(spot).lower()}, the config asks for spot={str(self.cfg.spot).lower()}")
        if not wrong:
            return
        what = f"{self.node_label}: the existing node is not what the config asks for ({'; '.join(wrong)})"
        if not self.attach_any:
            raise UsageError(
                f"{what}: refusing to attach; `grpoctl down` it (or name another node), or pass --attach-any"
            )
        self.say(f"warning: {what}; attached anyway (--attach-any)")

    def _create(self, created: list[str]) -> None:
        self._project_os_login = self.api.project_os_login()
        if self._project_os_login:
            self.say(
                f"{self.node_label}: OS Login is on in the project metadata; creating the node with "
                "enable-oslogin=FALSE so that its ssh-keys metadata is used"
            )
        req = self._node_request(os_login_off=bool(self._project_os_login))
        if self.cfg.queued:
            self.say(f"{self.node_label}: creating queued resource {self.cfg.name} (spot={self._spot})")
            op = self.api.create_queued(self.cfg.name, self.cfg.name, req, self.cfg.valid_until_s)
            created.append("queued")
            cloud.wait_operation(
                op, f"create queued resource {self.cfg.name}", timeout_s=120, poll_s=1.0, api=self.api
            )
        else:
            self.say(
                f"{self.node_label}: creating (spot={self._spot}, runtime {self.cfg.runtime_version})"
            )
            self._create_op = self.api.create_node(self.cfg.name, req)
            created.append("node")

    def _wait_ready(self, *, queued_mode: bool) -> tpu_v2.Node:
        """Poll until the node (and its queued resource) is READY; say each state once."""
        with _live_status() as live:
            return self._poll_until_ready(queued_mode, live)

    def _poll_until_ready(self, queued_mode: bool, live: Status | None) -> tpu_v2.Node:
        start = polled = time.monotonic()
        last = state = shown = ""
        op = self._create_op

        def ready() -> tpu_v2.Node | None:
            nonlocal polled, last, state, shown, op
            stop = self.stop_check() if self.stop_check is not None else None
            if stop:  # e.g. `grpoctl down` while a recovery waits for its new node: stop the spend
                raise RunStopped(f"{self.node_label}: stopped waiting for it: {stop}")
            now = time.monotonic()
            if state in WAITING_QUEUED_STATES:  # since the last poll: queued, no capacity yet
                self.capacity_wait_s += now - polled
            polled = now
            if queued_mode:
                qr = self.api.get_queued(self.cfg.name)
                if qr is None:
                    raise InfraError(f"queued resource {self.cfg.name} vanished while waiting")
                state = cloud.queued_state_name(qr)
                if state in DEAD_QUEUED_STATES:
                    raise InfraError(f"queued resource {self.cfg.name} is {state}{self._why(qr)}")
                waited = time.monotonic() - start
                prefer = self.cfg.spot == "prefer" and self._spot
                if prefer and state != "ACTIVE" and waited > self.cfg.spot_wait_s:
                    gave_up = InfraError(f"no spot capacity after {self.cfg.spot_wait_s:g} s (spot_wait_s)")
                    gave_up.kind = "stockout"  # type: ignore[attr-defined]
                    raise gave_up
            node = self.api.get_node(self.cfg.name)
            node_state = cloud.state_name(node) if node is not None else "NOT_CREATED"
            if node is not None and node_state == "READY" and cloud.health_name(node) == MAINTENANCE:
                node_state = f"READY, health {MAINTENANCE}"  # a maintenance event: not usable yet
            shown = f"{state} / node {node_state}" if queued_mode else node_state
            line = f"{self.node_label}: {shown} ({time.monotonic() - start:.0f} s)"
            if shown != last:  # one line per state for the record, a live line on a terminal
                self.say(line)
                last = shown
            if live is not None:
                live.update(line)
            if op is not None and cloud.operation_done(op, f"create {self.node_label}", self.api):
                cloud.wait_operation(op, f"create {self.node_label}", timeout_s=0, api=self.api)  # raises
                op = None  # succeeded: the node's state says the rest
            if node is not None and node_state == "READY" and (not queued_mode or state == "ACTIVE"):
                return node
            if node is not None and node_state in DEAD_NODE_STATES:
                raise InfraError(f"{self.node_label} became {node_state} while starting")
            if node_state in GONE_NODE_STATES:
                raise InfraError(f"{self.node_label} is {node_state} (going away): `grpoctl up` again later")
            if node_state in START_NODE_STATES:
                self._start_stopped()
            return None

        return self._poll_up(ready, "not READY", lambda: f" (last: {shown})")

    def _why(self, qr: tpu_v2.QueuedResource) -> str:
        """`: <advice> (<message>)` from a FAILED queued resource's failedData.error, mapped like any API
        error (stockout, quota, reservation, validUntil expiry)."""
        failed = qr.state.failed_data
        error = failed.error if failed else None
        if not error or not error.message:
            return ""
        failure = classify(
            status_error(error.code, error.message), project=self.cfg.project, zone=self.zone
        )
        if failure.kind in ("other", "bad_request", "not_found"):
            return f": {error.message}"
        return f": {failure.advice} ({error.message})"

    def _start_stopped(self) -> None:
        """A STOPPED node (stopped by a person, or by the service): start it once, then keep waiting."""
        if self._started_node:
            return
        self.say(f"{self.node_label}: STOPPED; starting it")
        self.api.start_node(self.cfg.name)
        self._started_node = True

    def _undo(self, created: list[str], err: BaseException) -> None:
        """Delete what this `up` created; say exactly what is left when that fails too."""
        what = f"queued resource {self.cfg.name}" if "queued" in created else f"node {self.cfg.name}"
        why = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        if isinstance(err, TransientApiError):  # the API stumbled, not the node: keep what we got
            self.say(
                f"{self.node_label}: up failed on transient Cloud TPU API errors; kept the {what} it created "
                f"(`grpoctl up --target {self.name}` again attaches to it, `grpoctl down` deletes it)"
            )
            return
        try:
            deleted = self._delete(self.api.get_node(self.cfg.name), self.api.get_queued(self.cfg.name))
            done = f"deleted the {what} it created" if deleted else f"the {what} was never created"
            self.say(f"{self.node_label}: up {why}; {done}")
        except Exception as cleanup_err:  # noqa: BLE001 - the original error matters more
            self.say(
                f"{self.node_label}: up {why} and deleting the {what} failed ({cleanup_err}); "
                f"it is still there: run `grpoctl down --target {self.name} --yes` or `grpoctl gc`"
            )

    def _check_os_login(self, node: tpu_v2.Node) -> None:
        """OS Login on (the node's own enable-oslogin, else the project's): the guest agent ignores
        ssh-keys metadata, so no key of ours can work. Nodes `up` creates turn it off in their metadata."""
        own = cloud.os_login_setting(dict(node.metadata))
        if own is None and self._project_os_login is None:
            self._project_os_login = self.api.project_os_login()
        if not cloud.os_login_enabled(dict(node.metadata), self._project_os_login):
            return
        where = "node" if own else "project"
        raise UsageError(
            f"{self.node_label}: OS Login is on (enable-oslogin=TRUE in the {where} metadata), so its "
            "ssh-keys metadata is ignored: set enable-oslogin=FALSE in the node's metadata, or "
            "`grpoctl down` and `up` (grpoctl creates nodes with it off), or use a target of kind ssh with "
            "your OS Login user"
        )

    def _ensure_ssh_key(self, node: tpu_v2.Node) -> None:
        """Attach: add our key to the node's ssh-keys metadata, keeping every key already there. A 409
        (another metadata update is running) is met by reading the node again and merging again."""
        line = self._node_request().ssh_keys
        first = [node]

        def add() -> None:
            current = first.pop() if first else self.api.get_node(self.cfg.name)
            if current is None:
                raise InfraError(f"{self.node_label} vanished while adding the SSH key")
            merged = cloud.merge_ssh_keys(dict(current.metadata).get(cloud.SSH_KEYS, ""), line)
            if merged is None:
                return
            self.say(f"{self.node_label}: adding the SSH key of {self.cfg.user} to the node metadata")
            op = self.api.set_metadata(current, {**dict(current.metadata), cloud.SSH_KEYS: merged})
            cloud.wait_operation(
                op, f"update metadata of {self.cfg.name}", timeout_s=300, poll_s=self.cfg.poll_s, api=self.api
            )

        retry_call(
            add, retry_on=lambda err: kind_of(err) == "conflict", policy=self.wiring.conflict_retry,
            sleep=self.api.sleep,
        )

    # ---- a node that deletes itself -----------------------------------------------------------------
    def _start_autodelete(self, node: tpu_v2.Node) -> None:
        """Nodes grpoctl created (its label) get the idle watchdog; attached ones are the user's own."""
        idle = self.cfg.autodelete_after_idle_s
        if not idle or not cloud.is_grpoctl(node.labels):
            return
        try:
            autodelete.start(self.transports()[0], self.cfg, self.zone, self.remote_dir,
                             metadata_base=self.wiring.metadata_base, poll_s=self.wiring.autodelete_poll_s,
                             notify=self.notify)
        except GrpoctlError as err:  # the node works without it: say so, do not fail `up`
            self.say(f"{self.node_label}: {err}; it will NOT delete itself when idle (grpoctl down does)")
            return
        self.say(f"{self.node_label}: deletes itself after {idle:g} s without a grpoctl job "
                 "(autodelete_after_idle_s)")

    def autodelete_line(self) -> str | None:
        """When the node will delete itself (its watchdog's state), for `status`; None without one."""
        if not self.cfg.autodelete_after_idle_s:
            return None
        try:
            transport = self.transports()[0]
        except GrpoctlError:
            return None
        return autodelete.describe(autodelete.read_state(transport))

    # ---- workers and SSH ----------------------------------------------------------------------------
    def _current_node(self) -> tpu_v2.Node:
        if self._node is None:
            node = self.api.get_node(self.cfg.name)
            if node is None:
                raise InfraError(f"{self.node_label} does not exist: run `grpoctl up --target {self.name}`")
            if cloud.state_name(node) != "READY" or not node.network_endpoints:
                # not cached: a node that is still STARTING has no endpoints yet; ask again next time
                raise InfraError(f"{self.node_label} is {cloud.state_name(node)}: no workers to reach")
            self._check_matches(node)
            self._node = node
        return self._node

    def workers(self) -> list[Worker]:
        node = self._current_node()
        endpoints = list(node.network_endpoints)
        if not endpoints:
            raise InfraError(f"{self.node_label} is {cloud.state_name(node)}: no workers to reach")
        out = []
        for i, ep in enumerate(endpoints):
            host = ep.ip_address if self.cfg.internal_ip else ep.access_config.external_ip
            if not host:
                raise UsageError(f"{self.node_label}: worker {i} has no external IP; set internal_ip: true")
            port = (ep.port or 22) if self.wiring.ssh_port_from_endpoint else self.cfg.ssh_port
            out.append(Worker(i, host, port, peer_host=ep.ip_address or host))
        return out

    def _pins(self, n: int) -> list[tuple[str, ...]]:
        """Per worker, the fingerprints of every host key it published (ed25519, ecdsa, rsa): the key
        the SSH handshake picks must be one of them. Unpublished yet (404): wait; unreadable (403, an org
        policy): only `--accept-new-host-key` goes on."""
        if self.cfg.host_key_sha256:
            return pins_per_host(self.cfg.host_key_sha256, n)

        def published() -> list[tuple[str, ...]] | None:
            try:
                keys = self.api.host_keys(self.cfg.name) or []
            except GrpoctlError as err:
                if kind_of(err) != "permission":
                    raise
                if self._accept_new:
                    self.say(
                        f"{self.node_label}: guest attributes unreadable (403); trusting the keys offered"
                    )
                    return [()] * n
                raise HostKeyError(
                    f"{self.node_label}: the guest attributes with the workers' SSH host keys cannot be read "
                    "(403: an org policy or a missing permission); pin them with host_key_sha256 or pass "
                    "--accept-new-host-key"
                ) from None
            if len(keys) == n and all(keys):
                return [tuple(fingerprint_of(blob) for blob in k.values()) for k in keys]
            if self._accept_new:
                return [()] * n
            return None

        unpublished = HostKeyError(
            f"{self.node_label}: the workers have not published their SSH host keys; pin them with "
            "host_key_sha256 or pass --accept-new-host-key"
        )
        wait_s, timeout_s = self.cfg.poll_s, self.wiring.host_key_wait_s
        return poll_until(published, timeout_s=timeout_s, poll_s=wait_s, on_timeout=lambda: unpublished)

    def transports(self) -> list[Transport]:
        if self._transports is None:
            workers = self.workers()
            pins = self._pins(len(workers))
            self._transports = [
                SshTransport(
                    w.host,
                    w.port,
                    user=self.cfg.user,
                    key_file=self.cfg.ssh_key,
                    host_key_sha256=pin,
                    accept_new_host_key=self._accept_new and not pin,
                    connect_timeout=self.cfg.connect_timeout_s,
                    name=f"{w.label} {w.host}:{w.port}",
                )
                for w, pin in zip(workers, pins, strict=True)
            ]
        return self._transports

    def _connect(self) -> None:
        """First contact with every worker; retry auth while a new key propagates to the VMs."""
        deadline = time.monotonic() + self.cfg.auth_retry_s  # one for all workers
        for t in self.transports():
            self._reach(t, deadline)
        self.say(f"{self.node_label}: READY, {len(self.transports())} worker(s) reachable")

    def _reach(self, t: Transport, deadline: float) -> None:
        """Run `true` on `t` until it works or `deadline` passes; only a host key mismatch ends it early."""
        failed: list[InfraError] = []

        def ran() -> bool | None:
            try:
                t.run("true", timeout=30)
                return True
            except HostKeyError:
                raise
            except InfraError as err:
                failed.append(err)
                return None

        def gave_up() -> GrpoctlError:
            if isinstance(failed[-1], AuthError):
                return self._login_refused(failed[-1])
            return InfraError(f"{failed[-1]} (kept trying for {self.cfg.auth_retry_s:.0f} s)")

        wait_s = min(5.0, self.cfg.poll_s)
        poll_until(ran, timeout_s=deadline - time.monotonic(), poll_s=wait_s, on_timeout=gave_up)

    def _login_refused(self, err: AuthError) -> GrpoctlError:
        """Our key has been in the node's ssh-keys metadata for auth_retry_s and the VM still refuses it:
        say the likely reason and the fix, on one line."""
        kept = f"(kept trying for {self.cfg.auth_retry_s:.0f} s)"
        if self.cfg.user == "root":
            local = getpass.getuser()
            name = local if local != "root" else "grpo"
            unknown = " (or OS Login is on for the project)" if self._project_os_login is None else ""
            return UsageError(
                f"{err} {kept}: this image refuses SSH logins as root{unknown}; set `user: {name}` (any "
                f"name: the guest agent creates the account, with sudo) in target {self.name} of grpoctl.yaml"
            )
        if self._project_os_login is None:
            return InfraError(
                f"{err} {kept}: if OS Login is on for the project (enable-oslogin, or the org policy "
                "constraints/compute.requireOsLogin), ssh-keys metadata is ignored: use a target of kind ssh "
                "with your OS Login user"
            )
        return InfraError(f"{err} {kept}")

    def before_launch(self, remote_dir: str, *, force: bool = False) -> None:
        """Clear stale TPU users on every worker (see cloud/stale.py); a live grpoctl run is refused."""
        reports = clear_stale_tpu_users(
            self.transports(),
            remote_dir=remote_dir,
            device_patterns=self.wiring.device_patterns,
            lockfile=self.wiring.libtpu_lockfile,
            force=force,
        )
        for report in reports:
            if report.killed:
                pids = ", ".join(map(str, report.killed))
                self.say(f"{report.worker}: stopped stale TPU users (pids {pids}), removed the libtpu lock")

    def _reset_transports(self) -> None:
        for t in self._transports or []:
            t.close()
        self._transports = None
        self._node = None

    def close(self) -> None:
        self._reset_transports()

    # ---- down, state, preemption --------------------------------------------------------------------
    def _delete(self, node: tpu_v2.Node | None, queued: tpu_v2.QueuedResource | None) -> bool:
        ops = []
        try:
            if queued is not None:
                ops.append((f"delete queued resource {self.cfg.name}", self.api.delete_queued(self.cfg.name)))
            elif node is not None:
                ops.append((f"delete node {self.cfg.name}", self.api.delete_node(self.cfg.name)))
        except GrpoctlError as err:  # deleted meanwhile (a recovery told to stop undoes its own create)
            if kind_of(err) != "not_found":
                raise
            return True
        for what, op in ops:
            cloud.wait_operation(op, what, timeout_s=600, poll_s=self.cfg.poll_s, api=self.api)
        return bool(ops)

    def down(self) -> None:
        self._reset_transports()
        node = self.api.get_node(self.cfg.name)
        queued = self.api.get_queued(self.cfg.name)
        if node is None and queued is None:
            self.say(f"{self.node_label}: nothing to delete")
            return
        self._delete(node, queued)
        self.say(
            f"{self.node_label}: deleted" + (" (with its queued resource)" if queued is not None else "")
        )

    def state(self) -> TargetState:
        node = self.api.get_node(self.cfg.name)
        queued = self.api.get_queued(self.cfg.name) if self.cfg.queued else None
        details: dict[str, object] = {"zone": self.zone, "accelerator_type": self.cfg.accelerator_type}
        if queued is not None:
            details["queued_resource"] = cloud.queued_state_name(queued)
        if node is None:
            return TargetState("NOT_FOUND", healthy=False, details=details)
        health = cloud.health_name(node)
        details.update(  # what the node really is, not what the config asked for
            health=health,
            workers=len(node.network_endpoints),
            spot=bool(node.scheduling_config.spot) or (queued is not None and "spot" in queued),
            accelerator_type=node.accelerator_type or self.cfg.accelerator_type,
        )
        state = cloud.state_name(node)
        return TargetState(state, healthy=state == "READY" and health in HEALTHY, details=details)

    def machine(self) -> Machine:
        """The node (and its queued resource) in one look: what it means for a job, and its facts."""
        node = self.api.get_node(self.cfg.name)
        queued = self.api.get_queued(self.cfg.name) if self.cfg.queued else None
        qstate = cloud.queued_state_name(queued) if queued is not None else None
        nstate = cloud.state_name(node) if node is not None else "NOT_FOUND"
        words = f"node {nstate}" + (f" (queued resource {qstate})" if qstate else "")
        if qstate in DEAD_QUEUED_STATES:
            condition, words = Condition.GONE, f"queued resource {qstate}"
        elif nstate in DEAD_NODE_STATES or nstate in ("HIDING", "HIDDEN"):
            condition = Condition.GONE
        elif "DELETING" in (nstate, qstate):
            condition = Condition.DELETING
        elif nstate in STOPPED_NODE_STATES:
            condition = Condition.STOPPED
        elif node is None:  # a queued resource still waiting for capacity is on its way; else deleted
            condition = Condition.BUSY if qstate else Condition.DELETED
        elif nstate == "READY" and node.network_endpoints:
            condition = Condition.UP
        else:
            condition = Condition.BUSY
        if node is None:
            return Machine(condition, words)
        endpoints = tuple(
            f"{ep.ip_address}/{ep.access_config.external_ip}:{ep.port}" for ep in node.network_endpoints
        )
        return Machine(
            condition,
            words,
            accelerator_type=node.accelerator_type or None,
            spot=bool(node.scheduling_config.spot) or qstate is not None and "spot" in queued,
            endpoints=endpoints,
            warnings=tuple(node_warnings(node)),
        )

    def refresh(self) -> None:
        self._reset_transports()


def node_warnings(node: tpu_v2.Node) -> list[str]:
    """What a person should hear before paying for a run on this node: an unhealthy or maintained node.
    (`upcomingMaintenance` is only served by the v2alpha1 API, which has no REST transport: not seen.)"""
    out = []
    health = cloud.health_name(node)
    if health not in HEALTHY:
        meaning = {
            "TIMEOUT": "the TPU runtime stopped answering its health check",
            "UNHEALTHY_MAINTENANCE": "the node is under maintenance: a job on it may be stopped",
            "UNHEALTHY_TENSORFLOW": "the TPU runtime is unhealthy",
        }.get(health, "unhealthy")
        desc = f"; {node.health_description}" if node.health_description else ""
        out.append(f"health {health} ({meaning}{desc})")
    for symptom in node.symptoms:
        kind = tpu_v2.Symptom.SymptomType(symptom.symptom_type).name
        out.append(f"symptom {kind} on worker {symptom.worker_id or '?'}: {symptom.details}".rstrip(": "))
    return out


def _dead_reason(node: tpu_v2.Node | None, queued: tpu_v2.QueuedResource | None) -> str | None:
    """Why this node or queued resource will never run a job again; None while it may."""
    if queued is not None and cloud.queued_state_name(queued) in DEAD_QUEUED_STATES:
        return f"queued resource {cloud.queued_state_name(queued)}"
    if node is not None and cloud.state_name(node) in DEAD_NODE_STATES:
        return f"node {cloud.state_name(node)}"
    return None


def _live_status() -> AbstractContextManager[Status | None]:
    """A spinner with the current state on an interactive terminal; nothing otherwise."""
    return (
        Console(stderr=True).status("waiting for the Cloud TPU API") if sys.stderr.isatty() else nullcontext()
    )
