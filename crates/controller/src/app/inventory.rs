//! The in-memory inventory reads are served from, its indexes, and the
//! batch of store writes a change commits. Below the per-resource files and
//! above [`super::records`].

use super::records::{self, HostMode, HostRecord, TokenRecord};
use crate::error::Result;
use kumo_api::{
    Event, Group, HostLoad, HostState, Image, MigrationProgress, MigrationReason, Millis,
    Resources, Vm, Zone,
};
use kumo_store::{Op, Store};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Instant;
use uuid::Uuid;

/// Everything the controller knows, in memory.
#[derive(Debug, Default)]
pub struct Inventory {
    pub zones: BTreeMap<String, Zone>,
    pub hosts: BTreeMap<String, HostEntry>,
    pub images: BTreeMap<String, Image>,
    pub groups: BTreeMap<String, Group>,
    /// Changed only through [`Inventory::put_vm`] and
    /// [`Inventory::remove_vm`], which keep the indexes below in step.
    vms: BTreeMap<String, Vm>,
    /// Each host's VMs and their summed size, so per-host questions
    /// (allocation, heartbeats, desired state) never scan every VM.
    placed: HashMap<Uuid, Placed>,
    vm_names: HashMap<Uuid, String>,
    /// VMs with a migration under way, so the passes that run every tick
    /// never scan every VM.
    migrating: BTreeSet<String>,
    /// The scheduler's view, kept in step with `hosts` and `vms`.
    pub cluster: kumo_sched::Cluster,
    pub join_tokens: BTreeMap<Uuid, TokenRecord>,
    /// Host name by SHA-256 of its bearer token.
    pub host_tokens: HashMap<String, String>,
    pub last_event: u64,
    /// The newest events, served by the API; the store keeps them all.
    pub recent_events: VecDeque<Event>,
}

/// How many of the newest events the API serves.
pub const RECENT_EVENTS: usize = 10_000;

#[derive(Debug, Default)]
pub struct Placed {
    names: BTreeSet<String>,
    /// VMs migrating to the host (their room is reserved here too).
    incoming: BTreeSet<String>,
    allocated: Resources,
}

/// The scheduler's key for the room a migrating VM holds on its target.
pub fn migration_key(vm: &str) -> String {
    format!("{vm} (migrating)")
}

impl Inventory {
    pub fn vms(&self) -> &BTreeMap<String, Vm> {
        &self.vms
    }

    pub fn put_vm(&mut self, vm: Vm) {
        self.remove_vm(&vm.name);
        if let Err(e) = self.cluster.add(
            &vm.name,
            &vm.host,
            vm.size,
            vm.cores.clone(),
            vm.groups.clone(),
        ) {
            tracing::error!(vm = %vm.name, error = %e, "VM does not fit the scheduler's view of its host");
        }
        let placed = self.placed.entry(vm.host_id).or_default();
        placed.names.insert(vm.name.clone());
        placed.allocated = placed.allocated.add(&vm.size);
        if let Some(m) = &vm.migration {
            if let Err(e) = self.cluster.add(
                &migration_key(&vm.name),
                &m.target,
                vm.size,
                m.target_cores.clone(),
                vm.groups.clone(),
            ) {
                tracing::error!(vm = %vm.name, error = %e, "migration reservation does not fit its target");
            }
            let target = self.placed.entry(m.target_id).or_default();
            target.incoming.insert(vm.name.clone());
            target.allocated = target.allocated.add(&vm.size);
            self.migrating.insert(vm.name.clone());
        }
        self.vm_names.insert(vm.id, vm.name.clone());
        self.vms.insert(vm.name.clone(), vm);
    }

    pub fn remove_vm(&mut self, name: &str) -> Option<Vm> {
        let vm = self.vms.remove(name)?;
        self.cluster.release(name);
        if let Some(placed) = self.placed.get_mut(&vm.host_id) {
            placed.names.remove(name);
            placed.allocated = placed.allocated.saturating_sub(&vm.size);
        }
        if let Some(m) = &vm.migration {
            self.migrating.remove(name);
            self.cluster.release(&migration_key(name));
            if let Some(target) = self.placed.get_mut(&m.target_id) {
                target.incoming.remove(name);
                target.allocated = target.allocated.saturating_sub(&vm.size);
            }
        }
        self.vm_names.remove(&vm.id);
        Some(vm)
    }

    /// The VMs placed on a host.
    pub fn vms_on(&self, host: Uuid) -> impl Iterator<Item = &Vm> {
        self.placed
            .get(&host)
            .into_iter()
            .flat_map(|p| p.names.iter())
            .filter_map(|name| self.vms.get(name))
    }

