-- Elastic IPs (issue 5): addresses allocated to an account from the region's public pool,
-- each associated with at most one instance (and an instance with at most one). Stored and
-- shown; routing them to instances comes with networking.
CREATE TABLE addresses (
    allocation_id  TEXT PRIMARY KEY NOT NULL,
    public_ip      TEXT NOT NULL UNIQUE,
    account_id     TEXT NOT NULL REFERENCES accounts(account_id),
    instance_id    TEXT,
    association_id TEXT,
    allocated_at   TEXT NOT NULL
) STRICT;
CREATE UNIQUE INDEX addresses_instance ON addresses(instance_id) WHERE instance_id IS NOT NULL;
CREATE INDEX addresses_account ON addresses(account_id);
