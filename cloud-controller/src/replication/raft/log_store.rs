//! The Raft log, vote and log pointers in the state's SQLite database.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, OptionalSend, RaftLogReader, StorageIOError, Vote};
use sqlx::SqlitePool;

use super::types::{Entry, LogId, RaftNodeId, StorageError, TypeConfig};
use super::{KvTable, RaftStoreError, db_index, read_json, write_json};
use crate::state::Store;

const VOTE: &str = "vote";
const LAST_PURGED: &str = "last_purged_log_id";
// The committed log id is not stored (openraft's default `save_committed` does nothing):
// storing it cost one more fsync per commit on every replica, and a restarted replica
// learns the commit index from the leader anyway; what it applied is in the state itself.

/// The durable Raft log of one replica: in a database of its own ([`SqliteLogStore::open`]),
/// so appending never waits for the state machine's write lock (SQLite has one writer per
/// database), or in the state's database ([`SqliteLogStore::new`], for tests).
///
/// openraft serializes every write (`&mut self`); reads from replication tasks go through
/// clones ([`RaftLogStorage::get_log_reader`]), which SQLite's WAL lets run beside writes.
///
/// The last [`RECENT_ENTRIES`] entries appended are also kept in memory, shared by the
/// clones: almost every read is of entries just appended (the leader sending them to the
/// followers, every replica applying them once committed), and serving those from memory
/// saves a query and a JSON parse per entry per read.
#[derive(Debug, Clone)]
pub struct SqliteLogStore {
    pool: SqlitePool,
    recent: Arc<Mutex<BTreeMap<u64, Entry>>>,
}

/// How many of the last appended entries [`SqliteLogStore`] keeps in memory. An entry is a
/// batch of up to 512 commands, so this bounds the memory to a few megabytes.
const RECENT_ENTRIES: usize = 256;

impl SqliteLogStore {
    /// A log store over `store`'s database. The `raft_*` tables come with the store's
    /// migrations.
    pub fn new(store: &Store) -> Self {
        Self {
            pool: store.pool().clone(),
            recent: Arc::default(),
        }
    }

