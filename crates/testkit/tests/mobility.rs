//! Moving VMs with simulated hosts: live migration through the API, host
//! drain, zone evacuation and return, rebalancing and consolidation.

use kumo_api::{
    CreateGroup, CreateVm, ErrorCode, GroupPolicy, Host, HostState, MigrateVm, MigrationOutcome,
    MigrationReason, PlacementPolicy, Vm, VmState,
};
use kumo_client::Client;
use kumo_testkit::{
    blank_image, event_kinds, vm_request, wait_migration_ended, wait_until, wait_vm, SimCloud,
};
use kumod::app::drains::PARALLEL_MIGRATIONS;
use std::collections::{BTreeMap, BTreeSet};
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

async fn migration_ended(c: &Client, name: &str) -> Vm {
    wait_migration_ended(c, name, T).await.unwrap()
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
    // A named target without room says why.
    c.vm_create(&CreateVm {
        zone: Some("z2".into()),
        memory_mib: 14 * 1024,
        ..vm_request("filler", "tiny")
    })
    .await
    .unwrap();
    let to_h2 = MigrateVm {
        to: Some("h2".into()),
        ..Default::default()
    };
    let err = c.vm_migrate("web", &to_h2).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NoValidHost), "{err}");
    assert!(
        err.to_string()
            .contains("host h2 cannot take VM \"web\": too little free memory"),
        "{err}"
    );
    assert!(c.vm("web").await.unwrap().migration.is_none());
    c.vm_delete("filler").await.unwrap();
    wait_until(T, "filler gone", || async { c.vm("filler").await.err() })
        .await
        .unwrap();

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
    .unwrap();
    c.vm_migrate_cancel("web").await.unwrap();
    let vm = migration_ended(c, "web").await;
    let last = vm.last_migration.unwrap();
    assert_eq!((last.id, last.outcome), (id, MigrationOutcome::Cancelled));
    assert_eq!(vm.host, "h2");
    assert_eq!(c.host("h1").await.unwrap().allocated.memory_mib, 0);
    wait_vm(c, "web", VmState::Running, T).await.unwrap();

    let kinds = event_kinds(c, Some("vm/web")).await.unwrap();
    for kind in [
        "vm.migration.started",
        "vm.migrated",
        "vm.migration.cancelled",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} in {kinds:?}");
    }
}

