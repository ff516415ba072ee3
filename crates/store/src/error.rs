use std::path::PathBuf;

/// Errors of the store. Messages do not repeat their cause: print the chain.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("SQLite store operation failed")]
    Sqlite(#[from] rusqlite::Error),

    #[error("cannot encode or decode the JSON value of key {key:?}")]
    Codec {
        key: String,
        #[source]
        source: serde_json::Error,
    },

    #[error("a key must not be empty")]
    EmptyKey,

    #[error("store file {} is in use by another process", path.display())]
    Locked { path: PathBuf },

    #[error("store file {} has schema version {found}; this build knows up to {supported}", path.display())]
    SchemaVersion {
        path: PathBuf,
        found: i64,
        supported: i64,
    },

    #[error("cannot make the store files owner-only")]
    Permissions(#[from] kumo_private_fs::Error),

    #[error("store operation cancelled: the async runtime is shutting down")]
    Cancelled,
}
