//! Automatic rebalancing and power-saving consolidation at 1,000 simulated
//! hosts. Simulated guests use the CPU their VM's `sim.cpu_percent`
//! metadata says, and a simulated host reports the sum over its vCPUs as
//! its load, so load can be skewed at will.

use kumo_api::{
    CreateGroup, CreateVm, ErrorCode, Event, EventQuery, GroupPolicy, Host, HostState,
    MigrationReason, PowerSaving, Vm, VmState,
};
use kumo_client::Client;
use kumo_testkit::{blank_image, vm_request, wait_until, SimCloud};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

const HOSTS: usize = 1000;
const HEARTBEAT: Duration = Duration::from_secs(1);

/// A VM using `cpu` percent of one CPU.
fn busy_vm(name: &str, cpu: f64, vcpus: u32, memory_mib: u64) -> CreateVm {
    CreateVm {
        vcpus,
        memory_mib,
        metadata: BTreeMap::from([("sim.cpu_percent".to_string(), cpu.to_string())]),
        ..vm_request(name, "tiny")
    }
}

fn load(h: &Host) -> f64 {
    h.load.map_or(0.0, |l| f64::from(l.cpu_percent))
}

/// The imbalance score: standard deviation of the ready hosts' loads.
fn imbalance(hosts: &[Host]) -> f64 {
    let loads: Vec<f64> = hosts
        .iter()
        .filter(|h| h.state == HostState::Ready)
        .map(load)
        .collect();
    let n = loads.len() as f64;
    let mean = loads.iter().sum::<f64>() / n;
    (loads.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / n).sqrt()
}

/// No host holds more than it may.
fn assert_capacity(hosts: &[Host]) {
    for h in hosts {
        assert!(
            f64::from(h.allocated.vcpus) <= f64::from(h.capacity.vcpus) * h.cpu_overcommit,
            "{} over its vCPUs",
            h.name
        );
        assert!(
            h.allocated.memory_mib as f64 <= h.capacity.memory_mib as f64 * h.memory_overcommit,
            "{} over its memory",
            h.name
        );
    }
}

async fn events_after(c: &Client, after: u64) -> Vec<Event> {
    c.events(&EventQuery {
        after: Some(after),
        limit: Some(10_000),
        ..Default::default()
    })
    .await
    .unwrap()
    .items
}

async fn last_seq(c: &Client) -> u64 {
    c.events(&EventQuery {
        limit: Some(1),
        ..Default::default()
    })
    .await
    .unwrap()
    .next
}

async fn create_running(c: &Client, reqs: Vec<CreateVm>) {
    let names: Vec<String> = reqs.iter().map(|r| r.name.clone()).collect();
    for r in reqs {
        c.vm_create(&r).await.unwrap();
    }
    wait_until(Duration::from_secs(20), "VMs running", || async {
        let vms = c.vms().await.ok()?;
        names
            .iter()
            .all(|n| {
                vms.iter()
                    .any(|v| v.name == *n && v.state == VmState::Running)
            })
            .then_some(())
    })
    .await
    .unwrap();
}

fn rebalancing(v: &Vm) -> bool {
    v.migration
        .as_ref()
        .is_some_and(|m| matches!(m.reason, MigrationReason::Rebalance { .. }))
}