/// The most migrations under way at once, sampled until `done` holds for
/// the hosts and VMs (or the wait times out).
async fn follow_moves(c: &Client, what: &str, done: impl Fn(&[Host], &[Vm]) -> bool) -> usize {
    let most = std::cell::Cell::new(0);
    wait_until(Duration::from_secs(60), what, || async {
        let (hosts, vms) = (c.hosts().await.ok()?, c.vms().await.ok()?);
        let moving = vms.iter().filter(|v| v.migration.is_some()).count();
        most.set(most.get().max(moving));
        done(&hosts, &vms).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    most.get()
}

fn state_of(hosts: &[Host], name: &str) -> HostState {
    hosts.iter().find(|h| h.name == name).expect("host").state
}

async fn hosts_of(c: &Client) -> BTreeMap<String, String> {
    c.vms()
        .await
        .unwrap()
        .into_iter()
        .map(|v| (v.name, v.host))
        .collect()
}

/// Create `names` on `host` by taking the other hosts out of placement for
/// a moment (requirements would pin them there for good).
async fn create_on(c: &Client, host: &str, vms: &[CreateVm]) {
    let others: Vec<String> = c
        .hosts()
        .await
        .unwrap()
        .into_iter()
        .filter(|h| h.name != host && h.state == HostState::Ready)
        .map(|h| h.name)
        .collect();
    for h in &others {
        c.host_enable(h, false).await.unwrap();
    }
    for req in vms {
        let vm = c.vm_create(req).await.unwrap();
        assert_eq!(vm.host, host);
    }
    for h in &others {
        c.host_enable(h, true).await.unwrap();
    }
    for req in vms {
        wait_vm(c, &req.name, VmState::Running, T).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_drain_moves_every_vm_away_within_the_rules_and_undrain_brings_them_back() {
    let mut cloud = SimCloud::start(Duration::from_millis(800)).await.unwrap();
    cloud.zone("z1").await.unwrap();
    for h in ["h1", "h2", "h3"] {
        cloud.host(h, "z1").await.unwrap();
    }
    let img = blank_image(cloud.dir.path());
    let c = &cloud.client;
    c.image_import("tiny", &img).await.unwrap();
    c.group_create(&CreateGroup {
        name: "replicas".into(),
        policy: GroupPolicy::AntiAffinity,
        hard: Some(true),
    })
    .await
    .unwrap();
    let vm = |name: &str, groups: &[&str]| CreateVm {
        memory_mib: 2048,
        groups: groups.iter().map(|g| g.to_string()).collect(),
        ..vm_request(name, "tiny")
    };
    // h1: five plain VMs and one replica; the other replica on h2.
    let mut on_h1: Vec<CreateVm> = (1..=5).map(|i| vm(&format!("v{i}"), &[])).collect();
    on_h1.push(vm("db-a", &["replicas"]));
    create_on(c, "h1", &on_h1).await;
    create_on(c, "h2", &[vm("db-b", &["replicas"])]).await;
    let before = hosts_of(c).await;

    // The dry run: every VM has a place, db-a only on h3; nothing moves.
    let plan = c.host_drain("h1", true).await.unwrap();
    assert_eq!(plan.scope, "host/h1");
    assert!(plan.feasible, "{plan:?}");
    assert_eq!(plan.moves.len(), 6, "{plan:?}");
    assert_eq!(plan.memory_mib, 6 * 2048);
    for m in &plan.moves {
        assert_eq!(m.from, "h1");
        assert!(matches!(m.to.as_deref(), Some("h2" | "h3")), "{m:?}");
        assert_eq!(m.to_zone.as_deref(), Some("z1"));
        assert!(m.refusal.is_none(), "{m:?}");
    }
    let db_a = plan.moves.iter().find(|m| m.vm == "db-a").unwrap();
    assert_eq!(db_a.to.as_deref(), Some("h3"), "anti-affinity with db-b");
    assert_eq!(c.host("h1").await.unwrap().state, HostState::Ready);
    assert_eq!(hosts_of(c).await, before);
    assert!(c.vms().await.unwrap().iter().all(|v| v.migration.is_none()));

    // Bad input changes nothing.
    let raw = |query: &str| {
        reqwest::Client::new()
            .post(format!("{}/v1/hosts/h1/drain?{query}", cloud.server.url()))
            .bearer_auth(&cloud.server.admin_token)
            .send()
    };
    let resp = raw("dry_run=maybe").await.unwrap();
    assert_eq!(resp.status(), 400);
    let text = resp.text().await.unwrap();
    assert!(text.contains("dry_run"), "{text}");
    assert_eq!(raw("dry_run=true").await.unwrap().status(), 200);
    let err = c.host_drain("nope", false).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
    assert!(err.to_string().contains("host \"nope\""), "{err}");
    let err = c.zone_drain("nope", true).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
    assert!(err.to_string().contains("zone \"nope\""), "{err}");
    let err = c.zone_drain_status("nope").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
    let err = c.host_undrain("nope", true).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
    let err = c.host_undrain("h2", false).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Conflict), "{err}");
    assert!(c
        .hosts()
        .await
        .unwrap()
        .iter()
        .all(|h| h.state == HostState::Ready));
    assert_eq!(hosts_of(c).await, before);

    // The drain: h1 takes no VMs at once, and its VMs leave a few at a time.
    let plan = c.host_drain("h1", false).await.unwrap();
    assert!(plan.feasible, "{plan:?}");
    assert_eq!(c.host("h1").await.unwrap().state, HostState::Draining);
    let err = c
        .vm_create(&CreateVm {
            requirements: Some("name == \"h1\"".into()),
            ..vm_request("late", "tiny")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NoValidHost), "{err}");
    let most = follow_moves(c, "h1 in maintenance", |hosts, _| {
        state_of(hosts, "h1") == HostState::Maintenance
    })
    .await;
    assert!(
        (1..=PARALLEL_MIGRATIONS).contains(&most),
        "{most} migrations at once"
    );
    let vms = c.vms().await.unwrap();
    for v in &vms {
        assert_ne!(v.host, "h1", "{v:?}");
        assert_eq!(v.state, VmState::Running, "{v:?}");
        let moved = before[&v.name] == "h1";
        assert_eq!(v.evacuated_from.as_deref(), moved.then_some("h1"), "{v:?}");
        if moved {
            let last = v.last_migration.as_ref().unwrap();
            assert_eq!(last.outcome, MigrationOutcome::Completed, "{last:?}");
            assert_eq!(last.reason, MigrationReason::Drain { host: "h1".into() });
        }
    }
    let host = |n: &str| vms.iter().find(|v| v.name == n).unwrap().host.clone();
    assert_eq!(host("db-b"), "h2");
    assert_eq!(host("db-a"), "h3");
    assert_eq!(c.host("h1").await.unwrap().allocated.memory_mib, 0);
    assert!(c
        .zone_drain_status("z1")
        .await
        .unwrap()
        .moves
        .iter()
        .all(|m| m.from != "h1"));

    // db-a cannot leave h3: h1 is in maintenance and db-b holds h2.
    let plan = c.host_drain("h3", true).await.unwrap();
    assert!(!plan.feasible, "{plan:?}");
    let stuck = plan.moves.iter().find(|m| m.vm == "db-a").unwrap();
    assert_eq!(stuck.to, None);
    let refusal = stuck.refusal.as_deref().unwrap();
    assert!(refusal.contains("anti-affinity"), "{refusal}");
    assert_eq!(c.host("h3").await.unwrap().state, HostState::Ready);

    // Undrain with return: everything comes home and forgets the drain.
    let h1 = c.host_undrain("h1", true).await.unwrap();
    assert_eq!(h1.state, HostState::Ready);
    follow_moves(c, "VMs back on h1", |_, vms| {
        vms.iter()
            .all(|v| v.evacuated_from.is_none() && v.migration.is_none())
    })
    .await;
    assert_eq!(hosts_of(c).await, before);

    // A down host cannot be drained, alone or with its zone; nothing changes.
    cloud.host("h4", "z1").await.unwrap();
    cloud.stop_host(3);
    let c = &cloud.client;
    wait_until(T, "h4 down", || async {
        c.host("h4")
            .await
            .ok()
            .filter(|h| h.state == HostState::Down)
    })
    .await
    .unwrap();
    let err = c.host_drain("h4", false).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Conflict), "{err}");
    assert!(err.to_string().contains("h4 is down"), "{err}");
    let err = c.zone_drain("z1", false).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Conflict), "{err}");
    let hosts = c.hosts().await.unwrap();
    for h in ["h1", "h2", "h3"] {
        assert_eq!(state_of(&hosts, h), HostState::Ready);
    }
    assert_eq!(state_of(&hosts, "h4"), HostState::Down);
    assert_eq!(hosts_of(c).await, before);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_zone_drain_moves_every_vm_to_the_other_zone_and_undrain_returns_each_home() {
    let mut cloud = SimCloud::start(Duration::from_millis(800)).await.unwrap();
    cloud.zone("z1").await.unwrap();
    cloud.zone("z2").await.unwrap();
    for (h, z) in [("a1", "z1"), ("a2", "z1"), ("b1", "z2"), ("b2", "z2")] {
        cloud.host(h, z).await.unwrap();
    }
    let img = blank_image(cloud.dir.path());
    let c = &cloud.client;
    c.image_import("tiny", &img).await.unwrap();
    for i in 1..=6 {
        c.vm_create(&CreateVm {
            zone: Some("z1".into()),
            memory_mib: 1024 * (1 + i % 3),
            policy: Some(PlacementPolicy::Spread),
            ..vm_request(&format!("v{i}"), "tiny")
        })
        .await
        .unwrap();
    }
    for i in 1..=6 {
        wait_vm(c, &format!("v{i}"), VmState::Running, T)
            .await
            .unwrap();
    }
    let before = hosts_of(c).await;
    let homes: BTreeSet<&str> = before.values().map(String::as_str).collect();
    assert_eq!(homes, BTreeSet::from(["a1", "a2"]), "spread over z1");

    let plan = c.zone_drain("z1", true).await.unwrap();
    assert_eq!(plan.scope, "zone/z1");
    assert!(plan.feasible, "{plan:?}");
    assert_eq!(plan.moves.len(), 6);
    for m in &plan.moves {
        assert_eq!(m.to_zone.as_deref(), Some("z2"), "{m:?}");
        assert_eq!(m.from, before[&m.vm]);
    }
    assert_eq!(hosts_of(c).await, before);
    assert_eq!(c.zone_drain_status("z1").await.unwrap(), plan);

    c.zone_drain("z1", false).await.unwrap();
    let most = follow_moves(c, "z1 drained", |hosts, _| {
        ["a1", "a2"]
            .iter()
            .all(|h| state_of(hosts, h) == HostState::Maintenance)
    })
    .await;
    assert!(most <= PARALLEL_MIGRATIONS, "{most} migrations at once");
    for v in c.vms().await.unwrap() {
        assert_eq!(v.zone, "z2", "{v:?}");
        assert_eq!(v.evacuated_from.as_ref(), Some(&before[&v.name]), "{v:?}");
    }
    let status = c.zone_drain_status("z1").await.unwrap();
    assert!(status.moves.is_empty() && status.feasible, "{status:?}");
    // Draining again is a no-op, not a conflict over hosts in maintenance.
    let again = c.zone_drain("z1", false).await.unwrap();
    assert!(again.moves.is_empty() && again.feasible, "{again:?}");
    let hosts = c.hosts().await.unwrap();
    assert_eq!(state_of(&hosts, "a1"), HostState::Maintenance);
    assert_eq!(state_of(&hosts, "a2"), HostState::Maintenance);

    let hosts = c.zone_undrain("z1", true).await.unwrap();
    let mut names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["a1", "a2"]);
    assert!(hosts.iter().all(|h| h.state == HostState::Ready));
    follow_moves(c, "VMs back in z1", |_, vms| {
        vms.iter()
            .all(|v| v.evacuated_from.is_none() && v.migration.is_none())
    })
    .await;
    assert_eq!(hosts_of(c).await, before, "each VM on its own host again");
    // Undrained hosts are not drained any more: nothing left to undrain.
    assert!(c.zone_undrain("z1", false).await.unwrap().is_empty());
}

/// Undrained while its drain still moves VMs: the VMs on their way out
/// still remember their host, and `return` brings them back.
#[tokio::test(flavor = "multi_thread")]
async fn undrain_during_a_drain_still_brings_every_vm_home() {
    let mut cloud = two_zones().await;
    cloud.host("h3", "z1").await.unwrap();
    let c = &cloud.client;
    create_on(
        c,
        "h1",
        &[CreateVm {
            memory_mib: 8192,
            ..vm_request("big", "tiny")
        }],
    )
    .await;
    c.host_drain("h1", false).await.unwrap();
    wait_until(T, "the move under way", || async {
        c.vm("big").await.ok().filter(|v| v.migration.is_some())
    })
    .await
    .unwrap();
    c.host_undrain("h1", true).await.unwrap();
    let vm = wait_until(T, "big back on h1", || async {
        c.vm("big").await.ok().filter(|v| {
            v.host == "h1"
                && v.last_migration.as_ref().is_some_and(|l| {
                    l.reason == MigrationReason::ReturnAfterDrain { host: "h1".into() }
                })
        })
    })
    .await
    .unwrap();
    assert_eq!(vm.evacuated_from, None);
}
