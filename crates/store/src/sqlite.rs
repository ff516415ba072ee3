//! The embedded SQLite backend, the default store of a single kumod.
//!
//! # Storage
//!
//! One database file (plus its `-wal` while open) with two tables:
//! `kv(key TEXT PRIMARY KEY, value, create_revision, mod_revision, version)`,
//! a `WITHOUT ROWID` table so that rows are stored in key order in the primary
//! key's B-tree, and `meta(name, value)` holding the global `revision` (it
//! cannot be derived from `kv` because deletes remove rows). A prefix range is
//! the key interval `[prefix, prefix_end)`, a seek plus a sequential scan of
//! that B-tree.
//!
//! # Durability
//!
//! WAL journal with `synchronous=NORMAL`: a commit is appended to the WAL
//! without fsync, so it survives the process being killed (`kill -9`, panic,
//! OOM) because the data is in the OS page cache. An OS crash or power loss can
//! lose the last commits (never corrupt the file); the WAL is fsynced at each
//! checkpoint. That is the trade-off we accept for sub-millisecond writes.
//!
//! # Permissions
//!
//! The file holds secrets (each agent's console secret), so it is created
//! 0600 before SQLite opens it: SQLite gives the `-wal`, `-shm` and `-journal`
//! files the database's mode. Opening tightens these files when an older
//! version left them open (0644).
//!
//! # One process per file
//!
//! The connection uses `locking_mode=EXCLUSIVE`, so a second process (or a
//! second `open` in this one) gets [`Error::Locked`] instead of silently
//! sharing the file: watchers only see the writes of their own process. That
//! includes the `sqlite3` shell: inspect a copy, or stop kumod first. The OS
//! releases the lock when the owning process dies, so a restarted kumod opens
//! the file at once.
//!
//! # Concurrency
//!
//! One `Connection` behind a `std::sync::Mutex`, which is fine because the
//! work is short and serialised anyway (SQLite has one writer). Measured
//! (release build, this 2-core machine): a `get` takes ~1 µs, a one-key
//! `txn` ~30 µs, both cheaper than the ~50 µs hop to tokio's blocking pool,
//! so they run in place on the async worker when the connection is free.
//! A `range` is proportional to its size (100,000 keys: ~40-60 ms) and so
//! always runs on the blocking pool (`spawn_blocking`), as do large
//! transactions and `DeletePrefix`. A short operation that finds the
//! connection busy goes to the blocking pool too, so a runtime worker never
//! waits behind a long one. What remains in place is the occasional WAL
//! checkpoint (every ~1,000 pages written) that a commit triggers: a few
//! milliseconds of writing and one fsync. An operation moved to the pool
//! completes even if its future is dropped: a transaction is never left
//! half-done, the caller just does not learn its result.
//!
//! Watchers are notified while the connection lock is still held, right after
//! the commit, which keeps events in revision order; nothing (not even the
//! writer's own result) can observe a commit before its watchers were sent
//! their events.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, TransactionBehavior};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::{Compare, Error, KeyValue, Op, Order, RangeWatch, Store, TxnResult, WatchEvent};

/// Schema version stored in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 1;

/// How long a statement waits for a lock held by another connection. With
/// the exclusive locking mode this only matters while opening, e.g. when a
/// previous kumod is still closing the file.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kv (
    key             TEXT    NOT NULL PRIMARY KEY,
    value           BLOB    NOT NULL,
    create_revision INTEGER NOT NULL,
    mod_revision    INTEGER NOT NULL,
    version         INTEGER NOT NULL
) WITHOUT ROWID, STRICT;
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT    NOT NULL PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID, STRICT;
INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0);
";

/// The largest [`Store::range_page`] run in place on the async worker: a
/// hundred rows read in key order are one seek and a short sequential scan,
/// a few times a one-key transaction; larger pages go to the blocking pool.
const SHORT_PAGE: usize = 100;

const KV_COLUMNS: &str = "key, value, create_revision, mod_revision, version";

