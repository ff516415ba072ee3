//! The resources served under `/v1`.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

/// The controller's answer to `GET /v1/health`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok` while the controller serves requests.
    pub status: String,
}

/// Milliseconds since the Unix epoch.
pub type Millis = u64;

/// CPU, memory and disk: a host's capacity, what is allocated on it, or a
/// VM's size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

impl Resources {
    pub fn saturating_sub(&self, other: &Resources) -> Resources {
        Resources {
            vcpus: self.vcpus.saturating_sub(other.vcpus),
            memory_mib: self.memory_mib.saturating_sub(other.memory_mib),
            disk_gib: self.disk_gib.saturating_sub(other.disk_gib),
        }
    }

    pub fn add(&self, other: &Resources) -> Resources {
        Resources {
            vcpus: self.vcpus + other.vcpus,
            memory_mib: self.memory_mib + other.memory_mib,
            disk_gib: self.disk_gib + other.disk_gib,
        }
    }
}

/// An availability zone: a site, a campus, a rack — hosts that fail together.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Zone {
    pub id: Uuid,
    pub name: String,
    pub project: String,
    pub description: String,
    pub created_at: Millis,
    /// Power-saving consolidation of the zone's hosts, when turned on
    /// (`PUT /v1/zones/{name}/power-saving`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_saving: Option<PowerSaving>,
}

/// Power saving for a zone: lightly loaded hosts are emptied by live
/// migration and switched off (`standby`); a standby host is switched on
/// again when a placement in the zone is refused or its free memory falls
/// below `headroom`.
///
/// The commands run with `sh -c` on the controller's machine, with `{host}`
/// and `{address}` replaced by the host's name and agent address (shell
/// quoted; also in `$KUMO_HOST` and `$KUMO_ADDRESS`), e.g.
/// `ipmitool -H {host}-bmc chassis power soft`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PowerSaving {
    /// Share (0–0.9) of memory and CPU kept free on hosts that take a
    /// standby host's VMs, and of the zone's schedulable memory.
    #[serde(default = "default_headroom")]
    #[schema(minimum = 0.0, maximum = 0.9)]
    pub headroom: f64,
    /// Only hosts whose CPU load (percent, 0–100) is below this are emptied.
    #[serde(default = "default_max_load")]
    #[schema(exclusive_minimum = 0.0, maximum = 100.0)]
    pub max_load: f64,
    /// Switches a host off once it is empty.
    #[schema(min_length = 1, max_length = 4096)]
    pub power_off_command: String,
    /// Switches a standby host on (it is `down` until its agent reports).
    #[schema(min_length = 1, max_length = 4096)]
    pub power_on_command: String,
    /// A host's draw when idle, for the estimate of energy saved (watts).
    #[serde(default = "default_idle_watts")]
    #[schema(minimum = 0.0, maximum = 100000.0)]
    pub idle_watts: f64,
}

fn default_headroom() -> f64 {
    0.2
}

fn default_max_load() -> f64 {
    30.0
}

fn default_idle_watts() -> f64 {
    150.0
}

/// Power saving in a zone: its settings, standby hosts and the energy
/// saved so far.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PowerSavingStatus {
    pub zone: String,
    /// None when power saving is off.
    #[serde(default)]
    pub settings: Option<PowerSaving>,
    /// Hosts switched off (or being switched off) by power saving.
    pub standby: Vec<String>,
    /// Hosts being emptied to go to standby.
    pub draining: Vec<String>,
    /// Estimated energy saved over all the zone's hosts, watt-hours
    /// (idle draw times time in standby).
    pub energy_saved_wh: f64,
    /// Of the zone's schedulable hosts, the share of memory not allocated.
    pub free_memory_share: f64,
}

