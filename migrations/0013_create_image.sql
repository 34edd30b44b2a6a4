-- CreateImage (issue 5): machine images made from a stopped instance's root disk. As on
-- AWS, the image's root is a snapshot (its block device mapping names it): the node that
-- holds the instance flattens the root overlay and its base image into one standalone
-- image and uploads it through the snapshot path. See docs/architecture.md, "CreateImage".
--
-- images.state gains 'pending' (the snapshot is being taken) and 'failed' (it could not
-- be; state_reason_* say why), besides 'available' and 'deregistered'.
-- root_snapshot_id / root_volume_gib: the snapshot of the root disk and the disk's size
-- (NULL for registered images, whose root is the instance store).
-- source_instance_id: the instance it was made from (EC2's sourceInstanceId).
ALTER TABLE images ADD COLUMN root_snapshot_id TEXT;
ALTER TABLE images ADD COLUMN root_volume_gib INTEGER;
ALTER TABLE images ADD COLUMN source_instance_id TEXT;
ALTER TABLE images ADD COLUMN state_reason_code TEXT;
ALTER TABLE images ADD COLUMN state_reason_message TEXT;
CREATE INDEX images_root_snapshot ON images(root_snapshot_id) WHERE root_snapshot_id IS NOT NULL;

-- A snapshot of an instance's root disk names the instance and the node that holds it
-- (which takes it); volume_id is then 'vol-ffffffff', as AWS shows for snapshots that do
-- not come from a volume of the account.
ALTER TABLE snapshots ADD COLUMN instance_id TEXT;
ALTER TABLE snapshots ADD COLUMN node_id TEXT;