    /// The VMs with a migration under way.
    pub fn vms_migrating(&self) -> impl Iterator<Item = &Vm> {
        self.migrating.iter().filter_map(|name| self.vms.get(name))
    }

    /// The VMs migrating to a host.
    pub fn vms_incoming(&self, host: Uuid) -> impl Iterator<Item = &Vm> {
        self.placed
            .get(&host)
            .into_iter()
            .flat_map(|p| p.incoming.iter())
            .filter_map(|name| self.vms.get(name))
    }

    /// Sum of the sizes of the VMs on a host (and migrating to it), and how
    /// many there are.
    pub fn allocated(&self, host: Uuid) -> (Resources, u32) {
        self.placed
            .get(&host)
            .map_or((Resources::default(), 0), |p| {
                (p.allocated, (p.names.len() + p.incoming.len()) as u32)
            })
    }

    /// Record a guest's measured CPU use (kept in memory only).
    pub fn set_cpu_percent(&mut self, id: Uuid, cpu: Option<f32>) {
        if let Some(vm) = self.vm_names.get(&id).and_then(|n| self.vms.get_mut(n)) {
            vm.cpu_percent = cpu;
        }
    }

    pub fn vm_name(&self, id: Uuid) -> Option<&str> {
        self.vm_names.get(&id).map(String::as_str)
    }

    /// Record a migration's transfer figures (kept in memory only).
    pub fn set_migration_progress(&mut self, name: &str, progress: MigrationProgress) {
        if let Some(m) = self.vms.get_mut(name).and_then(|v| v.migration.as_mut()) {
            m.progress = Some(progress);
        }
    }

    /// Tell the scheduler what is now known of a host (or that it is gone).
    pub fn sync_host(&mut self, name: &str) {
        match self.hosts.get(name) {
            Some(h) => self.cluster.upsert_host(h.sched_info()),
            None => {
                if let Err(e) = self.cluster.remove_host(name) {
                    tracing::error!(host = %name, error = %e, "removing a host from the scheduler");
                }
            }
        }
    }

    /// Install a host's record as committed, and tell the scheduler.
    pub fn set_host_record(&mut self, rec: HostRecord) {
        let name = rec.name.clone();
        self.hosts.get_mut(&name).expect("host present").rec = rec;
        self.sync_host(&name);
    }

    pub fn host_by_id(&self, id: Uuid) -> Option<&HostEntry> {
        self.hosts.values().find(|h| h.rec.id == id)
    }
}

/// A set of store writes and events that commit together.
#[derive(Default)]
pub struct Batch {
    pub(super) ops: Vec<Op>,
    /// Numbered and timed at commit.
    pub(super) events: Vec<Event>,
}

impl Batch {
    pub fn put<T: Serialize>(&mut self, key: String, value: &T) {
        let value = serde_json::to_vec(value).expect("records serialize");
        self.ops.push(Op::Put { key, value });
    }

    pub fn delete(&mut self, key: String) {
        self.ops.push(Op::Delete { key });
    }

    pub fn event(&mut self, kind: &str, resource: String, project: &str, message: String) {
        self.events.push(Event {
            seq: 0,
            time: 0,
            kind: kind.to_string(),
            resource,
            project: project.to_string(),
            message,
            migration_reason: None,
        });
    }

    /// An event of a VM's migration, carrying why it moves.
    pub fn migration_event(
        &mut self,
        kind: &str,
        vm: &Vm,
        reason: &MigrationReason,
        message: String,
    ) {
        self.event(kind, format!("vm/{}", vm.name), &vm.project, message);
        if let Some(e) = self.events.last_mut() {
            e.migration_reason = Some(reason.clone());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.events.is_empty()
    }
}

/// What is known of a host only while the controller runs.
#[derive(Clone, Debug)]
pub struct HostLive {
    pub last_seen: Instant,
    pub last_heartbeat: Option<Millis>,
    pub load: Option<HostLoad>,
    pub applied_generation: u64,
    pub down: bool,
    /// Since when the load has stayed above the rebalancing threshold.
    pub overloaded_since: Option<Instant>,
    /// When power saving switched the host on, until it reports.
    pub waking_since: Option<Instant>,
}

#[derive(Clone, Debug)]
pub struct HostEntry {
    pub rec: HostRecord,
    pub live: HostLive,
}

impl HostEntry {
    pub fn new(rec: HostRecord) -> Self {
        HostEntry {
            rec,
            live: HostLive {
                last_seen: Instant::now(),
                last_heartbeat: None,
                load: None,
                applied_generation: 0,
                down: false,
                overloaded_since: None,
                waking_since: None,
            },
        }
    }

