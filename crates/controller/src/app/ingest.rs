//! Report ingestion: what the hosts' heartbeats (and their silence) change.
//! The top of `app/`: one heartbeat is followed here from the host's
//! liveness through each VM's derived state to every migration step its
//! reports decide, using the per-resource files below and never imported by
//! them.

use super::migrations::{abort, result, storage_name, PREPARE_TIMEOUT};
use super::records::{HostMode, HostRecord};
use super::vms::derive_state;
use super::{bump_generation, lookup, now_ms, App, Batch, HostLive, Inventory};
use crate::error::Result;
use kumo_api::{
    Heartbeat, HeartbeatResponse, HostState, Migration, MigrationOutcome, MigrationPhase,
    MigrationReason, MigrationState, ObservedState, PowerState, Vm, VmState, VmStatus,
};
use std::collections::{BTreeSet, HashMap};
use std::time::Instant;
use uuid::Uuid;

/// What a heartbeat changed so far: how many VMs it put into the batch,
/// and the hosts whose desired state changed with them.
#[derive(Default)]
struct Reported {
    changed: usize,
    bump: BTreeSet<Uuid>,
}

/// Put into the batch what a heartbeat changes: VMs whose state moved,
/// deleted VMs the host confirms gone, and the hosts whose desired state
/// changed with them.
fn reconcile_reported(
    inv: &Inventory,
    host: &HostRecord,
    applied: u64,
    statuses: &[VmStatus],
    batch: &mut Batch,
) {
    // The host runs what we last asked for. (An agent ahead of us applied
    // the state of a removed host of the same name: not caught up.)
    let caught_up = applied == host.generation;
    let mut out = Reported::default();
    let statuses: HashMap<Uuid, &VmStatus> = statuses.iter().map(|s| (s.id, s)).collect();
    for vm in inv.vms_incoming(host.id) {
        step(
            inv,
            vm,
            host.id,
            statuses.get(&vm.id).copied(),
            &mut out,
            batch,
        );
    }
    for vm in inv.vms_on(host.id) {
        let status = statuses.get(&vm.id).copied();
        if vm.migration.is_some() || vm.last_migration.is_some() {
            let before = out.changed;
            step(inv, vm, host.id, status, &mut out, batch);
            if out.changed > before {
                continue;
            }
        }
        if vm.state == VmState::Deleting {
            if caught_up && status.is_none() {
                batch.remove_vm(&vm.name);
                batch.event(
                    "vm.deleted",
                    format!("vm/{}", vm.name),
                    &vm.project,
                    format!("deleted from host {}", host.name),
                );
            }
            continue;
        }
        let mut next = vm.clone();
        // The guest powered itself off: the host has applied our latest
        // wishes (agents reset a VM's status when its spec changes, so this
        // report is about the current one) and left it down, so take that as
        // the new desired state.
        if caught_up
            && vm.power == PowerState::Running
            && status.is_some_and(|s| s.state == ObservedState::Stopped && s.reboots >= vm.reboots)
        {
            next.power = PowerState::Stopped;
            out.bump.insert(host.id);
        }
        let (state, message) = derive_state(&next, status);
        next.state = state;
        next.message = message;
        if next.state != vm.state || next.power != vm.power || next.message != vm.message {
            let detail = next
                .message
                .clone()
                .unwrap_or_else(|| format!("on host {}", host.name));
            batch.event(
                &format!("vm.{}", next.state),
                format!("vm/{}", vm.name),
                &vm.project,
                detail,
            );
            batch.put_vm(next);
            out.changed += 1;
        }
    }
    for id in out.bump {
        if let Err(e) = bump_generation(inv, id, batch) {
            tracing::error!(error = %crate::error::Chain(&e), "bumping a host's generation");
        }
    }
}

/// VMs on a host that just went down become `unknown`.
fn mark_unknown(inv: &Inventory, host: &HostRecord, batch: &mut Batch) {
    let mut changed = 0;
    for vm in inv.vms_on(host.id).filter(|v| v.state != VmState::Deleting) {
        let next = Vm {
            state: VmState::Unknown,
            message: Some(format!("host {} is down", host.name)),
            cpu_percent: None,
            ..vm.clone()
        };
        batch.put_vm(next);
        changed += 1;
    }
    if changed > 0 {
        batch.event(
            "vm.unknown",
            format!("host/{}", host.name),
            &host.project,
            format!(
                "{} VM(s) on host {} are unknown while it is down",
                changed, host.name
            ),
        );
    }
}

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
fn step(
    inv: &Inventory,
    vm: &Vm,
    host: Uuid,
    status: Option<&VmStatus>,
    out: &mut Reported,
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
            batch.migration_event(
                "vm.migration.transferring",
                vm,
                &m.reason,
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
        Step::Aborted { outcome, message } => abort(vm, m, outcome, message, &mut out.bump, batch),
    };
    batch.put_vm(next);
    out.changed += 1;
}

