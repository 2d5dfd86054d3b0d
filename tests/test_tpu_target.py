"""The tpu target's edges: queued resources, interrupted and timed-out `up`, bad input and API errors
(one line, exit 2 or 3, nothing left in the fake), attaching to a node, gc, failure budgets."""

from __future__ import annotations

import dataclasses
import getpass
import json
import time
from pathlib import Path

import pytest
from tpu_support import Project, one_line_error, outcome

from orchestrator.cloud import api as cloud
from orchestrator.config import RepoConfig, TpuTargetConfig
from orchestrator.errors import AuthError
from orchestrator.targets.tpu import TpuTarget
from orchestrator.transport.ssh import SshTransport

pytest_plugins = ["tpu_support"]  # the `fake` and `project` fixtures


def _alive(pid: int) -> bool:
    try:  # a zombie (nobody reaped it yet) holds nothing any more
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _nothing_left(project: Project) -> None:
    assert not project.fake.nodes and not project.fake.queued


def test_queued_resource_up_run_down(project: Project) -> None:
    cfg = project.config(name="grpo-qr", queued=True, valid_until_s=3600)
    up = project.cli(cfg, "up")
    assert "WAITING_FOR_RESOURCES" in up.stderr and "ACTIVE / node READY" in up.stderr
    body = project.fake.creates("queuedResources")[-1].body
    assert body["spot"] == {} and body["queueingPolicy"] == {"validUntilDuration": "3600s"}
    node_body = body["tpu"]["nodeSpec"][0]["node"]
    assert node_body["labels"][cloud.LABEL_KEY] == cloud.LABEL_VALUE and "ssh-keys" in node_body["metadata"]

    project.cli(cfg, "sync")
    ran = project.cli(cfg, "run", "configs/standin.yaml", "--wait", "--interval", "0.1")
    run_id, state = outcome(ran.stdout)
    assert state == "SUCCEEDED"
    assert "queued_resource ACTIVE" in project.cli(cfg, "status", run_id).stdout
    project.cli(cfg, "up")  # idempotent: attaches, creates nothing
    assert [r.query["queuedResourceId"] for r in project.fake.creates("queuedResources")] == [["grpo-qr"]]
    project.cli(cfg, "down", "--yes")
    _nothing_left(project)


def test_ctrl_c_while_waiting_for_resources_deletes_the_queued_resource(project: Project) -> None:
    project.fake.script.wait_for_resources_s = 60
    said: list[str] = []

    def say(line: str) -> None:
        said.append(line)
        if "WAITING_FOR_RESOURCES" in line:
            raise KeyboardInterrupt  # the user's Ctrl-C, landing in the wait loop

    tpu = TpuTargetConfig.model_validate(json.loads(_target_json(project, name="grpo-int", queued=True)))
    target = TpuTarget("tpu", tpu, RepoConfig(), say=say, wiring=project.wiring)
    with pytest.raises(KeyboardInterrupt):
        target.up()
    assert "up interrupted; deleted the queued resource grpo-int it created" in said[-1]
    _nothing_left(project)


def test_the_target_reports_to_its_caller_and_never_prints(
    project: Project, capfd: pytest.CaptureFixture[str]
) -> None:
    """Node states reach the `say` the caller passed (the CLI renders them on stderr); the target itself
    writes nothing to stdout or stderr, with or without a listener."""
    said: list[str] = []
    tpu = TpuTargetConfig.model_validate(json.loads(_target_json(project, name="grpo-quiet")))
    loud = TpuTarget("tpu", tpu, RepoConfig(), say=said.append, wiring=project.wiring)
    loud.up()
    loud.down()
    quiet = TpuTarget("tpu", tpu, RepoConfig(), wiring=project.wiring)
    quiet.down()  # no listener: "nothing to delete" goes nowhere
    assert any("READY" in line for line in said) and any("deleted" in line for line in said)
    assert capfd.readouterr() == ("", "")
    _nothing_left(project)


def test_up_timeout_deletes_what_it_created(project: Project) -> None:
    project.fake.script.create_s = 30
    result = project.cli(project.config(name="grpo-slow", up_timeout_s=0.5), "up", code=3)
    assert "not READY after 0 s (last: CREATING)" in one_line_error(result)
    assert "deleted the node grpo-slow it created" in result.stderr
    _nothing_left(project)


def _target_json(project: Project, **tpu: object) -> str:
    import yaml

    return json.dumps(yaml.safe_load(open(project.config(**tpu)))["targets"]["tpu"])


