//! kumo-store: the controller's state store.
//!
//! The [`Store`] trait is shaped like etcd v3 so that the embedded default
//! ([`SqliteStore`]) and a later etcd backend are interchangeable behind an
//! `Arc<dyn Store>`.
//!
//! # Data model
//!
//! - A flat, sorted key space: keys are non-empty UTF-8 strings, ordered
//!   byte-wise (which for UTF-8 is code-point order, the same as `str`'s `Ord`).
//!   Hierarchy is by convention (`vms/<id>`, `hosts/<id>`); [`Store::range`]
//!   reads every key that starts with a prefix.
//! - Values are opaque bytes; [`StoreExt`] adds typed JSON helpers.
//! - One global **revision** counter. Every transaction that changes something
//!   (a put, or a delete of a key that existed) advances it by exactly 1; a
//!   transaction that changes nothing leaves it alone. It never goes backwards,
//!   also across restarts, and is never reused even when keys are deleted.
//! - Each key carries `create_revision` (the revision that created it since it
//!   was last absent), `mod_revision` (the revision of its last put) and
//!   `version` (puts since creation: 1 after the first). Deleting a key forgets
//!   all three; re-creating it starts again at version 1.
//! - Only the latest value of each key is kept (no MVCC history): there is no
//!   read at a past revision and a watch cannot start in the past. Use
//!   [`Store::range_and_watch`] to get a consistent snapshot plus every later
//!   change without gaps.
//!
//! # Transactions
//!
//! [`Store::txn`] is etcd's `If(compares).Then(success).Else(failure)`: all
//! compares are evaluated against the current state; if every one holds, the
//! `success` ops run, otherwise the `failure` ops run, atomically and in order,
//! all at the same new revision. Optimistic concurrency is the usual pattern:
//!
//! ```
//! use kumo_store::{Compare, Op, SqliteStore, Store, StoreExt};
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let store = SqliteStore::in_memory()?;
//! assert!(store.create("hosts/h1", b"ready".to_vec()).await?);
//! let kv = store.get("hosts/h1").await?.unwrap();
//! // Update only if nobody changed the key since we read it.
//! let res = store
//!     .txn(
//!         vec![Compare::ModRevision { key: kv.key.clone(), revision: kv.mod_revision }],
//!         vec![Op::Put { key: kv.key.clone(), value: b"draining".to_vec() }],
//!         vec![],
//!     )
//!     .await?;
//! assert!(res.succeeded);
//! assert_eq!(res.revision, kv.mod_revision + 1);
//! # Ok::<(), kumo_store::Error>(())
//! # }).unwrap();
//! ```
//!
//! # Watches
//!
//! [`Store::watch`] returns a channel that receives every change committed
//! after the call to a key under the prefix, in revision order (ops of one
//! transaction in op order, a `DeletePrefix` in key order). The channel is
//! unbounded so that a slow watcher never stalls writers; dropping the receiver
//! ends the watch.

mod error;
mod ext;
mod sqlite;

use async_trait::async_trait;
use tokio::sync::mpsc::UnboundedReceiver;

pub use error::Error;
pub use ext::StoreExt;
pub use sqlite::SqliteStore;

/// A key with its value and revision bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the put that created the key (since it was last absent).
    pub create_revision: i64,
    /// Revision of the last put to the key.
    pub mod_revision: i64,
    /// Number of puts since creation; 1 after the first.
    pub version: i64,
}

impl KeyValue {
    /// Decodes the value as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.value).map_err(|source| Error::Codec {
            key: self.key.clone(),
            source,
        })
    }
}

/// A condition of a transaction, evaluated before any op runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key's `mod_revision` equals `revision`; revision 0 means "absent".
    ModRevision { key: String, revision: i64 },
    /// The key does not exist.
    Absent(String),
    /// The key exists.
    Present(String),
}

