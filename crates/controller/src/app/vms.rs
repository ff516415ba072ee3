//! Virtual machines.
//!
//! The controller keeps each VM's *desired* power state and reboot count and
//! derives the state users see from what the VM's one host reports:
//!
//! ```text
//!                create
//!                  |
//!                  v            host reports running
//!   +-------->  starting ---------------------------+
//!   |              |  QEMU failed                   v
//!   |              +-----------> failed          running <------+
//!   |   start                      |  start        |  |  |       | reset done
//!   |   (from stopped;             +--> starting   |  |  | reboot|
//!   |    from failed it                            |  |  +--> rebooting
//!   |    is a retry)                          stop |  |
//!   |                                              v  | guest powered
//!   |                                        stopping | itself off
//!   |                        ACPI shutdown, or hard |  |
//!   |                        stop after the timeout v  v
//!   +---------------------------------------------- stopped
//!
//!   any state --delete--> deleting --host confirms it is gone--> (removed)
//!   any state --host down--> unknown --host back--> derived again
//!   running --migrate--> migrating --done, failed or cancelled--> running
//! ```
//!
//! A guest that powers itself off is taken at its word: its desired power
//! becomes stopped. A start after a failure bumps the reboot count, which
//! tells the host to try again; reports older than that count are ignored.
//!
//! A VM lives on exactly one host; only a completed live migration (see
//! [`super::migrations`]) moves it. The host's desired state (bumped
//! generation) is committed in the same store transaction as the VM, so a
//! controller killed in between loses nothing.

use super::pages::{List, Pager};
use super::transitions::{self, VmRequest};
use super::{bump_generation, lookup, now_ms, App, Batch, Inventory};
use crate::error::Result;
use kumo_api::{
    validate_name, ApiError, CapacityQuery, CapacityReport, ConsoleLog, CpuPolicy, CreateVm,
    ErrorCode, ObservedState, PowerState, Resources, Vm, VmListQuery, VmState, VmStatus,
    DEFAULT_PROJECT,
};
use uuid::Uuid;

/// The largest root disk; `CreateVm::disk_gib`'s schema says the same.
const MAX_DISK_GIB: u64 = 64 * 1024;
const GIB: u64 = 1024 * 1024 * 1024;

/// A placement refusal, naming the request field behind the constraint
/// that came closest to fitting (the nearest miss), or the one that
/// excluded the most hosts.
fn no_valid_host(refusal: &kumo_sched::Refusal) -> ApiError {
    use kumo_sched::Constraint;
    let constraint = refusal.near_miss.as_ref().map(|(_, c)| *c).or_else(|| {
        refusal
            .excluded
            .iter()
            .max_by_key(|(_, n)| *n)
            .map(|(c, _)| *c)
    });
    let field = match constraint {
        Some(Constraint::Zone) => "zone",
        Some(Constraint::Requirements) => "requirements",
        Some(Constraint::AntiAffinity | Constraint::Affinity) => "groups",
        Some(Constraint::DedicatedCores) => "cpu_policy",
        Some(Constraint::Vcpus) => "vcpus",
        Some(Constraint::Memory) => "memory_mib",
        Some(Constraint::Disk) => "disk_gib",
        Some(Constraint::NotSchedulable | Constraint::CurrentHost | Constraint::CpuModel)
        | None => "name",
    };
    ApiError::new(ErrorCode::NoValidHost, field, refusal.to_string())
}

fn check_range(field: &str, value: u64, min: u64, max: u64, unit: &str) -> Result<()> {
    if value < min || value > max {
        return Err(ApiError::invalid(
            field,
            format!("{value} is out of range: use {min} to {max}{unit}"),
        )
        .into());
    }
    Ok(())
}