/// After the switch-over the target keeps reporting when its guest resumed;
/// with the source's pause time that gives the downtime the guest saw.
fn fill_downtime(
    vm: &Vm,
    host: Uuid,
    status: Option<&VmStatus>,
    out: &mut Reported,
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
    batch.migration_event(
        "vm.migration.downtime",
        vm,
        &last.reason,
        format!(
            "guest paused {:.1} ms at the switch-over from {} to {}",
            result.downtime_ms.unwrap_or_default(),
            result.source,
            result.target
        ),
    );
    batch.put_vm(next);
    out.changed += 1;
}

fn complete(inv: &Inventory, vm: &Vm, m: &Migration, out: &mut Reported, batch: &mut Batch) -> Vm {
    let zone = inv
        .host_by_id(m.target_id)
        .map_or_else(|| vm.zone.clone(), |h| h.rec.zone.clone());
    // A drain remembers where the VM came from (the first host, over
    // several moves; also when the host was undrained meanwhile); arriving
    // back there closes the account.
    let drained = matches!(m.reason, MigrationReason::Drain { .. });
    let evacuated_from = match &vm.evacuated_from {
        Some(home) if *home == m.target => None,
        Some(home) => Some(home.clone()),
        None if drained => Some(m.source.clone()),
        None => None,
    };
    let last = result(m, MigrationOutcome::Completed, None);
    batch.migration_event(
        "vm.migrated",
        vm,
        &m.reason,
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

impl App {
    /// Record a heartbeat: liveness and load in memory, VM states through
    /// to the store when they change.
    pub async fn host_heartbeat(&self, host: &str, hb: Heartbeat) -> Result<HeartbeatResponse> {
        let mut inv = self.inv.write().await;
        let entry = lookup(&inv.hosts, "host", host)?.clone();
        let mut batch = Batch::default();
        if entry.live.down {
            batch.event(
                "host.up",
                format!("host/{host}"),
                &entry.rec.project,
                "heartbeats resumed".into(),
            );
        }
        let applied = hb.applied_generation;
        reconcile_reported(&inv, &entry.rec, applied, &hb.vms, &mut batch);
        self.commit(&mut inv, batch).await?;
        for s in &hb.vms {
            inv.set_cpu_percent(s.id, s.cpu_percent);
        }
        record_progress(&mut inv, host, &hb.vms);
        let e = inv.hosts.get_mut(host).expect("host looked up above");
        let hot = f64::from(hb.load.cpu_percent) > self.rebalance.threshold;
        e.live = HostLive {
            last_seen: Instant::now(),
            last_heartbeat: Some(now_ms()),
            load: Some(hb.load),
            applied_generation: applied,
            down: false,
            overloaded_since: hot.then(|| entry.live.overloaded_since.unwrap_or_else(Instant::now)),
        };
        let generation = e.rec.generation;
        if entry.live.down {
            // Back from down: schedulable again.
            inv.sync_host(host);
        } else {
            inv.cluster.set_load(host, f64::from(hb.load.cpu_percent));
        }
        Ok(HeartbeatResponse { generation })
    }

    /// Mark hosts whose heartbeats stopped as down, and their VMs unknown.
    pub async fn host_check_liveness(&self) -> Result<()> {
        let stale: Vec<String> = {
            let inv = self.inv.read().await;
            // A standby host is switched off: its silence is expected.
            inv.hosts
                .values()
                .filter(|h| h.rec.mode != HostMode::Standby)
                .filter(|h| !h.live.down && h.live.last_seen.elapsed() > self.down_after)
                .map(|h| h.rec.name.clone())
                .collect()
        };
        if stale.is_empty() {
            return Ok(());
        }
        let mut inv = self.inv.write().await;
        for name in stale {
            let Some(entry) = inv.hosts.get(&name).cloned() else {
                continue;
            };
            if entry.live.last_seen.elapsed() <= self.down_after
                || entry.rec.mode == HostMode::Standby
            {
                continue;
            }
            let mut batch = Batch::default();
            batch.event(
                "host.down",
                format!("host/{name}"),
                &entry.rec.project,
                format!(
                    "no heartbeat for {:.1} s",
                    entry.live.last_seen.elapsed().as_secs_f32()
                ),
            );
            mark_unknown(&inv, &entry.rec, &mut batch);
            self.commit(&mut inv, batch).await?;
            inv.hosts.get_mut(&name).expect("present").live.down = true;
            inv.sync_host(&name);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::migrations::DEFAULT_DOWNTIME_MS;
    use super::*;
    use kumo_api::{MigrationStatus, MigrationStorage};

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
            reason: MigrationReason::Operator,
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
