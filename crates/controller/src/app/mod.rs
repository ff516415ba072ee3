//! The application layer: every operation on kumo's resources, over an
//! in-memory inventory that is written through to the store.
//!
//! All writes hold the inventory's write lock across the store transaction,
//! so the store and the inventory change together or not at all; reads take
//! the read lock and never touch the store. On start the inventory is loaded
//! from the store, so a controller killed at any moment comes back with every
//! host and VM it had committed.

pub mod drains;
pub mod events;
pub mod groups;
pub mod hosts;
pub mod images;
pub mod join_tokens;
pub mod migrations;
pub mod power;
pub mod rebalance;
#[cfg(test)]
pub(crate) mod testing;
pub mod transitions;
pub mod vms;
pub mod zones;

use crate::error::Result;
use crate::Config;
use kumo_api::{Event, Group, Image, MigrationProgress, Millis, Resources, Vm, Zone};
use kumo_store::{Op, SqliteStore, Store};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, RwLock};
use uuid::Uuid;

pub use hosts::{HostEntry, HostRecord};
pub use join_tokens::TokenRecord;

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
    ops: Vec<Op>,
    events: Vec<(String, String, String, String)>,
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
        self.events
            .push((kind.to_string(), resource, project.to_string(), message));
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.events.is_empty()
    }
}

pub struct App {
    store: Arc<dyn Store>,
    pub(crate) inv: RwLock<Inventory>,
    data_dir: PathBuf,
    admin_token: String,
    pub down_after: Duration,
    /// Per host: the latest desired-state generation, for agents waiting on it.
    generations: Mutex<HashMap<Uuid, watch::Sender<u64>>>,
    /// Calls to agents (console).
    pub(crate) agent_http: reqwest::Client,
    background: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    pub rebalance: rebalance::RebalanceSettings,
    rebalance_report: rebalance::RebalanceReport,
    /// How often power saving looks at its zones.
    pub power_period: Duration,
    power: power::PowerSaver,
}

pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn random_secret() -> String {
    hex::encode(rand::random::<[u8; 24]>())
}

pub fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

impl App {
    pub async fn open(config: &Config) -> anyhow::Result<Arc<App>> {
        use kumo_private_fs::{DIR_MODE, FILE_MODE};
        let images = config.data_dir.join("images");
        let token_path = config.data_dir.join("admin-token");
        // Older versions made these 0755 and 0644; the store sees to its own files.
        kumo_private_fs::tighten(&[
            (&config.data_dir, DIR_MODE),
            (&images, DIR_MODE),
            (&token_path, FILE_MODE),
        ])?;
        kumo_private_fs::create_dir(&images)?;
        let admin_token = load_or_create_admin_token(&token_path)?;
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&config.data_dir.join("state.db"))?);
        let inv = load_inventory(store.as_ref()).await?;
        remove_orphan_images(&images, &inv);
        let generations = inv
            .hosts
            .values()
            .map(|h| (h.rec.id, watch::channel(h.rec.generation).0))
            .collect();
        Ok(Arc::new(App {
            store,
            inv: RwLock::new(inv),
            data_dir: config.data_dir.clone(),
            admin_token,
            down_after: config.down_after,
            generations: Mutex::new(generations),
            agent_http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(3))
                .build()?,
            background: Mutex::new(Vec::new()),
            rebalance: config.rebalance.clone(),
            rebalance_report: rebalance::RebalanceReport::new(&config.rebalance),
            power_period: config.power_period,
            power: Default::default(),
        }))
    }

    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub(crate) fn add_background(&self, task: tokio::task::JoinHandle<()>) {
        self.background.lock().expect("lock").push(task);
    }

    pub(crate) fn stop_background(&self) {
        for t in self.background.lock().expect("lock").drain(..) {
            t.abort();
        }
    }

    /// Commit a batch: events get their sequence numbers here, and the
    /// inventory's event counter moves only if the store took the batch.
    pub(crate) async fn commit(&self, inv: &mut Inventory, mut batch: Batch) -> Result<Vec<Event>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut seq = inv.last_event;
        let time = now_ms();
        let events: Vec<Event> = batch
            .events
            .drain(..)
            .map(|(kind, resource, project, message)| {
                seq += 1;
                Event {
                    seq,
                    time,
                    kind,
                    resource,
                    project,
                    message,
                }
            })
            .collect();
        for e in &events {
            tracing::info!(kind = %e.kind, resource = %e.resource, "{}", e.message);
            batch.put(events::key(e.seq), e);
        }
        self.store.txn(Vec::new(), batch.ops, Vec::new()).await?;
        inv.last_event = seq;
        for e in &events {
            if inv.recent_events.len() == RECENT_EVENTS {
                inv.recent_events.pop_front();
            }
            inv.recent_events.push_back(e.clone());
        }
        Ok(events)
    }

    pub(crate) fn publish_generation(&self, host: Uuid, generation: u64) {
        let mut map = self.generations.lock().expect("lock");
        map.entry(host)
            .or_insert_with(|| watch::channel(generation).0)
            .send_replace(generation);
    }

    pub(crate) fn watch_generation(&self, host: Uuid) -> watch::Receiver<u64> {
        let mut map = self.generations.lock().expect("lock");
        map.entry(host)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }
}