/// Metadata: what its schema cannot say (how many pairs and how long is
/// checked against the API document): printable keys, and
/// `sim.cpu_percent` a number.
fn check_metadata(metadata: &std::collections::BTreeMap<String, String>) -> Result<()> {
    if let Some(k) = metadata.keys().find(|k| k.chars().any(char::is_control)) {
        return Err(
            ApiError::invalid("metadata", format!("key {k:?}: use printable characters")).into(),
        );
    }
    if let Some(v) = metadata.get("sim.cpu_percent") {
        if !v.parse::<f32>().is_ok_and(|c| c.is_finite() && c >= 0.0) {
            return Err(ApiError::invalid(
                "metadata.sim.cpu_percent",
                format!("{v:?} is not a CPU use: give a number of percent of one CPU, at least 0"),
            )
            .into());
        }
    }
    Ok(())
}

/// A scheduler request from the API's fields, each checked: the zone must
/// exist and the requirement expression parse.
fn sched_request(
    inv: &Inventory,
    size: Resources,
    cpu_policy: CpuPolicy,
    zone: &Option<String>,
    requirements: &Option<String>,
) -> Result<kumo_sched::Request> {
    if let Some(zone) = zone {
        inv.check_zone("zone", zone)?;
    }
    Ok(kumo_sched::Request {
        size,
        cpu_policy,
        zone: zone.clone(),
        requirements: parse_expr("requirements", requirements)?,
        ..Default::default()
    })
}

/// An expression field, parsed; a malformed one is refused with the
/// position of the error in it.
fn parse_expr(field: &str, src: &Option<String>) -> Result<Option<kumo_sched::expr::Expr>> {
    src.as_deref()
        .map(|src| {
            kumo_sched::parse_host_expr(src)
                .map_err(|e| ApiError::invalid(field, format!("{e}\n{}", e.pointer(src))).into())
        })
        .transpose()
}

/// The state users see, from the desired power state and the host's report.
pub(super) fn derive_state(vm: &Vm, status: Option<&VmStatus>) -> (VmState, Option<String>) {
    let (state, message) = derive_power_state(vm, status);
    if state == VmState::Running && vm.migration.is_some() {
        return (VmState::Migrating, message);
    }
    (state, message)
}

fn derive_power_state(vm: &Vm, status: Option<&VmStatus>) -> (VmState, Option<String>) {
    if vm.state == VmState::Deleting {
        return (VmState::Deleting, None);
    }
    let Some(status) = status else {
        let state = match vm.power {
            PowerState::Running => VmState::Starting,
            PowerState::Stopped => VmState::Stopped,
        };
        return (state, None);
    };
    // A report older than the last reboot (or retry) asked for.
    let behind = status.reboots < vm.reboots;
    match vm.power {
        PowerState::Running => match status.state {
            ObservedState::Running if behind => (VmState::Rebooting, None),
            // The guest that just migrated in, before the host has taken
            // it as its own: it runs.
            ObservedState::Running | ObservedState::Incoming => (VmState::Running, None),
            ObservedState::Failed if !behind => (VmState::Failed, status.message.clone()),
            _ => (VmState::Starting, None),
        },
        PowerState::Stopped => match status.state {
            ObservedState::Running | ObservedState::Stopping | ObservedState::Starting => {
                (VmState::Stopping, None)
            }
            // A stopped guest that just moved here never runs.
            ObservedState::Stopped | ObservedState::Failed | ObservedState::Incoming => {
                (VmState::Stopped, None)
            }
        },
    }
}

