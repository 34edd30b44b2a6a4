"""`canopy admin`: the operator's view over the admin API."""

import json

import pytest

from conftest import eventually


def test_admin_nodes(cloud):
    proc = cloud.admin_run("--json", "nodes")
    assert proc.returncode == 0, proc.stderr
    nodes = json.loads(proc.stdout)
    assert len(nodes) == len(cloud.zones) * cloud.nodes_per_zone
    assert {n["zone"] for n in nodes} == set(cloud.zones)
    for n in nodes:
        assert n["healthy"] is True, n
        assert n["capacity"]["vcpus"] > 0 and n["capacity"]["memory_mib"] > 0, n
        assert n["node_id"].startswith(n["zone"])
        assert n["hypervisor"] == "sim"

    table = cloud.admin_run("nodes")
    assert table.returncode == 0, table.stderr
    for n in nodes:
        assert n["node_id"] in table.stdout


def test_admin_zones(cloud):
    proc = cloud.admin_run("zones")
    assert proc.returncode == 0, proc.stderr
    for z in cloud.zones:
        assert z in proc.stdout
    assert "available" in proc.stdout


def test_admin_instances(cloud, launcher):
    ids = launcher.run_ids(2)
    cloud.wait("instance_running", InstanceIds=ids)
    table = cloud.admin_run("instances")
    assert table.returncode == 0, table.stderr
    for i in ids:
        assert i in table.stdout

    js = cloud.admin_run("--json", "instances")
    assert js.returncode == 0, js.stderr
    assert set(ids) <= set(json.dumps(json.loads(js.stdout)).split('"'))

    # Allocations show up on the nodes that run them.
    nodes = eventually(lambda: json.loads(cloud.admin_run("--json", "nodes").stdout),
                       lambda ns: sum(n["instance_count"] for n in ns) >= 2)
    assert sum(n["instance_count"] for n in nodes) >= 2
    assert sum(n["allocated"]["vcpus"] for n in nodes) >= 2


def test_admin_needs_the_token(cloud):
    proc = cloud.admin_run("nodes", env={"CANOPY_ADMIN_TOKEN": None})
    assert proc.returncode != 0
    proc = cloud.admin_run("nodes", env={"CANOPY_ADMIN_TOKEN": "wrong-token"})
    assert proc.returncode != 0
    assert cloud.admin_token not in proc.stdout + proc.stderr


def test_admin_api_rejects_requests_without_the_token(cloud):
    import urllib.error
    import urllib.request

    url = cloud.admin_endpoint.rstrip("/") + "/v1/nodes"
    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Bearer {cloud.secret_key}"}):
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30)
        assert exc.value.code in (401, 403), headers
    ok = urllib.request.urlopen(
        urllib.request.Request(url, headers={"Authorization": f"Bearer {cloud.admin_token}"}), timeout=30)
    assert ok.status == 200
    assert isinstance(json.loads(ok.read()), list)
