//! The Raft state machine: committed entries applied to the state tables with
//! [`crate::state::apply`], and snapshots of those tables.

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, StorageIOError};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use sqlx::pool::PoolConnection;
use sqlx::{Sqlite, SqliteConnection, SqlitePool};

use super::types::{
    Entry, LogId, RaftResponse, Rejection, Snapshot, SnapshotMeta, StorageError, StoredMembership,
    TypeConfig,
};
use super::{KvTable, RaftStoreError, read_json, write_json};
use crate::state::{Command, Store, Tx, apply_each};

/// `meta` keys of the state machine's progress. They live in the state's own table, so they
/// are written in the same transaction as the rows they account for, and travel in snapshots.
const LAST_APPLIED: &str = "raft_last_applied_log_id";
const LAST_MEMBERSHIP: &str = "raft_last_membership";

/// Identifies the layout of a snapshot file; bumped when it changes incompatibly.
const SNAPSHOT_FORMAT: &str = "canopy-state-sqlite-1";

/// The cloud controller's state as a Raft state machine, over the [`Store`]'s database.
///
/// Each batch of committed entries is one SQLite transaction holding the state changes, the
/// last applied log id and the last membership: a crash keeps all of a batch or none of it,
/// so a replica never applies an entry twice nor skips one.
///
/// Deliberately not `Clone`: openraft owns the one applier of a replica.
#[derive(Debug)]
pub struct SqliteStateMachine {
    store: Arc<Store>,
}

impl SqliteStateMachine {
    /// A state machine applying to `store`. Once it runs under Raft, nothing else may write
    /// the store (`Store::apply` included), or the replicas would diverge.
    pub fn new(store: Arc<Store>) -> Self {
        Self { store }
    }

    /// The store this state machine applies to, for reads.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    async fn read_applied_state(
        &self,
    ) -> Result<(Option<LogId>, StoredMembership), RaftStoreError> {
        // One read transaction: both values from the same commit.
        let mut tx = self.store.pool().begin().await?;
        let last_applied: Option<LogId> = read_json(&mut tx, KvTable::Meta, LAST_APPLIED)
            .await?
            .flatten();
        let membership = read_json(&mut tx, KvTable::Meta, LAST_MEMBERSHIP)
            .await?
            .unwrap_or_default();
        tx.commit().await?;
        Ok((last_applied, membership))
    }

    async fn apply_batch<I>(&self, entries: I) -> Result<Vec<RaftResponse>, RaftStoreError>
    where
        I: IntoIterator<Item = Entry>,
        I::IntoIter: Send,
    {
        let mut entries = entries.into_iter().peekable();
        if entries.peek().is_none() {
            return Ok(Vec::new());
        }
        let started = std::time::Instant::now();
        let mut tx = ApplyTx::acquire(self.store.pool()).await?;
        let (responses, catalog_changed, volumes_touched) =
            match apply_entries(&mut tx.conn, entries).await {
                Ok(done) => {
                    tx.open = false;
                    done
                }
                Err(e) => {
                    tx.rollback().await;
                    return Err(e);
                }
            };
        if catalog_changed {
            self.store.catalog_changed();
        }
        if volumes_touched {
            self.store.volumes_touched();
        }
        tracing::trace!(
            entries = responses.len(),
            took_ms = started.elapsed().as_secs_f64() * 1e3,
            "applied"
        );
        Ok(responses)
    }

    async fn install(&self, meta: &SnapshotMeta, data: &[u8]) -> Result<(), RaftStoreError> {
        let file = TempDb::new(self.store.pool()).await?;
        tokio::fs::write(&file.path, data).await?;
        let mut conn = self.store.pool().acquire().await?;
        // Durable on its own: openraft purges the log the snapshot covers. Set outside the
        // attach, so a failure here cannot leave the scratch file attached to the pool.
        Store::sync_commits(&mut conn, true).await?;
        let result = match attach(&mut conn, &file).await {
            Ok(()) => {
                let copied = copy_in(&mut conn, meta, data).await;
                detach(&mut conn).await;
                copied
            }
            Err(e) => Err(e),
        };
        self.store.catalog_changed();
        self.store.volumes_touched();
        Store::sync_commits(&mut conn, false).await?;
        result
    }

    async fn current_snapshot(&self) -> Result<Option<Snapshot>, RaftStoreError> {
        let row: Option<(String, Vec<u8>)> =
            sqlx::query_as("SELECT meta, data FROM raft_snapshot WHERE id = 1")
                .fetch_optional(self.store.pool())
                .await?;
        match row {
            Some((meta, data)) => Ok(Some(Snapshot {
                meta: serde_json::from_str(&meta)?,
                snapshot: Box::new(Cursor::new(data)),
            })),
            None => Ok(None),
        }
    }
}

