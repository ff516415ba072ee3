//! Automatic rebalancing: a background pass that moves VMs live off hosts
//! whose CPU load stayed high, as [`kumo_sched::Cluster::plan_rebalance`]
//! plans it (every hard constraint the VM was placed with holds; a move
//! must lower the imbalance score by enough per GiB copied).
//!
//! Conservative by default ([`RebalanceSettings::default`]):
//!
//! - a host is overloaded only once its load (from heartbeats) has stayed
//!   above the threshold for `sustain`, and `sustain` has passed since a
//!   migration last took a VM off it (its load reports have caught up);
//! - at most `max_moves` migrations start per period, and none while
//!   `max_in_flight` rebalancing migrations are under way;
//! - a VM that moved (or tried to) stays put for `cooldown`;
//! - loads are planned as if the migrations under way had finished, so a
//!   pass never moves load that is already leaving.
//!
//! Each pass that starts moves records a `rebalance.planned` event with the
//! imbalance score before and after; the last pass is served at
//! `GET /v1/rebalance`.

use super::migrations::move_request;
use super::{now_ms, App, Batch, Inventory};
use crate::error::Result;
use kumo_api::{
    HostState, MigrateVm, MigrationOutcome, MigrationReason, PowerState, RebalanceMove,
    RebalancePass, RebalanceStatus, VmState, DEFAULT_PROJECT,
};
use kumo_sched::{imbalance, Candidate, Cluster, RebalanceConfig};
use std::collections::HashMap;

impl Inventory {
    /// The scheduler's view with the load of every migration under way
    /// already moved from its source to its target.
    fn projected_cluster(&self) -> Cluster {
        let mut cluster = self.cluster.clone();
        for vm in self.vms_migrating() {
            let (Some(m), Some(cpu)) = (&vm.migration, vm.cpu_percent) else {
                continue;
            };
            for (host, sign) in [(&m.source, -1.0), (&m.target, 1.0)] {
                if let Some(h) = cluster.host(host) {
                    let cores = f64::from(h.capacity.vcpus.max(1));
                    let load = (h.load + sign * f64::from(cpu) / cores).clamp(0.0, 100.0);
                    cluster.set_load(host, load);
                }
            }
        }
        cluster
    }
}

impl App {
    /// What rebalancing does and did last (`GET /v1/rebalance`).
    pub fn rebalance_status(&self) -> RebalanceStatus {
        self.rebalance_report.0.lock().expect("lock").clone()
    }