@pytest.mark.parametrize(
    ("case", "code", "words"),
    [
        ("malformed zone", 2, "zone 'useast1d' is not of the form"),
        ("accelerator the trainer cannot compile for", 2, "accelerator_type: unknown accelerator 'v3-8'"),
        ("accelerator type not offered", 2, 'Accelerator type "v5p-8" is not available in zone'),
        ("quota exhausted", 3, "quota exceeded ("),
        ("os login required by org policy", 2, "OS Login is required by the org policy"),
        ("wrong pinned host key", 3, "host key"),
        ("published host key differs from the offered one", 3, "host key"),
        ("no credentials", 2, "no Google credentials found"),
    ],
)
def test_bad_input_and_api_errors(project: Project, monkeypatch, case: str, code: int, words: str) -> None:
    tpu: dict[str, object] = {"name": "grpo-bad"}
    if case == "malformed zone":
        tpu["zone"] = "useast1d"
    elif case == "accelerator the trainer cannot compile for":
        tpu["accelerator_type"] = "v3-8"  # the one accelerator table has no v2/v3
    elif case == "accelerator type not offered":
        tpu["accelerator_type"] = "v5p-8"
    elif case == "quota exhausted":
        project.fake.script.quota_exhausted = True
    elif case == "os login required by org policy":
        project.fake.script.org_requires_os_login = True
    elif case == "wrong pinned host key":
        tpu["host_key_sha256"] = ["SHA256:" + "A" * 43]
    elif case == "published host key differs from the offered one":
        project.fake.script.publish_other_host_keys = True  # nothing pinned: the published key is the pin
    elif case == "no credentials":
        tpu["api_endpoint"] = "https://127.0.0.1:9"  # not plain http: needs ADC, and there is none
        monkeypatch.setenv("HOME", str(project.root))
        monkeypatch.setenv("CLOUDSDK_CONFIG", str(project.root / "no-gcloud"))
    requests_before = len(project.fake.requests)
    result = project.cli(project.config(**tpu), "up", code=code)
    assert words in one_line_error(result)
    _nothing_left(project)  # whatever `up` created on the way was deleted again
    if case in ("malformed zone", "accelerator the trainer cannot compile for", "no credentials"):
        assert len(project.fake.requests) == requests_before  # refused before any API call


def test_up_waits_for_host_keys_published_after_ready(project: Project) -> None:
    # The guest agent publishes the VM's host keys a moment after READY: `up` keeps asking, then pins them.
    project.fake.script.host_keys_delay_s = 1.0
    project.cli(project.config(name="grpo-late-keys"), "up")
    asked = [r for r in project.fake.requests if r.path.endswith(":getGuestAttributes")]
    assert len(asked) >= 2
    project.cli(project.config(name="grpo-late-keys"), "down", "--yes")
    _nothing_left(project)


def test_host_keys_never_published_is_a_one_line_error(project: Project) -> None:
    project.wiring = dataclasses.replace(project.wiring, host_key_wait_s=0.5)  # the real wait is minutes
    project.fake.script.host_keys_delay_s = 3600
    result = project.cli(project.config(name="grpo-no-keys"), "up", code=3)
    assert one_line_error(result).endswith(
        "the workers have not published their SSH host keys; pin them with host_key_sha256 or pass "
        "--accept-new-host-key"
    )
    _nothing_left(project)


def test_the_configured_user_is_the_one_that_logs_in(project: Project) -> None:
    # The fake VMs accept only the metadata key's user: another configured user is refused, not replaced
    # by the local login name.
    cfg = project.config(name="grpo-user", user="not-" + getpass.getuser(), auth_retry_s=1)
    result = project.cli(cfg, "up", code=3)
    assert "not-" + getpass.getuser() in one_line_error(result)
    _nothing_left(project)


