//! The in-memory inventory reads are served from, its indexes, and the
//! batch of store writes a change commits. Below the per-resource files and
//! above [`super::records`].

use super::records::{self, HostMode, HostRecord, TokenRecord};
use crate::error::Result;
use kumo_api::{
    Event, Group, HostLoad, HostState, Image, MigrationProgress, MigrationReason, Millis,
    Resources, Vm, Zone,
};
use kumo_store::{Op, Order, Store};
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

/// A host's VMs by name: an index only; what they hold is counted by the
/// scheduler's cluster alone ([`Inventory::allocated`]).
#[derive(Debug, Default)]
pub struct Placed {
    names: BTreeSet<String>,
    /// VMs migrating to the host (their room is reserved here too).
    incoming: BTreeSet<String>,
}

/// The scheduler's key for the room a migrating VM holds on its target.
pub fn migration_key(vm: &str) -> String {
    format!("{vm} (migrating)")
}

/// A VM the scheduler's cluster (the allocation ledger) cannot take as
/// recorded: its host is unknown to it, or a core it names is taken. A
/// bug or a corrupt record, never a user's mistake; the change that
/// carried it is refused whole.
#[derive(Debug, thiserror::Error)]
#[error("the allocation ledger refuses VM {vm}: {reason}")]
pub struct LedgerRefusal {
    pub vm: String,
    /// The scheduler's words.
    pub reason: String,
}

impl Inventory {
    pub fn vms(&self) -> &BTreeMap<String, Vm> {
        &self.vms
    }

    /// Install a VM as recorded (replacing the VM of its name): the
    /// scheduler's cluster takes what it holds on its host and, while it
    /// migrates, the room reserved on the target. If the cluster refuses,
    /// nothing changes and the refusal is returned.
    pub fn put_vm(&mut self, vm: Vm) -> Result<(), LedgerRefusal> {
        let previous = self.remove_vm(&vm.name);
        if let Err(refusal) = self.insert_vm(vm) {
            if let Some(p) = previous {
                // It was there a moment ago, as it is now: it fits again.
                self.insert_vm(p)
                    .expect("a VM just removed fits where it was");
            }
            return Err(refusal);
        }
        Ok(())
    }

    fn insert_vm(&mut self, vm: Vm) -> Result<(), LedgerRefusal> {
        let refusal = |reason: String| LedgerRefusal {
            vm: vm.name.clone(),
            reason,
        };
        self.cluster
            .add(
                &vm.name,
                &vm.host,
                vm.size,
                vm.cores.clone(),
                vm.groups.clone(),
            )
            .map_err(refusal)?;
        if let Some(m) = &vm.migration {
            let added = self.cluster.add(
                &migration_key(&vm.name),
                &m.target,
                vm.size,
                m.target_cores.clone(),
                vm.groups.clone(),
            );
            if let Err(e) = added {
                self.cluster.release(&vm.name);
                return Err(refusal(format!("its migration's reservation: {e}")));
            }
            let target = self.placed.entry(m.target_id).or_default();
            target.incoming.insert(vm.name.clone());
            self.migrating.insert(vm.name.clone());
        }
        let placed = self.placed.entry(vm.host_id).or_default();
        placed.names.insert(vm.name.clone());
        self.vm_names.insert(vm.id, vm.name.clone());
        self.vms.insert(vm.name.clone(), vm);
        Ok(())
    }

    pub fn remove_vm(&mut self, name: &str) -> Option<Vm> {
        let vm = self.vms.remove(name)?;
        self.cluster.release(name);
        if let Some(placed) = self.placed.get_mut(&vm.host_id) {
            placed.names.remove(name);
        }
        if let Some(m) = &vm.migration {
            self.migrating.remove(name);
            self.cluster.release(&migration_key(name));
            if let Some(target) = self.placed.get_mut(&m.target_id) {
                target.incoming.remove(name);
            }
        }
        self.vm_names.remove(&vm.id);
        Some(vm)
    }

    /// Apply a batch's VM changes in order; if the ledger refuses one,
    /// undo those applied and return the refusal (nothing changed).
    pub(super) fn apply_vm_changes(
        &mut self,
        changes: Vec<VmChange>,
    ) -> Result<Vec<(String, Option<Vm>)>, LedgerRefusal> {
        let mut undo = Vec::with_capacity(changes.len());
        for change in changes {
            let (name, applied) = match change {
                VmChange::Put(vm) => {
                    let name = vm.name.clone();
                    let previous = self.vms.get(&name).cloned();
                    (name, self.put_vm(*vm).map(|()| previous))
                }
                VmChange::Remove(name) => {
                    let previous = self.remove_vm(&name);
                    (name, Ok(previous))
                }
            };
            match applied {
                Ok(previous) => undo.push((name, previous)),
                Err(refusal) => {
                    self.undo_vm_changes(undo);
                    return Err(refusal);
                }
            }
        }
        Ok(undo)
    }

