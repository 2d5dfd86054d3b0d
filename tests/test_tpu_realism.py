"""What the real Cloud TPU service does that a happy-path fake hides (issue 21's table), one test per row:
the fake plays it behind a `Script` knob, and grpoctl survives it. Everything goes through the real
google-cloud-tpu client over loopback with anonymous credentials, and real sshd "VMs"."""

from __future__ import annotations

import dataclasses
import getpass
import re
import sys
import threading
from pathlib import Path

import pytest
import yaml
from google.api_core import exceptions as gexc
from google.auth import exceptions as auth_exc
from google.auth.credentials import Credentials
from google.cloud import tpu_v2
from tpu_support import Project, one_line_error

from grpoctl_testing import fake_tpu
from grpoctl_testing.fake_tpu import Script
from orchestrator.cloud import api as cloud
from orchestrator.cloud.errors import TransientApiError, classify
from orchestrator.config import RepoConfig, TpuTargetConfig
from orchestrator.errors import InfraError, UsageError
from orchestrator.retry import Backoff, retry_call
from orchestrator.targets.tpu import TpuTarget
from orchestrator.transport.ssh import SshTransport

pytest_plugins = ["tpu_support"]  # the `fake` and `project` fixtures

ROOT = Path(__file__).resolve().parents[1]
NODE_PATH = "projects/proj/locations/us-east1-d/nodes/"


def _nothing_left(project: Project) -> None:
    assert not project.fake.nodes and not project.fake.queued


def _api(project: Project) -> cloud.TpuApi:
    return cloud.TpuApi("proj", "us-east1-d", api_endpoint=project.fake.endpoint, sleep=lambda _: None)


def _target(project: Project, say=None, accept_new: bool = False, **tpu: object) -> TpuTarget:  # type: ignore[no-untyped-def]
    data = yaml.safe_load(Path(project.config(**tpu)).read_text())["targets"]["tpu"]
    cfg = TpuTargetConfig.model_validate(data)
    return TpuTarget(
        "tpu", cfg, RepoConfig(), say=say or (lambda _: None), accept_new_host_key=accept_new,
        wiring=project.wiring,
    )


def _make_node(project: Project, name: str, ssh_keys: str = "", ready: bool = True) -> None:
    api = _api(project)
    req = cloud.NodeRequest("v6e-8", "v2-alpha-tpuv6e", spot=True, ssh_keys=ssh_keys)
    op = api.create_node(name, req)
    if ready:
        cloud.wait_operation(op, "create", timeout_s=10, poll_s=0.05)


# ---- the retry helper ----------------------------------------------------------------------------------
def test_retry_call_backs_off_with_jitter_and_stops() -> None:
    slept: list[float] = []
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise OSError("reset")
        return "ok"

    policy = Backoff(attempts=5, first_s=1.0, factor=2.0, max_s=3.0)
    assert (
        retry_call(flaky, retry_on=lambda e: True, policy=policy, sleep=slept.append, rand=lambda: 1.0)
        == "ok"
    )
    assert slept == [1.0, 2.0, 3.0]  # doubling, capped at max_s
    assert retry_call(lambda: 1, retry_on=lambda e: True, sleep=slept.append) == 1
    with pytest.raises(ValueError):  # not retryable: raised at once, no sleep
        retry_call(lambda: int("x"), retry_on=lambda e: isinstance(e, OSError), sleep=slept.append)
    assert len(slept) == 3
    with pytest.raises(OSError):  # retryable but never succeeds: attempts bound it
        retry_call(lambda: (_ for _ in ()).throw(OSError("x")), retry_on=lambda e: True, policy=policy,
                   sleep=slept.append, rand=lambda: 0.5)  # fmt: skip
    assert slept[3:] == [0.5, 1.0, 1.5, 1.5]  # 4 waits between 5 attempts, half of each cap


# ---- row: transient errors on reads --------------------------------------------------------------------
def test_reads_survive_one_shot_500_503_429(project: Project) -> None:
    _make_node(project, "grpo-flaky")
    api = _api(project)
    project.fake.script.fail_reads = [503, 429, 500]
    assert cloud.state_name(api.get_node("grpo-flaky")) == "READY"
    assert api.retries == 3 and [c for _, c in project.fake.injected] == [503, 429, 500]
    project.fake.script.fail_reads = [503]
    assert [n.name.rsplit("/", 1)[1] for n in api.list_nodes()] == ["grpo-flaky"]
    project.fake.script.fail_reads = [503, 503]
    cloud.wait_operation(api.delete_node("grpo-flaky"), "delete", timeout_s=5, poll_s=0.01, api=api)
    _nothing_left(project)


