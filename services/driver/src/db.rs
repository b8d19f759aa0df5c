//! Every SQL statement of the driver, behind one type: embedded SQLite by default, PostgreSQL
//! for operators who run one. Both go through sqlx's `Any` driver, so there is one code path;
//! only the schema's DDL differs (see `migrations/`).
//!
//! Two tables: `subjects` holds one row per task or session (its record as a protobuf, the
//! driver's bookkeeping, and columns to filter and page by), `events` the append-only logs in
//! chunks keyed by (subject, first sequence): one row per subject and commit, so that writing
//! a thousand events costs one insert. A log and its subject's row are written in the same
//! transaction.

use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, AssertSqlSafe, Row as _};

/// PostgreSQL advisory locks of the drivers sharing a database: one migrates at a time, and one
/// leads.
const MIGRATION_LOCK: i64 = 0x636c_7573_7465_7200;
pub const LEADER_LOCK: i64 = 0x636c_7573_7465_7201;

/// How often an embedded store copies its write-ahead log into the database, off the commit
/// path. SQLite would otherwise do it inside the commit that crosses its threshold, fsync and
/// all: milliseconds that every submission waiting on that commit would wait too.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(500);
/// How long an embedded store's connection waits for a lock another process holds before it
/// gives up. This driver's own writes take turns (see `Db::write_turn`) and never wait here.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A schema migration: its version and its statements for each backend.
struct Migration {
    version: i64,
    sqlite: &'static str,
    postgres: &'static str,
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sqlite: include_str!("../migrations/sqlite/0001_initial.sql"),
        postgres: include_str!("../migrations/postgres/0001_initial.sql"),
    },
    Migration {
        version: 2,
        sqlite: include_str!("../migrations/sqlite/0002_keys_and_audit.sql"),
        postgres: include_str!("../migrations/postgres/0002_keys_and_audit.sql"),
    },
    Migration {
        version: 3,
        sqlite: include_str!("../migrations/sqlite/0003_usage.sql"),
        postgres: include_str!("../migrations/postgres/0003_usage.sql"),
    },
    Migration {
        version: 4,
        sqlite: include_str!("../migrations/sqlite/0004_leadership.sql"),
        postgres: include_str!("../migrations/postgres/0004_leadership.sql"),
    },
];

/// What one task run or session message cost, as stored.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UsageRow {
    pub subject: String,
    /// The session message; 0 for a task.
    pub turn: u32,
    pub session: bool,
    pub time_ms: i64,
    /// The root task of the task's tree; empty for a session.
    pub tree: String,
    pub owner: String,
    pub worker: String,
    pub model: String,
    pub cost_usd: f64,
    pub metered_cost_usd: f64,
    pub tokens: claudecluster_proto::v1::TokenUsage,
    pub metered_tokens: claudecluster_proto::v1::TokenUsage,
}

/// A key made with CreateApiKey, as stored.
#[derive(Debug, Clone)]
pub struct KeyRow {
    pub id: String,
    pub sha256: String,
    pub scopes: Vec<String>,
    /// `KeyQuotas` as protobuf.
    pub quotas: Vec<u8>,
    pub created_by: String,
    pub created_ms: i64,
    pub revoked_ms: Option<i64>,
}

/// An audit record as stored.
#[derive(Debug, Clone)]
pub struct AuditRow {
    pub seq: i64,
    pub time_ms: i64,
    pub key_id: String,
    pub action: String,
    pub subject: String,
    pub detail: String,
}

/// Events in one chunk at most, so that a replay reads what it needs and no more.
const EVENTS_PER_CHUNK: usize = 1024;
/// Rows in one multi-row INSERT at most: well within SQLite's 32,766 and PostgreSQL's 65,535
/// bound parameters at nine columns a row.
const ROWS_PER_STATEMENT: usize = 512;
/// Finished tasks compacted in one round at most, so that a round stays short.
const COMPACTIONS_PER_ROUND: i64 = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// What a row of `subjects` is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectKind {
    Task = 1,
    Session = 2,
}

/// A subject's row as the driver writes it.
#[derive(Debug, Clone)]
pub struct Row {
    pub kind: SubjectKind,
    pub status: i32,
    pub ended: bool,
    pub idempotency_key: Option<String>,
    /// The public record (`Task` or `Session`) as protobuf.
    pub record: Vec<u8>,
    /// The driver's own bookkeeping about it, as protobuf.
    pub bookkeeping: Vec<u8>,
    pub last_sequence: u64,
    /// Milliseconds since the epoch when it ended.
    pub end_time_ms: Option<i64>,
}

/// An event as stored: its sequence and its protobuf.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub sequence: u64,
    pub bytes: Vec<u8>,
}

/// One subject's share of a commit: its row and the events appended since the last one.
#[derive(Debug, Clone)]
pub struct Write {
    pub id: String,
    pub row: Row,
    pub events: Vec<StoredEvent>,
}

/// A subject's row as read back.
#[derive(Debug, Clone)]
pub struct LoadedRow {
    pub order: i64,
    pub id: String,
    pub kind: SubjectKind,
    pub record: Vec<u8>,
    pub bookkeeping: Vec<u8>,
    pub last_sequence: u64,
}

/// Why the store failed. The message never holds a password: URLs are shown without one.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot open the store at {place}: {message}")]
    Open { place: String, message: String },
    #[error("cannot migrate the store at {place} to schema version {version}: {message}")]
    Migrate {
        place: String,
        version: i64,
        message: String,
    },
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    #[error("a stored record is damaged: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for DbError {
    fn from(error: sqlx::Error) -> Self {
        DbError::Unavailable(error.to_string())
    }
}

