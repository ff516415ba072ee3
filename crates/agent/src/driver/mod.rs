//! Hypervisor drivers behind two traits: a [`Hypervisor`] per host hands
//! out one [`Guest`] per VM. `qemu` runs real guests; `sim` pretends, with
//! no processes, so the controller can be tested fast and at scale.
//!
//! A driver is built from what it needs (its directories, the image
//! cache, the address guests migrate in on), never from the agent's whole
//! shared state; each guest is built from its VM's [`kumo_api::Machine`].

pub mod images;
pub mod qemu;
mod qemu_migrate;
pub mod sim;

use async_trait::async_trait;
use kumo_api::{HostLoad, HypervisorInfo, MigrationStatus, MigrationStorage, VmSpec, VmStatus};
pub use qemu_migrate::Outgoing;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DriverKind {
    Qemu,
    Sim,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// KVM if empty machines boot through their firmware under it every
    /// time (see the probe in `qemu.rs`), else TCG.
    Auto,
    /// KVM, without probing.
    Kvm,
    /// TCG: QEMU's own translator, slow but available everywhere.
    Tcg,
}

/// A driver found on the host, before it has what its guests need from
/// the rest of the agent (the image cache needs the controller, which
/// needs the driver's [`HypervisorInfo`] to register).
pub enum Probed {
    Qemu(qemu::Qemu),
    Sim,
}

impl Probed {
    /// Find the driver of `kind` on this host: for QEMU, its version and
    /// the accelerator (`accel`, KVM only if a guest really runs under
    /// it); guests' state goes under `data_dir`, their disks under
    /// `datastore` if the host shares one.
    pub async fn probe(
        kind: DriverKind,
        accel: Accel,
        data_dir: &Path,
        datastore: Option<&Path>,
    ) -> anyhow::Result<Probed> {
        Ok(match kind {
            DriverKind::Qemu => Probed::Qemu(qemu::Qemu::probe(accel, data_dir, datastore).await?),
            DriverKind::Sim => Probed::Sim,
        })
    }

    /// What the controller is told of the hypervisor when the host joins.
    pub fn info(&self) -> HypervisorInfo {
        match self {
            Probed::Qemu(q) => q.info(),
            Probed::Sim => sim::Sim.info(),
        }
    }

    /// The driver, given the image cache and the address guests migrating
    /// in are received on.
    pub fn into_driver(
        self,
        images: Arc<dyn images::ImageStore>,
        migration_ip: String,
    ) -> Box<dyn Hypervisor> {
        match self {
            Probed::Qemu(q) => Box::new(q.ready(images, migration_ip)),
            Probed::Sim => Box::new(sim::Sim),
        }
    }
}

/// One host's hypervisor.
pub trait Hypervisor: Send + Sync {
    /// Driver, version and accelerator, as the controller records them.
    fn info(&self) -> HypervisorInfo;

    /// The guest of VM `id` (whether or not it runs or exists yet).
    fn guest(&self, id: Uuid) -> Box<dyn Guest>;

    /// Ids of the guests that have state on this host.
    fn guests_on_disk(&self) -> Vec<Uuid>;

    /// The guest's serial console log and socket, for real guests.
    fn console_paths(&self, id: Uuid) -> Option<(PathBuf, PathBuf)>;

    /// The host's load as the driver simulates it from its guests'
    /// `statuses` over `vcpus`; `None` when it is the machine's, measured.
    fn simulated_load(&self, statuses: &[VmStatus], vcpus: u32) -> Option<HostLoad>;
}

/// One guest, as the VM actor drives it.
#[async_trait]
pub trait Guest: Send {
    /// Whether the guest runs (for QEMU: its process lives; the QMP
    /// connection is made again if it was lost).
    async fn is_running(&mut self) -> bool;

    /// Build the guest from `spec.machine` and start it.
    async fn start(&mut self, spec: &VmSpec) -> anyhow::Result<()>;

    /// Source of a stopped VM's move: a guest with its vCPUs stopped.
    async fn start_paused(&mut self, spec: &VmSpec) -> anyhow::Result<()>;

    /// Keep the guest's threads on `cores` (one per vCPU; empty: a shared
    /// VM) and off `reserved` (cores dedicated to other VMs).
    async fn pin(
        &mut self,
        cores: &[u32],
        reserved: &std::collections::BTreeSet<u32>,
    ) -> anyhow::Result<()>;

    /// A hard reset, as the reset button (a reboot request).
    async fn reset(&mut self) -> anyhow::Result<()>;

    /// ACPI power button; a hard stop if the guest is still up after `timeout`.
    async fn shutdown(&mut self, timeout: Duration) -> anyhow::Result<()>;

    /// Stop hard and remove what the guest has on the host, its disks on a
    /// shared datastore too unless `keep_shared_disk`.
    async fn remove(&mut self, keep_shared_disk: bool) -> anyhow::Result<()>;

    /// Target: get ready for (or follow) migration `id` of the guest in.
    async fn incoming(
        &mut self,
        spec: &VmSpec,
        id: Uuid,
        storage: MigrationStorage,
    ) -> MigrationStatus;

    /// Target: the guest is this host's now; end what receiving it left
    /// (before it may leave again) and say how its migration ended, the
    /// first time this is asked (`running`: the guest is meant to run).
    async fn finish_incoming(&mut self, running: bool) -> Option<MigrationStatus>;

    /// Source: send the guest to the target.
    async fn outgoing(
        &mut self,
        spec: &VmSpec,
        out: &Outgoing<'_>,
        report: &(dyn Fn(MigrationStatus) + Sync),
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> MigrationStatus;

    /// Reboot requests carried out, as kept with the guest on the host.
    async fn saved_reboots(&self) -> Option<u64>;

    async fn save_reboots(&mut self, n: u64);

    /// The guest's CPU use since the last call, percent of one CPU (for
    /// simulated guests: what `spec`'s metadata says).
    fn cpu_percent(&mut self, spec: &VmSpec) -> Option<f32>;
}