fn load_or_create_admin_token(path: &Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let token = random_secret();
    kumo_private_fs::write_file(path, format!("{token}\n").as_bytes())?;
    Ok(token)
}

/// Image files no image record names: uploads cut short, or an import
/// killed between placing the file and committing the record.
fn remove_orphan_images(dir: &Path, inv: &Inventory) {
    let known: BTreeSet<String> = inv.images.values().map(|i| i.id.to_string()).collect();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !known.contains(&name) {
            tracing::info!(file = %name, "removing an image file no image owns");
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

async fn load_inventory(store: &dyn Store) -> anyhow::Result<Inventory> {
    fn decode<T: serde::de::DeserializeOwned>(kv: &kumo_store::KeyValue) -> anyhow::Result<T> {
        serde_json::from_slice(&kv.value).map_err(|e| anyhow::anyhow!("record {}: {e}", kv.key))
    }
    let mut inv = Inventory::default();
    for kv in store.range(zones::PREFIX).await? {
        let z: Zone = decode(&kv)?;
        inv.zones.insert(z.name.clone(), z);
    }
    for kv in store.range(hosts::PREFIX).await? {
        let rec: HostRecord = decode(&kv)?;
        inv.host_tokens
            .insert(rec.token_sha256.clone(), rec.name.clone());
        let name = rec.name.clone();
        inv.hosts.insert(name.clone(), HostEntry::new(rec));
        inv.sync_host(&name);
    }
    for kv in store.range(images::PREFIX).await? {
        let i: Image = decode(&kv)?;
        inv.images.insert(i.name.clone(), i);
    }
    for kv in store.range(groups::PREFIX).await? {
        let g: Group = decode(&kv)?;
        inv.groups.insert(g.name.clone(), g);
    }
    for kv in store.range(vms::PREFIX).await? {
        inv.put_vm(Vm {
            cpu_percent: None,
            ..decode(&kv)?
        });
    }
    for kv in store.range(join_tokens::PREFIX).await? {
        let t: TokenRecord = decode(&kv)?;
        inv.join_tokens.insert(t.token.id, t);
    }
    let events = store.range(events::PREFIX).await?;
    for kv in &events[events.len().saturating_sub(RECENT_EVENTS)..] {
        inv.recent_events.push_back(decode(kv)?);
    }
    inv.last_event = inv.recent_events.back().map_or(0, |e| e.seq);
    Ok(inv)
}

/// A resource by the name in the request's path, or a `not_found` error
/// naming its kind.
pub(crate) fn lookup<'a, T>(map: &'a BTreeMap<String, T>, kind: &str, name: &str) -> Result<&'a T> {
    map.get(name)
        .ok_or_else(|| kumo_api::ApiError::not_found("name", kind, name).into())
}
