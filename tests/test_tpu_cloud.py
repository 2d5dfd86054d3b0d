"""The Cloud TPU wrapper against the fake API, through the real google-cloud-tpu REST client."""

from __future__ import annotations

import time

import pytest

from grpoctl_testing.fake_tpu import FakeTpuApi, Script
from orchestrator.cloud import api as cloud
from orchestrator.cloud.client import build_client
from orchestrator.errors import InfraError, UsageError

REQ = cloud.NodeRequest(
    accelerator_type="v6e-8",
    runtime_version="v2-alpha-tpuv6e",
    spot=True,
    labels={"team": "rl"},
    ssh_keys="root:ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample root",
)


@pytest.fixture(scope="module")
def fake() -> FakeTpuApi:
    with FakeTpuApi(script=Script(create_s=0.2, wait_for_resources_s=0.2)) as f:
        yield f


@pytest.fixture()
def api(fake: FakeTpuApi) -> cloud.TpuApi:
    fake.script = Script(create_s=0.2, wait_for_resources_s=0.2)
    return cloud.TpuApi("proj", "us-east1-d", api_endpoint=fake.endpoint)


def test_no_client_for_google_in_tests() -> None:
    # conftest refuses every credential lookup: forgetting the fake's endpoint is an error, not a call out.
    for build in (lambda: build_client(None), lambda: cloud.TpuApi("proj", "us-east1-d")):
        with pytest.raises(UsageError, match="no Google credentials found"):
            build()


def test_no_credentials_is_one_line_usage_error(tmp_path, monkeypatch) -> None:
    # An https endpoint needs ADC; with no key file, no gcloud config and no metadata server there is none.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    with pytest.raises(UsageError) as err:
        build_client("https://127.0.0.1:9")
    assert "no Google credentials found" in str(err.value) and "\n" not in str(err.value)
    assert err.value.exit_code == 2


def test_spot_node_create_carries_spot_labels_and_ssh_keys(api: cloud.TpuApi, fake: FakeTpuApi) -> None:
    assert api.get_node("n1") is None
    node = cloud.wait_operation(api.create_node("n1", REQ), "create n1", timeout_s=10, poll_s=0.05)
    assert cloud.state_name(node) == "READY" and cloud.health_name(node) == "HEALTHY"
    body = fake.creates()[-1].body
    assert fake.creates()[-1].query["nodeId"] == ["n1"]
    assert body["schedulingConfig"] == {"spot": True}
    assert body["metadata"]["ssh-keys"] == REQ.ssh_keys
    assert body["labels"] == {"team": "rl", cloud.LABEL_KEY: cloud.LABEL_VALUE}
    assert body["acceleratorType"] == "v6e-8" and body["runtimeVersion"] == "v2-alpha-tpuv6e"
    assert [n.name.rsplit("/", 1)[1] for n in api.list_nodes()] == ["n1"]

    # update_node keeps the existing keys and adds ours
    merged = cloud.merge_ssh_keys(node.metadata["ssh-keys"], "alice:ssh-ed25519 BBBB alice")
    cloud.wait_operation(api.set_metadata(node, {**node.metadata, "ssh-keys": merged}), "upd", timeout_s=5)
    assert api.get_node("n1").metadata["ssh-keys"].splitlines() == [
        REQ.ssh_keys,
        "alice:ssh-ed25519 BBBB alice",
    ]
    assert fake.requests[-2].query["updateMask"] == ["metadata"]

    cloud.wait_operation(api.delete_node("n1"), "delete n1", timeout_s=5)
    assert api.get_node("n1") is None and not fake.nodes


def test_queued_resource_goes_active_and_force_delete_takes_the_node(
    api: cloud.TpuApi, fake: FakeTpuApi
) -> None:
    qr = cloud.wait_operation(api.create_queued("q1", "q1", REQ, 600), "create q1", timeout_s=5, poll_s=0.05)
    assert cloud.queued_state_name(qr) == "WAITING_FOR_RESOURCES"  # the real service's first state now
    body = fake.creates("queuedResources")[-1].body
    assert body["spot"] == {} and body["queueingPolicy"] == {"validUntilDuration": "600s"}
    assert body["tpu"]["nodeSpec"][0]["node"]["metadata"]["ssh-keys"] == REQ.ssh_keys
    seen = set()
    deadline = time.monotonic() + 5
    while (
        state := cloud.queued_state_name(api.get_queued("q1"))
    ) != "ACTIVE" and time.monotonic() < deadline:
        seen.add(state)
        time.sleep(0.05)
    assert state == "ACTIVE" and "WAITING_FOR_RESOURCES" in seen
    assert cloud.state_name(api.get_node("q1")) == "READY"
    with pytest.raises(UsageError):  # FAILED_PRECONDITION: it still has a node
        cloud.wait_operation(api.delete_queued("q1", force=False), "delete q1", timeout_s=5)
    cloud.wait_operation(api.delete_queued("q1"), "delete q1", timeout_s=5)
    assert api.get_queued("q1") is None and api.get_node("q1") is None


