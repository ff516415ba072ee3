//! Which user requests each state of a VM or host accepts: the one place
//! requests are checked against the state machines drawn in
//! [`super::vms`] and [`super::hosts`] (as cloud-hypervisor's
//! `VmState::valid_transition` does for its VMs). A request the table
//! refuses gets a 409 `conflict` naming the state, why the resource is in
//! it, and what the state does accept; nothing changes.
//!
//! VMs (✓ accepted, · refused; a stopped VM moving cold counts as
//! `migrating`):
//!
//! | state     | start | stop | reboot | delete | migrate | cancel migration | console |
//! |-----------|:-----:|:----:|:------:|:------:|:-------:|:----------------:|:-------:|
//! | starting  |   ·   |  ✓   |   ·    |   ✓    |    ·    |        ·         |    ✓    |
//! | running   |   ·   |  ✓   |   ✓    |   ✓    |    ✓    |        ·         |    ✓    |
//! | stopping  |   ✓   |  ·   |   ·    |   ✓    |    ·    |        ·         |    ✓    |
//! | stopped   |   ✓   |  ·   |   ·    |   ✓    |    ✓    |        ·         |    ✓    |
//! | rebooting |   ·   |  ✓   |   ·    |   ✓    |    ·    |        ·         |    ✓    |
//! | failed    |   ✓   |  ✓   |   ·    |   ✓    |    ·    |        ·         |    ✓    |
//! | unknown   |   ·   |  ·   |   ·    |   ✓    |    ·    |        ·         |    ·    |
//! | deleting  |   ·   |  ·   |   ·    |   ·    |    ·    |        ·         |    ·    |
//! | migrating |   ·   |  ·   |   ·    |   ·    |    ·    |        ✓         |    ✓    |
//!
//! A VM is `unknown` while its host is down and stays so until the host
//! reports again: nobody can say whether it runs, so starting, stopping or
//! rebooting it would only change a wish the host cannot hear (and show a
//! state that is not true). It can be deleted (the host removes it when it
//! returns).
//!
//! Hosts (a down host that is draining or in maintenance is judged as
//! draining or in maintenance: hosts are often switched off for their
//! maintenance; see `HostEntry::row`):
//!
//! | state       | enable | disable | drain | undrain | delete | update |
//! |-------------|:------:|:-------:|:-----:|:-------:|:------:|:------:|
//! | joining     |   ✓    |    ✓    |   ·   |    ·    |   ✓    |   ✓    |
//! | ready       |   ✓    |    ✓    |   ✓   |    ·    |   ✓    |   ✓    |
//! | down        |   ✓    |    ✓    |   ·   |    ·    |   ✓    |   ✓    |
//! | disabled    |   ✓    |    ✓    |   ✓   |    ·    |   ✓    |   ✓    |
//! | draining    |   ·    |    ·    |   ✓   |    ✓    |   ·    |   ✓    |
//! | maintenance |   ·    |    ·    |   ·   |    ✓    |   ✓    |   ✓    |
//! | standby     |   ·    |    ·    |   ·   |    ·    |   ✓    |   ✓    |
//!
//! Enabling a draining host or one in maintenance is refused, naming the
//! drain: `undrain` is what ends a drain (as Proxmox ends a node's
//! maintenance mode only with its own command), so a stray `enable` never
//! cuts a maintenance short. Enable and disable of a host already in that
//! mode change nothing. Delete also needs the host to hold no VMs.

use kumo_api::{ApiError, ErrorCode, HostState, VmState};

/// A request a user makes of an existing VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmRequest {
    Start,
    Stop,
    Reboot,
    Delete,
    Migrate,
    CancelMigration,
    Console,
}

impl VmRequest {
    pub const ALL: [VmRequest; 7] = [
        VmRequest::Start,
        VmRequest::Stop,
        VmRequest::Reboot,
        VmRequest::Delete,
        VmRequest::Migrate,
        VmRequest::CancelMigration,
        VmRequest::Console,
    ];

    /// The request as a verb, for messages and event kinds (`vm.stop`).
    pub fn verb(self) -> &'static str {
        match self {
            VmRequest::Start => "start",
            VmRequest::Stop => "stop",
            VmRequest::Reboot => "reboot",
            VmRequest::Delete => "delete",
            VmRequest::Migrate => "migrate",
            VmRequest::CancelMigration => "cancel a migration",
            VmRequest::Console => "open the console",
        }
    }
}