/// The embedded SQLite store. Cheap to clone (clones share one connection).
#[derive(Clone)]
pub struct SqliteStore {
    shared: Arc<Shared>,
}

struct Shared {
    path: Option<PathBuf>,
    state: Mutex<State>,
    /// The current revision, written under the `state` lock after a commit
    /// (read without it by `Store::revision`). Caching is valid because we
    /// hold the file exclusively.
    revision: AtomicI64,
    /// Separate from `state` so that `watch` never waits for a long range.
    /// Lock order: `state`, then `watchers`.
    watchers: Mutex<Vec<Watcher>>,
}

struct State {
    conn: Connection,
}

struct Watcher {
    prefix: String,
    tx: UnboundedSender<WatchEvent>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.shared.path)
            .finish_non_exhaustive()
    }
}

/// Create the database file 0600 unless it exists, before SQLite opens it
/// and creates its side files with the same mode; tighten the files an
/// older version left open (SQLite reuses a `-wal` a crash left behind).
fn make_owner_only(path: &Path) -> Result<(), kumo_private_fs::Error> {
    let side_files = ["-wal", "-shm", "-journal"].map(|suffix| {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    });
    let files: Vec<_> = std::iter::once(path)
        .chain(side_files.iter().map(PathBuf::as_path))
        .map(|f| (f, kumo_private_fs::FILE_MODE))
        .collect();
    kumo_private_fs::tighten(&files)?;
    kumo_private_fs::create_file(path)
}

impl SqliteStore {
    /// Opens (creating if needed, owner-only) the store file at `path`. Its
    /// directory must exist.
    pub fn open(path: &Path) -> Result<Self, Error> {
        Self::open_with_busy_timeout(path, BUSY_TIMEOUT)
    }

