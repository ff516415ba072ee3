//! What happens when an operation meets another one already under way on
//! the same host or VM: the one table of those decisions. Requests that a
//! state simply does not accept are refused by [`super::transitions`]
//! (the rows marked *state table* below say which); the others are carried
//! out where noted.
//!
//! | under way                         | asked / started                | decision |
//! |-----------------------------------|--------------------------------|----------|
//! | migration into a host             | drain of that host             | the drain plan lists the VM (`cancels_arrival`); the drain cancels the migration: the VM stays on its source, and a drain there moves it elsewhere (`drains.rs`, `cancel_arrivals`) |
//! | drain                             | enable                         | refused, naming the drain: undrain ends it (*state table*) |
//! | drain                             | disable                        | refused: a draining host takes no VMs already (*state table*) |
//! | drain                             | delete host                    | refused until drained or undrained (*state table*) |
//! | drain                             | undrain                        | the drain ends; migrations under way finish where they were going, and `return` brings those VMs back |
//! | drain                             | operator migration to the host | refused with `no_valid_host`: a draining host is not schedulable |
//! | power saving emptying a host      | operator drain                 | the drain takes over: the host goes to maintenance, not standby, and the mover moves what is left (`drain_takes_over`) |
//! | standby (power saving)            | enable, disable, drain, undrain| refused: power saving switches it on when needed (*state table*) |
//! | host switching on (power saving)  | a placement only it would take | refused, naming that host and when to retry; no other host is woken (`power.rs`) |
//! | migration (any reason)            | stop, start, reboot, delete, migrate | refused: cancel first (*state table*) |
//! | migration (a drain's)            | cancel                         | cancelled; the VM stays; the drain's mover tries it again after 30 s (`RETRY_AFTER_MS`), not at once |
//! | host down                         | stop, start, reboot, migrate   | refused: the VM is `unknown` until the host reports (*state table*) |
//! | VM being deleted                  | drain of its host              | left out of the plan: it is going anyway |
//!
//! `tests::every_row_holds` checks each row through the App.

use super::records::{HostMode, HostRecord};

/// An operator drain (`after`: what the host becomes once empty) of a
/// host already draining: the record with the drain taken over, or `None`
/// when it is the same drain. A drain power saving began (towards
/// standby) becomes the operator's (towards maintenance), so the host is
/// not switched off under the operator's maintenance.
pub(super) fn drain_takes_over(rec: &HostRecord, after: HostMode) -> Option<HostRecord> {
    (rec.mode == HostMode::Draining && rec.after_drain != after).then(|| HostRecord {
        after_drain: after,
        welcome_back: false,
        ..rec.clone()
    })
}

