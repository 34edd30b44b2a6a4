"""Accounts made through the admin API (`canopy admin create-account`), and images shared
between them with ModifyImageAttribute / DescribeImageAttribute / ResetImageAttribute, as
boto3 and the AWS CLI send them: a private image is invisible to another account until its
owner shares it (with the account, or with everyone), and launchable once shared."""

import json
import uuid

from conftest import expect_error
from test_images import fake_qcow2


def new_account(cloud, name: str):
    proc = cloud.admin_run("--json", "create-account", name)
    assert proc.returncode == 0, proc.stderr
    made = json.loads(proc.stdout)
    assert len(made["account_id"]) == 12 and made["access_key_id"].startswith("AKIA")
    return made, cloud.client(made["access_key_id"], made["secret_access_key"])


def test_accounts_are_made_listed_and_unique(cloud):
    name = f"team-{uuid.uuid4().hex[:8]}"
    made, client = new_account(cloud, name)
    listed = json.loads(cloud.admin_run("--json", "accounts").stdout)
    (row,) = [a for a in listed if a["name"] == name]
    assert (row["account_id"], row["is_admin"]) == (made["account_id"], False)
    # The new account's keys work, and its world is its own: a default security group,
    # no instances, no key pairs.
    groups = client.describe_security_groups()["SecurityGroups"]
    assert [(g["GroupName"], g["OwnerId"]) for g in groups] == [("default", made["account_id"])]
    assert client.describe_key_pairs()["KeyPairs"] == []
    # Names are unique; bad names are refused with the reason.
    again = cloud.admin_run("create-account", name)
    assert again.returncode != 0 and "exists" in again.stderr
    bad = cloud.admin_run("create-account", "no spaces")
    assert bad.returncode != 0 and "name" in bad.stderr
    # Not an administrator: no file-based image registration.
    expect_error(client.register_image, "UnauthorizedOperation", 403, Name="not-an-admin", ImageLocation="/etc/hostname")


def test_a_private_image_is_shared_with_one_account_then_everyone_then_no_one(cloud, tmp_path):
    tag = uuid.uuid4().hex[:8]
    fake_qcow2(tmp_path / "disk.qcow2")
    owner = cloud.ec2
    emi = owner.register_image(Name=f"shared-{tag}", ImageLocation=str(tmp_path / "disk.qcow2"))["ImageId"]
    (mine,) = owner.describe_images(ImageIds=[emi])["Images"]
    friend, fc = new_account(cloud, f"friend-{tag}")
    stranger, sc = new_account(cloud, f"stranger-{tag}")

    # Private: the others neither see it nor launch it, nor read or change who may.
    expect_error(fc.describe_images, "InvalidAMIID.NotFound", ImageIds=[emi])
    expect_error(fc.run_instances, "InvalidAMIID.NotFound", ImageId=emi, MinCount=1, MaxCount=1)
    perms = owner.describe_image_attribute(ImageId=emi, Attribute="launchPermission")
    assert perms["LaunchPermissions"] == []

    # Shared with one account (boto3's nested form).
    owner.modify_image_attribute(ImageId=emi, LaunchPermission={"Add": [{"UserId": friend["account_id"]}]})
    perms = owner.describe_image_attribute(ImageId=emi, Attribute="launchPermission")["LaunchPermissions"]
    assert perms == [{"UserId": friend["account_id"]}]
    (seen,) = fc.describe_images(ImageIds=[emi])["Images"]
    assert (seen["OwnerId"], seen["Public"]) == (mine["OwnerId"], False)
    assert emi in {i["ImageId"] for i in fc.describe_images(ExecutableUsers=["self"])["Images"]}
    assert emi not in {i["ImageId"] for i in fc.describe_images(Owners=["self"])["Images"]}
    assert emi in {i["ImageId"] for i in owner.describe_images(ExecutableUsers=[friend["account_id"]])["Images"]}
    launched = fc.run_instances(ImageId=emi, InstanceType="t2.micro", MinCount=1, MaxCount=1)
    iid = launched["Instances"][0]["InstanceId"]
    try:
        assert launched["OwnerId"] == friend["account_id"]
        expect_error(sc.describe_images, "InvalidAMIID.NotFound", ImageIds=[emi])
        # Only the owner reads or changes the permissions.
        expect_error(fc.describe_image_attribute, "UnauthorizedOperation", 403, ImageId=emi,
                     Attribute="launchPermission")
        expect_error(fc.modify_image_attribute, "UnauthorizedOperation", 403, ImageId=emi,
                     LaunchPermission={"Add": [{"Group": "all"}]})
        assert fc.describe_image_attribute(ImageId=emi, Attribute="description")["ImageId"] == emi

        # Everyone, with the CLI's flat form (OperationType, UserGroup.N).
        cloud.aws("ec2", "modify-image-attribute", "--image-id", emi, "--operation-type", "add",
                  "--user-groups", "all")
        (seen,) = sc.describe_images(ImageIds=[emi])["Images"]
        assert seen["Public"] is True
        perms = owner.describe_image_attribute(ImageId=emi, Attribute="launchPermission")["LaunchPermissions"]
        assert {"Group": "all"} in perms and {"UserId": friend["account_id"]} in perms
        assert emi in {i["ImageId"] for i in sc.describe_images(ExecutableUsers=["all"])["Images"]}

        # Reset: private and shared with no one; the friend's instance runs on.
        owner.reset_image_attribute(ImageId=emi, Attribute="launchPermission")
        assert owner.describe_image_attribute(ImageId=emi, Attribute="launchPermission")["LaunchPermissions"] == []
        expect_error(sc.describe_images, "InvalidAMIID.NotFound", ImageIds=[emi])
        expect_error(fc.run_instances, "InvalidAMIID.NotFound", ImageId=emi, MinCount=1, MaxCount=1)
        assert fc.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]["ImageId"] == emi
    finally:
        fc.terminate_instances(InstanceIds=[iid])

    # The description, and EC2's errors.
    owner.modify_image_attribute(ImageId=emi, Description={"Value": "the shared disk"})
    assert owner.describe_image_attribute(ImageId=emi, Attribute="description")["Description"]["Value"] == \
        "the shared disk"
    expect_error(owner.modify_image_attribute, "InvalidUserID.Malformed", ImageId=emi,
                 LaunchPermission={"Add": [{"UserId": "12345"}]})
    expect_error(owner.modify_image_attribute, "InvalidParameterValue", ImageId=emi,
                 LaunchPermission={"Add": [{"Group": "everyone"}]})
    expect_error(owner.modify_image_attribute, "InvalidAMIID.NotFound", ImageId="ami-0123456789abcdef0",
                 LaunchPermission={"Add": [{"Group": "all"}]})
    expect_error(owner.describe_image_attribute, "InvalidParameterValue", ImageId=emi, Attribute="colour")
    expect_error(owner.modify_image_attribute, "DryRunOperation", 412, ImageId=emi,
                 LaunchPermission={"Add": [{"Group": "all"}]}, DryRun=True)
    assert owner.describe_image_attribute(ImageId=emi, Attribute="launchPermission")["LaunchPermissions"] == []
    owner.deregister_image(ImageId=emi)