pub struct Db {
    pool: AnyPool,
    pub backend: Backend,
    /// Where the store is, for messages: a path or a URL without its password.
    pub place: String,
    /// Stops the background checkpoints of an embedded store with it.
    _checkpoints: tokio_util::sync::DropGuard,
    /// An embedded store's turn to write (see `write_turn`).
    writing: tokio::sync::Mutex<()>,
}

/// Copies an embedded store's write-ahead log into the database every `CHECKPOINT_INTERVAL`
/// on a connection of its own, until `stop` or the pool closes. PASSIVE: it never waits for
/// the writer or blocks it; the writer starts the log afresh once everything in it has been
/// copied.
async fn checkpoint_until(pool: AnyPool, stop: tokio_util::sync::CancellationToken) {
    let mut ticks = tokio::time::interval(CHECKPOINT_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if pool.is_closed() {
            return;
        }
        if let Err(err) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&pool)
            .await
        {
            // The next commit past the threshold checkpoints by itself; a store that cannot
            // be written is reported by the writer.
            tracing::debug!(error = %err, "cannot checkpoint the store now");
        }
    }
}

/// A URL as it may be shown: without the password.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((credentials, host)) => {
            let user = credentials.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_owned(),
    }
}

impl Db {
    /// Opens the store at `url` (`sqlite://PATH` or `postgres://…`) and brings its schema up
    /// to date.
    pub async fn open(url: &str, max_connections: u32) -> Result<Db, DbError> {
        Self::open_with(url, max_connections, SQLITE_BUSY_TIMEOUT).await
    }

    async fn open_with(
        url: &str,
        max_connections: u32,
        sqlite_busy_timeout: Duration,
    ) -> Result<Db, DbError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("postgres") {
            Backend::Postgres
        } else {
            Backend::Sqlite
        };
        let place = match backend {
            Backend::Sqlite => url
                .trim_start_matches("sqlite://")
                .trim_start_matches("sqlite:")
                .split('?')
                .next()
                .unwrap_or_default()
                .to_owned(),
            Backend::Postgres => redacted(url),
        };
        let open_error = |message: String| DbError::Open {
            place: place.clone(),
            message,
        };
        let mut url = url.to_owned();
        if backend == Backend::Sqlite {
            if let Some(parent) = std::path::Path::new(&place).parent()
                && !parent.as_os_str().is_empty()
            {
                std::fs::create_dir_all(parent).map_err(|err| open_error(err.to_string()))?;
            }
            if !url.contains('?') {
                url.push_str("?mode=rwc");
            }
        }
        let options: AnyConnectOptions = url
            .parse()
            .map_err(|err: sqlx::Error| open_error(err.to_string()))?;
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            // A connection to a server may have died while idle; an embedded file's cannot, and
            // a ping before every transaction is one more trip to its thread.
            .test_before_acquire(backend == Backend::Postgres)
            .after_connect(move |connection, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL lets readers go on while the writer commits; NORMAL syncs at
                        // checkpoints, which survives a crash of the process (not of the host).
                        // Checkpoints run in the background (see `checkpoint_until`).
                        let busy_timeout =
                            format!("PRAGMA busy_timeout = {}", sqlite_busy_timeout.as_millis());
                        for pragma in [
                            "PRAGMA journal_mode = WAL",
                            "PRAGMA synchronous = NORMAL",
                            &busy_timeout,
                            "PRAGMA foreign_keys = ON",
                            // Past 8192 pages (32 MiB) a commit still checkpoints by
                            // itself: a backstop should the background ones fall behind.
                            "PRAGMA wal_autocheckpoint = 8192",
                        ] {
                            sqlx::query(AssertSqlSafe(pragma.to_owned()))
                                .execute(&mut *connection)
                                .await?;
                        }
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(|err| open_error(err.to_string()))?;
        let checkpoints = tokio_util::sync::CancellationToken::new();
        if backend == Backend::Sqlite {
            tokio::spawn(checkpoint_until(pool.clone(), checkpoints.clone()));
        }
        let db = Db {
            pool,
            backend,
            place,
            _checkpoints: checkpoints.drop_guard(),
            writing: tokio::sync::Mutex::new(()),
        };
        db.migrate().await?;
        Ok(db)
    }