def test_preempted_node_and_suspended_queued_resource(api: cloud.TpuApi, fake: FakeTpuApi) -> None:
    cloud.wait_operation(api.create_queued("q2", "q2", REQ, None), "create q2", timeout_s=5)
    deadline = time.monotonic() + 5
    while cloud.queued_state_name(api.get_queued("q2")) != "ACTIVE" and time.monotonic() < deadline:
        time.sleep(0.05)
    fake.script.suspend_s = 0.3
    fake.preempt("q2")
    assert cloud.state_name(api.get_node("q2")) == "PREEMPTED"
    assert cloud.queued_state_name(api.get_queued("q2")) == "SUSPENDING"
    deadline = time.monotonic() + 5
    while cloud.queued_state_name(api.get_queued("q2")) != "SUSPENDED" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert api.get_node("q2") is None  # SUSPENDED: the service deleted the node
    cloud.wait_operation(api.delete_queued("q2"), "delete q2", timeout_s=5)
    assert not fake.nodes and not fake.queued


@pytest.mark.parametrize(
    ("setup", "zone", "accel", "exit_code", "words"),
    [
        (lambda s: None, "us-east1-d", "v5p-8", 2, 'Accelerator type "v5p-8" is not available'),
        (
            lambda s: setattr(s, "quota_exhausted", True),
            "us-east1-d",
            "v6e-8",
            3,
            "quota exceeded (",
        ),
        (lambda s: None, "useast1d", "v6e-8", 2, "Invalid location"),
    ],
    ids=["accelerator-not-offered", "quota-exhausted", "malformed-zone"],
)
def test_api_errors_are_one_line_with_exit_codes(fake, setup, zone, accel, exit_code, words) -> None:
    fake.script = Script()
    setup(fake.script)
    api = cloud.TpuApi("proj", zone, api_endpoint=fake.endpoint)
    req = cloud.NodeRequest(accel, "v2-alpha-tpuv6e", True)
    with pytest.raises((UsageError, InfraError)) as err:
        cloud.wait_operation(api.create_node("bad", req), "create bad", timeout_s=5, poll_s=0.05)
    assert err.value.exit_code == exit_code
    assert words in str(err.value) and "\n" not in str(err.value)
    assert not fake.nodes  # nothing leaked


def test_merge_ssh_keys_is_idempotent() -> None:
    line = "root:ssh-ed25519 AAAA root"
    assert cloud.merge_ssh_keys("", line) == line
    assert cloud.merge_ssh_keys(f"bob:ssh-rsa XYZ bob\n{line}", line) is None
    assert cloud.merge_ssh_keys("bob:ssh-rsa XYZ bob", line) == f"bob:ssh-rsa XYZ bob\n{line}"
    assert cloud.os_login_enabled({"enable-oslogin": "TRUE"}) and not cloud.os_login_enabled({})


@pytest.mark.parametrize(("internal_ip", "host"), [(False, "203.0.113.7"), (True, "10.130.0.2")])
def test_workers_in_endpoint_order_external_or_internal(
    fake: FakeTpuApi, internal_ip: bool, host: str
) -> None:
    from orchestrator.config import RepoConfig, TpuTargetConfig
    from orchestrator.targets.tpu import TpuTarget

    fake.script = Script(create_s=0.0, internal_ip="10.130.0.2", external_ip="203.0.113.7")
    api = cloud.TpuApi("proj", "us-east1-d", api_endpoint=fake.endpoint)
    name = f"w-{int(internal_ip)}"
    cloud.wait_operation(api.create_node(name, cloud.NodeRequest("v4-16", "rt", True)), "c", timeout_s=5)
    cfg = TpuTargetConfig(
        kind="tpu",
        project="proj",
        zone="us-east1-d",
        name=name,
        api_endpoint=fake.endpoint,
        internal_ip=internal_ip,
        accelerator_type="v4-16",  # what the node is: another type would be refused (issue 20)
    )
    workers = TpuTarget("tpu", cfg, RepoConfig()).workers()  # asks the API only: nothing connects
    assert [(w.index, w.host, w.port) for w in workers] == [(0, host, 22), (1, host, 22)]
    cloud.wait_operation(api.delete_node(name), "d", timeout_s=5)