def test_up_survives_transient_errors_at_a_rate(project: Project) -> None:
    project.wiring = dataclasses.replace(
        project.wiring, read_retry=Backoff(attempts=12, first_s=0.001, max_s=0.01)
    )
    project.fake.script.read_error_rate = 0.15
    cfg = project.config(name="grpo-rate", queued=True)
    project.cli(cfg, "up")
    assert len(project.fake.injected) >= 2  # it did meet some
    project.cli(cfg, "down", "--yes")
    _nothing_left(project)


def test_a_read_that_keeps_failing_never_deletes_the_capacity_it_got(project: Project) -> None:
    said: list[str] = []
    failing_from: list[int] = []  # the request count when reads began to fail

    def say(line: str) -> None:
        said.append(line)
        if "CREATING" in line and not failing_from:  # the node exists: from now on every read answers 503
            project.fake.script.fail_reads = [503] * 1000
            failing_from.append(len(project.fake.requests))

    target = _target(project, say=say, name="grpo-keep")
    with pytest.raises(TransientApiError) as err:
        target.up()
    assert err.value.exit_code == 3 and "kept failing" in str(err.value) and "\n" not in str(err.value)
    # one retry layer, ours: the failing read of the create operation was tried exactly as often as the
    # read policy says (api-core's own default retry, with its 1-120 s backoff, used to run under each try)
    attempts = project.wiring.read_retry.attempts
    assert f"({attempts} tries" in str(err.value)
    failed = project.fake.requests[failing_from[0]:]
    op_reads = [r for r in failed if r.method == "GET" and "/operations/" in r.path]
    assert len(op_reads) == attempts, [r.path for r in op_reads]
    assert project.node("grpo-keep") is not None  # not deleted
    assert "kept the node grpo-keep it created" in said[-1]
    project.fake.script.fail_reads = []
    project.cli(project.config(name="grpo-keep"), "up")  # attaches to it
    assert [r.query["nodeId"] for r in project.fake.creates()].count(["grpo-keep"]) == 1
    project.cli(project.config(name="grpo-keep"), "down", "--yes")
    _nothing_left(project)


# ---- row: root login, per-user keys --------------------------------------------------------------------
def test_the_fake_vm_keeps_keys_per_user(project: Project) -> None:
    from orchestrator.cloud.sshkeys import ensure_key

    key = ensure_key(project.key)
    _make_node(project, "grpo-peruser", ssh_keys=f"someone-else:{key} someone-else")
    port = project.node("grpo-peruser").workers[0].port
    t = SshTransport(
        "127.0.0.1",
        port,
        user=getpass.getuser(),
        key_file=str(project.key),
        accept_new_host_key=True,
        known_hosts=str(project.root / "kh"),
        connect_timeout=5,
    )
    with pytest.raises(InfraError, match="authentication failed"):  # someone else's key: not ours
        t.run("true", timeout=10)
    t.close()
    cloud.wait_operation(_api(project).delete_node("grpo-peruser"), "d", timeout_s=5)


def test_an_image_that_refuses_root_is_explained_in_one_line(project: Project) -> None:
    project.fake.script.root_login = False
    result = project.cli(project.config(name="grpo-noroot", user="root", auth_retry_s=1), "up", code=2)
    line = one_line_error(result)
    assert "this image refuses SSH logins as root; set `user: " in line and "grpoctl.yaml" in line
    _nothing_left(project)


# ---- row: OS Login -------------------------------------------------------------------------------------
def test_os_login_in_project_metadata_is_turned_off_on_the_node_at_create(project: Project) -> None:
    project.fake.script.project_os_login = True
    cfg = project.config(name="grpo-oslogin")
    up = project.cli(cfg, "up")
    assert "OS Login is on in the project metadata; creating the node with enable-oslogin=FALSE" in up.stderr
    assert project.fake.creates()[-1].body["metadata"]["enable-oslogin"] == "FALSE"
    assert any(r.path == "/compute/v1/projects/proj" for r in project.fake.requests)  # asked Compute
    project.cli(cfg, "down", "--yes")
    _nothing_left(project)


