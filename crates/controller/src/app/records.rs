//! What the store keeps: every record kumo persists, the store key it
//! lives under, and the shape it is written in. The bottom of `app/`: it
//! imports nothing from the files above it, so the on-disk schema has one
//! place.
//!
//! Keys (one per record, prefixes below): `zones/<name>`, `hosts/<name>`,
//! `images/<name>`, `groups/<name>`, `vms/<name>`, `join-tokens/<uuid>`,
//! `events/<seq, 20 digits>` (zero-padded so the store's key order is the
//! event order).

use kumo_api::{
    CpuPolicy, HypervisorInfo, JoinToken, Migration, MigrationOutcome, MigrationPhase,
    MigrationReason, MigrationResult, MigrationStorage, Millis, PowerState, Resources, Vm, VmState,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use uuid::Uuid;

/// Key prefix of zone records (`kumo_api::Zone`).
pub const ZONES: &str = "zones/";
/// Key prefix of host records ([`HostRecord`]).
pub const HOSTS: &str = "hosts/";
/// Key prefix of image records (`kumo_api::Image`).
pub const IMAGES: &str = "images/";
/// Key prefix of group records (`kumo_api::Group`).
pub const GROUPS: &str = "groups/";
/// Key prefix of VM records ([`VmRecord`]).
pub const VMS: &str = "vms/";
/// Key prefix of join-token records ([`TokenRecord`]).
pub const JOIN_TOKENS: &str = "join-tokens/";
/// Key prefix of event records (`kumo_api::Event`).
pub const EVENTS: &str = "events/";

/// The key of the zone named `name`.
pub fn zone_key(name: &str) -> String {
    format!("{ZONES}{name}")
}

/// The key of the host named `name`.
pub fn host_key(name: &str) -> String {
    format!("{HOSTS}{name}")
}

/// The key of the image named `name`.
pub fn image_key(name: &str) -> String {
    format!("{IMAGES}{name}")
}

/// The key of the group named `name`.
pub fn group_key(name: &str) -> String {
    format!("{GROUPS}{name}")
}

/// The key of the VM named `name`.
pub fn vm_key(name: &str) -> String {
    format!("{VMS}{name}")
}

/// The key of the join token with id `id`.
pub fn join_token_key(id: Uuid) -> String {
    format!("{JOIN_TOKENS}{id}")
}

/// The key of event number `seq`.
pub fn event_key(seq: u64) -> String {
    format!("{EVENTS}{seq:020}")
}

/// The version of [`VmRecord`] this release writes.
pub const VM_RECORD_VERSION: u32 = 1;

/// A VM as the store keeps it, apart from the API's `Vm` so the on-disk
/// schema moves only when this type does. What is measured (CPU use,
/// transfer figures) stays in memory. Versions: 0, the previous release's
/// (the API's shape, no `version`, migration reasons as sentences); 1, this
/// shape with typed reasons.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    /// Absent (0) in the previous release's records.
    #[serde(default)]
    pub version: u32,
    pub id: Uuid,
    pub name: String,
    pub project: String,
    pub image: String,
    pub image_id: Uuid,
    pub size: Resources,
    pub zone: String,
    pub host: String,
    pub host_id: Uuid,
    pub state: VmState,
    pub power: PowerState,
    pub reboots: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default)]
    pub cpu_policy: CpuPolicy,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cores: Vec<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requirements: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_migration: Option<MigrationResultRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evacuated_from: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    pub created_at: Millis,
}

/// A migration under way, as stored with its VM (`kumo_api::Migration`
/// without the transfer figures).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationRecord {
    pub id: Uuid,
    pub source: String,
    pub source_id: Uuid,
    pub target: String,
    pub target_id: Uuid,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_cores: Vec<u32>,
    pub storage: MigrationStorage,
    pub phase: MigrationPhase,
    pub downtime_limit_ms: u64,
    pub reason: MigrationReason,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd: Option<String>,
    pub started_at: Millis,
}

/// How a VM's last migration ended, as stored (`kumo_api::MigrationResult`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationResultRecord {
    pub id: Uuid,
    pub source: String,
    pub target: String,
    pub storage: MigrationStorage,
    pub outcome: MigrationOutcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_downtime_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_at_us: Option<u64>,
    pub total_ms: u64,
    pub reason: MigrationReason,
    pub finished_at: Millis,
}