/// What automatic rebalancing does and did last.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RebalanceStatus {
    pub enabled: bool,
    /// Host CPU load (percent) above which a host is overloaded.
    pub threshold: f64,
    /// How long a host must stay above the threshold to count.
    pub sustain_seconds: f64,
    pub period_seconds: f64,
    /// Migrations started per period, at most.
    pub max_moves: usize,
    /// Rebalancing migrations under way at once, at most.
    pub max_in_flight: usize,
    /// A VM that moved stays put this long.
    pub cooldown_seconds: f64,
    /// A move must lower the imbalance by this much per GiB copied.
    pub min_gain_per_gib: f64,
    /// Migrations rebalancing started since the controller started.
    pub started_total: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_pass: Option<RebalancePass>,
}

/// One pass of the rebalancer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RebalancePass {
    pub at: Millis,
    /// Hosts above the threshold for at least the sustain time.
    pub overloaded: Vec<String>,
    /// VMs that could move (running, not migrating, not cooling down).
    pub candidates: usize,
    /// Rebalancing migrations already under way.
    pub in_flight: usize,
    /// The imbalance score (standard deviation of host CPU load) before the
    /// pass and as planned after it.
    pub imbalance_before: f64,
    pub imbalance_after: f64,
    /// Migrations started, with their reasons.
    pub moves: Vec<RebalanceMove>,
    /// Why nothing (more) moved, if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RebalanceMove {
    pub vm: String,
    pub from: String,
    pub to: String,
    pub reason: String,
    /// Why it could not start, if it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Changes to a host's placement settings; absent fields stay as they are.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateHost {
    /// Shared vCPUs per core (more than 0, at most 64).
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0, maximum = 64.0)]
    pub cpu_overcommit: Option<f64>,
    /// Memory the host may promise, as a multiple of its memory (more than
    /// 0, at most 64).
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0, maximum = 64.0)]
    pub memory_overcommit: Option<f64>,
}

/// A new zone. Names of zones, VMs, groups, images and hosts are 1–63
/// lowercase letters, digits and `-`, starting with a letter and not ending
/// with `-` (the schemas' `pattern`; see [`crate::validate_name`]).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateZone {
    #[schema(
        min_length = 1,
        max_length = 63,
        pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$"
    )]
    pub name: String,
    #[serde(default)]
    #[schema(max_length = 1024)]
    pub description: String,
}

/// Where a host stands, as the controller sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Registered, and no heartbeat has arrived yet: the host takes no VMs
    /// until its agent shows it runs (first heartbeat), then it is `ready`.
    Joining,
    /// Heartbeats arrive; the host takes new VMs.
    Ready,
    /// Heartbeats stopped for longer than the down timeout.
    Down,
    /// An operator took the host out of placement; its VMs keep running.
    Disabled,
    /// Its VMs are being moved away (host or zone drain).
    Draining,
    /// Drained for maintenance: empty, takes no VMs until undrained.
    Maintenance,
    /// Emptied and powered off to save energy; powered on when needed.
    Standby,
}

impl std::fmt::Display for HostState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HostState::Joining => "joining",
            HostState::Ready => "ready",
            HostState::Down => "down",
            HostState::Disabled => "disabled",
            HostState::Draining => "draining",
            HostState::Maintenance => "maintenance",
            HostState::Standby => "standby",
        })
    }
}

/// The hypervisor an agent found on its host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HypervisorInfo {
    /// `qemu` or `sim`.
    #[schema(max_length = 32)]
    pub driver: String,
    /// The QEMU version, for the qemu driver.
    #[serde(default)]
    #[schema(max_length = 255)]
    pub version: Option<String>,
    /// `kvm` when KVM works (tried, not assumed), else `tcg`; `none` for sim.
    #[schema(max_length = 32)]
    pub accel: String,
}

/// Load measured on a host, sent with every heartbeat.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostLoad {
    /// Busy share of all CPUs since the previous heartbeat, 0–100.
    #[schema(minimum = 0.0, maximum = 100.0)]
    pub cpu_percent: f32,
    pub memory_used_mib: u64,
    /// The 1-minute load average (runnable tasks), 0–1,000,000.
    #[schema(minimum = 0.0, maximum = 1000000.0)]
    pub load1: f32,
}