    /// Put back the VMs as they were before [`Inventory::apply_vm_changes`].
    pub(super) fn undo_vm_changes(&mut self, undo: Vec<(String, Option<Vm>)>) {
        for (name, previous) in undo.into_iter().rev() {
            self.remove_vm(&name);
            if let Some(p) = previous {
                self.insert_vm(p).expect("a VM fits where it was");
            }
        }
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

    /// What a host holds (the VMs on it and the room reserved for VMs
    /// migrating to it), and how many, as the scheduler's cluster counts it.
    pub fn allocated(&self, host: &str) -> (Resources, u32) {
        self.cluster
            .allocated(host)
            .unwrap_or((Resources::default(), 0))
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
    pub(super) fn sync_host(&mut self, name: &str) {
        match self.hosts.get(name) {
            Some(h) => self.cluster.upsert_host(h.sched_info()),
            None => {
                if let Err(e) = self.cluster.remove_host(name) {
                    tracing::error!(host = %name, error = %e, "removing a host from the scheduler");
                }
            }
        }
    }

    /// Install a host's record as committed (a new host, or a new version
    /// of one), and tell the scheduler. The one way a host record enters
    /// the inventory; [`super::App::commit`] calls it for every record a
    /// batch puts.
    pub(super) fn install_host(&mut self, rec: HostRecord) {
        let name = rec.name.clone();
        match self.hosts.get_mut(&name) {
            Some(entry) => entry.rec = rec,
            None => {
                self.hosts.insert(name.clone(), HostEntry::new(rec));
            }
        }
        self.sync_host(&name);
    }

    pub fn host_by_id(&self, id: Uuid) -> Option<&HostEntry> {
        self.hosts.values().find(|h| h.rec.id == id)
    }
}

/// A change to the inventory's VMs a batch carries.
pub(super) enum VmChange {
    Put(Box<Vm>),
    Remove(String),
}

/// A set of store writes and events that commit together, with the
/// inventory changes they stand for ([`super::App::commit`]).
#[derive(Default)]
pub struct Batch {
    pub(super) ops: Vec<Op>,
    /// Numbered and timed at commit.
    pub(super) events: Vec<Event>,
    /// Applied to the inventory before the store commit (a refusal stops
    /// it), undone if the store refuses.
    pub(super) vms: Vec<VmChange>,
    /// Installed once the store took the batch.
    pub(super) hosts: Vec<HostRecord>,
}

impl Batch {
    /// Store a VM and install it in the inventory.
    pub fn put_vm(&mut self, vm: Vm) {
        self.put(records::vm_key(&vm.name), &records::VmRecord::from_vm(&vm));
        self.vms.push(VmChange::Put(Box::new(vm)));
    }

    /// Delete a VM from the store and the inventory.
    pub fn remove_vm(&mut self, name: &str) {
        self.delete(records::vm_key(name));
        self.vms.push(VmChange::Remove(name.to_string()));
    }

    /// Store a host's record and install it in the inventory
    /// ([`Inventory::install_host`]).
    pub fn put_host(&mut self, mut rec: HostRecord) {
        rec.version = records::HOST_RECORD_VERSION;
        self.put(records::host_key(&rec.name), &rec);
        self.hosts.push(rec);
    }

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
            },
        }
    }

    /// `down` shows through the operator's modes (a silent host is news
    /// either way), except `standby`, where silence is the point.
    pub fn state(&self) -> HostState {
        match self.rec.mode {
            HostMode::Standby => HostState::Standby,
            _ if self.live.down => HostState::Down,
            HostMode::Active => HostState::Ready,
            HostMode::Disabled => HostState::Disabled,
            HostMode::Draining => HostState::Draining,
            HostMode::Maintenance => HostState::Maintenance,
        }
    }
}

impl HostEntry {
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
        inv.install_host(rec);
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
        let rec = records::VmRecord::decode(&kv.value)
            .map_err(|e| anyhow::anyhow!("record {}: {e}", kv.key))?;
        inv.put_vm(rec.into_vm())
            .map_err(|e| anyhow::anyhow!("record {}: {e}", kv.key))?;
    }
    for kv in store.range(records::JOIN_TOKENS).await? {
        let t: TokenRecord = decode(&kv)?;
        inv.join_tokens.insert(t.token.id, t);
    }
    inv.load_recent_events(store).await?;
    Ok(inv)
}

impl Inventory {
    /// Load the newest [`RECENT_EVENTS`] from the store (one bounded read:
    /// a start does not read the whole log).
    async fn load_recent_events(&mut self, store: &dyn Store) -> Result<()> {
        let newest = store
            .range_page(records::EVENTS, None, RECENT_EVENTS, Order::Descending)
            .await?;
        for kv in newest.iter().rev() {
            self.recent_events.push_back(kv.json()?);
        }
        self.last_event = self.recent_events.back().map_or(0, |e| e.seq);
        Ok(())
    }
}

/// The VM's host record with its generation bumped, put into the batch.
pub(crate) fn bump_generation(inv: &Inventory, host_id: Uuid, batch: &mut Batch) -> Result<()> {
    let entry = inv.host_by_id(host_id).ok_or_else(|| {
        crate::Error::internal(format!("VM host {host_id} missing from inventory"))
    })?;
    batch.put_host(HostRecord {
        generation: entry.rec.generation + 1,
        ..entry.rec.clone()
    });
    Ok(())
}

/// A resource by the name in the request's path, or a `not_found` error
/// naming its kind.
pub(crate) fn lookup<'a, T>(map: &'a BTreeMap<String, T>, kind: &str, name: &str) -> Result<&'a T> {
    map.get(name)
        .ok_or_else(|| kumo_api::ApiError::not_found("name", kind, name).into())
}