#[tokio::test(flavor = "multi_thread")]
async fn rebalancing_evens_out_skewed_load_within_its_limits() {
    let period = Duration::from_secs(1);
    let mut cloud = SimCloud::start_with(Duration::from_secs(30), |c| {
        c.rebalance = kumod::RebalanceSettings {
            threshold: 85.0,
            period,
            sustain: Duration::from_secs(2),
            max_moves: 1,
            max_in_flight: 2,
            ..Default::default()
        };
    })
    .await
    .unwrap();
    cloud.zone("z1").await.unwrap();
    cloud
        .sim_hosts("h", "z1", HOSTS, HEARTBEAT, None)
        .await
        .unwrap();
    let c = cloud.client.clone();
    let img = blank_image(cloud.dir.path());
    c.image_import("tiny", &img).await.unwrap();
    c.group_create(&CreateGroup {
        name: "replicas".into(),
        policy: GroupPolicy::AntiAffinity,
        hard: Some(true),
    })
    .await
    .unwrap();

    // Four hosts at 100%: placement packs eight 4-vCPU VMs on a host (8
    // cores, 4x overcommit), each keeping one of its eight CPUs busy. The
    // first VM of each hot host is a replica of a hard anti-affinity group
    // whose other replicas sit on quiet hosts, one each.
    let mut reqs = Vec::new();
    for h in 1..=4 {
        for i in 1..=8 {
            let mut r = busy_vm(&format!("hot-{h}-{i}"), 100.0, 4, 512);
            if i == 1 {
                r.groups = vec!["replicas".into()];
            }
            reqs.push(r);
        }
    }
    for i in 1..=36 {
        reqs.push(CreateVm {
            groups: vec!["replicas".into()],
            ..busy_vm(&format!("replica-{i}"), 0.0, 1, 512)
        });
    }
    create_running(&c, reqs).await;
    let hosts = wait_until(Duration::from_secs(10), "hot hosts reporting", || async {
        let hosts = c.hosts().await.ok()?;
        let hot = hosts.iter().filter(|h| load(h) > 99.0).count();
        (hot == 4).then_some(hosts)
    })
    .await
    .unwrap();
    let before = imbalance(&hosts);
    let seq = last_seq(&c).await;

    // Watch the migrations under way while the rebalancer works.
    let start = Instant::now();
    let mut most_in_flight = 0;
    let mut passes_seen = HashMap::new();
    let hosts = loop {
        assert!(
            start.elapsed() < Duration::from_secs(45),
            "load not even after 45 s: {:?}",
            c.rebalance_status().await.unwrap()
        );
        let vms = c.vms().await.unwrap();
        most_in_flight = most_in_flight.max(vms.iter().filter(|v| rebalancing(v)).count());
        let status = c.rebalance_status().await.unwrap();
        if let Some(p) = status.last_pass {
            let started = p.moves.iter().filter(|m| m.error.is_none()).count();
            passes_seen.insert(p.at, started);
            assert!(p.in_flight + started <= 2, "{p:?}");
        }
        let hosts = c.hosts().await.unwrap();
        let calm = hosts.iter().all(|h| load(h) <= 85.0);
        if calm && !vms.iter().any(|v| v.migration.is_some()) {
            break hosts;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let after = imbalance(&hosts);
    eprintln!(
        "imbalance {before:.2} -> {after:.2} in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    assert!(after < before * 0.9, "imbalance {before:.2} -> {after:.2}");
    assert!(most_in_flight <= 2, "{most_in_flight} rebalancing at once");
    assert!(passes_seen.values().all(|n| *n <= 1), "{passes_seen:?}");

    // Hard constraints held: capacity, and the replicas on distinct hosts.
    assert_capacity(&hosts);
    let vms = c.vms().await.unwrap();
    let mut replica_hosts: Vec<&str> = vms
        .iter()
        .filter(|v| v.groups.iter().any(|g| g == "replicas"))
        .map(|v| v.host.as_str())
        .collect();
    let n = replica_hosts.len();
    replica_hosts.sort();
    replica_hosts.dedup();
    assert_eq!(replica_hosts.len(), n, "two replicas share a host");

    // One migration per period at most: consecutive starts are a period
    // apart (less the time a pass may wait for the inventory lock).
    let events = events_after(&c, seq).await;
    let mut starts: Vec<u64> = events
        .iter()
        .filter(|e| {
            e.kind == "vm.migration.started"
                && matches!(e.migration_reason, Some(MigrationReason::Rebalance { .. }))
        })
        .map(|e| e.time)
        .collect();
    starts.sort();
    eprintln!("{} rebalancing migrations", starts.len());
    assert!(
        starts.len() >= 8,
        "{} moves: each hot host needs two",
        starts.len()
    );
    for w in starts.windows(2) {
        assert!(
            w[1] - w[0] >= period.as_millis() as u64 * 3 / 4,
            "two rebalancing migrations {} ms apart",
            w[1] - w[0]
        );
    }
    let planned: Vec<&Event> = events
        .iter()
        .filter(|e| e.kind == "rebalance.planned")
        .collect();
    assert_eq!(planned.len(), starts.len());
    assert!(planned[0].message.contains("imbalance"), "{planned:?}");
    let status = c.rebalance_status().await.unwrap();
    assert_eq!(status.started_total as usize, starts.len());
    // The moved VMs now cool down: nothing moves again.
    let moved: Vec<&Vm> = vms.iter().filter(|v| v.last_migration.is_some()).collect();
    assert_eq!(moved.len(), starts.len(), "a VM moved twice");
}

#[tokio::test(flavor = "multi_thread")]
async fn power_saving_empties_light_hosts_and_switches_one_on_when_demand_rises() {
    let mut cloud = SimCloud::start_with(Duration::from_secs(30), |c| {
        c.power_period = Duration::from_millis(500);
    })
    .await
    .unwrap();
    cloud.zone("z1").await.unwrap();
    cloud.zone("green").await.unwrap();
    cloud
        .sim_hosts("h", "z1", HOSTS - 6, HEARTBEAT, None)
        .await
        .unwrap();
    cloud
        .sim_hosts("g", "green", 6, HEARTBEAT, None)
        .await
        .unwrap();
    let c = cloud.client.clone();
    wait_until(Duration::from_secs(30), "all hosts ready", || async {
        let hosts = c.hosts().await.ok()?;
        (hosts.iter().filter(|h| h.state == HostState::Ready).count() == HOSTS).then_some(())
    })
    .await
    .unwrap();
    let img = blank_image(cloud.dir.path());
    c.image_import("tiny", &img).await.unwrap();
    // Six lightly loaded hosts with a 4 GiB VM each (of 16 GiB).
    let reqs = (1..=6)
        .map(|i| CreateVm {
            zone: Some("green".into()),
            policy: Some(kumo_api::PlacementPolicy::Spread),
            ..busy_vm(&format!("light-{i}"), 5.0, 1, 4096)
        })
        .collect();
    create_running(&c, reqs).await;
    let hosts = c.hosts().await.unwrap();
    assert!(hosts
        .iter()
        .filter(|h| h.zone == "green")
        .all(|h| h.vm_count == 1));

    let marks = cloud.dir.path().join("power");
    std::fs::create_dir_all(&marks).unwrap();
    let settings = PowerSaving {
        headroom: 0.2,
        max_load: 30.0,
        power_off_command: format!("touch {}/off-{{host}}", marks.display()),
        power_on_command: format!("touch {}/on-{{host}}", marks.display()),
        idle_watts: 150.0,
    };
    // Bad settings are refused, naming the field.
    for (field, bad) in [
        (
            "headroom",
            PowerSaving {
                headroom: 1.5,
                ..settings.clone()
            },
        ),
        (
            "max_load",
            PowerSaving {
                max_load: 0.0,
                ..settings.clone()
            },
        ),
        (
            "power_on_command",
            PowerSaving {
                power_on_command: " ".into(),
                ..settings.clone()
            },
        ),
        (
            "idle_watts",
            PowerSaving {
                idle_watts: -1.0,
                ..settings.clone()
            },
        ),
    ] {
        let err = c.zone_power_saving_set("green", &bad).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::InvalidInput), "{field}");
        assert!(err.to_string().contains(field), "{err}");
    }
    assert!(c.zone("green").await.unwrap().power_saving.is_none());
    let seq = last_seq(&c).await;
    let zone = c.zone_power_saving_set("green", &settings).await.unwrap();
    assert_eq!(zone.power_saving.as_ref(), Some(&settings));

    // 24 GiB of VMs fit on two hosts keeping 20% free: four go to standby.
    let status = wait_until(Duration::from_secs(40), "four hosts in standby", || async {
        let s = c.zone_power_saving("green").await.ok()?;
        let off = (1..=6)
            .filter(|i| marks.join(format!("off-g-{i}")).exists())
            .count();
        // The command's mark appears before the controller records that
        // it ran (standby_since).
        let recorded = c
            .hosts()
            .await
            .ok()?
            .iter()
            .all(|h| h.state != HostState::Standby || h.standby_since.is_some());
        (s.standby.len() == 4 && off == 4 && recorded && s.draining.is_empty()).then_some(s)
    })
    .await
    .unwrap();
    assert!(status.free_memory_share >= 0.2, "{status:?}");
    let hosts = c.hosts().await.unwrap();
    assert_capacity(&hosts);
    for h in &hosts {
        if h.zone == "z1" {
            assert_eq!(h.state, HostState::Ready, "{} touched", h.name);
            assert_eq!(h.vm_count, 0);
        } else if h.state == HostState::Ready {
            // The receiving hosts keep their headroom.
            assert!(
                h.allocated.memory_mib as f64 <= h.capacity.memory_mib as f64 * 0.8,
                "{} holds {} MiB",
                h.name,
                h.allocated.memory_mib
            );
        } else {
            assert_eq!(h.state, HostState::Standby, "{}", h.name);
            assert_eq!(h.vm_count, 0);
            assert!(h.standby_since.is_some());
            assert!(marks.join(format!("off-{}", h.name)).exists());
        }
    }
    let vms = c.vms().await.unwrap();
    assert!(vms
        .iter()
        .all(|v| v.state == VmState::Running && v.zone == "green"));
    let events = events_after(&c, seq).await;
    assert_eq!(
        events.iter().filter(|e| e.kind == "power.standby").count(),
        4
    );
    // Energy adds up while they are off.
    let energy = wait_until(Duration::from_secs(5), "energy saved", || async {
        let s = c.zone_power_saving("green").await.ok()?;
        (s.energy_saved_wh > 0.0).then_some(s.energy_saved_wh)
    })
    .await
    .unwrap();
    let standby_host = c.host(&status.standby[0]).await.unwrap();
    assert!(standby_host.energy_saved_wh > 0.0);
    assert!(energy >= standby_host.energy_saved_wh);

    // Demand rises: VMs in the zone until one is refused or the free
    // memory falls below the headroom; then one host is switched on.
    let seq = last_seq(&c).await;
    let switched_on = || {
        (1..=6)
            .map(|i| format!("g-{i}"))
            .find(|h| marks.join(format!("on-{h}")).exists())
    };
    for i in 1.. {
        if switched_on().is_some() {
            break;
        }
        let more = CreateVm {
            zone: Some("green".into()),
            memory_mib: 4096,
            ..vm_request(&format!("more-{i}"), "tiny")
        };
        if let Err(e) = c.vm_create(&more).await {
            assert_eq!(e.code(), Some(ErrorCode::NoValidHost), "{e}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let on = wait_until(Duration::from_secs(10), "a host switched on", || async {
        switched_on()
    })
    .await
    .unwrap();
    let events = events_after(&c, seq).await;
    let powered: Vec<&Event> = events.iter().filter(|e| e.kind == "power.on").collect();
    assert_eq!(powered.len(), 1, "{powered:?}");
    assert_eq!(powered[0].resource, format!("host/{on}"));
    assert!(powered[0].message.contains("switched on: "), "{powered:?}");
    kumo_testkit::wait_host_ready(&c, &on).await.unwrap();
    let host = c.host(&on).await.unwrap();
    assert!(host.standby_since.is_none());
    assert!(host.energy_saved_wh > 0.0, "energy kept after standby");
    // The new host takes VMs; the others stay off.
    c.vm_create(&CreateVm {
        zone: Some("green".into()),
        memory_mib: 4096,
        ..vm_request("after-on", "tiny")
    })
    .await
    .unwrap();
    let s = c.zone_power_saving("green").await.unwrap();
    assert_eq!(s.standby.len(), 3, "{s:?}");
    assert!(s.energy_saved_wh >= energy);

    // Off: every standby host is switched on.
    c.zone_power_saving_off("green").await.unwrap();
    let s = c.zone_power_saving("green").await.unwrap();
    assert!(s.settings.is_none() && s.standby.is_empty(), "{s:?}");
    let ons = (1..=6)
        .filter(|i| marks.join(format!("on-g-{i}")).exists())
        .count();
    assert_eq!(ons, 4);
}
