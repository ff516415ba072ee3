//! Live migration, driven level-triggered from what both hosts report.
//!
//! ```text
//!   migrate: room reserved on the target (scheduler), VM record + target's
//!   desired state (Incoming) committed together
//!        |
//!        v          target reports listening (uri, nbd)
//!   preparing ---------------------------------------> transferring
//!        |                                        source's desired state
//!        | target failed, target down,            gets Outgoing (uri)
//!        | no answer in time, cancel                      |
//!        v                                                | source reports
//!   aborted: VM stays on the source; reservation          | completed
//!   released; target drops its waiting QEMU  <------+     v
//!        ^                                  failed, |  completed: the VM
//!        |                                cancelled |  record moves to the
//!   cancelling <-- cancel ---- transferring --------+  target in one commit;
//!   (source told to stop)                              the source drops its
//!                                                      paused copy
//! ```
//!
//! The VM record changes host only once the source's QEMU says the transfer
//! completed (after which it stays paused for good), so a controller or
//! agent killed at any point finds the VM on exactly one host: QEMU carries
//! on with a transfer by itself, agents re-attach and report again, and the
//! step taken next depends only on the stored phase and the reports.

use super::transitions::VmRequest;
use super::vms::{bump_generation, key, record};
use super::{lookup, migration_key, now_ms, App, Batch, Inventory};
use crate::error::Result;
use kumo_api::{
    ApiError, ErrorCode, HostState, MigrateVm, Migration, MigrationOutcome, MigrationPhase,
    MigrationResult, MigrationState, MigrationStorage, PowerState, Vm, VmState, VmStatus,
};
use std::time::Duration;
use uuid::Uuid;

/// QEMU's default downtime limit; `--downtime-ms` changes it per migration.
pub const DEFAULT_DOWNTIME_MS: u64 = 300;
/// How long a target may take to get its QEMU listening.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(120);

/// What one report means for a migration.
enum Step {
    Ready {
        uri: String,
        nbd: Option<String>,
    },
    Completed {
        paused_us: Option<u64>,
        qemu_downtime_ms: Option<u64>,
        transfer_ms: Option<u64>,
    },
    Aborted {
        outcome: MigrationOutcome,
        message: String,
    },
}

/// Where the migration goes next given the report of one of its hosts.
/// With the source host silent (`source_down`), the target's word decides:
/// a guest running there completed the migration (its QEMU runs the guest
/// only once it has all of it, and the source's copy stays paused after a
/// completed transfer); a target still waiting long after the start
/// (`late`) gives up, which breaks off any transfer still under way and
/// leaves the guest with the source.
fn next_step(
    m: &Migration,
    from_source: bool,
    (source_down, late): (bool, bool),
    status: Option<&VmStatus>,
) -> Option<Step> {
    let ms = status?.migration.as_ref().filter(|s| s.id == m.id)?;
    let message = || {
        let side = if from_source { "source" } else { "target" };
        let why = ms
            .message
            .clone()
            .unwrap_or_else(|| "no reason given".into());
        format!(
            "{side} host {}: {why}",
            if from_source { &m.source } else { &m.target }
        )
    };
    match (from_source, ms.state) {
        (false, MigrationState::Listening) if m.phase == MigrationPhase::Preparing => {
            Some(Step::Ready {
                uri: ms.uri.clone()?,
                nbd: ms.nbd.clone(),
            })
        }
        (false, MigrationState::Listening) if source_down && late => Some(Step::Aborted {
            outcome: MigrationOutcome::Failed,
            message: format!("source host {} went down during the transfer", m.source),
        }),
        (false, MigrationState::Completed) if source_down => Some(Step::Completed {
            paused_us: None,
            qemu_downtime_ms: None,
            transfer_ms: None,
        }),
        (true, MigrationState::Completed) => Some(Step::Completed {
            paused_us: ms.event_us,
            qemu_downtime_ms: ms.qemu_downtime_ms,
            transfer_ms: ms.progress.as_ref().map(|p| p.elapsed_ms),
        }),
        (_, MigrationState::Failed) => Some(Step::Aborted {
            outcome: MigrationOutcome::Failed,
            message: message(),
        }),
        (true, MigrationState::Cancelled) => Some(Step::Aborted {
            outcome: MigrationOutcome::Cancelled,
            message: "cancelled".into(),
        }),
        _ => None,
    }
}

