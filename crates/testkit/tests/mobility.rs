//! Moving VMs with simulated hosts: live migration through the API, host
//! drain, zone evacuation and return, rebalancing and consolidation.

use kumo_api::{CreateVm, ErrorCode, EventQuery, MigrateVm, MigrationOutcome, Vm, VmState};
use kumo_client::Client;
use kumo_testkit::{blank_image, vm_request, wait_until, wait_vm, SimCloud};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

async fn two_zones() -> SimCloud {
    let mut cloud = SimCloud::start(Duration::from_millis(800)).await.unwrap();
    cloud.zone("z1").await.unwrap();
    cloud.zone("z2").await.unwrap();
    cloud.host("h1", "z1").await.unwrap();
    cloud.host("h2", "z2").await.unwrap();
    let img = blank_image(cloud.dir.path());
    cloud.client.image_import("tiny", &img).await.unwrap();
    cloud
}

/// Wait until the VM's migration ended; the VM as it ended.
async fn migration_ended(c: &Client, name: &str) -> Vm {
    wait_until(T, &format!("migration of {name} ended"), || async {
        c.vm(name)
            .await
            .ok()
            .filter(|v| v.migration.is_none() && v.last_migration.is_some())
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_moves_live_and_a_cancelled_move_leaves_it_where_it_was() {
    let cloud = two_zones().await;
    let c = &cloud.client;
    c.vm_create(&CreateVm {
        zone: Some("z1".into()),
        memory_mib: 4096,
        ..vm_request("web", "tiny")
    })
    .await
    .unwrap();
    wait_vm(c, "web", VmState::Running, T).await.unwrap();

    // Bad requests change nothing.
    let err = c
        .vm_migrate(
            "web",
            &MigrateVm {
                to: Some("h1".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidInput), "{err}");
    let err = c
        .vm_migrate(
            "web",
            &MigrateVm {
                downtime_limit_ms: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidInput), "{err}");
    let err = c.vm_migrate_cancel("web").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Conflict), "{err}");
    assert!(c.vm("web").await.unwrap().migration.is_none());

    // The scheduler picks the only other host; the room is held there
    // while the VM moves.
    let vm = c.vm_migrate("web", &MigrateVm::default()).await.unwrap();
    let m = vm.migration.clone().unwrap();
    assert_eq!((m.source.as_str(), m.target.as_str()), ("h1", "h2"));
    assert_eq!(vm.state, VmState::Migrating);
    assert_eq!(c.host("h2").await.unwrap().allocated.memory_mib, 4096);
    let err = c.vm_action("web", "stop").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Conflict));
    let vm = migration_ended(c, "web").await;
    let last = vm.last_migration.unwrap();
    assert_eq!(last.outcome, MigrationOutcome::Completed, "{last:?}");
    assert_eq!((vm.host.as_str(), vm.zone.as_str()), ("h2", "z2"));
    assert_eq!(c.host("h1").await.unwrap().allocated.memory_mib, 0);
    assert_eq!(c.host("h2").await.unwrap().allocated.memory_mib, 4096);
    wait_vm(c, "web", VmState::Running, T).await.unwrap();

    // Back, cancelled while the memory is being sent.
    let vm = c.vm_migrate("web", &MigrateVm::default()).await.unwrap();
    let id = vm.migration.unwrap().id;
    wait_until(T, "transfer under way", || async {
        c.vm("web")
            .await
            .ok()
            .filter(|v| v.migration.as_ref().is_some_and(|m| m.progress.is_some()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", futures_block(c)));
    c.vm_migrate_cancel("web").await.unwrap();
    let vm = migration_ended(c, "web").await;
    let last = vm.last_migration.unwrap();
    assert_eq!((last.id, last.outcome), (id, MigrationOutcome::Cancelled));
    assert_eq!(vm.host, "h2");
    assert_eq!(c.host("h1").await.unwrap().allocated.memory_mib, 0);
    wait_vm(c, "web", VmState::Running, T).await.unwrap();

    let kinds: Vec<String> = c
        .events(&EventQuery {
            resource: Some("vm/web".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    for kind in [
        "vm.migration.started",
        "vm.migrated",
        "vm.migration.cancelled",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} in {kinds:?}");
    }
}

fn futures_block(c: &Client) -> String {
    let c = c.clone();
    std::thread::spawn(move || {
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            format!(
                "{:?}\n{:?}",
                c.vm("web").await,
                c.events(&EventQuery::default()).await.map(|e| e
                    .into_iter()
                    .map(|e| format!("{} {} {}", e.kind, e.resource, e.message))
                    .collect::<Vec<_>>())
            )
        })
    })
    .join()
    .unwrap()
}
