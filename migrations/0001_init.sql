-- Canopy cloud-controller state. Written only by state::apply (one command at a time,
-- each in one transaction), so every replica that applies the same commands holds the
-- same rows.

CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
) STRICT;

CREATE TABLE accounts (
    account_id TEXT PRIMARY KEY NOT NULL,
    name       TEXT NOT NULL UNIQUE,
    is_admin   INTEGER NOT NULL,
    created_at TEXT NOT NULL
) STRICT;

CREATE TABLE access_keys (
    access_key_id     TEXT PRIMARY KEY NOT NULL,
    account_id        TEXT NOT NULL REFERENCES accounts(account_id),
    secret_access_key TEXT NOT NULL,
    created_at        TEXT NOT NULL
) STRICT;

CREATE TABLE images (
    image_id            TEXT PRIMARY KEY NOT NULL,
    owner_id            TEXT NOT NULL,
    name                TEXT NOT NULL,
    description         TEXT NOT NULL,
    location            TEXT NOT NULL,
    architecture        TEXT NOT NULL,
    is_public           INTEGER NOT NULL,
    state               TEXT NOT NULL,
    created_at          TEXT NOT NULL
) STRICT;

CREATE TABLE zones (
    zone          TEXT PRIMARY KEY NOT NULL,
    endpoint      TEXT NOT NULL,
    -- Bumped by every change to the zone's desired state; pushed with it to the CC.
    generation    INTEGER NOT NULL,
    registered_at TEXT NOT NULL
) STRICT;

CREATE TABLE reservations (
    reservation_id TEXT PRIMARY KEY NOT NULL,
    account_id     TEXT NOT NULL REFERENCES accounts(account_id),
    client_token   TEXT,
    -- Fingerprint of the launch request, to refuse a reused ClientToken with other parameters.
    request_hash   TEXT NOT NULL,
    created_at     TEXT NOT NULL
) STRICT;
CREATE UNIQUE INDEX reservations_client_token ON reservations(account_id, client_token)
    WHERE client_token IS NOT NULL;

CREATE TABLE instances (
    seq                  INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_id          TEXT NOT NULL UNIQUE,
    reservation_id       TEXT NOT NULL REFERENCES reservations(reservation_id),
    account_id           TEXT NOT NULL REFERENCES accounts(account_id),
    launch_index         INTEGER NOT NULL,
    image_id             TEXT NOT NULL,
    instance_type        TEXT NOT NULL,
    vcpus                INTEGER NOT NULL,
    memory_mib           INTEGER NOT NULL,
    disk_gib             INTEGER NOT NULL,
    zone                 TEXT NOT NULL,
    node_id              TEXT,
    key_name             TEXT,
    user_data            BLOB,
    client_token         TEXT,
    state                TEXT NOT NULL,
    desired              TEXT NOT NULL,
    reboot_seq           INTEGER NOT NULL DEFAULT 0,
    state_reason_code    TEXT,
    state_reason_message TEXT,
    transition_reason    TEXT NOT NULL DEFAULT '',
    launch_time          TEXT NOT NULL,
    state_changed_at     TEXT NOT NULL,
    terminated_at        TEXT
) STRICT;
CREATE INDEX instances_account ON instances(account_id, seq);
CREATE INDEX instances_zone ON instances(zone, state);

CREATE TABLE tags (
    resource_id   TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    account_id    TEXT NOT NULL,
    key           TEXT NOT NULL,
    value         TEXT NOT NULL,
    PRIMARY KEY (resource_id, key)
) STRICT;
CREATE INDEX tags_account ON tags(account_id, resource_id);
