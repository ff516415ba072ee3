//! One actor per VM: it receives the VM's latest spec (or `None` once the
//! VM was deleted) and converges the guest to it, publishing what it
//! observes for the heartbeat.
//!
//! The actor starts a guest when it first sees it wanted running (after an
//! agent restart that means: re-attach if QEMU is alive, start it if not),
//! when the spec's power goes from stopped to running, or when a start is
//! asked again after a failure. A guest that powers itself off stays off and
//! is reported `stopped`; the controller takes that as the new wish.

use crate::driver::Guest;
use crate::Shared;
use kumo_api::{DesiredState, ObservedState, PowerState, VmSpec, VmStatus};
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
                if old.as_ref() != Some(spec) {
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
            if let Err(e) = guest.destroy().await {
                tracing::warn!(vm = %id, error = %e, "removing orphan");
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
    guest: Guest,
    status: Arc<std::sync::Mutex<VmStatus>>,
    /// The power state of the last spec seen; `None` before the first.
    last_power: Option<PowerState>,
    reboots_done: Option<u64>,
    failed: bool,
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
    };
    loop {
        let spec = rx.borrow_and_update().clone();
        let Some(spec) = spec else {
            match actor.guest.destroy().await {
                Ok(()) => {
                    tracing::info!(vm = %id, "guest deleted");
                    return;
                }
                Err(e) => tracing::warn!(vm = %id, error = %e, "deleting guest; will retry"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
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
    fn mark_reboots(&mut self, n: u64) {
        if self.reboots_done != Some(n) {
            self.reboots_done = Some(n);
            self.guest.save_reboots(n);
        }
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
            None => self.guest.saved_reboots().unwrap_or(spec.reboots),
        };
        match spec.power {
            PowerState::Running if running => {
                if spec.reboots > done {
                    tracing::info!(vm = %spec.name, "rebooting");
                    if let Err(e) = self.guest.reset().await {
                        tracing::warn!(vm = %spec.name, error = %e, "reset");
                    }
                }
                self.mark_reboots(spec.reboots);
                self.failed = false;
                self.report(ObservedState::Running, spec.reboots, None);
            }
            PowerState::Running => {
                let asked =
                    first || self.last_power == Some(PowerState::Stopped) || spec.reboots > done;
                if asked {
                    self.report(ObservedState::Starting, spec.reboots, None);
                    tracing::info!(vm = %spec.name, "starting");
                    self.mark_reboots(spec.reboots);
                    match self.guest.start(&self.shared, spec).await {
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
                        tracing::warn!(vm = %spec.name, error = %e, "stop");
                    }
                }
                self.mark_reboots(spec.reboots);
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
                .flat_map(|v| v.cores.iter().copied())
                .collect();
            if let Err(e) = self.guest.pin(&spec.cores, &reserved).await {
                tracing::warn!(vm = %spec.name, error = %format!("{e:#}"), "pinning");
            }
        }
        self.status.lock().expect("lock").cpu_percent = self.guest.cpu_percent();
    }
}
