//! One allocation ledger: whatever operators, the mover and the hosts do,
//! the scheduler's count of what each host holds (which `GET /v1/hosts`
//! shows) equals the sum of the VMs recorded on it plus the room reserved
//! for VMs migrating to it.
//!
//! Random sequences of creates, deletes, migrations, cancels, drains and
//! undrains, mover passes, hosts going down and coming back, and heartbeats
//! (reports a simulated agent would send for the host's desired state)
//! run against the controller, starting from the previous release's state.

mod support;

use kumo_api::{
    CreateVm, Heartbeat, HostLoad, MigrateVm, MigrationSpec, MigrationState, MigrationStatus,
    ObservedState, PowerState, Resources, VmStatus,
};
use kumod::app::App;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::time::Duration;

const HOSTS: [&str; 4] = ["h1", "h2", "h3", "h4"];
const VMS: [&str; 6] = ["a", "b", "c", "m", "x", "y"];

#[derive(Clone, Debug)]
enum Op {
    Create {
        vm: usize,
        vcpus: u32,
        start: bool,
    },
    Delete {
        vm: usize,
    },
    Migrate {
        vm: usize,
        to: Option<usize>,
    },
    Cancel {
        vm: usize,
    },
    Drain {
        host: usize,
    },
    Undrain {
        host: usize,
        return_vms: bool,
    },
    Mover,
    /// Every host that sent no heartbeat since goes down (the controller
    /// runs with `down_after` zero).
    Silence,
    Heartbeat {
        host: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let vm = 0..VMS.len();
    let host = 0..HOSTS.len();
    prop_oneof![
        (vm.clone(), 1..3u32, any::<bool>()).prop_map(|(vm, vcpus, start)| Op::Create {
            vm,
            vcpus,
            start
        }),
        vm.clone().prop_map(|vm| Op::Delete { vm }),
        (vm.clone(), proptest::option::of(host.clone()))
            .prop_map(|(vm, to)| Op::Migrate { vm, to }),
        vm.prop_map(|vm| Op::Cancel { vm }),
        host.clone().prop_map(|host| Op::Drain { host }),
        (host.clone(), any::<bool>())
            .prop_map(|(host, return_vms)| Op::Undrain { host, return_vms }),
        Just(Op::Mover),
        Just(Op::Silence),
        host.clone().prop_map(|host| Op::Heartbeat { host }),
        host.prop_map(|host| Op::Heartbeat { host }),
    ]
}

/// What a simulated agent reports for its desired state: guests as wanted,
/// a deleted one gone, an incoming migration listening, an outgoing one
/// completed (or cancelled, when asked).
async fn heartbeat(app: &App, host: &str) {
    let desired = app
        .host_desired(host, None, Duration::ZERO)
        .await
        .expect("desired state");
    let vms = desired
        .vms
        .iter()
        .filter(|spec| !spec.delete)
        .map(|spec| {
            let (state, migration) = match &spec.migration {
                Some(MigrationSpec::Incoming { id, .. }) => (
                    ObservedState::Incoming,
                    Some(MigrationStatus {
                        uri: Some("tcp:127.0.0.1:1".into()),
                        ..MigrationStatus::new(*id, MigrationState::Listening)
                    }),
                ),
                Some(MigrationSpec::Outgoing { id, cancel, .. }) => {
                    let done = if *cancel {
                        MigrationState::Cancelled
                    } else {
                        MigrationState::Completed
                    };
                    (
                        ObservedState::Running,
                        Some(MigrationStatus::new(*id, done)),
                    )
                }
                None => match spec.power {
                    PowerState::Running => (ObservedState::Running, None),
                    PowerState::Stopped => (ObservedState::Stopped, None),
                },
            };
            VmStatus {
                id: spec.id,
                state,
                reboots: spec.reboots,
                cpu_percent: None,
                message: None,
                migration,
            }
        })
        .collect();
    let hb = Heartbeat {
        load: HostLoad::default(),
        applied_generation: desired.generation,
        vms,
    };
    app.host_heartbeat(host, hb).await.expect("heartbeat");
}

async fn run(app: &App, op: &Op) {
    // Refusals (conflicts, no room, not migrating) are part of the game;
    // a server error is not.
    let outcome = match op {
        Op::Create { vm, vcpus, start } => {
            let req: CreateVm = serde_json::from_value(serde_json::json!({
                "name": VMS[*vm], "image": "tiny", "vcpus": vcpus,
                "memory_mib": 256 * u64::from(*vcpus), "start": start,
            }))
            .expect("request");
            app.vm_create(req).await.map(drop)
        }
        Op::Delete { vm } => app.vm_delete(VMS[*vm]).await.map(drop),
        Op::Migrate { vm, to } => {
            let req = MigrateVm {
                to: to.map(|h| HOSTS[h].to_string()),
                downtime_limit_ms: None,
            };
            app.vm_migrate(VMS[*vm], req).await.map(drop)
        }
        Op::Cancel { vm } => app.vm_migrate_cancel(VMS[*vm]).await.map(drop),
        Op::Drain { host } => app.host_drain(HOSTS[*host], false).await.map(drop),
        Op::Undrain { host, return_vms } => {
            app.host_undrain(HOSTS[*host], *return_vms).await.map(drop)
        }
        Op::Mover => app.move_vms().await.and(app.migrations_check().await),
        Op::Silence => app.host_check_liveness().await,
        Op::Heartbeat { host } => {
            heartbeat(app, HOSTS[*host]).await;
            Ok(())
        }
    };
    if let Err(kumod::Error::Api(e)) = &outcome {
        assert!(e.status() < 500, "{op:?}: {e}");
    } else if let Err(e) = outcome {
        panic!("{op:?}: {e}");
    }
}

/// Each host's allocation as recorded in the VMs themselves.
async fn recorded(app: &App) -> BTreeMap<String, (Resources, u32)> {
    let list = app
        .vm_list_json(&Default::default())
        .await
        .expect("VM list");
    let vms = serde_json::from_slice::<kumo_api::VmList>(&list)
        .expect("VM list")
        .items;
    let mut held: BTreeMap<String, (Resources, u32)> = HOSTS
        .iter()
        .map(|h| (h.to_string(), (Resources::default(), 0)))
        .collect();
    for vm in &vms {
        let mut hosts = vec![vm.host.clone()];
        hosts.extend(vm.migration.as_ref().map(|m| m.target.clone()));
        for h in hosts {
            let e = held.entry(h).or_default();
            e.0 = e.0.add(&vm.size);
            e.1 += 1;
        }
    }
    held
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn the_scheduler_counts_what_the_vm_records_hold(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (_dir, app) = support::load_fixture(|c| c.down_after = Duration::ZERO).await;
            for op in &ops {
                run(&app, op).await;
                let ledger: BTreeMap<String, (Resources, u32)> = app
                    .host_list(&Default::default())
                    .await
                    .expect("host list")
                    .items
                    .into_iter()
                    .map(|h| (h.name, (h.allocated, h.vm_count)))
                    .collect();
                assert_eq!(ledger, recorded(&app).await, "after {op:?} in {ops:?}");
            }
        });
    }
}
