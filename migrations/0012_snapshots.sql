-- Snapshots (issue 5): point-in-time copies of volumes, their bytes in the CLC's image
-- store (content-addressed, like images'). See docs/architecture.md, "Snapshots".
--
-- state: 'pending' (a node of `zone` copies the volume and uploads the copy), 'completed'
-- (sha256/size_bytes name the bytes; both NULL for a snapshot of a volume no node ever
-- wrote, which is all zeros) or 'error' (status_message says why).
-- zone: the volume's zone, whose nodes are asked to take the snapshot.
CREATE TABLE snapshots (
    snapshot_id     TEXT PRIMARY KEY NOT NULL,
    account_id      TEXT NOT NULL REFERENCES accounts(account_id),
    volume_id       TEXT NOT NULL,
    zone            TEXT NOT NULL,
    volume_size_gib INTEGER NOT NULL,
    description     TEXT NOT NULL DEFAULT '',
    state           TEXT NOT NULL,
    status_message  TEXT,
    started_at      TEXT NOT NULL,
    completed_at    TEXT,
    sha256          TEXT,
    size_bytes      INTEGER
) STRICT;
CREATE INDEX snapshots_account ON snapshots(account_id);
CREATE INDEX snapshots_pending ON snapshots(zone) WHERE state = 'pending';

-- A volume made from a snapshot names it, and keeps the snapshot's bytes (digest, size)
-- for the node that makes the volume's file at its first attach: the snapshot may be
-- deleted meanwhile, its bytes are kept while such a volume needs them.
ALTER TABLE volumes ADD COLUMN snapshot_id TEXT;
ALTER TABLE volumes ADD COLUMN source_sha256 TEXT;
ALTER TABLE volumes ADD COLUMN source_size INTEGER;
