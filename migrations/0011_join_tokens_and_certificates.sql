-- Components that authenticate each other (issue 6).
--
-- Join tokens: an operator creates one (admin API), a new node presents it once to get its
-- certificate. Only a SHA-256 of the secret is kept.
CREATE TABLE join_tokens (
    token_id    TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    zone        TEXT,            -- NULL: the node may join any zone
    description TEXT NOT NULL DEFAULT '',
    created_at  TEXT NOT NULL,
    expires_at  TEXT NOT NULL,
    used_at     TEXT,
    used_by     TEXT             -- the node id that spent it
) STRICT;

-- Certificates the cloud issued through joins, and every revoked serial (a certificate
-- made with `canopy ca issue` is known here once revoked: role and name empty).
CREATE TABLE certificates (
    serial     TEXT PRIMARY KEY, -- lowercase hex
    role       TEXT NOT NULL,    -- clc | zone | node | '' (unknown)
    name       TEXT NOT NULL,
    zone       TEXT,
    token_id   TEXT,
    issued_at  TEXT,
    revoked_at TEXT
) STRICT;
CREATE INDEX certificates_by_name ON certificates(role, name);
CREATE INDEX certificates_revoked ON certificates(revoked_at) WHERE revoked_at IS NOT NULL;
