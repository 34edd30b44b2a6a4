-- Volumes (issue 5): block devices of an account in one zone, attached to at most one
-- instance there. The node that runs the instance keeps the volume's bytes (a qcow2 file in
-- its volume directory, made at the first attach); see docs/architecture.md.
--
-- state: 'available', 'in-use' or 'deleted'. Deleted rows stay as tombstones, so that the
-- zone's nodes are told (for a day) to remove the bytes; the API no longer shows them.
-- attach_status: NULL, 'attaching', 'attached' or 'detaching'. 'attaching' becomes
-- 'attached', and 'detaching' clears the attachment, when the node reports it.
CREATE TABLE volumes (
    volume_id       TEXT PRIMARY KEY NOT NULL,
    account_id      TEXT NOT NULL REFERENCES accounts(account_id),
    zone            TEXT NOT NULL,
    size_gib        INTEGER NOT NULL,
    volume_type     TEXT NOT NULL,
    iops            INTEGER,
    throughput      INTEGER,
    client_token    TEXT,
    state           TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    deleted_at      TEXT,
    instance_id     TEXT,
    device          TEXT,
    attach_status   TEXT,
    attach_time     TEXT,
    delete_on_termination INTEGER NOT NULL DEFAULT 0,
    -- A node has attached it once: its bytes exist somewhere, and a node without them must
    -- not make an empty file in their place.
    initialized     INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE INDEX volumes_account ON volumes(account_id) WHERE state != 'deleted';
CREATE INDEX volumes_instance ON volumes(instance_id) WHERE instance_id IS NOT NULL;
CREATE INDEX volumes_deleted ON volumes(zone, deleted_at) WHERE state = 'deleted';
CREATE UNIQUE INDEX volumes_client_token ON volumes(account_id, client_token)
    WHERE client_token IS NOT NULL;
CREATE INDEX volumes_pending ON volumes(zone) WHERE attach_status IN ('attaching', 'detaching');
