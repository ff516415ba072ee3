//! The ledger: the last desired state received, persisted atomically (temp
//! file, fsync, rename) before the agent acts on it.

use anyhow::Context;
use kumo_api::DesiredState;
use std::io::Write;
use std::path::Path;

const FILE: &str = "desired.json";

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
    write_atomic(dir, FILE, &serde_json::to_vec_pretty(desired)?)
}

/// Replace `dir/name` with `bytes` so that a crash leaves the old or the new
/// content, never a mix.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
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
