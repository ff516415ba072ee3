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