    /// `down` shows through the operator's modes (a silent host is news
    /// either way), except `standby`, where silence is the point.
    pub fn state(&self) -> HostState {
        match self.rec.mode {
            HostMode::Standby => HostState::Standby,
            _ if self.live.down => HostState::Down,
            _ if self.rec.joining => HostState::Joining,
            HostMode::Active => HostState::Ready,
            HostMode::Disabled => HostState::Disabled,
            HostMode::Draining => HostState::Draining,
            HostMode::Maintenance => HostState::Maintenance,
        }
    }
}

impl HostEntry {
    /// The state the host's requests are judged by (see
    /// [`super::transitions`]): its state, except that a down host draining
    /// or in maintenance is judged by that (hosts are often switched off
    /// for maintenance).
    pub fn row(&self) -> HostState {
        match (self.state(), self.rec.mode) {
            (HostState::Down, HostMode::Draining) => HostState::Draining,
            (HostState::Down, HostMode::Maintenance) => HostState::Maintenance,
            (state, _) => state,
        }
    }

    /// The host as the scheduler sees it.
    pub fn sched_info(&self) -> kumo_sched::HostInfo {
        kumo_sched::HostInfo {
            name: self.rec.name.clone(),
            zone: self.rec.zone.clone(),
            capacity: self.rec.capacity,
            cpu_overcommit: self.rec.cpu_overcommit,
            memory_overcommit: self.rec.memory_overcommit,
            cpu_model: self.rec.cpu_model.clone(),
            accel: self.rec.hypervisor.accel.clone(),
            labels: self.rec.labels.clone(),
            schedulable: self.state() == HostState::Ready,
            load: self.live.load.map_or(0.0, |l| f64::from(l.cpu_percent)),
        }
    }
}

/// Load everything the store holds into a fresh inventory.
pub(super) async fn load(store: &dyn Store) -> anyhow::Result<Inventory> {
    fn decode<T: serde::de::DeserializeOwned>(kv: &kumo_store::KeyValue) -> anyhow::Result<T> {
        serde_json::from_slice(&kv.value).map_err(|e| anyhow::anyhow!("record {}: {e}", kv.key))
    }
    let mut inv = Inventory::default();
    for kv in store.range(records::ZONES).await? {
        let z: Zone = decode(&kv)?;
        inv.zones.insert(z.name.clone(), z);
    }
    for kv in store.range(records::HOSTS).await? {
        let rec: HostRecord = decode(&kv)?;
        inv.host_tokens
            .insert(rec.token_sha256.clone(), rec.name.clone());
        let name = rec.name.clone();
        inv.hosts.insert(name.clone(), HostEntry::new(rec));
        inv.sync_host(&name);
    }
    for kv in store.range(records::IMAGES).await? {
        let i: Image = decode(&kv)?;
        inv.images.insert(i.name.clone(), i);
    }
    for kv in store.range(records::GROUPS).await? {
        let g: Group = decode(&kv)?;
        inv.groups.insert(g.name.clone(), g);
    }
    for kv in store.range(records::VMS).await? {
        let vm =
            records::decode_vm(&kv.value).map_err(|e| anyhow::anyhow!("record {}: {e}", kv.key))?;
        inv.put_vm(Vm {
            cpu_percent: None,
            ..vm
        });
    }
    for kv in store.range(records::JOIN_TOKENS).await? {
        let t: TokenRecord = decode(&kv)?;
        inv.join_tokens.insert(t.token.id, t);
    }
    let events = store.range(records::EVENTS).await?;
    for kv in &events[events.len().saturating_sub(RECENT_EVENTS)..] {
        inv.recent_events.push_back(decode(kv)?);
    }
    inv.last_event = inv.recent_events.back().map_or(0, |e| e.seq);
    Ok(inv)
}

/// The VM's host record with its generation bumped, put into the batch.
pub(crate) fn bump_generation(
    inv: &Inventory,
    host_id: Uuid,
    batch: &mut Batch,
) -> Result<HostRecord> {
    let entry = inv.host_by_id(host_id).ok_or_else(|| {
        crate::Error::internal(format!("VM host {host_id} missing from inventory"))
    })?;
    let rec = HostRecord {
        generation: entry.rec.generation + 1,
        ..entry.rec.clone()
    };
    batch.put(records::host_key(&rec.name), &rec);
    Ok(rec)
}

/// A resource by the name in the request's path, or a `not_found` error
/// naming its kind.
pub(crate) fn lookup<'a, T>(map: &'a BTreeMap<String, T>, kind: &str, name: &str) -> Result<&'a T> {
    map.get(name)
        .ok_or_else(|| kumo_api::ApiError::not_found("name", kind, name).into())
}