/// A request an operator makes of a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostRequest {
    Enable,
    Disable,
    Drain,
    Undrain,
    Delete,
    /// Change its overcommit ratios (`PATCH`).
    Update,
}

impl HostRequest {
    pub const ALL: [HostRequest; 6] = [
        HostRequest::Enable,
        HostRequest::Disable,
        HostRequest::Drain,
        HostRequest::Undrain,
        HostRequest::Delete,
        HostRequest::Update,
    ];

    fn verb(self) -> &'static str {
        match self {
            HostRequest::Enable => "enable",
            HostRequest::Disable => "disable",
            HostRequest::Drain => "drain",
            HostRequest::Undrain => "undrain",
            HostRequest::Delete => "delete",
            HostRequest::Update => "update",
        }
    }
}

/// The VM table of the module docs: what each state accepts.
const VM_TABLE: [(VmState, &[VmRequest]); 9] = {
    use VmRequest::*;
    [
        (VmState::Starting, &[Stop, Delete, Console]),
        (VmState::Running, &[Stop, Reboot, Delete, Migrate, Console]),
        (VmState::Stopping, &[Start, Delete, Console]),
        (VmState::Stopped, &[Start, Delete, Migrate, Console]),
        (VmState::Rebooting, &[Stop, Delete, Console]),
        (VmState::Failed, &[Start, Stop, Delete, Console]),
        (VmState::Unknown, &[Delete]),
        (VmState::Deleting, &[]),
        (VmState::Migrating, &[CancelMigration, Console]),
    ]
};

/// The host table of the module docs.
const HOST_TABLE: [(HostState, &[HostRequest]); 7] = {
    use HostRequest::*;
    [
        (HostState::Joining, &[Enable, Disable, Delete, Update]),
        (HostState::Ready, &[Enable, Disable, Drain, Delete, Update]),
        (HostState::Down, &[Enable, Disable, Delete, Update]),
        (
            HostState::Disabled,
            &[Enable, Disable, Drain, Delete, Update],
        ),
        (HostState::Draining, &[Drain, Undrain, Update]),
        (HostState::Maintenance, &[Undrain, Delete, Update]),
        (HostState::Standby, &[Delete, Update]),
    ]
};

