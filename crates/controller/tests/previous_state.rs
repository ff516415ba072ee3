//! The previous release's state file loads: `fixtures/state-v0.json` is
//! every key and value a controller of that release stored (written by it
//! with simulated hosts: zones z1 and z2; hosts h1, h2 in z1 and h3, h4 in
//! z2; image tiny; group web; join token; VMs a and b moved from h1 to h2
//! by h1's drain, which left h1 in maintenance; c stopped on h2; m
//! migrating from h3 to h4, still preparing). This controller must load it
//! and see the same cloud.

use kumo_api::{EventQuery, HostState, MigrationPhase, MigrationReason, VmState};
mod support;

use std::collections::BTreeMap;

#[tokio::test]
async fn the_previous_releases_state_file_loads() {
    let (_dir, app) = support::load_fixture(|_| {}).await;

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

/// A host record written by this release says its version; one the
/// previous release wrote (no version) stays as it was until written again.
#[tokio::test]
async fn host_records_are_written_with_their_version() {
    let (dir, app) = support::load_fixture(|_| {}).await;
    app.host_set_enabled("h2", false).await.expect("disable");
    drop(app);
    let store =
        kumo_store::SqliteStore::open(&dir.path().join("controller/state.db")).expect("store");
    let version = |kv: &[kumo_store::KeyValue]| {
        let rec: serde_json::Value = serde_json::from_slice(&kv[0].value).expect("JSON");
        rec.get("version").and_then(serde_json::Value::as_u64)
    };
    use kumo_store::Store;
    assert_eq!(
        version(&store.range("hosts/h2").await.expect("h2")),
        Some(1)
    );
    assert_eq!(version(&store.range("hosts/h3").await.expect("h3")), None);
}
