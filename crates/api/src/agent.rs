//! The agent protocol: how a host joins, reports, and learns what it should
//! run. The controller sends the host's whole desired state stamped with a
//! generation; the agent persists it before acting and reports the
//! generation it has applied.

use crate::{
    HostLoad, HypervisorInfo, ImageFormat, MigrationProgress, MigrationStorage, PowerState,
    Resources,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterHost {
    /// A join token (`kumo host token create`); empty when a host
    /// re-registers with its own token.
    #[schema(max_length = 128)]
    pub join_token: String,
    #[schema(
        min_length = 1,
        max_length = 63,
        pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$"
    )]
    pub name: String,
    #[schema(min_length = 1, max_length = 63)]
    pub zone: String,
    /// Base URL of the agent's own HTTP endpoint (`http://` or
    /// `https://`); empty for an agent that serves none (simulated hosts).
    #[schema(max_length = 255)]
    pub address: String,
    /// Secret the controller presents when it calls the agent.
    #[schema(min_length = 1, max_length = 128)]
    pub agent_secret: String,
    pub capacity: Resources,
    pub hypervisor: HypervisorInfo,
    #[serde(default)]
    #[schema(max_length = 255)]
    pub cpu_model: String,
    #[serde(default)]
    #[schema(schema_with = crate::schema::labels)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Name of the shared datastore the host mounts (hosts that name the
    /// same one hand guests over without copying their disks).
    #[serde(default)]
    #[schema(min_length = 1, max_length = 63)]
    pub datastore: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct RegisterHostResponse {
    pub host_id: Uuid,
    /// Bearer token for the agent's calls from now on.
    pub host_token: String,
}

/// What the agent observes of one guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ObservedState {
    /// Disk being prepared or QEMU starting.
    Starting,
    Running,
    /// Powering down (ACPI) but not gone yet.
    Stopping,
    Stopped,
    Failed,
    /// A QEMU waiting for a guest migrating in.
    Incoming,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmStatus {
    pub id: Uuid,
    pub state: ObservedState,
    /// Reboot requests carried out (compare `VmSpec::reboots`).
    pub reboots: u64,
    /// The guest's CPU use, percent of one CPU (0–12,800: 128 vCPUs).
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 12800.0)]
    pub cpu_percent: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 4096)]
    pub message: Option<String>,
    /// The host's side of a live migration the VM takes part in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationStatus>,
}

/// Where one side of a migration stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationState {
    /// Target: preparing the QEMU that will receive the guest.
    Preparing,
    /// Target: listening at `uri` (and `nbd` for the disk).
    Listening,
    /// Source: copying the disk, then memory.
    Active,
    /// The guest runs on the target; the source's copy is paused for good.
    Completed,
    Failed,
    Cancelled,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrationStatus {
    pub id: Uuid,
    pub state: MigrationState,
    /// Target: the QEMU migration address, e.g. `tcp:10.0.0.2:49152`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 255)]
    pub uri: Option<String>,
    /// Target, local disks: the NBD export the source mirrors the disk to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 255)]
    pub nbd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<MigrationProgress>,
    /// Source: when QEMU paused the guest for the last copy; target: when
    /// the guest resumed (microseconds since the epoch, from QMP events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_us: Option<u64>,
    /// Source, completed: QEMU's own figure for the pause.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_downtime_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 4096)]
    pub message: Option<String>,
}

impl MigrationStatus {
    /// One side's view of a migration, with nothing else known yet.
    pub fn new(id: Uuid, state: MigrationState) -> Self {
        MigrationStatus {
            id,
            state,
            uri: None,
            nbd: None,
            progress: None,
            event_us: None,
            qemu_downtime_ms: None,
            message: None,
        }
    }
}

/// The longest message (characters) a VM's status or a migration's status
/// may carry in a heartbeat: the `maxLength` of their schemas.
pub const MAX_STATUS_MESSAGE: usize = 4096;

/// `message` cut to [`MAX_STATUS_MESSAGE`] characters (an error chain that
/// quotes QEMU's stderr can be longer), marked with `…` where it was cut.
pub fn bounded_message(message: String) -> String {
    if message.chars().count() <= MAX_STATUS_MESSAGE {
        return message;
    }
    let mut cut: String = message.chars().take(MAX_STATUS_MESSAGE - 1).collect();
    cut.push('…');
    cut
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub load: HostLoad,
    pub applied_generation: u64,
    /// The guests the host runs (at most 4096).
    #[schema(max_items = 4096)]
    pub vms: Vec<VmStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatResponse {
    /// Generation of the host's desired state as the controller holds it
    /// (agents learn of new ones through the `desired` long poll).
    pub generation: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageRef {
    pub id: Uuid,
    pub sha256: String,
    pub format: ImageFormat,
    pub size_bytes: u64,
}

/// One VM as the host should run it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmSpec {
    pub id: Uuid,
    pub name: String,
    pub size: Resources,
    pub image: ImageRef,
    pub power: PowerState,
    pub reboots: u64,
    /// Host cores a dedicated VM's vCPUs are pinned to, one each; empty for
    /// shared VMs, which keep off every dedicated core.
    #[serde(default)]
    pub cores: Vec<u32>,
    /// The guest is deleted: stop it and remove everything it has, its disk
    /// on a shared datastore included. (A VM that merely leaves the desired
    /// state moved away: its local state goes, a shared disk stays.)
    #[serde(default)]
    pub delete: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationSpec>,
    /// The VM's metadata (the simulated driver reads `sim.cpu_percent`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub metadata: std::collections::BTreeMap<String, String>,
}

/// The host's part in a live migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", tag = "role")]
pub enum MigrationSpec {
    /// Start a QEMU that waits for the guest and report where it listens.
    Incoming { id: Uuid, storage: MigrationStorage },
    /// Send the guest to the target (disk first for local storage).
    Outgoing {
        id: Uuid,
        storage: MigrationStorage,
        uri: String,
        #[serde(default)]
        nbd: Option<String>,
        downtime_limit_ms: u64,
        /// Give up: cancel the transfer; the guest keeps running here.
        #[serde(default)]
        cancel: bool,
    },
}

/// Everything a host should run, as of one generation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DesiredState {
    pub host_id: Uuid,
    pub generation: u64,
    pub vms: Vec<VmSpec>,
}

/// An agent's own view, answered on `GET /v1/status` of its endpoint (the
/// agent secret as bearer token): the desired state it applied last, and
/// what each VM's actor last observed — what its next heartbeat reports.
/// For looking into a host when the controller's view is not enough (a
/// migration that does not end, say).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentStatus {
    pub applied: DesiredState,
    pub vms: Vec<VmStatus>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DesiredQuery {
    /// Wait (up to `wait_seconds`) until the generation is newer than this.
    #[serde(default)]
    pub after: Option<u64>,
    /// How long to wait for a newer generation (default 30, at most 60).
    #[serde(default)]
    #[param(maximum = 60)]
    pub wait_seconds: Option<u64>,
}