/// Apply what a host reports about a VM it sends or receives.
pub(super) fn step(
    inv: &Inventory,
    vm: &Vm,
    host: Uuid,
    status: Option<&VmStatus>,
    out: &mut super::vms::Reported,
    batch: &mut Batch,
) {
    let Some(m) = &vm.migration else {
        fill_downtime(vm, host, status, out, batch);
        return;
    };
    let from_source = host == m.source_id;
    let source_down = inv
        .host_by_id(m.source_id)
        .is_none_or(|h| h.state() == HostState::Down);
    let late = now_ms().saturating_sub(m.started_at) > PREPARE_TIMEOUT.as_millis() as u64;
    let Some(step) = next_step(m, from_source, (source_down, late), status) else {
        return;
    };
    let next = match step {
        Step::Ready { uri, nbd } => {
            let next = Vm {
                migration: Some(Migration {
                    phase: MigrationPhase::Transferring,
                    uri: Some(uri.clone()),
                    nbd,
                    ..m.clone()
                }),
                ..vm.clone()
            };
            batch.event(
                "vm.migration.transferring",
                format!("vm/{}", vm.name),
                &vm.project,
                format!("target {} listens at {uri}; {} sends", m.target, m.source),
            );
            out.bump.insert(m.source_id);
            next
        }
        Step::Completed {
            paused_us,
            qemu_downtime_ms,
            transfer_ms,
        } => {
            let mut next = complete(inv, vm, m, out, batch);
            if let Some(last) = next.last_migration.as_mut() {
                last.paused_at_us = paused_us;
                last.qemu_downtime_ms = qemu_downtime_ms;
                last.transfer_ms = transfer_ms;
            }
            next
        }
        Step::Aborted { outcome, message } => abort(vm, m, outcome, message, out, batch),
    };
    batch.put(key(&vm.name), &record(&next));
    out.changed.push(next);
}

/// After the switch-over the target keeps reporting when its guest resumed;
/// with the source's pause time that gives the downtime the guest saw.
fn fill_downtime(
    vm: &Vm,
    host: Uuid,
    status: Option<&VmStatus>,
    out: &mut super::vms::Reported,
    batch: &mut Batch,
) {
    let Some(last) = &vm.last_migration else {
        return;
    };
    if last.downtime_ms.is_some() || host != vm.host_id {
        return;
    }
    let Some(resumed) = status
        .and_then(|s| s.migration.as_ref())
        .filter(|s| s.id == last.id && s.state == MigrationState::Completed)
        .and_then(|s| s.event_us)
    else {
        return;
    };
    let Some(paused) = last.paused_at_us else {
        return;
    };
    let mut next = vm.clone();
    let result = next.last_migration.as_mut().expect("checked above");
    result.downtime_ms = Some(resumed.saturating_sub(paused) as f64 / 1000.0);
    batch.event(
        "vm.migration.downtime",
        format!("vm/{}", vm.name),
        &vm.project,
        format!(
            "guest paused {:.1} ms at the switch-over from {} to {}",
            result.downtime_ms.unwrap_or_default(),
            result.source,
            result.target
        ),
    );
    batch.put(key(&vm.name), &record(&next));
    out.changed.push(next);
}

fn result(m: &Migration, outcome: MigrationOutcome, message: Option<String>) -> MigrationResult {
    MigrationResult {
        id: m.id,
        source: m.source.clone(),
        target: m.target.clone(),
        storage: m.storage,
        outcome,
        message,
        downtime_ms: None,
        qemu_downtime_ms: None,
        transfer_ms: None,
        paused_at_us: None,
        total_ms: now_ms().saturating_sub(m.started_at),
        reason: m.reason.clone(),
        finished_at: now_ms(),
    }
}