impl VmRecord {
    /// The record of a VM as the inventory holds it.
    pub fn from_vm(vm: &Vm) -> VmRecord {
        let migration = vm.migration.as_ref().map(|m| MigrationRecord {
            id: m.id,
            source: m.source.clone(),
            source_id: m.source_id,
            target: m.target.clone(),
            target_id: m.target_id,
            target_cores: m.target_cores.clone(),
            storage: m.storage,
            phase: m.phase,
            downtime_limit_ms: m.downtime_limit_ms,
            reason: m.reason.clone(),
            uri: m.uri.clone(),
            nbd: m.nbd.clone(),
            started_at: m.started_at,
        });
        let last_migration = vm.last_migration.as_ref().map(|r| MigrationResultRecord {
            id: r.id,
            source: r.source.clone(),
            target: r.target.clone(),
            storage: r.storage,
            outcome: r.outcome,
            message: r.message.clone(),
            downtime_ms: r.downtime_ms,
            qemu_downtime_ms: r.qemu_downtime_ms,
            transfer_ms: r.transfer_ms,
            paused_at_us: r.paused_at_us,
            total_ms: r.total_ms,
            reason: r.reason.clone(),
            finished_at: r.finished_at,
        });
        VmRecord {
            version: VM_RECORD_VERSION,
            id: vm.id,
            name: vm.name.clone(),
            project: vm.project.clone(),
            image: vm.image.clone(),
            image_id: vm.image_id,
            size: vm.size,
            zone: vm.zone.clone(),
            host: vm.host.clone(),
            host_id: vm.host_id,
            state: vm.state,
            power: vm.power,
            reboots: vm.reboots,
            message: vm.message.clone(),
            cpu_policy: vm.cpu_policy,
            cores: vm.cores.clone(),
            requirements: vm.requirements.clone(),
            rank: vm.rank.clone(),
            groups: vm.groups.clone(),
            migration,
            last_migration,
            evacuated_from: vm.evacuated_from.clone(),
            metadata: vm.metadata.clone(),
            created_at: vm.created_at,
        }
    }

    /// The VM the API shows, with nothing measured yet.
    pub fn into_vm(self) -> Vm {
        let migration = self.migration.map(|m| Migration {
            id: m.id,
            source: m.source,
            source_id: m.source_id,
            target: m.target,
            target_id: m.target_id,
            target_cores: m.target_cores,
            storage: m.storage,
            phase: m.phase,
            downtime_limit_ms: m.downtime_limit_ms,
            reason: m.reason,
            uri: m.uri,
            nbd: m.nbd,
            progress: None,
            started_at: m.started_at,
        });
        let last_migration = self.last_migration.map(|r| MigrationResult {
            id: r.id,
            source: r.source,
            target: r.target,
            storage: r.storage,
            outcome: r.outcome,
            message: r.message,
            downtime_ms: r.downtime_ms,
            qemu_downtime_ms: r.qemu_downtime_ms,
            transfer_ms: r.transfer_ms,
            paused_at_us: r.paused_at_us,
            total_ms: r.total_ms,
            reason: r.reason,
            finished_at: r.finished_at,
        });
        Vm {
            id: self.id,
            name: self.name,
            project: self.project,
            image: self.image,
            image_id: self.image_id,
            size: self.size,
            zone: self.zone,
            host: self.host,
            host_id: self.host_id,
            state: self.state,
            power: self.power,
            reboots: self.reboots,
            cpu_percent: None,
            message: self.message,
            cpu_policy: self.cpu_policy,
            cores: self.cores,
            requirements: self.requirements,
            rank: self.rank,
            groups: self.groups,
            migration,
            last_migration,
            evacuated_from: self.evacuated_from,
            metadata: self.metadata,
            created_at: self.created_at,
        }
    }

    /// A stored VM record of any version, read: the previous release's
    /// (version 0) carries migration reasons as sentences
    /// (`"drain of host h1"`), which become typed here.
    pub fn decode(bytes: &[u8]) -> serde_json::Result<VmRecord> {
        let mut value: serde_json::Value = serde_json::from_slice(bytes)?;
        if value.get("version").is_none() {
            for pointer in ["/migration/reason", "/last_migration/reason"] {
                if let Some(reason) = value.pointer_mut(pointer) {
                    if let Some(sentence) = reason.as_str() {
                        *reason = serde_json::to_value(legacy_reason(sentence))?;
                    }
                }
            }
        }
        serde_json::from_value(value)
    }
}

/// The typed reason of a sentence the previous release stored: it wrote
/// `requested`, `drain of host H`, `return to host H after its drain`,
/// `rebalance: DETAIL` and `power saving: DETAIL` (nothing else; anything
/// else is taken as an operator's request).
fn legacy_reason(sentence: &str) -> MigrationReason {
    if let Some(host) = sentence.strip_prefix("drain of host ") {
        return MigrationReason::Drain { host: host.into() };
    }
    if let Some(host) = sentence
        .strip_prefix("return to host ")
        .and_then(|s| s.strip_suffix(" after its drain"))
    {
        return MigrationReason::ReturnAfterDrain { host: host.into() };
    }
    if let Some(detail) = sentence.strip_prefix("rebalance: ") {
        return MigrationReason::Rebalance {
            detail: detail.into(),
        };
    }
    if let Some(detail) = sentence.strip_prefix("power saving: ") {
        return MigrationReason::PowerSaving {
            detail: detail.into(),
        };
    }
    MigrationReason::Operator
}