/// A server in the pool, running one kumo agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Host {
    pub id: Uuid,
    pub name: String,
    pub project: String,
    pub zone: String,
    pub state: HostState,
    /// Where the controller reaches the agent (console).
    pub address: String,
    pub capacity: Resources,
    /// Shared vCPUs per core the host may hold.
    pub cpu_overcommit: f64,
    /// Memory the host may promise, as a multiple of its memory.
    pub memory_overcommit: f64,
    pub cpu_model: String,
    /// Attributes for requirement expressions (`labels.ssd`).
    pub labels: std::collections::BTreeMap<String, String>,
    /// The shared datastore the host mounts, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datastore: Option<String>,
    /// Sum of the sizes of the VMs placed on the host (and of those
    /// migrating to it).
    pub allocated: Resources,
    pub hypervisor: HypervisorInfo,
    #[serde(default)]
    pub load: Option<HostLoad>,
    #[serde(default)]
    pub last_heartbeat: Option<Millis>,
    /// Generation of the desired state the controller holds for the host.
    pub generation: u64,
    /// Generation the agent last reported as applied.
    pub applied_generation: u64,
    pub vm_count: u32,
    pub created_at: Millis,
    /// Since when power saving has the host switched off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby_since: Option<Millis>,
    /// Estimated energy power saving saved on this host, watt-hours.
    #[serde(default)]
    pub energy_saved_wh: f64,
}

/// Disk image formats kumo accepts (detected by `qemu-img info`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImageFormat {
    Qcow2,
    Raw,
}

impl ImageFormat {
    pub fn as_str(&self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        }
    }
}

/// A bootable disk image VMs are created from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Image {
    pub id: Uuid,
    pub name: String,
    pub project: String,
    pub format: ImageFormat,
    /// Bytes of the image file.
    pub size_bytes: u64,
    /// Size of the disk the image describes.
    pub virtual_size_bytes: u64,
    /// SHA-256 of the image file, hex.
    pub sha256: String,
    pub created_at: Millis,
}

#[derive(Clone, Debug, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ImportImageParams {
    /// Name of the new image.
    #[param(
        min_length = 1,
        max_length = 63,
        pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$"
    )]
    pub name: String,
}

/// How a VM's vCPUs map to its host's cores.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CpuPolicy {
    /// vCPUs share cores with other shared VMs (the host's CPU overcommit
    /// applies).
    #[default]
    Shared,
    /// Each vCPU gets a physical core of its own, pinned, never shared with
    /// another VM.
    Dedicated,
}

/// How the scheduler chooses among the hosts that can take a VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PlacementPolicy {
    /// Fill the fullest hosts first, leaving whole hosts free.
    #[default]
    Pack,
    /// Put each VM on the emptiest host.
    Spread,
    /// Prefer the hosts with the lowest measured CPU load.
    LoadAware,
}

/// Whether a group's VMs share a host or keep apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GroupPolicy {
    /// On one host together (e.g. chatty app and cache).
    Affinity,
    /// On different hosts (e.g. replicas of a database).
    AntiAffinity,
}

/// An affinity or anti-affinity group of VMs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Group {
    pub id: Uuid,
    pub name: String,
    pub project: String,
    pub policy: GroupPolicy,
    /// A hard rule refuses hosts that would break it; a soft one only
    /// prefers hosts that keep it.
    pub hard: bool,
    pub created_at: Millis,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateGroup {
    #[schema(
        min_length = 1,
        max_length = 63,
        pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$"
    )]
    pub name: String,
    pub policy: GroupPolicy,
    /// Default true.
    #[serde(default)]
    pub hard: Option<bool>,
}

/// Whether the VM should be running.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PowerState {
    Running,
    Stopped,
}

