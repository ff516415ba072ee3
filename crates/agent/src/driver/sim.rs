//! Simulated guests: state in memory, no processes. A migration takes a
//! tenth of a second per GiB of guest memory (at least 50 ms).
//!
//! Simulated load, for testing rebalancing and power saving: a running
//! guest uses the CPU its VM's metadata says in `sim.cpu_percent` (percent
//! of one CPU; 0 when absent or not a number), and a simulated host's load
//! is the sum of its running guests' use over its vCPUs (see
//! [`host_load`]).

use super::{Guest, Hypervisor, Outgoing};
use async_trait::async_trait;
use kumo_api::{
    HostLoad, HypervisorInfo, MigrationProgress, MigrationState, MigrationStatus, MigrationStorage,
    ObservedState, VmSpec, VmStatus,
};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;
use uuid::Uuid;

#[derive(Default)]
pub struct Sim;

impl Hypervisor for Sim {
    fn info(&self) -> HypervisorInfo {
        HypervisorInfo {
            driver: "sim".into(),
            version: None,
            accel: "none".into(),
        }
    }

    fn guest(&self, _id: Uuid) -> Box<dyn Guest> {
        Box::new(SimGuest { running: false })
    }

    fn guests_on_disk(&self) -> Vec<Uuid> {
        Vec::new()
    }

    fn console_paths(&self, _id: Uuid) -> Option<(PathBuf, PathBuf)> {
        None
    }

    fn simulated_load(&self, statuses: &[VmStatus], vcpus: u32) -> Option<HostLoad> {
        Some(host_load(statuses, vcpus))
    }
}

pub struct SimGuest {
    running: bool,
}

/// A simulated host's load: its running guests' CPU use (percent of one
/// CPU each) over its `vcpus`, as a percentage of the whole host (0–100).
pub fn host_load(statuses: &[VmStatus], vcpus: u32) -> HostLoad {
    let busy: f32 = statuses
        .iter()
        .filter(|s| s.state == ObservedState::Running)
        .filter_map(|s| s.cpu_percent)
        .sum();
    HostLoad {
        cpu_percent: (busy / vcpus.max(1) as f32).clamp(0.0, 100.0),
        memory_used_mib: 0,
        load1: busy / 100.0,
    }
}

#[async_trait]
impl Guest for SimGuest {
    async fn is_running(&mut self) -> bool {
        self.running
    }

    async fn start(&mut self, _spec: &VmSpec) -> anyhow::Result<()> {
        self.running = true;
        Ok(())
    }

    async fn start_paused(&mut self, _spec: &VmSpec) -> anyhow::Result<()> {
        Ok(())
    }

    async fn pin(&mut self, _cores: &[u32], _reserved: &BTreeSet<u32>) -> anyhow::Result<()> {
        Ok(())
    }

    async fn reset(&mut self) -> anyhow::Result<()> {
        Ok(())
    }

    async fn shutdown(&mut self, _timeout: Duration) -> anyhow::Result<()> {
        self.running = false;
        Ok(())
    }

    async fn remove(&mut self, _keep_shared_disk: bool) -> anyhow::Result<()> {
        self.running = false;
        Ok(())
    }

    async fn incoming(
        &mut self,
        _spec: &VmSpec,
        id: Uuid,
        _storage: MigrationStorage,
    ) -> MigrationStatus {
        self.running = true;
        MigrationStatus {
            uri: Some("sim:".into()),
            ..MigrationStatus::new(id, MigrationState::Listening)
        }
    }

    async fn finish_incoming(&mut self, _running: bool) -> Option<MigrationStatus> {
        None
    }

    async fn outgoing(
        &mut self,
        spec: &VmSpec,
        out: &Outgoing<'_>,
        report: &(dyn Fn(MigrationStatus) + Sync),
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> MigrationStatus {
        let id = out.id;
        let memory_mib = spec.machine.memory_mib;
        let bytes = memory_mib << 20;
        let steps = (memory_mib / 1024).max(1) * 2;
        for step in 0..steps {
            if cancelled() {
                return MigrationStatus::new(id, MigrationState::Cancelled);
            }
            report(MigrationStatus {
                progress: Some(MigrationProgress {
                    stage: "memory".into(),
                    memory_total_bytes: bytes,
                    memory_transferred_bytes: bytes * step / steps,
                    memory_remaining_bytes: bytes - bytes * step / steps,
                    ..Default::default()
                }),
                ..MigrationStatus::new(id, MigrationState::Active)
            });
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        MigrationStatus::new(id, MigrationState::Completed)
    }

    async fn saved_reboots(&self) -> Option<u64> {
        None
    }

    async fn save_reboots(&mut self, _n: u64) {}

    /// What the VM's metadata says the guest uses, while it runs.
    fn cpu_percent(&mut self, spec: &VmSpec) -> Option<f32> {
        self.running.then(|| {
            spec.metadata
                .get("sim.cpu_percent")
                .and_then(|v| v.parse::<f32>().ok())
                .filter(|c| c.is_finite() && *c >= 0.0)
                .unwrap_or(0.0)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: ObservedState, cpu: Option<f32>) -> VmStatus {
        VmStatus {
            id: Uuid::new_v4(),
            state,
            reboots: 0,
            cpu_percent: cpu,
            message: None,
            migration: None,
        }
    }

    #[test]
    fn host_load_is_running_guests_over_vcpus() {
        let vms = [
            status(ObservedState::Running, Some(150.0)),
            status(ObservedState::Running, Some(50.0)),
            status(ObservedState::Stopped, Some(400.0)),
            status(ObservedState::Running, None),
        ];
        assert_eq!(host_load(&vms, 8).cpu_percent, 25.0);
        assert_eq!(host_load(&vms, 1).cpu_percent, 100.0, "capped");
        assert_eq!(host_load(&[], 0).cpu_percent, 0.0);
    }
}