/// The version of [`HostRecord`] this release writes.
pub const HOST_RECORD_VERSION: u32 = 1;

/// What the store keeps of a host. Versions: 0, the previous release's
/// (no `version`); 1, the same fields, versioned.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostRecord {
    /// Absent (0) in the previous release's records; every write stamps
    /// [`HOST_RECORD_VERSION`] ([`super::Batch::put_host`]).
    #[serde(default)]
    pub version: u32,
    pub id: Uuid,
    pub name: String,
    pub project: String,
    pub zone: String,
    pub address: String,
    pub capacity: Resources,
    pub cpu_overcommit: f64,
    pub memory_overcommit: f64,
    pub cpu_model: String,
    pub labels: BTreeMap<String, String>,
    pub hypervisor: HypervisorInfo,
    #[serde(default)]
    pub datastore: Option<String>,
    #[serde(default)]
    pub mode: HostMode,
    /// What a draining host becomes once empty.
    #[serde(default = "maintenance")]
    pub after_drain: HostMode,
    /// Undrained with `return`: the VMs a drain took away come back.
    #[serde(default)]
    pub welcome_back: bool,
    /// When power saving switched the host off (its power-off command ran).
    #[serde(default)]
    pub standby_since: Option<Millis>,
    /// Energy saved in earlier standby periods, watt-hours.
    #[serde(default)]
    pub energy_saved_wh: f64,
    /// Bumped with every change to what the host should run.
    pub generation: u64,
    pub token_sha256: String,
    pub agent_secret: String,
    pub created_at: Millis,
}

/// What an operator (or power saving) made of a host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostMode {
    /// Takes VMs.
    #[default]
    Active,
    Disabled,
    Draining,
    Maintenance,
    Standby,
}

fn maintenance() -> HostMode {
    HostMode::Maintenance
}

/// A join token as stored: the secret itself only as a hash.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenRecord {
    pub token: JoinToken,
    pub sha256: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The previous release's VM records (one mid-migration, two with a
    /// drain's result) read as version 0, are written back as version 1
    /// without what is measured, and read back the same.
    #[test]
    fn vm_records_round_trip_from_the_previous_release() {
        let fixture: BTreeMap<String, serde_json::Value> =
            serde_json::from_str(include_str!("../../tests/fixtures/state-v0.json"))
                .expect("fixture");
        let old: Vec<_> = fixture
            .iter()
            .filter(|(k, _)| k.starts_with(VMS))
            .map(|(_, v)| serde_json::to_vec(v).expect("JSON"))
            .collect();
        assert_eq!(old.len(), 4);
        for bytes in old {
            let rec = VmRecord::decode(&bytes).expect("version 0 reads");
            assert_eq!(rec.version, 0);
            let mut vm = rec.into_vm();
            let read = vm.clone();
            vm.cpu_percent = Some(50.0);
            if let Some(m) = vm.migration.as_mut() {
                m.progress = Some(Default::default());
            }
            let written = serde_json::to_vec(&VmRecord::from_vm(&vm)).expect("writes");
            let again = VmRecord::decode(&written).expect("version 1 reads");
            assert_eq!(again.version, VM_RECORD_VERSION);
            assert_eq!(again.into_vm(), read);
        }
    }

    /// Only the previous release's records may carry a sentence for a
    /// reason.
    #[test]
    fn current_records_need_typed_reasons() {
        let fixture: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/state-v0.json"))
                .expect("fixture");
        let mut a = fixture["vms/a"].clone();
        a["version"] = VM_RECORD_VERSION.into();
        let err = VmRecord::decode(&serde_json::to_vec(&a).expect("JSON"))
            .expect_err("a sentence in a version 1 record");
        assert!(err.to_string().contains("reason") || err.is_data(), "{err}");
    }

    /// Every sentence the previous release stored becomes the reason whose
    /// sentence it is.
    #[test]
    fn legacy_reasons_become_typed() {
        let reasons = [
            MigrationReason::Operator,
            MigrationReason::Drain { host: "h1".into() },
            MigrationReason::ReturnAfterDrain { host: "h-2".into() },
            MigrationReason::Rebalance {
                detail: "host h3 at 93% > 80%: vm7 to h9".into(),
            },
            MigrationReason::PowerSaving {
                detail: "emptying host h4 at 3% < 20% to save power".into(),
            },
        ];
        for reason in reasons {
            assert_eq!(legacy_reason(&reason.to_string()), reason);
        }
    }
}