fn accepted<S: PartialEq, R: Copy>(table: &[(S, &'static [R])], state: &S) -> &'static [R] {
    table
        .iter()
        .find(|(s, _)| s == state)
        .map_or(&[], |(_, r)| *r)
}

/// Whether a VM in `state` accepts `request`.
pub fn vm_accepts(state: VmState, request: VmRequest) -> bool {
    accepted(&VM_TABLE, &state).contains(&request)
}

/// Whether a host in `state` accepts `request`.
pub fn host_accepts(state: HostState, request: HostRequest) -> bool {
    accepted(&HOST_TABLE, &state).contains(&request)
}

/// "start, stop or delete"; "nothing" for none.
fn listing(verbs: impl Iterator<Item = &'static str>) -> String {
    let verbs: Vec<&str> = verbs.collect();
    match verbs.as_slice() {
        [] => "nothing".into(),
        [one] => (*one).into(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// The state a VM's requests are judged by: its state, with a stopped VM
/// moving cold counted as migrating.
pub fn vm_row(vm: &kumo_api::Vm) -> VmState {
    if vm.migration.is_some() {
        VmState::Migrating
    } else {
        vm.state
    }
}

/// `Ok` if the VM's state accepts `request`, else a conflict saying the
/// state, why (the VM's message, e.g. its host is down) and what it
/// accepts.
pub fn check_vm(vm: &kumo_api::Vm, request: VmRequest) -> Result<(), ApiError> {
    let state = vm_row(vm);
    if vm_accepts(state, request) {
        return Ok(());
    }
    let why = match (&vm.message, &vm.migration) {
        (_, Some(m)) => format!(
            ": it is moving from {} to {}; wait for it or cancel it (`kumo vm migrate {} --cancel`)",
            m.source, m.target, vm.name
        ),
        (Some(msg), None) => format!(": {msg}"),
        (None, None) => String::new(),
    };
    let can = listing(accepted(&VM_TABLE, &state).iter().map(|r| r.verb()));
    Err(ApiError::new(
        ErrorCode::Conflict,
        "name",
        format!(
            "VM {} is {state}{why}; cannot {} it now (while {state} it accepts only: {can})",
            vm.name,
            request.verb()
        ),
    ))
}

/// `Ok` if a host in `state` accepts `request`, else a conflict naming
/// the state and what it accepts.
pub fn check_host(name: &str, state: HostState, request: HostRequest) -> Result<(), ApiError> {
    if host_accepts(state, request) {
        return Ok(());
    }
    let hint = match (state, request) {
        (HostState::Draining | HostState::Maintenance, HostRequest::Enable) => format!(
            "; a drain ends with undrain (`kumo host undrain {name}`), which also makes it take VMs"
        ),
        (HostState::Standby, _) => {
            "; power saving switches it on when its zone needs it (or turn power saving off)"
                .to_string()
        }
        (HostState::Joining, _) => "; wait for its agent's first heartbeat".to_string(),
        (HostState::Down, HostRequest::Drain) => {
            "; its VMs cannot move until it reports again".to_string()
        }
        _ => String::new(),
    };
    let can = listing(accepted(&HOST_TABLE, &state).iter().map(|r| r.verb()));
    Err(ApiError::new(
        ErrorCode::Conflict,
        "name",
        format!(
            "host {name} is {state}; cannot {} it now (while {state} it accepts only: {can}){hint}",
            request.verb()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::testing::{HostSpec, TestApp};
    use crate::Error;
    use kumo_api::{MigrateVm, PowerState, UpdateHost};
    use std::time::Duration;

    /// Conflict, or another outcome (accepted, or failing for a reason
    /// other than its state).
    fn refused<T>(r: &crate::error::Result<T>) -> bool {
        matches!(r, Err(Error::Api(e)) if e.code == ErrorCode::Conflict)
    }

    /// Put a new VM `name` on h1 into `state` the way it gets there;
    /// h2 then takes VMs (migrations).
    async fn vm_in(t: &TestApp, name: &str, state: VmState) {
        t.app.host_set_enabled("h2", false).await.unwrap();
        t.app
            .vm_create(TestApp::vm(name, 512))
            .await
            .expect("VM placed");
        t.app.host_set_enabled("h2", true).await.unwrap();
        let power = match state {
            VmState::Stopping | VmState::Stopped => PowerState::Stopped,
            _ => PowerState::Running,
        };
        let settled = if state == VmState::Migrating {
            VmState::Running
        } else {
            state
        };
        t.force_vm(name, |vm| {
            vm.power = power;
            vm.state = settled;
        })
        .await;
        if state == VmState::Migrating {
            let to = MigrateVm {
                to: Some("h2".into()),
                downtime_limit_ms: None,
            };
            t.app.vm_migrate(name, to).await.expect("migration starts");
        }
        assert_eq!(t.app.vm_get(name).await.unwrap().state, state);
    }

    async fn ask_vm(t: &TestApp, name: &str, r: VmRequest) -> crate::error::Result<()> {
        match r {
            VmRequest::Start => t.app.vm_start(name).await.map(drop),
            VmRequest::Stop => t.app.vm_stop(name).await.map(drop),
            VmRequest::Reboot => t.app.vm_reboot(name).await.map(drop),
            VmRequest::Delete => t.app.vm_delete(name).await.map(drop),
            VmRequest::Migrate => {
                let to = MigrateVm {
                    to: Some("h2".into()),
                    downtime_limit_ms: None,
                };
                t.app.vm_migrate(name, to).await.map(drop)
            }
            VmRequest::CancelMigration => t.app.vm_migrate_cancel(name).await.map(drop),
            // Accepted, it calls the host's agent, whose address refuses.
            VmRequest::Console => t.app.vm_console_log(name).await.map(drop),
        }
    }

    /// Every request in every VM state, through the App's operations:
    /// accepted exactly where the table says so.
    #[tokio::test]
    async fn every_vm_request_in_every_state_follows_the_table() {
        let t = TestApp::new(Duration::from_secs(600)).await;
        t.ready_host(HostSpec::new("h1")).await;
        t.ready_host(HostSpec::new("h2")).await;
        for (state, _) in VM_TABLE {
            for r in VmRequest::ALL {
                let name = format!("{state}-{}", r.verb().replace(' ', "-"));
                vm_in(&t, &name, state).await;
                let before = t.app.vm_get(&name).await.unwrap();
                let got = ask_vm(&t, &name, r).await;
                assert_eq!(
                    !refused(&got),
                    vm_accepts(state, r),
                    "{r:?} on a {state} VM: {got:?}"
                );
                if refused(&got) {
                    let after = t.app.vm_get(&name).await.unwrap();
                    assert_eq!(after, before, "a refused {r:?} changed the VM");
                }
                // Room for the next case.
                t.app.inv.write().await.remove_vm(&name);
            }
        }
    }

    /// The issue that started the table: a VM on a down host refuses
    /// stop and start, says why, and stays unknown until the host reports.
    #[tokio::test]
    async fn vm_on_a_down_host_stays_unknown() {
        let t = TestApp::new(Duration::from_millis(50)).await;
        t.ready_host(HostSpec::new("h1")).await;
        t.app.vm_create(TestApp::vm("web", 512)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        t.app.host_check_liveness().await.unwrap();
        assert_eq!(t.app.vm_get("web").await.unwrap().state, VmState::Unknown);
        for r in [VmRequest::Stop, VmRequest::Start, VmRequest::Reboot] {
            match ask_vm(&t, "web", r).await {
                Err(Error::Api(e)) => {
                    assert_eq!(e.code, ErrorCode::Conflict);
                    assert!(
                        e.message.contains("is unknown: host h1 is down")
                            && e.message.contains("accepts only: delete"),
                        "{}",
                        e.message
                    );
                }
                other => panic!("{r:?}: {other:?}"),
            }
            assert_eq!(t.app.vm_get("web").await.unwrap().state, VmState::Unknown);
        }
        t.heartbeat("h1").await;
        assert_eq!(t.app.vm_get("web").await.unwrap().state, VmState::Starting);
    }

    /// Put host `name` into `state` the way it gets there.
    async fn host_in(t: &TestApp, name: &str, state: HostState) {
        t.register(HostSpec::new(name)).await;
        if state != HostState::Joining {
            t.heartbeat(name).await;
        }
        let mode = match state {
            HostState::Disabled => Some(false),
            _ => None,
        };
        if let Some(enabled) = mode {
            t.app.host_set_enabled(name, enabled).await.unwrap();
        }
        if state == HostState::Draining {
            t.app.host_drain(name, false).await.unwrap();
        }
        let mut inv = t.app.inv.write().await;
        let entry = inv.hosts.get_mut(name).unwrap();
        match state {
            HostState::Down => entry.live.down = true,
            HostState::Maintenance => entry.rec.mode = crate::app::records::HostMode::Maintenance,
            HostState::Standby => entry.rec.mode = crate::app::records::HostMode::Standby,
            _ => {}
        }
        inv.sync_host(name);
        assert_eq!(inv.hosts[name].state(), state);
    }

    async fn ask_host(t: &TestApp, name: &str, r: HostRequest) -> crate::error::Result<()> {
        match r {
            HostRequest::Enable => t.app.host_set_enabled(name, true).await.map(drop),
            HostRequest::Disable => t.app.host_set_enabled(name, false).await.map(drop),
            HostRequest::Drain => t.app.host_drain(name, false).await.map(drop),
            HostRequest::Undrain => t.app.host_undrain(name, false).await.map(drop),
            HostRequest::Delete => t.app.host_delete(name).await,
            HostRequest::Update => {
                let req = UpdateHost {
                    cpu_overcommit: Some(2.0),
                    memory_overcommit: None,
                };
                t.app.host_update(name, req).await.map(drop)
            }
        }
    }

    /// Every request in every host state: accepted exactly where the
    /// table says so.
    #[tokio::test]
    async fn every_host_request_in_every_state_follows_the_table() {
        let t = TestApp::new(Duration::from_secs(600)).await;
        for (state, _) in HOST_TABLE {
            for r in HostRequest::ALL {
                let name = format!("{state}-{}", r.verb());
                host_in(&t, &name, state).await;
                let got = ask_host(&t, &name, r).await;
                assert_eq!(
                    !refused(&got),
                    host_accepts(state, r),
                    "{r:?} on a {state} host: {got:?}"
                );
                if refused(&got) {
                    assert_eq!(t.app.inv.read().await.hosts[&name].state(), state);
                }
            }
        }
    }

    /// A host that is down for its maintenance is undrained like one
    /// that is up.
    #[tokio::test]
    async fn a_host_down_in_maintenance_can_be_undrained() {
        let t = TestApp::new(Duration::from_secs(600)).await;
        host_in(&t, "h1", HostState::Maintenance).await;
        t.app
            .inv
            .write()
            .await
            .hosts
            .get_mut("h1")
            .unwrap()
            .live
            .down = true;
        assert_eq!(t.app.host_get("h1").await.unwrap().state, HostState::Down);
        t.app.host_undrain("h1", false).await.unwrap();
        assert!(refused(&t.app.host_drain("h1", false).await));
    }
}