    fn recent(&self) -> MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A log store in its own database file at `path` (created if missing), written with
    /// the same durability as the state: WAL, every commit fsynced.
    pub async fn open(path: &std::path::Path) -> Result<Self, sqlx::Error> {
        use sqlx::sqlite::{
            SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
        };
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            // See `Store::open`: an embedded database's connection does not go stale.
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        // The same two tables the state database's migration 0002 has.
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS raft_log (
                 log_index INTEGER PRIMARY KEY NOT NULL,
                 term      INTEGER NOT NULL,
                 payload   BLOB NOT NULL
             ) STRICT;
             CREATE TABLE IF NOT EXISTS raft_meta (
                 key   TEXT PRIMARY KEY NOT NULL,
                 value TEXT NOT NULL
             ) STRICT;",
        )
        .execute(&pool)
        .await?;
        Ok(Self {
            pool,
            recent: Arc::default(),
        })
    }

    /// Closes the database (the state's, when the log shares it).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn entries(&self, start: i64, end_inclusive: i64) -> Result<Vec<Entry>, RaftStoreError> {
        {
            // From memory when it holds the whole range.
            let recent = self.recent();
            let held = (start..=end_inclusive).try_fold(Vec::new(), |mut out, i| {
                let entry = recent.get(&u64::try_from(i).ok()?)?;
                out.push(entry.clone());
                Some(out)
            });
            if let Some(entries) = held {
                return Ok(entries);
            }
        }
        let rows: Vec<(Vec<u8>,)> = sqlx::query_as(
            "SELECT payload FROM raft_log WHERE log_index >= ? AND log_index <= ?
             ORDER BY log_index",
        )
        .bind(start)
        .bind(end_inclusive)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(payload,)| Ok(serde_json::from_slice(&payload)?))
            .collect()
    }

    async fn log_state(&self) -> Result<LogState<TypeConfig>, RaftStoreError> {
        let mut conn = self.pool.acquire().await?;
        let last_purged: Option<LogId> = read_json(&mut conn, KvTable::RaftMeta, LAST_PURGED)
            .await?
            .flatten();
        let last: Option<(Vec<u8>,)> =
            sqlx::query_as("SELECT payload FROM raft_log ORDER BY log_index DESC LIMIT 1")
                .fetch_optional(&mut *conn)
                .await?;
        let last_log_id = match last {
            Some((payload,)) => Some(serde_json::from_slice::<Entry>(&payload)?.log_id),
            // An empty log (everything purged) ends where the purge did.
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id,
        })
    }

    /// Writes the whole batch in one transaction: one commit, so one fsync (WAL with
    /// synchronous=FULL), however many entries a leader or a follower appends at once.
    ///
    /// A batch of up to [`ROWS_PER_INSERT`] entries — nearly every append — is one
    /// statement, its own transaction: each sqlx statement is a round trip to the
    /// connection's thread, and an explicit `BEGIN` and `COMMIT` would make it three, on the
    /// path of every commit on every replica. A single statement waits for the write lock
    /// (busy_timeout) like `BEGIN IMMEDIATE`, and is atomic.
    async fn append_batch<I>(&self, entries: I) -> Result<(), RaftStoreError>
    where
        I: IntoIterator<Item = Entry>,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let rows = entries
            .iter()
            .map(|e| {
                Ok((
                    db_index(e.log_id.index)?,
                    db_index(e.log_id.leader_id.term)?,
                    serde_json::to_vec(&e)?,
                ))
            })
            .collect::<Result<Vec<_>, RaftStoreError>>()?;
        if rows.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        if rows.len() <= ROWS_PER_INSERT {
            insert_rows(&mut *self.pool.acquire().await?, rows).await?;
        } else {
            // IMMEDIATE takes the write lock up front, waiting (busy_timeout) for another
            // writer instead of failing half-way.
            let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
            let mut rows = rows.into_iter().peekable();
            while rows.peek().is_some() {
                insert_rows(&mut tx, rows.by_ref().take(ROWS_PER_INSERT).collect()).await?;
            }
            tx.commit().await?;
        }
        let mut recent = self.recent();
        for entry in entries {
            recent.insert(entry.log_id.index, entry);
        }
        while recent.len() > RECENT_ENTRIES {
            recent.pop_first();
        }
        drop(recent);
        tracing::trace!(took_ms = started.elapsed().as_secs_f64() * 1e3, "appended");
        Ok(())
    }

    async fn delete_since(&self, log_id: &LogId) -> Result<(), RaftStoreError> {
        // Before the rows: a read never finds in memory what the log no longer holds.
        self.recent().retain(|&i, _| i < log_id.index);
        sqlx::query("DELETE FROM raft_log WHERE log_index >= ?")
            .bind(db_index(log_id.index)?)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records the purge point before deleting, in one transaction, so `get_log_state` never
    /// sees a log that starts later than the recorded purge point.
    async fn delete_upto(&self, log_id: &LogId) -> Result<(), RaftStoreError> {
        self.recent().retain(|&i, _| i > log_id.index);
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        write_json(&mut tx, KvTable::RaftMeta, LAST_PURGED, &Some(*log_id)).await?;
        sqlx::query("DELETE FROM raft_log WHERE log_index <= ?")
            .bind(db_index(log_id.index)?)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn write<T: serde::Serialize>(&self, key: &str, value: &T) -> Result<(), RaftStoreError> {
        let mut conn = self.pool.acquire().await?;
        write_json(&mut conn, KvTable::RaftMeta, key, value).await
    }

    async fn read<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, RaftStoreError> {
        let mut conn = self.pool.acquire().await?;
        read_json(&mut conn, KvTable::RaftMeta, key).await
    }
}

/// The most log rows one `INSERT` writes (three parameters a row, far below SQLite's limit).
const ROWS_PER_INSERT: usize = 64;

/// Writes `rows` (index, term, payload) in one statement. `REPLACE`: an index openraft
/// appends again after a truncate gets the new entry.
async fn insert_rows(
    conn: &mut sqlx::SqliteConnection,
    rows: Vec<(i64, i64, Vec<u8>)>,
) -> Result<(), sqlx::Error> {
    let mut sql = String::from("INSERT OR REPLACE INTO raft_log(log_index, term, payload) VALUES ");
    for i in 0..rows.len() {
        sql.push_str(if i == 0 { "(?, ?, ?)" } else { ", (?, ?, ?)" });
    }
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for (index, term, payload) in rows {
        query = query.bind(index).bind(term).bind(payload);
    }
    query.execute(conn).await?;
    Ok(())
}

/// `range` as inclusive SQLite bounds, or `None` when it is empty.
fn sql_bounds<RB: RangeBounds<u64>>(range: &RB) -> Option<(i64, i64)> {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.checked_add(1)?,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e,
        Bound::Excluded(&e) => e.checked_sub(1)?,
        Bound::Unbounded => u64::MAX,
    };
    if start > end {
        return None;
    }
    // Indexes above i64::MAX cannot be stored, so clamping loses nothing.
    let clamp = |i: u64| i64::try_from(i).unwrap_or(i64::MAX);
    Some((clamp(start), clamp(end)))
}

impl RaftLogReader<TypeConfig> for SqliteLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let Some((start, end)) = sql_bounds(&range) else {
            return Ok(Vec::new());
        };
        self.entries(start, end)
            .await
            .map_err(|e| StorageIOError::read_logs(&e).into())
    }
}

impl RaftLogStorage<TypeConfig> for SqliteLogStore {
    type LogReader = SqliteLogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        self.log_state()
            .await
            .map_err(|e| StorageIOError::read_logs(&e).into())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<RaftNodeId>) -> Result<(), StorageError> {
        self.write(VOTE, vote)
            .await
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<RaftNodeId>>, StorageError> {
        self.read(VOTE)
            .await
            .map_err(|e| StorageIOError::read_vote(&e).into())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // The transaction has committed (and so fsynced) when append_batch returns: only then
        // may openraft count these entries towards a quorum.
        match self.append_batch(entries).await {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(&e).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.delete_since(&log_id)
            .await
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.delete_upto(&log_id)
            .await
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}