def test_attach_adds_our_key_keeps_theirs_and_waits_for_propagation(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = cloud.TpuApi("proj", "us-east1-d", api_endpoint=project.fake.endpoint)
    theirs = "alice:ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAlice alice"
    req = cloud.NodeRequest("v6e-8", "v2-alpha-tpuv6e", spot=True, ssh_keys=theirs)
    cloud.wait_operation(api.create_node("grpo-att", req), "create", timeout_s=10, poll_s=0.05)
    project.fake.script.key_propagation_s = 1.0
    refused: list[AuthError] = []  # logins the worker's sshd refused: the key had not reached the VM yet
    real_run = SshTransport.run

    def counting_run(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return real_run(self, *args, **kwargs)
        except AuthError as err:
            refused.append(err)
            raise

    monkeypatch.setattr(SshTransport, "run", counting_run)
    project.cli(project.config(name="grpo-att"), "up")
    assert refused  # `up` met refused logins and kept trying until one went through
    patch = [r for r in project.fake.requests if r.method == "PATCH"][-1]
    assert patch.query["updateMask"] == ["metadata"]
    keys = api.get_node("grpo-att").metadata["ssh-keys"].splitlines()
    assert keys[0] == theirs and keys[1].startswith(f"{getpass.getuser()}:ssh-ed25519 ")
    assert [r.query["nodeId"] for r in project.fake.creates()].count(["grpo-att"]) == 1  # attached
    project.cli(project.config(name="grpo-att"), "down", "--yes")


def test_gc_deletes_only_grpoctl_leftovers(project: Project) -> None:
    api = cloud.TpuApi("proj", "us-east1-d", api_endpoint=project.fake.endpoint)
    req = cloud.NodeRequest("v6e-8", "v2-alpha-tpuv6e", spot=True)
    for name in ("ours-dead", "ours-alive"):
        cloud.wait_operation(api.create_node(name, req), name, timeout_s=10, poll_s=0.05)
    cloud.wait_operation(api.create_queued("ours-qr", "ours-qr", req, None), "qr", timeout_s=10)
    foreign = cloud.node_message(req)
    del foreign.labels[cloud.LABEL_KEY]
    api.client.create_node(parent=api.parent, node_id="theirs-dead", node=foreign)
    deadline = time.monotonic() + 10
    while api.get_node("ours-qr") is None or cloud.state_name(api.get_node("ours-qr")) != "READY":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for name in ("ours-dead", "theirs-dead", "ours-qr"):
        project.fake.preempt(name)

    cfg = project.config()
    listed = project.cli(cfg, "gc", "--list").stdout
    assert "queued resource ours-qr (us-east1-d): SUSPENDED" in listed
    assert "node ours-dead (us-east1-d): PREEMPTED" in listed
    assert "theirs" not in listed and "ours-alive" not in listed
    project.cli(cfg, "gc", "--yes")
    assert sorted(n.rsplit("/", 1)[1] for n in project.fake.nodes) == ["ours-alive", "theirs-dead"]
    assert not project.fake.queued
    assert "nothing to collect" in project.cli(cfg, "gc", "--list").stdout
    for name in ("ours-alive", "theirs-dead"):
        cloud.wait_operation(api.delete_node(name), name, timeout_s=10)


def test_failure_recovery_has_its_own_budget(project: Project) -> None:
    cfg = project.config(name="grpo-fail")
    project.cli(cfg, "up")
    project.cli(cfg, "sync")
    args = ["run", "configs/standin.yaml", "--set", "exit_code=3", "--interval", "0.1", "--recover"]
    result = project.cli(cfg, *args, "--recover-on-exit-code", "3", "--max-failures", "2", code=1)
    assert "exit code 3" in one_line_error(result)
    run_id = result.stdout.split()[-2]
    record = json.loads(project.cli(cfg, "--json", "status", run_id).stdout)
    assert [r["kind"] for r in record["recoveries"]] == ["failure", "failure"]
    assert record["state"] == "FAILED"
    assert [r.query["nodeId"] for r in project.fake.creates()].count(["grpo-fail"]) == 1  # not recreated
    project.cli(cfg, "down", "--yes")


def test_run_clears_stale_tpu_users_first(project: Project) -> None:
    dev = project.root / "dev"
    (dev / "vfio").mkdir(parents=True)
    (dev / "vfio" / "0").touch()
    lock = project.root / "libtpu_lockfile"
    project.wiring = dataclasses.replace(
        project.wiring, device_patterns=(f"{dev}/vfio/*",), libtpu_lockfile=str(lock)
    )
    cfg = project.config(name="grpo-stale")
    project.cli(cfg, "up")
    project.cli(cfg, "sync")
    (worker,) = project.fake.nodes["projects/proj/locations/us-east1-d/nodes/grpo-stale"].workers
    # a crashed job's leftover on the VM, still holding the chips, and libtpu's lock
    holder = worker.home / "holder.pid"
    stale = f"setsid nohup sleep 300 3<{dev}/vfio/0 >/dev/null 2>&1 & echo $! > {holder}; touch {lock}"
    target = TpuTarget(
        "tpu",
        TpuTargetConfig.model_validate(json.loads(_target_json(project, name="grpo-stale"))),
        RepoConfig(),
        wiring=project.wiring,
    )
    assert target.transports()[0].run(stale).ok
    target.close()
    pid = int(holder.read_text())
    ran = project.cli(cfg, "run", "configs/standin.yaml", "--wait", "--interval", "0.1")
    assert f"stopped stale TPU users (pids {pid})" in ran.stderr and outcome(ran.stdout)[1] == "SUCCEEDED"
    assert not lock.exists() and not _alive(pid)
    project.cli(cfg, "down", "--yes")


def test_accept_new_host_key_trusts_the_first_key_when_none_are_published(
    project: Project, monkeypatch
) -> None:
    # The other side of the error above: asked to trust on first use, `up` connects to every worker and
    # records the key each offered, instead of waiting for keys that never come.
    project.wiring = dataclasses.replace(project.wiring, host_key_wait_s=0.5)
    monkeypatch.setenv("HOME", str(project.root))  # the known_hosts written is the test's, not ours
    project.fake.script.host_keys_delay_s = 3600
    cfg = project.config(name="grpo-tofu")
    project.cli(cfg, "--accept-new-host-key", "up")
    known = (project.root / ".ssh" / "known_hosts").read_text().splitlines()
    assert known and all(line.startswith("[127.0.0.1]:") for line in known)
    project.cli(cfg, "down", "--yes")
    _nothing_left(project)