/// A batch's write transaction, begun and ended with statements of its own rather than
/// sqlx's `Transaction`, so that other statements carry them: the first statement also
/// begins it (`BEGIN IMMEDIATE`; a launch run's read does, see `state::Tx`) and the one
/// counting the applied commands also commits it. Every sqlx statement is a round trip to
/// the connection's thread, and a `BEGIN` or `COMMIT` of its own would add one to every
/// entry's apply on every replica (on the leader, on the path of every acknowledged write).
/// While `open` (from the moment a `BEGIN` may have been sent), dropping it — a failure whose
/// rollback failed too, or the apply cancelled — closes the connection instead of handing it
/// back to the pool inside the transaction; SQLite then rolls the transaction back.
struct ApplyTx {
    conn: PoolConnection<Sqlite>,
    open: bool,
}

impl ApplyTx {
    /// A connection for the batch; its first statement begins the transaction.
    ///
    /// `BEGIN IMMEDIATE`: the apply reads before it writes, and a deferred transaction
    /// whose read snapshot went stale (another writer committed meanwhile) would fail at its
    /// first write instead of waiting (busy_timeout) for the lock.
    async fn acquire(pool: &SqlitePool) -> Result<Self, RaftStoreError> {
        let conn = pool.acquire().await?;
        Ok(Self { conn, open: true })
    }

    /// Rolls back now, so the next writer finds the lock free. When that fails (no
    /// transaction had begun, or the connection is broken), the connection is closed.
    async fn rollback(mut self) {
        match sqlx::query("ROLLBACK").execute(&mut *self.conn).await {
            Ok(_) => self.open = false,
            Err(e) => tracing::debug!(error = %e, "rolling back a failed apply"),
        }
    }
}

impl Drop for ApplyTx {
    fn drop(&mut self) {
        if self.open {
            self.conn.close_on_drop();
        }
    }
}

/// Applies `entries` in the transaction `conn` has open, and commits it with the last
/// statement. What it returns: the responses, and whether the catalogue changed and volumes
/// were touched. Failing, it leaves the transaction for the caller to roll back.
async fn apply_entries(
    conn: &mut SqliteConnection,
    entries: impl Iterator<Item = Entry>,
) -> Result<(Vec<RaftResponse>, bool, bool), RaftStoreError> {
    let mut responses = Vec::new();
    let mut last_applied = None;
    let mut membership = None;
    let mut catalog_changed = false;
    let mut volumes_touched = false;
    let mut tx = Tx::BeginImmediate;
    for entry in entries {
        if let EntryPayload::Normal(command) = &entry.payload {
            catalog_changed |= command.changes_catalog();
            volumes_touched |= command.may_await_nodes_on_volumes();
        }
        let response = match entry.payload {
            EntryPayload::Blank => RaftResponse::NoCommand,
            EntryPayload::Normal(command) => {
                let response = match command.command() {
                    Command::Batch(commands) => {
                        RaftResponse::Batch(apply_commands(conn, commands, tx).await?)
                    }
                    command => {
                        let one = std::slice::from_ref(command);
                        apply_commands(conn, one, tx).await?.remove(0)
                    }
                };
                // `apply_each` began it, whatever the commands.
                tx = Tx::Open;
                response
            }
            EntryPayload::Membership(m) => {
                membership = Some(StoredMembership::new(Some(entry.log_id), m));
                RaftResponse::NoCommand
            }
        };
        last_applied = Some(entry.log_id);
        responses.push(response);
    }
    // Only blank and membership entries: nothing has begun the transaction yet.
    crate::state::begin_if_pending(conn, tx).await?;
    if let Some(membership) = membership {
        write_json(conn, KvTable::Meta, LAST_MEMBERSHIP, &membership).await?;
    }
    // The same count `Store::apply` keeps, so `Store::last_applied` means "commands
    // applied" on either path and both paths leave identical rows; one call a batch, with
    // the last applied log id, and the commit.
    let applied = count_commands(&responses);
    let last_applied_json = serde_json::to_string(&last_applied)?;
    crate::state::count_applied_and_commit(conn, applied, Some((LAST_APPLIED, last_applied_json)))
        .await?;
    Ok((responses, catalog_changed, volumes_touched))
}

