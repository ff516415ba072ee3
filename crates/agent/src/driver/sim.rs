//! Simulated guests: state in memory, no processes. A migration takes a
//! tenth of a second per GiB of guest memory (at least 50 ms).
//!
//! Simulated load, for testing rebalancing and power saving: a running
//! guest uses the CPU its VM's metadata says in `sim.cpu_percent` (percent
//! of one CPU; 0 when absent or not a number), and a simulated host's load
//! is the sum of its running guests' use over its vCPUs (see
//! [`host_load`]).

use kumo_api::{
    HostLoad, MigrationProgress, MigrationState, MigrationStatus, ObservedState, VmSpec, VmStatus,
};
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

    /// What the VM's metadata says the guest uses, while it runs.
    pub fn cpu_percent(&self, spec: &VmSpec) -> Option<f32> {
        self.running.then(|| {
            spec.metadata
                .get("sim.cpu_percent")
                .and_then(|v| v.parse::<f32>().ok())
                .filter(|c| c.is_finite() && *c >= 0.0)
                .unwrap_or(0.0)
        })
    }

    pub fn incoming(&mut self, id: Uuid) -> MigrationStatus {
        self.running = true;
        MigrationStatus {
            uri: Some("sim:".into()),
            ..MigrationStatus::new(id, MigrationState::Listening)
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