    async fn migrate(&self) -> Result<(), DbError> {
        let failed = |version: i64, err: sqlx::Error| DbError::Migrate {
            place: self.place.clone(),
            version,
            message: err.to_string(),
        };
        // On one connection, under a lock on PostgreSQL: drivers that start together on one
        // database (a leader and its standby) migrate one after the other.
        let mut conn = self.pool.acquire().await.map_err(|err| failed(0, err))?;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_lock($1)")
                .bind(MIGRATION_LOCK)
                .execute(&mut *conn)
                .await
                .map_err(|err| failed(0, err))?;
        }
        let migrated = self.migrate_on(&mut conn).await;
        if self.backend == Backend::Postgres {
            let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(MIGRATION_LOCK)
                .execute(&mut *conn)
                .await;
        }
        migrated
    }

    async fn migrate_on(&self, conn: &mut sqlx::AnyConnection) -> Result<(), DbError> {
        let failed = |version: i64, err: sqlx::Error| DbError::Migrate {
            place: self.place.clone(),
            version,
            message: err.to_string(),
        };
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_ms BIGINT NOT NULL)",
        )
        .execute(&mut *conn)
        .await
        .map_err(|err| failed(0, err))?;
        let applied: Option<i64> = sqlx::query("SELECT MAX(version) FROM schema_migrations")
            .fetch_one(&mut *conn)
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|err| failed(0, err))?;
        let applied = applied.unwrap_or(0);
        for migration in MIGRATIONS.iter().filter(|m| m.version > applied) {
            let script = match self.backend {
                Backend::Sqlite => migration.sqlite,
                Backend::Postgres => migration.postgres,
            };
            let mut tx = sqlx::Connection::begin(&mut *conn)
                .await
                .map_err(|err| failed(migration.version, err))?;
            let code: String = script
                .lines()
                .filter(|line| !line.trim_start().starts_with("--"))
                .map(|line| format!("{line}\n"))
                .collect();
            for statement in code.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                sqlx::query(AssertSqlSafe(statement.to_owned()))
                    .execute(&mut *tx)
                    .await
                    .map_err(|err| failed(migration.version, err))?;
            }
            sqlx::query("INSERT INTO schema_migrations (version, applied_ms) VALUES ($1, $2)")
                .bind(migration.version)
                .bind(now_ms())
                .execute(&mut *tx)
                .await
                .map_err(|err| failed(migration.version, err))?;
            tx.commit()
                .await
                .map_err(|err| failed(migration.version, err))?;
            tracing::info!(store = %self.place, version = migration.version, "store schema migrated");
        }
        Ok(())
    }

    /// Waits until this driver may write to an embedded store: one write at a time. SQLite
    /// takes one writer at a time, and a second one waits in its busy handler, which sleeps
    /// 1 ms, then 2, 5, 10… before it looks again: the audit log's writes and the journals'
    /// commits meeting there put milliseconds on requests waiting for a commit. Waiting here,
    /// the next write starts the moment the one before ends. A server store needs no turn.
    async fn write_turn(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match self.backend {
            Backend::Sqlite => Some(self.writing.lock().await),
            Backend::Postgres => None,
        }
    }

    /// Writes rows and events in one transaction: all or nothing.
    pub async fn commit(&self, writes: &[Write]) -> Result<(), DbError> {
        if writes.is_empty() {
            return Ok(());
        }
        let _turn = self.write_turn().await;
        let chunks: Vec<(&str, &[StoredEvent])> = writes
            .iter()
            .flat_map(|write| {
                write
                    .events
                    .chunks(EVENTS_PER_CHUNK)
                    .map(move |chunk| (write.id.as_str(), chunk))
            })
            .collect();
        let values = writes.len() * SUBJECT_COLUMNS + chunks.len() * CHUNK_COLUMNS;
        if self.backend == Backend::Sqlite && values <= SQLITE_MAX_VALUES {
            return self.commit_in_one_trip(writes, &chunks).await;
        }
        let mut tx = self.pool.begin().await?;
        insert_rows(
            &mut tx,
            SUBJECTS_INSERT,
            SUBJECT_COLUMNS,
            SUBJECTS_ON_CONFLICT,
            writes,
            bind_subject,
        )
        .await?;
        insert_rows(
            &mut tx,
            CHUNKS_INSERT,
            CHUNK_COLUMNS,
            CHUNKS_ON_CONFLICT,
            &chunks,
            bind_chunk,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// A commit to an embedded store as one script, transaction and all: one trip to the
    /// connection's thread where statement by statement takes four, and a commit is what
    /// every SubmitTask waits for.
    async fn commit_in_one_trip(
        &self,
        writes: &[Write],
        chunks: &[(&str, &[StoredEvent])],
    ) -> Result<(), DbError> {
        let mut script = String::from("BEGIN IMMEDIATE; ");
        script.push_str(&multi_row_insert(
            SUBJECTS_INSERT,
            SUBJECT_COLUMNS,
            writes.len(),
            SUBJECTS_ON_CONFLICT,
            1,
        ));
        if !chunks.is_empty() {
            script.push_str("; ");
            script.push_str(&multi_row_insert(
                CHUNKS_INSERT,
                CHUNK_COLUMNS,
                chunks.len(),
                CHUNKS_ON_CONFLICT,
                1 + writes.len() * SUBJECT_COLUMNS,
            ));
        }
        script.push_str("; COMMIT");
        let query = writes
            .iter()
            .fold(sqlx::query(AssertSqlSafe(script)), bind_subject);
        let query = chunks.iter().fold(query, bind_chunk);
        let mut connection = self.pool.acquire().await?;
        if let Err(err) = query.execute(&mut *connection).await {
            // A statement that failed leaves the transaction open on this connection: it must
            // not go back to the pool so. A connection that cannot even roll back is dropped.
            if sqlx::query("ROLLBACK")
                .execute(&mut *connection)
                .await
                .is_err()
            {
                drop(connection.detach());
            }
            return Err(err.into());
        }
        Ok(())
    }

    /// Removes a subject and its events in one transaction. False when there was none.
    pub async fn delete_subject(&self, id: &str) -> Result<bool, DbError> {
        let _turn = self.write_turn().await;
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM events WHERE subject = $1")
            .bind(id.to_owned())
            .execute(&mut *tx)
            .await?;
        let deleted = sqlx::query("DELETE FROM subjects WHERE id = $1")
            .bind(id.to_owned())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(deleted > 0)
    }

    fn loaded(row: sqlx::any::AnyRow) -> Result<LoadedRow, DbError> {
        let kind = match row.try_get::<i64, _>("kind")? {
            1 => SubjectKind::Task,
            2 => SubjectKind::Session,
            other => return Err(DbError::Corrupt(format!("unknown subject kind {other}"))),
        };
        Ok(LoadedRow {
            order: row.try_get("ord")?,
            id: row.try_get("id")?,
            kind,
            record: row.try_get("record")?,
            bookkeeping: row.try_get("bookkeeping")?,
            last_sequence: row.try_get::<i64, _>("last_sequence")? as u64,
        })
    }

    pub async fn get(&self, id: &str) -> Result<Option<LoadedRow>, DbError> {
        let row = sqlx::query(
            "SELECT ord, id, kind, record, bookkeeping, last_sequence FROM subjects WHERE id = $1",
        )
        .bind(id.to_owned())
        .fetch_optional(&self.pool)
        .await?;
        row.map(Self::loaded).transpose()
    }

    /// The id of the task submitted with `key`, if any.
    pub async fn by_idempotency_key(&self, key: &str) -> Result<Option<String>, DbError> {
        let row = sqlx::query("SELECT id FROM subjects WHERE idempotency_key = $1")
            .bind(key.to_owned())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|row| row.try_get("id")).transpose()?)
    }

    /// Subjects of `kind` that have not ended: what a restarted driver takes up again.
    pub async fn live(&self, kind: SubjectKind) -> Result<Vec<LoadedRow>, DbError> {
        let rows = sqlx::query(
            "SELECT ord, id, kind, record, bookkeeping, last_sequence FROM subjects \
             WHERE kind = $1 AND ended = 0 ORDER BY ord",
        )
        .bind(kind as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(Self::loaded).collect()
    }

    /// Subjects of `kind` after position `after`, in creation order, at most `limit`, with one
    /// of `statuses` (any when empty).
    pub async fn page(
        &self,
        kind: SubjectKind,
        after: i64,
        limit: usize,
        statuses: &[i32],
    ) -> Result<Vec<LoadedRow>, DbError> {
        let mut sql = String::from(
            "SELECT ord, id, kind, record, bookkeeping, last_sequence FROM subjects WHERE kind = $1 AND ord > $2",
        );
        if !statuses.is_empty() {
            // Integers the caller parsed from an enum: nothing a client can inject.
            let list: Vec<String> = statuses.iter().map(i32::to_string).collect();
            sql.push_str(&format!(" AND status IN ({})", list.join(", ")));
        }
        sql.push_str(" ORDER BY ord LIMIT $3");
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(kind as i64)
            .bind(after)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(Self::loaded).collect()
    }

    /// Events of `subject` with sequence in `(after, up_to]`, in order, from at most `chunks`
    /// chunks: their sequence and protobuf; and whether that is all there is up to `up_to`. A
    /// damaged chunk is reported and skipped; what could be read of it is kept.
    pub async fn events(
        &self,
        subject: &str,
        after: u64,
        up_to: u64,
        chunks: usize,
    ) -> Result<(Vec<(u64, Vec<u8>)>, bool), DbError> {
        let rows = sqlx::query(
            "SELECT first_seq, events FROM events WHERE subject = $1 AND last_seq > $2 AND first_seq <= $3 \
             ORDER BY first_seq LIMIT $4",
        )
        .bind(subject.to_owned())
        .bind(after.min(i64::MAX as u64) as i64)
        .bind(up_to.min(i64::MAX as u64) as i64)
        .bind(chunks.min(i64::MAX as usize) as i64)
        .fetch_all(&self.pool)
        .await?;
        let complete = rows.len() < chunks;
        let mut events = Vec::new();
        for row in rows {
            let first: i64 = row.try_get("first_seq")?;
            let bytes: Vec<u8> = row.try_get("events")?;
            let (read, damage) = split_chunk(&bytes);
            if let Some(damage) = damage {
                tracing::error!(subject, first_sequence = first, error = %damage, "a stored chunk of events is damaged; skipping the rest of it");
            }
            for (offset, event) in read.into_iter().enumerate() {
                let sequence = first as u64 + offset as u64;
                if sequence > after && sequence <= up_to {
                    events.push((sequence, event));
                }
            }
        }
        Ok((events, complete))
    }

    /// Tasks by status: `(status, count)`.
    pub async fn count_by_status(&self, kind: SubjectKind) -> Result<Vec<(i32, u64)>, DbError> {
        let rows = sqlx::query(
            "SELECT status, COUNT(*) AS n FROM subjects WHERE kind = $1 GROUP BY status",
        )
        .bind(kind as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                Ok((
                    row.try_get::<i64, _>("status")? as i32,
                    row.try_get::<i64, _>("n")? as u64,
                ))
            })
            .collect()
    }

    /// Compacts the logs of finished tasks that ended before `ended_before_ms`, or that are
    /// older than the newest `keep` finished ones: only the events `keep_event` keeps (status
    /// changes and the result) stay. Compacts at most a round's worth; returns how many tasks.
    pub async fn compact(
        &self,
        ended_before_ms: i64,
        keep: u64,
        keep_event: impl Fn(&[u8]) -> bool,
    ) -> Result<u64, DbError> {
        let boundary: Option<i64> = sqlx::query(
            "SELECT ord FROM subjects WHERE kind = 1 AND ended = 1 ORDER BY ord DESC LIMIT 1 OFFSET $1",
        )
        .bind(keep as i64)
        .fetch_optional(&self.pool)
        .await?
        .map(|row| row.try_get("ord"))
        .transpose()?;
        let boundary = boundary.map_or(-1, |ord| ord + 1);
        let due: Vec<String> = sqlx::query(
            "SELECT id FROM subjects WHERE kind = 1 AND ended = 1 AND compacted = 0 \
             AND (end_ms < $1 OR ord < $2) ORDER BY ord LIMIT $3",
        )
        .bind(ended_before_ms)
        .bind(boundary)
        .bind(COMPACTIONS_PER_ROUND)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|row| row.try_get("id"))
        .collect::<Result<_, _>>()?;
        for id in &due {
            let (events, _) = self
                .events(id, 0, i64::MAX as u64, i64::MAX as usize)
                .await?;
            let kept: Vec<StoredEvent> = events
                .into_iter()
                .filter(|(_, bytes)| keep_event(bytes))
                .map(|(sequence, bytes)| StoredEvent { sequence, bytes })
                .collect();
            let _turn = self.write_turn().await;
            let mut tx = self.pool.begin().await?;
            sqlx::query("DELETE FROM events WHERE subject = $1")
                .bind(id.clone())
                .execute(&mut *tx)
                .await?;
            // The kept events are not contiguous: each is a chunk of its own.
            for event in &kept {
                sqlx::query(
                    "INSERT INTO events (subject, first_seq, last_seq, events) VALUES ($1, $2, $3, $4)",
                )
                .bind(id.clone())
                .bind(event.sequence as i64)
                .bind(event.sequence as i64)
                .bind(chunk_bytes(std::slice::from_ref(event)))
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query("UPDATE subjects SET compacted = 1 WHERE id = $1")
                .bind(id.clone())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
        Ok(due.len() as u64)
    }

    /// Stores a new key; false when its id is taken.
    pub async fn insert_key(&self, key: &KeyRow) -> Result<bool, DbError> {
        let _turn = self.write_turn().await;
        let inserted = sqlx::query(
            "INSERT INTO api_keys (id, sha256, scopes, quotas, created_by, created_ms) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(key.id.clone())
        .bind(key.sha256.clone())
        .bind(key.scopes.join(" "))
        .bind(key.quotas.clone())
        .bind(key.created_by.clone())
        .bind(key.created_ms)
        .execute(&self.pool)
        .await?;
        Ok(inserted.rows_affected() == 1)
    }

    fn key_row(row: sqlx::any::AnyRow) -> Result<KeyRow, DbError> {
        let scopes: String = row.try_get("scopes")?;
        Ok(KeyRow {
            id: row.try_get("id")?,
            sha256: row.try_get("sha256")?,
            scopes: scopes.split_whitespace().map(str::to_owned).collect(),
            quotas: row.try_get("quotas")?,
            created_by: row.try_get("created_by")?,
            created_ms: row.try_get("created_ms")?,
            revoked_ms: row.try_get("revoked_ms")?,
        })
    }

    const KEY_COLUMNS: &str = "id, sha256, scopes, quotas, created_by, created_ms, revoked_ms";

    /// Every stored key, revoked ones too, by id.
    pub async fn keys(&self) -> Result<Vec<KeyRow>, DbError> {
        let sql = format!("SELECT {} FROM api_keys ORDER BY id", Self::KEY_COLUMNS);
        let rows = sqlx::query(AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(Self::key_row).collect()
    }

    /// The stored key whose SHA-256 is `sha256`, revoked or not.
    pub async fn key_by_hash(&self, sha256: &str) -> Result<Option<KeyRow>, DbError> {
        let sql = format!(
            "SELECT {} FROM api_keys WHERE sha256 = $1",
            Self::KEY_COLUMNS
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(sha256.to_owned())
            .fetch_optional(&self.pool)
            .await?;
        row.map(Self::key_row).transpose()
    }

    /// Revokes a stored key; the key as it is now, or `None` when there is no such key.
    pub async fn revoke_key(&self, id: &str) -> Result<Option<KeyRow>, DbError> {
        {
            let _turn = self.write_turn().await;
            sqlx::query("UPDATE api_keys SET revoked_ms = $1 WHERE id = $2 AND revoked_ms IS NULL")
                .bind(now_ms())
                .bind(id.to_owned())
                .execute(&self.pool)
                .await?;
        }
        let sql = format!("SELECT {} FROM api_keys WHERE id = $1", Self::KEY_COLUMNS);
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id.to_owned())
            .fetch_optional(&self.pool)
            .await?;
        row.map(Self::key_row).transpose()
    }

    /// Whether any stored key is in force.
    pub async fn has_active_keys(&self) -> Result<bool, DbError> {
        let row = sqlx::query("SELECT COUNT(*) FROM api_keys WHERE revoked_ms IS NULL")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>(0)? > 0)
    }

    /// Appends audit records in one transaction.
    pub async fn append_audit(&self, records: &[AuditRow]) -> Result<(), DbError> {
        let _turn = self.write_turn().await;
        let mut tx = self.pool.begin().await?;
        insert_rows(
            &mut tx,
            "INSERT INTO audit (time_ms, key_id, action, subject, detail)",
            5,
            "",
            records,
            |query, record| {
                query
                    .bind(record.time_ms)
                    .bind(record.key_id.clone())
                    .bind(record.action.clone())
                    .bind(record.subject.clone())
                    .bind(record.detail.clone())
            },
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Audit records after `after`, oldest first, at most `limit`.
    pub async fn audit_page(&self, after: i64, limit: usize) -> Result<Vec<AuditRow>, DbError> {
        let rows = sqlx::query(
            "SELECT seq, time_ms, key_id, action, subject, detail FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                Ok(AuditRow {
                    seq: row.try_get("seq")?,
                    time_ms: row.try_get("time_ms")?,
                    key_id: row.try_get("key_id")?,
                    action: row.try_get("action")?,
                    subject: row.try_get("subject")?,
                    detail: row.try_get("detail")?,
                })
            })
            .collect()
    }

    /// Records what a run cost; a row already recorded (after a restart) stays as it was.
    pub async fn insert_usage(&self, row: &UsageRow) -> Result<(), DbError> {
        use prost::Message;
        let _turn = self.write_turn().await;
        sqlx::query(
            "INSERT INTO usage_records (subject, turn, session, time_ms, tree, owner, worker, model, cost_usd, metered_cost_usd, tokens, metered_tokens) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT (subject, turn) DO NOTHING",
        )
        .bind(row.subject.clone())
        .bind(i64::from(row.turn))
        .bind(i64::from(row.session))
        .bind(row.time_ms)
        .bind(row.tree.clone())
        .bind(row.owner.clone())
        .bind(row.worker.clone())
        .bind(row.model.clone())
        .bind(row.cost_usd)
        .bind(row.metered_cost_usd)
        .bind(row.tokens.encode_to_vec())
        .bind(row.metered_tokens.encode_to_vec())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The usage recorded from `from_ms` (inclusive) to `to_ms` (exclusive).
    pub async fn usage_between(&self, from_ms: i64, to_ms: i64) -> Result<Vec<UsageRow>, DbError> {
        use prost::Message;
        let rows = sqlx::query(
            "SELECT subject, turn, session, time_ms, tree, owner, worker, model, cost_usd, metered_cost_usd, tokens, metered_tokens \
             FROM usage_records WHERE time_ms >= $1 AND time_ms < $2",
        )
        .bind(from_ms)
        .bind(to_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                let tokens =
                    |column: &str| -> Result<claudecluster_proto::v1::TokenUsage, DbError> {
                        let bytes: Vec<u8> = row.try_get(column)?;
                        claudecluster_proto::v1::TokenUsage::decode(bytes.as_slice())
                            .map_err(|err| DbError::Corrupt(format!("usage record: {err}")))
                    };
                Ok(UsageRow {
                    subject: row.try_get("subject")?,
                    turn: row.try_get::<i64, _>("turn")? as u32,
                    session: row.try_get::<i64, _>("session")? != 0,
                    time_ms: row.try_get("time_ms")?,
                    tree: row.try_get("tree")?,
                    owner: row.try_get("owner")?,
                    worker: row.try_get("worker")?,
                    model: row.try_get("model")?,
                    cost_usd: row.try_get("cost_usd")?,
                    metered_cost_usd: row.try_get("metered_cost_usd")?,
                    tokens: tokens("tokens")?,
                    metered_tokens: tokens("metered_tokens")?,
                })
            })
            .collect()
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Counts a new leadership; its number.
    pub async fn next_leader_epoch(&self) -> Result<i64, DbError> {
        let _turn = self.write_turn().await;
        let (epoch,): (i64,) = sqlx::query_as(
            "INSERT INTO leadership (id, epoch) VALUES (1, 1) \
             ON CONFLICT (id) DO UPDATE SET epoch = leadership.epoch + 1 RETURNING epoch",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(epoch)
    }

    /// The latest leadership's number.
    pub async fn leader_epoch(&self) -> Result<i64, DbError> {
        let epoch: Option<i64> =
            sqlx::query_as::<_, (i64,)>("SELECT epoch FROM leadership WHERE id = 1")
                .fetch_optional(&self.pool)
                .await?
                .map(|(epoch,)| epoch);
        Ok(epoch.unwrap_or(0))
    }

    /// A connection of its own, out of the pool, for a lock that lasts as long as it does.
    pub async fn dedicated_connection(&self) -> Result<sqlx::AnyConnection, DbError> {
        Ok(self.pool.acquire().await?.detach())
    }

    /// Overwrites the stored chunk that starts at `sequence` with bytes that are no events, as a
    /// damaged disk would.
    #[cfg(test)]
    pub async fn damage_event(&self, subject: &str, sequence: u64) {
        sqlx::query("UPDATE events SET events = $1 WHERE subject = $2 AND first_seq = $3")
            .bind(vec![0xff_u8, 0xff, 0xff, 0x07])
            .bind(subject.to_owned())
            .bind(sequence as i64)
            .execute(&self.pool)
            .await
            .unwrap();
    }

    /// Overwrites a subject's stored record with bytes that are no record.
    #[cfg(test)]
    pub async fn damage_record(&self, id: &str) {
        sqlx::query("UPDATE subjects SET record = $1 WHERE id = $2")
            .bind(vec![0xff_u8, 0xff, 0xff, 0x07])
            .bind(id.to_owned())
            .execute(&self.pool)
            .await
            .unwrap();
    }
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>;

const SUBJECTS_INSERT: &str = "INSERT INTO subjects (id, kind, status, ended, idempotency_key, record, bookkeeping, last_sequence, end_ms)";
const SUBJECT_COLUMNS: usize = 9;
const SUBJECTS_ON_CONFLICT: &str = "ON CONFLICT (id) DO UPDATE SET status = excluded.status, \
     ended = excluded.ended, record = excluded.record, bookkeeping = excluded.bookkeeping, \
     last_sequence = excluded.last_sequence, end_ms = excluded.end_ms";

fn bind_subject(query: AnyQuery<'static>, write: &Write) -> AnyQuery<'static> {
    let row = &write.row;
    query
        .bind(write.id.clone())
        .bind(row.kind as i64)
        .bind(i64::from(row.status))
        .bind(i64::from(row.ended))
        .bind(row.idempotency_key.clone())
        .bind(row.record.clone())
        .bind(row.bookkeeping.clone())
        .bind(row.last_sequence as i64)
        .bind(row.end_time_ms)
}

const CHUNKS_INSERT: &str = "INSERT INTO events (subject, first_seq, last_seq, events)";
const CHUNK_COLUMNS: usize = 4;
// A commit retried after an error may find part of a chunk written already: what it carries
// now holds that and more.
const CHUNKS_ON_CONFLICT: &str = "ON CONFLICT (subject, first_seq) DO UPDATE SET \
     last_seq = excluded.last_seq, events = excluded.events";

fn bind_chunk(query: AnyQuery<'static>, (id, chunk): &(&str, &[StoredEvent])) -> AnyQuery<'static> {
    let (Some(first), Some(last)) = (chunk.first(), chunk.last()) else {
        unreachable!("chunks() yields no empty chunk");
    };
    query
        .bind(id.to_string())
        .bind(first.sequence as i64)
        .bind(last.sequence as i64)
        .bind(chunk_bytes(chunk))
}

/// The most values one SQLite statement takes (`SQLITE_MAX_VARIABLE_NUMBER`, since 3.32).
const SQLITE_MAX_VALUES: usize = 32_766;

/// Inserts `rows` in `tx` with multi-row statements (see [`multi_row_insert`]) of at most
/// [`ROWS_PER_STATEMENT`] rows, `bind` giving one row's `columns` values: each statement is a
/// round trip to the connection (for SQLite, to its thread), and a busy driver writes hundreds
/// of rows at a time.
async fn insert_rows<T>(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    head: &str,
    columns: usize,
    tail: &str,
    rows: &[T],
    bind: impl Fn(AnyQuery<'static>, &T) -> AnyQuery<'static>,
) -> Result<(), sqlx::Error> {
    for statement in rows.chunks(ROWS_PER_STATEMENT) {
        let sql = multi_row_insert(head, columns, statement.len(), tail, 1);
        let query = statement
            .iter()
            .fold(sqlx::query(AssertSqlSafe(sql)), |query, row| {
                bind(query, row)
            });
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// `head VALUES ($1, …, $columns), (…), … tail` for `rows` rows: the placeholders both
/// backends read, numbered from `first`.
fn multi_row_insert(head: &str, columns: usize, rows: usize, tail: &str, first: usize) -> String {
    use std::fmt::Write as _;
    let mut sql = String::with_capacity(head.len() + tail.len() + rows * columns * 6 + 16);
    sql.push_str(head);
    sql.push_str(" VALUES ");
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for column in 0..columns {
            let separator = if column == 0 { "" } else { ", " };
            let _ = write!(sql, "{separator}${}", first + row * columns + column);
        }
        sql.push(')');
    }
    if !tail.is_empty() {
        sql.push(' ');
        sql.push_str(tail);
    }
    sql
}

/// Events as one chunk: each protobuf after its length.
fn chunk_bytes(events: &[StoredEvent]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(events.iter().map(|e| e.bytes.len() + 4).sum());
    for event in events {
        prost::encoding::encode_varint(event.bytes.len() as u64, &mut bytes);
        bytes.extend_from_slice(&event.bytes);
    }
    bytes
}

/// The events of a chunk, and what made the rest of it unreadable, if anything did.
fn split_chunk(mut bytes: &[u8]) -> (Vec<Vec<u8>>, Option<String>) {
    let mut events = Vec::new();
    while !bytes.is_empty() {
        let length = match prost::encoding::decode_varint(&mut bytes) {
            Ok(length) => length as usize,
            Err(err) => return (events, Some(err.to_string())),
        };
        if length > bytes.len() {
            return (
                events,
                Some(format!(
                    "an event of {length} bytes where {} are left",
                    bytes.len()
                )),
            );
        }
        let (event, rest) = bytes.split_at(length);
        events.push(event.to_vec());
        bytes = rest;
    }
    (events, None)
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(id: String, status: i32, events: std::ops::RangeInclusive<u64>) -> Write {
        Write {
            row: Row {
                kind: SubjectKind::Task,
                status,
                ended: false,
                idempotency_key: None,
                record: id.as_bytes().to_vec(),
                bookkeeping: Vec::new(),
                last_sequence: *events.end(),
                end_time_ms: None,
            },
            events: events
                .map(|sequence| StoredEvent {
                    sequence,
                    bytes: sequence.to_le_bytes().to_vec(),
                })
                .collect(),
            id,
        }
    }

    /// One commit of more subjects than one statement takes, one of them with more events
    /// than one chunk, then again with every row changed: all of it reads back, in the order
    /// written.
    #[tokio::test]
    async fn a_commit_larger_than_a_statement_is_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        for url in crate::test_support::store_urls(dir.path()).await {
            let db = Db::open(&url, 2).await.unwrap();
            let subjects = 2 * ROWS_PER_STATEMENT + 3;
            let long = EVENTS_PER_CHUNK as u64 * 2 + 5;
            let ids: Vec<String> = (0..subjects).map(|n| format!("task-{n:05}")).collect();
            let last = |n: usize| if n == 7 { long } else { 2 };
            let first: Vec<Write> = ids
                .iter()
                .enumerate()
                .map(|(n, id)| write(id.clone(), 1, 1..=last(n)))
                .collect();
            db.commit(&first).await.unwrap();
            let again: Vec<Write> = ids
                .iter()
                .enumerate()
                .map(|(n, id)| write(id.clone(), 3, last(n) + 1..=last(n) + 1))
                .collect();
            db.commit(&again).await.unwrap();

            let listed = db.live(SubjectKind::Task).await.unwrap();
            let listed_ids: Vec<&str> = listed.iter().map(|row| row.id.as_str()).collect();
            assert_eq!(
                listed_ids, ids,
                "every subject, in the order written ({url})"
            );
            for (n, row) in listed.iter().enumerate() {
                assert_eq!(row.last_sequence, last(n) + 1, "the second commit's row");
            }
            for n in [0, 7, subjects - 1] {
                let up_to = last(n) + 1;
                // No bound past the last event: the same events.
                let (all, _) = db.events(&ids[n], 0, u64::MAX, 100).await.unwrap();
                let (events, complete) = db.events(&ids[n], 0, up_to, 100).await.unwrap();
                assert!(all == events, "no upper bound ({url})");
                assert!(complete);
                let expected: Vec<(u64, Vec<u8>)> = (1..=up_to)
                    .map(|sequence| (sequence, sequence.to_le_bytes().to_vec()))
                    .collect();
                assert!(events == expected, "the events of {} ({url})", ids[n]);
            }
            db.close().await;
        }
    }

    /// An embedded store's log is copied into the database in the background, well before the
    /// threshold at which a commit would do it itself.
    #[tokio::test]
    async fn an_embedded_store_checkpoints_off_the_commit_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("driver.db");
        let db = Db::open(&format!("sqlite://{}", path.display()), 2)
            .await
            .unwrap();
        let size = || std::fs::metadata(&path).unwrap().len();
        let before = size();
        // 2 MB of events: half of SQLite's own threshold, a sixteenth of ours.
        let writes: Vec<Write> = (0..20)
            .map(|n| {
                let mut write = write(format!("task-{n}"), 1, 1..=100);
                for event in &mut write.events {
                    event.bytes = vec![n as u8; 1000];
                }
                write
            })
            .collect();
        db.commit(&writes).await.unwrap();
        let wal = dir.path().join("driver.db-wal");
        assert!(
            std::fs::metadata(&wal).unwrap().len() > 2_000_000,
            "written to the log"
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while size() < before + 2_000_000 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the log is not copied into the database: {} bytes",
                size()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        db.close().await;
    }

    /// A commit of more values than one SQLite statement takes goes statement by statement,
    /// and is written whole too.
    #[tokio::test]
    async fn an_embedded_commit_too_large_for_one_statement_is_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("driver.db").display());
        let db = Db::open(&url, 2).await.unwrap();
        let subjects = SQLITE_MAX_VALUES / (SUBJECT_COLUMNS + CHUNK_COLUMNS) + 1;
        let writes: Vec<Write> = (0..subjects)
            .map(|n| write(format!("task-{n:05}"), 1, 1..=1))
            .collect();
        db.commit(&writes).await.unwrap();
        for n in [0, subjects / 2, subjects - 1] {
            let id = format!("task-{n:05}");
            assert_eq!(db.get(&id).await.unwrap().unwrap().record, id.as_bytes());
            let (events, _) = db.events(&id, 0, u64::MAX >> 1, 10).await.unwrap();
            assert_eq!(events.len(), 1, "{id}");
        }
        db.close().await;
    }

    /// A commit of nothing writes nothing, and fails on neither store.
    #[tokio::test]
    async fn an_empty_commit_is_no_error() {
        let dir = tempfile::tempdir().unwrap();
        for url in crate::test_support::store_urls(dir.path()).await {
            let db = Db::open(&url, 2).await.unwrap();
            db.commit(&[]).await.unwrap();
            db.commit(&[write("task-a".into(), 1, 1..=1)])
                .await
                .unwrap();
            assert!(db.get("task-a").await.unwrap().is_some());
            db.close().await;
        }
    }

    /// A commit to an embedded store that fails halfway writes none of it, and the connection
    /// it failed on (the pool's only one) writes the next commit.
    #[tokio::test]
    async fn a_failed_embedded_commit_leaves_nothing_and_the_next_one_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("driver.db").display());
        let db = Db::open(&url, 1).await.unwrap();
        // The events of task-c are refused: the commit fails in its second statement, after
        // the subjects' rows went in.
        sqlx::query(
            "CREATE TRIGGER refuse BEFORE INSERT ON events WHEN NEW.subject = 'task-c' \
             BEGIN SELECT RAISE(ABORT, 'refused'); END",
        )
        .execute(&db.pool)
        .await
        .unwrap();
        let failed = db
            .commit(&[
                write("task-b".into(), 1, 1..=3),
                write("task-c".into(), 1, 1..=3),
            ])
            .await;
        assert!(failed.unwrap_err().to_string().contains("refused"));
        assert!(
            db.get("task-b").await.unwrap().is_none(),
            "task-b rolled back"
        );
        assert!(
            db.get("task-c").await.unwrap().is_none(),
            "task-c rolled back"
        );
        db.commit(&[write("task-d".into(), 1, 1..=3)])
            .await
            .unwrap();
        assert!(db.get("task-d").await.unwrap().is_some());
        let (events, _) = db.events("task-d", 0, u64::MAX >> 1, 10).await.unwrap();
        assert_eq!(events.len(), 3);
        db.close().await;
    }

    /// Writes of every kind at once on an embedded store, which would fail at once should two
    /// of them meet in SQLite (it may not wait here): they take turns, and all are stored.
    #[tokio::test]
    async fn an_embedded_stores_writes_take_turns() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("driver.db").display());
        let db = std::sync::Arc::new(Db::open_with(&url, 8, Duration::ZERO).await.unwrap());
        let mut writing = tokio::task::JoinSet::new();
        for n in 0..64 {
            let db = db.clone();
            writing.spawn(async move {
                if n % 2 == 0 {
                    db.commit(&[write(format!("task-{n:02}"), 1, 1..=50)]).await
                } else {
                    let record = AuditRow {
                        seq: 0,
                        time_ms: n,
                        key_id: "key".into(),
                        action: "SubmitTask".into(),
                        subject: format!("task-{n:02}"),
                        detail: String::new(),
                    };
                    db.append_audit(&[record]).await
                }
            });
        }
        while let Some(written) = writing.join_next().await {
            written.unwrap().unwrap();
        }
        for n in (0..64).step_by(2) {
            let stored = db.get(&format!("task-{n:02}")).await.unwrap();
            assert!(stored.is_some(), "task-{n:02} is stored");
        }
        assert_eq!(db.audit_page(0, 100).await.unwrap().len(), 32);
        db.close().await;
    }

    #[test]
    fn a_multi_row_insert_numbers_its_placeholders_row_by_row() {
        assert_eq!(
            multi_row_insert("INSERT INTO t (a, b)", 2, 3, "ON CONFLICT DO NOTHING", 1),
            "INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4), ($5, $6) ON CONFLICT DO NOTHING"
        );
        assert_eq!(
            multi_row_insert("INSERT INTO t (a)", 1, 1, "", 1),
            "INSERT INTO t (a) VALUES ($1)"
        );
        assert_eq!(
            multi_row_insert("INSERT INTO t (a, b)", 2, 2, "", 7),
            "INSERT INTO t (a, b) VALUES ($7, $8), ($9, $10)"
        );
    }

    #[test]
    fn urls_are_shown_without_their_password() {
        assert_eq!(
            redacted("postgres://app:s3cret@db.example:5432/cluster"),
            "postgres://app:***@db.example:5432/cluster"
        );
        assert_eq!(
            redacted("postgres://db.example/cluster"),
            "postgres://db.example/cluster"
        );
    }
}