def test_attaching_to_a_node_under_project_os_login_is_one_line_with_the_fix(project: Project) -> None:
    _make_node(project, "grpo-theirs")
    project.fake.script.project_os_login = True
    result = project.cli(project.config(name="grpo-theirs"), "up", code=2)
    assert "OS Login is on (enable-oslogin=TRUE in the project metadata)" in one_line_error(result)
    assert project.node("grpo-theirs") is not None  # not ours to delete
    cloud.wait_operation(_api(project).delete_node("grpo-theirs"), "d", timeout_s=5)


def test_os_login_unknown_is_named_when_logins_fail(project: Project) -> None:
    # The project metadata cannot be read (Compute API off): the create goes ahead, the VM ignores the
    # keys, and the failed login names OS Login as the likely reason.
    project.fake.script.project_os_login = True
    project.fake.script.compute_api_forbidden = True
    code = 2 if getpass.getuser() == "root" else 3  # as root the image's root refusal is named too
    result = project.cli(project.config(name="grpo-osl-unknown", auth_retry_s=1), "up", code=code)
    assert "OS Login is on for the project" in one_line_error(result)
    _nothing_left(project)


# ---- row: guest attributes -----------------------------------------------------------------------------
def test_guest_attributes_publish_all_key_types_after_a_404(project: Project) -> None:
    project.fake.script.host_key_types = ("ed25519", "ecdsa", "rsa")
    project.fake.script.host_keys_delay_s = 2.0
    _make_node(project, "grpo-keys")
    api = _api(project)
    assert api.host_keys("grpo-keys") is None  # 404: not published yet
    target = _target(project, name="grpo-keys")
    (pins,) = target._pins(1)  # waits for them
    assert len(pins) == 3 and all(p.startswith("SHA256:") for p in pins)
    (keys,) = api.host_keys("grpo-keys")
    assert sorted(keys) == ["ecdsa-sha2-nistp256", "ssh-ed25519", "ssh-rsa"]
    target.up()  # the handshake's key is one of the pins
    target.down()
    _nothing_left(project)


def test_guest_attributes_forbidden_falls_back_to_accept_new_host_key(project: Project, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(project.root))  # the known_hosts written is the test's
    project.fake.script.guest_attributes_forbidden = True
    cfg = project.config(name="grpo-403")
    result = project.cli(cfg, "up", code=3)
    line = one_line_error(result)
    assert "cannot be read (403" in line and "--accept-new-host-key" in line and "roles/tpu.admin" not in line
    _nothing_left(project)
    up = project.cli(cfg, "--accept-new-host-key", "up")
    assert "guest attributes unreadable (403)" in up.stderr
    project.cli(cfg, "down", "--yes")
    _nothing_left(project)


# ---- row: operation errors -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("knob", "words"),
    [
        (("create_error", fake_tpu.PREEMPTED_WHILE_CREATING), "preempted while it was being created"),
        (("create_error", fake_tpu.STOCKOUT), "no capacity in us-east1-d right now"),
        (("create_error", fake_tpu.INSUFFICIENT_RESERVED), "the reservation has no free"),
        (
            ("quota_exhausted_sync", True),
            "quota exceeded (TPUV6EPreemptiblePodPerProjectPerZone in us-east1-d",
        ),
    ],
    ids=["code-3-preempted", "code-8-stockout", "code-9-reserved", "quota-sync"],
)
def test_create_failures_map_to_exit_3_with_advice(project: Project, knob, words: str) -> None:
    setattr(project.fake.script, *knob)
    result = project.cli(project.config(name="grpo-fails"), "up", code=3)
    assert words in one_line_error(result)
    if knob[0] == "quota_exhausted_sync":
        assert "console.cloud.google.com/iam-admin/quotas?project=proj" in one_line_error(result)
    _nothing_left(project)  # the PREEMPTED node the failed create left is deleted


def test_classify_is_one_table() -> None:
    """The mapping s4-economics and others branch on: kinds and exit codes."""
    unavailable = gexc.ServiceUnavailable("down")
    assert classify(unavailable).kind == "transient"
    assert classify(gexc.Conflict("unable to queue the operation")).kind == "conflict"
    assert classify(gexc.from_grpc_status(8, "no more capacity")).kind == "stockout"
    assert classify(gexc.from_grpc_status(9, "Insufficient reserved capacity.")).kind == "reserved_capacity"
    assert classify(gexc.from_grpc_status(3, "not supported while in state PREEMPTED")).exit_code == 3
    assert classify(gexc.from_grpc_status(3, "bad runtime")).exit_code == 2
    assert classify(gexc.Forbidden("no")).kind == "permission"
    assert classify(auth_exc.RefreshError("invalid_grant")).kind == "credentials"


