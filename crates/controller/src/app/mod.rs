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
pub mod ingest;
pub mod inventory;
pub mod join_tokens;
pub mod machine;
pub mod migrations;
pub mod overlaps;
pub mod pages;
pub mod passes;
pub mod power;
pub mod rebalance;
pub mod records;
#[cfg(test)]
pub(crate) mod testing;
pub mod transitions;
pub mod vms;
pub mod zones;

use crate::error::Result;
use crate::Config;
use kumo_api::{Event, Millis};
use kumo_store::{SqliteStore, Store};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, RwLock};
use uuid::Uuid;

pub(crate) use inventory::{bump_generation, lookup, migration_key};
pub use inventory::{Batch, HostEntry, HostLive, Inventory, RECENT_EVENTS};
pub use records::{HostRecord, TokenRecord};

pub struct App {
    store: Arc<dyn Store>,
    pub(crate) inv: RwLock<Inventory>,
    data_dir: PathBuf,
    admin_token: String,
    pub down_after: Duration,
    /// The sequence number of the newest committed event, for readers
    /// following the event log.
    event_committed: watch::Sender<u64>,
    /// Per host: the latest desired-state generation, for agents waiting on it.
    generations: Mutex<HashMap<Uuid, watch::Sender<u64>>>,
    /// Calls to agents (console).
    pub(crate) agent_http: reqwest::Client,
    background: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    pub rebalance: passes::RebalanceSettings,
    rebalance_report: passes::RebalanceReport,
    /// How often power saving looks at its zones.
    pub power_period: Duration,
    power: passes::PowerSaver,
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
        let inv = inventory::load(store.as_ref()).await?;
        remove_orphan_images(&images, &inv);
        let generations = inv
            .hosts
            .values()
            .map(|h| (h.rec.id, watch::channel(h.rec.generation).0))
            .collect();
        let event_committed = watch::channel(inv.last_event).0;
        Ok(Arc::new(App {
            store,
            event_committed,
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
            rebalance_report: passes::RebalanceReport::new(&config.rebalance),
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

    /// Commit a batch, the one path by which changes enter the store and
    /// the inventory together. The batch's VM changes are applied to the
    /// inventory first: if the scheduler's cluster (the allocation ledger)
    /// refuses one, nothing is written and the error is returned. Then the
    /// store transaction; if it fails, the VM changes are undone. Then the
    /// host records are installed and their generations published. Events
    /// get their sequence numbers here, and the inventory's event counter
    /// moves only if the store took the batch.
    pub(crate) async fn commit(&self, inv: &mut Inventory, mut batch: Batch) -> Result<Vec<Event>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut seq = inv.last_event;
        let time = now_ms();
        let events: Vec<Event> = batch
            .events
            .drain(..)
            .map(|e| {
                seq += 1;
                Event { seq, time, ..e }
            })
            .collect();
        for e in &events {
            batch.put(records::event_key(e.seq), e);
        }
        let undo = inv.apply_vm_changes(std::mem::take(&mut batch.vms))?;
        if let Err(e) = self.store.txn(Vec::new(), batch.ops, Vec::new()).await {
            inv.undo_vm_changes(undo);
            return Err(e.into());
        }
        for e in &events {
            tracing::info!(kind = %e.kind, resource = %e.resource, "{}", e.message);
        }
        for rec in batch.hosts {
            let (id, generation) = (rec.id, rec.generation);
            inv.install_host(rec);
            self.publish_generation(id, generation);
        }
        inv.last_event = seq;
        for e in &events {
            if inv.recent_events.len() == RECENT_EVENTS {
                inv.recent_events.pop_front();
            }
            inv.recent_events.push_back(e.clone());
        }
        if !events.is_empty() {
            self.event_committed.send_replace(seq);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A VM the allocation ledger refuses aborts the whole change: nothing
    /// reaches the store or the inventory, events included.
    #[tokio::test]
    async fn a_refused_vm_aborts_the_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config::new(dir.path().join("c"), "127.0.0.1:0".parse().expect("addr"));
        let app = App::open(&config).await.expect("open");
        let vm: kumo_api::Vm = serde_json::from_value(serde_json::json!({
            "id": Uuid::nil(), "name": "a", "project": "default", "image": "tiny",
            "image_id": Uuid::nil(), "size": {"vcpus": 1, "memory_mib": 256, "disk_gib": 1},
            "zone": "z1", "host": "nowhere", "host_id": Uuid::nil(), "state": "running",
            "power": "running", "reboots": 0, "cpu_policy": "shared", "created_at": 0,
        }))
        .expect("VM");
        let mut inv = app.inv.write().await;
        let mut batch = Batch::default();
        batch.put_vm(vm);
        batch.event("vm.created", "vm/a".into(), "default", "placed".into());
        let err = app.commit(&mut inv, batch).await.expect_err("refused");
        assert!(matches!(err, crate::Error::Ledger(_)), "{err}");
        assert!(inv.vms().is_empty());
        assert_eq!(inv.last_event, 0);
        assert!(inv.recent_events.is_empty());
        assert!(app.store.range("").await.expect("range").is_empty());
    }
}
