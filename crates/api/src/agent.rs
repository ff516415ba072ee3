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
    /// Target: listening at `uri` (and `nbd` for the disks).
    Listening,
    /// Source: copying the disks, then memory.
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
    /// Target, local disks: the NBD server the source mirrors the disks to
    /// (`nbd:HOST:PORT`), each disk exported under its id.
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
///
/// Read from the controller and from the agent's ledger, which may have
/// been written by the previous release: a spec without `machine` (that
/// release sent `size`, `image` and `cores` instead) is read as the machine
/// every VM had then, [`Machine::single_disk`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(try_from = "StoredVmSpec")]
pub struct VmSpec {
    pub id: Uuid,
    pub name: String,
    /// The guest's devices, as data the host's driver builds the guest from.
    pub machine: Machine,
    pub power: PowerState,
    pub reboots: u64,
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

/// A [`VmSpec`] as written by this release or the previous one (whose
/// `size`, `image` and `cores` become the machine it had).
#[derive(Deserialize)]
struct StoredVmSpec {
    id: Uuid,
    name: String,
    #[serde(default)]
    machine: Option<Machine>,
    power: PowerState,
    reboots: u64,
    #[serde(default)]
    delete: bool,
    #[serde(default)]
    migration: Option<MigrationSpec>,
    #[serde(default)]
    metadata: std::collections::BTreeMap<String, String>,
    // The previous release's fields.
    #[serde(default)]
    size: Option<Resources>,
    #[serde(default)]
    image: Option<ImageRef>,
    #[serde(default)]
    cores: Vec<u32>,
}

impl TryFrom<StoredVmSpec> for VmSpec {
    type Error = String;

    fn try_from(s: StoredVmSpec) -> Result<Self, String> {
        let machine = match (s.machine, s.size, s.image) {
            (Some(m), _, _) => m,
            (None, Some(size), Some(image)) => Machine::single_disk(s.id, size, image, s.cores),
            (None, _, _) => return Err("a VM spec needs `machine` (or `size` and `image`)".into()),
        };
        Ok(VmSpec {
            id: s.id,
            name: s.name,
            machine,
            power: s.power,
            reboots: s.reboots,
            delete: s.delete,
            migration: s.migration,
            metadata: s.metadata,
        })
    }
}

/// A guest's virtual hardware: CPUs, memory, disks, network interfaces and
/// serial console, as the controller decided them. The agent's driver turns
/// it into a hypervisor command line (for QEMU: `MachineSpec::argv` in the
/// agent) and nothing else decides what the guest gets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    pub cpu: Cpu,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// In the order the guest sees them; device ids are unique.
    pub disks: Vec<Disk>,
    /// In the order the guest sees them; device ids and MACs are unique.
    pub nics: Vec<Nic>,
    pub serial: SerialConsole,
}

impl Machine {
    /// The machine every VM gets today: `size`'s vCPUs and memory, one boot
    /// disk `disk0` (a qcow2 overlay of `image`, `size.disk_gib` GiB, the
    /// node name running guests and migrations already use), one
    /// user-mode NIC `net0` with [`MacAddress::for_vm`]`(id, 0)`, and the
    /// logged serial console. `cores`: the host cores a dedicated VM's
    /// vCPUs are pinned to, one each (empty for shared VMs).
    pub fn single_disk(id: Uuid, size: Resources, image: ImageRef, cores: Vec<u32>) -> Machine {
        Machine {
            cpu: Cpu {
                vcpus: size.vcpus,
                model: CpuModel::Host,
                cores,
            },
            memory_mib: size.memory_mib,
            disks: vec![Disk {
                id: "disk0".into(),
                source: DiskSource::Image(image),
                format: DiskFormat::Qcow2,
                size_gib: size.disk_gib,
                bus: DiskBus::VirtioBlk,
                cache: DiskCache::Writeback,
                discard: Discard::Unmap,
                boot: true,
            }],
            nics: vec![Nic {
                id: "net0".into(),
                mac: MacAddress::for_vm(id, 0),
                model: NicModel::VirtioNet,
                backend: NicBackend::User,
            }],
            serial: SerialConsole::Logged,
        }
    }
}

/// The guest's processors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Cpu {
    pub vcpus: u32,
    pub model: CpuModel,
    /// Host cores a dedicated VM's vCPUs are pinned to, one each (vCPU `i`
    /// on `cores[i]`); empty for shared VMs, which keep off every
    /// dedicated core.
    #[serde(default)]
    pub cores: Vec<u32>,
}

/// The CPU the guest sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CpuModel {
    /// The most the host offers: the host's own CPU under KVM (QEMU
    /// `-cpu host`), every feature QEMU emulates under TCG (`-cpu max`).
    Host,
}

/// One virtual disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// The device id, also the hypervisor's block node name (`disk0`):
    /// 1–16 lowercase letters and digits, starting with a letter.
    pub id: String,
    pub source: DiskSource,
    pub format: DiskFormat,
    /// Virtual size, GiB.
    pub size_gib: u64,
    pub bus: DiskBus,
    pub cache: DiskCache,
    pub discard: Discard,
    /// The disk the firmware boots from (at most one per machine).
    pub boot: bool,
}

/// What a disk starts out holding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DiskSource {
    /// A copy-on-write overlay of an image (the image stays read-only in
    /// the host's cache); needs [`DiskFormat::Qcow2`].
    Image(ImageRef),
    /// Zeroes.
    Blank,
}

/// The format of a disk's file on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    /// The name QEMU and qemu-img use.
    pub fn as_str(&self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

/// How the guest reaches a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DiskBus {
    /// A virtio-blk PCI device.
    VirtioBlk,
}