# ---- row: metadata update conflicts --------------------------------------------------------------------
def test_metadata_update_409_is_retried_with_a_fresh_merge(project: Project) -> None:
    theirs = "alice:ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAlice alice"
    _make_node(project, "grpo-409", ssh_keys=theirs)
    project.fake.script.metadata_conflicts = 2
    cfg = project.config(name="grpo-409")
    project.cli(cfg, "up")
    patches = [r for r in project.fake.requests if r.method == "PATCH" and r.path.endswith("/grpo-409")]
    assert len(patches) == 3  # two 409s, then the update
    keys = _api(project).get_node("grpo-409").metadata["ssh-keys"].splitlines()
    assert keys[0] == theirs and len(keys) == 2
    project.cli(cfg, "down", "--yes")


# ---- row: credentials ----------------------------------------------------------------------------------
class _ExpiredLogin(Credentials):
    def refresh(self, request: object) -> None:
        raise auth_exc.RefreshError("invalid_grant: Token has been expired or revoked.")


def test_a_credentials_refresh_error_is_one_line_exit_3(project: Project) -> None:
    client = tpu_v2.TpuClient(
        transport="rest", credentials=_ExpiredLogin(), client_options={"api_endpoint": project.fake.endpoint}
    )
    api = cloud.TpuApi("proj", "us-east1-d", client=client, sleep=lambda _: None)
    with pytest.raises(InfraError) as err:
        api.get_node("anything")
    assert err.value.exit_code == 3 and "\n" not in str(err.value)
    assert "gcloud auth application-default login" in str(err.value)


# ---- row: node and queued-resource states --------------------------------------------------------------
def test_up_waits_out_a_deleting_node_then_creates(project: Project) -> None:
    project.fake.script.delete_s = 1.0
    _make_node(project, "grpo-del")
    _api(project).delete_node("grpo-del")  # a `down` a moment ago: DELETING for a second
    assert project.fake.node_state("grpo-del") == "DELETING"
    cfg = project.config(name="grpo-del", up_timeout_s=30)
    up = project.cli(cfg, "up")
    assert "DELETING; waiting until it is gone" in up.stderr
    assert [r.query["nodeId"] for r in project.fake.creates()].count(["grpo-del"]) == 2
    project.fake.script.delete_s = 0.0
    project.cli(cfg, "down", "--yes")
    _nothing_left(project)


@pytest.mark.parametrize(
    ("state", "health", "shown"),
    [
        ("READY", "UNHEALTHY_MAINTENANCE", "READY, health UNHEALTHY_MAINTENANCE"),
        ("REPAIRING", "HEALTHY", "REPAIRING"),
        ("RESTARTING", "HEALTHY", "RESTARTING"),
    ],
)
def test_up_never_takes_maintenance_or_repair_for_ready(project: Project, state, health, shown) -> None:
    _make_node(project, "grpo-maint")
    project.fake.set_state("grpo-maint", state, health)
    said: list[str] = []

    def say(line: str) -> None:
        said.append(line)
        if shown in line:  # the event ends a moment after `up` has seen it
            threading.Timer(0.3, project.fake.set_state, ("grpo-maint", "READY")).start()

    target = _target(project, say=say, name="grpo-maint")
    target.up()
    seen = [line for line in said if "grpo-maint" in line]
    assert any(shown in line for line in seen)
    assert seen.index(next(x for x in seen if shown in x)) < seen.index(
        next(x for x in seen if "reachable" in x)
    )
    target.down()
    _nothing_left(project)


def test_up_starts_a_stopped_node(project: Project) -> None:
    _make_node(project, "grpo-stopped")
    project.fake.set_state("grpo-stopped", "STOPPED")
    cfg = project.config(name="grpo-stopped")
    up = project.cli(cfg, "up")
    assert "STOPPED; starting it" in up.stderr
    assert [r for r in project.fake.requests if r.path.endswith("/grpo-stopped:start")]
    project.cli(cfg, "down", "--yes")
    _nothing_left(project)


