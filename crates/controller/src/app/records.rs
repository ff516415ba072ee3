//! What the store keeps: every record kumo persists, the store key it
//! lives under, and the shape it is written in. The bottom of `app/`: it
//! imports nothing from the files above it, so the on-disk schema has one
//! place.
//!
//! Keys (one per record, prefixes below): `zones/<name>`, `hosts/<name>`,
//! `images/<name>`, `groups/<name>`, `vms/<name>`, `join-tokens/<uuid>`,
//! `events/<seq, 20 digits>` (zero-padded so the store's key order is the
//! event order).

use kumo_api::{HypervisorInfo, JoinToken, MigrationReason, Millis, Resources, Vm};
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
/// Key prefix of VM records.
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

/// A stored VM, read: records written before migration reasons were typed
/// carry them as sentences (`"drain of host h1"`), which become typed here.
pub fn decode_vm(bytes: &[u8]) -> serde_json::Result<Vm> {
    let mut value: serde_json::Value = serde_json::from_slice(bytes)?;
    for pointer in ["/migration/reason", "/last_migration/reason"] {
        if let Some(reason) = value.pointer_mut(pointer) {
            if let Some(sentence) = reason.as_str() {
                *reason = serde_json::to_value(legacy_reason(sentence))?;
            }
        }
    }
    serde_json::from_value(value)
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

/// The VM as the store keeps it: measurements stay in memory.
pub fn vm_record(vm: &Vm) -> Vm {
    Vm {
        cpu_percent: None,
        migration: vm.migration.clone().map(|m| kumo_api::Migration {
            progress: None,
            ..m
        }),
        ..vm.clone()
    }
}

/// What the store keeps of a host.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostRecord {
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
    /// Registered and not heard from yet (no heartbeat since it first
    /// joined): out of placement. Records from before this field have
    /// heartbeated, hence the default.
    #[serde(default)]
    pub joining: bool,
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
