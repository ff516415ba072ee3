//! Hypervisor drivers: `qemu` runs real guests; `sim` pretends, with no
//! processes, so the controller can be tested fast and at scale.

mod images;
pub mod qemu;
mod qemu_migrate;
pub mod sim;

use crate::Shared;
use kumo_api::{HypervisorInfo, MigrationStatus, MigrationStorage, VmSpec};
pub use qemu_migrate::Outgoing;
use std::path::{Path, PathBuf};
use std::time::Duration;
use uuid::Uuid;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DriverKind {
    Qemu,
    Sim,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// KVM if a guest actually runs under it, else TCG.
    Auto,
    Kvm,
    Tcg,
}

pub enum Driver {
    Qemu(qemu::Qemu),
    Sim(sim::Sim),
}

impl Driver {
    pub async fn probe(
        kind: DriverKind,
        accel: Accel,
        data_dir: &Path,
        datastore: Option<&Path>,
    ) -> anyhow::Result<Driver> {
        Ok(match kind {
            DriverKind::Qemu => Driver::Qemu(qemu::Qemu::probe(accel, data_dir, datastore).await?),
            DriverKind::Sim => Driver::Sim(sim::Sim),
        })
    }

    pub fn info(&self) -> HypervisorInfo {
        match self {
            Driver::Qemu(q) => q.info(),
            Driver::Sim(_) => HypervisorInfo {
                driver: "sim".into(),
                version: None,
                accel: "none".into(),
            },
        }
    }

    pub fn guest(&self, id: Uuid) -> Guest {
        match self {
            Driver::Qemu(q) => Guest::Qemu(q.guest(id)),
            Driver::Sim(s) => Guest::Sim(s.guest(id)),
        }
    }

    /// Ids of the guests that have state on this host.
    pub fn guests_on_disk(&self) -> Vec<Uuid> {
        match self {
            Driver::Qemu(q) => q.guests_on_disk(),
            Driver::Sim(_) => Vec::new(),
        }
    }

    /// The guest's serial console log and socket, for real guests.
    pub fn console_paths(&self, id: Uuid) -> Option<(PathBuf, PathBuf)> {
        match self {
            Driver::Qemu(q) => Some(q.console_paths(id)),
            Driver::Sim(_) => None,
        }
    }
}

/// One guest, as the VM actor drives it.
pub enum Guest {
    Qemu(qemu::QemuGuest),
    Sim(sim::SimGuest),
}

impl Guest {
    pub async fn is_running(&mut self) -> bool {
        match self {
            Guest::Qemu(g) => g.is_running().await,
            Guest::Sim(g) => g.is_running(),
        }
    }

    pub async fn start(&mut self, shared: &Shared, spec: &VmSpec) -> anyhow::Result<()> {
        match self {
            Guest::Qemu(g) => g.start(shared, spec).await,
            Guest::Sim(g) => g.start(),
        }
    }

    pub async fn pin(
        &mut self,
        cores: &[u32],
        reserved: &std::collections::BTreeSet<u32>,
    ) -> anyhow::Result<()> {
        match self {
            Guest::Qemu(g) => g.pin(cores, reserved).await,
            Guest::Sim(_) => Ok(()),
        }
    }

    pub async fn reset(&mut self) -> anyhow::Result<()> {
        match self {
            Guest::Qemu(g) => g.reset().await,
            Guest::Sim(_) => Ok(()),
        }
    }

    /// ACPI power button; a hard stop if the guest is still up after `timeout`.
    pub async fn shutdown(&mut self, timeout: Duration) -> anyhow::Result<()> {
        match self {
            Guest::Qemu(g) => g.shutdown(timeout).await,
            Guest::Sim(g) => g.stop(),
        }
    }

    /// Stop hard and remove what the guest has on the host, its disk on a
    /// shared datastore too unless `keep_shared_disk`.
    pub async fn remove(&mut self, keep_shared_disk: bool) -> anyhow::Result<()> {
        match self {
            Guest::Qemu(g) => g.remove(keep_shared_disk).await,
            Guest::Sim(g) => g.stop(),
        }
    }

    /// Target: get ready for (or follow) a guest migrating in.
    pub async fn incoming(
        &mut self,
        shared: &Shared,
        spec: &VmSpec,
        id: uuid::Uuid,
        storage: MigrationStorage,
    ) -> MigrationStatus {
        match self {
            Guest::Qemu(g) => {
                g.incoming(shared, spec, id, storage, &shared.migration_ip)
                    .await
            }
            Guest::Sim(g) => g.incoming(id),
        }
    }

    /// Target: the guest is this host's now; how its migration ended, the
    /// first time this is asked (`running`: the guest is meant to run).
    pub async fn finish_incoming(&mut self, running: bool) -> Option<MigrationStatus> {
        match self {
            Guest::Qemu(g) => g.finish_incoming(running).await,
            Guest::Sim(_) => None,
        }
    }

    /// Source of a stopped VM's move: a QEMU with the guest's vCPUs stopped.
    pub async fn start_paused(&mut self, shared: &Shared, spec: &VmSpec) -> anyhow::Result<()> {
        match self {
            Guest::Qemu(g) => g.start_paused(shared, spec).await,
            Guest::Sim(_) => Ok(()),
        }
    }

    /// Source: send the guest to the target.
    pub async fn outgoing(
        &mut self,
        spec: &VmSpec,
        out: &Outgoing<'_>,
        report: &(dyn Fn(MigrationStatus) + Sync),
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> MigrationStatus {
        match self {
            Guest::Qemu(g) => g.outgoing(out, report, cancelled).await,
            Guest::Sim(g) => g.outgoing(spec, out.id, report, cancelled).await,
        }
    }

    pub fn saved_reboots(&self) -> Option<u64> {
        match self {
            Guest::Qemu(g) => g.saved_reboots(),
            Guest::Sim(_) => None,
        }
    }

    pub fn save_reboots(&mut self, n: u64) {
        match self {
            Guest::Qemu(g) => g.save_reboots(n),
            Guest::Sim(_) => {}
        }
    }

    /// The guest's CPU use since the last call, percent of one CPU (for
    /// simulated guests: what `spec`'s metadata says).
    pub fn cpu_percent(&mut self, spec: &VmSpec) -> Option<f32> {
        match self {
            Guest::Qemu(g) => g.cpu_percent(),
            Guest::Sim(g) => g.cpu_percent(spec),
        }
    }
}