/// The life of a VM as users see it; see the state machine in
/// `kumod::app::vms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Placed on a host; the host has not reported it running yet.
    Starting,
    Running,
    /// Shutting down: ACPI power button, then a hard stop after a timeout.
    Stopping,
    Stopped,
    /// A reboot was asked for and the host has not carried it out yet.
    Rebooting,
    /// The guest could not be started or died; `message` says why.
    Failed,
    /// Its host is down, so nobody knows.
    Unknown,
    /// Deletion asked for; the host is tearing it down.
    Deleting,
    /// Running, and moving live to another host.
    Migrating,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self).expect("enum serializes");
        f.write_str(s.as_str().unwrap_or("?"))
    }
}

/// A virtual machine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Vm {
    pub id: Uuid,
    pub name: String,
    pub project: String,
    /// Name of the image the VM boots from.
    pub image: String,
    pub image_id: Uuid,
    pub size: Resources,
    /// Zone of the VM's host.
    pub zone: String,
    /// The one host the VM lives on.
    pub host: String,
    pub host_id: Uuid,
    pub state: VmState,
    pub power: PowerState,
    /// Reboots (and starts retried after a failure) asked for so far; the
    /// host resets or starts the guest when the count it has carried out is
    /// lower.
    pub reboots: u64,
    /// Last measured CPU use of the guest, percent of one CPU.
    #[serde(default)]
    pub cpu_percent: Option<f32>,
    /// Why the VM is in its state, for `failed` and `unknown`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default)]
    pub cpu_policy: CpuPolicy,
    /// The host cores a dedicated VM owns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cores: Vec<u32>,
    /// The requirement expression the VM was placed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requirements: Option<String>,
    /// The rank expression the VM was placed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<String>,
    /// Affinity and anti-affinity groups the VM belongs to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// The live migration under way, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<Migration>,
    /// How the last migration ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_migration: Option<MigrationResult>,
    /// The host a zone drain moved the VM away from (`kumo zone undrain
    /// --return` brings it back there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evacuated_from: Option<String>,
    /// Free-form key/value pairs. The simulated driver reads
    /// `sim.cpu_percent` as the guest's CPU use (percent of one CPU).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub metadata: std::collections::BTreeMap<String, String>,
    pub created_at: Millis,
}

/// How a migration moves the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationStorage {
    /// Both hosts mount the datastore holding the disk: only memory moves.
    Shared,
    /// The disk is copied live to the target (NBD + drive-mirror), then
    /// memory.
    Local,
}

/// Where a migration stands, as the controller drives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// Capacity reserved on the target; its QEMU is getting ready.
    Preparing,
    /// The source sends the guest.
    Transferring,
    /// Cancel asked for; waiting for the source to stop sending.
    Cancelling,
}

/// Why a VM moves. Stored with the migration and its result, carried by
/// the migration events (`Event::migration_reason`), and shown in JSON as
/// an object tagged by `kind`, e.g. `{"kind": "drain", "host": "h1"}`; its
/// `Display` is the sentence the CLI and event messages print.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum MigrationReason {
    /// An operator asked for it (`kumo vm migrate`).
    Operator,
    /// The drain of `host` (alone or with its zone) moves its VMs away.
    Drain {
        #[schema(max_length = 63)]
        host: String,
    },
    /// `host` was undrained with `return`: the VM its drain moved away goes
    /// back to it.
    ReturnAfterDrain {
        #[schema(max_length = 63)]
        host: String,
    },
    /// Rebalancing moves the VM off an overloaded host; `detail` is the
    /// planner's account (loads before and after, imbalance, MiB to copy).
    Rebalance {
        #[schema(max_length = 1024)]
        detail: String,
    },
    /// Power saving empties a lightly loaded host to switch it off;
    /// `detail` is the planner's account.
    PowerSaving {
        #[schema(max_length = 1024)]
        detail: String,
    },
}

impl std::fmt::Display for MigrationReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MigrationReason::Operator => write!(f, "requested"),
            MigrationReason::Drain { host } => write!(f, "drain of host {host}"),
            MigrationReason::ReturnAfterDrain { host } => {
                write!(f, "return to host {host} after its drain")
            }
            MigrationReason::Rebalance { detail } => write!(f, "rebalance: {detail}"),
            MigrationReason::PowerSaving { detail } => write!(f, "power saving: {detail}"),
        }
    }
}