    /// One rebalancing pass (see the module docs).
    pub async fn rebalance_pass(&self) -> Result<()> {
        let s = &self.rebalance;
        let mut inv = self.inv.write().await;
        let now = now_ms();
        let sustain_ms = s.sustain.as_millis() as u64;
        let cooldown_ms = s.cooldown.as_millis() as u64;
        let mut in_flight = 0;
        // When a completed migration last took a VM off each host.
        let mut departed: HashMap<&str, u64> = HashMap::new();
        for vm in inv.vms().values() {
            if vm
                .migration
                .as_ref()
                .is_some_and(|m| matches!(m.reason, MigrationReason::Rebalance { .. }))
            {
                in_flight += 1;
            }
            if let Some(r) = &vm.last_migration {
                if r.outcome == MigrationOutcome::Completed {
                    let t = departed.entry(r.source.as_str()).or_default();
                    *t = (*t).max(r.finished_at);
                }
            }
        }
        let overloaded: Vec<String> = inv
            .hosts
            .values()
            .filter(|h| h.state() == HostState::Ready)
            .filter(|h| {
                h.live
                    .overloaded_since
                    .is_some_and(|t| t.elapsed() >= s.sustain)
            })
            .filter(|h| {
                departed
                    .get(h.rec.name.as_str())
                    .is_none_or(|t| now.saturating_sub(*t) >= sustain_ms)
            })
            .map(|h| h.rec.name.clone())
            .collect();
        let mut candidates = Vec::new();
        for name in &overloaded {
            let host = &inv.hosts[name];
            for vm in inv.vms_on(host.rec.id) {
                let cooling = vm
                    .last_migration
                    .as_ref()
                    .is_some_and(|r| now.saturating_sub(r.finished_at) < cooldown_ms);
                if vm.state != VmState::Running
                    || vm.power != PowerState::Running
                    || vm.migration.is_some()
                    || cooling
                {
                    continue;
                }
                match move_request(&inv, vm) {
                    Ok(request) => candidates.push(Candidate {
                        vm: vm.name.clone(),
                        host: name.clone(),
                        request,
                        cpu_percent: vm.cpu_percent.map_or(0.0, f64::from),
                    }),
                    Err(e) => {
                        tracing::warn!(vm = %vm.name, error = %crate::error::Chain(&e), "rebalance: VM left out")
                    }
                }
            }
        }
        let budget = s.max_moves.min(s.max_in_flight.saturating_sub(in_flight));
        let mut pass = RebalancePass {
            at: now,
            candidates: candidates.len(),
            in_flight,
            ..Default::default()
        };
        let note = if overloaded.is_empty() {
            Some(format!(
                "no host above {}% for {:.0} s",
                s.threshold,
                s.sustain.as_secs_f64()
            ))
        } else if budget == 0 {
            Some(format!(
                "{in_flight} rebalancing migration(s) under way, the most allowed"
            ))
        } else if candidates.is_empty() {
            Some("no VM on the overloaded hosts may move now (migrating, cooling down or not running)".into())
        } else {
            None
        };
        pass.overloaded = overloaded;
        if let Some(note) = note {
            // Cheap without a plan: no clone of the cluster.
            pass.imbalance_before = imbalance(&inv.cluster);
            pass.imbalance_after = pass.imbalance_before;
            pass.note = Some(note);
            self.rebalance_report.0.lock().expect("lock").last_pass = Some(pass);
            return Ok(());
        }
        let cluster = inv.projected_cluster();
        pass.imbalance_before = imbalance(&cluster);
        pass.imbalance_after = pass.imbalance_before;
        let cfg = RebalanceConfig {
            threshold: s.threshold,
            max_moves: budget,
            min_gain_per_gib: s.min_gain_per_gib,
            ..Default::default()
        };
        let moves = cluster.plan_rebalance(&candidates, &cfg);
        drop(cluster);
        if moves.is_empty() {
            pass.note = Some(
                "no move keeps every constraint and lowers the imbalance enough for its cost"
                    .into(),
            );
        }
        let mut started = 0;
        for m in moves {
            let reason = MigrationReason::Rebalance {
                detail: m.reason.clone(),
            };
            let req = MigrateVm {
                to: Some(m.to.clone()),
                downtime_limit_ms: None,
            };
            let error = match self
                .start_migration(&mut inv, &m.vm, req, reason.clone())
                .await
            {
                Ok(_) => {
                    started += 1;
                    pass.imbalance_after = m.imbalance_after;
                    None
                }
                Err(e) => {
                    tracing::info!(vm = %m.vm, error = %crate::error::Chain(&e), "rebalance: move not started");
                    Some(e.to_string())
                }
            };
            pass.moves.push(RebalanceMove {
                vm: m.vm,
                from: m.from,
                to: m.to,
                reason: reason.to_string(),
                error,
            });
        }
        if started > 0 {
            let mut batch = Batch::default();
            batch.event(
                "rebalance.planned",
                "cluster/rebalance".into(),
                DEFAULT_PROJECT,
                format!(
                    "{started} migration(s) started off {} overloaded host(s) ({}); imbalance {:.3} -> {:.3}",
                    pass.overloaded.len(),
                    pass.moves
                        .iter()
                        .filter(|m| m.error.is_none())
                        .map(|m| format!("{} {} -> {}", m.vm, m.from, m.to))
                        .collect::<Vec<_>>()
                        .join(", "),
                    pass.imbalance_before,
                    pass.imbalance_after
                ),
            );
            self.commit(&mut inv, batch).await?;
        }
        let mut report = self.rebalance_report.0.lock().expect("lock");
        report.started_total += started;
        report.last_pass = Some(pass);
        Ok(())
    }
}
