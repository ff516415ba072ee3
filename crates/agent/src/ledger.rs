//! The ledger: the last desired state received, persisted atomically (temp
//! file, fsync, rename) and owner-only before the agent acts on it.

use anyhow::Context;
use kumo_api::DesiredState;
use std::path::{Path, PathBuf};

pub(crate) const FILE: &str = "desired.json";

pub async fn load(dir: &Path) -> anyhow::Result<Option<DesiredState>> {
    match tokio::fs::read(dir.join(FILE)).await {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes).context("reading the ledger")?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub async fn store(dir: &Path, desired: &DesiredState) -> anyhow::Result<()> {
    let bytes = serde_json::to_vec_pretty(desired)?;
    write_atomic(dir.join(FILE), bytes).await
}

/// Write `bytes` to `path` owner-only and atomically (temp file, fsync,
/// rename: [`kumo_private_fs::write_file`]) on tokio's blocking pool, so
/// the fsyncs never hold up an async worker (thousands of simulated hosts
/// share a few).
pub async fn write_atomic(path: PathBuf, bytes: Vec<u8>) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || kumo_private_fs::write_file(&path, &bytes))
        .await
        .context("the file writer stopped")??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kumo_api::{Machine, PowerState, Resources, VmSpec};
    use uuid::Uuid;

    #[tokio::test]
    async fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).await.unwrap().is_none());
        let d = DesiredState {
            generation: 7,
            ..Default::default()
        };
        store(dir.path(), &d).await.unwrap();
        assert_eq!(load(dir.path()).await.unwrap(), Some(d));
    }

    /// A ledger the previous release wrote (its VMs without `machine`)
    /// loads, each VM as the single-disk machine it ran.
    #[tokio::test]
    async fn a_ledger_of_the_previous_release_loads() {
        let dir = tempfile::tempdir().unwrap();
        let id = Uuid::from_u128(42);
        let image = serde_json::json!({
            "id": Uuid::from_u128(7), "sha256": "ab".repeat(32),
            "format": "qcow2", "size_bytes": 1048576,
        });
        let old = serde_json::json!({
            "host_id": Uuid::from_u128(1), "generation": 3,
            "vms": [{
                "id": id, "name": "web",
                "size": {"vcpus": 1, "memory_mib": 128, "disk_gib": 2},
                "image": image, "power": "running", "reboots": 0, "cores": [],
            }],
        });
        std::fs::write(dir.path().join(FILE), old.to_string()).unwrap();
        let d = load(dir.path()).await.unwrap().unwrap();
        let size = Resources {
            vcpus: 1,
            memory_mib: 128,
            disk_gib: 2,
        };
        let image = serde_json::from_value(image).unwrap();
        assert_eq!(
            d.vms,
            vec![VmSpec {
                id,
                name: "web".into(),
                machine: Machine::single_disk(id, size, image, vec![]),
                power: PowerState::Running,
                reboots: 0,
                delete: false,
                migration: None,
                metadata: Default::default(),
            }]
        );
        assert_eq!(d.generation, 3);
    }
}