fn complete(
    inv: &Inventory,
    vm: &Vm,
    m: &Migration,
    out: &mut super::vms::Reported,
    batch: &mut Batch,
) -> Vm {
    let zone = inv
        .host_by_id(m.target_id)
        .map_or_else(|| vm.zone.clone(), |h| h.rec.zone.clone());
    // A drain remembers where the VM came from (the first host, over
    // several moves; also when the host was undrained meanwhile); arriving
    // back there closes the account.
    let drained = m.reason.starts_with(super::drains::REASON_PREFIX);
    let evacuated_from = match &vm.evacuated_from {
        Some(home) if *home == m.target => None,
        Some(home) => Some(home.clone()),
        None if drained => Some(m.source.clone()),
        None => None,
    };
    let last = result(m, MigrationOutcome::Completed, None);
    batch.event(
        "vm.migrated",
        format!("vm/{}", vm.name),
        &vm.project,
        format!(
            "moved {} from {} to {} ({} storage) in {:.1} s; reason: {}",
            match vm.power {
                PowerState::Running => "live",
                PowerState::Stopped => "stopped",
            },
            m.source,
            m.target,
            storage_name(m.storage),
            last.total_ms as f64 / 1000.0,
            m.reason
        ),
    );
    out.bump.insert(m.source_id);
    out.bump.insert(m.target_id);
    Vm {
        host: m.target.clone(),
        host_id: m.target_id,
        zone,
        cores: m.target_cores.clone(),
        state: match vm.power {
            PowerState::Running => VmState::Running,
            PowerState::Stopped => VmState::Stopped,
        },
        message: None,
        migration: None,
        last_migration: Some(last),
        evacuated_from,
        ..vm.clone()
    }
}

fn abort(
    vm: &Vm,
    m: &Migration,
    outcome: MigrationOutcome,
    message: String,
    out: &mut super::vms::Reported,
    batch: &mut Batch,
) -> Vm {
    batch.event(
        match outcome {
            MigrationOutcome::Cancelled => "vm.migration.cancelled",
            _ => "vm.migration.failed",
        },
        format!("vm/{}", vm.name),
        &vm.project,
        format!(
            "migration from {} to {} ended; the VM stays on {}: {message}",
            m.source, m.target, m.source
        ),
    );
    out.bump.insert(m.source_id);
    out.bump.insert(m.target_id);
    let mut next = Vm {
        migration: None,
        last_migration: Some(result(m, outcome, Some(message))),
        ..vm.clone()
    };
    if next.state == VmState::Migrating {
        next.state = VmState::Running;
    }
    next
}

fn storage_name(s: MigrationStorage) -> &'static str {
    match s {
        MigrationStorage::Shared => "shared",
        MigrationStorage::Local => "local",
    }
}

/// Keep the source's transfer figures in memory for the API.
pub(super) fn record_progress(inv: &mut Inventory, host: &str, statuses: &[VmStatus]) {
    let Some(id) = inv.hosts.get(host).map(|h| h.rec.id) else {
        return;
    };
    let updates: Vec<(String, kumo_api::MigrationProgress)> = statuses
        .iter()
        .filter_map(|s| {
            let progress = s.migration.as_ref()?.progress.clone()?;
            let name = inv.vm_name(s.id)?;
            let vm = inv.vms().get(name)?;
            (vm.migration.as_ref()?.source_id == id).then(|| (name.to_string(), progress))
        })
        .collect();
    for (name, progress) in updates {
        inv.set_migration_progress(&name, progress);
    }
}

/// The placement request a VM was created with, moving away from its host.
pub(super) fn move_request(inv: &Inventory, vm: &Vm) -> Result<kumo_sched::Request> {
    let parse = |src: &Option<String>| {
        src.as_deref()
            .map(kumo_sched::parse_host_expr)
            .transpose()
            .map_err(|e| crate::Error::internal(format!("VM {}: stored expression: {e}", vm.name)))
    };
    Ok(kumo_sched::Request {
        size: vm.size,
        cpu_policy: vm.cpu_policy,
        zone: None,
        requirements: parse(&vm.requirements)?,
        rank: parse(&vm.rank)?,
        groups: inv.group_rules(&vm.groups)?,
        policy: Default::default(),
        from_host: Some(vm.host.clone()),
    })
}