/// A write of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create or overwrite a key. Always counts as a change, even when the
    /// value is the same (as in etcd).
    Put { key: String, value: Vec<u8> },
    /// Delete a key; a change only if the key existed.
    Delete { key: String },
    /// Delete every key starting with `prefix` (all keys if it is empty).
    DeletePrefix { prefix: String },
}

impl Op {
    /// A put of `value` encoded as JSON.
    pub fn put_json<T: serde::Serialize + ?Sized>(
        key: impl Into<String>,
        value: &T,
    ) -> Result<Op, Error> {
        let key = key.into();
        match serde_json::to_vec(value) {
            Ok(value) => Ok(Op::Put { key, value }),
            Err(source) => Err(Error::Codec { key, source }),
        }
    }
}

/// The outcome of [`Store::txn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether all compares held (and so the success ops ran).
    pub succeeded: bool,
    /// The store's revision after the transaction: the new revision if it
    /// changed something, the unchanged current revision otherwise.
    pub revision: i64,
}

/// The direction of [`Store::range_page`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Smallest key first.
    Ascending,
    /// Largest key first.
    Descending,
}

/// A change delivered to a watcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key as it is after the put.
    Put(KeyValue),
    /// The key was deleted at revision `mod_revision`.
    Delete { key: String, mod_revision: i64 },
}

impl WatchEvent {
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }

    /// The revision of the transaction that made this change.
    pub fn mod_revision(&self) -> i64 {
        match self {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { mod_revision, .. } => *mod_revision,
        }
    }
}

/// A consistent snapshot of a prefix plus a watch on everything after it.
#[derive(Debug)]
pub struct RangeWatch {
    /// The store's revision at the snapshot.
    pub revision: i64,
    /// Every key under the prefix at `revision`, sorted by key.
    pub kvs: Vec<KeyValue>,
    /// Every change under the prefix committed after `revision`.
    pub events: UnboundedReceiver<WatchEvent>,
}

/// An etcd-v3-shaped key-value store. Object safe: use `Arc<dyn Store>`.
///
/// Convenience methods (put, delete, create, JSON) are in [`StoreExt`], which
/// every `Store` (and `dyn Store`) implements.
#[async_trait]
pub trait Store: Send + Sync {
    /// The key, if present.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, Error>;

    /// Every key starting with `prefix` (all keys if empty), sorted by key.
    async fn range(&self, prefix: &str) -> Result<Vec<KeyValue>, Error>;

    /// At most `limit` keys starting with `prefix`, in `order`, beginning
    /// just past `after` (exclusive: with [`Order::Ascending`] the keys
    /// greater than it, with [`Order::Descending`] the keys less than it;
    /// from the first key in that order if `None`). A page of a large prefix,
    /// or its newest keys, without reading the rest; its cost is
    /// proportional to `limit`, not to the prefix's size.
    async fn range_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        order: Order,
    ) -> Result<Vec<KeyValue>, Error>;

    /// Atomically: evaluate all `compares`; if all hold apply `success`, else
    /// `failure`. Ops run in order and share one new revision; a later op sees
    /// the effect of an earlier one (put twice: version +2). Fails with
    /// [`Error::EmptyKey`] before evaluating anything if an op has an empty key.
    async fn txn(
        &self,
        compares: Vec<Compare>,
        success: Vec<Op>,
        failure: Vec<Op>,
    ) -> Result<TxnResult, Error>;

    /// The current revision (0 for a new store).
    async fn revision(&self) -> Result<i64, Error>;

    /// Changes to keys under `prefix` committed after this call, in revision
    /// order. Dropping the receiver ends the watch.
    fn watch(&self, prefix: &str) -> UnboundedReceiver<WatchEvent>;

    /// [`Store::range`] and [`Store::watch`] at one point in time: the
    /// snapshot and the events together miss and repeat nothing.
    async fn range_and_watch(&self, prefix: &str) -> Result<RangeWatch, Error>;
}