/// A live migration under way.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Migration {
    pub id: Uuid,
    pub source: String,
    pub source_id: Uuid,
    pub target: String,
    pub target_id: Uuid,
    /// Cores reserved on the target for a dedicated VM.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_cores: Vec<u32>,
    pub storage: MigrationStorage,
    pub phase: MigrationPhase,
    /// The longest pause of the guest QEMU may aim for at switch-over.
    pub downtime_limit_ms: u64,
    /// Why it moves.
    pub reason: MigrationReason,
    /// Where the target listens (known once it is ready).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<MigrationProgress>,
    pub started_at: Millis,
}

/// Transfer figures from the source's QEMU.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrationProgress {
    /// `disk` while the disk is mirrored, then `memory`.
    #[schema(max_length = 32)]
    pub stage: String,
    pub disk_total_bytes: u64,
    pub disk_done_bytes: u64,
    pub memory_total_bytes: u64,
    pub memory_transferred_bytes: u64,
    pub memory_remaining_bytes: u64,
    /// Bytes of guest memory dirtied per second.
    pub dirty_rate_bytes: u64,
    /// Memory copy passes so far (more than a few: a busy guest).
    pub passes: u64,
    /// Throttle auto-converge applies to the vCPUs, percent.
    pub cpu_throttle_percent: u64,
    pub elapsed_ms: u64,
    /// The settings in force in the source QEMU: auto-converge (throttle
    /// busy guests) and the downtime limit it aims for.
    #[serde(default)]
    pub auto_converge: bool,
    #[serde(default)]
    pub downtime_limit_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationOutcome {
    Completed,
    Failed,
    Cancelled,
}

/// How a migration ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationResult {
    pub id: Uuid,
    pub source: String,
    pub target: String,
    pub storage: MigrationStorage,
    pub outcome: MigrationOutcome,
    /// What went wrong, for failed and cancelled migrations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The guest's pause at switch-over: from the source QEMU stopping it to
    /// the target QEMU resuming it (QMP event times), when both are known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<f64>,
    /// QEMU's own figure for the pause (source side).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_downtime_ms: Option<u64>,
    /// How long QEMU took to send the guest (source side).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_ms: Option<u64>,
    /// When the source paused the guest for the last copy (microseconds
    /// since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_at_us: Option<u64>,
    pub total_ms: u64,
    /// Why it moved (or tried to).
    pub reason: MigrationReason,
    pub finished_at: Millis,
}

/// Ask for a live migration.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateVm {
    /// Target host; the scheduler chooses when absent.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 63)]
    pub to: Option<String>,
    /// Longest acceptable pause at switch-over (default 300 ms, at most
    /// 60000).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 60000)]
    pub downtime_limit_ms: Option<u64>,
}

/// Drain a host or zone.
#[derive(Clone, Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DrainParams {
    /// Only compute and return the plan; move nothing (default false).
    #[serde(default)]
    pub dry_run: Option<bool>,
}

/// Undrain a host or zone.
#[derive(Clone, Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct UndrainParams {
    /// Move the VMs a drain took away back to the hosts they came from
    /// (default false).
    #[serde(default, rename = "return")]
    pub return_vms: Option<bool>,
}

/// One VM's move in a drain plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PlannedMove {
    pub vm: String,
    pub from: String,
    /// The target host; none when no host can take the VM.
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub to_zone: Option<String>,
    /// Why no host can take it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    /// The VM is migrating to the drained host `from`: the drain cancels
    /// that migration and the VM stays on `to`, where it runs now.
    #[serde(default)]
    pub cancels_arrival: bool,
}

