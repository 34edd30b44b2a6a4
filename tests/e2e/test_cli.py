"""The AWS CLI (v1) as a user runs it after `source canopyrc`."""

from conftest import INSTANCE_ID_RE, CliError, Launcher

import pytest


def test_cli_instance_lifecycle(cloud):
    tag = Launcher(cloud, "cli").tag
    out = cloud.aws(
        "ec2", "run-instances", "--image-id", cloud.image_id, "--count", "2", "--instance-type", "t2.micro",
        "--tag-specifications", f"ResourceType=instance,Tags=[{{Key={Launcher.TAG_KEY},Value={tag}}}]",
    )
    ids = sorted(i["InstanceId"] for i in out["Instances"])
    try:
        assert len(ids) == 2 and all(INSTANCE_ID_RE.match(i) for i in ids), ids
        cloud.aws("ec2", "wait", "instance-running", "--instance-ids", *ids)

        described = cloud.aws(
            "ec2", "describe-instances",
            "--filters", f"Name=tag:{Launcher.TAG_KEY},Values={tag}", "Name=instance-state-name,Values=running",
        )
        found = sorted(i["InstanceId"] for r in described["Reservations"] for i in r["Instances"])
        assert found == ids
        queried = cloud.aws("ec2", "describe-instances", "--instance-ids", ids[0],
                            "--query", "Reservations[].Instances[].State.Name")
        assert queried == ["running"]
        # --page-size becomes MaxResults; the CLI follows NextToken itself.
        paged = cloud.aws("ec2", "describe-instances", "--page-size", "5",
                          "--query", "Reservations[].Instances[].InstanceId")
        assert set(ids) <= set(paged) and len(paged) == len(set(paged))

        stopped = cloud.aws("ec2", "stop-instances", "--instance-ids", ids[0])
        assert stopped["StoppingInstances"][0]["PreviousState"]["Name"] == "running"
        cloud.aws("ec2", "wait", "instance-stopped", "--instance-ids", ids[0])
        started = cloud.aws("ec2", "start-instances", "--instance-ids", ids[0])
        assert started["StartingInstances"][0]["PreviousState"]["Name"] == "stopped"
        cloud.aws("ec2", "wait", "instance-running", "--instance-ids", ids[0])

        console = cloud.aws("ec2", "get-console-output", "--instance-id", ids[1])
        assert f"canopy-sim: booting instance {ids[1]}" in console["Output"]
    finally:
        term = cloud.aws("ec2", "terminate-instances", "--instance-ids", *ids)
    assert sorted(c["InstanceId"] for c in term["TerminatingInstances"]) == ids
    cloud.aws("ec2", "wait", "instance-terminated", "--instance-ids", *ids)
    states = cloud.aws("ec2", "describe-instances", "--instance-ids", *ids,
                       "--query", "Reservations[].Instances[].State.Code")
    assert states == [48, 48]


def test_cli_errors(cloud):
    proc = cloud.aws_run("ec2", "describe-instances", "--instance-ids", "i-00000000000000000")
    assert proc.returncode != 0
    # AWS CLI v2 exits 254 on a service error, v1 (pinned here) 255.
    assert proc.returncode in (254, 255), (proc.returncode, proc.stderr)
    assert "InvalidInstanceID.NotFound" in proc.stderr

    proc = cloud.aws_run("ec2", "describe-instances", env={"AWS_SECRET_ACCESS_KEY": "wrong" + cloud.secret_key[5:]})
    assert proc.returncode != 0
    assert "SignatureDoesNotMatch" in proc.stderr, proc.stderr

    proc = cloud.aws_run("ec2", "describe-regions", env={"AWS_ACCESS_KEY_ID": "AKIANOSUCHKEY0000000"})
    assert proc.returncode != 0
    assert "AuthFailure" in proc.stderr, proc.stderr

    with pytest.raises(CliError):
        cloud.aws("ec2", "run-instances", "--image-id", "ami-0123456789abcdef0", "--count", "1")


def test_cli_catalogue(cloud):
    images = cloud.aws("ec2", "describe-images", "--query", "Images[].Name")
    assert "canopy-sim-linux" in images
    zones = cloud.aws("ec2", "describe-availability-zones", "--query", "AvailabilityZones[].ZoneName")
    assert "canopy-1a" in zones
    text = cloud.aws_run("ec2", "describe-regions", "--query", "Regions[].RegionName", "--output", "text",
                         json_output=False)
    assert text.returncode == 0 and text.stdout.split() == ["canopy-1"], text
