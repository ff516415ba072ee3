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

use super::{bump_generation, lookup, migration_key, now_ms, App, Batch, Inventory};
use crate::error::Result;
use kumo_api::{
    ApiError, ErrorCode, HostState, MigrateVm, Migration, MigrationOutcome, MigrationPhase,
    MigrationReason, MigrationResult, MigrationStorage, PowerState, Vm, VmState,
};
use std::collections::BTreeSet;
use std::time::Duration;
use uuid::Uuid;

/// QEMU's default downtime limit; `--downtime-ms` changes it per migration.
pub const DEFAULT_DOWNTIME_MS: u64 = 300;
/// How long a target may take to get its QEMU listening.
pub(super) const PREPARE_TIMEOUT: Duration = Duration::from_secs(120);

pub(super) fn result(
    m: &Migration,
    outcome: MigrationOutcome,
    message: Option<String>,
) -> MigrationResult {
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

pub(super) fn abort(
    vm: &Vm,
    m: &Migration,
    outcome: MigrationOutcome,
    message: String,
    bump: &mut BTreeSet<Uuid>,
    batch: &mut Batch,
) -> Vm {
    batch.migration_event(
        match outcome {
            MigrationOutcome::Cancelled => "vm.migration.cancelled",
            _ => "vm.migration.failed",
        },
        vm,
        &m.reason,
        format!(
            "migration from {} to {} ended; the VM stays on {}: {message}",
            m.source, m.target, m.source
        ),
    );
    bump.insert(m.source_id);
    bump.insert(m.target_id);
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

pub(super) fn storage_name(s: MigrationStorage) -> &'static str {
    match s {
        MigrationStorage::Shared => "shared",
        MigrationStorage::Local => "local",
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

/// Whether a VM is settled enough to move: running (live) or stopped (cold).
pub(super) fn movable(vm: &Vm) -> bool {
    matches!(
        (vm.power, vm.state),
        (PowerState::Running, VmState::Running) | (PowerState::Stopped, VmState::Stopped)
    )
}

/// Why a VM cannot start moving now, if it cannot.
fn check_movable(inv: &Inventory, vm: &Vm) -> Result<()> {
    let conflict = |msg: String| Err(ApiError::new(ErrorCode::Conflict, "name", msg).into());
    if let Some(m) = &vm.migration {
        return conflict(format!(
            "VM {:?} is already migrating from {} to {}",
            vm.name, m.source, m.target
        ));
    }
    if !movable(vm) {
        return conflict(format!(
            "VM {:?} is {}; a VM moves when it is running (live) or stopped (cold)",
            vm.name, vm.state
        ));
    }
    let host = inv
        .host_by_id(vm.host_id)
        .ok_or_else(|| crate::Error::internal(format!("host of VM {} missing", vm.name)))?;
    if host.state() == HostState::Down {
        return conflict(format!(
            "host {} of VM {:?} is down",
            host.rec.name, vm.name
        ));
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
        self.start_migration(&mut inv, name, req, MigrationReason::Operator)
            .await
    }

    pub(super) async fn start_migration(
        &self,
        inv: &mut Inventory,
        name: &str,
        req: MigrateVm,
        reason: MigrationReason,
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
        batch.put_vm(next.clone());
        if let Err(e) = bump_generation(inv, target.id, &mut batch) {
            release(inv);
            return Err(e);
        }
        batch.migration_event(
            "vm.migration.started",
            &vm,
            &reason,
            format!(
                "live migration from {} to {} ({} storage, downtime limit {downtime_limit_ms} ms); reason: {reason}",
                source.name,
                target.name,
                storage_name(storage)
            ),
        );
        // The commit's put_vm takes the reservation over under the same key.
        if let Err(e) = self.commit(inv, batch).await {
            release(inv);
            return Err(e);
        }
        Ok(next)
    }

    /// Stop a migration: the VM keeps running where it was.
    pub async fn vm_migrate_cancel(&self, name: &str) -> Result<Vm> {
        let mut inv = self.inv.write().await;
        let vm = lookup(inv.vms(), "vm", name)?.clone();
        let Some(m) = vm.migration.clone() else {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                "name",
                format!("VM {name:?} is not migrating"),
            )
            .into());
        };
        let mut bump = BTreeSet::new();
        let mut batch = Batch::default();
        let next = match m.phase {
            // Nothing is sent yet: give up at once.
            MigrationPhase::Preparing => abort(
                &vm,
                &m,
                MigrationOutcome::Cancelled,
                "cancelled before the transfer began".into(),
                &mut bump,
                &mut batch,
            ),
            MigrationPhase::Transferring => {
                batch.migration_event(
                    "vm.migration.cancelling",
                    &vm,
                    &m.reason,
                    format!("cancel asked; {} stops sending", m.source),
                );
                bump.insert(m.source_id);
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
        batch.put_vm(next.clone());
        for id in bump {
            bump_generation(&inv, id, &mut batch)?;
        }
        self.commit(&mut inv, batch).await?;
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
            let mut bump = BTreeSet::new();
            let mut batch = Batch::default();
            let next = abort(
                &vm,
                &m,
                MigrationOutcome::Failed,
                why,
                &mut bump,
                &mut batch,
            );
            batch.put_vm(next);
            for id in bump {
                if inv.host_by_id(id).is_some() {
                    bump_generation(&inv, id, &mut batch)?;
                }
            }
            self.commit(&mut inv, batch).await?;
        }
        Ok(())
    }
}
