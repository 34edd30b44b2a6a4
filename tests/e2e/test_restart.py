"""State survives a clean restart of `canopy dev` with the same data dir."""

from conftest import WAIT


def test_restart_keeps_state_and_keys(new_cloud):
    c = new_cloud()
    c.start()
    first_rc = dict(c.rc)
    image = c.image_id
    ec2 = c.ec2
    tags = [{"ResourceType": "instance", "Tags": [{"Key": "keep", "Value": "me"}]}]
    launch = dict(ImageId=image, InstanceType="t2.micro", MinCount=1, MaxCount=1, TagSpecifications=tags,
                  ClientToken="e2e-restart-token")
    first = ec2.run_instances(**launch)
    (running,) = [i["InstanceId"] for i in first["Instances"]]
    (stopped,) = [i["InstanceId"] for i in ec2.run_instances(
        ImageId=image, InstanceType="t2.nano", MinCount=1, MaxCount=1)["Instances"]]
    (gone,) = [i["InstanceId"] for i in ec2.run_instances(
        ImageId=image, InstanceType="t2.nano", MinCount=1, MaxCount=1)["Instances"]]
    c.wait("instance_running", InstanceIds=[running, stopped, gone])
    ec2.stop_instances(InstanceIds=[stopped])
    ec2.terminate_instances(InstanceIds=[gone])
    c.wait("instance_stopped", InstanceIds=[stopped])
    c.wait("instance_terminated", InstanceIds=[gone])
    before = {i["InstanceId"]: i for i in c.instances()}

    code = c.stop()
    assert code == 0, f"SIGTERM should stop canopy dev cleanly, exit code {code}\n{c.log_tail(40)}"

    c.start()
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "CANOPY_ADMIN_TOKEN", "AWS_DEFAULT_REGION",
                "AWS_ENDPOINT_URL_EC2", "CANOPY_ADMIN_ENDPOINT"):
        assert c.rc[key] == first_rc[key], key
    # The old client (same endpoint, same keys) still works.
    after = {i["InstanceId"]: i for p in ec2.get_paginator("describe_instances").paginate()
             for r in p["Reservations"] for i in r["Instances"]}
    assert set(after) == set(before)
    assert c.image_id == image
    assert after[running]["Tags"] == before[running]["Tags"]
    assert after[running]["LaunchTime"] == before[running]["LaunchTime"]

    ec2.get_waiter("instance_running").wait(InstanceIds=[running], WaiterConfig=WAIT)
    # The idempotency token outlives the restart.
    retried = ec2.run_instances(**launch)
    assert retried["ReservationId"] == first["ReservationId"]
    assert [i["InstanceId"] for i in retried["Instances"]] == [running]
    assert after[stopped]["State"]["Name"] == "stopped"
    assert after[gone]["State"]["Name"] == "terminated"
    # A stopped instance stays stopped, and can be started after the restart.
    ec2.start_instances(InstanceIds=[stopped])
    ec2.get_waiter("instance_running").wait(InstanceIds=[stopped], WaiterConfig=WAIT)
    out = ec2.get_console_output(InstanceId=running)["Output"]
    assert f"canopy-sim: booting instance {running}" in out

    assert c.stop() == 0


def test_fixed_admin_credentials_from_env(new_cloud):
    ak, sk = "AKIAE2ETESTFIXED0001", "e2e-fixed-secret-0123456789abcdef"
    c = new_cloud(extra_env={"CANOPY_ADMIN_ACCESS_KEY_ID": ak, "CANOPY_ADMIN_SECRET_ACCESS_KEY": sk})
    c.start()
    assert (c.access_key, c.secret_key) == (ak, sk)
    assert c.ec2.describe_regions()["Regions"][0]["RegionName"] == "canopy-1"
    assert c.stop() == 0


def test_restart_mid_transition_converges(new_cloud):
    """SIGTERM while instances are stopping / shutting down / freshly launched: after the
    restart each one settles in the state that was asked for."""
    c = new_cloud()
    c.start()
    ec2 = c.ec2
    img = c.image_id

    def launch():
        return ec2.run_instances(ImageId=img, InstanceType="t2.micro", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]

    stopping, terminating = launch(), launch()
    c.wait("instance_running", InstanceIds=[stopping, terminating])
    fresh = launch()
    ec2.stop_instances(InstanceIds=[stopping])
    ec2.terminate_instances(InstanceIds=[terminating])
    assert c.stop() == 0

    c.start()
    ec2 = c.ec2
    c.wait("instance_stopped", InstanceIds=[stopping])
    c.wait("instance_terminated", InstanceIds=[terminating])
    c.wait("instance_running", InstanceIds=[fresh])
    states = {i["InstanceId"]: i["State"]["Name"] for i in c.instances()}
    assert states == {stopping: "stopped", terminating: "terminated", fresh: "running"}
    assert c.stop() == 0