    fn open_with_busy_timeout(path: &Path, busy_timeout: Duration) -> Result<Self, Error> {
        let locked = |e: rusqlite::Error| match e.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => Error::Locked {
                path: path.to_owned(),
            },
            _ => Error::Sqlite(e),
        };
        make_owner_only(path)?;
        let conn = Connection::open(path)?;
        conn.busy_timeout(busy_timeout)?;
        // Before switching to WAL, so that the WAL index lives in heap memory
        // (no -shm file) and the lock is never released.
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(locked)?;
        if !mode.eq_ignore_ascii_case("wal") {
            // Only on file systems without the needed locking primitives.
            tracing::warn!(path = %path.display(), mode, "SQLite refused WAL mode");
        }
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let store = Self::init(conn, Some(path.to_owned())).map_err(|e| match e {
            Error::Sqlite(e) => locked(e),
            e => e,
        })?;
        tracing::debug!(path = %path.display(), revision = store.shared.revision(), "opened SQLite store");
        Ok(store)
    }

    /// A store in memory, gone when dropped (tests, throw-away controllers).
    pub fn in_memory() -> Result<Self, Error> {
        Self::init(Connection::open_in_memory()?, None)
    }

    fn init(mut conn: Connection, path: Option<PathBuf>) -> Result<Self, Error> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let found: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
        if found > SCHEMA_VERSION {
            return Err(Error::SchemaVersion {
                path: path.unwrap_or_default(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
        tx.execute_batch(SCHEMA)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        let revision: i64 = tx.query_row(
            "SELECT value FROM meta WHERE name = 'revision'",
            [],
            |row| row.get(0),
        )?;
        tx.commit()?;
        Ok(SqliteStore {
            shared: Arc::new(Shared {
                path,
                state: Mutex::new(State { conn }),
                revision: AtomicI64::new(revision),
                watchers: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Runs `f` with the connection: in place if `cost` is `Short` and the
    /// connection is free at once, otherwise on tokio's blocking pool.
    async fn run<R, F>(&self, cost: Cost, f: F) -> Result<R, Error>
    where
        R: Send + 'static,
        F: FnOnce(&Shared, &mut State) -> Result<R, Error> + Send + 'static,
    {
        if cost == Cost::Short {
            if let Some(mut state) = self.shared.try_lock_state() {
                return f(&self.shared, &mut state);
            }
        }
        let shared = Arc::clone(&self.shared);
        let task = tokio::task::spawn_blocking(move || f(&shared, &mut shared.lock_state()));
        match task.await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Only when the runtime shuts down before the task started.
            Err(_) => Err(Error::Cancelled),
        }
    }
}

impl Shared {
    fn lock_state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock rolled its SQLite transaction back
        // (rusqlite's Transaction rolls back on drop) and left `revision`
        // untouched, so the state is consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn try_lock_state(&self) -> Option<MutexGuard<'_, State>> {
        match self.state.try_lock() {
            Ok(state) => Some(state),
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    fn revision(&self) -> i64 {
        self.revision.load(Ordering::Acquire)
    }

    fn lock_watchers(&self) -> MutexGuard<'_, Vec<Watcher>> {
        self.watchers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn add_watcher(&self, prefix: &str) -> UnboundedReceiver<WatchEvent> {
        let (tx, rx) = unbounded_channel();
        let mut watchers = self.lock_watchers();
        watchers.retain(|w| !w.tx.is_closed());
        watchers.push(Watcher {
            prefix: prefix.to_owned(),
            tx,
        });
        rx
    }

    /// Sends `events` (of one committed txn) to interested watchers and drops
    /// watchers whose receiver is gone.
    fn notify(&self, events: &[WatchEvent]) {
        self.lock_watchers().retain(|w| {
            if w.tx.is_closed() {
                return false;
            }
            events
                .iter()
                .filter(|ev| ev.key().starts_with(&w.prefix))
                .all(|ev| w.tx.send(ev.clone()).is_ok())
        });
    }
}

impl State {
    fn get(&self, key: &str) -> Result<Option<KeyValue>, Error> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT {KV_COLUMNS} FROM kv WHERE key = ?1"))?;
        Ok(stmt.query_row([key], kv_from_row).optional()?)
    }

    fn range(&self, prefix: &str) -> Result<Vec<KeyValue>, Error> {
        let rows = match prefix_end(prefix) {
            Some(end) => {
                let mut stmt = self.conn.prepare_cached(&format!(
                    "SELECT {KV_COLUMNS} FROM kv WHERE key >= ?1 AND key < ?2 ORDER BY key"
                ))?;
                let rows = stmt.query_map(params![prefix, end], kv_from_row)?;
                rows.collect::<Result<Vec<_>, _>>()
            }
            None => {
                let mut stmt = self.conn.prepare_cached(&format!(
                    "SELECT {KV_COLUMNS} FROM kv WHERE key >= ?1 ORDER BY key"
                ))?;
                let rows = stmt.query_map([prefix], kv_from_row)?;
                rows.collect::<Result<Vec<_>, _>>()
            }
        };
        Ok(rows?)
    }

    fn range_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        order: Order,
    ) -> Result<Vec<KeyValue>, Error> {
        let end = prefix_end(prefix);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut args: Vec<&dyn rusqlite::ToSql> = vec![&prefix];
        if let Some(end) = &end {
            args.push(end);
        }
        if let Some(after) = &after {
            args.push(after);
        }
        args.push(&limit);
        let sql = page_sql(end.is_some(), after.is_some(), order);
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(args.as_slice(), kv_from_row)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Runs a transaction; returns its result and the events to send.
    fn txn(
        &mut self,
        current_revision: i64,
        compares: &[Compare],
        success: Vec<Op>,
        failure: Vec<Op>,
    ) -> Result<(TxnResult, Vec<WatchEvent>), Error> {
        validate(&success)?;
        validate(&failure)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut succeeded = true;
        for compare in compares {
            if !holds_on(&tx, compare)? {
                succeeded = false;
                break;
            }
        }
        let ops = if succeeded { success } else { failure };
        let revision = current_revision + 1;
        let mut events = Vec::new();
        for op in ops {
            apply(&tx, op, revision, &mut events)?;
        }
        if events.is_empty() {
            // Nothing changed: no new revision. Dropping `tx` rolls back.
            return Ok((
                TxnResult {
                    succeeded,
                    revision: current_revision,
                },
                events,
            ));
        }
        tx.prepare_cached("UPDATE meta SET value = ?1 WHERE name = 'revision'")?
            .execute([revision])?;
        tx.commit()?;
        Ok((
            TxnResult {
                succeeded,
                revision,
            },
            events,
        ))
    }
}

/// Whether `compare` holds in the open transaction.
fn holds_on(conn: &Connection, compare: &Compare) -> Result<bool, Error> {
    let mod_revision = |key: &str| -> Result<Option<i64>, Error> {
        let mut stmt = conn.prepare_cached("SELECT mod_revision FROM kv WHERE key = ?1")?;
        Ok(stmt.query_row([key], |row| row.get(0)).optional()?)
    };
    Ok(match compare {
        Compare::ModRevision { key, revision } => mod_revision(key)?.unwrap_or(0) == *revision,
        Compare::Absent(key) => mod_revision(key)?.is_none(),
        Compare::Present(key) => mod_revision(key)?.is_some(),
    })
}

fn validate(ops: &[Op]) -> Result<(), Error> {
    let empty = ops.iter().any(|op| match op {
        Op::Put { key, .. } | Op::Delete { key } => key.is_empty(),
        Op::DeletePrefix { .. } => false,
    });
    if empty {
        return Err(Error::EmptyKey);
    }
    Ok(())
}

fn apply(
    conn: &Connection,
    op: Op,
    revision: i64,
    events: &mut Vec<WatchEvent>,
) -> Result<(), Error> {
    match op {
        Op::Put { key, value } => {
            let mut stmt = conn.prepare_cached(
                "INSERT INTO kv (key, value, create_revision, mod_revision, version)
                 VALUES (?1, ?2, ?3, ?3, 1)
                 ON CONFLICT (key) DO UPDATE SET
                     value = excluded.value,
                     mod_revision = excluded.mod_revision,
                     version = version + 1
                 RETURNING create_revision, version",
            )?;
            let (create_revision, version) = stmt
                .query_row(params![key, value, revision], |row| {
                    Ok((row.get(0)?, row.get(1)?))
                })?;
            events.push(WatchEvent::Put(KeyValue {
                key,
                value,
                create_revision,
                mod_revision: revision,
                version,
            }));
        }
        Op::Delete { key } => {
            let deleted = conn
                .prepare_cached("DELETE FROM kv WHERE key = ?1")?
                .execute([&key])?;
            if deleted > 0 {
                events.push(WatchEvent::Delete {
                    key,
                    mod_revision: revision,
                });
            }
        }
        Op::DeletePrefix { prefix } => {
            // RETURNING gives no order guarantee; events go out in key order.
            let mut keys = match prefix_end(&prefix) {
                Some(end) => conn
                    .prepare_cached("DELETE FROM kv WHERE key >= ?1 AND key < ?2 RETURNING key")?
                    .query_map(params![prefix, end], |row| row.get::<_, String>(0))?
                    .collect::<Result<Vec<_>, _>>()?,
                None => conn
                    .prepare_cached("DELETE FROM kv WHERE key >= ?1 RETURNING key")?
                    .query_map([&prefix], |row| row.get::<_, String>(0))?
                    .collect::<Result<Vec<_>, _>>()?,
            };
            keys.sort_unstable();
            events.extend(keys.into_iter().map(|key| WatchEvent::Delete {
                key,
                mod_revision: revision,
            }));
        }
    }
    Ok(())
}

/// How long an operation may hold the connection (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cost {
    /// Tens of microseconds at most: may run on a runtime worker.
    Short,
    /// Proportional to the data: always on the blocking pool.
    Long,
}

/// Up to this many ops, a transaction without `DeletePrefix` is `Short`.
const SHORT_TXN_OPS: usize = 32;

fn txn_cost(success: &[Op], failure: &[Op]) -> Cost {
    if success.len() + failure.len() <= SHORT_TXN_OPS
        && !success
            .iter()
            .chain(failure)
            .any(|op| matches!(op, Op::DeletePrefix { .. }))
    {
        Cost::Short
    } else {
        Cost::Long
    }
}

/// The query of [`Store::range_page`]; its parameters are the prefix, the
/// prefix's end (if it has one), `after` (if given) and the limit. Every
/// bound is a `key` comparison, so SQLite seeks in the primary key's B-tree
/// and reads only the rows it returns.
fn page_sql(has_end: bool, has_after: bool, order: Order) -> String {
    let (past, direction) = match order {
        Order::Ascending => (">", "ASC"),
        Order::Descending => ("<", "DESC"),
    };
    let mut sql = format!("SELECT {KV_COLUMNS} FROM kv WHERE key >= ?1");
    let mut n = 1;
    if has_end {
        n += 1;
        sql.push_str(&format!(" AND key < ?{n}"));
    }
    if has_after {
        n += 1;
        sql.push_str(&format!(" AND key {past} ?{n}"));
    }
    sql.push_str(&format!(" ORDER BY key {direction} LIMIT ?{}", n + 1));
    sql
}

fn kv_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<KeyValue> {
    Ok(KeyValue {
        key: row.get(0)?,
        value: row.get(1)?,
        create_revision: row.get(2)?,
        mod_revision: row.get(3)?,
        version: row.get(4)?,
    })
}

/// The smallest string greater than every string that starts with `prefix`,
/// or `None` if there is none (empty prefix, or only `char::MAX`s).
///
/// SQLite compares TEXT with memcmp, i.e. UTF-8 byte order, which is
/// code-point order: a string starts with `p = q + c` iff it is in
/// `[p, q + next(c))`.
pub(crate) fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = match last {
            '\u{D7FF}' => Some('\u{E000}'), // skip the surrogates
            c => char::from_u32(u32::from(c) + 1),
        };
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

#[async_trait]
impl Store for SqliteStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, Error> {
        let key = key.to_owned();
        self.run(Cost::Short, move |_, state| state.get(&key)).await
    }

    async fn range(&self, prefix: &str) -> Result<Vec<KeyValue>, Error> {
        let prefix = prefix.to_owned();
        self.run(Cost::Long, move |_, state| state.range(&prefix))
            .await
    }

    async fn range_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        order: Order,
    ) -> Result<Vec<KeyValue>, Error> {
        let prefix = prefix.to_owned();
        let after = after.map(str::to_owned);
        let cost = if limit <= SHORT_PAGE {
            Cost::Short
        } else {
            Cost::Long
        };
        self.run(cost, move |_, state| {
            state.range_page(&prefix, after.as_deref(), limit, order)
        })
        .await
    }

    async fn txn(
        &self,
        compares: Vec<Compare>,
        success: Vec<Op>,
        failure: Vec<Op>,
    ) -> Result<TxnResult, Error> {
        self.run(txn_cost(&success, &failure), move |shared, state| {
            let (result, events) = state.txn(shared.revision(), &compares, success, failure)?;
            // Still under the state lock: keeps events in revision order.
            // The revision is published after the events so that a caller who
            // sees it and then watches cannot receive its events.
            if !events.is_empty() {
                shared.notify(&events);
                shared.revision.store(result.revision, Ordering::Release);
            }
            Ok(result)
        })
        .await
    }

    async fn revision(&self) -> Result<i64, Error> {
        Ok(self.shared.revision())
    }

    fn watch(&self, prefix: &str) -> UnboundedReceiver<WatchEvent> {
        self.shared.add_watcher(prefix)
    }

    async fn range_and_watch(&self, prefix: &str) -> Result<RangeWatch, Error> {
        let prefix = prefix.to_owned();
        self.run(Cost::Long, move |shared, state| {
            let kvs = state.range(&prefix)?;
            // Registered under the state lock: no commit can come between.
            let events = shared.add_watcher(&prefix);
            Ok(RangeWatch {
                revision: shared.revision(),
                kvs,
                events,
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn prefix_end_examples() {
        assert_eq!(prefix_end(""), None);
        assert_eq!(prefix_end("vms/").as_deref(), Some("vms0"));
        assert_eq!(prefix_end("a\u{D7FF}").as_deref(), Some("a\u{E000}"));
        assert_eq!(prefix_end("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_end("\u{10FFFF}\u{10FFFF}"), None);
    }

    fn edgy_string() -> impl Strategy<Value = String> {
        let ch = prop_oneof![
            prop::sample::select(vec!['\u{0}', 'a', 'b', '\u{7F}', '\u{80}', '\u{D7FF}']),
            prop::sample::select(vec!['\u{E000}', '\u{FFFF}', '\u{10000}', char::MAX]),
            any::<char>(),
        ];
        prop::collection::vec(ch, 0..4).prop_map(|v| v.into_iter().collect())
    }

    proptest! {
        /// `[prefix, prefix_end)` in byte order is exactly the strings that
        /// start with `prefix`.
        #[test]
        fn prefix_interval_is_exact(prefix in edgy_string(), suffix in edgy_string(), other in edgy_string()) {
            let end = prefix_end(&prefix);
            for s in [format!("{prefix}{suffix}"), other] {
                let inside = s.as_str() >= prefix.as_str()
                    && end.as_deref().is_none_or(|end| s.as_str() < end);
                prop_assert_eq!(inside, s.starts_with(&prefix), "{:?} {:?} {:?}", s, prefix, end);
            }
        }
    }

    /// SQLite's plan for `sql` with `params`, its steps joined by "; ".
    fn query_plan(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let plan: Vec<String> = stmt
            .query_map(params, |row| row.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        plan.join("; ")
    }

    #[test]
    fn range_uses_the_primary_key() {
        let store = SqliteStore::in_memory().unwrap();
        let state = store.shared.lock_state();
        for sql in [
            format!("SELECT {KV_COLUMNS} FROM kv WHERE key >= ?1 AND key < ?2 ORDER BY key"),
            "DELETE FROM kv WHERE key >= ?1 AND key < ?2 RETURNING key".to_owned(),
        ] {
            let plan = query_plan(&state.conn, &sql, params!["a/", "a0"]);
            assert!(
                plan.contains("SEARCH kv USING PRIMARY KEY (key>? AND key<?)"),
                "{sql}: {plan}"
            );
            assert!(!plan.contains("TEMP B-TREE"), "{sql}: {plan}");
        }
    }

    #[test]
    fn pages_seek_the_primary_key_in_either_order() {
        let store = SqliteStore::in_memory().unwrap();
        let state = store.shared.lock_state();
        for order in [Order::Ascending, Order::Descending] {
            let sql = page_sql(true, true, order);
            let plan = query_plan(&state.conn, &sql, params!["a/", "a0", "a/5", 10]);
            assert!(
                plan.contains("SEARCH kv USING PRIMARY KEY"),
                "{sql}: {plan}"
            );
            assert!(!plan.contains("TEMP B-TREE"), "{sql}: {plan}");
        }
    }

    #[test]
    fn second_open_of_a_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let first = SqliteStore::open(&path).unwrap();
        let err = SqliteStore::open_with_busy_timeout(&path, Duration::ZERO).unwrap_err();
        assert!(matches!(err, Error::Locked { .. }), "{err:?}");
        assert!(err.to_string().contains("in use by another process"));
        drop(first);
        SqliteStore::open_with_busy_timeout(&path, Duration::ZERO).unwrap();
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let err = SqliteStore::open(&path).unwrap_err();
        assert!(
            matches!(err, Error::SchemaVersion { found: 2, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn files_are_owner_only_and_an_older_versions_are_tightened() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| {
            format!(
                "{:o}",
                std::fs::metadata(p).unwrap().permissions().mode() & 0o777
            )
        };
        let chmod =
            |p: &Path, m| std::fs::set_permissions(p, PermissionsExt::from_mode(m)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let wal = dir.path().join("store.db-wal");
        let store = SqliteStore::open(&path).unwrap();
        let op = Op::Put {
            key: "k".into(),
            value: b"secret".to_vec(),
        };
        let mut state = store.shared.lock_state();
        state
            .txn(store.shared.revision(), &[], vec![op], vec![])
            .unwrap();
        drop(state);
        assert_eq!(mode(&path), "600");
        assert_eq!(
            mode(&wal),
            "600",
            "SQLite gives the WAL the database's mode"
        );
        drop(store);
        // As an older version left them: readable by all, and a WAL a
        // crash kept (empty is a valid one).
        chmod(&path, 0o644);
        std::fs::write(&wal, "").unwrap();
        chmod(&wal, 0o644);
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!((mode(&path), mode(&wal)), ("600".into(), "600".into()));
        assert!(store.shared.lock_state().get("k").unwrap().is_some());
    }

    #[test]
    fn file_is_in_wal_mode_with_normal_sync() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("store.db")).unwrap();
        let state = store.shared.lock_state();
        let mode: String = state
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        let sync: i64 = state
            .conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!((mode.as_str(), sync), ("wal", 1));
    }

    /// Figures behind the choice of `spawn_blocking` (see the module docs).
    /// `cargo test -p kumo-store --release -- --ignored --nocapture latency`
    #[test]
    #[ignore = "prints timings"]
    fn latency() {
        const N: u32 = 20_000;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("store.db")).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let per_op = |start: Instant, n: u32| start.elapsed() / n;

        let start = Instant::now();
        for i in 0..N {
            let key = format!("k/{:06}", i % 1000);
            let mut state = store.shared.lock_state();
            let current = store.shared.revision();
            let (res, _) = state
                .txn(
                    current,
                    &[],
                    vec![Op::Put {
                        key,
                        value: vec![0; 100],
                    }],
                    vec![],
                )
                .unwrap();
            store.shared.revision.store(res.revision, Ordering::Release);
        }
        println!("inline put:  {:?}", per_op(start, N));
        let start = Instant::now();
        for i in 0..N {
            store
                .shared
                .lock_state()
                .get(&format!("k/{:06}", i % 1000))
                .unwrap();
        }
        println!("inline get:  {:?}", per_op(start, N));

        rt.block_on(async {
            let start = Instant::now();
            for i in 0..N {
                let op = Op::Put {
                    key: format!("k/{:06}", i % 1000),
                    value: vec![0; 100],
                };
                store.txn(vec![], vec![op], vec![]).await.unwrap();
            }
            println!("async put:   {:?}", per_op(start, N));
            let start = Instant::now();
            for i in 0..N {
                store.get(&format!("k/{:06}", i % 1000)).await.unwrap();
            }
            println!("async get:   {:?}", per_op(start, N));

            for batch in 0..100 {
                let ops = (0..1000)
                    .map(|i| Op::Put {
                        key: format!("big/{:06}", batch * 1000 + i),
                        value: vec![0; 100],
                    })
                    .collect();
                store.txn(vec![], ops, vec![]).await.unwrap();
            }
            let start = Instant::now();
            let all = store.range("big/").await.unwrap();
            println!("range 100k:  {:?} ({} keys)", start.elapsed(), all.len());
            let start = Instant::now();
            let some = store.range("big/0420").await.unwrap();
            println!(
                "range 100 of 100k:  {:?} ({} keys)",
                start.elapsed(),
                some.len()
            );
        });
    }
}
