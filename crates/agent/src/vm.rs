//! One actor per VM: it receives the VM's latest spec (or `None` once the
//! VM was deleted) and converges the guest to it, publishing what it
//! observes for the heartbeat.
//!
//! The actor starts a guest when it first sees it wanted running (after an
//! agent restart that means: re-attach if QEMU is alive, start it if not),
//! when the spec's power goes from stopped to running, or when a start is
//! asked again after a failure. A guest that powers itself off stays off and
//! is reported `stopped`; the controller takes that as the new wish.
//!
//! In a live migration the target's actor runs the QEMU waiting for the
//! guest and the source's actor sends it (see `driver::qemu_migrate`); the
//! outcome goes into the VM's status. A VM that leaves the desired state
//! moved away: its local state goes, its disk on a shared datastore stays
//! (the other host runs from it). Only a VM marked deleted loses that disk.

use crate::driver::{Guest, Outgoing};
use crate::Shared;
use kumo_api::{
    DesiredState, MigrationSpec, MigrationState, MigrationStatus, MigrationStorage, ObservedState,
    PowerState, VmSpec, VmStatus,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use uuid::Uuid;

pub struct VmHandle {
    spec: watch::Sender<Option<VmSpec>>,
    status: Arc<std::sync::Mutex<VmStatus>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Hand every VM its spec, start actors for new ones and tell removed ones
/// to go. The applied generation moves once every actor has its spec.
pub async fn apply(shared: &Arc<Shared>, desired: DesiredState) {
    let mut vms = shared.vms.lock().await;
    for spec in &desired.vms {
        match vms.get(&spec.id) {
            Some(h) => {
                let old = h.spec.send_replace(Some(spec.clone()));
                // A migration step says nothing new about the guest's power.
                let same_guest = |o: &VmSpec| {
                    VmSpec {
                        migration: spec.migration.clone(),
                        ..o.clone()
                    } == *spec
                };
                if !old.as_ref().is_some_and(same_guest) {
                    // Until the actor has acted on the new spec, what it
                    // reported before says nothing about it.
                    let mut s = h.status.lock().expect("lock");
                    s.state = pending(spec.power);
                    s.message = None;
                }
            }
            None => {
                let handle = spawn(shared.clone(), spec.clone());
                vms.insert(spec.id, handle);
            }
        }
    }
    for (id, h) in vms.iter() {
        if !desired.vms.iter().any(|s| s.id == *id) {
            h.spec.send_replace(None);
        }
    }
    drop(vms);
    tracing::info!(
        generation = desired.generation,
        vms = desired.vms.len(),
        "applied desired state"
    );
    *shared.applied.lock().await = desired;
}

/// What every VM's actor last observed; actors that finished deleting
/// their guest are dropped here.
pub async fn statuses(shared: &Shared) -> Vec<VmStatus> {
    let mut vms = shared.vms.lock().await;
    vms.retain(|_, h| !h.task.is_finished());
    vms.values()
        .map(|h| h.status.lock().expect("lock").clone())
        .collect()
}

/// Guests on disk that the ledger does not know (deleted while the agent
/// was down, or half-created) are destroyed.
pub async fn remove_orphans(shared: &Shared, ledger: Option<&DesiredState>) {
    for id in shared.driver.guests_on_disk() {
        if !ledger.is_some_and(|d| d.vms.iter().any(|v| v.id == id)) {
            tracing::info!(vm = %id, "removing a guest the desired state does not hold");
            let mut guest = shared.driver.guest(id);
            // A shared disk may be another host's guest's now.
            if let Err(e) = guest.remove(true).await {
                tracing::warn!(vm = %id, error = %format_args!("{e:#}"), "removing orphan");
            }
        }
    }
}

/// What a VM is until its actor has acted on a new spec.
fn pending(power: PowerState) -> ObservedState {
    match power {
        PowerState::Running => ObservedState::Starting,
        PowerState::Stopped => ObservedState::Stopping,
    }
}

fn spawn(shared: Arc<Shared>, spec: VmSpec) -> VmHandle {
    let status = Arc::new(std::sync::Mutex::new(VmStatus {
        id: spec.id,
        state: pending(spec.power),
        reboots: spec.reboots,
        cpu_percent: None,
        message: None,
        migration: None,
    }));
    let (tx, rx) = watch::channel(Some(spec.clone()));
    let task = tokio::spawn(run(shared, spec.id, rx, status.clone()));
    VmHandle {
        spec: tx,
        status,
        task,
    }
}

struct Actor {
    shared: Arc<Shared>,
    guest: Box<dyn Guest>,
    status: Arc<std::sync::Mutex<VmStatus>>,
    /// The power state of the last spec seen; `None` before the first.
    last_power: Option<PowerState>,
    reboots_done: Option<u64>,
    failed: bool,
    /// Whether the disk on a shared datastore stays when the VM leaves this
    /// host: it does unless a local-storage migration copied it away (or
    /// in).
    keep_shared_disk: bool,
    /// How the last migration this host sent ended.
    sent: Option<MigrationStatus>,
}

async fn run(
    shared: Arc<Shared>,
    id: Uuid,
    mut rx: watch::Receiver<Option<VmSpec>>,
    status: Arc<std::sync::Mutex<VmStatus>>,
) {
    let guest = shared.driver.guest(id);
    let mut actor = Actor {
        shared,
        guest,
        status,
        last_power: None,
        reboots_done: None,
        failed: false,
        keep_shared_disk: true,
        sent: None,
    };
    loop {
        let spec = rx.borrow_and_update().clone();
        let delete = spec.as_ref().is_none_or(|s| s.delete);
        if delete {
            let keep = spec.is_none() && actor.keep_shared_disk;
            match actor.guest.remove(keep).await {
                Ok(()) => {
                    let what = if spec.is_some() {
                        "deleted"
                    } else {
                        "moved away"
                    };
                    tracing::info!(vm = %id, "guest {what}");
                    // Under the lock `apply` sends specs under: a spec that
                    // came meanwhile (the VM is back) is followed, else the
                    // actor leaves for good.
                    let shared = actor.shared.clone();
                    let mut vms = shared.vms.lock().await;
                    if rx.has_changed().unwrap_or(false) {
                        continue;
                    }
                    vms.remove(&id);
                    return;
                }
                Err(e) => {
                    tracing::warn!(vm = %id, error = %format_args!("{e:#}"), "removing guest; will retry")
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        let spec = spec.expect("checked above");
        match &spec.migration {
            Some(MigrationSpec::Incoming { id, storage }) => {
                actor.keep_shared_disk = *storage == MigrationStorage::Shared;
                actor.receive(&spec, *id, *storage).await;
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                continue;
            }
            Some(MigrationSpec::Outgoing { storage, .. }) => {
                actor.keep_shared_disk = *storage == MigrationStorage::Shared;
                // A guest that only just arrived may leave again at once.
                actor.finish_incoming(&spec).await;
                actor.send(&spec, &rx).await;
            }
            None => actor.finish_incoming(&spec).await,
        }
        actor.converge(&spec).await;
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

impl Actor {
    /// Reboot requests carried out, kept with the guest so that an agent
    /// restart neither repeats nor forgets one.
    async fn mark_reboots(&mut self, n: u64) {
        if self.reboots_done != Some(n) {
            self.reboots_done = Some(n);
            self.guest.save_reboots(n).await;
        }
    }

    fn report_migration(&self, m: MigrationStatus, now: bool) {
        self.status.lock().expect("lock").migration = Some(m);
        if now {
            self.shared.report_now.notify_one();
        }
    }

    /// Once a guest that migrated in is this host's: end what receiving it
    /// left (the disk's export to the source) and report how it arrived.
    async fn finish_incoming(&mut self, spec: &VmSpec) {
        let running = spec.power == PowerState::Running;
        if let Some(done) = self.guest.finish_incoming(running).await {
            self.report_migration(done, true);
        }
    }

    /// Target: run the QEMU waiting for the guest and report where the
    /// migration stands.
    async fn receive(&mut self, spec: &VmSpec, id: uuid::Uuid, storage: MigrationStorage) {
        let m = self.guest.incoming(spec, id, storage).await;
        let before = self.status.lock().expect("lock").migration.clone();
        let news = before.as_ref().is_none_or(|b| b.state != m.state);
        if news {
            tracing::info!(vm = %spec.name, state = ?m.state, message = ?m.message, "incoming migration");
        }
        let mut s = self.status.lock().expect("lock");
        s.state = ObservedState::Incoming;
        s.message = None;
        s.reboots = spec.reboots;
        drop(s);
        self.report_migration(m, news);
    }

    /// Source: send the guest to the target, or report how that ended.
    async fn send(&mut self, spec: &VmSpec, rx: &watch::Receiver<Option<VmSpec>>) {
        let Some(MigrationSpec::Outgoing {
            id,
            uri,
            nbd,
            downtime_limit_ms,
            ..
        }) = &spec.migration
        else {
            return;
        };
        if let Some(done) = self.sent.clone().filter(|s| s.id == *id) {
            self.report_migration(done, false);
            return;
        }
        if !self.guest.is_running().await {
            // A stopped VM moves cold: its QEMU starts, vCPUs stopped, only
            // to send it.
            let started = match spec.power {
                PowerState::Stopped => self.guest.start_paused(spec).await,
                PowerState::Running => Err(anyhow::anyhow!("the guest is not running here")),
            };
            if let Err(e) = started {
                self.report_migration(
                    MigrationStatus {
                        message: Some(format!("{e:#}")),
                        ..MigrationStatus::new(*id, MigrationState::Failed)
                    },
                    true,
                );
                return;
            }
        }
        let out = Outgoing {
            id: *id,
            uri,
            nbd: nbd.as_deref(),
            downtime_limit_ms: *downtime_limit_ms,
        };
        let status = self.status.clone();
        let report = move |m: MigrationStatus| {
            status.lock().expect("lock").migration = Some(m);
        };
        // Cancelled, or the controller gave up on this migration.
        let cancelled = || {
            !matches!(
                rx.borrow().as_ref().and_then(|s| s.migration.as_ref()),
                Some(MigrationSpec::Outgoing { id: i, cancel: false, .. }) if i == id
            )
        };
        tracing::info!(vm = %spec.name, %uri, "migrating out");
        let result = self.guest.outgoing(spec, &out, &report, &cancelled).await;
        tracing::info!(vm = %spec.name, state = ?result.state, message = ?result.message, "migration ended");
        self.sent = Some(result.clone());
        self.report_migration(result, true);
    }

    fn report(&self, state: ObservedState, reboots: u64, message: Option<String>) {
        let mut s = self.status.lock().expect("lock");
        s.state = state;
        s.reboots = reboots;
        s.message = message;
        s.cpu_percent = None;
    }

    async fn converge(&mut self, spec: &VmSpec) {
        let running = self.guest.is_running().await;
        let first = self.last_power.is_none();
        // After an agent restart, the count the guest's host kept (a reboot
        // asked for just before the agent died is still owed).
        let done = match self.reboots_done {
            Some(done) => done,
            None => self.guest.saved_reboots().await.unwrap_or(spec.reboots),
        };
        match spec.power {
            PowerState::Running if running => {
                if spec.reboots > done {
                    tracing::info!(vm = %spec.name, "rebooting");
                    if let Err(e) = self.guest.reset().await {
                        tracing::warn!(vm = %spec.name, error = %format_args!("{e:#}"), "reset");
                    }
                }
                self.mark_reboots(spec.reboots).await;
                self.failed = false;
                self.report(ObservedState::Running, spec.reboots, None);
            }
            PowerState::Running => {
                let asked =
                    first || self.last_power == Some(PowerState::Stopped) || spec.reboots > done;
                if asked {
                    self.report(ObservedState::Starting, spec.reboots, None);
                    tracing::info!(vm = %spec.name, "starting");
                    self.mark_reboots(spec.reboots).await;
                    match self.guest.start(spec).await {
                        Ok(()) => {
                            self.failed = false;
                            self.report(ObservedState::Running, spec.reboots, None);
                        }
                        Err(e) => {
                            let message = format!("{e:#}");
                            tracing::warn!(vm = %spec.name, error = %message, "start failed");
                            self.failed = true;
                            self.report(ObservedState::Failed, spec.reboots, Some(message));
                        }
                    }
                } else if !self.failed {
                    self.report(ObservedState::Stopped, spec.reboots, None);
                }
            }
            PowerState::Stopped => {
                if running {
                    self.report(ObservedState::Stopping, spec.reboots, None);
                    tracing::info!(vm = %spec.name, "stopping");
                    if let Err(e) = self.guest.shutdown(self.shared.config.stop_timeout).await {
                        tracing::warn!(vm = %spec.name, error = %format_args!("{e:#}"), "stop");
                    }
                }
                self.mark_reboots(spec.reboots).await;
                self.failed = false;
                let state = if self.guest.is_running().await {
                    ObservedState::Stopping
                } else {
                    ObservedState::Stopped
                };
                self.report(state, spec.reboots, None);
            }
        }
        self.last_power = Some(spec.power);
        let running = self.status.lock().expect("lock").state == ObservedState::Running;
        if running {
            // Cores dedicated to the other VMs of this host.
            let reserved = self
                .shared
                .applied
                .lock()
                .await
                .vms
                .iter()
                .filter(|v| v.id != spec.id)
                .flat_map(|v| v.machine.cpu.cores.iter().copied())
                .collect();
            if let Err(e) = self.guest.pin(&spec.machine.cpu.cores, &reserved).await {
                tracing::warn!(vm = %spec.name, error = %format_args!("{e:#}"), "pinning");
            }
        }
        self.status.lock().expect("lock").cpu_percent = self.guest.cpu_percent(spec);
    }
}