def test_queued_resource_expiry_and_failed_data(project: Project) -> None:
    project.fake.script.wait_for_resources_s = 60
    result = project.cli(project.config(name="grpo-expire", queued=True, valid_until_s=1), "up", code=3)
    line = one_line_error(result)
    assert "is FAILED: no capacity came in us-east1-d before valid_until_s" in line
    assert "(Queued resource request expired" in line and "WAITING_FOR_RESOURCES" in result.stderr
    _nothing_left(project)
    project.fake.script.create_error = fake_tpu.STOCKOUT  # failedData.error code 8: mapped like the op's
    result = project.cli(project.config(name="grpo-qr-stockout", queued=True), "up", code=3)
    assert "is FAILED: no capacity in us-east1-d right now" in one_line_error(result)
    _nothing_left(project)


def test_pages_and_integer_enums(project: Project) -> None:
    project.fake.script.page_size = 1
    project.fake.script.enum_ints = True
    for name in ("grpo-p1", "grpo-p2", "grpo-p3"):
        _make_node(project, name)
    api = _api(project)
    assert sorted(n.name.rsplit("/", 1)[1] for n in api.list_nodes()) == ["grpo-p1", "grpo-p2", "grpo-p3"]
    listed = [r for r in project.fake.requests if r.method == "GET" and r.path.endswith("/nodes")]
    assert len(listed) >= 3 and project.fake.requests[-1].query.get("pageToken")
    raw = project.fake.handle("GET", "/v2/" + NODE_PATH + "grpo-p1", b"")[1]
    assert raw["state"] == 2 and cloud.state_name(api.get_node("grpo-p1")) == "READY"
    for name in ("grpo-p1", "grpo-p2", "grpo-p3"):
        cloud.wait_operation(api.delete_node(name), "d", timeout_s=5)


@pytest.mark.parametrize(
    ("tpu", "words"),
    [
        ({"name": "Grpo_Test"}, "is not a valid TPU name"),
        ({"name": "g" * 64}, "is not a valid TPU name"),
        ({"labels": {"Team": "rl"}}, "label Team='rl'"),
        ({"labels": {"team": "R L"}}, "label team='R L'"),
    ],
)
def test_names_and_labels_are_checked_before_any_call(project: Project, tpu, words: str) -> None:
    before = len(project.fake.requests)
    result = project.cli(project.config(**tpu), "up", code=2)
    assert words in one_line_error(result)
    assert len(project.fake.requests) == before


def test_the_fake_refuses_bad_names_as_the_api_does(project: Project) -> None:
    api = _api(project)
    with pytest.raises(UsageError) as err:
        api.create_node("Bad_Name", cloud.NodeRequest("v6e-8", "rt", True))
    assert "Invalid node id" in str(err.value)


# ---- README's quickstart against the fake playing the real defaults -----------------------------------
def test_readme_quickstart_against_the_realistic_fake(project: Project, monkeypatch) -> None:
    """The quickstart's grpoctl.yaml as written (user root by default, the seed SOP's login), plus only
    what points it at the fake; the fake plays the real service's defaults (Script.realistic())."""
    if getpass.getuser() != "root":
        pytest.skip("the fake VMs' sshd runs as this user: a root login needs the tests to run as root")
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```yaml\n# grpoctl.yaml\n(.*?)```", readme, re.S)
    assert block, "README lost its quickstart grpoctl.yaml"
    cfg = yaml.safe_load(block.group(1))
    name = next(k for k, v in cfg["targets"].items() if v.get("kind") == "tpu")
    assert "user" not in cfg["targets"][name]  # the default user: root
    cfg["targets"][name].update(api_endpoint=project.fake.endpoint, python=sys.executable, poll_s=0.1)
    cfg["repo"] = {"url": project.repo.url, "branch": "main", "remote_dir": "~/grpoctl-work"}
    monkeypatch.setenv("HOME", str(project.root))  # ~/.ssh/grpoctl_ed25519 is created there
    project.fake.script = Script.realistic(create_s=0.5, host_keys_delay_s=0.5, delete_s=0.3)
    path = project.root / "quickstart.yaml"
    path.write_text(yaml.safe_dump(cfg))
    project.cli(str(path), "--target", name, "up")
    project.cli(str(path), "--target", name, "down", "--yes")
    _nothing_left(project)


@pytest.fixture(autouse=True)
def _clean_fake(project: Project):  # type: ignore[no-untyped-def]
    """A failed test's leftovers must not fail the next ones (the fake lives for the module)."""
    yield
    with project.fake._lock:
        for node in project.fake.nodes.values():
            project.fake._kill_workers(node)
        project.fake.nodes.clear()
        project.fake.queued.clear()