/// The rows of the table in the module docs, each checked by a test.
#[cfg(test)]
const ROWS: [&str; 13] = [
    "arrival × drain",
    "drain × enable",
    "drain × disable",
    "drain × delete host",
    "drain × undrain",
    "drain × migration to the host",
    "power-saving emptying × drain",
    "standby × operator requests",
    "switching on × placement",
    "migration × VM requests",
    "migration × cancel",
    "host down × VM requests",
    "deleting × drain",
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::testing::{HostSpec, TestApp};
    use crate::Error;
    use kumo_api::{ErrorCode, HostState, MigrateVm, MigrationOutcome, VmState};
    use std::time::Duration;

    fn code<T: std::fmt::Debug>(r: crate::error::Result<T>) -> ErrorCode {
        match r {
            Err(Error::Api(e)) => e.code,
            other => panic!("expected an API error, got {other:?}"),
        }
    }

    fn to(host: &str) -> MigrateVm {
        MigrateVm {
            to: Some(host.into()),
            downtime_limit_ms: None,
        }
    }

    /// h1 with VM `web` (running), h2 and h3 empty, all ready.
    async fn three_hosts() -> TestApp {
        let t = TestApp::new(Duration::from_secs(600)).await;
        t.ready_host(HostSpec::new("h1")).await;
        t.app.vm_create(TestApp::vm("web", 512)).await.unwrap();
        t.force_vm("web", |vm| vm.state = VmState::Running).await;
        t.ready_host(HostSpec::new("h2")).await;
        t.ready_host(HostSpec::new("h3")).await;
        t
    }

    async fn check_row(row: &str) {
        let t = three_hosts().await;
        let app = &t.app;
        match row {
            "arrival × drain" => {
                app.vm_migrate("web", to("h2")).await.unwrap();
                let plan = app.host_drain("h2", true).await.unwrap();
                let arrival = plan.moves.iter().find(|m| m.vm == "web").unwrap();
                assert!(arrival.cancels_arrival, "{plan:?}");
                assert_eq!(arrival.to.as_deref(), Some("h1"));
                app.host_drain("h2", false).await.unwrap();
                let vm = app.vm_get("web").await.unwrap();
                assert!(vm.migration.is_none(), "{vm:?}");
                assert_eq!(vm.host, "h1");
                let last = vm.last_migration.unwrap();
                assert_eq!(last.outcome, MigrationOutcome::Cancelled);
            }
            "drain × enable" | "drain × disable" | "drain × delete host" => {
                app.host_drain("h1", false).await.unwrap();
                let got = match row {
                    "drain × enable" => app.host_set_enabled("h1", true).await.map(drop),
                    "drain × disable" => app.host_set_enabled("h1", false).await.map(drop),
                    _ => app.host_delete("h1").await,
                };
                assert_eq!(code(got), ErrorCode::Conflict);
                let h1 = app.host_get("h1").await.unwrap();
                assert_eq!(h1.state, HostState::Draining);
            }
            "drain × undrain" => {
                app.host_drain("h1", false).await.unwrap();
                app.move_vms().await.unwrap();
                let moving = app.vm_get("web").await.unwrap().migration.unwrap();
                app.host_undrain("h1", true).await.unwrap();
                assert_eq!(app.host_get("h1").await.unwrap().state, HostState::Ready);
                let still = app.vm_get("web").await.unwrap().migration.unwrap();
                assert_eq!(still.id, moving.id, "the migration goes on");
            }
            "drain × migration to the host" => {
                app.host_drain("h2", false).await.unwrap();
                assert_eq!(
                    code(app.vm_migrate("web", to("h2")).await),
                    ErrorCode::NoValidHost
                );
            }
            "power-saving emptying × drain" => {
                let mut inv = app.inv.write().await;
                let rec = HostRecord {
                    mode: HostMode::Draining,
                    after_drain: HostMode::Standby,
                    ..inv.hosts["h1"].rec.clone()
                };
                inv.install_host(rec);
                drop(inv);
                app.host_drain("h1", false).await.unwrap();
                let rec = app.inv.read().await.hosts["h1"].rec.clone();
                assert_eq!(
                    (rec.mode, rec.after_drain),
                    (HostMode::Draining, HostMode::Maintenance)
                );
                // The mover now moves its VMs (it leaves power saving's own).
                app.move_vms().await.unwrap();
                assert!(app.vm_get("web").await.unwrap().migration.is_some());
            }
            "standby × operator requests" => {
                let mut inv = app.inv.write().await;
                let rec = HostRecord {
                    mode: HostMode::Standby,
                    ..inv.hosts["h3"].rec.clone()
                };
                inv.install_host(rec);
                drop(inv);
                for got in [
                    app.host_set_enabled("h3", true).await.map(drop),
                    app.host_set_enabled("h3", false).await.map(drop),
                    app.host_drain("h3", false).await.map(drop),
                    app.host_undrain("h3", false).await.map(drop),
                ] {
                    assert_eq!(code(got), ErrorCode::Conflict);
                }
            }
            "switching on × placement" => {
                // Checked with three standby hosts in power.rs.
                crate::app::power::wake_tests::check().await;
            }
            "migration × VM requests" => {
                app.vm_migrate("web", to("h2")).await.unwrap();
                for got in [
                    app.vm_stop("web").await.map(drop),
                    app.vm_start("web").await.map(drop),
                    app.vm_reboot("web").await.map(drop),
                    app.vm_delete("web").await.map(drop),
                    app.vm_migrate("web", to("h3")).await.map(drop),
                ] {
                    assert_eq!(code(got), ErrorCode::Conflict);
                }
            }
            "migration × cancel" => {
                app.host_drain("h1", false).await.unwrap();
                app.move_vms().await.unwrap();
                app.vm_migrate_cancel("web").await.unwrap();
                let vm = app.vm_get("web").await.unwrap();
                assert!(vm.migration.is_none());
                assert_eq!(vm.host, "h1");
                // Not straight away again.
                app.move_vms().await.unwrap();
                assert!(app.vm_get("web").await.unwrap().migration.is_none());
            }
            "host down × VM requests" => {
                app.inv.write().await.hosts.get_mut("h1").unwrap().live.down = true;
                app.inv.write().await.sync_host("h1");
                t.force_vm("web", |vm| vm.state = VmState::Unknown).await;
                for got in [
                    app.vm_stop("web").await.map(drop),
                    app.vm_start("web").await.map(drop),
                    app.vm_reboot("web").await.map(drop),
                    app.vm_migrate("web", to("h2")).await.map(drop),
                ] {
                    assert_eq!(code(got), ErrorCode::Conflict);
                }
            }
            "deleting × drain" => {
                app.vm_delete("web").await.unwrap();
                let plan = app.host_drain("h1", true).await.unwrap();
                assert!(plan.moves.is_empty(), "{plan:?}");
            }
            other => panic!("row {other:?} has no check"),
        }
    }

    /// Each row of the table, through the App.
    #[tokio::test]
    async fn every_row_holds() {
        for row in ROWS {
            check_row(row).await;
        }
    }
}