/// What a drain will do (or is doing).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DrainPlan {
    /// `host/NAME` or `zone/NAME`.
    pub scope: String,
    pub moves: Vec<PlannedMove>,
    /// Every VM has a target: the other hosts have room for all of it.
    pub feasible: bool,
    /// Memory to copy, MiB.
    pub memory_mib: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    #[schema(
        min_length = 1,
        max_length = 63,
        pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$"
    )]
    pub name: String,
    /// Image name or id.
    #[schema(min_length = 1, max_length = 63)]
    pub image: String,
    #[schema(minimum = 1, maximum = 128)]
    pub vcpus: u32,
    #[schema(minimum = 32, maximum = 4194304)]
    pub memory_mib: u64,
    /// Size of the root disk; defaults to the image's virtual size rounded
    /// up to whole GiB.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 65536)]
    pub disk_gib: Option<u64>,
    /// Only hosts in this zone are considered.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 63)]
    pub zone: Option<String>,
    /// Start the VM once created (default true).
    #[serde(default)]
    pub start: Option<bool>,
    /// `shared` (default) or `dedicated` cores.
    #[serde(default)]
    pub cpu_policy: Option<CpuPolicy>,
    /// `pack` (default), `spread` or `load_aware`.
    #[serde(default)]
    pub policy: Option<PlacementPolicy>,
    /// Only hosts for which this expression holds, e.g.
    /// `cpu_model == "EPYC" && labels.ssd`.
    #[serde(default)]
    #[schema(max_length = 4096)]
    pub requirements: Option<String>,
    /// Among the hosts that qualify, prefer those where this is highest,
    /// e.g. `free.memory_mib - load * 1024`; the policy breaks ties.
    #[serde(default)]
    #[schema(max_length = 4096)]
    pub rank: Option<String>,
    /// Names of the groups the VM joins (at most 16).
    #[serde(default)]
    #[schema(schema_with = crate::schema::name_list)]
    pub groups: Vec<String>,
    /// Free-form key/value pairs kept with the VM (see `Vm::metadata`): at
    /// most 64, keys of 1–128 characters, values of at most 1024.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    #[schema(schema_with = crate::schema::metadata)]
    pub metadata: std::collections::BTreeMap<String, String>,
}

impl CreateVm {
    /// A request for a 1-vCPU, 256 MiB VM of `image`, everything else left
    /// to the defaults.
    pub fn new(name: &str, image: &str) -> CreateVm {
        CreateVm {
            name: name.into(),
            image: image.into(),
            vcpus: 1,
            memory_mib: 256,
            disk_gib: None,
            zone: None,
            start: None,
            cpu_policy: None,
            policy: None,
            requirements: None,
            rank: None,
            groups: Vec::new(),
            metadata: Default::default(),
        }
    }
}

/// A VM shape for capacity planning.
#[derive(Clone, Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct CapacityQuery {
    #[param(minimum = 1, maximum = 128)]
    pub vcpus: u32,
    #[param(minimum = 32, maximum = 4194304)]
    pub memory_mib: u64,
    /// Default 1.
    #[serde(default)]
    #[param(minimum = 1, maximum = 65536)]
    pub disk_gib: Option<u64>,
    #[serde(default)]
    #[param(min_length = 1, max_length = 63)]
    pub zone: Option<String>,
    #[serde(default)]
    #[param(inline)]
    pub cpu_policy: Option<CpuPolicy>,
    #[serde(default)]
    #[param(max_length = 4096)]
    pub requirements: Option<String>,
}

/// How many more VMs of a shape fit now, and what runs out first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CapacityReport {
    pub fits: u64,
    /// The resource that stops the most hosts from taking another
    /// (`vcpus`, `dedicated_cores`, `memory`, `disk`), if any host counts.
    #[serde(default)]
    pub limited_by: Option<String>,
    /// Hosts that could hold the shape at all (schedulable, in the zone,
    /// matching the requirements).
    pub hosts: usize,
}

