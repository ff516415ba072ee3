//! Draining hosts and zones for maintenance or a planned outage, and
//! bringing the VMs back.
//!
//! A drain marks hosts `draining` (no new VMs) and the mover — a background
//! pass — migrates their VMs away live, a few at a time, each to the host the
//! scheduler picks under every constraint the VM was placed with. A drained
//! host becomes `maintenance` (or `standby`, when power saving emptied it).
//! Each VM remembers the host a drain took it from, so undrain with
//! `return` moves it back there. A dry run computes the whole plan on a copy
//! of the scheduler's state and moves nothing.

use super::migrations::{movable, move_request};
use super::records::{HostMode, HostRecord};
use super::{lookup, migration_key, now_ms, App, Batch, Inventory};
use crate::error::Result;
use kumo_api::{
    ApiError, DrainPlan, ErrorCode, Host, MigrateVm, MigrationOutcome, MigrationReason,
    PlannedMove, Vm, VmState,
};

/// Migrations the mover keeps under way at once, over the whole cloud.
pub const PARALLEL_MIGRATIONS: usize = 4;
/// A VM whose move failed is tried again after this long.
const RETRY_AFTER_MS: u64 = 30_000;

impl Inventory {
    /// Where the VMs of `hosts` would go if those hosts took no VMs.
    fn drain_plan(&self, scope: String, hosts: &[String]) -> DrainPlan {
        let mut cluster = self.cluster.clone();
        for h in hosts {
            if let Some(entry) = self.hosts.get(h) {
                cluster.upsert_host(kumo_sched::HostInfo {
                    schedulable: false,
                    ..entry.sched_info()
                });
            }
        }
        let mut vms: Vec<&Vm> = hosts
            .iter()
            .filter_map(|h| self.hosts.get(h))
            .flat_map(|h| self.vms_on(h.rec.id))
            .filter(|v| v.state != VmState::Deleting)
            .collect();
        // The biggest first, as the scheduler packs best that way.
        vms.sort_by_key(|v| std::cmp::Reverse(v.size.memory_mib));
        let mut moves = Vec::new();
        let mut memory_mib = 0;
        for vm in vms {
            memory_mib += vm.size.memory_mib;
            let planned = |to: Option<String>, refusal: Option<String>| PlannedMove {
                vm: vm.name.clone(),
                from: vm.host.clone(),
                to_zone: to
                    .as_ref()
                    .and_then(|t| self.hosts.get(t))
                    .map(|h| h.rec.zone.clone()),
                to,
                refusal,
            };
            if let Some(m) = &vm.migration {
                moves.push(planned(Some(m.target.clone()), None));
                continue;
            }
            if !movable(vm) {
                moves.push(planned(
                    None,
                    Some(format!(
                        "VM is {}: only running and stopped VMs move; repair or delete it",
                        vm.state
                    )),
                ));
                continue;
            }
            let placed = move_request(self, vm).map(|req| {
                cluster
                    .place_moving(&vm.name, &migration_key(&vm.name), &req)
                    .map_err(|r| r.to_string())
            });
            moves.push(match placed {
                Ok(Ok(p)) => planned(Some(p.host), None),
                Ok(Err(refusal)) => planned(None, Some(refusal)),
                Err(e) => planned(None, Some(e.to_string())),
            });
        }
        DrainPlan {
            scope,
            feasible: moves.iter().all(|m| m.to.is_some()),
            moves,
            memory_mib,
        }
    }

    fn zone_hosts(&self, zone: &str) -> Result<Vec<String>> {
        // The zone is the resource addressed (`/v1/zones/{name}/...`), so
        // an unknown one is not found, not a bad field.
        lookup(&self.zones, "zone", zone)?;
        Ok(self
            .hosts
            .values()
            .filter(|h| h.rec.zone == zone)
            .map(|h| h.rec.name.clone())
            .collect())
    }
}

fn drain_conflict(name: &str, state: kumo_api::HostState) -> crate::Error {
    ApiError::new(
        ErrorCode::Conflict,
        "name",
        format!("host {name} is {state}; only a ready host can be drained"),
    )
    .into()
}