/// How many commands were applied (not rejected) in these responses.
fn count_commands(responses: &[RaftResponse]) -> i64 {
    responses
        .iter()
        .map(|r| match r {
            RaftResponse::Applied(_) => 1,
            RaftResponse::Batch(each) => count_commands(each),
            RaftResponse::Rejected(_) | RaftResponse::NoCommand => 0,
        })
        .sum()
}

/// Applies commands in order (see [`apply_each`]). A deterministic rejection wrote nothing
/// and still counts as applied: every replica rejects it the same way. Any other failure
/// aborts the whole batch.
async fn apply_commands(
    conn: &mut SqliteConnection,
    commands: &[Command],
    tx: Tx,
) -> Result<Vec<RaftResponse>, RaftStoreError> {
    let results = apply_each(conn, commands, tx)
        .await
        .map_err(RaftStoreError::Apply)?;
    results
        .into_iter()
        .map(|result| match result {
            Ok(outcome) => Ok(RaftResponse::Applied(outcome)),
            Err(error) => Rejection::try_from(error)
                .map(RaftResponse::Rejected)
                .map_err(RaftStoreError::Apply),
        })
        .collect()
}

impl RaftStateMachine<TypeConfig> for SqliteStateMachine {
    type SnapshotBuilder = SqliteSnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        self.read_applied_state()
            .await
            .map_err(|e| StorageIOError::read_state_machine(&e).into())
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<RaftResponse>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.apply_batch(entries)
            .await
            .map_err(|e| StorageIOError::write_state_machine(&e).into())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SqliteSnapshotBuilder {
            pool: self.store.pool().clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        self.install(meta, snapshot.get_ref())
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e).into())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        self.current_snapshot()
            .await
            .map_err(|e| StorageIOError::read_snapshot(None, &e).into())
    }
}

/// Builds snapshots beside the state machine: it only reads the state (in one read
/// transaction, which WAL keeps consistent while entries go on being applied).
#[derive(Debug, Clone)]
pub struct SqliteSnapshotBuilder {
    pool: SqlitePool,
}

impl SqliteSnapshotBuilder {
    async fn build(&self) -> Result<Snapshot, RaftStoreError> {
        let file = TempDb::new(&self.pool).await?;
        let mut conn = self.pool.acquire().await?;
        attach(&mut conn, &file).await?;
        let copied = copy_out(&mut conn).await;
        detach(&mut conn).await;
        drop(conn);
        let (last_log_id, last_membership) = copied?;
        let data = tokio::fs::read(&file.path).await?;
        let snapshot_id = match last_log_id {
            Some(id) => format!(
                "{}-{}-{:016x}",
                id.leader_id.term,
                id.index,
                rand::random::<u64>()
            ),
            None => format!("none-{:016x}", rand::random::<u64>()),
        };
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
            snapshot_id,
        };
        // Once built, openraft purges the log before the snapshot (but the last
        // `max_in_snapshot_log_to_keep` entries): the state that log held must survive a
        // crash first. A commit that fsyncs the WAL makes every earlier commit durable too.
        let mut conn = self.pool.acquire().await?;
        Store::sync_commits(&mut conn, true).await?;
        let saved = save_current(&mut conn, &meta, &data, Replace::IfNotOlder).await;
        Store::sync_commits(&mut conn, false).await?;
        saved?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SqliteSnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        self.build()
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, &e).into())
    }
}

/// Whether [`save_current`] may replace a snapshot that covers more of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replace {
    /// An installed snapshot is the leader's word and always wins.
    Always,
    /// A built one may have been overtaken by an install while it was being built.
    IfNotOlder,
}

async fn save_current(
    conn: &mut SqliteConnection,
    meta: &SnapshotMeta,
    data: &[u8],
    replace: Replace,
) -> Result<(), RaftStoreError> {
    let last_index = match meta.last_log_id {
        Some(id) => super::db_index(id.index)?,
        None => -1,
    };
    sqlx::query(
        "INSERT INTO raft_snapshot(id, last_log_index, meta, data) VALUES (1, ?1, ?2, ?3)
         ON CONFLICT(id) DO UPDATE SET
             last_log_index = excluded.last_log_index, meta = excluded.meta, data = excluded.data
         WHERE ?4 OR excluded.last_log_index >= raft_snapshot.last_log_index",
    )
    .bind(last_index)
    .bind(serde_json::to_string(meta)?)
    .bind(data)
    .bind(replace == Replace::Always)
    .execute(conn)
    .await?;
    Ok(())
}

