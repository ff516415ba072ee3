//! Simulated guests: state in memory, no processes. A migration takes a
//! tenth of a second per GiB of guest memory (at least 50 ms).

use super::migration_status;
use kumo_api::{MigrationProgress, MigrationState, MigrationStatus, VmSpec};
use std::time::Duration;
use uuid::Uuid;

#[derive(Default)]
pub struct Sim;

impl Sim {
    pub fn guest(&self, _id: Uuid) -> SimGuest {
        SimGuest { running: false }
    }
}

pub struct SimGuest {
    running: bool,
}

impl SimGuest {
    pub fn is_running(&self) -> bool {
        self.running
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        self.running = true;
        Ok(())
    }

    pub fn stop(&mut self) -> anyhow::Result<()> {
        self.running = false;
        Ok(())
    }

    pub fn incoming(&mut self, id: Uuid) -> MigrationStatus {
        self.running = true;
        MigrationStatus {
            uri: Some("sim:".into()),
            ..migration_status(id, MigrationState::Listening)
        }
    }

    pub async fn outgoing(
        &mut self,
        spec: &VmSpec,
        id: Uuid,
        report: &(dyn Fn(MigrationStatus) + Sync),
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> MigrationStatus {
        let bytes = spec.size.memory_mib << 20;
        let steps = (spec.size.memory_mib / 1024).max(1) * 2;
        for step in 0..steps {
            if cancelled() {
                return migration_status(id, MigrationState::Cancelled);
            }
            report(MigrationStatus {
                progress: Some(MigrationProgress {
                    stage: "memory".into(),
                    memory_total_bytes: bytes,
                    memory_transferred_bytes: bytes * step / steps,
                    memory_remaining_bytes: bytes - bytes * step / steps,
                    ..Default::default()
                }),
                ..migration_status(id, MigrationState::Active)
            });
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        migration_status(id, MigrationState::Completed)
    }
}
