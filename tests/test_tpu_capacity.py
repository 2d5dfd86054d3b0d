"""Capacity on the fake API: a stockout in the first zone ends on a node in the second (and later commands
find it there), `spot: prefer` falls back to on-demand, no capacity anywhere names the zones tried, and
quota / permission / API disabled each give their own one-line error with the fix."""

from __future__ import annotations

import json

import pytest
from tpu_support import Project, one_line_error

from grpoctl_testing import fake_tpu
from orchestrator.cloud import api as cloud

pytest_plugins = ["tpu_support"]  # the `fake` and `project` fixtures

Z1, Z2 = "us-east1-d", "us-east5-b"


def _node(project: Project, zone: str, name: str = "grpo-cap"):  # type: ignore[no-untyped-def]
    return project.fake.nodes.get(f"projects/proj/locations/{zone}/nodes/{name}")


def test_a_stockout_in_the_first_zone_ends_on_a_node_in_the_second(project: Project) -> None:
    project.fake.script.stockout_zones = {Z1}
    cfg = project.config(name="grpo-cap", zones=[Z2], autodelete_after_idle_s=0)
    up = project.cli(cfg, "--json", "up")
    assert f"no capacity; trying {Z2} (spot)" in up.stderr
    assert json.loads(up.stdout)["details"]["waiting_for_capacity_s"] > 0  # the ledger's category
    assert _node(project, Z1) is None and _node(project, Z2).state == "READY"
    assert project.fake.creates()[-1].path.startswith(f"/v2/projects/proj/locations/{Z2}/")
    # a later command (a fresh target) finds the node in the zone it went to: `up` attaches there
    creates = len(project.fake.creates())
    again = json.loads(project.cli(cfg, "--json", "up").stdout)
    assert again["details"]["zone"] == Z2 and again["state"] == "READY"
    assert len(project.fake.creates()) == creates
    project.cli(cfg, "down", "--yes")
    assert _node(project, Z2) is None


def test_spot_prefer_falls_back_to_on_demand_and_no_capacity_names_the_zones(project: Project) -> None:
    project.fake.script.spot_stockout_zones = {Z1, Z2}
    cfg = project.config(name="grpo-cap", zones=[Z2], spot="prefer", autodelete_after_idle_s=0)
    up = project.cli(cfg, "up")
    assert f"trying {Z2} (spot)" in up.stderr and f"trying {Z1} (on-demand)" in up.stderr
    node = _node(project, Z1)
    assert node is not None and not node.body.get("schedulingConfig", {}).get("spot")
    project.cli(cfg, "down", "--yes")
    project.fake.script.stockout_zones = {Z1, Z2}
    result = project.cli(project.config(name="grpo-cap", zones=[Z2]), "up", code=3)
    line = one_line_error(result)
    assert f"in any zone tried: {Z1} (spot), {Z2} (spot)" in line and "queued: true" in line
    assert not project.fake.nodes


@pytest.mark.parametrize(
    ("knob", "code", "words"),
    [
        ("quota", 3, "quota exceeded (TPUV6EPreemptiblePodPerProjectPerZone"),
        ("permission", 2, "lacks the permission tpu.nodes.create in project proj"),
        ("api_disabled", 2, "gcloud services enable tpu.googleapis.com --project proj"),
    ],
)
def test_quota_permission_and_a_disabled_api_say_what_to_fix(
    project: Project, knob: str, code: int, words: str
) -> None:
    if knob == "quota":
        project.fake.script.quota_exhausted_sync = True
    else:
        project.fake.script.forbidden = knob
    line = one_line_error(project.cli(project.config(name="grpo-cap", zones=[Z2]), "up", code=code))
    assert words in line, line
    assert not project.fake.nodes


def test_a_failed_queued_resource_in_the_other_zone_is_explained_with_that_zone(project: Project) -> None:
    project.fake.script.create_error = fake_tpu.STOCKOUT  # every queued resource FAILED, code 8
    api = cloud.TpuApi("proj", Z2, api_endpoint=project.fake.endpoint, sleep=lambda _: None)
    api.create_queued("grpo-cap", "grpo-cap", cloud.NodeRequest("v6e-8", "v2-alpha-tpuv6e", spot=True), None)
    cfg = project.config(name="grpo-cap", zones=[Z2], queued=True, autodelete_after_idle_s=0)
    line = one_line_error(project.cli(cfg, "up", code=3))
    assert f"is FAILED: no capacity in {Z2} right now" in line, line  # where it is, not the first zone
