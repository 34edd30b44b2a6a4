-- Image launch permissions (issue 5): the accounts, besides its owner, that may see and
-- launch a private image (ModifyImageAttribute's LaunchPermission with a UserId). The group
-- "all" is the image's is_public.
CREATE TABLE image_launch_permissions (
    image_id   TEXT NOT NULL REFERENCES images(image_id),
    account_id TEXT NOT NULL,
    PRIMARY KEY (image_id, account_id)
) STRICT;
CREATE INDEX image_launch_permissions_account ON image_launch_permissions(account_id);
