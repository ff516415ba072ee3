//! Convenience methods on top of [`Store`]. They are in an extension trait
//! because generic methods would make `Store` unusable as `dyn Store`.

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Compare, Error, Op, Store};

/// Shortcuts for common transactions and typed JSON values. Implemented for
/// every [`Store`], including `dyn Store`.
#[async_trait]
pub trait StoreExt: Store {
    /// Creates or overwrites `key`; returns the new revision.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<i64, Error> {
        let op = Op::Put {
            key: key.to_owned(),
            value,
        };
        Ok(self.txn(vec![], vec![op], vec![]).await?.revision)
    }

    /// Deletes `key`; returns whether it existed.
    async fn delete(&self, key: &str) -> Result<bool, Error> {
        let op = Op::Delete {
            key: key.to_owned(),
        };
        let res = self
            .txn(vec![Compare::Present(key.to_owned())], vec![op], vec![])
            .await?;
        Ok(res.succeeded)
    }

    /// Creates `key` only if it is absent; `Ok(false)` if it exists.
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<bool, Error> {
        let op = Op::Put {
            key: key.to_owned(),
            value,
        };
        let res = self
            .txn(vec![Compare::Absent(key.to_owned())], vec![op], vec![])
            .await?;
        Ok(res.succeeded)
    }

    /// Puts `value` only if the key's `mod_revision` is still
    /// `expected_mod_revision` (0: only if absent); `Ok(false)` otherwise.
    async fn compare_and_put(
        &self,
        key: &str,
        expected_mod_revision: i64,
        value: Vec<u8>,
    ) -> Result<bool, Error> {
        let compare = Compare::ModRevision {
            key: key.to_owned(),
            revision: expected_mod_revision,
        };
        let op = Op::Put {
            key: key.to_owned(),
            value,
        };
        Ok(self.txn(vec![compare], vec![op], vec![]).await?.succeeded)
    }

    /// The key's value decoded from JSON, if present. Use [`Store::get`] and
    /// [`crate::KeyValue::json`] when the revisions are needed too.
    async fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, Error> {
        match self.get(key).await? {
            Some(kv) => kv.json().map(Some),
            None => Ok(None),
        }
    }

    /// Puts `value` encoded as JSON; returns the new revision.
    async fn put_json<T: Serialize + Sync + ?Sized>(
        &self,
        key: &str,
        value: &T,
    ) -> Result<i64, Error> {
        let op = Op::put_json(key, value)?;
        Ok(self.txn(vec![], vec![op], vec![]).await?.revision)
    }

    /// Creates `key` with `value` encoded as JSON only if it is absent;
    /// `Ok(false)` if it exists.
    async fn create_json<T: Serialize + Sync + ?Sized>(
        &self,
        key: &str,
        value: &T,
    ) -> Result<bool, Error> {
        let op = Op::put_json(key, value)?;
        let res = self
            .txn(vec![Compare::Absent(key.to_owned())], vec![op], vec![])
            .await?;
        Ok(res.succeeded)
    }
}

impl<S: Store + ?Sized> StoreExt for S {}
