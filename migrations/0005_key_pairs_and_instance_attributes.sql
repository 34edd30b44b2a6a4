-- Key pairs (issue 5): only the public key and EC2's fingerprint are kept; the private key
-- of a created pair is returned once and never stored. A name is unique per account.
CREATE TABLE key_pairs (
    key_pair_id TEXT PRIMARY KEY NOT NULL,
    account_id  TEXT NOT NULL REFERENCES accounts(account_id),
    key_name    TEXT NOT NULL,
    key_type    TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    -- The OpenSSH public key line, `ssh-… AAAA…`, without comment.
    public_key  TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    UNIQUE (account_id, key_name)
) STRICT;

-- The public key an instance was launched with: it stays the instance's (as on EC2) when
-- the key pair is deleted, and the metadata service serves it.
ALTER TABLE instances ADD COLUMN public_key TEXT;

-- Instance attributes set with ModifyInstanceAttribute: termination and stop protection
-- (TerminateInstances / StopInstances refuse a protected instance).
ALTER TABLE instances ADD COLUMN disable_api_termination INTEGER NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN disable_api_stop INTEGER NOT NULL DEFAULT 0;

-- Bumped by every StartInstances, and sent to the node with the desired state: a node that
-- saw the guest stop on its own starts it again only for a start it has not seen yet, even
-- when it never saw the stopped desired state in between (documents can be coalesced).
ALTER TABLE instances ADD COLUMN start_seq INTEGER NOT NULL DEFAULT 0;