impl App {
    /// Drain hosts: mark them draining (the mover then empties them), or
    /// with `dry_run` only say where their VMs would go.
    async fn drain(
        &self,
        scope: String,
        hosts: Vec<String>,
        dry_run: bool,
        after: HostMode,
    ) -> Result<DrainPlan> {
        let mut inv = self.inv.write().await;
        for h in &hosts {
            let entry = lookup(&inv.hosts, "host", h)?;
            let state = entry.state();
            let draining = entry.rec.mode == HostMode::Draining;
            if state != kumo_api::HostState::Ready && !draining && !dry_run {
                return Err(drain_conflict(h, state));
            }
        }
        let plan = inv.drain_plan(scope.clone(), &hosts);
        if dry_run {
            return Ok(plan);
        }
        let mut batch = Batch::default();
        for h in &hosts {
            let rec = &inv.hosts[h].rec;
            if rec.mode == HostMode::Draining {
                continue;
            }
            let rec = HostRecord {
                mode: HostMode::Draining,
                after_drain: after,
                welcome_back: false,
                ..rec.clone()
            };
            batch.put_host(rec.clone());
            let (_, count) = inv.allocated(&rec.name);
            batch.event(
                "host.draining",
                format!("host/{h}"),
                &rec.project,
                format!("{scope} drains: {count} VM(s) to move away"),
            );
        }
        self.commit(&mut inv, batch).await?;
        Ok(plan)
    }

    pub async fn host_drain(&self, name: &str, dry_run: bool) -> Result<DrainPlan> {
        self.drain(
            format!("host/{name}"),
            vec![name.to_string()],
            dry_run,
            HostMode::Maintenance,
        )
        .await
    }

    pub async fn zone_drain(&self, zone: &str, dry_run: bool) -> Result<DrainPlan> {
        // Hosts already in maintenance or standby are empty and out of
        // placement: nothing to drain (so a zone drain can be repeated, and
        // one host of the zone may already be down for maintenance).
        let hosts: Vec<String> = {
            let inv = self.inv.read().await;
            inv.zone_hosts(zone)?
                .into_iter()
                .filter(|h| {
                    !matches!(
                        inv.hosts[h].rec.mode,
                        HostMode::Maintenance | HostMode::Standby
                    )
                })
                .collect()
        };
        self.drain(
            format!("zone/{zone}"),
            hosts,
            dry_run,
            HostMode::Maintenance,
        )
        .await
    }

    /// What a zone's drain still has to move, and where.
    pub async fn zone_drain_status(&self, zone: &str) -> Result<DrainPlan> {
        let inv = self.inv.read().await;
        let hosts = inv.zone_hosts(zone)?;
        Ok(inv.drain_plan(format!("zone/{zone}"), &hosts))
    }

