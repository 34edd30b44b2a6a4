use std::path::Path;
use std::str::FromStr;

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use tokio::sync::Mutex;

use super::{Command, Image, Outcome, StateError, apply};
use canopy_common::{AccountId, ImageId, ImageKind, ZoneName};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// How much of the state database each connection may map into memory (address space, not
/// memory: the kernel's page cache backs it).
const MMAP_SIZE: u64 = 1 << 30;
/// SQLite's page cache per connection, as `PRAGMA cache_size` takes it (negative: KiB).
const CACHE_SIZE_KIB: i64 = -32 * 1024;

/// The SQLite database holding the state machine. Reads go straight to the pool; writes
/// go only through [`Store::apply`], one command at a time.
#[derive(Debug)]
pub struct Store {
    pool: SqlitePool,
    /// Serializes apply: the state machine applies one command after another.
    writer: Mutex<()>,
    catalog: std::sync::Mutex<CatalogCache>,
    /// Counts the commands that may have left attachments waiting for a node (see
    /// [`Command::may_await_nodes_on_volumes`] and [`Store::volumes_may_await_nodes`]).
    volume_epoch: std::sync::atomic::AtomicU64,
    /// The `volume_epoch` at which a read found no attachment waiting; `u64::MAX` until then.
    volumes_settled_at: std::sync::atomic::AtomicU64,
}

/// What every launch reads and almost nothing changes: the images and the zones' names.
#[derive(Debug, Clone, PartialEq)]
pub struct Catalog {
    pub images: Vec<Image>,
    pub zones: Vec<ZoneName>,
}

/// Why an id cannot serve as a kernel or ramdisk ([`Catalog::boot_image`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootImageError {
    /// No available image of that id is visible to the account.
    NotFound,
    /// It is an image of another kind.
    WrongKind(ImageKind),
}

impl Catalog {
    /// The image `id` if `account` may use it, whatever its state.
    pub fn visible_image(&self, id: &ImageId, account: &AccountId) -> Option<&Image> {
        self.images
            .iter()
            .find(|i| &i.image_id == id && i.visible_to(account))
    }

    /// Checks that `id` can boot instances of `account` as a `want` (kernel or ramdisk):
    /// visible, available, of that kind.
    pub fn boot_image(
        &self,
        id: &ImageId,
        account: &AccountId,
        want: ImageKind,
    ) -> Result<(), BootImageError> {
        let found = self
            .visible_image(id, account)
            .filter(|i| i.state == "available")
            .ok_or(BootImageError::NotFound)?;
        if found.kind == want {
            Ok(())
        } else {
            Err(BootImageError::WrongKind(found.kind))
        }
    }
}

/// The last [`Catalog`] read, valid until a commit that may change it.
#[derive(Debug, Default)]
struct CatalogCache {
    /// Moves on every such commit; a copy read across a move is not kept.
    epoch: u64,
    current: Option<std::sync::Arc<Catalog>>,
}