/// Something that happened, kept in an append-only log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    pub seq: u64,
    pub time: Millis,
    /// Dotted kind, e.g. `host.down`, `vm.created`.
    pub kind: String,
    /// `host/NAME`, `vm/NAME`, ...
    pub resource: String,
    pub project: String,
    pub message: String,
    /// Why the VM moves, on the events of a migration (`vm.migration.*`,
    /// `vm.migrated`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_reason: Option<MigrationReason>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventQuery {
    /// A cursor: only events with a sequence number greater than this, the
    /// oldest first (pass the previous answer's `next`). Without it, the
    /// newest events.
    #[serde(default)]
    pub after: Option<u64>,
    /// At most this many (default 100, at most 10000).
    #[serde(default)]
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<usize>,
    /// Only events about this resource, e.g. `vm/web`.
    #[serde(default)]
    #[param(max_length = 128)]
    pub resource: Option<String>,
    /// With `after`: when no matching event is past the cursor yet, wait up
    /// to this many seconds for one (a long poll; at most 10, short enough
    /// for common HTTP read timeouts, so a follower simply asks again).
    #[serde(default)]
    #[param(minimum = 0, maximum = 10)]
    pub wait_seconds: Option<u64>,
}

/// The most items one page of a paged list (`GET /v1/vms`, `GET /v1/hosts`)
/// holds.
pub const MAX_PAGE: u32 = 5000;

/// `GET /v1/vms`: which VMs, and which page of them. Filters combine (all
/// must hold). Without `limit` the answer holds every matching VM.
#[derive(Clone, Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct VmListQuery {
    /// At most this many VMs in the answer (1–5000); the answer's `next`
    /// then fetches the following page.
    #[serde(default)]
    #[param(minimum = 1, maximum = 5000)]
    pub limit: Option<u32>,
    /// The `next` of the previous page, asked for with the same filters.
    #[serde(default)]
    #[param(min_length = 1, max_length = 512)]
    pub page_token: Option<String>,
    /// Only VMs in this state.
    #[serde(default)]
    #[param(inline)]
    pub state: Option<VmState>,
    /// Only VMs on this host.
    #[serde(default)]
    #[param(min_length = 1, max_length = 63)]
    pub host: Option<String>,
    /// Only VMs in this zone.
    #[serde(default)]
    #[param(min_length = 1, max_length = 63)]
    pub zone: Option<String>,
    /// Only VMs whose name starts with this.
    #[serde(default)]
    #[param(min_length = 1, max_length = 63)]
    pub name: Option<String>,
}

/// `GET /v1/hosts`: which hosts, and which page of them; as [`VmListQuery`].
#[derive(Clone, Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct HostListQuery {
    /// At most this many hosts in the answer (1–5000).
    #[serde(default)]
    #[param(minimum = 1, maximum = 5000)]
    pub limit: Option<u32>,
    /// The `next` of the previous page, asked for with the same filters.
    #[serde(default)]
    #[param(min_length = 1, max_length = 512)]
    pub page_token: Option<String>,
    /// Only hosts in this state.
    #[serde(default)]
    #[param(inline)]
    pub state: Option<HostState>,
    /// Only hosts in this zone.
    #[serde(default)]
    #[param(min_length = 1, max_length = 63)]
    pub zone: Option<String>,
    /// Only hosts whose name starts with this.
    #[serde(default)]
    #[param(min_length = 1, max_length = 63)]
    pub name: Option<String>,
}

/// A page of VMs, by name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmList {
    pub items: Vec<Vm>,
    /// Pass as `page_token` for the next page; absent on the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// A page of hosts, by name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostList {
    pub items: Vec<Host>,
    /// Pass as `page_token` for the next page; absent on the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// A page of the event log, oldest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EventPage {
    pub items: Vec<Event>,
    /// The cursor to pass as `after` for the events that follow: the last
    /// event this answer looked at (returned or filtered out), or the
    /// request's `after` when it looked at none.
    pub next: u64,
}

/// A secret that lets a new host join the pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JoinToken {
    pub id: Uuid,
    pub project: String,
    /// The secret; shown only when the token is created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    pub expires_at: Millis,
    pub created_at: Millis,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJoinToken {
    /// Lifetime in seconds (default 86400, at most 30 days).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 2592000)]
    pub ttl_seconds: Option<u64>,
}

/// The serial console output a guest has written so far.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ConsoleLog {
    pub vm: String,
    pub text: String,
}