/// The tables of `schema` (`main` or `snap`) that make up the cloud's state: everything but
/// SQLite's own, sqlx's (`_sqlx_migrations`), the snapshot's bookkeeping (`_snapshot_*`) and the
/// Raft log's (`raft_*`). Found from the catalogue rather than listed, so a table added by a
/// later migration is in snapshots without anyone remembering to add it here.
async fn state_tables(
    conn: &mut SqliteConnection,
    schema: Schema,
) -> Result<Vec<String>, RaftStoreError> {
    let sql = match schema {
        Schema::Main => {
            r"SELECT name FROM main.sqlite_master WHERE type = 'table'
              AND name NOT LIKE 'sqlite\_%' ESCAPE '\' AND name NOT LIKE '\_%' ESCAPE '\'
              AND name NOT LIKE 'raft\_%' ESCAPE '\' ORDER BY name"
        }
        Schema::Snap => {
            r"SELECT name FROM snap.sqlite_master WHERE type = 'table'
              AND name NOT LIKE 'sqlite\_%' ESCAPE '\' AND name NOT LIKE '\_%' ESCAPE '\'
              AND name NOT LIKE 'raft\_%' ESCAPE '\' ORDER BY name"
        }
    };
    let rows: Vec<(String,)> = sqlx::query_as(sql).fetch_all(conn).await?;
    Ok(rows.into_iter().map(|(name,)| name).collect())
}

#[derive(Debug, Clone, Copy)]
enum Schema {
    Main,
    Snap,
}

fn quoted(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

/// The newest migration applied to the main database. A snapshot is only installed on a
/// replica at the same schema, because rows are copied column for column.
async fn schema_version(conn: &mut SqliteConnection) -> Result<i64, RaftStoreError> {
    let (v,): (i64,) =
        sqlx::query_as("SELECT COALESCE(MAX(version), 0) FROM main._sqlx_migrations")
            .fetch_one(conn)
            .await?;
    Ok(v)
}

/// Copies the state tables into the attached, empty `snap` database, in one transaction that
/// reads the state, the last applied log id and the membership from the same commit.
async fn copy_out(
    conn: &mut SqliteConnection,
) -> Result<(Option<LogId>, StoredMembership), RaftStoreError> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let last_applied: Option<LogId> = read_json(&mut tx, KvTable::Meta, LAST_APPLIED)
        .await?
        .flatten();
    let membership: StoredMembership = read_json(&mut tx, KvTable::Meta, LAST_MEMBERSHIP)
        .await?
        .unwrap_or_default();
    let version = schema_version(&mut tx).await?;
    sqlx::query(
        "CREATE TABLE snap._snapshot_info(key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)",
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO snap._snapshot_info(key, value) VALUES ('format', ?), ('schema_version', ?)",
    )
    .bind(SNAPSHOT_FORMAT)
    .bind(version.to_string())
    .execute(&mut *tx)
    .await?;
    for table in state_tables(&mut tx, Schema::Main).await? {
        let t = quoted(&table);
        // Table names come from our own catalogue, never from input.
        let sql = format!("CREATE TABLE snap.{t} AS SELECT * FROM main.{t}");
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut *tx)
            .await?;
    }
    // AUTOINCREMENT counters are state too: `instances.seq` orders listings, and a replica
    // restored from a snapshot must hand out the same next value as the others.
    sqlx::query(
        "CREATE TABLE snap._snapshot_autoinc AS SELECT name, seq FROM main.sqlite_sequence",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((last_applied, membership))
}

