//! The ledger: the last desired state received, persisted atomically (temp
//! file, fsync, rename) and owner-only before the agent acts on it.

use anyhow::Context;
use kumo_api::DesiredState;
use std::path::Path;

pub(crate) const FILE: &str = "desired.json";

pub fn load(dir: &Path) -> anyhow::Result<Option<DesiredState>> {
    match std::fs::read(dir.join(FILE)) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes).context("reading the ledger")?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub fn store(dir: &Path, desired: &DesiredState) -> anyhow::Result<()> {
    let bytes = serde_json::to_vec_pretty(desired)?;
    Ok(kumo_private_fs::write_file(&dir.join(FILE), &bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_none());
        let d = DesiredState {
            generation: 7,
            ..Default::default()
        };
        store(dir.path(), &d).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(d));
    }
}