/// Whether a VM is settled enough to move: running (live) or stopped
/// (cold), as [`super::transitions`] says.
pub(super) fn movable(vm: &Vm) -> bool {
    use super::transitions::{vm_accepts, vm_row};
    vm_accepts(vm_row(vm), VmRequest::Migrate)
}

/// Why a VM cannot start moving now, if it cannot: its state (see
/// [`super::transitions`]) or its host being down.
fn check_movable(inv: &Inventory, vm: &Vm) -> Result<()> {
    super::transitions::check_vm(vm, VmRequest::Migrate)?;
    let host = inv
        .host_by_id(vm.host_id)
        .ok_or_else(|| crate::Error::internal(format!("host of VM {} missing", vm.name)))?;
    if host.state() == HostState::Down {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            "name",
            format!("host {} of VM {:?} is down", host.rec.name, vm.name),
        )
        .into());
    }
    Ok(())
}

impl Inventory {
    /// Plan a VM's move: the scheduler chooses the target (or checks the
    /// one asked for) and reserves room there.
    fn reserve_move(&mut self, vm: &Vm, to: Option<&str>) -> Result<kumo_sched::Placement> {
        let request = move_request(self, vm)?;
        let key = migration_key(&vm.name);
        let Some(to) = to else {
            return self
                .cluster
                .place_moving(&vm.name, &key, &request)
                .map_err(|refusal| {
                    ApiError::new(ErrorCode::NoValidHost, "name", refusal.to_string()).into()
                });
        };
        let target = self
            .hosts
            .get(to)
            .ok_or_else(|| ApiError::not_found("to", "host", to))?;
        if target.rec.id == vm.host_id {
            return Err(
                ApiError::invalid("to", format!("VM {:?} already runs on {to}", vm.name)).into(),
            );
        }
        self.cluster
            .place_on(&vm.name, &key, to, &request)
            .map_err(|c| {
                ApiError::new(
                    ErrorCode::NoValidHost,
                    "to",
                    format!("host {to} cannot take VM {:?}: {}", vm.name, c.describe()),
                )
                .into()
            })
    }
}

impl App {
    /// Start moving a VM to another host: live if it runs, cold (its disk
    /// copied, nothing running) if it is stopped.
    pub async fn vm_migrate(&self, name: &str, req: MigrateVm) -> Result<Vm> {
        let mut inv = self.inv.write().await;
        self.start_migration(&mut inv, name, req, "requested".into())
            .await
    }