/// Replaces the state tables' rows with the attached `snap` database's, records `meta` as
/// applied and keeps the snapshot as the current one, all in one transaction.
async fn copy_in(
    conn: &mut SqliteConnection,
    meta: &SnapshotMeta,
    data: &[u8],
) -> Result<(), RaftStoreError> {
    let info: Vec<(String, String)> = sqlx::query_as("SELECT key, value FROM snap._snapshot_info")
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| RaftStoreError::BadSnapshot(format!("not a state snapshot: {e}")))?;
    let get = |k: &str| {
        info.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    if get("format") != Some(SNAPSHOT_FORMAT) {
        return Err(RaftStoreError::BadSnapshot(format!(
            "format {:?}, expected {SNAPSHOT_FORMAT:?}",
            get("format")
        )));
    }
    let ours = schema_version(conn).await?.to_string();
    if get("schema_version") != Some(ours.as_str()) {
        return Err(RaftStoreError::BadSnapshot(format!(
            "schema version {:?}, this replica is at {ours}",
            get("schema_version")
        )));
    }
    let tables = state_tables(conn, Schema::Main).await?;
    let theirs = state_tables(conn, Schema::Snap).await?;
    if tables != theirs {
        return Err(RaftStoreError::BadSnapshot(format!(
            "tables {theirs:?}, expected {tables:?}"
        )));
    }

    let mut tx = sqlx::Connection::begin_with(&mut *conn, "BEGIN IMMEDIATE").await?;
    // Rows are deleted and reinserted table by table, so references hold only at the end.
    // The pragma lasts until this transaction ends.
    sqlx::query("PRAGMA defer_foreign_keys = ON")
        .execute(&mut *tx)
        .await?;
    for table in &tables {
        let t = quoted(table);
        // Table names come from our own catalogue, checked equal to the snapshot's.
        let delete = format!("DELETE FROM main.{t}");
        sqlx::query(sqlx::AssertSqlSafe(delete))
            .execute(&mut *tx)
            .await?;
        let insert = format!("INSERT INTO main.{t} SELECT * FROM snap.{t}");
        sqlx::query(sqlx::AssertSqlSafe(insert))
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("DELETE FROM main.sqlite_sequence")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO main.sqlite_sequence(name, seq) SELECT name, seq FROM snap._snapshot_autoinc",
    )
    .execute(&mut *tx)
    .await?;
    // The leader's meta is authoritative; it equals what the snapshot's `meta` table says.
    write_json(&mut tx, KvTable::Meta, LAST_APPLIED, &meta.last_log_id).await?;
    write_json(
        &mut tx,
        KvTable::Meta,
        LAST_MEMBERSHIP,
        &meta.last_membership,
    )
    .await?;
    save_current(&mut tx, meta, data, Replace::Always).await?;
    tx.commit().await?;
    Ok(())
}

/// A scratch SQLite file for one snapshot, removed when dropped. It sits beside the database
/// (same filesystem, no tmpfs size limit) or, for an in-memory store, in the temp dir.
struct TempDb {
    path: PathBuf,
}

impl TempDb {
    async fn new(pool: &SqlitePool) -> Result<TempDb, RaftStoreError> {
        let rows: Vec<(i64, String, String)> = sqlx::query_as("PRAGMA database_list")
            .fetch_all(pool)
            .await?;
        let dir = rows
            .iter()
            .find(|(_, name, file)| name == "main" && !file.is_empty())
            .and_then(|(_, _, file)| PathBuf::from(file).parent().map(PathBuf::from))
            .unwrap_or_else(std::env::temp_dir);
        let path = dir.join(format!(".raft-snapshot-{:016x}.db", rand::random::<u64>()));
        // An empty file is a valid empty SQLite database.
        tokio::fs::write(&path, b"").await?;
        Ok(TempDb { path })
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        for suffix in ["", "-journal"] {
            let mut p = self.path.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }
}

async fn attach(conn: &mut SqliteConnection, file: &TempDb) -> Result<(), RaftStoreError> {
    let path = file
        .path
        .to_str()
        .ok_or_else(|| RaftStoreError::BadSnapshot(format!("path {:?} is not UTF-8", file.path)))?;
    // A URI with mode=rwc, because ATTACH inherits the main database's open flags: on an
    // in-memory store (SQLITE_OPEN_MEMORY) a plain path would attach another in-memory
    // database and the file would stay empty.
    const URI_RESERVED: &AsciiSet = &CONTROLS.add(b'%').add(b'?').add(b'#');
    let uri = format!("file:{}?mode=rwc", utf8_percent_encode(path, URI_RESERVED));
    sqlx::query("ATTACH DATABASE ? AS snap")
        .bind(uri)
        .execute(conn)
        .await?;
    Ok(())
}

/// Detaches `snap` so the pooled connection goes back clean. A failure is only logged: the
/// operation's own result matters more, and a connection still holding `snap` fails its next
/// ATTACH loudly rather than silently.
async fn detach(conn: &mut SqliteConnection) {
    if let Err(e) = sqlx::query("DETACH DATABASE snap").execute(conn).await {
        tracing::warn!(error = %e, "could not detach the snapshot database");
    }
}