impl App {
    /// A page of the VMs matching the query, as the JSON of a
    /// [`kumo_api::VmList`], written straight from the inventory: with tens
    /// of thousands of VMs, copying them first would double the time the
    /// read lock is held. Paging as in [`super::pages`]. Errors: a page
    /// token that is not this query's (invalid input naming `page_token`).
    pub async fn vm_list_json(&self, q: &VmListQuery) -> Result<Vec<u8>> {
        let filters = (&q.state, &q.host, &q.zone, &q.name);
        let pager = Pager::new(List::Vms, q.limit, q.page_token.as_deref(), &filters)?;
        let inv = self.inv.read().await;
        let (items, next) = pager.page(inv.vms(), q.name.as_deref(), |vm| {
            let keep = q.state.is_none_or(|s| s == vm.state)
                && q.host.as_ref().is_none_or(|h| *h == vm.host)
                && q.zone.as_ref().is_none_or(|z| *z == vm.zone);
            keep.then_some(vm)
        });
        #[derive(serde::Serialize)]
        struct Page<'a> {
            items: Vec<&'a Vm>,
            #[serde(skip_serializing_if = "Option::is_none")]
            next: Option<String>,
        }
        Ok(serde_json::to_vec(&Page { items, next }).expect("VMs serialize"))
    }

    pub async fn vm_get(&self, name: &str) -> Result<Vm> {
        Ok(lookup(self.inv.read().await.vms(), "vm", name)?.clone())
    }

    pub async fn vm_create(&self, req: CreateVm) -> Result<Vm> {
        validate_name("name", &req.name)?;
        check_metadata(&req.metadata)?;
        let mut inv = self.inv.write().await;
        if inv.vms().contains_key(&req.name) {
            return Err(ApiError::already_exists("VM", &req.name).into());
        }
        let image = inv
            .images
            .values()
            .find(|i| i.name == req.image || i.id.to_string() == req.image)
            .cloned()
            .ok_or_else(|| {
                let known: Vec<_> = inv.images.keys().cloned().collect();
                ApiError::invalid(
                    "image",
                    format!("unknown image {:?}; known images: {known:?}", req.image),
                )
            })?;
        let min_disk = image.virtual_size_bytes.div_ceil(GIB).max(1);
        if min_disk > MAX_DISK_GIB {
            return Err(ApiError::invalid(
                "image",
                format!("image {:?} needs a {min_disk} GiB disk, more than the largest allowed ({MAX_DISK_GIB} GiB)", image.name),
            )
            .into());
        }
        let disk_gib = req.disk_gib.unwrap_or(min_disk);
        check_range(
            "disk_gib",
            disk_gib,
            min_disk,
            MAX_DISK_GIB,
            " GiB (the image needs at least its virtual size)",
        )?;
        let size = Resources {
            vcpus: req.vcpus,
            memory_mib: req.memory_mib,
            disk_gib,
        };
        let cpu_policy = req.cpu_policy.unwrap_or_default();
        let request = sched_request(&inv, size, cpu_policy, &req.zone, &req.requirements)?;
        let request = kumo_sched::Request {
            policy: req.policy.unwrap_or_default(),
            groups: inv.group_rules(&req.groups)?,
            rank: parse_expr("rank", &req.rank)?,
            ..request
        };
        let placement = match inv.cluster.place(&req.name, &request) {
            Ok(p) => p,
            Err(refusal) => {
                // Power saving may switch a standby host on for this.
                let refusal = no_valid_host(&refusal);
                return Err(self
                    .placement_refused(&inv, &req.name, &request, refusal)
                    .into());
            }
        };
        let host = inv.hosts[&placement.host].rec.clone();
        let start = req.start.unwrap_or(true);
        let vm = Vm {
            id: Uuid::new_v4(),
            name: req.name,
            project: DEFAULT_PROJECT.to_string(),
            image: image.name.clone(),
            image_id: image.id,
            size,
            zone: host.zone.clone(),
            host: host.name.clone(),
            host_id: host.id,
            state: if start {
                VmState::Starting
            } else {
                VmState::Stopped
            },
            power: if start {
                PowerState::Running
            } else {
                PowerState::Stopped
            },
            reboots: 0,
            cpu_percent: None,
            message: None,
            cpu_policy,
            cores: placement.cores,
            requirements: req.requirements,
            rank: req.rank,
            groups: req.groups,
            migration: None,
            last_migration: None,
            evacuated_from: None,
            metadata: req.metadata,
            created_at: now_ms(),
        };
        let mut batch = Batch::default();
        batch.put_vm(vm.clone());
        if let Err(e) = bump_generation(&inv, host.id, &mut batch) {
            inv.cluster.release(&vm.name);
            return Err(e);
        }
        batch.event(
            "vm.created",
            format!("vm/{}", vm.name),
            &vm.project,
            format!(
                "placed on host {} (zone {}) from image {}",
                host.name, host.zone, image.name
            ),
        );
        if let Err(e) = self.commit(&mut inv, batch).await {
            // The placement's reservation, if the commit did not take it over.
            inv.cluster.release(&vm.name);
            return Err(e);
        }
        Ok(vm)
    }

    /// Change a VM's desired state and bump its host's generation, if its
    /// state accepts the request (see [`transitions`]).
    async fn vm_change(
        &self,
        name: &str,
        request: VmRequest,
        change: impl FnOnce(&mut Vm),
    ) -> Result<Vm> {
        let mut inv = self.inv.write().await;
        let mut vm = lookup(inv.vms(), "vm", name)?.clone();
        transitions::check_vm(&vm, request)?;
        change(&mut vm);
        let verb = request.verb();
        let mut batch = Batch::default();
        batch.put_vm(vm.clone());
        bump_generation(&inv, vm.host_id, &mut batch)?;
        batch.event(
            &format!("vm.{verb}"),
            format!("vm/{name}"),
            &vm.project,
            format!("{verb} requested"),
        );
        self.commit(&mut inv, batch).await?;
        Ok(vm)
    }

    /// Start a stopped VM, or retry a failed one (its reboot count tells
    /// the host to try again).
    pub async fn vm_start(&self, name: &str) -> Result<Vm> {
        self.vm_change(name, VmRequest::Start, |vm| {
            match vm.power {
                PowerState::Running => vm.reboots += 1,
                PowerState::Stopped => vm.power = PowerState::Running,
            }
            vm.state = VmState::Starting;
            vm.message = None;
        })
        .await
    }

    pub async fn vm_stop(&self, name: &str) -> Result<Vm> {
        self.vm_change(name, VmRequest::Stop, |vm| {
            vm.power = PowerState::Stopped;
            vm.state = VmState::Stopping;
        })
        .await
    }

    pub async fn vm_reboot(&self, name: &str) -> Result<Vm> {
        self.vm_change(name, VmRequest::Reboot, |vm| {
            vm.reboots += 1;
            vm.state = VmState::Rebooting;
        })
        .await
    }

    pub async fn vm_delete(&self, name: &str) -> Result<Vm> {
        self.vm_change(name, VmRequest::Delete, |vm| {
            vm.state = VmState::Deleting;
            vm.message = None;
        })
        .await
    }

    /// How many more VMs of a shape fit now, and what runs out first.
    pub async fn capacity(&self, q: &CapacityQuery) -> Result<CapacityReport> {
        let disk_gib = q.disk_gib.unwrap_or(1);
        let inv = self.inv.read().await;
        let size = Resources {
            vcpus: q.vcpus,
            memory_mib: q.memory_mib,
            disk_gib,
        };
        let request = sched_request(
            &inv,
            size,
            q.cpu_policy.unwrap_or_default(),
            &q.zone,
            &q.requirements,
        )?;
        let c = inv.cluster.capacity(&request);
        Ok(CapacityReport {
            fits: c.fits,
            limited_by: c.limited_by.map(|l| l.key().to_string()),
            hosts: c.hosts,
        })
    }

    /// What the guest has written to its serial console so far.
    pub async fn vm_console_log(&self, name: &str) -> Result<ConsoleLog> {
        let (vm, address, secret) = self.vm_agent(name).await?;
        let url = format!("{address}/v1/vms/{}/console/log", vm.id);
        let resp = self
            .agent_http
            .get(&url)
            .bearer_auth(secret)
            .timeout(std::time::Duration::from_secs(10))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| {
                ApiError::server(
                    ErrorCode::HostUnavailable,
                    format!("host {}: console log: {}", vm.host, crate::error::Chain(&e)),
                )
            })?;
        let text = resp.text().await.map_err(|e| {
            ApiError::server(
                ErrorCode::HostUnavailable,
                format!("host {}: console log: {}", vm.host, crate::error::Chain(&e)),
            )
        })?;
        Ok(ConsoleLog { vm: vm.name, text })
    }

    /// The VM, its host's agent address and the secret to call it with;
    /// a conflict for a VM on a simulated host, which has no console.
    pub async fn vm_agent(&self, name: &str) -> Result<(Vm, String, String)> {
        let inv = self.inv.read().await;
        let vm = lookup(inv.vms(), "vm", name)?.clone();
        transitions::check_vm(&vm, VmRequest::Console)?;
        let host = inv
            .host_by_id(vm.host_id)
            .ok_or_else(|| crate::Error::internal(format!("host of VM {name} missing")))?;
        if host.rec.hypervisor.driver == "sim" {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                "name",
                format!(
                    "VM {name:?} runs on simulated host {}, which has no console",
                    host.rec.name
                ),
            )
            .into());
        }
        Ok((vm, host.rec.address.clone(), host.rec.agent_secret.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kumo_api::Resources;

    fn vm(power: PowerState, reboots: u64) -> Vm {
        Vm {
            id: Uuid::nil(),
            name: "a".into(),
            project: DEFAULT_PROJECT.into(),
            image: "i".into(),
            image_id: Uuid::nil(),
            size: Resources::default(),
            zone: "z".into(),
            host: "h".into(),
            host_id: Uuid::nil(),
            state: VmState::Starting,
            power,
            reboots,
            cpu_percent: None,
            message: None,
            cpu_policy: Default::default(),
            cores: Vec::new(),
            requirements: None,
            rank: None,
            groups: Vec::new(),
            migration: None,
            last_migration: None,
            evacuated_from: None,
            metadata: Default::default(),
            created_at: 0,
        }
    }

    fn report(state: ObservedState, reboots: u64) -> VmStatus {
        VmStatus {
            id: Uuid::nil(),
            state,
            reboots,
            cpu_percent: None,
            message: Some("boom".into()),
            migration: None,
        }
    }

    #[test]
    fn states_follow_wishes_and_reports() {
        use ObservedState as O;
        use PowerState::{Running, Stopped};
        let cases = [
            (vm(Running, 0), None, VmState::Starting),
            (vm(Stopped, 0), None, VmState::Stopped),
            (
                vm(Running, 0),
                Some(report(O::Running, 0)),
                VmState::Running,
            ),
            (
                vm(Running, 1),
                Some(report(O::Running, 0)),
                VmState::Rebooting,
            ),
            (vm(Running, 0), Some(report(O::Failed, 0)), VmState::Failed),
            // A start retried after a failure: the old failure is stale.
            (
                vm(Running, 1),
                Some(report(O::Failed, 0)),
                VmState::Starting,
            ),
            (
                vm(Stopped, 0),
                Some(report(O::Running, 0)),
                VmState::Stopping,
            ),
            (vm(Stopped, 0), Some(report(O::Failed, 0)), VmState::Stopped),
            (
                vm(Stopped, 0),
                Some(report(O::Incoming, 0)),
                VmState::Stopped,
            ),
            (
                vm(Running, 0),
                Some(report(O::Incoming, 0)),
                VmState::Running,
            ),
        ];
        for (vm, status, want) in cases {
            let (got, _) = derive_state(&vm, status.as_ref());
            assert_eq!(got, want, "{:?} {:?}", vm.power, status.map(|s| s.state));
        }
        let deleting = Vm {
            state: VmState::Deleting,
            ..vm(Running, 0)
        };
        assert_eq!(derive_state(&deleting, None).0, VmState::Deleting);
    }
}
