//! First-fit placement on ready hosts, with refusals that say which
//! constraint excluded how many hosts.

use super::Inventory;
use kumo_api::{HostState, Resources};

/// Pick the first ready host (by name) in `zone` (any zone if `None`) with
/// room for `size`, or explain why none qualifies.
pub fn first_fit(inv: &Inventory, size: &Resources, zone: Option<&str>) -> Result<String, String> {
    let mut excluded = [0usize; 5];
    const WHY: [&str; 5] = [
        "not ready (down or disabled)",
        "in another zone",
        "too few free vCPUs",
        "too little free memory",
        "too little free disk",
    ];
    for h in inv.hosts.values() {
        if h.state() != HostState::Ready {
            excluded[0] += 1;
            continue;
        }
        if zone.is_some_and(|z| z != h.rec.zone) {
            excluded[1] += 1;
            continue;
        }
        let free = h.rec.capacity.saturating_sub(&inv.allocated(h.rec.id).0);
        if size.vcpus > free.vcpus {
            excluded[2] += 1;
        } else if size.memory_mib > free.memory_mib {
            excluded[3] += 1;
        } else if size.disk_gib > free.disk_gib {
            excluded[4] += 1;
        } else {
            return Ok(h.rec.name.clone());
        }
    }
    let reasons: Vec<String> = excluded
        .iter()
        .zip(WHY)
        .filter(|(n, _)| **n > 0)
        .map(|(n, why)| format!("{n} {why}"))
        .collect();
    Err(format!(
        "no host can take {} vCPUs, {} MiB, {} GiB: {} host(s) in the pool{}{}",
        size.vcpus,
        size.memory_mib,
        size.disk_gib,
        inv.hosts.len(),
        if reasons.is_empty() {
            ""
        } else {
            "; excluded: "
        },
        reasons.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::{HostEntry, HostRecord};
    use kumo_api::{HypervisorInfo, PowerState, Vm, VmState};
    use proptest::prelude::*;
    use uuid::Uuid;

    fn res(vcpus: u32, memory_mib: u64, disk_gib: u64) -> Resources {
        Resources {
            vcpus,
            memory_mib,
            disk_gib,
        }
    }

    /// A pool of hosts (capacity, zone 0 or 1, ready / disabled / down)
    /// with some VMs already placed on them.
    fn pool() -> impl Strategy<Value = Inventory> {
        let host = (
            1u32..8,
            1u64..8,
            1u64..8,
            0u8..2,
            0u8..3,
            proptest::collection::vec((1u32..4, 1u64..4, 1u64..4), 0..3),
        );
        proptest::collection::vec(host, 0..6).prop_map(|hosts| {
            let mut inv = Inventory::default();
            for (i, (c, m, d, zone, state, vms)) in hosts.into_iter().enumerate() {
                let rec = HostRecord {
                    id: Uuid::new_v4(),
                    name: format!("h{i}"),
                    project: "default".into(),
                    zone: format!("z{zone}"),
                    address: String::new(),
                    capacity: res(c, m * 1024, d),
                    hypervisor: HypervisorInfo::default(),
                    enabled: state != 1,
                    generation: 1,
                    token_sha256: String::new(),
                    agent_secret: String::new(),
                    created_at: 0,
                };
                let mut entry = HostEntry::new(rec);
                entry.live.down = state == 2;
                for (j, (vc, vm, vd)) in vms.into_iter().enumerate() {
                    inv.put_vm(Vm {
                        id: Uuid::new_v4(),
                        name: format!("v{i}-{j}"),
                        project: "default".into(),
                        image: "i".into(),
                        image_id: Uuid::nil(),
                        size: res(vc, vm * 1024, vd),
                        zone: entry.rec.zone.clone(),
                        host: entry.rec.name.clone(),
                        host_id: entry.rec.id,
                        state: VmState::Running,
                        power: PowerState::Running,
                        reboots: 0,
                        cpu_percent: None,
                        message: None,
                        created_at: 0,
                    });
                }
                inv.hosts.insert(entry.rec.name.clone(), entry);
            }
            inv
        })
    }

    fn fits(inv: &Inventory, h: &HostEntry, size: &Resources, zone: Option<&str>) -> bool {
        let free = h.rec.capacity.saturating_sub(&inv.allocated(h.rec.id).0);
        h.state() == HostState::Ready
            && zone.is_none_or(|z| z == h.rec.zone)
            && size.vcpus <= free.vcpus
            && size.memory_mib <= free.memory_mib
            && size.disk_gib <= free.disk_gib
    }

    proptest! {
        /// A placement always fits every constraint, and a refusal happens
        /// only when no host could take the VM (checked against every host).
        #[test]
        fn placement_fits_and_refuses_only_when_nothing_fits(
            inv in pool(),
            (c, m, d) in (1u32..6, 1u64..6, 1u64..6),
            zone in proptest::option::of(0u8..2),
        ) {
            let size = res(c, m * 1024, d);
            let zone = zone.map(|z| format!("z{z}"));
            match first_fit(&inv, &size, zone.as_deref()) {
                Ok(name) => prop_assert!(fits(&inv, &inv.hosts[&name], &size, zone.as_deref())),
                Err(why) => {
                    prop_assert!(!inv.hosts.values().any(|h| fits(&inv, h, &size, zone.as_deref())));
                    let counted: usize = why
                        .split("excluded: ")
                        .nth(1)
                        .map_or(0, |list| list.split(", ").map(|p| p.split(' ').next().unwrap().parse::<usize>().unwrap()).sum());
                    prop_assert_eq!(counted, inv.hosts.len(), "every host is accounted for: {}", why);
                }
            }
        }
    }
}