    pub(super) async fn start_migration(
        &self,
        inv: &mut Inventory,
        name: &str,
        req: MigrateVm,
        reason: String,
    ) -> Result<Vm> {
        let downtime_limit_ms = req.downtime_limit_ms.unwrap_or(DEFAULT_DOWNTIME_MS);
        let vm = lookup(inv.vms(), "vm", name)?.clone();
        check_movable(inv, &vm)?;
        let placement = inv.reserve_move(&vm, req.to.as_deref())?;
        let release = |inv: &mut Inventory| inv.cluster.release(&migration_key(name));
        let (source, target) = match (
            inv.host_by_id(vm.host_id).map(|h| h.rec.clone()),
            inv.hosts.get(&placement.host).map(|h| h.rec.clone()),
        ) {
            (Some(s), Some(t)) => (s, t),
            _ => {
                release(inv);
                return Err(crate::Error::internal("migration hosts missing"));
            }
        };
        let storage = if source.datastore.is_some() && source.datastore == target.datastore {
            MigrationStorage::Shared
        } else {
            MigrationStorage::Local
        };
        let m = Migration {
            id: Uuid::new_v4(),
            source: source.name.clone(),
            source_id: source.id,
            target: target.name.clone(),
            target_id: target.id,
            target_cores: placement.cores,
            storage,
            phase: MigrationPhase::Preparing,
            downtime_limit_ms,
            reason: reason.clone(),
            uri: None,
            nbd: None,
            progress: None,
            started_at: now_ms(),
        };
        let mut next = Vm {
            migration: Some(m),
            ..vm.clone()
        };
        if vm.state == VmState::Running {
            next.state = VmState::Migrating;
        }
        let mut batch = Batch::default();
        batch.put(key(name), &record(&next));
        let rec = match bump_generation(inv, target.id, &mut batch) {
            Ok(rec) => rec,
            Err(e) => {
                release(inv);
                return Err(e);
            }
        };
        batch.event(
            "vm.migration.started",
            format!("vm/{name}"),
            &vm.project,
            format!(
                "live migration from {} to {} ({} storage, downtime limit {downtime_limit_ms} ms); reason: {reason}",
                source.name,
                target.name,
                storage_name(storage)
            ),
        );
        if let Err(e) = self.commit(inv, batch).await {
            release(inv);
            return Err(e);
        }
        // put_vm takes the reservation over under the same key.
        inv.put_vm(next.clone());
        self.install_host(inv, rec);
        Ok(next)
    }

    /// Stop a migration: the VM keeps running where it was.
    pub async fn vm_migrate_cancel(&self, name: &str) -> Result<Vm> {
        let mut inv = self.inv.write().await;
        let vm = lookup(inv.vms(), "vm", name)?.clone();
        super::transitions::check_vm(&vm, VmRequest::CancelMigration)?;
        let Some(m) = vm.migration.clone() else {
            return Err(crate::Error::internal(format!(
                "VM {name} accepted a cancel without a migration"
            )));
        };
        let mut out = super::vms::Reported::default();
        let mut batch = Batch::default();
        let next = match m.phase {
            // Nothing is sent yet: give up at once.
            MigrationPhase::Preparing => abort(
                &vm,
                &m,
                MigrationOutcome::Cancelled,
                "cancelled before the transfer began".into(),
                &mut out,
                &mut batch,
            ),
            MigrationPhase::Transferring => {
                batch.event(
                    "vm.migration.cancelling",
                    format!("vm/{name}"),
                    &vm.project,
                    format!("cancel asked; {} stops sending", m.source),
                );
                out.bump.insert(m.source_id);
                Vm {
                    migration: Some(Migration {
                        phase: MigrationPhase::Cancelling,
                        ..m
                    }),
                    ..vm.clone()
                }
            }
            MigrationPhase::Cancelling => return Ok(vm),
        };
        batch.put(key(name), &record(&next));
        let recs = out
            .bump
            .iter()
            .map(|id| bump_generation(&inv, *id, &mut batch))
            .collect::<Result<Vec<_>>>()?;
        self.commit(&mut inv, batch).await?;
        inv.put_vm(next.clone());
        for rec in recs {
            self.install_host(&mut inv, rec);
        }
        Ok(next)
    }