/// How the host caches a disk's writes (QEMU's `cache` modes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DiskCache {
    /// Through the host's page cache; guest flushes reach the disk.
    Writeback,
    /// Around the host's page cache (`O_DIRECT`); guest flushes reach the disk.
    None,
}

/// What a guest's discard (TRIM) does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Discard {
    /// Frees the space on the host.
    Unmap,
    Ignore,
}

/// One virtual network interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    /// The device id (`net0`): 1–16 lowercase letters and digits, starting
    /// with a letter.
    pub id: String,
    pub mac: MacAddress,
    pub model: NicModel,
    pub backend: NicBackend,
}

/// The NIC the guest sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NicModel {
    /// virtio-net on PCI.
    VirtioNet,
}

/// What a NIC is connected to on the host. Virtual networks will add their
/// kinds here (a tap on a bridge, VXLAN).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum NicBackend {
    /// QEMU's user-mode networking (slirp): outbound connections through
    /// the host, nothing reaches the guest from outside.
    User,
}

/// The guest's serial console.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SerialConsole {
    /// No serial port.
    None,
    /// One serial port on a socket the console endpoint joins, everything
    /// it prints also appended to a log.
    Logged,
}

/// An Ethernet MAC address (EUI-48), written `02:1a:2b:3c:4d:5e`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ToSchema)]
#[schema(value_type = String, pattern = "^([0-9a-f]{2}:){5}[0-9a-f]{2}$")]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    /// A stable MAC for NIC `index` of VM `vm`: the VM id's last five bytes
    /// (random in a v4 UUID), the last one XORed with `index`, after a
    /// first octet `0x02` — the locally administered (U/L bit set),
    /// unicast (I/G bit clear) prefix of IEEE 802 (IEEE Std 802-2014
    /// §8.2.2), so it never collides with a vendor's address.
    pub fn for_vm(vm: Uuid, index: u8) -> MacAddress {
        let b = vm.as_bytes();
        MacAddress([0x02, b[11], b[12], b[13], b[14], b[15] ^ index])
    }
}

impl std::fmt::Display for MacAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl std::str::FromStr for MacAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().filter(|p| p.len() == 2);
            *byte = part
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| format!("{s:?} is not a MAC address like 02:1a:2b:3c:4d:5e"))?;
        }
        if parts.next().is_some() {
            return Err(format!("{s:?} is not a MAC address like 02:1a:2b:3c:4d:5e"));
        }
        Ok(MacAddress(out))
    }
}

impl Serialize for MacAddress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The host's part in a live migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", tag = "role")]
pub enum MigrationSpec {
    /// Start a QEMU that waits for the guest and report where it listens.
    Incoming { id: Uuid, storage: MigrationStorage },
    /// Send the guest to the target (disks first for local storage).
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn image() -> ImageRef {
        ImageRef {
            id: Uuid::from_u128(7),
            sha256: "ab".repeat(32),
            format: ImageFormat::Qcow2,
            size_bytes: 1 << 20,
        }
    }

    /// A ledger entry as the previous release wrote it (no `machine`) reads
    /// as the single-disk machine it ran, pinned cores included.
    #[test]
    fn a_spec_from_the_previous_release_reads_as_its_machine() {
        let id = Uuid::from_u128(0x1234_5678_9abc_def0_1122_3344_5566_7788);
        let old = json!({
            "id": id, "name": "web",
            "size": {"vcpus": 2, "memory_mib": 256, "disk_gib": 3},
            "image": image(), "power": "running", "reboots": 1, "cores": [4, 5],
        });
        let spec: VmSpec = serde_json::from_value(old).unwrap();
        let size = Resources {
            vcpus: 2,
            memory_mib: 256,
            disk_gib: 3,
        };
        assert_eq!(
            spec.machine,
            Machine::single_disk(id, size, image(), vec![4, 5])
        );
        assert_eq!(spec.machine.disks[0].id, "disk0");
        assert_eq!(spec.machine.nics[0].mac.to_string(), "02:44:55:66:77:88");
        // And what this release writes reads back the same.
        let again: VmSpec = serde_json::from_value(serde_json::to_value(&spec).unwrap()).unwrap();
        assert_eq!(again, spec);
        let neither = json!({"id": id, "name": "web", "power": "running", "reboots": 0});
        let e = serde_json::from_value::<VmSpec>(neither).unwrap_err();
        assert!(e.to_string().contains("machine"), "{e}");
    }

    #[test]
    fn vm_macs_are_locally_administered_unicast_and_distinct_per_nic() {
        let id = Uuid::from_u128(u128::MAX);
        let macs: Vec<_> = (0..4).map(|i| MacAddress::for_vm(id, i)).collect();
        for m in &macs {
            assert_eq!(m.0[0] & 0b11, 0b10, "U/L set, I/G clear: {m}");
        }
        assert_eq!(macs[1].to_string(), "02:ff:ff:ff:ff:fe");
        let unique: std::collections::BTreeSet<_> = macs.iter().collect();
        assert_eq!(unique.len(), macs.len());
    }

    #[test]
    fn mac_addresses_parse_only_their_written_form() {
        let m: MacAddress = "02:1a:2b:3c:4d:5e".parse().unwrap();
        assert_eq!(m.to_string(), "02:1a:2b:3c:4d:5e");
        for bad in [
            "02:1a:2b:3c:4d",
            "02:1a:2b:3c:4d:5e:6f",
            "2:1a:2b:3c:4d:5e",
            "zz:1a:2b:3c:4d:5e",
        ] {
            assert!(bad.parse::<MacAddress>().is_err(), "{bad}");
        }
    }
}
