//! The paged, filtered lists (`GET /v1/vms`, `GET /v1/hosts`) against a real
//! controller with simulated hosts.

use kumo_api::{HostListQuery, HostState, Vm, VmListQuery, VmState};
use kumo_testkit::{blank_image, vm_request, SimCloud};
use std::collections::BTreeSet;
use std::time::Duration;

const VMS: usize = 200;

/// `vm-000` ... in zones z1 and z2 by turns, every fourth created stopped.
async fn cloud() -> SimCloud {
    let mut cloud = SimCloud::start(Duration::from_secs(5)).await.unwrap();
    let capacity = kumo_agent::CapacityOverride {
        vcpus: Some(256),
        memory_mib: Some(256 * 1024),
        disk_gib: Some(10_000),
    };
    for (prefix, zone) in [("a", "z1"), ("b", "z2")] {
        cloud.zone(zone).await.unwrap();
        cloud
            .sim_hosts(prefix, zone, 2, Duration::from_millis(200), Some(capacity))
            .await
            .unwrap();
    }
    let img = blank_image(cloud.dir.path());
    cloud.client.image_import("tiny", &img).await.unwrap();
    for i in 0..VMS {
        let mut req = vm_request(&format!("vm-{i:03}"), "tiny");
        req.zone = Some(if i % 2 == 0 { "z1" } else { "z2" }.into());
        req.start = Some(i % 4 != 3);
        cloud.client.vm_create(&req).await.unwrap();
    }
    cloud
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paged_walk_sees_every_vm_once_while_vms_come_and_go() {
    let cloud = cloud().await;
    let churn = {
        let client = cloud.client.clone();
        tokio::spawn(async move {
            for i in 0..60 {
                client
                    .vm_create(&vm_request(&format!("new-{i:03}"), "tiny"))
                    .await
                    .unwrap();
                // Deleted from all over the name order, also behind the walk.
                client
                    .vm_delete(&format!("vm-{:03}", i * 3 + 1))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let mut seen = Vec::new();
    let mut q = VmListQuery {
        limit: Some(7),
        ..Default::default()
    };
    loop {
        let page = cloud.client.vm_page(&q).await.unwrap();
        assert!(page.items.len() <= 7);
        seen.extend(page.items.into_iter().map(|v| v.name));
        match page.next {
            Some(next) => q.page_token = Some(next),
            None => break,
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    churn.await.unwrap();

    let unique: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "a VM twice in one walk");
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "pages are in name order"
    );
    let touched = |i: usize| i % 3 == 1 && i / 3 < 60;
    for i in (0..VMS).filter(|&i| !touched(i)) {
        let name = format!("vm-{i:03}");
        assert!(unique.contains(&name), "{name} untouched but not listed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_pick_what_they_say_in_one_answer_and_in_pages() {
    let cloud = cloud().await;
    let c = &cloud.client;
    let all = c.vms().await.unwrap();
    assert_eq!(all.len(), VMS);
    // Names: states and CPU figures move on between calls, these filters'
    // fields do not (a stopped VM stays stopped).
    let names = |vms: Vec<Vm>| -> Vec<String> { vms.into_iter().map(|v| v.name).collect() };
    let pick = |keep: &dyn Fn(&Vm) -> bool| -> Vec<String> {
        all.iter()
            .filter(|v| keep(v))
            .map(|v| v.name.clone())
            .collect()
    };
    let stopped = VmListQuery {
        state: Some(VmState::Stopped),
        ..Default::default()
    };
    let on_b1 = VmListQuery {
        host: Some("b-1".into()),
        ..Default::default()
    };
    let z1_named_vm_1 = VmListQuery {
        zone: Some("z1".into()),
        name: Some("vm-1".into()),
        ..Default::default()
    };
    for (q, want) in [
        (&stopped, pick(&|v| v.state == VmState::Stopped)),
        (&on_b1, pick(&|v| v.host == "b-1")),
        (
            &z1_named_vm_1,
            pick(&|v| v.zone == "z1" && v.name.starts_with("vm-1")),
        ),
    ] {
        assert!(!want.is_empty(), "{q:?} picks something");
        assert!(want.len() < all.len(), "{q:?} leaves something out");
        assert_eq!(names(c.vms_where(q).await.unwrap()), want, "{q:?}");
        // The same in small pages.
        let mut paged = Vec::new();
        let mut q = VmListQuery {
            limit: Some(9),
            ..q.clone()
        };
        loop {
            let page = c.vm_page(&q).await.unwrap();
            paged.extend(names(page.items));
            match page.next {
                Some(next) => q.page_token = Some(next),
                None => break,
            }
        }
        assert_eq!(paged, want);
    }

    let in_z2 = HostListQuery {
        zone: Some("z2".into()),
        ..Default::default()
    };
    let host_names =
        |hosts: Vec<kumo_api::Host>| -> Vec<String> { hosts.into_iter().map(|h| h.name).collect() };
    assert_eq!(
        host_names(c.hosts_where(&in_z2).await.unwrap()),
        ["b-1", "b-2"]
    );
    let a = HostListQuery {
        name: Some("a-".into()),
        state: Some(HostState::Ready),
        ..Default::default()
    };
    assert_eq!(host_names(c.hosts_where(&a).await.unwrap()), ["a-1", "a-2"]);
    let down = HostListQuery {
        state: Some(HostState::Down),
        ..Default::default()
    };
    assert_eq!(
        host_names(c.hosts_where(&down).await.unwrap()),
        Vec::<String>::new()
    );
}