    /// Give up on migrations whose target never got ready or went down
    /// before the transfer began (once it began, the hosts' reports decide).
    pub async fn migrations_check(&self) -> Result<()> {
        let mut inv = self.inv.write().await;
        let stuck: Vec<(Vm, Migration, String)> = inv
            .vms_migrating()
            .filter_map(|vm| {
                let m = vm.migration.as_ref()?;
                let state = |id| inv.host_by_id(id).map(|h| h.state());
                let late =
                    now_ms().saturating_sub(m.started_at) > PREPARE_TIMEOUT.as_millis() as u64;
                let why = match (m.phase, state(m.target_id)) {
                    (MigrationPhase::Preparing, None) => {
                        format!("target host {} is gone", m.target)
                    }
                    (MigrationPhase::Preparing, Some(HostState::Down)) => {
                        format!("target host {} is down", m.target)
                    }
                    (MigrationPhase::Preparing, _) if late => format!(
                        "target host {} did not get ready in {} s",
                        m.target,
                        PREPARE_TIMEOUT.as_secs()
                    ),
                    _ => return None,
                };
                Some((vm.clone(), m.clone(), why))
            })
            .collect();
        for (vm, m, why) in stuck {
            let mut out = super::vms::Reported::default();
            let mut batch = Batch::default();
            let next = abort(&vm, &m, MigrationOutcome::Failed, why, &mut out, &mut batch);
            batch.put(key(&vm.name), &record(&next));
            let recs = out
                .bump
                .iter()
                .filter(|id| inv.host_by_id(**id).is_some())
                .map(|id| bump_generation(&inv, *id, &mut batch))
                .collect::<Result<Vec<_>>>()?;
            self.commit(&mut inv, batch).await?;
            inv.put_vm(next);
            for rec in recs {
                self.install_host(&mut inv, rec);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kumo_api::MigrationStatus;

    fn migration(phase: MigrationPhase) -> Migration {
        Migration {
            id: Uuid::from_u128(1),
            source: "h1".into(),
            source_id: Uuid::from_u128(11),
            target: "h2".into(),
            target_id: Uuid::from_u128(12),
            target_cores: Vec::new(),
            storage: MigrationStorage::Local,
            phase,
            downtime_limit_ms: DEFAULT_DOWNTIME_MS,
            reason: "requested".into(),
            uri: None,
            nbd: None,
            progress: None,
            started_at: 0,
        }
    }

    fn report(id: u128, state: MigrationState) -> VmStatus {
        VmStatus {
            id: Uuid::nil(),
            state: kumo_api::ObservedState::Running,
            reboots: 0,
            cpu_percent: None,
            message: None,
            migration: Some(MigrationStatus {
                uri: Some("tcp:10.0.0.2:4000".into()),
                ..MigrationStatus::new(Uuid::from_u128(id), state)
            }),
        }
    }

    /// Which step each report leads to: (phase, from source, source down,
    /// late, reported state) -> step name.
    #[test]
    fn reports_decide_the_next_step() {
        use MigrationPhase::{Preparing, Transferring};
        use MigrationState as S;
        let cases = [
            (Preparing, false, false, false, S::Listening, Some("ready")),
            (Transferring, false, false, false, S::Listening, None),
            (Transferring, true, false, false, S::Active, None),
            (
                Transferring,
                true,
                false,
                false,
                S::Completed,
                Some("completed"),
            ),
            // The target's word counts only when the source is silent.
            (Transferring, false, false, false, S::Completed, None),
            (
                Transferring,
                false,
                true,
                false,
                S::Completed,
                Some("completed"),
            ),
            // A target still waiting long after a silent source gives up.
            (Transferring, false, true, false, S::Listening, None),
            (Transferring, false, false, true, S::Listening, None),
            (
                Transferring,
                false,
                true,
                true,
                S::Listening,
                Some("failed"),
            ),
            (Transferring, false, false, false, S::Failed, Some("failed")),
            (Transferring, true, false, false, S::Failed, Some("failed")),
            (
                Transferring,
                true,
                false,
                false,
                S::Cancelled,
                Some("cancelled"),
            ),
        ];
        for (phase, from_source, down, late, state, want) in cases {
            let m = migration(phase);
            let got = next_step(&m, from_source, (down, late), Some(&report(1, state)));
            let got = got.map(|s| match s {
                Step::Ready { .. } => "ready",
                Step::Completed { .. } => "completed",
                Step::Aborted {
                    outcome: MigrationOutcome::Cancelled,
                    ..
                } => "cancelled",
                Step::Aborted { .. } => "failed",
            });
            assert_eq!(
                got, want,
                "{phase:?} source={from_source} down={down} late={late} {state:?}"
            );
        }
        // A report about another migration of the VM says nothing.
        let m = migration(Transferring);
        let other = report(2, S::Completed);
        assert!(next_step(&m, true, (false, false), Some(&other)).is_none());
    }
}
