//! The previous release's state file loads: `fixtures/state-v0.json` is
//! every key and value a controller of that release stored (written by it
//! with simulated hosts: zones z1 and z2; hosts h1, h2 in z1 and h3, h4 in
//! z2; image tiny; group web; join token; VMs a and b moved from h1 to h2
//! by h1's drain, which left h1 in maintenance; c stopped on h2; m
//! migrating from h3 to h4, still preparing). This controller must load it
//! and see the same cloud.

use kumo_api::{EventQuery, HostState, MigrationPhase, MigrationReason, VmState};
use kumo_store::{Op, SqliteStore, Store};
use std::collections::BTreeMap;
use std::sync::Arc;

async fn load_fixture() -> (tempfile::TempDir, Arc<kumod::app::App>) {
    let text = include_str!("fixtures/state-v0.json");
    let records: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(text).expect("fixture is JSON");
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("controller");
    kumo_private_fs::create_dir(&data_dir).expect("data dir");
    {
        let store = SqliteStore::open(&data_dir.join("state.db")).expect("store");
        let ops = records
            .iter()
            .map(|(key, value)| Op::Put {
                key: key.clone(),
                value: serde_json::to_vec(value).expect("value"),
            })
            .collect();
        store.txn(Vec::new(), ops, Vec::new()).await.expect("txn");
    }
    let config = kumod::Config::new(data_dir, "127.0.0.1:0".parse().expect("addr"));
    let app = kumod::app::App::open(&config)
        .await
        .expect("the old state loads");
    (dir, app)
}

#[tokio::test]
async fn the_previous_releases_state_file_loads() {
    let (_dir, app) = load_fixture().await;

    let hosts: BTreeMap<String, kumo_api::Host> = app
        .host_list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|h| (h.name.clone(), h))
        .collect();
    assert_eq!(hosts.len(), 4);
    assert_eq!(hosts["h1"].state, HostState::Maintenance);
    for h in ["h2", "h3", "h4"] {
        assert_eq!(hosts[h].state, HostState::Ready, "{h}");
    }
    // What each host holds: a, b and c on h2; m on h3, and its room
    // reserved on h4 while it migrates there.
    let held: BTreeMap<&str, (u32, u64, u32)> = hosts
        .iter()
        .map(|(n, h)| {
            (
                n.as_str(),
                (h.allocated.vcpus, h.allocated.memory_mib, h.vm_count),
            )
        })
        .collect();
    assert_eq!(
        held,
        BTreeMap::from([
            ("h1", (0, 0, 0)),
            ("h2", (3, 768, 3)),
            ("h3", (1, 256, 1)),
            ("h4", (1, 256, 1)),
        ])
    );

    for name in ["a", "b"] {
        let vm = app.vm_get(name).await.expect("VM loads");
        assert_eq!(vm.host, "h2");
        assert_eq!(vm.state, VmState::Running);
        assert_eq!(vm.evacuated_from.as_deref(), Some("h1"));
        let last = vm.last_migration.expect("the drain's move");
        assert_eq!(last.source, "h1");
        assert_eq!(last.reason, MigrationReason::Drain { host: "h1".into() });
    }
    let c = app.vm_get("c").await.expect("VM loads");
    assert_eq!((c.host.as_str(), c.state), ("h2", VmState::Stopped));
    let m = app.vm_get("m").await.expect("VM loads");
    assert_eq!((m.host.as_str(), m.state), ("h3", VmState::Migrating));
    let migration = m.migration.expect("m migrates");
    assert_eq!(migration.target, "h4");
    assert_eq!(migration.phase, MigrationPhase::Preparing);
    assert_eq!(migration.reason, MigrationReason::Operator);

    let events = app
        .event_list(&EventQuery {
            limit: Some(1000),
            ..Default::default()
        })
        .await
        .unwrap()
        .items;
    assert_eq!(events.len(), 49);
    assert_eq!(events.last().map(|e| e.seq), Some(49));
    assert_eq!(
        events.last().map(|e| e.kind.as_str()),
        Some("vm.migration.started")
    );
}