    /// Take hosts back into placement; with `return_vms`, the VMs a drain
    /// moved away come back to them.
    async fn undrain(&self, hosts: Vec<String>, return_vms: bool) -> Result<Vec<Host>> {
        let mut inv = self.inv.write().await;
        let mut batch = Batch::default();
        for h in &hosts {
            let rec = lookup(&inv.hosts, "host", h)?.rec.clone();
            if !matches!(rec.mode, HostMode::Draining | HostMode::Maintenance) {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    "name",
                    format!("host {h} is not draining or in maintenance"),
                )
                .into());
            }
            let rec = HostRecord {
                mode: HostMode::Active,
                welcome_back: return_vms,
                ..rec
            };
            batch.put_host(rec.clone());
            let back = inv
                .vms()
                .values()
                .filter(|v| v.evacuated_from.as_deref() == Some(h.as_str()))
                .count();
            batch.event(
                "host.undrained",
                format!("host/{h}"),
                &rec.project,
                if return_vms {
                    format!("host takes VMs again; {back} VM(s) return to it")
                } else {
                    "host takes VMs again".into()
                },
            );
        }
        self.commit(&mut inv, batch).await?;
        Ok(hosts.iter().map(|h| inv.host_view(&inv.hosts[h])).collect())
    }

    pub async fn host_undrain(&self, name: &str, return_vms: bool) -> Result<Host> {
        let mut hosts = self.undrain(vec![name.to_string()], return_vms).await?;
        Ok(hosts.remove(0))
    }

    pub async fn zone_undrain(&self, zone: &str, return_vms: bool) -> Result<Vec<Host>> {
        let hosts: Vec<String> = {
            let inv = self.inv.read().await;
            inv.zone_hosts(zone)?
                .into_iter()
                .filter(|h| {
                    matches!(
                        inv.hosts[h].rec.mode,
                        HostMode::Draining | HostMode::Maintenance
                    )
                })
                .collect()
        };
        self.undrain(hosts, return_vms).await
    }

    /// One pass of the mover: start migrations off draining hosts and back
    /// to undrained ones (at most [`PARALLEL_MIGRATIONS`] under way), and
    /// finish drains whose hosts are empty.
    pub async fn move_vms(&self) -> Result<()> {
        let mut inv = self.inv.write().await;
        let in_flight = inv.vms_migrating().count();
        let mut budget = PARALLEL_MIGRATIONS.saturating_sub(in_flight);
        let now = now_ms();
        let recently_failed = |v: &Vm| {
            v.last_migration.as_ref().is_some_and(|r| {
                r.outcome != MigrationOutcome::Completed
                    && now.saturating_sub(r.finished_at) < RETRY_AFTER_MS
            })
        };
        let mut wanted: Vec<(String, Option<String>, MigrationReason)> = Vec::new();
        let mut finished = Vec::new();
        let mut welcomed = Vec::new();
        for h in inv.hosts.values() {
            match h.rec.mode {
                HostMode::Draining => {
                    let (_, count) = inv.allocated(&h.rec.name);
                    if count == 0 {
                        finished.push(h.rec.name.clone());
                    }
                    // Power saving moves the VMs of the hosts it empties
                    // itself, to targets that keep its headroom.
                    if h.rec.after_drain == HostMode::Standby {
                        continue;
                    }
                    for vm in inv.vms_on(h.rec.id) {
                        if vm.migration.is_none() && movable(vm) && !recently_failed(vm) {
                            let reason = MigrationReason::Drain {
                                host: h.rec.name.clone(),
                            };
                            wanted.push((vm.name.clone(), None, reason));
                        }
                    }
                }
                HostMode::Active if h.rec.welcome_back => {
                    let name = h.rec.name.as_str();
                    // VMs its drain still moves away will have to come back.
                    let mut waiting = inv.vms_on(h.rec.id).any(|v| {
                        v.migration
                            .as_ref()
                            .is_some_and(|m| matches!(m.reason, MigrationReason::Drain { .. }))
                    });
                    for vm in inv.vms().values() {
                        if vm.evacuated_from.as_deref() != Some(name) {
                            continue;
                        }
                        waiting = true;
                        if vm.migration.is_none() && movable(vm) && !recently_failed(vm) {
                            let reason = MigrationReason::ReturnAfterDrain {
                                host: h.rec.name.clone(),
                            };
                            wanted.push((vm.name.clone(), Some(h.rec.name.clone()), reason));
                        }
                    }
                    if !waiting {
                        welcomed.push(h.rec.name.clone());
                    }
                }
                _ => {}
            }
        }
        for (vm, to, reason) in wanted {
            if budget == 0 {
                break;
            }
            let req = MigrateVm {
                to,
                downtime_limit_ms: None,
            };
            match self.start_migration(&mut inv, &vm, req, reason).await {
                Ok(_) => budget -= 1,
                Err(e) => {
                    tracing::info!(vm = %vm, error = %crate::error::Chain(&e), "cannot move VM yet")
                }
            }
        }
        for name in finished {
            self.finish_drain(&mut inv, &name).await?;
        }
        for name in welcomed {
            let rec = HostRecord {
                welcome_back: false,
                ..inv.hosts[&name].rec.clone()
            };
            let mut batch = Batch::default();
            batch.put_host(rec.clone());
            self.commit(&mut inv, batch).await?;
        }
        Ok(())
    }

    /// An emptied draining host goes to maintenance (or standby).
    async fn finish_drain(&self, inv: &mut Inventory, name: &str) -> Result<()> {
        let rec = HostRecord {
            mode: inv.hosts[name].rec.after_drain,
            ..inv.hosts[name].rec.clone()
        };
        let mut batch = Batch::default();
        batch.put_host(rec.clone());
        batch.event(
            "host.drained",
            format!("host/{name}"),
            &rec.project,
            format!(
                "no VMs left; host is {}",
                match rec.mode {
                    HostMode::Standby => "going to standby",
                    _ => "in maintenance",
                }
            ),
        );
        self.commit(inv, batch).await?;
        Ok(())
    }
}