impl Store {
    /// Opens (creating if needed) `path` and runs pending migrations, for a replica's state
    /// machine: commits are atomic but not fsynced (WAL with synchronous=NORMAL). The Raft
    /// log is what makes a change durable (it is fsynced before the change is committed, see
    /// `SqliteLogStore::open`); after a crash of the machine the state may lack its last
    /// commits, and the replica applies them again from the log, as etcd's backend does.
    /// The log behind a snapshot is purged only once the snapshot's commit is fsynced (see
    /// [`Store::sync_commits`]), so it can always be applied again.
    pub async fn open(path: &Path) -> Result<Store, StateError> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(std::time::Duration::from_secs(10))
            // Reads of pages SQLite's own cache lacks go through a memory map instead of a
            // pread (a system call and a copy) each; and that cache holds 32 MiB a connection,
            // not 2, so the instances' B-trees stay in it as the cloud grows. Writes are
            // unchanged (the WAL), and so is durability.
            .pragma("mmap_size", MMAP_SIZE.to_string())
            .pragma("cache_size", CACHE_SIZE_KIB.to_string());
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            // No ping before each use: the database is a file in this process, so a
            // connection cannot go stale, and the ping is one more round trip to the
            // connection's thread on every query and transaction.
            .test_before_acquire(false)
            .connect_with(opts)
            .await?;
        Self::with_pool(pool).await
    }

    /// A private in-memory database, for tests.
    pub async fn in_memory() -> Result<Store, StateError> {
        let opts = SqliteConnectOptions::from_str("sqlite::memory:")?.foreign_keys(true);
        // One connection: every connection to :memory: is a database of its own.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await?;
        Self::with_pool(pool).await
    }

    async fn with_pool(pool: SqlitePool) -> Result<Store, StateError> {
        MIGRATOR.run(&pool).await?;
        Ok(Store {
            pool,
            writer: Mutex::new(()),
            catalog: Default::default(),
            volume_epoch: Default::default(),
            // Unknown at start: the first report intake looks.
            volumes_settled_at: std::sync::atomic::AtomicU64::new(u64::MAX),
        })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Whether commits on `conn` fsync the WAL (`PRAGMA synchronous`, per connection). A
    /// commit that fsyncs it makes every earlier commit durable too (the WAL is one file,
    /// written in order), so a snapshot commits with `true` and sets it back to `false`.
    pub async fn sync_commits(
        conn: &mut sqlx::SqliteConnection,
        sync: bool,
    ) -> Result<(), sqlx::Error> {
        let pragma = if sync {
            "PRAGMA synchronous = FULL"
        } else {
            "PRAGMA synchronous = NORMAL"
        };
        sqlx::query(pragma).execute(conn).await?;
        Ok(())
    }

    /// Applies one command in one transaction, and records it as the last applied index.
    /// A rejected command writes nothing.
    pub async fn apply(&self, command: &Command) -> Result<Outcome, StateError> {
        let _guard = self.writer.lock().await;
        // IMMEDIATE: `apply` reads before it writes, and a deferred transaction cannot wait
        // for the write lock once it has read (SQLite answers "database is locked" at once).
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let outcome = match apply(&mut tx, command).await {
            Ok(outcome) => outcome,
            Err(e) => {
                // Now, not when the pool gets to it: the next command must find the lock free.
                tx.rollback().await?;
                return Err(e);
            }
        };
        count_applied(&mut tx, 1, None).await?;
        tx.commit().await?;
        if command.changes_catalog() {
            self.catalog_changed();
        }
        if command.may_await_nodes_on_volumes() {
            self.volumes_touched();
        }
        Ok(outcome)
    }

    /// The images and zones, from memory unless a commit changed them since the last read.
    pub async fn catalog(&self) -> Result<std::sync::Arc<Catalog>, StateError> {
        let epoch = {
            let cache = self.lock_catalog();
            if let Some(current) = &cache.current {
                return Ok(current.clone());
            }
            cache.epoch
        };
        let catalog = std::sync::Arc::new(Catalog {
            images: self.images().await?,
            zones: self.zones().await?.into_iter().map(|z| z.zone).collect(),
        });
        let mut cache = self.lock_catalog();
        if cache.epoch == epoch {
            cache.current = Some(catalog.clone());
        }
        Ok(catalog)
    }

    /// A committed command may have left attachments waiting for a node's word.
    pub(crate) fn volumes_touched(&self) {
        self.volume_epoch
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Whether attachments may be waiting for a node's word: false only when a read found
    /// none and no command that could leave one has committed since. Lets the report
    /// intake skip its query on a cloud whose volumes are all settled (the common case).
    pub fn volumes_may_await_nodes(&self) -> (bool, u64) {
        use std::sync::atomic::Ordering;
        let epoch = self.volume_epoch.load(Ordering::Acquire);
        (
            self.volumes_settled_at.load(Ordering::Acquire) != epoch,
            epoch,
        )
    }

    /// A read begun at `epoch` (from [`Store::volumes_may_await_nodes`]) found nothing
    /// waiting.
    pub fn volumes_settled(&self, epoch: u64) {
        self.volumes_settled_at
            .store(epoch, std::sync::atomic::Ordering::Release);
    }

    /// Called after committing anything that may change the [`Catalog`] (a command for
    /// which [`Command::changes_catalog`] holds, or an installed snapshot).
    pub(crate) fn catalog_changed(&self) {
        let mut cache = self.lock_catalog();
        cache.epoch += 1;
        cache.current = None;
    }

    /// Moves whenever the [`Catalog`] may have changed (images, snapshots, zones): what
    /// watchers of the images' bytes compare to know whether to look again.
    pub fn catalog_epoch(&self) -> u64 {
        self.lock_catalog().epoch
    }

    fn lock_catalog(&self) -> std::sync::MutexGuard<'_, CatalogCache> {
        self.catalog.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many commands this store has applied.
    pub async fn last_applied(&self) -> Result<u64, StateError> {
        let v: Option<(String,)> =
            sqlx::query_as("SELECT value FROM meta WHERE key = 'last_applied'")
                .fetch_optional(&self.pool)
                .await?;
        Ok(v.and_then(|(s,)| s.parse().ok()).unwrap_or(0))
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// The statements of [`count_applied`]; a macro so that [`count_applied_and_commit`] can
/// append its `COMMIT` at compile time.
macro_rules! count_applied_sql {
    () => {
        "INSERT INTO meta(key, value) SELECT 'last_applied', CAST(? AS TEXT) WHERE ? > 0
         ON CONFLICT(key) DO UPDATE SET value = CAST(CAST(value AS INTEGER) + excluded.value AS TEXT);
         INSERT INTO meta(key, value) SELECT ?, ? WHERE ? IS NOT NULL
         ON CONFLICT(key) DO UPDATE SET value = excluded.value;"
    };
}

/// Counts `commands` more applied commands in `meta.last_applied`, in the caller's
/// transaction, so that the single-replica path and the Raft state machine keep the same
/// count; and sets one more `meta` row (`also`: key, value) in the same call.
pub(crate) async fn count_applied(
    conn: &mut sqlx::SqliteConnection,
    commands: i64,
    also: Option<(&str, String)>,
) -> Result<(), sqlx::Error> {
    count_applied_then(conn, count_applied_sql!(), commands, also).await
}

/// [`count_applied`], then `COMMIT`, in one call: for a transaction begun by hand with a
/// `BEGIN` statement (not sqlx's `Transaction`, which knows nothing of this `COMMIT`).
/// Failing, it may leave the transaction open: the caller rolls back.
pub(crate) async fn count_applied_and_commit(
    conn: &mut sqlx::SqliteConnection,
    commands: i64,
    also: Option<(&str, String)>,
) -> Result<(), sqlx::Error> {
    count_applied_then(
        conn,
        concat!(count_applied_sql!(), " COMMIT;"),
        commands,
        also,
    )
    .await
}

async fn count_applied_then(
    conn: &mut sqlx::SqliteConnection,
    sql: &'static str,
    commands: i64,
    also: Option<(&str, String)>,
) -> Result<(), sqlx::Error> {
    let (key, value) = also.unzip();
    sqlx::query(sql)
        // Plain `?` in order: see the note in `state::bulk` on numbered parameters.
        .bind(commands)
        .bind(commands)
        .bind(key)
        .bind(value)
        .bind(key)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// A fingerprint of the whole state machine, for comparing replicas.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct StateDigest {
    /// The Raft log id last applied (`index`), as the state machine records it; replicas
    /// that applied the same entries hold the same digest.
    pub applied_index: Option<u64>,
    /// SHA-256 over every state table's rows (columns as SQL literals, in primary-key
    /// order).
    pub sha256: String,
    /// Rows per table.
    pub rows: std::collections::BTreeMap<String, u64>,
    /// SHA-256 per table, to tell which table two replicas disagree on.
    pub tables: std::collections::BTreeMap<String, String>,
}

impl Store {
    /// The state's digest, read in one transaction (so it matches `applied_index`). Every
    /// table but SQLite's, sqlx's and the Raft log's, found from the catalogue: a table a
    /// later migration adds is covered without being named here.
    pub async fn digest(&self) -> Result<StateDigest, StateError> {
        use sha2::Digest;
        let mut tx = self.pool().begin().await?;
        let tables: Vec<(String,)> = sqlx::query_as(
            r"SELECT name FROM sqlite_master WHERE type = 'table'
              AND name NOT LIKE 'sqlite\_%' ESCAPE '\' AND name NOT LIKE '\_%' ESCAPE '\'
              AND name NOT LIKE 'raft\_%' ESCAPE '\' ORDER BY name",
        )
        .fetch_all(&mut *tx)
        .await?;
        let mut hash = sha2::Sha256::new();
        let mut rows = std::collections::BTreeMap::new();
        let mut tables_sha = std::collections::BTreeMap::new();
        for (table,) in tables {
            let columns: Vec<(String, i64)> =
                sqlx::query_as("SELECT name, pk FROM pragma_table_info(?) ORDER BY cid")
                    .bind(&table)
                    .fetch_all(&mut *tx)
                    .await?;
            let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
            let expr = columns
                .iter()
                .map(|(c, _)| format!("quote({})", quote(c)))
                .collect::<Vec<_>>()
                .join(" || ',' || ");
            // Rows in primary-key order (every column for a table without one), not rowid
            // order: a replica that installed a snapshot holds the same rows inserted in
            // another order.
            let mut key: Vec<&(String, i64)> = columns.iter().filter(|(_, pk)| *pk > 0).collect();
            key.sort_by_key(|(_, pk)| *pk);
            if key.is_empty() {
                key = columns.iter().collect();
            }
            let order = key
                .iter()
                .map(|(c, _)| quote(c))
                .collect::<Vec<_>>()
                .join(", ");
            // Names come from SQLite's own catalogue, quoted.
            let sql = format!("SELECT {expr} FROM {} ORDER BY {order}", quote(&table));
            let lines: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .fetch_all(&mut *tx)
                .await?;
            hash.update(format!("table {table}\n"));
            let mut one = sha2::Sha256::new();
            for (line,) in &lines {
                hash.update(line.as_bytes());
                hash.update(b"\n");
                one.update(line.as_bytes());
                one.update(b"\n");
            }
            tables_sha.insert(table.clone(), hex::encode(one.finalize()));
            rows.insert(table, lines.len() as u64);
        }
        let applied: Option<(String,)> =
            sqlx::query_as("SELECT value FROM meta WHERE key = 'raft_last_applied_log_id'")
                .fetch_optional(&mut *tx)
                .await?;
        tx.commit().await?;
        let applied_index = applied
            .and_then(|(json,)| serde_json::from_str::<serde_json::Value>(&json).ok())
            .and_then(|v| v.get("index").and_then(serde_json::Value::as_u64));
        Ok(StateDigest {
            applied_index,
            sha256: hex::encode(hash.finalize()),
            rows,
            tables: tables_sha,
        })
    }
}
