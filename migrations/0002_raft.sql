-- Replicated log (openraft, issue 3). These tables live in the same database as the state so
-- that one file, one WAL and one fsync policy (synchronous=FULL) cover both. They are not
-- state: snapshots leave out every table named raft_*.
--
-- The state machine's own progress (last applied log id, last membership) is NOT here but in
-- `meta`, written in the same transaction as the state changes it describes.

-- One row per log entry. `payload` is the serde_json encoding of the whole openraft Entry
-- (log id, and the command or membership it carries).
CREATE TABLE raft_log (
    log_index INTEGER PRIMARY KEY NOT NULL,
    term      INTEGER NOT NULL,
    payload   BLOB NOT NULL
) STRICT;

-- The log store's small records, each a JSON value: `vote`, `committed`, `last_purged_log_id`.
CREATE TABLE raft_meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
) STRICT;

-- The current snapshot: at most one row. Kept in the database, rather than as a file, so that
-- installing a snapshot replaces the state and records the snapshot in one transaction.
CREATE TABLE raft_snapshot (
    id             INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    -- -1 when the snapshot covers no entry; used to never replace a newer snapshot by an older.
    last_log_index INTEGER NOT NULL,
    meta           TEXT NOT NULL,
    data           BLOB NOT NULL
) STRICT;
