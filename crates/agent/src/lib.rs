//! `kumo-agent`: one per host. It joins the pool, reports capacity, load and
//! the state of its guests, and converges its guests to the desired state
//! the controller sends (whole, stamped with a generation, persisted in a
//! ledger file before anything is acted on).
//!
//! Guests are not owned by the agent: QEMU runs detached, so a restarted
//! agent re-attaches to running guests over QMP instead of restarting them.

mod controller;
mod driver;
mod http;
mod ledger;
mod metrics;
mod vm;

use anyhow::Context;
use kumo_api::DesiredState;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use uuid::Uuid;

pub use driver::images::ImageStore;
pub use driver::qemu::live_pid as qemu_pid;
pub use driver::qemu::{DiskFiles, Launch, MachineSpec};
pub use driver::{Accel, DriverKind, Guest, Hypervisor, Outgoing, Probed};

#[derive(Clone, Debug)]
pub struct Config {
    pub controller: String,
    pub join_token: Option<String>,
    pub name: String,
    pub zone: String,
    /// Holds the identity, the ledger, the image cache and one directory per VM.
    pub data_dir: PathBuf,
    /// Where the agent's own endpoint (console) listens; none for simulated
    /// hosts run by the thousand.
    pub listen: Option<SocketAddr>,
    /// The address the controller should use to reach `listen` (defaults to it).
    pub advertise: Option<String>,
    pub driver: DriverKind,
    /// QEMU acceleration: try KVM and fall back to TCG, or force one.
    pub accel: Accel,
    /// Override measured capacity (e.g. to share one machine between agents).
    pub capacity: CapacityOverride,
    /// Attributes for requirement expressions (`labels.ssd`).
    pub labels: std::collections::BTreeMap<String, String>,
    pub heartbeat: Duration,
    /// Learn of new desired states at once through a long poll (one open
    /// connection per host), or only from heartbeat answers (for thousands
    /// of simulated hosts in one process).
    pub long_poll: bool,
    /// How long an ACPI shutdown may take before the guest is stopped hard.
    pub stop_timeout: Duration,
    /// A datastore shared with other hosts (e.g. an NFS mount at the same
    /// path on each): disks live there, so migrations between hosts that
    /// share it copy no disk.
    pub datastore: Option<Datastore>,
}

#[derive(Clone, Debug)]
pub struct Datastore {
    /// The same name on every host that mounts it.
    pub name: String,
    pub path: PathBuf,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct CapacityOverride {
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub disk_gib: Option<u64>,
}

/// Shared between the agent's tasks.
pub(crate) struct Shared {
    pub config: Config,
    pub driver: Box<dyn driver::Hypervisor>,
    pub controller: Arc<controller::Controller>,
    pub agent_secret: String,
    pub vms: Mutex<HashMap<Uuid, vm::VmHandle>>,
    pub applied: Mutex<DesiredState>,
    /// Send a heartbeat now (a migration step other hosts wait for).
    pub report_now: tokio::sync::Notify,
}

/// An error and its sources, `outer: inner: innermost`, for logs (what
/// `{:#}` prints of an `anyhow::Error`, for typed errors).
pub(crate) struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

/// A running agent; dropping it stops its tasks (guests keep running).
pub struct Agent {
    pub host_id: Uuid,
    /// Where the agent's own endpoint listens, if it has one.
    pub addr: Option<SocketAddr>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Create the data dir and its `vms/` owner-only, and tighten what an older
/// version made 0755 and 0644: once the data dir is 0700, nothing under it
/// (guests' consoles and sockets, the image cache) is in anyone else's reach.
fn make_data_dir_private(dir: &Path) -> Result<(), kumo_private_fs::Error> {
    use kumo_private_fs::{DIR_MODE, FILE_MODE};
    let vms = dir.join("vms");
    kumo_private_fs::tighten(&[
        (dir, DIR_MODE),
        (&vms, DIR_MODE),
        (&dir.join(controller::IDENTITY), FILE_MODE),
        (&dir.join(ledger::FILE), FILE_MODE),
    ])?;
    kumo_private_fs::create_dir(&vms)
}

/// Start an agent: join (or re-join), re-attach to guests from the ledger,
/// then follow the controller.
pub async fn start(config: Config) -> anyhow::Result<Agent> {
    make_data_dir_private(&config.data_dir)?;
    let probed = driver::Probed::probe(
        config.driver,
        config.accel,
        &config.data_dir,
        config.datastore.as_ref().map(|d| d.path.as_path()),
    )
    .await?;
    let capacity = metrics::capacity(&config.data_dir, config.capacity)?;
    let listener = match config.listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?,
        ),
        None => None,
    };
    let addr = listener.as_ref().map(|l| l.local_addr()).transpose()?;
    let address = match (&config.advertise, addr) {
        (Some(a), _) => a.clone(),
        (None, Some(addr)) => format!("http://{addr}"),
        // No endpoint (simulated hosts): nothing to reach.
        (None, None) => String::new(),
    };
    let (controller, agent_secret) =
        controller::Controller::connect(&config, &address, capacity, probed.info()).await?;
    let controller = Arc::new(controller);
    let host_id = controller.host_id();
    let ledger = ledger::load(&config.data_dir).await?;
    // Guests migrating in are received on the address the controller
    // reaches the agent at.
    let migration_ip = reqwest::Url::parse(&address)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_else(|| "127.0.0.1".into());
    let image_dir = match &config.datastore {
        Some(ds) => ds.path.join("images"),
        None => config.data_dir.join("images"),
    };
    let images =
        driver::images::ImageCache::new(image_dir, config.name.clone(), controller.clone());
    let driver = probed.into_driver(Arc::new(images), migration_ip);
    let shared = Arc::new(Shared {
        config,
        driver,
        controller,
        agent_secret,
        vms: Mutex::new(HashMap::new()),
        applied: Mutex::new(DesiredState::default()),
        report_now: tokio::sync::Notify::new(),
    });
    vm::remove_orphans(&shared, ledger.as_ref()).await;
    if let Some(desired) = ledger {
        vm::apply(&shared, desired).await;
    }
    let mut tasks = vec![tokio::spawn(controller::heartbeats(shared.clone()))];
    if shared.config.long_poll {
        tasks.push(tokio::spawn(controller::follow_desired(shared.clone())));
    }
    if let Some(listener) = listener {
        tasks.push(tokio::spawn(http::serve(shared.clone(), listener)));
    }
    tracing::info!(%host_id, %address, "agent running");
    Ok(Agent {
        host_id,
        addr,
        tasks,
    })
}
